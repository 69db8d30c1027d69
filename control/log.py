"""Structured log lines: logfmt on stderr, one line per event (start, stop,
apply, server state and health changes, warnings and errors), so that an
operator can grep them or ship them as they are."""

from __future__ import annotations

import json
import os
import sys
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
