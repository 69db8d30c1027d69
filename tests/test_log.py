"""logfmt lines: one per event, values quoted only where they must be."""

import contextlib
import os
import re
import sys

from xlb import log


def test_event_line(capsys):
    log.event("health", pool="was", server="was2", old="up", new="down",
              reason="connect: connection refused", check_duration=0.00123, skipped=None)
    line = capsys.readouterr().err
    assert line.count("\n") == 1
    assert re.fullmatch(
        r'ts=\S+Z level=info event=health pool=was server=was2 old=up new=down '
        r'reason="connect: connection refused" check_duration=0.0012\n', line)


def test_quoting(capsys):
    log.event("x", level="warning", a='say "hi"', b="", c="k=v", d=3)
    assert capsys.readouterr().err.split(" ", 1)[1] == \
        'level=warning event=x a="say \\"hi\\"" b="" c="k=v" d=3\n'


def test_a_log_nobody_reads_stops_nothing(monkeypatch):
    """`xlb up` whose stderr is a pipe whose reader is gone (`| tee` killed,
    say): a line that cannot be written is dropped, as the event it tells of
    (a server taken out by its checks, a stop) must happen all the same."""
    read, write = os.pipe()
    os.close(read)
    # Line-buffered, as Python's own stderr is: each line is written as the
    # event is logged, not at close, where no event would meet the error.
    with open(write, "w", buffering=1) as gone:
        monkeypatch.setattr(sys, "stderr", gone)
        log.event("health", pool="was", server="was2", old="up", new="down")
        monkeypatch.undo()
        with contextlib.suppress(BrokenPipeError):      # what the file still holds
            gone.close()


def test_a_closed_stderr_puts_no_line_on_stdout(monkeypatch, capsys):
    """`xlb up 2>&-`: Python makes a closed stderr None, and print(file=None)
    wrote the line to stdout, among the answer that a script reads there."""
    monkeypatch.setattr(sys, "stderr", None)
    log.event("state", level="warning", error="Not a directory")
    assert capsys.readouterr().out == ""


def test_a_long_list_is_cut_to_its_first_items_and_a_count():
    """A line about every server of a big balancer (a link's loss, the admin
    states restored) names the first twenty and counts the rest: 10,000
    names made a line of some 200 KiB, which journald splits and log
    shippers drop."""
    names = [f"web/s{i}" for i in range(10_000)]
    assert log.some(names) == ",".join(names[:20]) + " and 9980 more"
    assert log.some(names[:20]) == ",".join(names[:20])
    assert log.some(["a", "b", "c"], 2, "; ") == "a; b and 1 more"
    assert log.some([]) is None
