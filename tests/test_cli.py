"""The `xlb` command as an operator runs it, for what needs no running instance:
`xlb check FILE` (exit 0 or 1, what it prints), input refused before
anything else happens (exit 2), `xlb status` rendered from a made-up status,
and an answer from a stand-in for the instance. No root, no kernel."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import syslog
import threading
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from test_ctl import STOPPING, answering, run_dir, serving  # noqa: F401 (run_dir: a fixture)

ROOT = Path(__file__).resolve().parent.parent
XLB = Path(sys.executable).parent / "xlb"
SEED = ROOT / "netns-lab" / "seed.toml"
# The one-line form on an interface that no namespace has: were it let through,
# `xlb up` would stop there, having attached nothing.
SEED_FLAGS = ("--vip", "10.1.1.101:80", "--backend", "10.1.11.101:8080",
              "--iface", "xlb-no-such-if")


def xlb(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(XLB), *args], capture_output=True, text=True, timeout=60)


def test_check_of_a_valid_file_says_what_it_holds():
    r = xlb("check", str(SEED))
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{SEED}: ok: 1 frontends, 1 pools, 2 servers, 1 monitors\n"
    assert r.stderr == ""


def test_the_commands_that_ask_the_instance_load_no_netlink_library():
    """pyroute2 takes a quarter of a second to import, more than the rest of
    the CLI: `xlb apply`, `status`, `server` and the like only send a request
    and never read the links."""
    script = ("import sys, xlb.cli; "
              "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pyroute2'))")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "[]\n"


@pytest.mark.parametrize("args", [("check", str(SEED)), ("--help",), ("ha", "bird", "-h"),
                                  ("--version",)])
def test_a_reader_that_goes_away_leaves_the_exit_status_as_it_was(args):
    """`xlb status | head -1`, `| grep -q`, `xlb --help | head`: the rest of
    the answer is lost, not what the exit status says (1 is "no instance
    runs", for status), nor a word said of it (click alone exited 1 and said
    nothing)."""
    read, write = os.pipe()
    os.close(read)    # the reader is gone before xlb writes
    try:
        r = subprocess.run([str(XLB), *args], stdout=write, stderr=subprocess.PIPE,
                           text=True, timeout=60)
    finally:
        os.close(write)
    assert (r.returncode, r.stderr) == (0, "")


@pytest.mark.parametrize("closed", [(0,), (2,), (0, 1, 2)])
def test_standard_fds_closed_by_the_caller_are_dev_null(tmp_path, closed):
    """`xlb up 2>&-`: the first files xlb opened took fds 0-2 (its run
    directory, its control socket), where bcc and clang write below Python."""
    out = tmp_path / "fds"
    script = ("import os, sys; from xlb import cli; cli._standard_fds(); "
              "open(sys.argv[1], 'w').write(' '.join(os.readlink(f'/proc/self/fd/{fd}') "
              f"for fd in {closed}))")
    r = subprocess.run([sys.executable, "-c", script, str(out)], timeout=60,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True,
                       preexec_fn=lambda: [os.close(fd) for fd in closed])
    assert r.returncode == 0, r.stderr
    assert out.read_text() == " ".join(["/dev/null"] * len(closed))


def test_a_closed_stderr_goes_to_syslog(tmp_path):
    """`xlb up 2>&-`: Python makes the stream None. Every error was lost (bad
    input: exit 2, not a word anywhere), and a traceback (print_exc, of a
    request's bug) was printed on stdout, among the lines a script reads
    there. Its lines go to syslog, each at its level, as a daemon's do."""
    logged = tmp_path / "syslog"
    script = ("import sys, syslog, traceback\n"
              "out = open(sys.argv[1], 'w')\n"
              "syslog.syslog = lambda pri, line: print(pri, line, file=out, flush=True)\n"
              "from xlb import cli, log\n"
              "cli._standard_fds()\n"
              "log.event('start', pid=4242)\n"
              "try:\n    1 / 0\nexcept ZeroDivisionError:\n    traceback.print_exc()\n"
              f"sys.argv = ['xlb', 'up', {SEED_FLAGS[0]!r}, {SEED_FLAGS[1]!r}, '--check', 'no']\n"
              "cli.main()\n")
    r = subprocess.run([sys.executable, "-c", script, str(logged)], timeout=60,
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                       preexec_fn=lambda: os.close(2))
    assert (r.returncode, r.stdout) == (2, "")
    lines = logged.read_text().splitlines()
    assert re.fullmatch(rf"{syslog.LOG_INFO} ts=\S+ level=info event=start pid=4242", lines[0])
    assert lines[1] == f"{syslog.LOG_ERR} Traceback (most recent call last):"
    assert lines[-1] == (f"{syslog.LOG_ERR} xlb: error: --check: 'no' is not tcp, "
                         f"http:/PATH, https:/PATH, udp:HEX or none")


def test_check_warns_of_what_nothing_uses(tmp_path):
    """A server in no pool is valid, but the operator meant it to serve."""
    spare = tmp_path / "spare.toml"
    spare.write_text(SEED.read_text() + '\n[servers.was3]\naddress = "10.1.11.103"\n'
                                        'port = 8080\n')
    r = xlb("check", str(spare))
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{spare}: ok: 1 frontends, 1 pools, 2 servers, 1 monitors\n"
    assert r.stderr == (f"xlb: warning: {spare}: servers.was3: in no pool: it serves nothing, "
                        f"and `xlb show` leaves it out\n")


def test_check_lists_every_problem_with_its_key_path(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(SEED.read_text()
                   .replace('address = "10.1.11.102"', 'address = "10.1.11.300"')
                   .replace('servers = ["was1", "was2"]', 'servers = ["was1", "was2", "was3"]'))
    r = xlb("check", str(bad))
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.splitlines() == [
        f"{bad}: servers.was2.address: '10.1.11.300' is not an IPv4 address",
        f"{bad}: pools.was.servers[2]: no server 'was3'"]


def test_check_of_a_file_that_is_not_toml_or_not_there(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("[pools.was\n")
    r = xlb("check", str(broken))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"{broken}: toml: "), r.stderr
    r = xlb("check", str(tmp_path / "nope.toml"))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "No such file or directory" in r.stderr, r.stderr
    # A directory is the file's problem too, listed as the others; no name is bad input.
    r = xlb("check", str(tmp_path))
    assert (r.returncode, r.stderr) == (1, f"{tmp_path}: Is a directory\n")
    r = xlb("check", "")
    assert (r.returncode, r.stderr) == \
        (2, "xlb: error: Invalid value for 'FILE': a file name cannot be empty\n")


def test_a_newline_in_what_the_operator_gave_stays_on_its_line(tmp_path):
    """Shown escaped: it cannot break a message in two, or forge a line."""
    path = tmp_path / "nl.toml"
    path.write_text('[servers.a]\naddress = "10.1.11.1"\nport = 80\n"x\\nxlb: ok" = 1\n')
    r = xlb("check", str(path))
    assert r.returncode == 1
    assert f"{path}: servers.a.x\\nxlb: ok: unknown key\n" in r.stderr
    assert all(line.startswith(f"{path}: ") for line in r.stderr.splitlines()), r.stderr
    # A file's name, in its warnings and its verdict
    odd = tmp_path / "odd\nxlb: ok.toml"
    odd.write_text(SEED.read_text() + '\n[servers.was3]\naddress = "10.1.11.103"\nport = 8080\n')
    r = xlb("check", str(odd))
    shown = str(odd).replace("\n", "\\n")
    assert (r.returncode, r.stdout) == (0, f"{shown}: ok: 1 frontends, 1 pools, 2 servers, "
                                           f"1 monitors\n")
    assert r.stderr == (f"xlb: warning: {shown}: servers.was3: in no pool: it serves nothing, "
                        f"and `xlb show` leaves it out\n")
    r = xlb("up", "--vip", "10.1.1.101:80\nxlb: serving", "--backend", "10.1.11.101:8080")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("xlb: error: --vip 10.1.1.101:80\\nxlb: serving: ")


LONG = "1" * 100_000      # as long as a value the command line takes (131,072 bytes) nearly
CUT = f"{'1' * 60}... (100,000 characters)"


@pytest.mark.parametrize("args,error", [
    (["--vip", LONG], f"--vip {CUT}: '{CUT[:60]}'{CUT[60:]} is not IP:PORT"),
    (["--backend", LONG], f"--backend {CUT}: '{CUT[:60]}'{CUT[60:]} is not IP:PORT"),
    (["--iface", LONG], f"--iface: '{CUT[:60]}'{CUT[60:]} is longer than 15 bytes"),
    (["--check-port", LONG], f"--check-port: port {CUT} is out of range 1-65535"),
    (["--metrics", LONG], f"--metrics: '{CUT[:60]}'{CUT[60:]} is not ADDR:PORT or off"),
    # click's own messages
    (["--algorithm", LONG], f"Invalid value for '--algorithm': '{CUT[:60]}'{CUT[60:]} is not "
                            f"one of 'roundrobin', 'maglev', 'source'."),
    ([f"--rise={LONG}"], f"Invalid value for '--rise': '{CUT[:60]}'{CUT[60:]} is too long "
                         f"for a number."),
    ([LONG], f"Got unexpected extra argument ({CUT})"),
])
def test_a_long_value_is_echoed_cut_short(args, error):
    """A value of 100,000 characters made a line of 100 KB (--vip's twice);
    whatever echoes it, its first 60 characters and its length."""
    flags = list(SEED_FLAGS[:4]) + ["--check", "none"]
    if args[0] in flags:
        del flags[flags.index(args[0]):flags.index(args[0]) + 2]
    r = xlb("up", *flags, *args)
    assert (r.returncode, r.stderr) == (2, f"xlb: error: {error}\n")


def test_a_long_key_or_value_of_a_config_file_is_echoed_cut_short(tmp_path):
    path = tmp_path / "long.toml"
    path.write_text(SEED.read_text() + f'[{LONG}]\n[servers.was1.{LONG}]\n'
                    f'[pools.p]\nservers = ["{LONG}"]\n')
    r = xlb("check", str(path))
    assert r.returncode == 1
    assert sorted(r.stderr.splitlines()) == [
        f"{path}: {CUT}: unknown section",
        f"{path}: pools.p.servers[0]: no server '{CUT[:60]}'{CUT[60:]}",
        f"{path}: servers.was1.{CUT}: unknown key"]
    # A table declared twice: the TOML parser's message, which names its key
    path.write_text(f'[servers.{LONG}]\n[servers.{LONG}]\n')
    r = xlb("check", str(path))
    assert r.stderr == f"{path}: toml: Cannot declare servers.{CUT} twice (at line 2, column " \
                       f"100010)\n"
    # A file's name, which the kernel refuses past 4,095 bytes
    r = xlb("check", "/" + LONG)
    assert r.stderr == f"/{CUT[:59]}... (100,001 characters): File name too long\n"


def test_a_file_name_that_is_not_utf8_is_shown_escaped(tmp_path):
    """Its bytes come in as lone surrogates, which a UTF-8 locale's strict
    stdout (not C.UTF-8's) cannot write: shown as \\xNN, not a traceback."""
    odd = tmp_path / os.fsdecode(b"x\xff.toml")
    odd.write_text(SEED.read_text())
    r = subprocess.run([str(XLB), "check", str(odd)], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
    assert (r.returncode, r.stdout, r.stderr) == \
        (0, f"{tmp_path}/x\\xff.toml: ok: 1 frontends, 1 pools, 2 servers, 1 monitors\n", "")


def test_a_flags_byte_that_is_not_utf8_is_shown_alike_in_its_message():
    r = subprocess.run([str(XLB).encode(), b"up", b"--vip", b"10.1.1.101:\xff", b"--backend",
                        b"10.1.11.101:8080"], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == \
        (2, "", "xlb: error: --vip 10.1.1.101:\\xff: port '\\xff' is not a number\n")


def assert_refused(path: Path, problems: list[tuple[str, str]]) -> None:
    """Each problem is named, by `check` one a line, by `up` on one line
    before anything runs."""
    r = xlb("check", str(path))
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr.splitlines() == [f"{path}: {key}: {reason}" for key, reason in problems]
    r = xlb("up", "--config", str(path))
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == (f"xlb: error: {path}: "
                        + "; ".join(f"{key}: {reason}" for key, reason in problems) + "\n")


def test_a_none_monitor_refuses_what_it_would_ignore(tmp_path):
    """A monitor switched to "none" keeps no check setting that would seem to act."""
    path = tmp_path / "none.toml"
    path.write_text(SEED.read_text().replace('type = "http"', 'type = "none"'))
    ignored = 'only for type "tcp", "http", "https" or "udp" (type "none" never checks)'
    assert_refused(path, [(f"monitors.was-http.{key}", reason) for key, reason in [
        ("port", ignored), ("path", 'only for type "http" or "https"'),
        ("expect_status", 'only for type "http" or "https"'), ("interval", ignored),
        ("timeout", ignored), ("rise", ignored), ("fall", ignored)]])


def test_check_warns_of_the_timeouts_of_the_other_protocol(tmp_path):
    """A UDP flow takes timeout_udp alone, a TCP connection the other three:
    the others would seem to act. Warned of, not refused: a file made of an
    earlier build's `xlb show` has all four on every frontend."""
    path = tmp_path / "timeouts.toml"
    path.write_text(SEED.read_text() + 'timeout_udp = 5\n\n[frontends.dns]\n'
                    'vip = "10.1.1.101"\nport = 53\nprotocol = "udp"\npool = "was"\n'
                    'timeout_established = 30\n')
    r = xlb("check", str(path))
    assert (r.returncode, r.stdout) == (0, f"{path}: ok: 2 frontends, 1 pools, 2 servers, "
                                           f"1 monitors\n")
    assert r.stderr.splitlines() == [
        f"xlb: warning: {path}: frontends.www.timeout_udp: only for protocol \"udp\" (TCP "
        f"flows take timeout_syn, timeout_established or timeout_closing): ignored",
        f"xlb: warning: {path}: frontends.dns.timeout_established: only for protocol \"tcp\" "
        f"(UDP flows take timeout_udp): ignored"]


@pytest.mark.parametrize("flags,warning,chosen", [
    (("--vip", "10.1.1.101:514/udp", "--backend", "10.1.11.101:514"),
     "xlb: warning: every --vip is UDP, but the default check connects over TCP to the "
     "backends' ports: a server of UDP alone goes down; give --check udp:HEX (a request they "
     "answer), --check none, --check-port N or --check tcp",
     [("--check", "tcp"), ("--check-port", "22"), ("--vip", "10.1.1.101:514"),
      ("--check", "udp:3c31333e7465737420")]),
    (("--vip", "10.1.1.101:80", "--backend", "10.1.11.101:80", "--check", "udp:00"),
     "xlb: warning: every --vip is TCP, but --check udp sends to the backends' ports over UDP: "
     "a server of TCP alone answers port unreachable and goes down; give --check-port N or "
     "--check tcp",
     [("--check-port", "53"), ("--vip", "10.1.1.101:80/udp"), ("--check", "tcp")]),
])
def test_up_warns_of_a_check_that_every_vip_serves_over_the_other_protocol(flags, warning,
                                                                            chosen):
    """A syslog or NTP server answers no TCP connect on its port, a web server
    no datagram: such a check of its port (the default check, which the
    operator did not choose; or udp:HEX of TCP VIPs alone) would take every
    server down."""
    args = (*flags, "--iface", "xlb-no-such-if", "--metrics", "224.0.0.1:9717")
    r = xlb("up", *args)
    assert (r.returncode, r.stderr.splitlines()[0]) == (2, warning)
    for more in chosen:
        r = xlb("up", *args, *more)
        assert r.returncode == 2 and "warning" not in r.stderr, r.stderr


def test_up_reads_check_port_as_it_reads_the_port_of_a_vip():
    r = xlb("up", *SEED_FLAGS, "--check-port", "080")
    assert (r.returncode, r.stderr) == (2, "xlb: error: --check-port: port '080' has a "
                                           "leading zero\n")


def test_up_check_none_warns_of_the_check_flags_it_does_not_use():
    """The one-line form accepts them with --check none (a contract), and says
    that no check will use them; the rest of the line is checked as ever."""
    r = xlb("up", *SEED_FLAGS, "--check", "none", "--interval", "5", "--fall", "2",
            "--metrics", "224.0.0.1:9717")
    assert (r.returncode, r.stderr.splitlines()) == (2, [
        "xlb: warning: --interval, --fall: not used with --check none (no server is checked)",
        "xlb: error: --metrics: '224.0.0.1' is not an address of this host to listen on"])
    r = xlb("up", *SEED_FLAGS, "--check", "tcp", "--interval", "5",
            "--metrics", "224.0.0.1:9717")
    assert "warning" not in r.stderr


STATUS = {"version": "0.1.0", "pid": 4242, "uptime_seconds": 5.0,
          "interfaces": [{"name": "eth0", "ifindex": 2, "mode": "native"}],
          "forwarding": "fast", "ha": {"role": "active", "announce_table": None},
          "frontends": [], "pools": [], "reasons": {}, "actions": {}, "map_memory_bytes": 0,
          "flows": {"established": 0, "closing": 0, "half_open": 0,
                    "connections_capacity": 1024, "tables": {}, "removed": {}, "adopted": 0,
                    "replies_restored": 0}}


def test_status_shows_the_served_files_name_on_its_line():
    """As check and apply show it: a newline in it cannot forge a line."""
    from xlb import cli
    out = cli.format_status({**STATUS, "config": "/etc/xlb\nrole active\udcff.toml"})
    assert out.splitlines()[:2] == [
        "xlb 0.1.0, pid 4242, up 5s, on eth0 (native), fast forwarding, config "
        "/etc/xlb\\nrole active\\xff.toml", "role active (answers ARP for the VIPs)"]


def test_status_shows_each_link_in_its_state():
    """As the kernel has it now: one deleted is gone, not served; one whose
    program was removed by hand, detached. A name is the kernel's, which may
    hold an escape character."""
    from xlb import cli
    links = [{"name": "eth0", "ifindex": 2, "mode": "native", "state": "up"},
             {"name": "eth1", "ifindex": 3, "mode": "generic", "state": "down"},
             {"name": "v0", "ifindex": 9, "mode": "native", "state": "gone"},
             {"name": "v\x1b1", "ifindex": 10, "mode": "native", "state": "detached"}]
    out = cli.format_status({**STATUS, "interfaces": links})
    assert out.splitlines()[0] == (
        "xlb 0.1.0, pid 4242, up 5s, on eth0 (native), eth1 (generic, down), v0 (gone), "
        "v\\x1b1 (detached), fast forwarding")


def test_status_counts_a_flow_tables_entries_as_top_does():
    """With thousands apart: 262144 in one, 327,680 in the other."""
    from xlb import cli
    tables = {"flows": {"entries": 40, "capacity": 262144},
              "flows_new": {"entries": 1234, "capacity": 65536}}
    out = cli.format_status({**STATUS, "flows": {**STATUS["flows"], "tables": tables}})
    assert ("flow tables (two entries a connection): flows 40/262,144 entries, <0.1% full; "
            "flows_new 1,234/65,536 entries, 1.9% full") in out.splitlines()


def test_status_says_the_flows_by_state_and_a_frontend_that_drops_every_new_flow():
    """The flows' line in its states' order and the maps' memory in MiB; the
    adopted ones only when there are; a frontend of no server up, in a line
    of its own with the drops it causes."""
    from xlb import cli
    fe = {"name": "www", "vip": "10.1.1.101", "port": 80, "protocol": "tcp", "pool": "was",
          "servers_taking_flows": 0, "new_flows": 0, "packets_in": 0, "packets_out": 0,
          "bytes_in": 0, "bytes_out": 0}
    flows = {**STATUS["flows"], "established": 5, "closing": 6, "half_open": 7}
    status = {**STATUS, "frontends": [fe], "flows": flows, "map_memory_bytes": 3 * 2**20,
              "reasons": {"drop_no_backend": {"packets": 9, "bytes": 540}}}
    lines = cli.format_status(status).splitlines()
    assert ("flows: 5 established, 6 closing, 7 half-open; room for 1.0k connections; maps "
            "hold 3.0 MiB") in lines
    assert ("! frontend www: no server of pool was is up; new flows are dropped "
            "(drop_no_backend: 9 in all)") in lines
    assert not any(x.startswith("flows adopted") for x in lines)
    taking = cli.format_status({**status, "frontends": [{**fe, "servers_taking_flows": 1}],
                                "flows": {**flows, "adopted": 3}}).splitlines()
    assert not any(x.startswith("! frontend") for x in taking)
    assert ("flows adopted: 3 (another node's connections, taken over at their server's "
            "packet)") in taking


def test_status_counts_packets_by_reason():
    """README: every packet ends in one reason, and `xlb status` shows them
    (a firewall's or a capture's puzzle is read there): those that counted
    any, in the data path's order; the drops' line stays as it was."""
    from xlb import cli
    reasons = {"pass_not_vip": {"packets": 13, "bytes": 962},
               "drop_no_backend": {"packets": 0, "bytes": 0},
               "forward_redirect": {"packets": 24_500, "bytes": 1912},
               "fib_no_neigh": {"packets": 1, "bytes": 74}}
    lines = cli.format_status({**STATUS, "reasons": reasons}).splitlines()
    assert "packets by reason: pass_not_vip 13, forward_redirect 24.5k, fib_no_neigh 1" in lines
    assert "drops: no_backend 0" in lines
    assert "packets by reason: none" in cli.format_status(STATUS).splitlines()


UNAPPLIED = {"failed": 3, "unapplied_since": 1796338405.3,
             "error": "Could not update table:\nOperation not permitted"}
UNAPPLIED_LINE = ("health changes not in the data path since 2026-12-03T22:53:25Z, tried "
                  "again (STATE is what it holds): Could not update table:\\nOperation not "
                  "permitted")


def test_status_says_since_when_and_why_health_changes_miss_the_data_path():
    """A failed apply of the health checks' states leaves servers in the data
    path as they were: the status says so, on its line; nothing while the
    data path holds them, or from an instance of an earlier build."""
    from xlb import cli
    out = cli.format_status({**STATUS, "health_applies": UNAPPLIED})
    assert f"! {UNAPPLIED_LINE}" in out.splitlines()
    held = {"failed": 3, "unapplied_since": None, "error": None}
    for status in ({**STATUS, "health_applies": held}, STATUS):
        assert "health changes" not in cli.format_status(status)


def _server(name: str, backup: bool = False, **counters) -> dict:
    return {"name": name, "address": "10.1.11.101", "port": 8080, "weight": 1,
            "backup": backup, "monitor": None, "state": "up", "health": "up",
            "last_check": None, "active_flows": 0, "new_flows": 0, "packets_in": 0,
            "packets_out": 0, "bytes_in": 0, "bytes_out": 0, **counters}


def _spans(line: str, cells: list[str]) -> list[tuple[int, int]]:
    """Where each of `cells` starts and ends in `line`, found in order."""
    at, spans = 0, []
    for cell in cells:
        start = line.index(cell, at)
        at = start + len(cell)
        spans.append((start, at))
    return spans


def _assert_aligned(lines: list[str], cells: list[list[str]], left: set[int]) -> None:
    """The columns in `left` start where their header does, the others end
    where it does (right-justified), each cell apart from the next."""
    header = _spans(lines[0], cells[0])
    for line, row in zip(lines, cells, strict=True):
        spans = _spans(line, row)
        assert [s if i in left else e for i, (s, e) in enumerate(spans)] == \
            [s if i in left else e for i, (s, e) in enumerate(header)], line
        assert all(e < s for (_, e), (s, _) in zip(spans, spans[1:])), line


def test_status_columns_are_as_wide_as_their_widest_cell():
    """A name longer than its column pushed the rest of its row out of line."""
    from xlb import cli
    fe = {"vip": "10.1.1.101", "port": 80, "protocol": "tcp", "servers_taking_flows": 1,
          "new_flows": 20, "packets_in": 1_234_567, "packets_out": 0, "bytes_in": 9720,
          "bytes_out": 10920}
    status = {**STATUS,
              "frontends": [{**fe, "name": "www", "pool": "was"},
                            {**fe, "name": "www-with-a-long-frontend-name",
                             "pool": "a-pool-with-a-long-name", "vip": "10.1.1.102",
                             "port": 65535, "protocol": "udp"}],
              "pools": [{"name": "was", "algorithm": "roundrobin", "on_server_down": "keep",
                         "servers": [_server("was1"),
                                     _server("a-server-with-a-long-name", backup=True,
                                             state="drain", weight=100, active_flows=12345,
                                             new_flows=7, packets_in=41, packets_out=42,
                                             bytes_in=3400, bytes_out=5_600_000)]},
                        {"name": "a-pool-with-a-long-name", "algorithm": "maglev",
                         "on_server_down": "reset", "table_digest": "5b0f3e2a9c1d4e67",
                         "servers": [_server("was2", port=65535)]}]}
    lines = cli.format_status(status).splitlines()

    frontends = lines[lines.index(next(x for x in lines if x.startswith("FRONTEND"))):][:3]
    _assert_aligned(frontends, [
        ["FRONTEND", "VIP", "POOL", "TAKING", "CONNS", "PKTS IN", "PKTS OUT", "BYTES IN",
         "BYTES OUT"],
        ["www", "10.1.1.101:80/tcp", "was", "1", "20", "1.2M", "0", "9.7k", "10.9k"],
        ["www-with-a-long-frontend-name", "10.1.1.102:65535/udp", "a-pool-with-a-long-name",
         "1", "20", "1.2M", "0", "9.7k", "10.9k"]], left={0, 1, 2})

    # A Maglev pool's table digest, to compare with other nodes' (README).
    assert [x for x in lines if x.startswith("pool ")] == [
        "pool was (roundrobin, on_server_down keep)",
        "pool a-pool-with-a-long-name (maglev, on_server_down reset, table 5b0f3e2a9c1d4e67)"]

    # The servers of every pool in one set of columns, a pool's name above its own.
    servers = [x for x in lines if x.startswith("  ")]
    header = ["SERVER", "ADDRESS", "STATE", "WEIGHT", "ACTIVE", "CONNS", "PKTS IN",
              "PKTS OUT", "BYTES IN", "BYTES OUT", "LAST CHECK"]
    _assert_aligned(servers, [
        header,
        ["was1", "10.1.11.101:8080", "up", "1", "0", "0", "0", "0", "0", "0", "not checked"],
        ["a-server-with-a-long-name (backup)", "10.1.11.101:8080", "drain", "100", "12.3k",
         "7", "41", "42", "3.4k", "5.6M", "not checked"],
        header,
        ["was2", "10.1.11.101:65535", "up", "1", "0", "0", "0", "0", "0", "0",
         "not checked"]], left={0, 1, 2, 10})
    assert all(line.rstrip() == line for line in frontends + servers)


def test_a_warning_from_the_instance_stays_on_its_line(run_dir):
    """It names the state directory (XLB_STATE_DIR, anything the operator
    chose): escaped as every other name, it cannot break its line or forge one."""
    from xlb import cli
    warning = ("state not saved in /var/lib/xlb\nxlb: error: forged\x1b[2J (Read-only file "
               "system): a restart would not find this change")
    answer = {"ok": True, "result": {"state": "drain", "flows_ended": 0, "warning": warning}}
    with answering(lambda req: answer):
        r = CliRunner().invoke(cli.cli, ["server", "drain", "was", "was1"])
    assert (r.exit_code, r.stdout) == (0, "xlb: was/was1 is drain; 0 flows ended\n")
    assert r.stderr == ("xlb: warning: state not saved in /var/lib/xlb\\nxlb: error: "
                        "forged\\x1b[2J (Read-only file system): a restart would not find "
                        "this change\n")


@pytest.mark.parametrize(("links", "said"), [
    ({"attached": ["eth2", "eth3"], "detached": ["eth9"]},
     "; attached to eth2, eth3; detached from eth9"),
    ({"attached": [], "detached": []}, ""),
    ({}, "")], ids=["both", "neither", "an-earlier-build"])
def test_apply_says_which_links_it_attached_to_and_detached_from(run_dir, tmp_path, links, said):
    """Those that came up since, and those gone or no longer named: where the
    program runs now, which the answer did not say."""
    from xlb import cli
    path = tmp_path / "x.toml"
    path.write_text(SEED.read_text())
    answer = {"ok": True, "result": {
        "frontends": 1, "pools": 1, "servers": 2, "flows_ended": 0, "admin_forgotten": [],
        "warnings": [], "validate_seconds": 0.001, "apply_seconds": 0.002,
        "config": str(path), "warning": None, **links}}
    with answering(lambda req: answer):
        r = CliRunner().invoke(cli.cli, ["apply", str(path)])
    assert (r.exit_code, r.stderr) == (0, "")
    assert r.stdout == (f"xlb: applied {path} in 0.003s: 1 frontends, 1 pools, 2 servers; "
                        f"0 flows ended; serving {path}{said}\n")


def test_apply_says_a_state_it_forgot_left_with_its_server(run_dir, tmp_path):
    """A drain or maint goes with its server; one whose name another server of
    the pool has taken is forgotten: the config has that name in that pool, but
    the server it was set on is no longer there."""
    from xlb import cli
    path = tmp_path / "x.toml"
    path.write_text(SEED.read_text())
    answer = {"ok": True, "result": {
        "frontends": 1, "pools": 1, "servers": 2, "flows_ended": 0,
        "admin_forgotten": ["maint of was1 in pool was"], "warnings": [],
        "validate_seconds": 0.001, "apply_seconds": 0.002, "config": str(path),
        "warning": None}}
    with answering(lambda req: answer):
        r = CliRunner().invoke(cli.cli, ["apply", str(path)])
    assert r.exit_code == 0
    assert r.stderr == ("xlb: warning: forgot maint of was1 in pool was: its server is no "
                        "longer in that pool\n")


def test_down_of_what_a_dead_instance_left_holds_off_an_instance_starting(run_dir,
                                                                        monkeypatch):
    """`xlb down` finds no instance, then removes its data path and state with
    the lock an `xlb up` takes: one that took it first (started between the
    two) is left running, and said."""
    from xlb import cli, ctl

    def none_runs(cmd, **args):
        raise ctl.NotRunning()
    monkeypatch.setattr(ctl, "request", none_runs)
    monkeypatch.setattr(cli, "_check_state_dir", lambda: None)
    monkeypatch.setattr(cli, "_forget_the_dead", lambda: "xlb: forgot")
    assert CliRunner().invoke(cli.cli, ["down"]).stdout == "xlb: forgot\n"
    listener = ctl.Listener()
    try:
        r = CliRunner().invoke(cli.cli, ["down"])
    finally:
        listener.close()
    assert r.exit_code == 1
    assert "an xlb up started here meanwhile: `xlb down` again stops it" in r.stderr


def test_two_downs_at_once_of_what_a_dead_instance_left_both_succeed(run_dir, monkeypatch):
    """Two `xlb down` at once (an operator's and a script's) where `xlb up` was
    killed, its data path left: the second exited 1 ("an xlb up started here
    meanwhile", or, asked while the first held the lock, "xlb runs here ...,
    but its control socket is gone"). It waits for the first, whose work is
    its own, and says so (exit 0)."""
    from xlb import cli, ctl
    holds, removed, said_removing = threading.Event(), threading.Event(), []
    real_removing = ctl.removing

    def removing():
        said_removing.append(real_removing())
        return said_removing[-1]

    def first_down():
        with ctl.exclusive():
            holds.set()
            # Until the second down waits for it (asked, then refused the lock).
            while said_removing.count(True) < 2 and not removed.is_set():
                removed.wait(0.01)
            removed.set()
        holds.clear()
    monkeypatch.setattr(ctl, "holder", lambda: 4242 if holds.is_set() else None)
    monkeypatch.setattr(ctl, "removing", removing)
    monkeypatch.setattr(cli, "_check_state_dir", lambda: None)
    monkeypatch.setattr(cli, "_forget_the_dead",
                        lambda: None if removed.is_set() else "xlb: removed the data path")
    first = threading.Thread(target=first_down, daemon=True)
    first.start()
    holds.wait(10)
    try:
        r = CliRunner().invoke(cli.cli, ["down"])
    finally:
        removed.set()
        first.join(10)
    assert (r.exit_code, r.stdout, r.stderr) == \
        (0, "xlb: another `xlb down` removed what the instance left meanwhile\n", "")
    assert said_removing[:2] == [True, True]
    # After it, nothing is left, as ever: no instance runs.
    r = CliRunner().invoke(cli.cli, ["down"])
    assert r.exit_code == 1
    assert r.stderr.endswith("no xlb instance runs in this network namespace\n")


@pytest.mark.parametrize("keep_datapath", [False, True], ids=["down", "keep-datapath"])
def test_down_of_an_instance_stopping_already_waits_for_its_stop(run_dir, monkeypatch,
                                                                 keep_datapath):
    """A second `xlb down` (two operators', or a script's) exited 1,
    "xlb is stopping: not done". It waits for that stop as for its own, and
    forgets the state that a stop by a signal keeps; --keep-datapath fails
    where that stop detached the data path."""
    from xlb import cli, ctl, state
    listener, asked = ctl.Listener(), []

    def stop():                         # the `down`, then a `ping` of its wait
        for _ in range(2):
            conn, _ = listener.socket.accept()
            with conn:
                asked.append(json.loads(conn.makefile("rb").readline())["cmd"])
                conn.sendall(STOPPING)
        listener.close()
    server = threading.Thread(target=stop, daemon=True)
    server.start()
    state.save(state.State(None, "", {("was", "was1"): "drain"}))
    monkeypatch.setattr(cli, "_check_state_dir", lambda: None)
    monkeypatch.setattr(cli, "_orphan", lambda detach=False: None)     # it detached
    r = CliRunner().invoke(cli.cli, ["down", *(["--keep-datapath"] if keep_datapath else [])])
    server.join(10)
    assert asked == ["down", "ping"]
    if keep_datapath:
        assert r.exit_code == 1 and r.stderr.endswith(
            "xlb was stopping already (a signal, or `xlb down`), and detached its data path: "
            "not kept\n")
    else:
        assert (r.exit_code, r.stdout, r.stderr) == (0, "xlb: stopped\n", "")
    assert (state.load() is None) != keep_datapath


@pytest.mark.parametrize("stop", ["asked", "under-way"])
def test_down_waits_for_the_instance_it_stopped_not_for_the_next(run_dir, monkeypatch, stop):
    """An `xlb up` that starts as soon as the instance lets go (a script's, a
    second operator's) answers the pings of down's wait: `xlb down` waited 15 s
    and said "the instance did not stop within 15 s" (exit 1) of an instance
    that had stopped, at its request or by a signal already (under-way)."""
    from xlb import cli, ctl
    listener, done, asked = ctl.Listener(), threading.Event(), []
    listener.socket.settimeout(0.1)
    stopping = ({"ok": True, "result": {"pid": 4242}} if stop == "asked" else
                {**json.loads(STOPPING), "pid": 4242})

    def stop_then_another():
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                conn, _ = listener.socket.accept()
                with conn:
                    asked.append(json.loads(conn.makefile("rb").readline())["cmd"])
                    answer = stopping if asked == ["down"] else \
                        {"ok": True, "result": {"pid": 4343}}       # the next instance
                    conn.sendall(json.dumps(answer).encode() + b"\n")
    server = threading.Thread(target=stop_then_another, daemon=True)
    server.start()
    monkeypatch.setattr(cli, "_check_state_dir", lambda: None)
    monkeypatch.setattr(cli, "_orphan", lambda detach=False: None)
    try:
        r = CliRunner().invoke(cli.cli, ["down"])
    finally:
        done.set()
        server.join(10)
        listener.close()
    assert asked[:2] == ["down", "ping"]
    assert (r.exit_code, r.stdout, r.stderr) == (0, "xlb: stopped\n", "")


def _follow(cli, fifo: Path, keepalived: int, handle):
    """`xlb ha follow FIFO` run here against a stand-in instance that hands
    each of 3 connections to handle; keepalived's end of the FIFO closed and
    SIGTERM's handler put back after."""
    before = signal.getsignal(signal.SIGTERM)
    try:
        with serving(handle, connections=3):
            return CliRunner().invoke(cli.cli, ["ha", "follow", str(fifo)])
    finally:
        signal.signal(signal.SIGTERM, before)
        os.close(keepalived)


def test_ha_follow_says_once_that_keepalived_tells_of_another_instance(run_dir, tmp_path,
                                                                      monkeypatch):
    """A vrrp_instance renamed by hand in keepalived's config: follow would wait
    for ever for states of its --instance, silently."""
    from xlb import cli
    monkeypatch.setattr(cli, "_to_syslog", False)     # follow sets it for good
    monkeypatch.setenv("XLB_STATE_DIR", str(tmp_path / "state"))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    keepalived = os.open(fifo, os.O_RDWR)
    os.write(keepalived, b'INSTANCE "web" BACKUP 250\nINSTANCE "web" MASTER 250\n'
                         b'INSTANCE "xlb" MASTER 250\n')

    def handle(conn):                   # ping; role active; role backup as keepalived stops
        with conn.makefile("rb") as f:
            cmd = json.loads(f.readline())["cmd"]
        conn.sendall(json.dumps({"ok": True, "result": {"pid": 1, "cut_off": []}}).encode()
                     + b"\n")
        if cmd == "role" and not stopped:
            stopped.append(os.kill(os.getpid(), signal.SIGTERM))

    stopped: list = []
    r = _follow(cli, fifo, keepalived, handle)
    assert r.stderr.splitlines() == [
        "xlb ha follow: keepalived tells the state of vrrp_instance 'web', not of 'xlb' "
        "(--instance), which this follows"], r.stderr


def test_ha_follow_shows_the_instances_errors_on_their_lines(run_dir, tmp_path, monkeypatch):
    """syslog takes them: an error of the instance (it can name the state
    directory) cannot break its line or forge one there."""
    from xlb import cli
    monkeypatch.setattr(cli, "_to_syslog", False)     # follow sets it for good
    monkeypatch.setenv("XLB_STATE_DIR", str(tmp_path / "state"))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    keepalived = os.open(fifo, os.O_RDWR)
    os.write(keepalived, b'INSTANCE "xlb" MASTER 250\n')
    error = {"ok": False, "error": "no\nxlb: error: forged\x1b[2J"}
    calls = []

    def handle(conn):
        # The role, not delivered; its retry, during which keepalived stops;
        # the backup role it then sends, not delivered.
        with conn.makefile("rb") as f:
            calls.append(json.loads(f.readline())["cmd"])
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            conn.sendall(json.dumps(error).encode() + b"\n")

    r = _follow(cli, fifo, keepalived, handle)
    assert calls == ["ping", "ping", "role"]
    assert r.stderr.splitlines() == [
        "xlb ha follow: role active not delivered yet, retried every 1 s: no\\nxlb: error: "
        "forged\\x1b[2J",
        "xlb ha follow: keepalived stops; role backup not delivered: no\\nxlb: error: "
        "forged\\x1b[2J"], r.stderr


def test_ha_follow_started_by_a_reload_tells_the_role_before_it_waits(run_dir, tmp_path,
                                                                     monkeypatch):
    """keepalived reloaded ends its follow, which makes xlb backup, and starts
    another that it tells nothing: until the new one tells xlb the role the
    same keepalived said before, the active node answers no ARP for the VIPs.
    It tells it first thing, not after a poll's wait."""
    from xlb import cli, state
    monkeypatch.setattr(cli, "_to_syslog", False)     # follow sets it for good
    monkeypatch.setenv("XLB_STATE_DIR", str(tmp_path / "state"))
    state.save_followed(cli._keepalived_process("xlb"), "active")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    keepalived = os.open(fifo, os.O_RDWR)      # open, and silent, as after a reload
    events = []

    def waiting(r, w, x, timeout=None):
        events.append(("wait", timeout))
        return select.select(r, w, x, timeout)
    monkeypatch.setattr(cli, "select", types.SimpleNamespace(select=waiting))

    def handle(conn):
        # ping, the role, then keepalived stops (the backup role follow then sends)
        with conn.makefile("rb") as f:
            req = json.loads(f.readline())
        asked = (req["cmd"], req.get("role"))
        events.append(asked)
        result = {"pid": 4242, "cut_off": []} if req["cmd"] == "ping" else {}
        conn.sendall(json.dumps({"ok": True, "result": result}).encode() + b"\n")
        # Not events[-1]: answered, follow may have waited (and said so) already.
        if asked == ("role", "active"):
            os.kill(os.getpid(), signal.SIGTERM)

    r = _follow(cli, fifo, keepalived, handle)
    assert r.exit_code == 0, r.output
    told = events.index(("role", "active"))
    assert all(timeout == 0 for what, timeout in events[:told] if what == "wait"), events
    assert events[-1] == ("role", "backup")


def test_ha_follow_names_a_track_file_it_cannot_write_on_one_line(tmp_path, capsys):
    """Its directory gone since the start (which checked it)."""
    from xlb import cli
    cli._track(tmp_path / "gone\nxlb: error: forged" / "track", serving=True)
    assert capsys.readouterr().err == (f"xlb ha follow: {tmp_path}/gone\\nxlb: error: forged/"
                                       f"track: No such file or directory\n")


def test_apply_of_a_file_it_cannot_read_is_bad_input(tmp_path):
    r = xlb("apply", str(tmp_path / "nope.toml"))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == f"xlb: error: {tmp_path / 'nope.toml'}: No such file or directory\n"


def test_unknown_command_or_option_is_bad_input():
    r = xlb("frobnicate")
    assert (r.returncode, r.stderr) == (2, "xlb: error: No such command 'frobnicate'.\n")
    r = xlb("status", "--frobnicate")
    assert (r.returncode, r.stderr) == (2, "xlb: error: No such option '--frobnicate'.\n")


@pytest.mark.parametrize("args, error", [
    ([b"fr\xffob"], "No such command 'fr\\xffob'."),
    ([b"status", b"--fr\xffob"], "No such option '--fr\\xffob'."),
    ([b"server", b"dr\xffain", b"was", b"was1"], "Invalid value for '{disable|enable|drain}': "
                                                 "'dr\\xffain' is not one of 'disable', "
                                                 "'enable', 'drain'."),
    ([b"ha", b"role", b"\xff"], "Invalid value for '{active|backup}': '\\xff' is not one of "
                                 "'active', 'backup'."),
], ids=["command", "option", "choice", "role"])
def test_click_echoes_a_byte_that_is_not_utf8_as_the_byte_it_was(args, error):
    """click's own messages wrote it as repr does, '\\udcff', where xlb's own
    write '\\xff' (units.quoted)."""
    r = subprocess.run([str(XLB).encode(), *args], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (2, "", f"xlb: error: {error}\n")


def test_a_command_group_alone_shows_its_help():
    """`xlb` or `xlb ha` with no command: the help as --help shows it, not
    squeezed into one error line with its newlines escaped."""
    for args in ((), ("ha",)):
        r = xlb(*args)
        assert (r.returncode, r.stdout) == (2, ""), r.stderr
        assert r.stderr == xlb(*args, "--help").stdout
        assert r.stderr.startswith(f"Usage: xlb {' '.join((*args, ''))}[OPTIONS] COMMAND")


@pytest.mark.parametrize("args, option", [
    (("up", *SEED_FLAGS, "--role", "active", "--role", "backup"), "--role"),
    (("top", "--interval", "1", "--interval", "2"), "--interval"),
    (("ha", "bird", "--router", "10.1.2.1", "--as", "65001", "--as", "65002", "--peer-as",
      "65000", str(SEED)), "--as"),
    (("ha", "follow", "--instance", "a", "--instance", "b", "/nonexistent.fifo"), "--instance"),
], ids=["up", "top", "ha bird", "ha follow"])
def test_an_option_of_one_value_given_twice_is_bad_input(args, option):
    """click would keep the last, and say nothing of the first."""
    r = xlb(*args)
    assert (r.returncode, r.stdout, r.stderr) == \
        (2, "", f"xlb: error: {option}: given twice (it takes one value)\n")


@pytest.mark.parametrize("args", [
    ("up", "--vip", "10.1.1.101:80", "--vip", "10.1.1.102:80", "--backend", "10.1.11.101:8080",
     "--iface", "xlb-no-such-if", "--iface", "xlb-no-such-if2"),
    ("down", "--keep-datapath", "--keep-datapath"),
], ids=["repeatable", "flag"])
def test_a_repeatable_option_or_a_flag_given_twice_is_no_mistake(args):
    """Taken, up to the first check after the options' (the state directory's)."""
    r = subprocess.run([str(XLB), *args], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "XLB_STATE_DIR": ""})
    assert (r.returncode, r.stderr) == \
        (2, "xlb: error: XLB_STATE_DIR: '' is not an absolute path\n")


def test_help_comes_before_an_option_given_twice():
    r = xlb("up", "--role", "active", "--role", "backup", "--help")
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout.startswith("Usage: xlb up [OPTIONS]")


def test_a_missing_choice_is_named_on_one_readable_line():
    """click lists the choices one a line; on xlb's one line they are a list."""
    r = xlb("server")
    assert (r.returncode, r.stderr) == (2, "xlb: error: Missing argument "
                                           "'{disable|enable|drain}'. Choose from: disable, "
                                           "enable, drain\n")
    r = xlb("ha", "role")
    assert (r.returncode, r.stderr) == (2, "xlb: error: Missing argument '{active|backup}'. "
                                           "Choose from: active, backup\n")


def test_an_empty_router_id_is_bad_input():
    """Not taken for no --router-id (BIRD picking one)."""
    r = xlb("ha", "bird", "--router", "10.1.2.1", "--as", "65001", "--peer-as", "65000",
            "--router-id", "", str(SEED))
    assert (r.returncode, r.stdout, r.stderr) == \
        (2, "", "xlb: error: --router-id: '' is not an IPv4 address\n")


def test_metrics_at_an_address_no_host_has_is_bad_input():
    """Linux lets a TCP socket bind a multicast address, where nobody can connect."""
    r = xlb("up", *SEED_FLAGS, "--metrics", "224.0.0.1:9717")
    assert (r.returncode, r.stderr) == \
        (2, "xlb: error: --metrics: '224.0.0.1' is not an address of this host to listen on\n")


@pytest.mark.parametrize("root", ["", "state"])
@pytest.mark.parametrize("command", [("up", *SEED_FLAGS), ("ha", "follow", "/nonexistent.fifo")],
                         ids=["up", "ha follow"])
def test_a_state_directory_that_is_not_absolute_is_bad_input(root, command):
    """It would put xlb's state wherever the command runs (empty: right there);
    `ha follow` keeps there the role keepalived last said."""
    r = subprocess.run([str(XLB), *command], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "XLB_STATE_DIR": root})
    assert (r.returncode, r.stderr) == \
        (2, f"xlb: error: XLB_STATE_DIR: {root!r} is not an absolute path\n")


@pytest.mark.parametrize("root", ["/nonexistent-xlb/" + "a" * 256,
                                  "/nonexistent-xlb" + "/a" * 2040, "/" + "a" * 10_000],
                         ids=["name", "path", "10 kB"])
@pytest.mark.parametrize("command", [("up", *SEED_FLAGS), ("ha", "follow", "/nonexistent.fifo")],
                         ids=["up", "ha follow"])
def test_a_state_directory_too_long_to_make_is_bad_input(root, command):
    """A name of over 255 bytes, or a path of 4096, which no save can make:
    taken (the walk stopped at the first directory not there), `up` would
    warn that it could not save its state after the compile and attach."""
    from xlb.units import quoted
    r = subprocess.run([str(XLB), *command], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "XLB_STATE_DIR": root})
    assert (r.returncode, r.stdout, r.stderr) == \
        (2, "", f"xlb: error: XLB_STATE_DIR: {quoted(root)}: File name too long\n")


@pytest.mark.parametrize("under", [False, True], ids=["file", "under a file"])
@pytest.mark.parametrize("command", [("up", *SEED_FLAGS), ("up",), ("down",),
                                     ("ha", "follow", "/nonexistent.fifo")],
                         ids=["up", "bare up", "down", "ha follow"])
def test_a_state_directory_that_is_a_file_is_bad_input(tmp_path, command, under):
    """Said first, alone, and nothing done: `up` warned that its state could
    not be read, compiled and attached the program, and served without one
    (unsaved, with a warning); a bare `up` said no instance had left a config,
    and `down` that none ran. `up` on no interface stops before the compile:
    a check made after it would not be reached."""
    file = tmp_path / "state"
    file.write_text("not a directory\n")
    root = file / "xlb" if under else file
    r = subprocess.run([str(XLB), *command], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "XLB_STATE_DIR": str(root)})
    way = f" (on the way to '{root}')" if under else ""
    assert (r.returncode, r.stdout, r.stderr) == \
        (2, "", f"xlb: error: XLB_STATE_DIR: '{file}' is not a directory{way}\n")
    assert file.read_text() == "not a directory\n"


def test_a_default_state_directory_that_is_a_file_is_named_so(tmp_path, monkeypatch):
    """/var/lib/xlb a file (as a stand-in here): not said to be XLB_STATE_DIR."""
    from xlb import cli, state
    file = tmp_path / "xlb"
    file.write_text("")
    monkeypatch.delenv("XLB_STATE_DIR", raising=False)
    monkeypatch.setattr(state, "ROOT", str(file))
    with pytest.raises(cli.BadInput) as e:
        cli._check_state_dir()
    assert e.value.message == f"state directory: '{file}' is not a directory"


def test_up_algorithm_is_checked_before_anything_runs():
    r = xlb("up", "--vip", "10.1.1.101:80", "--backend", "10.1.11.101:80", "--algorithm", "rr")
    assert r.returncode == 2 and "'rr' is not one of 'roundrobin', 'maglev', 'source'" in r.stderr, r.stderr
    r = xlb("up", "--algorithm", "maglev", "--config", str(SEED))
    assert (r.returncode, r.stderr) == (2, "xlb: error: --config FILE replaces the one-line "
                                           "options (--vip, --backend, --algorithm, --iface and "
                                           "the health check options)\n")


def test_up_refuses_a_flow_table_the_kernel_cannot_create():
    # --iface names no link: were the size let through, nothing could be attached.
    r = xlb("up", "--vip", "10.1.1.101:80", "--backend", "10.1.11.101:80", "--iface",
            "xlb-no-such-if", "--flow-table", str(2**26 + 1))
    assert (r.returncode, r.stderr) == (2, "xlb: error: --flow-table: 67108865 connections: the "
                                           "kernel's hash maps hold at most 67108864 (two "
                                           "entries each)\n")


def test_up_refuses_a_flow_table_larger_than_the_memory_available(monkeypatch):
    """Checked against MemAvailable before anything is compiled; a machine with
    1 GiB available stands in for a small one."""
    from click.testing import CliRunner
    from xlb import cli
    monkeypatch.setattr(cli, "mem_available", lambda: 2**30)
    monkeypatch.setattr(cli.os, "geteuid", lambda: 1000)   # let through, it would stop here
    args = ["up", "--vip", "10.1.1.101:80", "--backend", "10.1.11.101:80", "--iface",
            "xlb-no-such-if", "--flow-table"]
    r = CliRunner().invoke(cli.cli, [*args, "5000000"])
    assert r.exit_code == 2 and r.output.endswith(
        "--flow-table: 5000000 connections take 1.4 GiB of kernel memory; this machine has "
        "1.0 GiB available\n"), r.output
    r = CliRunner().invoke(cli.cli, [*args, "1000000"])     # 0.3 GiB: fits
    assert r.exit_code == 1 and "xlb up needs root" in r.output, r.output
    assert "warning" not in r.output, r.output
    r = CliRunner().invoke(cli.cli, [*args, "3000000"])     # fits, but takes most of it
    assert r.exit_code == 1 and r.output.startswith(
        "xlb: warning: --flow-table: 3000000 connections take 0.8 GiB of kernel memory, more "
        "than half of the 1.0 GiB this machine has available\n"), r.output
    assert "xlb up needs root" in r.output, r.output


def test_up_refuses_more_flags_than_the_data_plane_holds():
    """Thousands of --backend or --vip are bad input, said at once (not after
    the maps were tried, nor minutes of comparing each with the others)."""
    many = [a for i in range(20000) for a in ("--vip", f"10.2.{i // 250}.{1 + i % 250}:80")]
    r = xlb("up", *many, "--backend", "10.1.11.101:8080", "--iface", "xlb-no-such-if")
    assert (r.returncode, r.stderr) == (2, "xlb: error: --vip: 20000 VIPs: the data plane "
                                           "holds 256\n")
    many = [a for i in range(1025) for a in ("--backend", f"10.2.{i // 250}.{1 + i % 250}:80")]
    r = xlb("up", "--vip", "10.1.1.101:80", *many, "--iface", "xlb-no-such-if")
    assert (r.returncode, r.stderr) == (2, "xlb: error: --backend: 1025 backends do not fit a "
                                           "ring of 1024\n")


NOT_IFNAME = "is not an interface name (not . or .., no '/', ':', '%' or whitespace)"
NO_ODD_IFNAME = "xlb takes none in an interface name"


@pytest.mark.parametrize("name,reason", [
    ("", "an interface name cannot be empty"),
    ("abcdefghijklmnop", "'abcdefghijklmnop' is longer than 15 bytes"),
    ("éééééééé", "'éééééééé' is longer than 15 bytes"),       # 8 characters, 16 bytes
    ("veth/1", f"'veth/1' {NOT_IFNAME}"),
    ("eth 0", f"'eth 0' {NOT_IFNAME}"),
    ("eth%d", f"'eth%d' {NOT_IFNAME}"),     # a template: the kernel names no link so
    # The kernel takes these: said for what they are, not whitespace (as they were).
    ("a\x01", f"'a\\x01' contains a control character ('\\x01'): {NO_ODD_IFNAME}"),
    ("eth\x1f", f"'eth\\x1f' contains a control character ('\\x1f'): {NO_ODD_IFNAME}"),
    ("eth\u202e0", f"'eth\\u202e0' contains a character that does not print ('\\u202e'): "
                   f"{NO_ODD_IFNAME}"),
])
def test_up_refuses_an_iface_name_as_a_config_file_does(tmp_path, name, reason):
    """A name no interface can have is the operator's mistake, said in the
    file's words before anything runs: not taken for a link that is missing."""
    r = xlb("up", "--vip", "10.1.1.101:80", "--backend", "10.1.11.101:8080", "--iface", name,
            "--iface", "xlb-no-such-if")
    assert (r.returncode, r.stdout, r.stderr) == (2, "", f"xlb: error: --iface: {reason}\n")
    path = tmp_path / "iface.toml"
    path.write_text(SEED.read_text().replace('pool = "was"',
                                             f'pool = "was"\ninterfaces = [{json.dumps(name)}]'))
    r = xlb("check", str(path))
    assert (r.returncode, r.stderr) == (1, f"{path}: frontends.www.interfaces[0]: {reason}\n")


@pytest.mark.parametrize("args, option", [
    ([b"up", b"--vip", b"10.1.1.101:80", b"--backend", b"10.1.11.101:8080", b"--iface"],
     "--iface"),
    ([b"ha", b"keepalived", b"--peer", b"10.1.2.3", b"--gateway", b"10.1.11.1/24",
      str(SEED).encode(), b"--interface"], "--interface"),
], ids=["up --iface", "ha keepalived --interface"])
@pytest.mark.parametrize("name", [b"\xff", b"eth\xe90"], ids=["byte", "latin-1"])
def test_an_interface_name_that_is_not_utf8_is_said_to_be_so(args, option, name):
    """Its bytes come as lone surrogates, which has_space counts: refused as
    holding whitespace, which it did not. (A config file's are UTF-8: the
    file is refused whole otherwise.)"""
    r = subprocess.run([str(XLB).encode(), *args, name], capture_output=True, text=True,
                       timeout=60)
    shown = "".join(chr(b) if b < 0x80 else f"\\x{b:02x}" for b in name)
    assert (r.returncode, r.stdout, r.stderr) == \
        (2, "", f"xlb: error: {option}: '{shown}' is not UTF-8: xlb takes interface names in "
                f"UTF-8 only\n")


def test_up_refuses_an_iface_given_twice_as_a_config_file_does(tmp_path):
    """--iface eth0 --iface eth0 is a slip (another link meant?), refused as a
    file's repeated interface is, not quietly taken as one."""
    r = xlb("up", "--vip", "10.1.1.101:80", "--backend", "10.1.11.101:8080",
            "--iface", "xlb-no-such-if", "--iface", "xlb-no-such-if")
    assert (r.returncode, r.stdout, r.stderr) == (
        2, "", "xlb: error: --iface xlb-no-such-if: given twice\n")
    path = tmp_path / "iface.toml"
    path.write_text(SEED.read_text().replace(
        'pool = "was"', 'pool = "was"\ninterfaces = ["xlb-no-such-if", "xlb-no-such-if"]'))
    r = xlb("check", str(path))
    assert (r.returncode, r.stderr) == (
        1, f"{path}: frontends.www.interfaces[1]: 'xlb-no-such-if' is listed twice\n")


def test_apply_reads_no_fifo_and_top_takes_no_interval_it_cannot_sleep(tmp_path):
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)                         # reading it would wait for a writer for ever
    r = xlb("apply", str(fifo))
    assert (r.returncode, r.stderr) == (2, f"xlb: error: {fifo}: not a regular file\n")
    for interval, message in (("nan", "'nan' is not a number in digits 0-9, with a '.' "
                                      "fraction (no exponent)."),
                              ("inf", "'inf' is not a number in digits 0-9, with a '.' "
                                      "fraction (no exponent)."),
                              ("0", "0.0 is not in the range 0.1<=x<=3600.")):
        r = xlb("top", "--once", "--interval", interval)
        assert (r.returncode, r.stderr) == \
            (2, f"xlb: error: Invalid value for '--interval': {message}\n")


def _parsed(monkeypatch, capsys, args: list[str]) -> tuple[int, str, dict | None]:
    """`xlb ARGS` run in this process up to its command, which is not run: its
    exit status, its stderr and what it would have been given (by option)."""
    from xlb import cli
    command = cli.cli.commands[args[0]]
    if args[0] == "ha":
        command = command.commands[args[1]]
    given = []
    monkeypatch.setattr(command, "callback", lambda **options: given.append(options))
    monkeypatch.setattr(sys, "argv", ["xlb", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    options = {p.opts[0]: given[0][p.name] for p in command.params if given and p.opts}
    return e.value.code, capsys.readouterr().err, options or None


# Each numeric option after its command and the others it needs, a good
# spelling and the number it is.
UP = ["up", *SEED_FLAGS[:4]]
KEEPALIVED = ["ha", "keepalived", "--peer", "10.1.2.3", "--interface", "eth0", str(SEED)]
BIRD = ["ha", "bird", "--router", "10.1.2.1", "--as", "65001", "--peer-as", "65000", str(SEED)]
NUMBERS = [
    (UP, "--rise", "3", 3),
    (UP, "--fall", "3", 3),
    (UP, "--interval", "2.5", 2.5),
    (UP, "--flow-table", "1000", 1000),
    (UP, "--announce-table", "100", 100),
    (["top"], "--interval", ".5", 0.5),
    (KEEPALIVED, "--priority", "200", 200),
    (KEEPALIVED, "--vrid", "7", 7),
    (KEEPALIVED, "--advert-int", "2.", 2.0),
    (BIRD[:4] + BIRD[6:], "--as", "65002", 65002),
    (BIRD[:6] + BIRD[8:], "--peer-as", "65003", 65003),
    (BIRD, "--table", "10", 10),
]


@pytest.mark.parametrize("spelling", [" 2 ", "2 ", "1_0", "٣", "+2", "0x10", "1e3", "nan",
                                      "inf", "", "-"],
                         ids=["spaces", "space", "underscore", "arabic-indic", "plus", "hex",
                              "exponent", "nan", "inf", "empty", "minus"])
@pytest.mark.parametrize("before, option, good, number", NUMBERS,
                         ids=[f"{b[0] if b[0] != 'ha' else b[1]} {o}" for b, o, _, _ in NUMBERS])
def test_a_number_option_takes_digits_as_a_shell_user_types_them(monkeypatch, capsys, before,
                                                                  option, good, number, spelling):
    """Python's int() and float() read spaces around a number, '_' between its
    digits, another script's digits, and float() an exponent, nan and inf:
    `--rise ' 2 '` served with rise 2, `--vrid ٣` wrote virtual_router_id 3.
    A port (--check-port, a --vip's) was refused so already."""
    from xlb.units import quoted
    code, err, given = _parsed(monkeypatch, capsys, [*before, option, good])
    assert (code, err, given and given[option]) == (0, "", number)
    said = ("is not a number in digits 0-9, with a '.' fraction (no exponent)."
            if isinstance(number, float) else "is not a whole number in digits 0-9.")
    code, err, given = _parsed(monkeypatch, capsys, [*before, option, spelling])
    assert (code, err, given) == \
        (2, f"xlb: error: Invalid value for '{option}': {quoted(spelling)} {said}\n", None)


@pytest.mark.parametrize("before, option, good, number", NUMBERS,
                         ids=[f"{b[0] if b[0] != 'ha' else b[1]} {o}" for b, o, _, _ in NUMBERS])
def test_a_number_option_refuses_a_leading_zero_as_a_port_does(monkeypatch, capsys, before,
                                                               option, good, number):
    """`--priority 0100` was read as 100 and `--interval 01.5` as 1.5, where a
    port's `:080` is refused (maybe a mistyped 8080), as a TOML file's 0100
    and 01.5 are; `ip route show table 0100` reads table 64. A bare 0, and
    the 0 of 0.5, are no leading zero."""
    from xlb.units import quoted
    spelling = ("00" if good.startswith(".") else "0") + good
    code, err, given = _parsed(monkeypatch, capsys, [*before, option, spelling])
    assert (code, err, given) == \
        (2, f"xlb: error: Invalid value for '{option}': {quoted(spelling)} has a leading "
            f"zero.\n", None)
    code, err, given = _parsed(monkeypatch, capsys, [*before, option, f"-0{good.lstrip('.')}"])
    assert "has a leading zero" in err
    zero = "0.5" if isinstance(number, float) else "0"
    code, err, given = _parsed(monkeypatch, capsys, [*before, option, zero])
    assert "leading zero" not in err
    if isinstance(number, float):
        assert (code, given[option]) == (0, 0.5)


@pytest.mark.parametrize("args, message", [
    ([*KEEPALIVED, "--priority", "-1"], "-1 is not in the range 1<=x<=254."),
    ([*UP, "--rise", "1" * 101], f"'{'1' * 60}'... (101 characters) is too long for a number."),
    (["top", "--interval", "2.5" * 40], f"'{('2.5' * 20)}'... (120 characters) is too long for "
                                        f"a number."),
], ids=["negative", "long int", "long float"])
def test_a_number_option_refuses_a_negative_by_its_range_and_a_long_one_short(monkeypatch, capsys,
                                                                              args, message):
    """A '-' is a shell user's spelling, which the option's range refuses in
    its words. A number too long for any option is not echoed whole (int()
    refused one of over 4300 digits as no integer; a message echoed one of
    4000 whole)."""
    code, err, given = _parsed(monkeypatch, capsys, args)
    assert (code, err, given) == \
        (2, f"xlb: error: Invalid value for '{args[-2]}': {message}\n", None)


def test_ha_follow_reads_a_fifo_only(tmp_path):
    """A file or a device is bad input: select() finds it always ready, and
    follow would read its end over and over, at full speed."""
    notfifo = tmp_path / "notfifo"
    notfifo.write_text('INSTANCE "xlb" MASTER 250\n')
    for path in (notfifo, Path("/dev/null")):
        r = xlb("ha", "follow", str(path))
        assert (r.returncode, r.stderr) == \
            (2, f"xlb: error: {path}: not a FIFO (keepalived's vrrp_notify_fifo)\n")
    os.mkfifo(tmp_path / "fifo")
    r = xlb("ha", "follow", "--instance", "x y", str(tmp_path / "fifo"))
    assert (r.returncode, r.stderr) == \
        (2, "xlb: error: --instance: 'x y' is not a vrrp_instance name\n")


@pytest.mark.parametrize("instance, reason", [
    ("", "a vrrp_instance name cannot be empty"),
    ("x\x1b[2Jy", "'x\\x1b[2Jy' contains a control character ('\\x1b'): no vrrp_instance name "
                  "does"),
    ("x\udcffy", "'x\\xffy' contains a byte that is not UTF-8 ('\\xff'): no vrrp_instance name "
                 "does"),
    ("a" * 1024, f"'{'a' * 60}'... (1,024 characters) is longer than a line of keepalived's "
                 f"config (1024 bytes): no vrrp_instance has that name"),
], ids=["empty", "control", "not utf-8", "long"])
def test_ha_follow_says_why_an_instance_name_is_none(tmp_path, instance, reason):
    """One of 10 kB, which no line of keepalived's config holds, was taken:
    follow waited for ever for a state keepalived can never tell; the others
    were "not a vrrp_instance name", with no word of why."""
    os.mkfifo(tmp_path / "fifo", 0o600)
    r = subprocess.run([XLB, "ha", "follow", "--instance", instance, tmp_path / "fifo"],
                       capture_output=True, text=True, timeout=20, errors="surrogateescape")
    assert (r.returncode, r.stderr) == (2, f"xlb: error: --instance: {reason}\n")


def test_ha_follow_says_why_it_cannot_open_the_fifo(tmp_path):
    """As the system says it: click's check called all of these missing."""
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for path, reason in ((tmp_path / "loop", "Too many levels of symbolic links"),
                         (Path("/etc/passwd/fifo"), "Not a directory"),
                         (tmp_path / "nope", "No such file or directory")):
        r = xlb("ha", "follow", str(path))
        assert (r.returncode, r.stderr) == (2, f"xlb: error: {path}: {reason}\n")
    r = xlb("ha", "follow", "")
    assert (r.returncode, r.stderr) == \
        (2, "xlb: error: Invalid value for 'FIFO': a file name cannot be empty\n")


def test_ha_follow_refuses_a_fifo_that_another_user_may_write(tmp_path):
    """keepalived reuses a FIFO that exists: whoever may write it tells the role."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    os.chmod(fifo, 0o622)
    r = xlb("ha", "follow", str(fifo))
    assert (r.returncode, r.stderr) == (2, f"xlb: error: {fifo}: another user may write it "
                                           f"(owner uid {os.geteuid()}, mode 622): it would "
                                           f"tell this node's role\n")


def test_ha_follow_refuses_a_track_file_it_cannot_keep(tmp_path):
    """follow reads the track file before each write: a FIFO (the notify FIFO
    given twice, say) held it for ever, before any role was told, and a device
    such as /dev/zero was read without end; a symbolic link, which it does not
    write through, and a file in a directory that is not there failed once a
    second, for ever. Each is bad input, said at once."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    (tmp_path / "link").symlink_to(tmp_path / "serving")
    not_regular = "not a regular file (keepalived's track_file)"
    for track, reason in ((fifo, not_regular), (Path("/dev/zero"), not_regular),
                          (tmp_path / "link", "a symbolic link, which follow does not "
                                              "write through: give the file itself"),
                          (tmp_path / "nope" / "serving", "No such file or directory")):
        r = xlb("ha", "follow", "--track-file", str(track), str(fifo))
        assert (r.returncode, r.stderr) == (2, f"xlb: error: --track-file {track}: {reason}\n")


def test_ha_follow_refuses_a_track_file_another_user_could_place(tmp_path):
    """follow, as root, writes the track file again and again: in a directory
    that another user owns or may write (or behind a link in one), they could
    swap the path for a link to a file of root's, which follow emptied, or
    make the track file first and tell keepalived what they like. Refused at
    once, as OpenSSH refuses such files; a sticky directory's entry of root's
    (/tmp/pytest-of-root) is no such way. A file others may write, too."""
    # The notify FIFO, checked next, is none: follow ends there, not waits for keepalived.
    not_fifo = f"xlb: error: {SEED}: not a FIFO (keepalived's vrrp_notify_fifo)\n"
    for name, mode in (("open", 0o777), ("sticky", 0o1777), ("safe", 0o755)):
        (tmp_path / name).mkdir()
        (tmp_path / name).chmod(mode)
    (tmp_path / "safe" / "link").symlink_to("../open")
    writable = tmp_path / "safe" / "writable"
    writable.write_text("0\n")
    writable.chmod(0o666)
    cases = [(tmp_path / "open" / "serving", f"directory {tmp_path / 'open'} may be written by "
                                              f"others (mode 777)"),
             (tmp_path / "sticky" / "serving", f"directory {tmp_path / 'sticky'} may be written "
                                                f"by others (mode 1777)"),
             (tmp_path / "safe" / "link" / "serving", f"directory {tmp_path / 'open'} may be "
                                                       f"written by others (mode 777)")]
    if os.geteuid() == 0:
        (tmp_path / "theirs").mkdir()
        os.chown(tmp_path / "theirs", 65534, -1)
        cases.append((tmp_path / "theirs" / "serving",
                      f"directory {tmp_path / 'theirs'} is owned by uid 65534"))
    for track, unsafe in cases:
        r = xlb("ha", "follow", "--track-file", str(track), str(SEED))
        assert (r.returncode, r.stderr) == (
            2, f"xlb: error: --track-file {track}: {unsafe}: another user could put a file of "
               f"their choosing at that path, for follow to write or keepalived to read; give "
               f"a path only root may change (in /run)\n")
        assert not track.exists()
    r = xlb("ha", "follow", "--track-file", str(writable), str(SEED))
    assert (r.returncode, r.stderr) == (
        2, f"xlb: error: --track-file {writable}: another user may write it (owner uid "
           f"{os.geteuid()}, mode 666): they would tell keepalived whether this node serves\n")
    (tmp_path / "sticky" / "mine").mkdir()
    for track in (tmp_path / "sticky" / "mine" / "serving", tmp_path / "safe" / "serving"):
        r = xlb("ha", "follow", "--track-file", str(track), str(SEED))
        assert (r.returncode, r.stderr) == (2, not_fifo)


def test_ha_follow_names_an_empty_track_file_as_given(tmp_path):
    """click made "" the directory ".", and follow refused "--track-file .",
    a name the operator never gave."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    r = xlb("ha", "follow", "--track-file", "", str(fifo))
    assert (r.returncode, r.stderr) == \
        (2, "xlb: error: Invalid value for '--track-file': a file name cannot be empty\n")


@pytest.mark.parametrize("name, reason", [
    ("a\x01b", "contains a control character ('\\x01'), which the keepalived config xlb "
               "writes cannot hold"),
    ("a b", "contains whitespace, # ! { }, a quote or a backslash, which keepalived would "
            "misread"),
    ("a" * 250, "is longer than 400 bytes: keepalived reads a line of its config into 1024"),
], ids=["control", "space", "long"])
def test_ha_follow_refuses_a_track_file_that_keepalived_cannot_name(tmp_path, name, reason):
    """follow took them, and wrote them: keepalived tracks the path its
    config names, as `xlb ha keepalived` checks it, and never that one."""
    from xlb.units import quoted
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    # The long one in a directory of 150 bytes (a file's name is at most 255)
    track = f"{tmp_path}/{'x' * 150 + '/' if len(name) > 200 else ''}{name}"
    r = subprocess.run([XLB, "ha", "follow", "--track-file", track, fifo], capture_output=True,
                       text=True, timeout=20)
    assert (r.returncode, r.stderr) == (2, f"xlb: error: --track-file: {quoted(track)} "
                                           f"{reason}\n")
    r = subprocess.run([XLB, "ha", "follow", "--track-file", "serving", fifo], cwd=tmp_path,
                       capture_output=True, text=True, timeout=20)
    assert (r.returncode, r.stderr) == (2, "xlb: error: --track-file: 'serving' is not absolute "
                                           "(keepalived runs from a directory of its own)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo"]


def test_ha_follow_overwrites_no_file_but_a_track_file(tmp_path):
    """A --track-file that holds more than keepalived's number (the config's
    path given by mistake) is refused and left as it was: follow wrote 0 or 1
    over it within a second. One that holds a number is taken."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    config = tmp_path / "xlb.toml"
    config.write_text(SEED.read_text())
    r = xlb("ha", "follow", "--track-file", str(config), str(fifo))
    assert (r.returncode, r.stderr) == (2, f"xlb: error: --track-file {config}: holds more "
                                           f"than a track file's number: not overwritten\n")
    assert config.read_text() == SEED.read_text()
    track = tmp_path / "serving"
    track.write_text("1\n")        # keepalived's init_file
    r = xlb("ha", "follow", "--track-file", str(track), str(config))    # checked next
    assert (r.returncode, r.stderr) == \
        (2, f"xlb: error: {config}: not a FIFO (keepalived's vrrp_notify_fifo)\n")


def test_an_answer_that_cannot_be_written_is_one_line():
    """`xlb ha keepalived ... > FILE` on a full disk (/dev/full) ended in a
    traceback."""
    import socket
    # A link of this host's: one that is not here would be warned of.
    link = next(name for _, name in socket.if_nameindex() if name != "lo")
    for args in (("ha", "keepalived", "--peer", "10.1.11.12", "--interface", link,
                  "--gateway", "10.1.11.1/24", str(SEED)), ("check", str(SEED))):
        with open("/dev/full", "w") as full:
            r = subprocess.run([str(XLB), *args], stdout=full, stderr=subprocess.PIPE,
                               text=True, timeout=60)
        assert (r.returncode, r.stderr) == (1, "xlb: error: No space left on device\n"), args


# `xlb ARGS` as a process, against the test's RUN_DIR (run_dir) and the stand-in
# instances of test_ctl: a data path without its control process is none.
_XLB_HERE = """
import sys
from pathlib import Path
from xlb import cli, ctl
ctl.RUN_DIR = Path(sys.argv[1])
ctl.holder = lambda: None
ctl._earlier_instance = lambda timeout=2.0: None
cli._orphan = lambda detach=False: None
sys.argv = ["xlb", *sys.argv[2:]]
cli.main()
"""


def xlb_here(run_dir: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _XLB_HERE, str(run_dir), *args],
                          text=True, timeout=60, **kw)


@pytest.mark.parametrize(("args", "result", "done"), [
    (("server", "drain", "was", "was1"), {"state": "drain", "flows_ended": 3},
     "was/was1 is drain; 3 flows ended"),
    (("ha", "role", "active"), {"previous": "backup", "role": "active", "gratuitous_arps": 2,
                                "gratuitous_arps_unsent": []},
     "backup -> active; 2 gratuitous ARPs sent"),
    (("apply", str(SEED)), {"frontends": 1, "pools": 1, "servers": 2, "flows_ended": 0,
                            "admin_forgotten": [], "warnings": [], "validate_seconds": 0.001,
                            "apply_seconds": 0.002, "config": str(SEED)},
     f"applied {SEED} in 0.003s: 1 frontends, 1 pools, 2 servers; 0 flows ended; "
     f"serving {SEED}"),
    (("down",), {"pid": 4242}, "stopped")], ids=["server", "ha-role", "apply", "down"])
def test_a_change_whose_answer_cannot_be_written_says_it_was_made(run_dir, args, result,
                                                                  done):
    """`xlb server drain ... > FILE` on a full disk (/dev/full) said "No space
    left on device" alone, exit 1, of a change made: read as nothing done (and
    done again, or not undone). It still fails (the answer is lost), saying
    what was done. A warning that cannot be written (stderr full) is lost, not
    the answer."""
    with answering(lambda req: {"ok": True, "result": result}, stops=True), \
            open("/dev/full", "w") as full:
        r = xlb_here(run_dir, *args, stdout=full, stderr=subprocess.PIPE)
    assert (r.returncode, r.stderr) == \
        (1, f"xlb: error: done, but its answer could not be written (No space left on "
            f"device): {done}\n")
    with answering(lambda req: {"ok": True, "result": {**result, "warning": "not saved"}},
                   stops=True), open("/dev/full", "w") as full:
        r = xlb_here(run_dir, *args, stdout=subprocess.PIPE, stderr=full)
    assert (r.returncode, r.stdout) == (0, f"xlb: {done}\n")


def test_a_server_the_config_disables_is_said_to_stay_maint_though_the_answer_is_lost(run_dir):
    """`xlb server enable` of a server the file disables: the warning that it
    stays maint came after the answer, and went with it when the answer
    could not be written."""
    with answering(lambda req: {"ok": True, "result": {"state": "maint", "flows_ended": 0}},
                   stops=True), open("/dev/full", "w") as full:
        r = xlb_here(run_dir, "server", "enable", "was", "was1", stdout=full,
                     stderr=subprocess.PIPE)
    assert (r.returncode, r.stderr.splitlines()) == (1, [
        "xlb: warning: was/was1 stays maint: the config disables it (enabled = false); "
        "enable it there, then `xlb apply`",
        "xlb: error: done, but its answer could not be written (No space left on device): "
        "was/was1 is maint; 0 flows ended"])


def test_an_instance_that_does_not_answer_is_one_line(monkeypatch, tmp_path):
    """An instance busy starting (compiling a large flow table) or stopped
    (SIGSTOP) accepts but does not answer: the request fails with one line,
    no traceback."""
    import socket

    from xlb import ctl
    address = str(tmp_path / "control.sock")
    monkeypatch.setattr(ctl, "address", lambda: address)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(address)
        listener.listen()
        with pytest.raises(ctl.ControlError, match=r"did not answer within 0\.2 s"):
            ctl.request("status", timeout=0.2)


def test_readme_names_every_command_and_option():
    """Every command and every option that `--help` lists is in the README,
    the operator's reference."""
    from xlb.cli import cli
    readme = (ROOT / "README.md").read_text()

    def options(command, path):
        yield path, path
        for param in command.params:
            for opt in param.opts + param.secondary_opts:
                yield path, opt
        for name, sub in getattr(command, "commands", {}).items():
            yield from options(sub, f"{path} {name}")

    missing = [(path, opt) for path, opt in options(cli, "xlb")
               if opt.startswith(("--", "xlb"))
               and not re.search(rf"{re.escape(opt)}(?![\w-])", readme)]
    assert missing == []
