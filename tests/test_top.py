"""`xlb top`: the rendering (status dicts -> text, no terminal, no kernel), the
loop against a faked `ctl.request` and a made-up clock (its pace, sampling,
stopping, signals, and keys typed at a pseudo-terminal; whether an instance
runs is found only in the lab), the loop against a stand-in for the instance
on the real control socket that is slow to answer (quitting and redrawing
meanwhile), and the real thing under a pseudo-terminal in the namespace lab
(prefix xlbv)."""

from __future__ import annotations

import contextlib
import copy
import fcntl
import inspect
import io
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console
from rich.text import Text

from xlb import ctl, top
from xlb.units import last_check

from labctl import HERE, PY, VIP, XLB, Lab, running_lab, wait_for
from test_ctl import run_dir, serving  # noqa: F401 (run_dir: a fixture)

NO_INSTANCE = "xlb: error: no xlb instance runs in this network namespace"
SCREEN_RESTORED = "\x1b[?25h\x1b[?1049l"      # the cursor shown, the main screen back

# The shape of `xlb status --json` from the seed lab (netns-lab/seed.toml) after
# 20 HTTP requests.
STATUS = {
    "version": "0.1.0", "pid": 15985, "uptime_seconds": 12.5, "config": "/tmp/xlbv-seed.toml",
    "interfaces": [{"name": "eth0", "ifindex": 2, "mode": "native"},
                   {"name": "eth1", "ifindex": 3, "mode": "native"}],
    "frontends": [{"name": "www", "vip": "10.1.1.101", "port": 80, "protocol": "tcp",
                   "pool": "was", "servers_taking_flows": 2, "packets_in": 120,
                   "bytes_in": 9720, "packets_out": 120, "bytes_out": 10920, "new_flows": 20}],
    "pools": [{"name": "was", "algorithm": "roundrobin", "on_server_down": "keep", "servers": [
        {"name": "was1", "address": "10.1.11.101", "port": 8080, "weight": 1, "backup": False,
         "monitor": None, "state": "up", "health": "up", "last_check": None, "health_changes": 0,
         "active_flows": 10, "packets_in": 60, "bytes_in": 4860, "packets_out": 60,
         "bytes_out": 5460, "new_flows": 10},
        {"name": "was2", "address": "10.1.11.102", "port": 8080, "weight": 1, "backup": False,
         "monitor": "was-http", "state": "up", "health": "up",
         "last_check": {"ok": True, "reason": "check passed", "duration_seconds": 0.001781},
         "health_changes": 0, "active_flows": 10, "packets_in": 60, "bytes_in": 4860,
         "packets_out": 60, "bytes_out": 5460, "new_flows": 10}]}],
    "flows": {"entries": 40, "capacity": 327680,
              "tables": {"flows": {"entries": 40, "capacity": 262144},
                         "flows_new": {"entries": 0, "capacity": 65536}}},
    "map_memory_bytes": 31031456,
    "applies": {"ok": 0, "error": 0}, "last_apply": 1795614912.0826135,
    "actions": {"XDP_ABORTED": 0, "XDP_DROP": 0, "XDP_PASS": 249, "XDP_TX": 1,
                "XDP_REDIRECT": 0},
    "reasons": {"pass_not_ip": {"packets": 0, "bytes": 0}, "pass_arp": {"packets": 3, "bytes": 126},
                "pass_short": {"packets": 0, "bytes": 0},
                "pass_not_vip": {"packets": 6, "bytes": 546},
                "forward": {"packets": 120, "bytes": 9720},
                "reply": {"packets": 120, "bytes": 10920},
                "arp_reply": {"packets": 1, "bytes": 42},
                "drop_malformed": {"packets": 0, "bytes": 0},
                "drop_fragment": {"packets": 0, "bytes": 0},
                "drop_no_backend": {"packets": 0, "bytes": 0}},
}


def later(status: dict = STATUS) -> dict:
    """STATUS two seconds on: 40 more connections, 2400 packets in and 1200 out,
    was1 drained, was2 down, 6 packets dropped for want of a backend."""
    s = copy.deepcopy(status)
    fe = s["frontends"][0]
    fe["new_flows"] += 40
    fe["packets_in"] += 2400
    fe["packets_out"] += 1200
    fe["bytes_in"] += 200_000
    fe["bytes_out"] += 3_000_000
    fe["servers_taking_flows"] = 0
    was1, was2 = s["pools"][0]["servers"]
    was1.update(state="drain", new_flows=was1["new_flows"] + 30,
                packets_in=was1["packets_in"] + 1800, active_flows=31)
    was2.update(state="down", health="down", new_flows=was2["new_flows"] + 10,
                last_check={"ok": False, "reason": "connect: connection refused",
                            "duration_seconds": 0.0002})
    s["reasons"]["drop_no_backend"]["packets"] += 6
    s["flows"]["entries"] = s["flows"]["tables"]["flows"]["entries"] = 131072
    return s


def text(renderable, styles: bool = False) -> str:
    console = Console(record=True, width=160, force_terminal=styles, color_system="standard")
    console.print(renderable)
    return console.export_text(styles=styles)


def line(out: str, first: str) -> str:
    """The line that starts with `first`."""
    for x in out.splitlines():
        if x.startswith(first + " "):
            return x
    raise AssertionError(f"no row {first!r} in\n{out}")


def row(out: str, first: str) -> list[str]:
    """The cells of the line that starts with `first` (cells are 2+ spaces apart)."""
    return re.split(r"\s{2,}", line(out, first).strip())


def styled_row(out: str, first: str) -> list[tuple[str, str]]:
    """The cells of a row of text(..., styles=True), each with its SGR code ("" if plain)."""
    cells = []
    for code, styled, plain in re.findall(r"\x1b\[([\d;]+)m([^\x1b]*)\x1b\[0m|([^\x1b]+)",
                                          line(out, first)):
        cells += ([(code, styled.strip())] if code else
                  [("", cell) for cell in re.split(r"\s{2,}", plain.strip()) if cell])
    return cells


# --- rendering -----------------------------------------------------------------------

def test_first_frame_has_no_rates():
    out = text(top.render(STATUS))
    assert "rates need a second sample" in out
    assert row(out, "www") == ["www", "10.1.1.101:80/tcp", "was", "2"] + ["—"] * 5
    # SERVER ADDRESS STATE HEALTH WEIGHT ACTIVE, then three rates, then the last check
    assert row(out, "was1") == ["was1", "10.1.11.101:8080", "up", "up", "1", "10",
                                "—", "—", "—", "not checked"]
    assert row(out, "was2")[-1] == "check passed (1.8 ms)"
    was2 = STATUS["pools"][0]["servers"][1]
    pending = copy.deepcopy(STATUS)
    pending["pools"][0]["servers"][1] = {**was2, "last_check": None}
    assert row(text(top.render(pending)), "was2")[-1] == "first check pending"
    assert row(out, "no_backend") == ["no_backend", "—", "0"]
    # Apart without colours too (a pipe, NO_COLOR, TERM=dumb)
    assert ("flow table 40/327,680 entries: flows <0.1% full, flows_new 0.0% full  ·  "
            "two entries per connection") in out
    assert "pool was (roundrobin, on_server_down keep)" in out


def test_rates_are_deltas_per_second():
    out = text(top.render(later(), STATUS, 2.0))
    assert "rates per second over the last 2.0 s" in out
    # TAKING 0, CONN/S 40/2, PKT/S IN 2400/2, OUT 1200/2, BYTES/S IN 200k/2, OUT 3M/2
    assert row(out, "www") == ["www", "10.1.1.101:80/tcp", "was", "0",
                               "20", "1.2k", "600", "100.0k", "1.5M"]
    assert row(out, "was1") == ["was1", "10.1.11.101:8080", "drain", "up", "1", "31",
                                "15", "900", "0", "not checked"]
    assert row(out, "was2") == ["was2", "10.1.11.102:8080", "down", "down", "1", "10",
                                "5.0", "0", "0", "connect: connection refused (0.2 ms)"]
    assert row(out, "no_backend") == ["no_backend", "3.0", "6"]
    assert row(out, "malformed") == ["malformed", "0", "0"]
    assert "flow table 131,072/327,680 entries: flows 50.0% full, flows_new 0.0% full" in out


def test_states_are_coloured():
    def styled(style: str, word: str, out: str) -> bool:   # a cell is padded in its style
        return re.search(rf"\x1b\[{style}m{word} *\x1b\[0m", out) is not None

    out = text(top.render(later(), STATUS, 2.0), styles=True)
    assert styled("1;33", "drain", out)                          # bold yellow
    assert styled("1;31", "down", out)                           # bold red
    assert styled("31", "down", out)                             # health: red
    assert styled("31", r"connect: connection refused \(0.2 ms\)", out)
    assert styled("1;31", " *3.0", out)                          # drops
    maint = later()
    maint["pools"][0]["servers"][0]["state"] = "maint"
    out = text(top.render(maint, STATUS, 1.0), styles=True)
    assert styled("1;35", "maint", out)                          # bold magenta
    assert styled("1;32", "up", text(top.render(STATUS), styles=True))
    # The established table nearly full is red, both tables together 80 % or not.
    full = later()
    full["flows"]["tables"]["flows"]["entries"] = 249037
    full["flows"]["tables"]["flows_new"]["entries"] = 13107
    full["flows"]["entries"] = 249037 + 13107
    out = text(top.render(full, STATUS, 1.0), styles=True)
    assert "262,144/327,680 entries" in out and styled("1;31", "95.0% full", out)
    assert styled("32", "20.0% full", out)                       # flows_new: green


def test_what_needs_a_look_stands_out():
    """Bold red: no server taking new flows, drops; bold: new connections; dim:
    no rate yet, no check. Other rates, and counters that stand still, plain."""
    out = text(top.render(later(), STATUS, 2.0), styles=True)
    assert styled_row(out, "www") == [("", "www"), ("", "10.1.1.101:80/tcp"), ("", "was"),
                                      ("1;31", "0"), ("1", "20"), ("", "1.2k"), ("", "600"),
                                      ("", "100.0k"), ("", "1.5M")]
    assert styled_row(out, "was1")[4:] == [("", "1"), ("", "31"), ("1", "15"), ("", "900"),
                                           ("", "0"), ("2", "not checked")]
    assert styled_row(out, "no_backend") == [("", "no_backend"), ("1;31", "3.0"), ("", "6")]
    assert styled_row(out, "malformed") == [("", "malformed"), ("", "0"), ("", "0")]
    idle = text(top.render(STATUS, STATUS, 1.0), styles=True)
    assert styled_row(idle, "www")[3:5] == [("", "2"), ("", "0")]
    assert styled_row(idle, "was2")[-1] == ("", "check passed (1.8 ms)")
    first = text(top.render(STATUS, note="status request failed: boom"), styles=True)
    assert styled_row(first, "www")[4:] == [("2", "—")] * 5
    assert "\x1b[1;31mstatus request failed: boom\x1b[0m" in first


@pytest.mark.parametrize(("entries", "style"), [(749, "32"), (750, "33"), (900, "33"),
                                                (901, "1;31")])
def test_a_flow_tables_fill_is_green_then_yellow_from_75_then_red_over_90(entries, style):
    """Red as the alert XlbFlowTableNearlyFull fires (metrics/alerts.yml): over 90 %."""
    tables = {"flows": {"entries": entries, "capacity": 1000},
              "flows_new": {"entries": 0, "capacity": 250}}
    out = text(top.render({**STATUS, "flows": {**STATUS["flows"], "tables": tables}}),
               styles=True)
    assert f" flows \x1b[{style}m{entries / 10:.1f}% full\x1b[0m" in out


def test_no_rate_for_a_counter_that_went_back_or_is_new():
    cur = later()
    cur["pools"][0]["servers"][0]["new_flows"] = 3           # re-created: counters anew
    cur["pools"][0]["servers"].append({**cur["pools"][0]["servers"][1], "name": "was3"})
    out = text(top.render(cur, STATUS, 2.0))
    assert row(out, "was1")[6] == "—"
    assert row(out, "was1")[7] == "900"                       # its other counters went on
    assert row(out, "was3")[6:9] == ["—", "—", "—"]
    assert row(out, "was2")[6] == "5.0"


def test_another_instance_has_no_rates():
    restarted = {**later(), "pid": 4242}
    out = text(top.render(restarted, STATUS, 1.0))
    assert "rates need a second sample" in out
    assert row(out, "www")[4:] == ["—"] * 5


def test_the_served_files_name_is_shown_on_its_line():
    """Escaped: a newline must not break the header in two, and a byte that
    is not UTF-8 (a lone surrogate in Python) could not be written to a
    strict UTF-8 terminal."""
    odd = {**STATUS, "config": "/etc/xlb\nxlb: ok\udcff.toml"}
    header = text(top.render(odd)).splitlines()[0]
    assert header.endswith("  config /etc/xlb\\nxlb: ok\\xff.toml"), header


def test_the_links_are_shown_as_status_shows_them():
    """Each in its state, as the kernel has it now: a deleted link is not
    shown served."""
    links = [{"name": "eth0", "ifindex": 2, "mode": "native", "state": "up"},
             {"name": "eth1", "ifindex": 3, "mode": "native", "state": "down"},
             {"name": "v0", "ifindex": 9, "mode": "native", "state": "gone"}]
    header = text(top.render({**STATUS, "interfaces": links})).splitlines()[0]
    assert "  on eth0 (native), eth1 (native, down), v0 (gone)  " in header, header


def test_health_changes_missing_from_the_data_path_stand_out():
    """As `xlb status` says it, in bold red under the header; nothing while
    the data path holds them."""
    from test_cli import UNAPPLIED, UNAPPLIED_LINE
    out = text(top.render({**STATUS, "health_applies": UNAPPLIED}), styles=True)
    assert f"\x1b[1;31m{UNAPPLIED_LINE}\x1b[0m" in out
    held = {"failed": 3, "unapplied_since": None, "error": None}
    assert "health changes" not in text(top.render({**STATUS, "health_applies": held}))


@pytest.mark.parametrize("width", [80, 100, 120])
def test_a_narrow_terminal_cuts_the_last_check_first(width):
    """In a terminal of 80 columns (the default) rows read "10.1…  STA…": rich
    cut every column but the last check's free text. Names, addresses, states
    and health stay whole; the last check gives way first."""
    console = Console(record=True, width=width)
    console.print(top.render(later(), STATUS, 2.0))
    out = console.export_text()
    assert max(map(len, out.splitlines())) <= width
    assert row(out, "FRONTEND")[:3] == ["FRONTEND", "VIP", "POOL"]
    assert row(out, "www")[:3] == ["www", "10.1.1.101:80/tcp", "was"]
    assert row(out, "SERVER")[:4] == ["SERVER", "ADDRESS", "STATE", "HEALTH"]
    assert row(out, "was1")[:4] == ["was1", "10.1.11.101:8080", "drain", "up"]
    assert row(out, "was2")[:4] == ["was2", "10.1.11.102:8080", "down", "down"]


@pytest.mark.parametrize("width", [80, 160])
def test_each_server_is_one_row_whose_cells_stand_under_their_headers(width):
    """A pool's servers, of names, addresses, states and checks of every width
    (the rows are drawn together, for speed), each on one line of its own,
    each cell under its column's header, as wide as the terminal or less."""
    status, prev = later(), STATUS
    server = status["pools"][0]["servers"][1]
    states = ("up", "drain", "down", "maint")
    status["pools"][0]["servers"] = [
        {**server, "name": "s" * (1 + i % 13) + str(i), "address": f"10.1.{i}.{i % 200 + 1}",
         "backup": i % 7 == 0, "state": states[i % 4], "active_flows": 10 ** (i % 6),
         "last_check": {"ok": i % 2 == 0, "reason": "r" * (i % 30), "duration_seconds": 0.001}}
        for i in range(150)]
    console = Console(record=True, width=width)
    console.print(top.render(status, prev, 2.0))
    lines = console.export_text().splitlines()
    assert max(map(len, lines)) <= width
    header = next(x for x in lines if x.startswith("SERVER "))
    head = lines.index(header)
    while not lines[head + 1].startswith("s"):     # a header rich wrapped on a narrow terminal
        head += 1
    rows = lines[head + 1:head + 151]
    assert [r.split()[0] for r in rows] == [b["name"] for b in status["pools"][0]["servers"]]
    state_at = header.index("STATE")
    assert header.index("HEALTH") > state_at
    for r, b in zip(rows, status["pools"][0]["servers"]):
        assert r[state_at:].split()[0] == b["state"], r
        assert (" (backup) " in r) == b["backup"], r
        if width == 160:
            assert r.rstrip().endswith(last_check(b)), r
    assert lines[head + 151] == ""


def two_pools(status: dict) -> dict:
    """status with a second pool, api: a server in maint with many flows, a
    backup of a long name whose first check is pending, and one whose check
    failed without a duration."""
    s = copy.deepcopy(status)
    was2 = s["pools"][0]["servers"][1]
    s["pools"].append({"name": "api", "algorithm": "maglev", "on_server_down": "reset", "servers": [
        {**was2, "name": "api1", "address": "10.1.12.101", "port": 9000, "weight": 3,
         "state": "maint", "health": "up", "active_flows": 123456},
        {**was2, "name": "api2-with-a-long-name", "address": "10.1.12.102", "port": 9000,
         "weight": 1, "backup": True, "monitor": "api-tcp", "last_check": None},
        {**was2, "name": "api3", "address": "10.1.12.103", "port": 9000,
         "last_check": {"ok": False, "reason": "link v0 lost its carrier",
                        "duration_seconds": None}}]})
    return s


# What `xlb top | cat` printed of two_pools(later()) before top drew the servers'
# rows itself (control/top.py at d2cb4e0), each line up to its "|": 160 columns
# wide, and 60 (COLUMNS=60) with 3 servers' rows at most, where rich squeezes the
# numbers' columns of pool was to a character or two, and those of pool api to
# none at all (rich draws its rows then).
PIPED_160 = """\
xlb 0.1.0  pid 15985  up 12s  on eth0 (native), eth1 (native)  config /tmp/xlbv-seed.toml|
rates per second over the last 2.0 s|
|
frontends                                                                                      |
FRONTEND  VIP                POOL  TAKING  CONN/S  PKT/S IN  PKT/S OUT  BYTES/S IN  BYTES/S OUT|
www       10.1.1.101:80/tcp  was        0      20      1.2k        600      100.0k         1.5M|
|
pool was (roundrobin, on_server_down keep)                                                                                |
SERVER  ADDRESS           STATE  HEALTH  WEIGHT  ACTIVE  CONN/S  PKT/S IN  PKT/S OUT  LAST CHECK                          |
was1    10.1.11.101:8080  drain  up           1      31      15       900          0  not checked                         |
was2    10.1.11.102:8080  down   down         1      10     5.0         0          0  connect: connection refused (0.2 ms)|
|
pool api (maglev, on_server_down reset)                                                                                                           |
SERVER                          ADDRESS           STATE  HEALTH  WEIGHT  ACTIVE  CONN/S  PKT/S IN  PKT/S OUT  LAST CHECK                          |
api1                            10.1.12.101:9000  maint  up           3  123.5k     5.0         0          0  connect: connection refused (0.2 ms)|
api2-with-a-long-name (backup)  10.1.12.102:9000  down   down         1      10     5.0         0          0  first check pending                 |
api3                            10.1.12.103:9000  down   down         1      10     5.0         0          0  link v0 lost its carrier            |
|
flow table 131,072/327,680 entries: flows 50.0% full, flows_new 0.0% full  ·  two entries per connection|
|
drops                     |
REASON      DROPS/S  TOTAL|
malformed         0      0|
fragment          0      0|
no_backend      3.0      6|
|
|
"""

PIPED_60 = """\
xlb 0.1.0  pid 15985  up 12s  on eth0 (native), eth1 |
(native)  config /tmp/xlbv-seed.toml|
rates per second over the last 2.0 s|
|
frontends                                                   |
                                           P…  PK…  B…  BYT…|
FRONTEND  VIP                POOL  T…  C…  IN  OUT  IN   OUT|
www       10.1.1.101:80/tcp  was    0  20  1…  600  1…  1.5M|
|
pool was (roundrobin, on_server_down keep)                  |
                                                   …  P…  L…|
SERVER  ADDRESS           STATE  HEALTH  …  …  C…  …  O…  C…|
was1    10.1.11.101:8080  drain  up      1  …  15  …   0  n…|
was2    10.1.11.102:8080  down   down    1  …  5…  0   0  c…|
|
pool api (maglev, on_server_down reset)                     |
SERVER            ADDRESS           STATE  HEALTH           |
api1              10.1.12.101:9000  maint  up               |
… 2 more servers                                            |
|
flow table 131,072/327,680 entries: flows 50.0% full, |
flows_new 0.0% full  ·  two entries per connection|
|
drops                     |
REASON      DROPS/S  TOTAL|
malformed         0      0|
fragment          0      0|
no_backend      3.0      6|
|
|
"""


@pytest.mark.parametrize(("columns", "lines", "expected"), [(None, None, PIPED_160),
                                                            ("60", 3, PIPED_60)])
def test_a_piped_frame_is_printed_as_it_was(monkeypatch, columns, lines, expected):
    """To the byte, trailing spaces and all: the servers' rows are drawn by
    top, the rest by rich."""
    monkeypatch.delenv("COLUMNS", raising=False)
    if columns:
        monkeypatch.setenv("COLUMNS", columns)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    top._Printed(top.render(two_pools(later()), two_pools(STATUS), 2.0, lines=lines),
                 top._console())
    assert sys.stdout.getvalue() == "\n".join(x[:-1] for x in expected.splitlines())


def pools(status: dict, n: int, size: int) -> dict:
    """status with n pools of `size` servers each, named p<pool>-s<server>."""
    s = copy.deepcopy(status)
    was = s["pools"][0]
    s["pools"] = [{**was, "name": f"p{p}", "servers": [
        {**was["servers"][i % 2], "name": f"p{p}-s{i}", "address": f"10.{p}.{i // 250}.{i % 250}"}
        for i in range(size)]} for p in range(n)]
    return s


def piped(renderable) -> str:
    """What a console on a pipe prints (no styles, 160 columns, as _console's)."""
    console = Console(file=io.StringIO(), width=160)
    console.print(renderable)
    return console.file.getvalue()


def test_a_piped_frame_lists_10000_servers_in_order():
    out = piped(top.render(pools(later(), 100, 100), pools(STATUS, 100, 100), 2.0))
    names = [x.split()[0] for x in out.splitlines() if re.match(r"p\d+-s\d+ ", x)]
    assert names == [f"p{p}-s{i}" for p in range(100) for i in range(100)]
    assert out.count("SERVER  ") == 100 and "more servers" not in out
    assert row(out, "p99-s98") == ["p99-s98", "10.99.0.98:8080", "drain", "up", "1", "31",
                                   "15", "900", "0", "not checked"]
    assert row(out, "p99-s99") == ["p99-s99", "10.99.0.99:8080", "down", "down", "1", "10",
                                   "5.0", "0", "0", "connect: connection refused (0.2 ms)"]


def many(status: dict, n: int) -> dict:
    """status with n frontends, and 10 pools of n servers each (pools())."""
    s = pools(status, 10, n)
    s["frontends"] = [{**s["frontends"][0], "name": f"f{i}"} for i in range(n)]
    return s


@pytest.mark.parametrize("draw", [piped, text])
def test_rich_makes_nothing_per_server_or_frontend(monkeypatch, draw):
    """rich's cost was per cell: 10,000 servers took 2.3 s a frame. It makes
    as many Texts to draw a frame of 1,000 frontends and 10 pools of 1,000
    servers as of 10 (on a pipe, and where styles are drawn)."""
    made = 0
    init = Text.__init__

    def counted(self, *args, **kwargs):
        nonlocal made
        made += 1
        init(self, *args, **kwargs)

    monkeypatch.setattr(Text, "__init__", counted)
    counts = []
    for size in (10, 1000):
        made = 0
        draw(top.render(many(later(), size), many(STATUS, size), 2.0))
        counts.append(made)
    assert counts[0] == counts[1]


def test_a_note_is_shown():
    out = text(top.render(STATUS, note="status request failed: boom"))
    assert "status request failed: boom" in out


# --- the loop, against a faked ctl.request --------------------------------------------

class FakeInstance:
    """Answers "status" with the given dicts in turn, then raises NotRunning
    (or calls `then`). In the list, an exception is raised in its turn, and a
    function is called and answered with STATUS. With a `clock`, each request
    takes `seconds` of it, and `asked` says when each came."""

    def __init__(self, monkeypatch, statuses, then=None, clock=None, seconds=0.0):
        self.statuses, self.then, self.calls = list(statuses), then, 0
        self.clock, self.seconds, self.asked, self.timeouts = clock, seconds, [], []
        monkeypatch.setattr(ctl, "request", self.request)

    def request(self, cmd, timeout=10.0, **args):
        assert cmd == "status"
        self.calls += 1
        self.timeouts.append(timeout)
        if self.clock:
            self.asked.append(self.clock.now)
            self.clock.now += self.seconds
        if self.statuses:
            answer = self.statuses.pop(0)
            if isinstance(answer, Exception):
                raise answer
            if callable(answer):
                answer()
                return STATUS
            return answer
        if self.then:
            self.then()
            return STATUS
        raise ctl.NotRunning()


def test_once_takes_two_samples_interval_apart(monkeypatch):
    FakeInstance(monkeypatch, [STATUS, later()])
    clock = Clock(monkeypatch)      # top's, not the time module every thread uses
    console = Console(record=True, width=160, file=io.StringIO())
    top.once(2.0, console)
    out = console.export_text()
    assert clock.now == 102.0
    assert out.count("frontends") == 1
    assert row(out, "www")[4] == "20"


@pytest.mark.parametrize("stdin_a_terminal", [False, True])
def test_q_quits_is_said_where_keys_are_read(monkeypatch, request, stdin_a_terminal):
    """By the live view with a terminal on stdin: --once reads no key, nor does
    a live view whose stdin is none (`ssh host xlb top`, without -t)."""
    Clock(monkeypatch)
    FakeInstance(monkeypatch, [STATUS, later()])
    console = Console(record=True, width=160, file=io.StringIO())
    top.once(1.0, console)
    assert "q quits" not in console.export_text()
    if stdin_a_terminal:
        request.getfixturevalue("terminal")
    FakeInstance(monkeypatch, [STATUS, lambda: os.kill(os.getpid(), signal.SIGINT)])
    console = Console(file=io.StringIO(), width=160)
    assert top.live(1.0, console) == 0
    assert ("q quits" in console.file.getvalue()) == stdin_a_terminal


def test_once_is_160_columns_wide_when_piped(monkeypatch, capsys):
    """rich would take 80 columns, and cut the rows short; COLUMNS still rules."""
    monkeypatch.delenv("COLUMNS", raising=False)
    Clock(monkeypatch)
    FakeInstance(monkeypatch, [STATUS, later(), STATUS, later()])
    top.once(2.0)
    out = capsys.readouterr().out
    assert row(out, "www")[1] == "10.1.1.101:80/tcp"
    assert row(out, "was2")[1] == "10.1.11.102:8080"
    assert max(map(len, out.splitlines())) > 100
    monkeypatch.setenv("COLUMNS", "100")
    top.once(2.0)
    assert max(map(len, capsys.readouterr().out.splitlines())) == 100


@pytest.mark.parametrize("columns", ["0", "9" * 100_000, "\u0661\u0660\u0660"])
def test_a_nonsense_columns_is_taken_as_unset(monkeypatch, capsys, columns):
    """COLUMNS=0 made rich draw every frame 0 wide: --once printed nothing.
    One of more than MOST_CELLS (or of digits not ASCII) is no terminal's either."""
    monkeypatch.setenv("COLUMNS", columns)
    Clock(monkeypatch)
    FakeInstance(monkeypatch, [STATUS, later()])
    top.once(2.0)
    out = capsys.readouterr().out
    assert row(out, "was2")[1] == "10.1.11.102:8080"
    assert max(map(len, out.splitlines())) > 100


@pytest.mark.parametrize("lines", ["0", "1000000"])
def test_a_nonsense_lines_is_the_terminals_own_height(monkeypatch, lines):
    """A frame is drawn as high as the terminal: LINES=1000000 took rich
    seconds a frame, and q waited for it."""
    monkeypatch.setenv("LINES", lines)
    monkeypatch.setenv("COLUMNS", "1000000")
    console = top._console()
    monkeypatch.delenv("LINES")
    monkeypatch.delenv("COLUMNS")
    assert console.size == top._console().size


def test_a_sane_terminal_size_is_kept(monkeypatch):
    monkeypatch.setenv("LINES", str(top.MOST_CELLS))
    monkeypatch.setenv("COLUMNS", "1")
    assert tuple(top._console().size) == (1, top.MOST_CELLS)


def test_no_rates_over_no_time():
    """Two samples the monotonic clock cannot tell apart."""
    out = text(top.render(later(), STATUS, 0.0))
    assert "rates need a second sample" in out
    assert row(out, "www")[4:] == ["—"] * 5


def test_live_stops_when_the_instance_goes_away(monkeypatch):
    fake = FakeInstance(monkeypatch, [STATUS, later()])
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(top.Stopped):
        top.live(0.05, Console(file=io.StringIO(), width=160))
    assert fake.calls == 3
    assert signal.getsignal(signal.SIGINT) is before


def test_live_quits_on_sigint(monkeypatch):
    FakeInstance(monkeypatch, [STATUS], then=lambda: os.kill(os.getpid(), signal.SIGINT))
    before = signal.getsignal(signal.SIGINT)
    assert top.live(0.05, Console(file=io.StringIO(), width=160)) == 0
    assert signal.getsignal(signal.SIGINT) is before


def test_live_draws_no_more_servers_than_the_terminal_has_lines(monkeypatch):
    """16 pools of 1,024 servers: a frame on a terminal of 30 lines draws 30
    servers' rows and says how many more there are (rich took 9 s a frame to
    draw them all, to show a screenful)."""
    big = copy.deepcopy(STATUS)
    server = big["pools"][0]["servers"][0]
    big["pools"] = [{**big["pools"][0], "name": f"p{p}",
                     "servers": [{**server, "name": f"s{p}-{i}"} for i in range(1024)]}
                    for p in range(16)]
    drawn = []
    render = top.render

    def drawing(*args, **kwargs):
        frame = render(*args, **kwargs)
        drawn.append(text(frame))
        return frame

    monkeypatch.setattr(top, "render", drawing)
    FakeInstance(monkeypatch, [big, big], then=lambda: os.kill(os.getpid(), signal.SIGINT))
    assert top.live(0.01, Console(file=io.StringIO(), width=160, height=30,
                                  force_terminal=True)) == 0
    last = [frame for frame in drawn if "s0-0 " in frame][-1]     # not the fake's last STATUS
    rows = [line for line in last.splitlines() if re.match(r"s\d+-\d+ ", line)]
    assert len(rows) == 30 and "… 994 more servers" in last
    assert last.count("… 1,024 more servers") == 15


def test_live_prints_each_frame_after_the_last_when_piped(monkeypatch):
    """Where stdout is no terminal (`xlb top > file`, `xlb top | tee`), rich's
    Live, which redraws in place, printed nothing at all, for as long as top
    ran: each frame is printed after the one before, every server listed, as
    --once lists them."""
    Clock(monkeypatch)
    FakeInstance(monkeypatch, [STATUS, later(), lambda: os.kill(os.getpid(), signal.SIGINT)])
    console = Console(file=io.StringIO(), width=160, height=5)
    assert top.live(1.0, console) == 0
    out = console.file.getvalue()
    first, second = out.split("rates need a second sample")[1].split("rates per second")
    assert "over the last 1.0 s" in second
    assert row(first, "was2")[2:4] == ["up", "up"]
    assert row(second, "was2")[2:4] == ["down", "down"]
    assert "\x1b" not in out and "more servers" not in out


@pytest.mark.parametrize("term", ["dumb", "unknown"])
def test_live_prints_each_frame_after_the_last_on_a_terminal_that_cannot_redraw(monkeypatch,
                                                                                term):
    """A terminal of TERM=dumb (Emacs' shell) or unknown: rich's Live, which
    redraws in place, printed nothing there for as long as top ran."""
    Clock(monkeypatch)
    FakeInstance(monkeypatch, [STATUS, later(), lambda: os.kill(os.getpid(), signal.SIGINT)])
    console = Console(file=io.StringIO(), width=160, force_terminal=True,
                      _environ={"TERM": term})
    assert top.live(1.0, console) == 0
    out = console.file.getvalue()
    first, second = out.split("rates need a second sample")[1].split("rates per second")
    assert row(first, "was2")[2:4] == ["up", "up"]
    assert row(second, "was2")[2:4] == ["down", "down"]
    assert "\x1b" not in out and "more servers" not in out


@pytest.mark.parametrize("frames", [0, 1])
def test_a_piped_view_whose_reader_goes_ends_quietly_as_q_ends_it(monkeypatch, capfd, frames):
    """`xlb top | head -1`: the reader goes once it has read what it wanted
    (before the first frame, or after it), and the next frame finds the pipe
    broken. The view ends as q ends it, exit 0, nothing said (rich exited 1),
    and what is left of stdout is closed without a word; so does --once, as
    `xlb status | head -1` does."""
    Clock(monkeypatch)
    read, write = os.pipe()
    if frames == 0:
        os.close(read)
    with os.fdopen(write, "w") as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)
        FakeInstance(monkeypatch, [STATUS, lambda: os.close(read), STATUS])
        assert top.run(1.0) == 0
    read, write = os.pipe()
    os.close(read)
    with os.fdopen(write, "w") as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)
        FakeInstance(monkeypatch, [STATUS, STATUS])
        assert top.run(1.0, one_frame=True) == 0
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("closed", ["stdin", "stdout"])
def test_a_closed_stdin_or_stdout_is_taken_as_dev_null(monkeypatch, closed):
    """`xlb top <&-`, `xlb top >&-` (a script's): Python makes the closed one
    None, and asking it isatty() ended top with a traceback. Closed, stdin reads
    no keys and stdout shows nothing, as /dev/null would."""
    Clock(monkeypatch)
    monkeypatch.setattr(sys, closed, None)
    FakeInstance(monkeypatch, [STATUS, lambda: os.kill(os.getpid(), signal.SIGINT)])
    assert top.run(1.0) == 0
    FakeInstance(monkeypatch, [STATUS, STATUS])
    assert top.run(1.0, one_frame=True) == 0


class Clock:
    """The loop's time, made up: `monotonic()` reads it, and `select()` looks
    at the real descriptors (the signals' pipe, a terminal) and, when none is
    ready, lets its whole timeout pass at once, and `late` seconds more, and
    calls `on_wait`; without a timeout, it waits as the real one does."""

    def __init__(self, monkeypatch, now: float = 100.0, late: float = 0.0,
                 on_wait=lambda: None):
        self.now, self.late, self.on_wait = now, late, on_wait
        monkeypatch.setattr(top, "time", self)
        monkeypatch.setattr(top, "select", self)

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def select(self, rlist, wlist, xlist, timeout):
        if timeout is None:     # a wait for a request in flight: as long as it takes
            return select.select(rlist, wlist, xlist)
        ready = select.select(rlist, wlist, xlist, 0)
        if not ready[0]:
            self.now += timeout + self.late
            self.on_wait()
        return ready


def frames(monkeypatch) -> list[tuple]:
    """What each frame is drawn from: (status, previous, seconds, note, lines)."""
    drawn = []
    render = top.render

    def drawing(current, previous=None, seconds=None, note=None, lines=None, keys=False):
        drawn.append((current, previous, seconds, note, lines))
        return render(current, previous, seconds, note, lines, keys)

    monkeypatch.setattr(top, "render", drawing)
    return drawn


def test_live_keeps_its_pace(monkeypatch):
    """Each sample is due an interval after the one before was due: neither
    the 0.25 s that each request takes nor waits that end 0.125 s late add up."""
    clock = Clock(monkeypatch, late=0.125)
    fake = FakeInstance(monkeypatch, [STATUS] * 4, clock=clock, seconds=0.25)
    drawn = frames(monkeypatch)
    with pytest.raises(top.Stopped):
        top.live(1.0, Console(file=io.StringIO(), width=160))
    assert fake.asked == [100.0, 101.375, 102.375, 103.375, 104.375]
    assert fake.timeouts == [5.0, 2.0, 2.0, 2.0, 2.0]     # at least 2 s, or the interval
    # Rates are over the time between two answers: the first came at 100.25.
    assert [seconds for _, _, seconds, _, _ in drawn] == [None, 1.375, 1.0, 1.0]


def test_live_waits_at_least_2_s_for_a_sample_or_the_interval(monkeypatch):
    clock = Clock(monkeypatch)
    fake = FakeInstance(monkeypatch, [STATUS], clock=clock)
    with pytest.raises(top.Stopped):
        top.live(10.0, Console(file=io.StringIO(), width=160))
    assert fake.timeouts == [5.0, 10.0]


def test_a_late_sample_is_not_made_up_for_with_a_burst(monkeypatch):
    """The second request takes 3.5 s: the next comes at once, the one after an
    interval later, not three at once to catch up with the missed ones."""
    clock = Clock(monkeypatch)

    def slow():
        clock.now += 3.5

    fake = FakeInstance(monkeypatch, [STATUS, slow, STATUS, STATUS], clock=clock)
    with pytest.raises(top.Stopped):
        top.live(1.0, Console(file=io.StringIO(), width=160))
    assert fake.asked == [100.0, 101.0, 104.5, 105.5, 106.5]


@pytest.mark.parametrize("error", [ctl.ControlError("boom"), ConnectionResetError("boom")])
def test_a_failed_sample_keeps_the_last_one_with_a_note(monkeypatch, error):
    """The instance busy (no answer in time), or a connection reset: top goes on."""
    Clock(monkeypatch)
    FakeInstance(monkeypatch, [STATUS, error, later()])
    drawn = frames(monkeypatch)
    with pytest.raises(top.Stopped):
        top.live(1.0, Console(file=io.StringIO(), width=160))
    assert drawn[1][:4] == (STATUS, None, None,
                            "status request failed: boom; showing the last sample")
    # The next rates are over both intervals, against the last sample that came.
    assert drawn[2][:4] == (later(), STATUS, 2.0, None)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 0), (signal.SIGTERM, 143)])
def test_live_stops_on_a_signal(monkeypatch, sig, code):
    Clock(monkeypatch)
    fake = FakeInstance(monkeypatch, [STATUS, lambda: os.kill(os.getpid(), sig)])
    assert top.live(1.0, Console(file=io.StringIO(), width=160)) == code
    assert fake.calls == 2


def test_a_resized_terminal_is_redrawn_to_its_height_without_a_sample(monkeypatch):
    """As many servers' rows as it has lines now, not as it had when the
    frame was drawn."""
    console = Console(file=io.StringIO(), width=160, height=30, force_terminal=True)

    def resized():
        if console.height == 30:
            console.height = 50
            os.kill(os.getpid(), signal.SIGWINCH)

    Clock(monkeypatch, on_wait=resized)
    fake = FakeInstance(monkeypatch, [STATUS, STATUS])
    drawn = frames(monkeypatch)
    with pytest.raises(top.Stopped):
        top.live(1.0, console)
    assert fake.calls == 3
    assert [lines for *_, lines in drawn] == [30, 50, 50]


@pytest.fixture
def terminal(monkeypatch):
    """A pseudo-terminal as stdin: the test types at the master end."""
    master, slave = os.openpty()
    with open(slave, "rb", buffering=0) as stdin:
        monkeypatch.setattr("sys.stdin", stdin)
        yield master
    with contextlib.suppress(OSError):
        os.close(master)


@pytest.mark.parametrize("key", [b"q", b"Q", b"\x03", b"xq"])
def test_live_quits_on_a_key(monkeypatch, terminal, key):
    """In cbreak mode, restored as it was; other keys do nothing. Ctrl-C comes
    as a byte where the terminal does not make it a signal (no ISIG)."""
    modes = termios.tcgetattr(terminal)
    modes[3] &= ~termios.ISIG
    termios.tcsetattr(terminal, termios.TCSANOW, modes)
    cbreak = []
    Clock(monkeypatch)
    fake = FakeInstance(monkeypatch, [
        STATUS,
        lambda: cbreak.append(termios.tcgetattr(terminal)[3] & (termios.ICANON | termios.ECHO)),
        lambda: os.write(terminal, b"x"), lambda: os.write(terminal, key)])
    assert top.live(1.0, Console(file=io.StringIO(), width=160)) == 0
    assert fake.calls == 4
    assert cbreak == [0]
    assert termios.tcgetattr(terminal) == modes


@pytest.mark.parametrize("stop", [lambda term: os.write(term, b"q"),
                                  lambda term: os.kill(os.getpid(), signal.SIGINT)],
                         ids=["q", "ctrl-c"])
def test_live_stops_when_each_sample_takes_longer_than_the_interval(monkeypatch, terminal,
                                                                    stop):
    """Keys and signals are read between any two frames, even when the next
    is due already: a status slower than --interval made q and Ctrl-C do
    nothing, and top asked on until the instance went."""
    clock = Clock(monkeypatch)
    fake = FakeInstance(monkeypatch, [STATUS, STATUS, lambda: stop(terminal), STATUS],
                        clock=clock, seconds=1.5)
    assert top.live(1.0, Console(file=io.StringIO(), width=160)) == 0
    assert fake.calls == 3


def test_live_quits_when_its_terminal_hangs_up(monkeypatch, terminal):
    """Without a traceback: there are no modes to restore on a terminal that is gone."""
    Clock(monkeypatch)
    FakeInstance(monkeypatch, [STATUS, lambda: os.close(terminal)])
    assert top.live(1.0, Console(file=io.StringIO(), width=160)) == 0


# --- the loop, against a stand-in for the instance on the real control socket ---------

@contextlib.contextmanager
def slow_instance(during, answered: int = 1):
    """A stand-in for the instance (test_ctl.py's, on the real socket) that
    answers the first `answered` status requests at once, and the next one
    never: it calls `during()` and holds the request unanswered until the
    test is done (at most 10 s). Yields an event set while it holds it."""
    holding, released = threading.Event(), threading.Event()
    asked = []
    before = set(threading.enumerate())

    def handle(conn):
        with conn.makefile("rb") as f:
            asked.append(json.loads(f.readline())["cmd"])
        if len(asked) <= answered:
            conn.sendall(json.dumps({"ok": True, "result": STATUS}).encode() + b"\n")
            return
        holding.set()
        during()
        released.wait(10)
        holding.clear()

    with serving(handle, connections=answered + 1):
        try:
            yield holding
        finally:
            released.set()
    # top left its request in flight to its thread, which, unanswered, pings:
    # on a busy machine late enough to reach the next test's stand-in.
    for thread in set(threading.enumerate()) - before:
        thread.join(10)
    assert asked == ["status"] * (answered + 1)


STOPS = pytest.mark.parametrize(("stop", "code"), [
    (lambda term: os.write(term, b"q"), 0),
    (lambda term: os.kill(os.getpid(), signal.SIGINT), 0),
    (lambda term: os.kill(os.getpid(), signal.SIGTERM), 143)], ids=["q", "ctrl-c", "sigterm"])


@STOPS
def test_live_quits_at_once_while_the_instance_is_slow_to_answer(monkeypatch, run_dir, terminal,
                                                                 stop, code):
    """Not once the status request in flight is answered, or has failed after
    its timeout (here 60 s): a hung instance held q, Ctrl-C and SIGTERM that
    long. The terminal's modes and screen are restored as on any way out."""
    modes = termios.tcgetattr(terminal)
    Clock(monkeypatch)                  # top's time; the socket's timeout is real
    console = Console(file=io.StringIO(), width=160, force_terminal=True)
    with slow_instance(lambda: stop(terminal)) as holding:
        assert top.live(60.0, console) == code
        assert holding.is_set()         # the request is still unanswered
    assert termios.tcgetattr(terminal) == modes
    assert console.file.getvalue().endswith(SCREEN_RESTORED)


@STOPS
def test_live_quits_at_once_while_the_instance_is_slow_to_answer_first(run_dir, terminal,
                                                                       stop, code):
    """With the same exit status as later, before any frame: q was not read
    (a terminal not yet in cbreak mode kept it for a line, which cbreak mode
    then dropped), Ctrl-C exited 130 and SIGTERM killed top."""
    def not_tops(signum, _frame):   # fails the test, rather than end the run
        pytest.fail(f"signal {signum} came before top handled it")

    modes = termios.tcgetattr(terminal)
    console = Console(file=io.StringIO(), width=160, force_terminal=True)
    old = {sig: signal.signal(sig, not_tops) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with slow_instance(lambda: stop(terminal), answered=0) as holding:
            assert top.live(60.0, console) == code
            assert holding.is_set()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    assert termios.tcgetattr(terminal) == modes
    assert console.file.getvalue() == ""        # nothing drawn


def test_a_resize_is_drawn_at_once_while_the_instance_is_slow_to_answer(monkeypatch, run_dir):
    console = Console(file=io.StringIO(), width=160, height=30, force_terminal=True)
    drawn, redrawn = [], threading.Event()
    render = top.render

    def drawing(current, previous=None, seconds=None, note=None, lines=None, keys=False):
        drawn.append((lines, holding.is_set()))
        if lines == 50:
            redrawn.set()
        return render(current, previous, seconds, note, lines, keys)

    def resize():
        console.height = 50
        os.kill(os.getpid(), signal.SIGWINCH)
        redrawn.wait(10)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(top, "render", drawing)
    Clock(monkeypatch)
    with slow_instance(resize) as holding:
        assert top.live(60.0, console) == 0
    assert drawn == [(30, False), (50, True)]   # drawn anew while the request was held


def test_a_resize_prints_no_frame_again_when_piped(monkeypatch, run_dir):
    """Where stdout is no terminal, each frame lists every server whatever the
    terminal's size: a resize of the terminal it runs in (`xlb top | tee`)
    printed the last frame once more, its samples and all."""
    console = Console(file=io.StringIO(), width=160)
    drawn = []
    render = top.render

    def drawing(current, previous=None, seconds=None, note=None, lines=None, keys=False):
        drawn.append(lines)
        return render(current, previous, seconds, note, lines, keys)

    # Read by top's loop before the Ctrl-C, which would win if both waited:
    # once its handler has noted the SIGWINCH (in the set `got`), and the loop
    # has taken it from there.
    noted, got, install = threading.Event(), [], signal.signal

    def installing(signum, handler):
        if signum == signal.SIGWINCH and callable(handler):     # top's
            got.append(inspect.getclosurevars(handler).nonlocals["got"])

            def noting(n, frame):
                handler(n, frame)
                noted.set()
            return install(signum, noting)
        return install(signum, handler)

    def resize():
        os.kill(os.getpid(), signal.SIGWINCH)
        wait_for(lambda: noted.is_set() and signal.SIGWINCH not in got[0], 10,
                 "top's loop reads the SIGWINCH")
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(top, "render", drawing)
    monkeypatch.setattr(signal, "signal", installing)
    Clock(monkeypatch)
    with slow_instance(resize):
        assert top.live(60.0, console) == 0
    assert drawn == [None]

# --- the lab ---------------------------------------------------------------------------

CSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[()][0-9A-Za-z]|\x1b[=>78]")


def in_sleep(pid: int) -> bool:
    """Whether process pid waits in clock_nanosleep (time.sleep; 230 on x86-64)."""
    try:
        return Path(f"/proc/{pid}/syscall").read_text().split()[0] == "230"
    except (OSError, IndexError):
        return False


class Pty:
    """A command in a lab node with a pseudo-terminal (160x50) as its controlling
    terminal, so that typed keys reach it and Ctrl-C signals it."""

    def __init__(self, lab: Lab, node: str, *args: str):
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.ns(node), str(XLB), *args],
            stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
            env={**os.environ, "TERM": "xterm-256color"})
        os.close(slave)
        self.raw = b""
        self.modes = termios.tcgetattr(self.master)    # the slave's, as the command found them

    def cbreak(self) -> bool:
        """Whether the terminal is in cbreak mode now: no line editing, no echo."""
        lflag = termios.tcgetattr(self.master)[3]
        return not lflag & (termios.ICANON | termios.ECHO)

    def restored(self) -> bool:
        return termios.tcgetattr(self.master) == self.modes

    def read(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.master], [], [], left)
            if not ready:
                continue
            try:
                data = os.read(self.master, 65536)
            except OSError:         # EIO: every copy of the slave side is closed
                data = b""
            if not data:
                time.sleep(min(0.05, max(left, 0)))
                if self.proc.poll() is not None:
                    return
                continue
            self.raw += data

    def read_until(self, needle: str, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if needle in self.text:
                return True
            self.read(0.1)
        return needle in self.text

    def send(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def wait(self, seconds: float) -> int | None:
        """The exit status, or None if it still runs after `seconds`."""
        deadline = time.monotonic() + seconds
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.read(0.1)
        self.read(0.1)
        return self.proc.poll()

    @property
    def text(self) -> str:
        return CSI.sub("", self.raw.decode(errors="replace"))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        os.close(self.master)


def frontend_rates(out: str) -> list[str]:
    """The CONN/S cell of every www row in the output, frame by frame."""
    return re.findall(r"www +10\.1\.1\.101:80/tcp +was +\d+ +(\S+)", out)


def lab_test(f):
    return pytest.mark.lab(pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")(f))


@pytest.fixture(scope="module")
def lab():
    with running_lab("xlbv") as lab:
        yield lab


@pytest.fixture(scope="module")
def seeded(lab, tmp_path_factory):
    """The seed config served in lb, with 20 connections made."""
    with lab.xlb_seed(tmp_path_factory.mktemp("top")) as x:
        assert lab.client("client", "http", VIP, "80", "--count", "20")["errors"] == []
        yield x


@lab_test
def test_lab_top_shows_rates_and_quits_on_q(lab, seeded):
    def busy(rate: str) -> bool:
        return rate != "—" and float(rate.rstrip("kM")) > 0

    load = lab.spawn("client", PY, str(HERE / "clients.py"), "load", VIP, "80",
                     "--seconds", "30", "--concurrency", "2")
    term = Pty(lab, "lb", "top")
    try:
        deadline = time.monotonic() + 20    # a frame a second: the second one has rates
        while time.monotonic() < deadline and not any(map(busy, frontend_rates(term.text))):
            term.read(0.25)
        out = term.text
        assert "www" in out and "was1" in out and "was2" in out, out
        rates = frontend_rates(out)
        assert rates[0] == "—", rates                                  # the first frame
        assert any(map(busy, rates[1:])), rates
        assert term.cbreak()
        term.send(b"q")
        assert term.wait(20) == 0, term.text
        assert term.restored()
        assert b"\x1b[?25h" in term.raw                                # the cursor is back
        assert b"\x1b[?1049l" in term.raw                              # the screen too
        assert "Traceback" not in term.text
    finally:
        term.close()
        load.kill()
        load.communicate(timeout=10)


@lab_test
def test_lab_top_quits_on_ctrl_c(lab, seeded):
    term = Pty(lab, "lb", "top", "--interval", "0.5")
    try:
        assert term.read_until("was2", 20), term.text
        assert term.cbreak()
        term.send(b"\x03")
        assert term.wait(20) == 0, term.text
        assert term.restored()
        assert b"\x1b[?25h" in term.raw
        assert "Traceback" not in term.text
    finally:
        term.close()


@lab_test
def test_lab_top_once_is_interrupted_by_ctrl_c_as_any_command(lab, seeded):
    """--once is no live view: Ctrl-C between its two samples ends it as it
    ends `xlb status`, exit 130, without a frame or a traceback."""
    term = Pty(lab, "lb", "top", "--once", "--interval", "30")
    try:
        # Its first sample taken, the second 30 s away; not a fixed pause: a
        # Ctrl-C during Python's start (over a second on a busy machine) ends
        # any Python program with a traceback.
        wait_for(lambda: in_sleep(term.proc.pid), 30, "top --once waits for its second sample")
        term.send(b"\x03")
        assert term.wait(20) == 130, term.text
        assert "frontends" not in term.text and "Traceback" not in term.text, term.text
    finally:
        term.close()


@lab_test
def test_lab_top_once(lab, seeded):
    # An explicit environment: pytest's readline puts COLUMNS=80 into the process
    # environment behind os.environ's back, and rich would follow it.
    r = subprocess.run(["ip", "netns", "exec", lab.ns("lb"), str(XLB), "top", "--once",
                        "--interval", "0.5"], env=dict(os.environ), capture_output=True,
                       text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("frontends") == 1, r.stdout
    assert row(r.stdout, "www")[:4] == ["www", "10.1.1.101:80/tcp", "was", "2"], r.stdout
    assert row(r.stdout, "www")[4] != "—"
    assert row(r.stdout, "was1")[2:4] == ["up", "up"]
    assert row(r.stdout, "was2")[2:4] == ["up", "up"]
    assert "\x1b[" not in r.stdout                     # no terminal: no colours


@lab_test
def test_lab_top_without_instance(lab):
    for args in (["top"], ["top", "--once"]):
        r = lab.xlb_cmd(*args, node="client", timeout=20)
        assert (r.returncode, r.stdout, r.stderr) == (1, "", NO_INSTANCE + "\n"), args
    term = Pty(lab, "client", "top")
    try:
        assert term.wait(20) == 1
        assert term.text.strip() == NO_INSTANCE
    finally:
        term.close()


@lab_test
def test_lab_top_exits_1_when_the_instance_stops(lab):
    """An instance of its own, in remote (lb's may still serve the other tests),
    whose backend is fwex's address: remote's own would be refused."""
    x = lab.xlb("--vip", "198.51.100.200:80", "--backend", "198.51.100.1:8080",
                "--check", "none", "--metrics", "off", node="remote")
    with x:
        term = Pty(lab, "remote", "top", "--interval", "0.3")
        try:
            assert term.read_until("198.51.100.1:8080", 20), term.text
            assert x.stop() == 0
            assert term.wait(20) == 1, term.text
            assert term.restored()
            last = term.text.splitlines()[-1].strip()    # after the last frame
            assert last == "xlb: error: the xlb instance in this network namespace stopped"
            assert b"\x1b[?25h" in term.raw
            assert "Traceback" not in term.text
        finally:
            term.close()
