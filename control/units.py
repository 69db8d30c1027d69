"""Short numbers for narrow columns, exact counts, how full a flow table is, a server's
latest health check, health changes the data path lacks, the links attached, names
shown on one line, and values echoed cut short: shared by `xlb status`, `xlb top` and
the other commands' answers and errors."""

import os
import re
from collections.abc import Callable
from datetime import datetime, timezone


# A newline or other control character in what the operator gave (a TOML key,
# a flag's value, a file's name) is shown escaped: it must not break a message
# in two, or forge a line of its own; nor may the C1 controls (NEL, CSI), the
# Unicode line and paragraph separators, or the bidirectional overrides that
# show a name's text reversed. A byte of a file's name that is not UTF-8
# comes in as a lone surrogate (U+DC80-U+DCFF), which a UTF-8 locale's strict
# stdout cannot write: shown as the byte it was.
_ESCAPES = ({c: f"\\x{c:02x}" for c in (*range(32), *range(127, 160))}
            | {9: "\\t", 10: "\\n", 13: "\\r"}
            | {c: f"\\u{c:04x}" for c in (0x200e, 0x200f, *range(0x2028, 0x202f),
                                         *range(0x2066, 0x206a))}
            | {c: f"\\x{c - 0xdc00:02x}" if 0xdc80 <= c <= 0xdcff else f"\\u{c:04x}"
               for c in range(0xd800, 0xe000)})


def shown(text: str) -> str:
    """text on one line that any terminal can print (_ESCAPES)."""
    return text.translate(_ESCAPES)


# A value longer than LONG characters is echoed as its first SHOWN, "..." and
# its length: one of 100,000 (a flag's, a config file's) made a line of 100 KB.
LONG = 100
SHOWN = 60


def clipped(value: str | os.PathLike, spelt: Callable[[str], str] = str) -> str:
    """value (a file's name too) as a message echoes it, written by `spelt`
    (repr: quoted; a TOML key's spelling): whole, or cut short (LONG)."""
    text = os.fspath(value)
    if len(text) <= LONG:
        return spelt(text)
    return f"{spelt(text[:SHOWN])}... ({len(text):,} characters)"


def quoted(value: str) -> str:
    """repr(value), cut short as clipped() cuts it; a byte that was not UTF-8
    (a lone surrogate, which repr writes \\udcff) written as the byte it was,
    as shown() writes it in the rest of the line."""
    return clipped(value, lambda text: _SURROGATE.sub(r"\1\\x\2", repr(text)))


# In repr's text: \udc80-\udcff, not after a backslash that is itself escaped (\\).
_SURROGATE = re.compile(r"(?<!\\)((?:\\\\)*)\\udc([89a-f][0-9a-f])")


def interfaces(attached: list[dict]) -> str:
    """The links a data path is attached to (status's `interfaces`) with their
    XDP modes, and the state of those not up: "eth0 (native), eth1 (native,
    down), v0 (gone)". An instance of an earlier build tells no state."""
    def one(i: dict) -> str:
        state = i.get("state", "up")
        said = {"up": i["mode"], "down": f"{i['mode']}, down"}.get(state, state)
        return f"{shown(i['name'])} ({said})"
    return ", ".join(map(one, attached))


def si(x: float) -> str:
    """0, 7.5, 42, 1.2k, 3.4M: short numbers for narrow columns (counts below
    1000 exactly, rates below 10 to a tenth)."""
    # Each step judged by the number as it is shown: 999,950 rounds to 1000.0k,
    # which is 1.0M.
    if isinstance(x, int) and abs(x) < 1000:
        return str(x)
    if abs(round(x, 1)) < 10:
        return "0" if x == 0 else f"{x:.1f}"
    if abs(round(x)) < 1000:
        return f"{x:.0f}"
    for unit in ("k", "M", "G", "T", "P"):
        x /= 1000
        if abs(round(x, 1)) < 1000 or unit == "P":
            return f"{x:.1f}{unit}"
    raise AssertionError("unreachable")


def count(n: int) -> str:
    """262,144: an exact count, its thousands apart (a flow table's entries,
    alike in `xlb status` and `xlb top`)."""
    return f"{n:,}"


def full(table: dict) -> tuple[str, float]:
    """How full a flow table (an entry of status' flows.tables) is: its
    percentage as shown ("32.8", "<0.1" for a few entries of a large one),
    and as a number."""
    pct = table["entries"] / table["capacity"] * 100 if table["capacity"] else 0.0
    return ("<0.1" if 0 < pct < 0.1 else f"{pct:.1f}"), pct


def last_check(server: dict) -> str:
    """A server's latest health check (status's `last_check`), or why there is
    none: no monitor checks it, or its first check is still to come (checks
    are spread over the interval)."""
    check = server.get("last_check")
    if check is None:
        return "first check pending" if server.get("monitor") else "not checked"
    # Free text: a link's name (mark_down's "link NAME lost its carrier") may
    # hold control characters, as the kernel allows any but '/', ':' and space.
    reason, seconds = shown(check["reason"]), check.get("duration_seconds")
    return f"{reason} ({seconds * 1000:.1f} ms)" if seconds is not None else reason


def unapplied(status: dict) -> str | None:
    """Since when (UTC, as the log's lines) and why the data path lacks the
    health checks' latest states (status's health_applies); None while it
    holds them, or from an instance of an earlier build, which does not tell."""
    h = status.get("health_applies") or {}
    if not h.get("unapplied_since"):
        return None
    since = datetime.fromtimestamp(h["unapplied_since"], timezone.utc)
    return (f"health changes not in the data path since "
            f"{since.isoformat(timespec='seconds').replace('+00:00', 'Z')}, tried again "
            f"(STATE is what it holds): {shown(h['error'])}")
