"""`xlb top`: a live terminal view of the instance running in this network namespace.

Two parts. `render` turns status dicts (what `xlb status --json` prints) into
rich renderables: a pure function, with the rates computed from two samples
and the time between them. `live` is the loop around it: it asks the instance
for its status every `interval` seconds over the control socket (in a thread,
so that keys and signals are read while it waits for the answer), redraws
(where stdout is no terminal, prints each frame after the last), and reads
keys from the terminal (in cbreak mode, restored on every way out).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import termios
import threading
import time
import tty
from collections.abc import Iterator
from dataclasses import dataclass

from rich.cells import cell_len, set_cell_size
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.measure import Measurement
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from . import ctl, log
from .units import count, full, interfaces, last_check, shown, si, unapplied

NO_RATE = "—"       # a rate needs two samples of the same counter
STATE_STYLES = {"up": "bold green", "down": "bold red", "drain": "bold yellow",
                "maint": "bold magenta"}
HEALTH_STYLES = {"up": "green", "down": "red"}
QUIT_KEYS = {b"q", b"Q", b"\x03"}   # \x03: Ctrl-C where the terminal does not signal it


class Stopped(Exception):
    def __init__(self):
        super().__init__("the xlb instance in this network namespace stopped")


@dataclass(frozen=True)
class Sample:
    at: float           # time.monotonic() when the status arrived
    status: dict


# --- rendering (pure) --------------------------------------------------------------

class _Rates:
    """Per-second deltas of one counter dict against its previous sample."""

    def __init__(self, cur: dict, prev: dict | None, seconds: float | None):
        self.cur, self.prev, self.seconds = cur, prev, seconds

    def value(self, key: str) -> float | None:
        if self.prev is None or not self.seconds or self.seconds <= 0:
            return None
        a, b = self.prev.get(key), self.cur.get(key)
        if a is None or b is None or b < a:     # new, or reset (e.g. re-created)
            return None
        return (b - a) / self.seconds

    def cell(self, key: str, style_if_nonzero: str = "") -> tuple[str, str]:
        """The rate as shown, and its style."""
        v = self.value(key)
        if v is None:
            return NO_RATE, "dim"
        return si(v), style_if_nonzero if v > 0 else ""

    def text(self, key: str, style_if_nonzero: str = "") -> Text:
        return Text(*self.cell(key, style_if_nonzero))


def _by_name(items: list[dict] | None) -> dict[str, dict]:
    return {i["name"]: i for i in items or []}


def _last_check(server: dict) -> tuple[str, str]:
    check = server.get("last_check")
    return last_check(server), "dim" if check is None else "" if check.get("ok", True) else "red"


def _header(s: dict, seconds: float | None, keys: bool) -> Text:
    t = Text()
    t.append(f"xlb {s.get('version', '?')}", style="bold")
    t.append(f"  pid {s.get('pid', '?')}  up {s.get('uptime_seconds', 0):.0f}s  "
             f"on {interfaces(s.get('interfaces', []))}")
    if s.get("config"):
        t.append(f"  config {shown(s['config'])}")
    t.append("\n")
    t.append(f"rates per second over the last {seconds:.1f} s" if seconds
             else "rates need a second sample", style="dim")
    if keys:
        t.append("  ·  q quits", style="dim")
    return t


def _table(title: str) -> Table:
    return Table(title=title, title_justify="left", title_style="bold", header_style="bold cyan",
                 box=None, pad_edge=False, padding=(0, 1))


def _frontends(s: dict, prev: dict | None, seconds: float | None) -> _Rows:
    t = _table("frontends")
    t.add_column("FRONTEND", no_wrap=True)
    t.add_column("VIP", no_wrap=True)
    t.add_column("POOL", no_wrap=True)
    # Numbers, one word each: wrapped or not, a narrow column cuts them alike.
    for col in ("TAKING", "CONN/S", "PKT/S IN", "PKT/S OUT", "BYTES/S IN", "BYTES/S OUT"):
        t.add_column(col, justify="right")
    old = _by_name(prev and prev.get("frontends"))
    cells = []
    for f in s.get("frontends", []):
        r = _Rates(f, old.get(f["name"]), seconds)
        taking = f.get("servers_taking_flows", 0)
        cells.append(((f["name"], ""), (f"{f['vip']}:{f['port']}/{f['protocol']}", ""),
                      (f["pool"], ""), (str(taking), "" if taking else "bold red"),
                      r.cell("new_flows", "bold"), r.cell("packets_in"), r.cell("packets_out"),
                      r.cell("bytes_in"), r.cell("bytes_out")))
    view = _Rows(t, cells)
    if not cells:
        t.add_row(Text("no frontend", style="dim"))
    return view


def _pool(p: dict, prev_pool: dict | None, seconds: float | None, rows: int) -> _Rows:
    t = _table(f"pool {p['name']} ({p.get('algorithm', '?')}, "
               f"on_server_down {p.get('on_server_down', '?')})")
    # A narrow terminal cuts the columns that may wrap: the last check's free
    # text (truncated, not wrapped) and the numbers' headers, never who and how.
    t.add_column("SERVER", no_wrap=True)
    t.add_column("ADDRESS", no_wrap=True)
    t.add_column("STATE", no_wrap=True)
    t.add_column("HEALTH", no_wrap=True)
    for col in ("WEIGHT", "ACTIVE", "CONN/S", "PKT/S IN", "PKT/S OUT"):
        t.add_column(col, justify="right")
    t.add_column("LAST CHECK")
    old = _by_name(prev_pool and prev_pool.get("servers"))
    servers = p.get("servers", [])
    cells = []
    for b in servers[:rows]:
        r = _Rates(b, old.get(b["name"]), seconds)
        state, health = b.get("state", "?"), b.get("health", "?")
        cells.append(((b["name"] + (" (backup)" if b.get("backup") else ""), ""),
                      (f"{b['address']}:{b['port']}", ""),
                      (state, STATE_STYLES.get(state, "")),
                      (health, HEALTH_STYLES.get(health, "")),
                      (str(b.get("weight", "")), ""), (si(b.get("active_flows", 0)), ""),
                      r.cell("new_flows", "bold"), r.cell("packets_in"), r.cell("packets_out"),
                      _last_check(b)))
    view = _Rows(t, cells)
    if len(servers) > rows:
        t.add_row(Text(f"… {count(len(servers) - rows)} more servers", style="dim"))
    return view


def _sizes(texts: list[str]) -> list[int]:
    """The cells each text takes on a terminal, as rich counts them: its
    length where all are printable ASCII (told apart at once, for 10,000)."""
    joined = "".join(texts)
    return list(map(len if joined.isascii() and joined.isprintable() else cell_len, texts))


class _Column:
    """One column of _Rows' rows, in one cell of rich's table: measured as
    rich measures a Text of them, one a line, so that the table lays the
    column out for them. Drawn as nothing, only told its width (_Rows draws
    the rows), or, `drawn`, line by line as rich draws that Text, each line
    cut (an ellipsis at its end), never wrapped."""

    def __init__(self, cells: list[tuple[str, str]]):
        self.texts, self.styles = [t for t, _ in cells], [s for _, s in cells]
        self.sizes = _sizes(self.texts)
        self.width = 0
        self.drawn = False

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        # As Text measures: its longest word, and its longest line.
        widest = max(self.sizes)
        words = " ".join(self.texts).split()
        return Measurement(max(_sizes(words)) if words else widest, widest)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        self.width = options.max_width
        if self.drawn:
            right = options.justify == "right"
            for (text, pad), style in zip(_cut(self.texts, self.sizes, self.width), self.styles):
                cell = Segment(text, console.get_style(style))
                yield from (Segment(pad), cell) if right else (cell, Segment(pad))
                yield Segment.line()


def _cut(texts: list[str], sizes: list[int], width: int) -> Iterator[tuple[str, str]]:
    """Each text cut to `width` as rich cuts a Text with an ellipsis, and the
    spaces that pad it to that width."""
    for text, size in zip(texts, sizes):
        if size > width:
            text, size = set_cell_size(text, width - 1) + "…", width
        yield text, " " * (width - size)


class _Rows:
    """A row of rich's table that stands for many rows, each a list of cells
    (text, style), drawn here: rich's cost is per cell and per line, and it
    took 2.3 s a frame to draw 10,000 servers. rich still lays the table out
    (the columns as wide as for these cells, cut to a narrow terminal), and
    draws its title, headers and other rows. Each cell is drawn as rich draws
    a Text that is cut, never wrapped, so that each row is one line (free
    text is escaped onto one)."""

    GAP = "  "      # _table's padding: a space each side of a cell, none at the edges

    def __init__(self, table: Table, rows: list[tuple[tuple[str, str], ...]]):
        self.table = table
        self.columns = [_Column(list(cells)) for cells in zip(*rows)]
        self.at = len(table.rows)
        if rows:
            table.add_row(*self.columns)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if not self.columns:
            yield from console.render(self.table, options)
            return
        lines = console.render_lines(self.table, options, pad=False)
        widths = [c.width for c in self.columns]
        if 0 in widths:
            # A column too narrow for a character (a terminal far too narrow):
            # how much narrower, rich alone knows, and it draws the rows (as
            # slowly as it did all of them).
            for c in self.columns:
                c.drawn = True
            try:
                yield from console.render(self.table, options)
            finally:
                for c in self.columns:
                    c.drawn = False
            return
        # The rows after ours are a line each (cut, never wrapped); ours, as
        # rich drew it, is a blank line.
        ours = len(lines) - (len(self.table.rows) - self.at)
        for line in lines[:ours]:
            yield from line
            yield Segment.line()
        yield from self._drawn(console, widths)
        for line in lines[ours + 1:]:
            yield from line
            yield Segment.line()

    def _drawn(self, console: Console, widths: list[int]) -> RenderResult:
        rights = [column.justify == "right" for column in self.table.columns]
        # Where the console draws no styles (a pipe, TERM=dumb) all is one
        # segment: rich's cost is per segment too.
        styled = console.color_system is not None
        styles = {name: console.get_style(name) for c in self.columns for name in set(c.styles)}
        columns = [zip(_cut(c.texts, c.sizes, width), c.styles)
                   for c, width in zip(self.columns, widths)]
        plain = ""      # unstyled text so far, drawn as one segment
        for row in zip(*columns):
            for i, (((text, pad), style), right) in enumerate(zip(row, rights)):
                if i:
                    plain += self.GAP
                if right:
                    plain += pad
                if style and styled:
                    yield Segment(plain)
                    yield Segment(text, styles[style])
                    plain = ""
                else:
                    plain += text
                if not right:
                    plain += pad
            plain += "\n"
        yield Segment(plain)


def _flows_and_drops(s: dict, prev: dict | None, seconds: float | None) -> Group:
    flows = s.get("flows", {})
    line = Text()
    line.append("flow table ", style="bold")
    line.append(f"{count(flows.get('entries', 0))}/{count(flows.get('capacity', 0))} entries:")
    # Each table on its own: the established one can be full, evicting, while
    # both together are not (the half-open one is a quarter of its size).
    fills = []
    for name, t in flows.get("tables", {}).items():
        shown, fill = full(t)
        # Red when the alert XlbFlowTableNearlyFull would fire (metrics/alerts.yml).
        style = "bold red" if fill > 90 else "yellow" if fill >= 75 else "green"
        fills.append(Text.assemble(f"{name} ", (f"{shown}% full", style)))
    # Apart by more than their colours, which a pipe, NO_COLOR or TERM=dumb leave out.
    line.append(" ")
    line.append_text(Text(", ").join(fills))
    line.append("  ·  two entries per connection", style="dim")

    t = _table("drops")
    t.add_column("REASON")
    t.add_column("DROPS/S", justify="right")
    t.add_column("TOTAL", justify="right")
    reasons = s.get("reasons", {})
    old = (prev or {}).get("reasons", {})
    for name, tally in reasons.items():
        if not name.startswith("drop_"):
            continue
        r = _Rates(tally, old.get(name), seconds)
        t.add_row(name[len("drop_"):], r.text("packets", "bold red"), si(tally["packets"]))
    return Group(line, Text(), t)


def render(current: dict, previous: dict | None = None, seconds: float | None = None,
           note: str | None = None, lines: int | None = None,
           keys: bool = False) -> RenderableType:
    """One frame of `xlb top` from a status dict, and the status `seconds` earlier
    for the rates (none: every rate shows as "—"). A sample from another instance
    (another pid: the counters started anew) counts as no previous sample. With
    `lines` (a terminal's height), at most that many servers' rows in all: the
    terminal shows no more, and 16,384 rows took rich seconds a frame. With
    `keys` (a live view that reads them), it says that q quits."""
    if previous is not None and previous.get("pid") != current.get("pid"):
        previous = None
    if previous is None:
        seconds = None
    parts: list[RenderableType] = [_header(current, seconds, keys), Text()]
    if lag := unapplied(current):
        parts += [Text(lag, style="bold red"), Text()]
    parts.append(_frontends(current, previous, seconds))
    old_pools = _by_name(previous and previous.get("pools"))
    left = lines
    for p in current.get("pools", []):
        shown = len(p.get("servers", []))
        if left is not None:
            shown = min(shown, left)
            left -= shown
        parts += [Text(), _pool(p, old_pools.get(p["name"]), seconds, shown)]
    parts += [Text(), _flows_and_drops(current, previous, seconds)]
    if note:
        parts += [Text(), Text(note, style="bold red")]
    return Group(*parts)


# --- the loop ----------------------------------------------------------------------

def sample(timeout: float = 5.0) -> Sample:
    status = ctl.request("status", timeout=timeout)
    return Sample(time.monotonic(), status)


class _Request:
    """A status request in a daemon thread: the loop goes on reading keys and
    signals meanwhile, so that q, Ctrl-C and SIGTERM quit at once, and a resize
    is redrawn, while the instance is slow to answer (or never does, until the
    request's timeout). `done` turns readable (end of file) once the answer
    is in; a request still in flight as top quits is left to its thread."""

    def __init__(self, timeout: float):
        self.done, self._end = os.pipe2(os.O_CLOEXEC)
        self._answer: Sample | Exception | None = None
        threading.Thread(target=self._ask, args=(timeout,), daemon=True).start()

    def _ask(self, timeout: float) -> None:
        try:
            self._answer = sample(timeout)
        except Exception as e:      # raised in the loop, by result()
            self._answer = e
        finally:
            os.close(self._end)

    def result(self) -> Sample:
        """The sample, once `done`; or raises what the request raised."""
        if isinstance(self._answer, Exception):
            raise self._answer
        return self._answer

    def close(self) -> None:
        os.close(self.done)


def frame(cur: Sample, prev: Sample | None, note: str | None = None,
          lines: int | None = None, keys: bool = False) -> RenderableType:
    if prev is None:
        return render(cur.status, note=note, lines=lines, keys=keys)
    return render(cur.status, prev.status, cur.at - prev.at, note=note, lines=lines, keys=keys)


def once(interval: float, console: Console | None = None) -> None:
    """Prints one frame, with rates over two samples `interval` apart; 160 columns
    wide when stdout is no terminal and COLUMNS is not set."""
    first = sample()
    time.sleep(interval)
    second = sample()
    (console or _console()).print(frame(second, first))


class ReaderGone(Exception):
    """stdout is a pipe whose reader went away (`xlb top | head`)."""


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich exits 1 here. A reader that has read what it wanted and gone
        # ends a piped view as q ends the live one: quietly, exit 0.
        self.quiet = True
        # What is left in the buffers goes nowhere at exit, not to the broken
        # pipe (Python would say so, and exit 120).
        log.silence(self.file)
        raise ReaderGone()


# The most columns or lines that COLUMNS and LINES are taken at: a frame of
# 1,000 by 1,000 takes rich 0.08 s, one of 10,000 by 10,000 seven seconds
# (and q waited for it).
MOST_CELLS = 1000            # four digits: int() is not asked to read a million


def _environ() -> dict[str, str]:
    """os.environ without a COLUMNS or LINES that is no terminal's size: 0
    (rich drew every frame 0 wide: nothing at all) or more than MOST_CELLS.
    Left out, they are the terminal's own size, as if unset."""
    return {k: v for k, v in os.environ.items()
            if k not in ("COLUMNS", "LINES")
            or v.isascii() and v.isdigit() and len(v) <= 4 and 0 < int(v) <= MOST_CELLS}


def _console() -> Console:
    """stdout's: 160 columns wide when it is no terminal and COLUMNS is not set
    (rich would take 80, and cut the rows short)."""
    environ = _environ()
    # A closed stdout (`>&-`) is None: rich writes nothing there, as to /dev/null.
    plain = not (sys.stdout and sys.stdout.isatty()) and "COLUMNS" not in environ
    # _environ: the environment rich reads COLUMNS and LINES from (os.environ by default)
    return _Console(width=160 if plain else None, _environ=environ)


class _Printed:
    """Where stdout is no terminal (a file, a pipe) or one that cannot redraw
    (TERM=dumb), each frame printed after the one before, every server listed,
    as --once: rich's Live, which redraws in place, prints nothing there."""

    def __init__(self, renderable: RenderableType, console: Console):
        self.console = console
        self.update(renderable)

    def __enter__(self) -> _Printed:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, renderable: RenderableType, refresh: bool = True) -> None:
        self.console.print(renderable)
        self.console.print()


@contextlib.contextmanager
def _cbreak(fd: int | None):
    """Keys arrive one by one, unechoed; the terminal is restored however we leave."""
    if fd is None:
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        with contextlib.suppress(termios.error):    # EIO: it hung up, nothing to restore
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def _signals():
    """SIGINT, SIGTERM and SIGWINCH set flags and wake the loop's select through a
    pipe, instead of raising in the middle of a request or a redraw."""
    got: set[int] = set()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGWINCH)
    old = {s: signal.signal(s, lambda n, _f: got.add(n)) for s in sigs}
    old_wakeup = signal.set_wakeup_fd(wake_w)
    try:
        yield got, wake_r
    finally:
        signal.set_wakeup_fd(old_wakeup)
        for s, h in old.items():
            signal.signal(s, h)
        os.close(wake_r)
        os.close(wake_w)


def live(interval: float, console: Console | None = None) -> int:
    """Redraws every `interval` seconds until q or Ctrl-C (returns 0) or SIGTERM
    (returns 143); raises NotRunning/ControlError if no instance answers at the
    start, Stopped if the instance goes away while it runs, and ReaderGone
    (_console's) if stdout's reader does."""
    prev: Sample | None = None
    note: str | None = None
    console = console or _console()
    keys = sys.stdin.fileno() if sys.stdin and sys.stdin.isatty() else None    # None: closed
    # A terminal that cannot redraw in place (TERM=dumb, Emacs' shell) gets no
    # frame at all from rich's Live: printed one after another, as in a pipe.
    redraws = console.is_terminal and not console.is_dumb_terminal
    view: Live | _Printed | None = None     # none until the first sample
    with _signals() as (got, wake), _cbreak(keys):

        def drawn() -> RenderableType:
            """The frame of the last samples and note: as many servers as the
            terminal has lines (all where it is none), and that q quits where
            keys are read."""
            return frame(cur, prev, note, console.height if redraws else None,
                         keys is not None)

        def wait(due: float | None = None, answer: int | None = None) -> int | None:
            """Reads keys and signals, at least once, until `due` (a time.monotonic())
            or until `answer` (a descriptor) is readable: the exit status if they
            say quit, else None."""
            watched = [wake] + [fd for fd in (keys, answer) if fd is not None]
            while True:
                ready, _, _ = select.select(watched, [], [], None if due is None
                                            else max(due - time.monotonic(), 0))
                if wake in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake, 512)
                if keys is not None and keys in ready:
                    try:
                        data = os.read(keys, 64)
                    except OSError:         # the terminal hung up
                        return 0
                    if not data or any(bytes([c]) in QUIT_KEYS for c in data):
                        return 0
                if signal.SIGINT in got:
                    return 0
                if signal.SIGTERM in got:
                    return 128 + signal.SIGTERM
                if signal.SIGWINCH in got:     # drawn anew: as many rows as it has lines now
                    got.discard(signal.SIGWINCH)
                    if view is not None and redraws:   # printed frames list all
                        view.update(drawn(), refresh=True)
                if answer in ready or due is not None and due <= time.monotonic():
                    return None

        with contextlib.closing(_Request(timeout=5.0)) as asking:
            if (code := wait(answer=asking.done)) is not None:
                return code
            cur = asking.result()
        with (Live(drawn(), console=console, screen=True, auto_refresh=False,
                   redirect_stdout=False, redirect_stderr=False)
              if redraws else _Printed(drawn(), console)) as view:
            due = cur.at + interval
            while True:
                # Keys and signals are read between any two frames, even when the
                # next is due already (a status that takes longer than the interval
                # left q and Ctrl-C unread), and while a request waits for its
                # answer (a slow or hung instance held them up to its timeout).
                if (code := wait(due=due)) is not None:
                    return code
                now = time.monotonic()
                due = due + interval if due + interval > now else now + interval
                with contextlib.closing(_Request(timeout=max(2.0, interval))) as asking:
                    if (code := wait(answer=asking.done)) is not None:
                        return code
                    try:
                        new = asking.result()
                    except ctl.NotRunning:
                        raise Stopped() from None
                    except (ctl.ControlError, OSError) as e:
                        note = f"status request failed: {e}; showing the last sample"
                    else:
                        prev, cur, note = cur, new, None
                view.update(drawn(), refresh=True)


def run(interval: float, one_frame: bool = False) -> int:
    """`xlb top`: the exit status to return (errors are raised)."""
    try:
        if one_frame:
            once(interval)
            return 0
        return live(interval)
    except ReaderGone:
        return 0
