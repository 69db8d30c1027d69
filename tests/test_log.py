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
    with open(write, "w") as gone:
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
