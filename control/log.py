"""Structured log lines: logfmt on stderr, one line per event (start, stop,
apply, server state and health changes, warnings and errors), so that an
operator can grep them or ship them as they are."""

from __future__ import annotations

import io
import json
import os
import sys
import syslog
from collections.abc import Iterable
from datetime import datetime, timezone


def _value(v) -> str:
    if isinstance(v, float):
        v = f"{v:.4f}".rstrip("0").rstrip(".")
    s = str(v)
    if not s or any(c in s for c in ' ="\\') or not s.isprintable():
        return json.dumps(s)
    return s


def event(name: str, level: str = "info", **fields) -> None:
    ts = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    parts = [f"ts={ts}", f"level={level}", f"event={name}"]
    parts += [f"{k}={_value(v)}" for k, v in fields.items() if v is not None]
    if sys.stderr is None:      # closed (`2>&-`): print(file=None) would write to stdout
        return
    try:
        print(" ".join(parts), file=sys.stderr, flush=True)
    except OSError:
        # Nobody reads it any more (a pipe whose reader is gone): the line is
        # lost, but what it tells of must still happen (a health change
        # applied, a clean stop), not end with it.
        pass


def some(items: Iterable[str], most: int = 20, sep: str = ",") -> str | None:
    """items joined, the first `most` of them and how many more (None for
    none): a line about 10,000 servers stays readable, and whole where log
    shippers take it (journald splits a line over 48 KiB)."""
    items = list(items)
    if not items:
        return None
    return sep.join(items[:most]) + (f" and {len(items) - most} more" if len(items) > most
                                     else "")


def silence(stream) -> None:
    """Points stream's descriptor at /dev/null for good: its reader is gone (a
    pipe closed, as in `xlb up | head -1`), and nothing written later, nor
    Python's flush at exit, must fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)


class Syslog(io.TextIOBase):
    """stderr where the caller closed fd 2 (`xlb up 2>&-`): each line goes to
    syslog (the journal), as a daemon's do. Python makes that stream None,
    which lost every error and warning, and what writes there regardless (a
    traceback, print_exc) wrote on stdout instead, among the answer."""

    def __init__(self):
        super().__init__()
        syslog.openlog("xlb", syslog.LOG_PID, syslog.LOG_DAEMON)
        self._rest = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self._rest = (self._rest + text).split("\n")
        for line in lines:
            syslog.syslog(_priority(line), line)
        return len(text)


def _priority(line: str) -> int:
    """A line's syslog priority: as its logfmt level or its `xlb: ...:` says;
    anything else written to stderr (a traceback) is an error."""
    if "level=info" in line:
        return syslog.LOG_INFO
    if "level=warning" in line or line.startswith("xlb: warning:"):
        return syslog.LOG_WARNING
    return syslog.LOG_ERR
