"""End to end in the namespace lab: real XDP on veth, real HTTP and UDP servers,
real clients. The lab (prefix xlbt) is built once for this module and torn down
afterwards, also when a test fails."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labctl import HERE, PY, SEED_ARGS, VIP, WAS, XLB, even_split, running_lab, wait_for

from xlb import ctl
from xlb.config import MAX_FILE

pytestmark = [pytest.mark.lab,
              pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")]

BACKENDS = ("--backend", f"{WAS['WAS1']}:8080", "--backend", f"{WAS['WAS2']}:8080")


@pytest.fixture(scope="module")
def lab():
    with running_lab("xlbt") as lab:
        yield lab


@pytest.fixture
def xlb(lab):
    """The seed service (TCP and UDP on the VIP), running in lb."""
    with lab.xlb("--vip", f"{VIP}:80", "--vip", f"{VIP}:80/udp", *BACKENDS) as x:
        yield x
    assert lab.xdp_attached("lb") == []


def backend_flows(status: dict) -> dict[str, int]:
    return {s["address"]: s["new_flows"] for p in status["pools"] for s in p["servers"]}


def test_new_connections_split_round_robin(lab, xlb):
    out = lab.client("client", "http", VIP, "80", "--count", "100")
    assert out["errors"] == []
    counts = collections.Counter(out["names"])
    assert even_split(counts, {"WAS1", "WAS2"}, 100), counts
    # The data plane's own count agrees with what the servers answered.
    st = lab.status()
    tcp = next(f for f in st["frontends"] if f["protocol"] == "tcp")
    assert tcp["new_flows"] == 100
    flows = backend_flows(st)
    assert flows[WAS["WAS1"]] == counts["WAS1"] and flows[WAS["WAS2"]] == counts["WAS2"]


def test_keepalive_connection_stays_on_one_backend(lab, xlb):
    out = lab.client("client", "http", VIP, "80", "--count", "30", "--keepalive")
    assert out["errors"] == [] and len(out["names"]) == 30
    assert len(set(out["names"])) == 1
    assert lab.status()["frontends"][0]["new_flows"] == 1


def test_udp_service_both_ways(lab, xlb):
    out = lab.client("client", "udp", VIP, "80", "--count", "10")
    assert out["errors"] == []
    names = collections.Counter(name for name, _, _, _ in out["replies"])
    assert even_split(names, {"WAS1", "WAS2"}, 10), names
    # Replies come back from the VIP, not from the backend: reverse NAT worked.
    assert {(src, port) for _, src, port, _ in out["replies"]} == {(VIP, 80)}


def test_routed_client_through_firewall(lab, xlb):
    out = lab.client("remote", "http", VIP, "80", "--count", "10")
    assert out["errors"] == []
    assert even_split(collections.Counter(out["names"]), {"WAS1", "WAS2"}, 10), out


def test_on_subnet_client_resolves_vip_by_arp(lab, xlb):
    lab.run("client", "ip", "neigh", "flush", "all", check=True)
    out = lab.client("client", "http", VIP, "80", "--count", "2")
    assert out["errors"] == [] and len(out["names"]) == 2
    neigh = lab.run("client", "ip", "neigh", "show", VIP, check=True).stdout
    lb_mac = lab.mac("lb", "eth0")
    assert lb_mac in neigh
    assert lab.status()["reasons"]["arp_reply"]["packets"] >= 1


def test_status_is_per_namespace(lab, xlb):
    assert lab.status()["pid"] > 0
    other = lab.xlb_cmd("status", node="client")
    assert other.returncode == 1
    assert "no xlb instance runs in this network namespace" in other.stderr


def test_sigterm_detaches_everything(lab):
    """And leaves no control directory behind: a lab makes a namespace a run."""
    x = lab.xlb(*SEED_ARGS)
    with x:
        assert set(lab.xdp_attached("lb")) == {"eth0", "eth1"}
        directory = os.path.dirname(control_address(lab))
        assert os.listdir(directory) == ["control.sock"]
    assert x.proc.returncode == 0
    assert lab.xdp_attached("lb") == []
    assert lab.xlb_cmd("status").returncode == 1
    assert not os.path.exists(directory)


def test_sighup_ends_xlb_up_as_a_crash_does(lab):
    """A terminal that hangs up on a foreground `xlb up` does not stop the
    service (README, --help): the data path keeps forwarding without its
    control process, and the next `xlb up` adopts it."""
    with lab.xlb(*SEED_ARGS) as x:
        assert x.stop(signal.SIGHUP) == -signal.SIGHUP
    assert set(lab.xdp_attached("lb")) == {"eth0", "eth1"}
    assert lab.xlb_cmd("status").returncode == 3
    assert lab.client("client", "http", VIP, "80", "--count", "2")["errors"] == []
    with lab.xlb(*SEED_ARGS) as x:
        assert "adopted the running data path" in x.serving_line
    assert lab.xdp_attached("lb") == []


def signals(pid: int, field: str) -> set[int]:
    """The signals of field in /proc/PID/status: those it ignores (SigIgn),
    those it catches (SigCgt)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(re.search(rf"^{field}:\s*(\w+)$", status, re.M).group(1), 16)
    return {n for n in range(1, 64) if mask >> (n - 1) & 1}


def test_a_hang_up_while_it_stops_does_not_cut_the_stop_short(lab):
    """Ctrl-C, then the terminal closed: SIGHUP kills only an instance that
    serves. Once its stop has begun it runs to its end (exit 0, everything
    detached), as it does for a second SIGTERM."""
    with lab.xlb(*SEED_ARGS) as x:
        directory = os.path.dirname(control_address(lab))
        x.proc.send_signal(signal.SIGTERM)
        # Once the stop has begun: it ignores SIGTERM by its clean-up at the latest.
        wait_for(lambda: x.proc.poll() is not None
                 or signals(x.proc.pid, "SigIgn") & {signal.SIGHUP, signal.SIGTERM}, 20,
                 "the stop begins")
        while x.proc.poll() is None:
            x.proc.send_signal(signal.SIGHUP)
            time.sleep(0.002)
        assert x.proc.returncode == 0
    assert "event=stop" in x.stderr
    assert lab.xdp_attached("lb") == [] and not os.path.exists(directory)


def test_a_hang_up_right_after_ctrl_c_does_not_cut_the_stop_short(lab):
    """Ctrl-C and the hang-up together (a window closed at once, a dropped ssh
    session): Python runs the handlers of signals that came together in the
    order of their numbers, so SIGHUP was taken before SIGINT and killed the
    process, leaving the data path served against the Ctrl-C."""
    with lab.xlb(*SEED_ARGS) as x:
        directory = os.path.dirname(control_address(lab))
        # Both pending when it runs again, as on a busy machine.
        os.kill(x.proc.pid, signal.SIGSTOP)
        wait_for(lambda: Path(f"/proc/{x.proc.pid}/stat").read_text().split()[2] == "T", 10,
                 "xlb up stopped")
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGCONT):
            os.kill(x.proc.pid, sig)
        assert x.stop() == 0
    assert "event=stop" in x.stderr
    assert lab.xdp_attached("lb") == [] and not os.path.exists(directory)


def test_a_stdout_nobody_reads_stops_nothing(lab):
    """`xlb up | head -1`: its reader gone after the serving line, a stop is
    still a clean stop (exit 0, everything detached, no traceback). Gone
    before it, the line is dropped and xlb serves all the same: not a data
    path attached without its control process."""
    for gone in ("after the serving line", "before it"):
        up = lab.spawn("lb", str(XLB), "up", *SEED_ARGS, "--metrics", "off")
        if gone == "after the serving line":
            assert "serving" in up.stdout.readline()
        up.stdout.close()
        wait_for(lambda: up.poll() is not None or lab.xlb_cmd("status").returncode == 0,
                 60, "xlb up serves")
        assert up.poll() is None, gone
        up.send_signal(signal.SIGTERM)
        err = up.stderr.read()
        assert (up.wait(20), "Traceback" in err) == (0, False), (gone, err)
        assert lab.xdp_attached("lb") == [], gone


def test_down_stops_the_instance(lab):
    """`xlb down` returns once the instance has detached (README, --help)."""
    x = lab.xlb(*SEED_ARGS)
    with x:
        done = lab.xlb_cmd("down")
        assert done.returncode == 0, done.stderr
        assert lab.xdp_attached("lb") == []
        assert x.proc.wait(10) == 0
    assert not os.path.exists(os.path.dirname(control_address(lab)))


BAD_INPUT = [
    ("malformed address", ["--vip", "10.1.1.300:80", *BACKENDS], "is not an IPv4 address"),
    ("port 0", ["--vip", f"{VIP}:0", *BACKENDS], "port 0 is out of range"),
    ("port over 65535", ["--vip", f"{VIP}:80", "--backend", "10.1.11.101:65536"],
     "port 65536 is out of range"),
    ("no backend", ["--vip", f"{VIP}:80"], "at least one backend is required"),
    ("unknown protocol", ["--vip", f"{VIP}:80/sctp", *BACKENDS], "is not tcp or udp"),
    ("unknown interface", [*SEED_ARGS, "--iface", "nosuch0"], "no interface 'nosuch0'"),
    ("local VIP", ["--vip", "10.1.1.1:80", *BACKENDS], "is a local address"),
    ("metrics address", [*SEED_ARGS, "--metrics", "localhost:9717"],
     "--metrics: 'localhost' is not an IPv4 address"),
]


@pytest.mark.parametrize("args,message", [c[1:] for c in BAD_INPUT],
                         ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_one_line_and_attaches_nothing(lab, args, message):
    r = lab.xlb_cmd("up", *args, timeout=60)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert r.stdout == ""
    assert lab.xdp_attached("lb") == []


def test_links_left_unnamed_that_a_vip_or_servers_need_are_warned_of(lab, tmp_path):
    """Naming only the clients' link (eth0) leaves the servers' replies, which
    come back by eth1, un-NATed; naming only eth1 leaves the VIP's ARP on eth0
    unanswered: no connection to the VIP works. Said at the start and at each
    apply, with the link to name; not refused, as replies may come back, and
    a router may route the VIP here, another way."""
    unnamed = ("servers was1, was2 are routed through eth1, which xlb does not run on (the "
               "interfaces named leave it out): replies come back there and leave from the "
               "server's address, not NATed back to the VIP; name eth1 too")
    config = tmp_path / "xlb.toml"
    seed = (HERE / "seed.toml").read_text()
    config.write_text(seed.replace('pool = "was"\n', 'pool = "was"\ninterfaces = ["eth0"]\n'))
    x = lab.xlb("--config", str(config))
    with x:
        r = lab.xlb_cmd("apply", str(config))
        assert (r.returncode, r.stderr) == (0, f"xlb: warning: {unnamed}\n")
        config.write_text(seed.replace('pool = "was"\n', 'pool = "was"\ninterfaces = ["eth1"]\n'))
        r = lab.xlb_cmd("apply", str(config))
        assert (r.returncode, r.stderr) == (
            0, "xlb: warning: VIP 10.1.1.101 of frontends.www is on eth0's subnet, where xlb "
               "answers no ARP for it (the interfaces named leave eth0 out): clients there "
               "cannot reach it; name eth0 in its interfaces\n")
        config.write_text(seed.replace('pool = "was"\n',
                                       'pool = "was"\ninterfaces = ["eth0", "eth1"]\n'))
        r = lab.xlb_cmd("apply", str(config))
        assert (r.returncode, r.stderr) == (0, ""), r.stderr
        assert lab.client("client", "http", VIP, "80", "--count", "2")["errors"] == []
    warned = [line for line in x.stderr.splitlines() if "event=route" in line]
    assert len(warned) == 2 and all("level=warning" in w and "interface=eth1 " in w
                                    and unnamed in w for w in warned), x.stderr


def test_a_link_that_runs_another_program_is_refused_before_anything_is_done(lab, tmp_path):
    """xlb never replaces another XDP program; a link that runs one was found
    only when xlb attached there: `up` after the compile, exit 1, `apply`
    after it had written the maps (and wrote them back). Now it is bad input,
    said before either (no program to compile: XLB_BPF_DIR is empty)."""
    lab.run("lb", PY, str(HERE / "xdp_pass.py"), "eth1", check=True)
    try:
        (other,) = re.findall(r"prog/xdp id (\d+)", lab.run("lb", "ip", "-d", "link", "show",
                                                            "eth1", check=True).stdout)
        taken = f"xlb: error: eth1: another XDP program (id {other}) is attached already"
        r = lab.run("lb", "env", f"XLB_BPF_DIR={tmp_path}", str(XLB), "up", *SEED_ARGS)
        # No --iface: the error says how to leave eth1 out.
        assert (r.returncode, r.stderr) == (2, f"{taken}; no interface is named, so xlb runs "
                                               f"on every up Ethernet link: name those it "
                                               f"serves on (--iface, a frontend's interfaces)\n")
        taken += "\n"
        config = tmp_path / "xlb.toml"
        config.write_text((HERE / "seed.toml").read_text().replace(
            'pool = "was"\n', 'pool = "was"\ninterfaces = ["eth0", "eth1"]\n'))
        with lab.xlb(*SEED_ARGS, "--iface", "eth0"):
            r = lab.xlb_cmd("apply", str(config))
            assert (r.returncode, r.stderr) == (2, taken)
            assert [i["name"] for i in lab.status()["interfaces"]] == ["eth0"]
    finally:
        lab.run("lb", "ip", "link", "set", "eth1", "xdp", "off", check=True)
    assert lab.xdp_attached("lb") == []


NOBODY = "65534"


def test_without_root_up_is_refused(lab):
    r = lab.run("lb", str(XLB), "up", *SEED_ARGS, user=NOBODY)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "needs root" in r.stderr, r.stderr
    assert lab.xdp_attached("lb") == []


def test_control_socket_refuses_non_root(lab, xlb):
    refused = "xlb: error: permission denied: the control socket is root-only\n"
    for cmd in ("status", "down"):
        r = lab.run("lb", str(XLB), cmd, user=NOBODY)
        assert (r.returncode, r.stdout, r.stderr) == (1, "", refused)
    assert lab.status()["pid"] > 0


def control_address(lab) -> str:
    """The control socket's path in lb, as xlb names it there."""
    return lab.run("lb", sys.executable, "-c", "from xlb import ctl; print(ctl.address())",
                   check=True).stdout.strip()


TAKE = r"""
import errno, json, os, socket, sys
address = sys.argv[1]
out = []
for attempt in ("connect", "bind"):        # to ask (or flood) xlb; to take its place
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        getattr(s, attempt)(address)
        out.append(attempt + ": done")
    except OSError as e:
        out.append(attempt + ": " + errno.errorcode[e.errno])
    s.close()
try:
    os.makedirs(os.path.dirname(address))
    out.append("mkdir: done")
except OSError as e:
    out.append("mkdir: " + errno.errorcode[e.errno])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind("\0xlb/control")                   # the abstract name xlb listened at before
print(json.dumps(out), flush=True)
sys.stdin.readline()                      # held until the test is done
"""


def test_another_user_can_neither_reach_nor_take_the_control_socket(lab):
    """Another user can neither connect to the control socket (to send it
    anything, or to flood it) nor take its place first: `xlb up` starts."""
    address = control_address(lab)
    for running in (False, True):
        with lab.xlb(*SEED_ARGS) if running else contextlib.nullcontext():
            other = lab.spawn("lb", "/usr/bin/python3", "-c", TAKE, address, user=NOBODY,
                              stdin=subprocess.PIPE)
            try:
                tried = json.loads(other.stdout.readline() or "null")
                assert tried == ["connect: EACCES", "bind: EACCES", "mkdir: EACCES"], \
                    (running, tried, other.stderr.read() if tried is None else "")
                if not running:
                    with lab.xlb(*SEED_ARGS):
                        out = lab.client("client", "http", VIP, "80", "--count", "2")
                        assert out["errors"] == []
            finally:
                other.kill()
                other.wait()
    assert lab.xdp_attached("lb") == []


def test_a_control_directory_another_user_owns_is_refused(lab):
    """root made /run/xlb, but a directory in it that another user owns (or may
    enter) is not xlb's: `xlb up` says so in one line and attaches nothing."""
    directory = os.path.dirname(control_address(lab))
    os.makedirs(directory, exist_ok=True)
    try:
        for owner, mode in ((int(NOBODY), 0o700), (0, 0o755), (0, 0o710), (0, 0o701)):
            os.chown(directory, owner, -1)
            os.chmod(directory, mode)
            r = lab.xlb_cmd("up", *SEED_ARGS, timeout=60)
            assert (r.returncode, r.stdout, r.stderr) == (
                1, "", f"xlb: error: {directory} is not xlb's own: owned by uid {owner}, "
                       f"mode {mode:o}\n")
            assert lab.xdp_attached("lb") == []
    finally:
        os.chown(directory, 0, -1)
        os.chmod(directory, 0o700)


# An instance of a build before the control socket was a file: it listens at
# the abstract name @xlb/control, answers as xlb does (one JSON line each way),
# prints each request's command, and stops after `down`.
EARLIER_BUILD = r"""
import json, socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind("\0xlb/control")
s.listen(16)
print(json.dumps("listening"), flush=True)
while True:
    c, _ = s.accept()
    with c, c.makefile() as f:
        line = f.readline()
        if not line:                    # looked at, asked nothing
            continue
        req = json.loads(line)
        print(json.dumps([req["cmd"], req.get("keep_datapath")]), flush=True)
        c.sendall(b'{"ok": true, "result": "stopping"}\n')
    if req["cmd"] == "down":
        break
"""


def test_an_instance_of_an_earlier_build_is_reached_for_the_upgrade(lab):
    """An upgrade runs the new `xlb down --keep-datapath` against the instance
    of the build before, which listens at the abstract @xlb/control: it must
    hand over, and the new `xlb up` must not start beside it meanwhile. Held
    by another user, that name is ignored and told nothing."""
    earlier = lab.spawn("lb", "/usr/bin/python3", "-c", EARLIER_BUILD)
    try:
        assert json.loads(earlier.stdout.readline()) == "listening"
        r = lab.xlb_cmd("up", *SEED_ARGS, timeout=60)
        assert (r.returncode, r.stdout, r.stderr) == (
            1, "", "xlb: error: xlb is already running in this network namespace "
                   "(see `xlb status`; stop it with `xlb down`)\n")
        assert lab.xdp_attached("lb") == []
        r = lab.xlb_cmd("down", "--keep-datapath")
        assert (r.returncode, r.stdout, r.stderr) == (
            0, "xlb: stopped; the data path keeps running\n", "")
        assert earlier.wait(10) == 0
        assert earlier.stdout.read() == json.dumps(["down", True]) + "\n"
    finally:
        earlier.kill()
        earlier.wait()
    squat = lab.spawn("lb", "/usr/bin/python3", "-c", EARLIER_BUILD, user=NOBODY)
    try:
        assert json.loads(squat.stdout.readline()) == "listening"
        r = lab.xlb_cmd("down", "--keep-datapath")
        assert (r.returncode, r.stdout, r.stderr) == (
            1, "", "xlb: error: no xlb instance runs in this network namespace\n")
    finally:
        squat.kill()
        out, _ = squat.communicate()
    assert out == ""


def in_own_run(lab, setup: str, *args: str) -> subprocess.CompletedProcess:
    """`xlb ARGS` in lb, with a /run of its own (an empty tmpfs, in a mount
    namespace of its own) made as the shell commands `setup` say first; what
    xlb made in /run/xlb is listed after its output."""
    return lab.run("lb", "unshare", "--mount", "--propagation", "private", "sh", "-c",
                   f'mount -t tmpfs none /run && {setup} || exit 99; "$@"; rc=$?; '
                   f'find /run/xlb -mindepth 1; exit $rc', "sh", str(XLB), *args)


def test_a_run_xlb_that_is_not_xlbs_directory_is_one_line(lab):
    """/run/xlb a file, or a directory that is not root's alone: `xlb up`
    names it, and makes nothing in it; the other commands find no instance
    there, without a traceback."""
    for setup, refused in (("touch /run/xlb", "/run/xlb: Not a directory"),
                           ("mkdir -m 755 /run/xlb",
                            "/run/xlb is not xlb's own: owned by uid 0, mode 755")):
        r = in_own_run(lab, setup, "up", *SEED_ARGS, "--metrics", "off")
        assert (r.returncode, r.stdout, r.stderr) == (1, "", f"xlb: error: {refused}\n")
        r = in_own_run(lab, setup, "status")
        assert (r.returncode, r.stdout, r.stderr) == (
            1, "", "xlb: error: no xlb instance runs in this network namespace\n"), setup
    assert lab.xdp_attached("lb") == []


def test_second_up_is_refused_and_first_keeps_serving(lab, xlb):
    before = lab.status()["pid"]
    r = lab.xlb_cmd("up", *SEED_ARGS, timeout=60)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "already running" in r.stderr, r.stderr
    assert lab.status()["pid"] == before
    assert set(lab.xdp_attached("lb")) == {"eth0", "eth1"}
    out = lab.client("client", "http", VIP, "80", "--count", "4")
    assert out["errors"] == []
    assert even_split(collections.Counter(out["names"]), {"WAS1", "WAS2"}, 4), out


def test_an_instance_whose_control_directory_was_removed_is_still_the_one(lab):
    """`rm -rf` of the control socket's directory (or of /run/xlb) while xlb
    serves: the instance makes its socket again, so the commands still reach it
    (its data path is not taken for one without its control process), and no
    second `xlb up` starts beside it. Where it cannot (the directory replaced
    by one that is not xlb's), the commands say so and remove nothing."""
    directory = os.path.dirname(control_address(lab))
    with lab.xlb(*SEED_ARGS) as x:
        subprocess.run(["rm", "-rf", directory], check=True)
        r = lab.xlb_cmd("up", *SEED_ARGS, "--metrics", "off", timeout=60)
        assert (r.returncode, r.stdout, r.stderr) == (
            1, "", "xlb: error: xlb is already running in this network namespace "
                   "(see `xlb status`; stop it with `xlb down`)\n")
        assert lab.status()["pid"] == x.proc.pid
        assert lab.client("client", "http", VIP, "80", "--count", "2")["errors"] == []
        os.unlink(f"{directory}/control.sock")        # the socket alone
        assert lab.status()["pid"] == x.proc.pid

        subprocess.run(["rm", "-rf", directory], check=True)
        os.mkdir(directory, 0o755)
        try:
            gone = (f"xlb: error: xlb runs here (pid {x.proc.pid}), but its control socket "
                    f"{directory}/control.sock is gone and it has not made it again (its log "
                    f"says why); `kill -TERM {x.proc.pid}` stops it\n")
            for cmd in (["status"], ["down"], ["ha", "role", "backup"]):
                r = lab.xlb_cmd(*cmd)
                assert (r.returncode, r.stdout, r.stderr) == (1, "", gone), cmd
            r = lab.xlb_cmd("up", *SEED_ARGS, "--metrics", "off", timeout=60)
            assert (r.returncode, r.stderr) == (
                1, f"xlb: error: {directory} is not xlb's own: owned by uid 0, mode 755\n")
            assert set(lab.xdp_attached("lb")) == {"eth0", "eth1"}
        finally:
            os.rmdir(directory)
        r = lab.xlb_cmd("down")
        assert (r.returncode, r.stdout, r.stderr) == (0, "xlb: stopped\n", "")
        assert x.proc.wait(10) == 0
    assert lab.xdp_attached("lb") == []
    assert "level=error event=control" in x.stderr


PROBE = r"""
import json, socket, sys, threading
def ask(payload):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(sys.argv[1])
    threading.Thread(target=lambda: _send(s, payload), daemon=True).start()
    data = b""
    try:
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    return data.decode()
def _send(s, payload):
    try:
        s.sendall(payload)
    except OSError:
        pass
print(json.dumps([ask(b"not json\n"), ask(b'{"no": "cmd"}\n'), ask(b'{"cmd": "frobnicate"}\n'),
                  ask(b'{"cmd": "apply"}\n'), ask(b"x" * int(sys.argv[2]))]))
"""


def test_control_socket_rejects_malformed_and_oversized_requests(lab, xlb, tmp_path):
    before = lab.status()
    # A file larger than a config may be is refused before anything is sent;
    # what the socket itself does with an oversized request, PROBE tries.
    big = tmp_path / "big.toml"
    big.write_text("#" * MAX_FILE + "\n")
    r = lab.xlb_cmd("apply", str(big))
    assert (r.returncode, r.stderr) == (2, f"xlb: error: {big}: larger than {MAX_FILE} bytes\n")
    out = lab.run("lb", "/usr/bin/python3", "-c", PROBE, control_address(lab),
                  str(ctl.MAX_REQUEST + 1), check=True, timeout=60).stdout
    replies = [json.loads(r) for r in json.loads(out)]
    assert [r["ok"] for r in replies] == [False] * 5
    assert "malformed or oversized request" in replies[0]["error"]
    assert replies[1]["error"] == 'request has no "cmd"'
    assert replies[2]["error"] == "unknown command 'frobnicate'"
    assert replies[3]["error"] == "malformed 'apply' request: 'text' must be a string"
    assert "oversized" in replies[4]["error"]
    after = lab.status()
    # Nothing changed: the same instance serves the same frontends and servers.
    assert after["pid"] == before["pid"]
    assert [f["name"] for f in after["frontends"]] == [f["name"] for f in before["frontends"]]
    assert [(s["name"], s["state"]) for p in after["pools"] for s in p["servers"]] == \
        [(s["name"], s["state"]) for p in before["pools"] for s in p["servers"]]
    assert lab.client("client", "http", VIP, "80", "--count", "2")["errors"] == []


RUDE = r"""
import json, os, socket, struct, sys, threading, time
def conn():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(15)
    s.connect(sys.argv[1])
    return s
def close_at_once():
    conn().close()
def garbage():
    s = conn(); s.sendall(os.urandom(4096)); s.close()
def half_a_line():
    s = conn(); s.sendall(b'{"cmd": "sta'); s.close()
def reset_after_asking():   # gone before the answer: the instance writes to no one
    s = conn()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.sendall(b'{"cmd": "status"}\n'); s.close()
def nothing():              # silent until the instance gives up on it
    s = conn(); data = b""
    while chunk := s.recv(4096):
        data += chunk
    s.close(); silent.append(data)
silent = []
rude = [close_at_once, garbage, half_a_line, reset_after_asking] * 10 + [nothing]
threads = [threading.Thread(target=f) for f in rude]
for t in threads:
    t.start(); time.sleep(0.01)
for t in threads:
    t.join()
print(json.dumps(silent[0].decode()))
"""


def test_control_socket_survives_rude_clients(lab, xlb):
    """Clients that close at once, send garbage or half a line, reset the
    connection before the answer, or stay silent: no traceback, still serving."""
    out = lab.run("lb", "/usr/bin/python3", "-c", RUDE, control_address(lab), check=True,
                  timeout=60).stdout
    assert json.loads(json.loads(out)) == {"ok": False, "error": "request timed out"}
    assert lab.status()["pid"] > 0
    assert lab.client("client", "http", VIP, "80", "--count", "2")["errors"] == []
    assert xlb.stop() == 0
    assert "Traceback" not in xlb.stderr and "exception" not in xlb.stderr.lower(), xlb.stderr


def curl(lab, url: str) -> subprocess.CompletedProcess:
    """curl inside lb, straight to the address (never through a proxy from the env)."""
    return lab.run("lb", "curl", "--noproxy", "*", "-sSf", "--max-time", "5", url, timeout=10)


def test_metrics_at_another_address_or_off(lab):
    with lab.xlb(*SEED_ARGS, "--metrics", "127.0.0.1:9800"):
        r = curl(lab, "http://127.0.0.1:9800/metrics")
        assert r.returncode == 0 and "xlb_build_info" in r.stdout, r.stderr
        assert curl(lab, "http://127.0.0.1:9717/metrics").returncode == 7   # refused
    with lab.xlb(*SEED_ARGS, "--metrics", "off"):
        assert curl(lab, "http://127.0.0.1:9717/metrics").returncode == 7


IDLE = r"""
import json, socket, sys, time
socks = []
while len(socks) < 100:           # connect, then send nothing
    s = socket.socket()
    s.settimeout(1)
    try:
        s.connect(("127.0.0.1", 9717))
    except OSError:               # the backlog is full: once more
        s.close()
        continue
    socks.append(s)
print(flush=True)
sys.stdin.readline()              # held until the test has looked
closed, deadline = 0, time.monotonic() + 30
for s in socks:                   # the instance closes each within seconds
    s.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        closed += s.recv(1) == b""
    except TimeoutError:          # still open: not closed (an OSError too)
        pass
    except OSError:               # reset
        closed += 1
print(json.dumps(closed), flush=True)
"""


def test_metrics_idle_connections_cost_bounded_threads(lab, xlb):
    """Any local user can reach /metrics: idle connections are closed after a
    few seconds, and only so many at once get a thread of xlb up."""
    pid = lab.status()["pid"]
    threads = lambda: len(os.listdir(f"/proc/{pid}/task"))   # noqa: E731
    before = threads()
    idle = lab.spawn("lb", "/usr/bin/python3", "-c", IDLE, user=NOBODY, stdin=subprocess.PIPE)
    try:
        idle.stdout.readline()
        held = threads() - before
        closed = json.loads(idle.communicate("\n", timeout=60)[0])
    finally:
        idle.kill()
        idle.wait()
    assert held <= 32, f"{held} threads for idle connections"
    assert closed == 100
    r = curl(lab, "http://127.0.0.1:9717/metrics")
    assert r.returncode == 0 and "xlb_build_info" in r.stdout, r.stderr


def test_warns_of_strict_rp_filter_and_of_generic_xdp(lab):
    """Strict rp_filter on eth1 drops reverse-NATed replies; an ifb link has no
    native XDP. xlb still starts, its serving line naming all three links
    (xlbifb0 in generic mode), and warns of exactly these two, each maybe more
    than once: rp_filter on eth1, with the sysctl values that fix it, and the
    generic attach of xlbifb0. No traffic is sent."""
    sysctl = "net.ipv4.conf.eth1.rp_filter"
    was = lab.run("lb", "sysctl", "-n", sysctl, check=True).stdout.strip()
    lab.run("lb", "ip", "link", "add", "xlbifb0", "type", "ifb", check=True)
    lab.run("lb", "ip", "link", "set", "xlbifb0", "up", check=True)
    try:
        lab.run("lb", "sysctl", "-qw", f"{sysctl}=1", check=True)
        x = lab.xlb(*SEED_ARGS, "--iface", "eth0", "--iface", "eth1", "--iface", "xlbifb0")
        with x:
            assert x.serving_line.endswith("on eth0 (native), eth1 (native), "
                                           "xlbifb0 (generic)"), x.serving_line
    finally:
        lab.run("lb", "sysctl", "-qw", f"{sysctl}={was}", check=True)
        lab.run("lb", "ip", "link", "del", "xlbifb0", check=True)
    warnings = [line for line in x.stderr.splitlines() if "level=warning" in line]
    # Every apply checks the host again, so a warning may come more than once.
    assert {tuple(re.search(r"event=(\S+) interface=(\S+)", w).groups()) for w in warnings} \
        == {("rp_filter", "eth1"), ("attach", "xlbifb0")}, x.stderr
    assert any("event=rp_filter" in w and "interface=eth1 " in w
               and f"set {sysctl}=0 or 2" in w for w in warnings), warnings
    assert any("event=attach" in w and "interface=xlbifb0 " in w and "mode=generic" in w
               for w in warnings), warnings


def test_a_link_that_goes_down_keeps_its_program(lab, tmp_path):
    """xlb attaches to every up link; one goes down, and a change meanwhile (a
    drain and an enable, as health changes are; an `xlb apply`) keeps its
    program there: when the link comes back up, it serves again."""
    with lab.xlb_seed(tmp_path):
        links = set(lab.xdp_attached("lb"))
        assert "eth0" in links
        lab.run("lb", "ip", "link", "set", "eth0", "down", check=True)
        try:
            lab.xlb_cmd("server", "drain", "was", "was1", check=True)
            lab.xlb_cmd("server", "enable", "was", "was1", check=True)
            lab.xlb_cmd("apply", check=True)
            assert set(lab.xdp_attached("lb")) == links
        finally:
            lab.run("lb", "ip", "link", "set", "eth0", "up", check=True)
        http = lab.client("client", "http", VIP, "80", "--count", "6")
        assert http["errors"] == [] and sorted(set(http["names"])) == ["WAS1", "WAS2"]


def vip_mac(lab) -> list[str]:
    """The MAC the client's link resolves the VIP to now (none: unanswered),
    asked afresh: its neighbour entries flushed, one ping."""
    lab.run("client", "ip", "neigh", "flush", "dev", "eth0", check=True)
    lab.run("client", "ping", "-c", "1", "-W", "1", VIP)
    return known_mac(lab)


def known_mac(lab) -> list[str]:
    """The MAC the client's neighbour entry for the VIP holds (none: no entry)."""
    out = lab.run("client", "ip", "-j", "neigh", "show", VIP, "dev", "eth0", check=True).stdout
    return [n["lladdr"] for n in json.loads(out) if "lladdr" in n]


def test_the_balancers_address_removed_and_added_back_serves_both_clients_again(lab):
    """lb's address on the clients' link is removed (its subnet's route and
    the gateway route through it with it) and added back, a health change
    applied meanwhile: xlb answers ARP for the VIP on that link again once
    the address is back, and both clients are served again once the routes
    are back (the gateway's is the operator's
    to put back, as for any route the kernel flushed)."""
    def health(status):
        return [s["health"] for s in status["pools"][0]["servers"]]

    with lab.xlb(*SEED_ARGS, "--interval", "0.5"):
        lab.run("lb", "ip", "addr", "del", "10.1.1.1/24", "dev", "eth0", check=True)
        try:
            lab.server("stop", "was2")
            wait_for(lambda: health(lab.status()) == ["up", "down"], 20, "backend2 down")
        finally:
            lab.server("start", "was2")
            lab.run("lb", "ip", "addr", "replace", "10.1.1.1/24", "dev", "eth0", check=True)
            lab.run("lb", "ip", "route", "replace", "198.51.100.0/24", "via", "10.1.1.2",
                    check=True)
        wait_for(lambda: health(lab.status()) == ["up", "up"], 20, "backend2 up again")
        wait_for(lambda: vip_mac(lab), 20, "the VIP answered by ARP again")
        for node in ("client", "remote"):
            http = lab.client(node, "http", VIP, "80", "--count", "6")
            assert http["errors"] == [] and sorted(set(http["names"])) == ["WAS1", "WAS2"]


def test_the_vip_is_answered_again_once_an_address_missing_at_an_apply_is_back(lab, tmp_path):
    """`xlb apply` while lb's address on the clients' link is missing leaves
    the VIP unanswered there (its subnet is no longer the link's); once the
    address is back, xlb answers ARP for the VIP there again with no other
    apply: the clients on the link resolved it no more (INCOMPLETE)."""
    with lab.xlb_seed(tmp_path):
        lab.run("lb", "ip", "addr", "del", "10.1.1.1/24", "dev", "eth0", check=True)
        try:
            lab.xlb_cmd("apply", check=True)
        finally:
            lab.run("lb", "ip", "addr", "replace", "10.1.1.1/24", "dev", "eth0", check=True)
            lab.run("lb", "ip", "route", "replace", "198.51.100.0/24", "via", "10.1.1.2",
                    check=True)
        wait_for(lambda: vip_mac(lab), 20, "the VIP answered by ARP again")
        http = lab.client("client", "http", VIP, "80", "--count", "6")
        assert http["errors"] == [] and sorted(set(http["names"])) == ["WAS1", "WAS2"]


def test_the_vip_is_answered_with_the_mac_lb_has_now_on_the_clients_link(lab):
    """lb's MAC on the clients' link is changed (`ip link set dev eth0
    address`): xlb answers ARP for the VIP with the new one, with no apply,
    as the client's neighbour entry for the VIP shows; it answered with the
    old one until the next `xlb apply`. A client that knew the VIP takes the
    new MAC at once, from a gratuitous ARP: its entry would have kept the old
    one, unanswered, for as long as it was stale."""
    old = lab.mac("lb", "eth0")
    with lab.xlb(*SEED_ARGS):
        wait_for(lambda: vip_mac(lab) == [old], 20, "the VIP answered by ARP")
        lab.run("lb", "ip", "link", "set", "dev", "eth0", "address", "02:00:00:00:99:01",
                check=True)
        try:
            wait_for(lambda: known_mac(lab) == ["02:00:00:00:99:01"], 20,
                     "the client's entry for the VIP at lb's new MAC, unasked")
            wait_for(lambda: vip_mac(lab) == ["02:00:00:00:99:01"], 20,
                     "the VIP answered with lb's new MAC")
        finally:
            lab.run("lb", "ip", "link", "set", "dev", "eth0", "address", old, check=True)
        wait_for(lambda: vip_mac(lab) == [old], 20, "the VIP answered with lb's MAC again")


def test_the_vip_is_announced_again_once_the_carrier_of_its_link_is_back(lab):
    """lb's MAC on the clients' link changes while the link has no carrier
    (its switch port down): the gratuitous ARP for the VIP at the new MAC
    goes nowhere. Once the carrier is back, xlb announces the VIP again: a
    client that knew it takes the new MAC unasked; its entry kept the old
    one, unanswered, for as long as it was stale."""
    old, new = lab.mac("lb", "eth0"), "02:00:00:00:99:02"
    with lab.xlb(*SEED_ARGS) as x:
        wait_for(lambda: vip_mac(lab) == [old], 20, "the VIP answered by ARP")
        lab.run("sw", "ip", "link", "set", "lb-eth0", "down", check=True)
        try:
            lab.run("lb", "ip", "link", "set", "dev", "eth0", "address", new, check=True)
            wait_for(lambda: x.logged().count("event=arp ") == 2, 20,
                     "the VIP announced at lb's new MAC, without carrier")
            assert known_mac(lab) == [old]
            lab.run("sw", "ip", "link", "set", "lb-eth0", "up", check=True)
            wait_for(lambda: known_mac(lab) == [new], 20,
                     "the client's entry for the VIP at lb's new MAC, unasked")
            wait_for(lambda: 'event=arp link=eth0 reason="carrier back" gratuitous_arps=1'
                     in x.logged(), 20, "the announcement logged")
        finally:
            lab.run("sw", "ip", "link", "set", "lb-eth0", "up", check=True)
            lab.run("lb", "ip", "link", "set", "dev", "eth0", "address", old, check=True)
        wait_for(lambda: vip_mac(lab) == [old], 20, "the VIP answered with lb's MAC again")


def plug(lab, link: str, bridge: str) -> None:
    """A new veth, link in lb, down, its peer lb-LINK a port of the switch's
    bridge, as lab.sh plugs a link."""
    subprocess.run(["ip", "-n", lab.ns("lb"), "link", "add", link, "type", "veth", "peer",
                    "name", f"lb-{link}", "netns", lab.ns("sw")], check=True)
    for node, dev in (("lb", link), ("sw", f"lb-{link}")):
        lab.run(node, "ethtool", "-K", dev, "tx", "off", check=True)
    lab.run("sw", "ip", "link", "set", f"lb-{link}", "master", bridge, "up", check=True)
    lab.run("sw", PY, str(HERE / "xdp_pass.py"), f"lb-{link}", check=True)


@pytest.mark.parametrize("link,bridge,address", [("eth1", "br-int", "10.1.11.1/24"),
                                                 ("eth0", "br-ext", "10.1.1.1/24")])
def test_a_link_deleted_and_made_again_under_its_name_is_attached_at_once(
        lab, link, bridge, address):
    """lb's link to the servers (or to the clients) is deleted and made again
    (a veth, a VLAN, a NIC whose driver was reloaded: its name, another
    ifindex), up before its address (as ifupdown has it): xlb attaches to it
    as soon as it is up, with no `xlb apply` (which the one-line form has no
    file for), and answers ARP for the VIP there once its address is back.
    Without its program there, every server's reply reached the client
    un-NATed and no connection was served for good, while status said both
    servers were up; attached before its address, the clients' link had no
    ARP answer for the VIP."""
    with lab.xlb(*SEED_ARGS, "--interval", "0.5"):
        index = {i["name"]: i["ifindex"] for i in lab.status()["interfaces"]}[link]
        lab.run("lb", "ip", "link", "del", link, check=True)     # and its peer, lb-LINK
        plug(lab, link, bridge)
        lab.run("lb", "ip", "link", "set", link, "up", check=True)

        def attached(status):
            links = {i["name"]: (i["ifindex"], i["state"]) for i in status["interfaces"]}
            return links[link][0] != index and links[link][1] == "up"
        wait_for(lambda: attached(lab.status()), 20, f"{link} attached again")
        lab.run("lb", "ip", "addr", "add", address, "dev", link, check=True)
        if link == "eth0":      # the route to the remote client went with the link
            lab.run("lb", "ip", "route", "replace", "198.51.100.0/24", "via", "10.1.1.2",
                    check=True)
        wait_for(lambda: all(s["health"] == "up" for s in lab.status()["pools"][0]["servers"]),
                 20, "both servers up")
        wait_for(lambda: vip_mac(lab), 20, "the VIP answered by ARP")
        http = lab.client("client", "http", VIP, "80", "--count", "6")
        assert http["errors"] == [] and sorted(set(http["names"])) == ["WAS1", "WAS2"]


def test_a_link_that_comes_up_is_attached_at_once_where_none_is_named(lab):
    """With no link named, xlb runs on every up Ethernet link, also one that
    comes up while it runs: here a new link into the servers' switch (a VLAN
    or a bond taking over from eth1) that lb's address there moves to, so
    that the servers' replies come back by it. Attached as soon as it is
    up, with no `xlb apply`, both clients are served; left without the
    program, as it was, every reply reached the client un-NATed."""
    try:
        with lab.xlb(*SEED_ARGS, "--interval", "0.5"):
            plug(lab, "srv0", "br-int")
            lab.run("lb", "ip", "link", "set", "srv0", "up", check=True)
            wait_for(lambda: ("srv0", "up") in {(i["name"], i["state"])
                                               for i in lab.status()["interfaces"]},
                     20, "srv0 attached")
            lab.run("lb", "ip", "addr", "del", "10.1.11.1/24", "dev", "eth1", check=True)
            lab.run("lb", "ip", "addr", "add", "10.1.11.1/24", "dev", "srv0", check=True)
            wait_for(lambda: all(s["health"] == "up"
                                 for s in lab.status()["pools"][0]["servers"]),
                     20, "both servers up")
            for node in ("client", "remote"):
                http = lab.client(node, "http", VIP, "80", "--count", "6")
                assert http["errors"] == [] and sorted(set(http["names"])) == ["WAS1", "WAS2"]
    finally:
        lab.run("lb", "ip", "link", "del", "srv0")
        lab.run("lb", "ip", "addr", "replace", "10.1.11.1/24", "dev", "eth1", check=True)
        for node in ("was1", "was2"):       # their gateway's MAC was srv0's
            lab.run(node, "ip", "neigh", "flush", "all", check=True)


def test_a_named_link_that_went_away_keeps_no_health_change_from_taking_effect(lab):
    """Attached to links it was told (--iface), one of which is then deleted:
    a server that goes down is still taken out (a health change keeps the
    links as they are, where it failed on the missing one)."""
    lab.run("lb", "ip", "link", "add", "name", "xtra0", "type", "veth", "peer", "name",
            "xtra1", check=True)
    lab.run("lb", "ip", "link", "set", "xtra0", "up", check=True)
    with lab.xlb(*SEED_ARGS, "--interval", "0.5", "--iface", "eth0", "--iface", "eth1",
                 "--iface", "xtra0"):
        lab.run("lb", "ip", "link", "del", "xtra0", check=True)
        lab.server("stop", "was1")
        try:
            wait_for(lambda: lab.status()["pools"][0]["servers"][0]["health"] == "down", 20,
                     "backend1 marked down")
            http = lab.client("client", "http", VIP, "80", "--count", "6")
            assert http["errors"] == [] and set(http["names"]) == {"WAS2"}
        finally:
            lab.server("start", "was1")


def test_a_signal_while_starting_or_stopping_stops_cleanly(lab):
    """SIGTERM while `xlb up` compiles stops it as any stop (exit 0), not as a
    failure to load the program; a second SIGTERM while it stops does not cut
    the clean-up short: XDP is detached either way."""
    starting = lab.spawn("lb", str(XLB), "up", *SEED_ARGS)
    # Before its handler (Python's start, imports: over a second on a busy
    # machine) SIGTERM kills it; a second after, it compiles (for seconds).
    wait_for(lambda: signal.SIGTERM in signals(starting.pid, "SigCgt"), 60,
             "xlb up catches SIGTERM")
    time.sleep(1)
    starting.send_signal(signal.SIGTERM)
    _, err = starting.communicate(timeout=60)
    assert starting.returncode == 0, err
    assert "cannot load" not in err and lab.xdp_attached("lb") == []
    x = lab.xlb(*SEED_ARGS)
    with x:
        x.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        x.proc.send_signal(signal.SIGTERM)
        assert x.proc.wait(20) == 0
    assert lab.xdp_attached("lb") == []
