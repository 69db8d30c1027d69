"""The control process (daemon.py): its answers to requests, and its Balancer
(balancer.py), on a real data path."""

import array
import asyncio
import contextlib
import ctypes
import fcntl
import functools
import gc
import json
import os
import re
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from xlb import config as configfile, ctl, daemon, healthsync, metrics, sweep
from xlb.balancer import Balancer, select_links
from xlb.datapath import Datapath, DatapathError, Limits, filter_slot, find_running
from xlb.model import Config, Monitor, from_flags
from xlb.planner import BackendState

import waiting

pytestmark = pytest.mark.kernel


async def exchange(balancer, request: dict | bytes, sync_targets, lock: asyncio.Lock,
                   then=lambda client: None) -> dict:
    """The control process's answer to `request` (or these bytes), sent over a
    socket pair; then(the client's end) once it is sent."""
    ours, theirs = socket.socketpair()
    with theirs:
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        theirs.sendall(request if isinstance(request, bytes)
                       else json.dumps(request).encode() + b"\n")
        then(theirs)
        try:
            return await daemon._answer(balancer, lambda: None, lock, asyncio.Event(),
                                        sync_targets, reader, writer)
        finally:
            writer.close()


def answer(balancer, request: dict | bytes, sync_targets, then=lambda client: None) -> dict:
    return asyncio.run(exchange(balancer, request, sync_targets, asyncio.Lock(), then))


def counted(monkeypatch, module, name: str) -> list:
    """The calls of module.name from now on, each as its arguments (it still
    does its work)."""
    calls, real = [], getattr(module, name)

    def recorded(*args):
        calls.append(args)
        return real(*args)
    monkeypatch.setattr(module, name, recorded)
    return calls


async def no_sync():
    """sync_targets of an instance whose checker takes its targets without a word."""


def test_a_config_whose_every_vip_is_new_replaces_a_full_one(balancer):
    """The hash maps hold a config's worth of keys (256 frontends): the old
    ones go before the new ones come."""
    def full(second):
        return from_flags([f"10.{second}.{i // 250}.{i % 250 + 1}:80" for i in range(256)],
                          ["10.1.11.101:8080"])

    balancer.apply(full(2), relink=False)
    balancer.apply(full(3), relink=False)
    maps = balancer.datapath._maps
    assert {IPv4Address(socket.ntohl(k.value)) for k in maps["vips"].keys()} == \
        {f.vip for f in full(3).frontends}
    assert len(list(maps["services"].keys())) == 256


@contextlib.contextmanager
def three_flows_through(limits: Limits):
    """A balancer of one frontend and one server, within limits, that three
    new connections went through (test-run)."""
    from packets import tcp_frame

    dp = Datapath(limits)
    try:
        b = Balancer(dp)
        b.apply(from_flags(["10.1.1.101:80"], ["10.1.11.101:8080"]), relink=False)
        for sport in range(40000, 40003):
            dp.test_run(tcp_frame("10.1.1.10", "10.1.1.101", sport, 80))
        yield dp, b
    finally:
        dp.close()


def test_a_newcomer_given_a_used_id_starts_its_counters_at_zero(root, fibnet):
    """Room for two frontends and two servers: once every id was used, a new
    frontend or server takes a removed one's. Its counters (status, metrics)
    start at zero, not with the traffic of the one it replaces."""
    with three_flows_through(Limits(max_services=2, max_backends=2)) as (dp, b):
        st = b.status()
        assert st["frontends"][0]["new_flows"] == 3
        assert st["pools"][0]["servers"][0]["new_flows"] == 3

        b.apply(from_flags(["10.1.1.102:80", "10.1.1.103:80"],
                           ["10.1.11.102:8080", "10.1.11.103:8080"]), relink=False)
        st = b.status()
        counts = ("new_flows", "packets_in", "bytes_in", "packets_out", "bytes_out")
        assert {f["name"]: [f[c] for c in counts] for f in st["frontends"]} == \
            {f["name"]: [0] * 5 for f in st["frontends"]}
        assert {s["name"]: [s[c] for c in counts] for s in st["pools"][0]["servers"]} == \
            {"backend1": [0] * 5, "backend2": [0] * 5}


def test_a_failed_apply_puts_back_the_counters_its_newcomers_cleared(root, fibnet,
                                                                     monkeypatch):
    """At capacity a newcomer takes the id of a server or frontend that the
    same change removes, and its counters start at zero; when the change
    fails and is rolled back, the one that keeps the id keeps its counters."""
    with three_flows_through(Limits(max_services=1, max_backends=1)) as (dp, b):
        counts = ("new_flows", "packets_in", "bytes_in")

        def seen():
            st = b.status()
            return [[f[c] for c in counts] for f in st["frontends"]] + \
                [[s[c] for c in counts] for s in st["pools"][0]["servers"]]
        before = seen()
        assert before[0][0] == before[1][0] == 3, before
        writes = dp.set_service

        def refused_once(*args):            # after the clears, as a kernel's refusal
            monkeypatch.setattr(dp, "set_service", writes)
            raise DatapathError("service: refused")
        monkeypatch.setattr(dp, "set_service", refused_once)
        with pytest.raises(DatapathError, match="refused"):
            b.apply(from_flags(["10.1.1.102:80"], ["10.1.11.102:8080"]), relink=False)
        assert seen() == before
        # And a change that succeeds after it clears them for good.
        b.apply(from_flags(["10.1.1.102:80"], ["10.1.11.102:8080"]), relink=False)
        assert seen() == [[0] * 3, [0] * 3]


def test_the_sweep_waits_a_hundred_times_what_it_cost(monkeypatch):
    """However long a sweep takes (seconds, for a million connections), the
    next one waits a hundred times its CPU time: at most 1% of a CPU."""
    clock, waits = [0.0], []

    class Stop(Exception):
        pass

    def sweep_flows():
        clock[0] += 3.0         # a sweep of three seconds of CPU
        return {"flows": 0, "flows_new": 0}, 0

    async def sleep(seconds):
        waits.append(seconds)
        raise Stop

    balancer = type("Balancer", (), {})()
    balancer.datapath = type("Datapath", (), {"sweep_flows": staticmethod(sweep_flows)})()
    monkeypatch.setattr(sweep.time, "thread_time", lambda: clock[0])
    monkeypatch.setattr(sweep.asyncio, "sleep", sleep)
    with pytest.raises(Stop):
        asyncio.run(sweep.sweep_forever(balancer))
    assert waits == [300.0]


@pytest.fixture
def own_control(tmp_path, monkeypatch):
    """A control directory of the test's own; the signal handlers, which `xlb
    up` takes (and leaves ignored), given back afterwards."""
    monkeypatch.setattr(ctl, "RUN_DIR", tmp_path / "run")
    monkeypatch.setattr(ctl, "holder", lambda: None)
    monkeypatch.setattr(ctl, "_earlier_instance", lambda *args: None)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("stop", ["SIGTERM", "down --keep-datapath"])
def test_a_stop_holds_hang_ups_while_it_waits_for_a_sweep(balancer, own_control, monkeypatch,
                                                           stop):
    """Once a stop has begun, a hang-up (Ctrl-C, then the terminal closed)
    must not cut it short: the loop ends at once, but the stop then waits
    for a sweep in flight (seconds, for a million connections)."""
    sweeping, swept, held = threading.Event(), threading.Event(), []

    def sweep_in_flight(datapath):
        sweeping.set()
        swept.wait(30)
        return {"flows": 0, "flows_new": 0}, 0, 0.0

    def stop_then_look():
        if sweeping.wait(30):           # set once the loop handles signals
            if stop == "SIGTERM":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                assert ctl.request("down", keep_datapath=True) == {"pid": os.getpid()}
            deadline = time.monotonic() + 5
            while signal.getsignal(signal.SIGHUP) != signal.SIG_IGN and \
                    time.monotonic() < deadline:
                time.sleep(0.01)
            held.append(signal.getsignal(signal.SIGHUP) == signal.SIG_IGN)
        swept.set()

    monkeypatch.setattr(sweep, "_sweep", sweep_in_flight)
    control = ctl.Listener()
    stopper = threading.Thread(target=stop_then_look)
    stopper.start()
    try:
        assert asyncio.run(daemon._serve(balancer, control, daemon._StopSignals())) == \
            (stop != "SIGTERM")
    finally:
        swept.set()
        stopper.join()
        control.close()
    assert held == [True]


# `xlb up` in the FibNet, on its link ext.
UP_ARGS = ("--vip", "10.1.1.101:80", "--backend", "10.1.11.101:8080", "--iface", "ext")
UP_CONFIG = from_flags(["10.1.1.101:80"], ["10.1.11.101:8080"], ["ext"])


def up_in_process(then, config=UP_CONFIG) -> tuple[int, bool]:
    """daemon.up(config) in this process, and then() in a thread once it
    answers requests: its exit status, and whether `xlb down` had to end it
    (it still ran 60 s after then()). Checks that nothing is left attached."""
    done, downed = threading.Event(), []

    def serving_then():
        deadline = time.monotonic() + 60
        try:
            while not done.is_set() and time.monotonic() < deadline:
                with contextlib.suppress(ctl.NotRunning, ctl.ControlError):
                    ctl.request("status")
                    then()
                    break
                time.sleep(0.05)
        finally:
            if not done.wait(60):
                downed.append(True)
                ctl.request("down")

    threading.Thread(target=serving_then, daemon=True).start()
    try:
        return daemon.up(config), bool(downed)
    finally:
        done.set()
        assert find_running() is None


def default_action(sig: int) -> bool:
    """True if sig would kill this process (or, SIGINT, raise KeyboardInterrupt)."""
    return signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_sigint_and_sigterm_never_have_their_default_action_while_xlb_up_runs(
        root, fibnet, own_control, stop):
    """From the moment `xlb up` takes SIGINT and SIGTERM to its return, neither
    has its default action. Closing the serving loop gave it back to them
    (the undoing of its add_signal_handler) some microseconds before the
    clean-up ignored them, and a SIGTERM then killed the process with the
    data path attached. Looked at every call and return of the main thread."""
    taken, defaults = [], []

    def look(frame, event, arg):
        default = default_action(signal.SIGINT) or default_action(signal.SIGTERM)
        if not taken:
            if not default:
                taken.append(True)
        elif default and not defaults:
            defaults.append(f"{event} {frame.f_code.co_name} ({frame.f_code.co_filename})")

    sys.setprofile(look)
    try:
        ended = up_in_process(lambda: os.kill(os.getpid(), stop))
    finally:
        sys.setprofile(None)
    assert taken and (ended, defaults) == ((0, False), [])


def sigterm_after(call, sent: list):
    """call, and then, the first time it returns in the main thread after `xlb
    up` took SIGTERM, a SIGTERM to this process (noted in sent)."""
    unset = signal.getsignal(signal.SIGTERM)

    @functools.wraps(call)
    def then_signalled(*args, **kwargs):
        result = call(*args, **kwargs)
        if not sent and threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGTERM) is not unset:   # taken by `xlb up`
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    return then_signalled


def test_a_signal_swallowed_on_its_way_still_stops_xlb_up(root, fibnet, own_control,
                                                          monkeypatch):
    """A SIGTERM while pyroute2's own asyncio loop runs a callback (any netlink
    request of the start): an exception raised there went to asyncio's
    exception handler ("Exception in callback"), not to `xlb up`, which went
    on serving. The handler only notes it, and xlb up stops without `xlb
    down`."""
    from pyroute2.netlink.core import CoreDatagramProtocol

    sent = []
    monkeypatch.setattr(CoreDatagramProtocol, "datagram_received",
                        sigterm_after(CoreDatagramProtocol.datagram_received, sent))
    assert up_in_process(lambda: None) == (0, False)
    assert sent


def test_a_sigterm_just_after_the_claim_of_the_control_socket_stops_xlb_up_cleanly(
        root, fibnet, own_control, monkeypatch):
    """A SIGTERM the moment `xlb up` has claimed its control socket: it had
    its default action there still, and killed the process, whose socket
    file the next `xlb up` found stale. Sent only where it cannot kill this
    test's own process."""
    claim, default = ctl._claim, []

    def claim_then_signal(*args):
        claimed = claim(*args)
        if not default:
            default.append(default_action(signal.SIGTERM))
            if not default[0]:
                os.kill(os.getpid(), signal.SIGTERM)
        return claimed

    monkeypatch.setattr(ctl, "_claim", claim_then_signal)
    assert up_in_process(lambda: None) == (0, False)
    assert default == [False] and not os.path.exists(ctl.address())


def test_a_signal_while_an_event_loop_is_made_stops_xlb_up_without_a_trace(
        root, fibnet, own_control, monkeypatch):
    """A SIGTERM while an event loop is being made (pyroute2 makes one for its
    netlink requests): an exception raised there left a half-made loop whose
    finaliser printed a traceback ("Exception ignored in BaseEventLoop.__del__")."""
    import asyncio.base_events

    sent, unraisable = [], []
    monkeypatch.setattr(asyncio.base_events.BaseEventLoop, "__init__",
                        sigterm_after(asyncio.base_events.BaseEventLoop.__init__, sent))
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    assert up_in_process(lambda: None) == (0, False)
    gc.collect()
    assert sent and unraisable == []


def test_a_signal_another_thread_takes_stops_xlb_up_at_once(root, fibnet, own_control,
                                                             monkeypatch):
    """A SIGTERM that the kernel gives a thread other than the main one (here
    sent to the thread that asks for `status`): its handler runs in the main
    thread, which waits in the serving loop. With no timer due (no health
    checks, no sweep), it waited until `xlb down` came, 60 s later."""
    never = asyncio.Event()

    async def no_sweep(balancer):
        await never.wait()

    monkeypatch.setattr(daemon, "sweep_forever", no_sweep)
    monkeypatch.setattr(daemon, "RESTORE_SECONDS", 3600)
    unchecked = from_flags(["10.1.1.101:80"], ["10.1.11.101:8080"], ["ext"],
                           monitor=Monitor("none", type="none"))
    assert up_in_process(lambda: signal.pthread_kill(threading.get_ident(), signal.SIGTERM),
                         unchecked) == (0, False)


def caught(pid: int) -> set[int]:
    """The signals process pid has a handler for."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(re.search(r"^SigCgt:\s*(\w+)$", status, re.M).group(1), 16)
    return {n for n in range(1, 64) if mask >> (n - 1) & 1}


def test_signals_at_any_moment_of_a_start_or_a_stop_stop_xlb_up_cleanly(root, fibnet):
    """`xlb up` given SIGTERM at moments spread over its start, and SIGINT
    while it serves, then SIGTERM after SIGTERM, as fast as they go, while it
    stops: each time it exits 0, with nothing attached, no control directory
    left and no traceback. The moments are not chosen: this cannot hit a
    window of microseconds every time, and the two tests above are those
    that can."""
    from labctl import XLB

    def start() -> subprocess.Popen:
        up = subprocess.Popen([str(XLB), "up", *UP_ARGS, "--metrics", "off"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while signal.SIGTERM not in caught(up.pid):     # before, SIGTERM kills it (no harm)
            assert up.poll() is None and time.monotonic() < deadline
            time.sleep(0.001)
        return up

    def stopped(up: subprocess.Popen, then=None) -> None:
        deadline = time.monotonic() + 30
        while then is not None and up.poll() is None and time.monotonic() < deadline:
            then()
        out, err = up.communicate(timeout=30)
        assert (up.returncode, out.splitlines()[-1:], "Traceback" in err) == \
            (0, ["xlb: stopped, XDP detached"], False), err
        assert find_running() is None and not ctl.directory().exists()

    up = start()
    try:
        t0 = time.monotonic()
        assert "serving" in up.stdout.readline()
        took = time.monotonic() - t0          # from taking the signals to serving
        deadline = time.monotonic() + 30
        while subprocess.run([str(XLB), "status"], capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, "xlb status: no answer"
            time.sleep(0.05)
        up.send_signal(signal.SIGINT)
        stopped(up, lambda: up.send_signal(signal.SIGTERM))
        for k in range(4):
            up = start()
            time.sleep(took * k / 4)
            up.send_signal(signal.SIGTERM)
            stopped(up)
    finally:
        up.kill()
        up.wait()


def queued(fd: int) -> int:
    """How many bytes the pipe (or FIFO) fd reads holds."""
    held = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, held)
    return held[0]


@contextlib.contextmanager
def stopping_during_an_apply(tmp_path):
    """`xlb up`, sent SIGTERM while an `xlb apply` is carried out, held where
    it saves the state: the temporary file it writes is a FIFO of one page,
    which the state does not fit. Yields (up, apply, release) once the stop
    has begun (a request is refused); release() reads the FIFO to its end (the
    apply goes on, then the stop) and returns what it read."""
    from labctl import XLB
    from xlb import state

    names = [f"s{i}" for i in range(100)]       # a state of 10 kB
    config = tmp_path / "xlb.toml"
    config.write_text("".join(f'[servers.{name}]\naddress = "10.1.11.101"\nport = {9000 + i}\n'
                              for i, name in enumerate(names))
                      + f'[monitors.off]\ntype = "none"\n[pools.p]\nservers = {json.dumps(names)}\n'
                        f'monitor = "off"\n[frontends.www]\nvip = "10.1.1.101"\nport = 80\n'
                        f'pool = "p"\ninterfaces = ["ext"]\n')
    up = subprocess.Popen([str(XLB), "up", *UP_ARGS, "--metrics", "off"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    apply = None
    try:
        assert "serving" in up.stdout.readline()        # its state saved
        fifo = state.directory() / f".{state.FILE}.{up.pid}.tmp"
        os.mkfifo(fifo)
        saved = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        fcntl.fcntl(saved, fcntl.F_SETPIPE_SZ, 4096)
        apply = subprocess.Popen([str(XLB), "apply", str(config)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not queued(saved):                # the maps written; the state, larger, held
            assert apply.poll() is None and time.monotonic() < deadline, "the apply: not held"
            time.sleep(0.01)
        up.send_signal(signal.SIGTERM)
        with pytest.raises(ctl.ControlError, match="^xlb is stopping: not done$"):
            while apply.poll() is None:         # until the stop has begun
                assert time.monotonic() < deadline, "the stop: not begun"
                ctl.request("ping", timeout=1)

        def release() -> bytes:
            os.set_blocking(saved, True)
            text = b""
            while chunk := os.read(saved, 65536):       # to its end: the writer closes it
                text += chunk
            os.close(saved)
            return text
        yield up, apply, release
    finally:
        for process in (up, apply):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    assert find_running() is None


def test_an_apply_under_way_when_a_stop_comes_is_answered(root, fibnet, tmp_path):
    """SIGTERM (SIGINT, `xlb down`) while an apply is carried out: its client
    said "closed the connection without answering" and failed, while the
    apply took effect (maps written, state saved). The stop waits for it and
    its answer; a request that comes meanwhile is refused, said so."""
    with stopping_during_an_apply(tmp_path) as (up, apply, release):
        text = release()
        out, err = apply.communicate(timeout=30)
        assert apply.returncode == 0, err
        assert "100 servers" in out and '"s99"' in json.loads(text)["config_text"]
        out, err = up.communicate(timeout=30)
        assert (up.returncode, out.splitlines()[-1:]) == (0, ["xlb: stopped, XDP detached"]), err


def test_down_while_a_stop_is_under_way_waits_for_it(root, fibnet, tmp_path):
    """`xlb down` after SIGTERM (`systemctl stop` beside an operator's `xlb
    down`) exited 1, "xlb is stopping: not done". It waits for that stop, says
    "stopped" (exit 0), and forgets the state that a stop by a signal keeps."""
    from labctl import XLB
    from xlb import state

    with stopping_during_an_apply(tmp_path) as (up, apply, release):
        down = subprocess.Popen([str(XLB), "down"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        watchdog = threading.Timer(30, up.kill)     # ends the read below, if nothing else
        watchdog.start()
        try:
            # The instance refuses it (and logs so) while the apply is held.
            for line in up.stderr:
                if "event=down" in line:
                    assert 'error="xlb is stopping: not done"' in line
                    break
            else:
                pytest.fail("`xlb down`: not refused while the stop was held")
            release()
            out, err = down.communicate(timeout=30)
        finally:
            watchdog.cancel()
            if down.poll() is None:
                down.kill()
                down.wait()
        assert (down.returncode, out, err) == (0, "xlb: stopped\n", "")
        assert (up.wait(30), apply.wait(30)) == (0, 0)
    assert state.load() is None


def test_uptime_does_not_move_with_a_step_of_the_clock(balancer, monkeypatch):
    """The clock set back an hour (NTP, an operator) leaves the uptime as it
    was, not negative."""
    up = balancer.status()["uptime_seconds"]
    wall = time.time
    monkeypatch.setattr(time, "time", lambda: wall() - 3600)
    assert balancer.status()["uptime_seconds"] >= up


def test_check_durations_are_those_of_the_servers_checked_now(balancer):
    """A server checked has its histogram from the apply on, at zero before its
    first check (which rate() would not see if the series began with it). Its
    monitor gone, the histogram goes from the metrics with it (it would stay
    there, frozen, as if checks still ran)."""
    from xlb import metrics

    checked = configfile.load(configfile.dump(balancer.config)
                              + '[monitors.tcp]\ntype = "tcp"\n')
    pool = checked.pools[0].name
    checked = configfile.load(configfile.dump(checked).replace(
        f"[pools.{pool}]\n", f'[pools.{pool}]\nmonitor = "tcp"\n'))
    balancer.apply(checked, relink=False)
    key = (pool, checked.pools[0].servers[0].name)
    assert [t.key for t in balancer.health_targets()] == [key]

    def histogram():
        text = metrics.render(balancer.status(), balancer.check_durations.snapshot())
        return "xlb_server_check_duration_seconds_count" in text
    assert histogram()
    assert balancer.check_durations.snapshot()[key] == ([0] * len(metrics._LE), 0.0)
    balancer.check_durations.observe(key, 0.001)
    balancer.apply(checked, relink=False)                   # still checked: kept
    assert histogram()
    unchecked = configfile.load(configfile.dump(checked).replace('monitor = "tcp"\n', ""))
    balancer.apply(unchecked, relink=False)
    assert balancer.health_targets() == [] and not histogram()


def test_check_durations_go_with_the_server(balancer):
    """A server's check durations go with it as its health changes do: two
    servers that swap names swap histograms, one that moves to another
    address starts anew."""
    text = ('[monitors.tcp]\ntype = "tcp"\n'
            '[servers.a]\naddress = "10.1.11.101"\nport = 8080\n'
            '[servers.b]\naddress = "10.1.11.102"\nport = 8080\n'
            '[pools.web]\nservers = ["a", "b"]\nmonitor = "tcp"\n'
            '[frontends.www]\nvip = "10.1.1.101"\nport = 80\npool = "web"\n')
    balancer.apply(configfile.load(text), relink=False)
    balancer.check_durations.observe(("web", "a"), 0.001)

    def checks(text):
        balancer.apply(configfile.load(text), relink=False)
        return {key[1]: sum(counts)
                for key, (counts, _) in balancer.check_durations.snapshot().items()}
    swapped = text.replace("11.101", "11.10x").replace("11.102", "11.101")
    swapped = swapped.replace("11.10x", "11.102")
    assert checks(swapped) == {"a": 0, "b": 1}
    assert checks(swapped.replace("11.101", "11.103")) == {"a": 0, "b": 0}


def test_a_check_the_checker_reports_under_an_old_name_counts_for_its_server(balancer):
    """Between an apply that renames servers and the checker's taking the new
    names (sync_targets), a check ends under the old name: its health change
    and duration are the renamed server's. Two servers swap names here: under
    the old name they went to the other server; one moved to another address
    is a new server, whose counts its old checks do not touch."""
    text = ('[monitors.tcp]\ntype = "tcp"\n'
            '[servers.a]\naddress = "10.1.11.101"\nport = 8080\n'
            '[servers.b]\naddress = "10.1.11.102"\nport = 8080\n'
            '[pools.web]\nservers = ["a", "b"]\nmonitor = "tcp"\n'
            '[frontends.www]\nvip = "10.1.1.101"\nport = 80\npool = "web"\n')
    a, b = ("web", "a"), ("web", "b")

    def counts():
        durations = balancer.check_durations.snapshot()
        return {key[1]: (balancer.health_changes.get(key, 0), sum(durations[key][0]))
                for key in (a, b)}

    def reported(key):
        balancer.count_health_change(key)
        balancer.observe_check(key, 0.001)

    balancer.apply(configfile.load(text), relink=False)
    balancer.checker_synced()
    reported(a)
    swapped = text.replace("11.101", "11.10x").replace("11.102", "11.101")
    balancer.apply(configfile.load(swapped.replace("11.10x", "11.102")), relink=False)
    reported(a)                                 # a check of 10.1.11.101, now b
    assert counts() == {"a": (0, 0), "b": (2, 2)}
    assert balancer.checker_synced() == {a: b, b: a}     # for the checker to follow
    reported(a)                                 # now of a, 10.1.11.102
    assert counts() == {"a": (1, 1), "b": (2, 2)}
    moved = configfile.load(swapped.replace("11.10x", "11.103"))
    balancer.apply(moved, relink=False)
    reported(a)                                 # of 10.1.11.102, where a is no more
    assert counts() == {"a": (0, 0), "b": (2, 2)}


@pytest.mark.parametrize("relink", [True, False])
def test_an_apply_attaches_to_a_link_made_again_under_its_name(balancer, fibnet, relink):
    """A link deleted and made again (a veth, a VLAN or a NIC's driver
    reloaded) has the same name and a new ifindex: it came up since, and an
    apply attaches to it, as to any link that came up (README); so does a
    change of state (the link watch's, once it is up), and the fast path
    may send out of it."""
    from xlb import netif

    def program_on(name):
        return next(link.xdp_prog_id for link in netif.links() if link.name == name)

    config = from_flags(["10.1.1.101:80"], ["10.1.11.101:8080"], ["again"])
    gone = fibnet.add_veth("again")
    balancer.apply(config, relink=True)
    assert program_on("again")
    fibnet.sh("ip", "link", "del", "again")
    index = fibnet.add_veth("again")
    try:
        balancer.apply(config, relink=relink)
        assert program_on("again")
        assert [(i["name"], i["ifindex"]) for i in balancer.status()["interfaces"]] == \
            [("again", index)]
        tx_links = {k.value for k in balancer.datapath._maps["tx_links"]}
        assert index in tx_links and gone not in tx_links
    finally:
        fibnet.sh("ip", "link", "del", "again")


def test_a_change_of_state_told_to_read_the_links_attaches_those_that_came_up(balancer, fibnet):
    """Where no link is named xlb runs on every up Ethernet link: the link
    watch's apply (reread, once one came up) attaches one that came up since
    (here a veth pair, both ends), and leaves one running another program to
    it, with a warning, given once (the watch's applies read the links at
    each address change); a health change's does not look (no dump, and no
    link's trouble keeps it from taking effect)."""
    from bcc import BPF
    from xlb import netif

    config = from_flags(["10.1.1.101:80"], ["10.1.11.101:8080"])
    balancer.apply(config, relink=True)
    before = {i["name"] for i in balancer.status()["interfaces"]}
    other = BPF(text="int xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }")
    try:
        fibnet.add_veth("late")
        taken = fibnet.add_veth("taken")
        netif.xdp_set(taken, other.load_func(b"xdp_pass", BPF.XDP).fd, "native")
        balancer.apply(config, relink=False)
        assert {i["name"] for i in balancer.status()["interfaces"]} == before
        result = balancer.apply(config, relink=False, reread=True)
        assert sorted(result["attached"]) == ["late", "late-peer", "taken-peer"]
        [warning] = result["attach_warnings"]
        assert warning.startswith("taken: came up running another XDP program (id "), warning
        assert {i["name"] for i in balancer.status()["interfaces"]} == \
            before | {"late", "late-peer", "taken-peer"}
        assert balancer.apply(config, relink=False, reread=True)["attach_warnings"] == []
        assert next(link.xdp_prog_id for link in netif.links() if link.name == "taken") != \
            balancer.datapath.program()["id"]
    finally:
        fibnet.sh("ip", "link", "del", "late")
        fibnet.sh("ip", "link", "del", "taken")
        other.cleanup()


def test_a_start_where_no_link_is_named_applies_once(root, fibnet, own_control, monkeypatch):
    """xlb up chooses and attaches its links (its apply), then its link watch
    reads them, for one that came up between (no event told it): where none
    did, and nothing else changed (an address, a MAC, a name), nothing is
    applied again, which did nothing but cost as much as the start's apply
    (0.4 s of CPU at 10,000 servers). A link that comes up after is
    attached (an apply)."""
    from xlb.linkwatch import LinkWatch

    applies, read, seen = [], threading.Event(), {}
    apply, meanwhile = Balancer.apply, LinkWatch._attach_meanwhile

    def counted(self, config, admin=None, *, relink, reread=False):
        applies.append((relink, reread))
        return apply(self, config, admin, relink=relink, reread=reread)

    async def read_then_tell(self):
        await meanwhile(self)
        read.set()

    def interfaces():
        return {i["name"] for i in ctl.request("status")["interfaces"]}

    def then():
        try:
            if read.wait(30):
                seen["read"] = list(applies)
                fibnet.add_veth("late")
                deadline = time.monotonic() + 30
                while "late" not in interfaces() and time.monotonic() < deadline:
                    time.sleep(0.05)
                seen["late"], seen["interfaces"] = list(applies), interfaces()
        finally:
            ctl.request("down")

    monkeypatch.setattr(Balancer, "apply", counted)
    monkeypatch.setattr(LinkWatch, "_attach_meanwhile", read_then_tell)
    try:
        assert up_in_process(then, from_flags(["10.1.1.101:80"], ["10.1.11.101:8080"])) == \
            (0, False)
    finally:
        fibnet.sh("ip", "link", "del", "late")
    assert seen["read"] == [(True, False)], seen
    assert {"ext", "int", "late", "late-peer"} <= seen["interfaces"], seen
    assert seen["late"] == [(True, False), (False, True)], seen


def test_links_that_come_and_go_where_none_is_named_are_let_go_once_gone(root, fibnet):
    """Where no link is named, each link that comes up is attached (a
    container's veth, say); one deleted since is let go by the apply that
    reads the links, not kept as `gone` until an `xlb apply` (which the
    one-line form has none of): kept, each took a place of the data plane's
    links (tx_links), until every apply failed on its capacity, health
    changes too, and no link that came up was attached."""
    from xlb import netif

    config = from_flags(["10.1.1.101:80"], ["10.1.11.101:8080"])
    ours = sum(link.ethernet and link.up for link in netif.links())
    dp = Datapath(Limits(max_tx_links=ours + 4))    # two veth pairs more
    try:
        b = Balancer(dp)
        b.apply(config, relink=True)
        for name in ("veth0", "veth1", "veth2", "veth3"):     # a name each, as containers'
            fibnet.add_veth(name)
            assert sorted(b.apply(config, relink=False, reread=True)["attached"]) == \
                [name, f"{name}-peer"]
            fibnet.sh("ip", "link", "del", name)
            b.apply(config, relink=False)       # a health change
        b.apply(config, relink=False, reread=True)
        assert len(b.status()["interfaces"]) == ours
    finally:
        dp.detach_all()
        dp.close()


def test_an_apply_that_swaps_links_for_as_many_others_fits_the_data_planes_links(root, fibnet):
    """An apply that lets links go and attaches as many others needs room for
    the new only (tx_links): the links let go leave it before the new take
    their places. Taking both at once, it failed on capacity midway (the
    kernel refused the map write), and was rolled back."""
    from xlb import netif

    def running(name):
        return next(link.xdp_prog_id for link in netif.links() if link.name == name)

    for name in ("old0", "old1", "new0", "new1"):
        fibnet.add_veth(name)
    dp = Datapath(Limits(max_tx_links=2))
    try:
        b = Balancer(dp)
        b.apply(from_flags(["10.1.1.101:80"], ["10.1.11.101:8080"], ["old0", "old1"]),
                relink=True)
        result = b.apply(from_flags(["10.1.1.101:80"], ["10.1.11.101:8080"], ["new0", "new1"]),
                         relink=True)
        assert (sorted(result["attached"]), sorted(result["detached"])) == \
            (["new0", "new1"], ["old0", "old1"])
        assert {i["name"] for i in b.status()["interfaces"]} == {"new0", "new1"}
        ours = dp.program()["id"]
        assert [running(n) == ours for n in ("old0", "old1", "new0", "new1")] == \
            [False, False, True, True]
        assert {k.value for k in dp._maps["tx_links"]} == \
            {socket.if_nametoindex(n) for n in ("new0", "new1")}
    finally:
        dp.detach_all()
        dp.close()
        for name in ("old0", "old1", "new0", "new1"):
            fibnet.sh("ip", "link", "del", name)


def test_a_failed_apply_leaves_the_links_let_go_in_the_data_planes_links(root, fibnet,
                                                                          monkeypatch):
    """An apply that fails once the links it lets go left tx_links (here a
    link that takes no program, as the kernel would refuse one) puts them
    back: they still run the program, and the fast path sends out of them."""
    for name in ("old0", "new0"):
        fibnet.add_veth(name)
    dp = Datapath(Limits(max_tx_links=2))
    try:
        b = Balancer(dp)
        b.apply(from_flags(["10.1.1.101:80"], ["10.1.11.101:8080"], ["old0"]), relink=True)
        before = {k.value: v.value for k, v in dp._maps["tx_links"].items()}
        assert list(before) == [socket.if_nametoindex("old0")]

        def refused(ifindex, ifname):
            raise DatapathError(f"{ifname}: cannot attach XDP: refused")
        monkeypatch.setattr(dp, "attach", refused)
        with pytest.raises(DatapathError, match="new0: cannot attach"):
            b.apply(from_flags(["10.1.1.101:80"], ["10.1.11.101:8080"], ["new0"]), relink=True)
        assert {k.value: v.value for k, v in dp._maps["tx_links"].items()} == before
        assert [(i["name"], i["state"]) for i in b.status()["interfaces"]] == [("old0", "up")]
    finally:
        monkeypatch.undo()
        dp.detach_all()
        dp.close()
        for name in ("old0", "new0"):
            fibnet.sh("ip", "link", "del", name)


def test_a_change_of_state_takes_the_links_addresses_and_macs_as_they_are_when_told(
        balancer, fibnet):
    """The ARP answers go by the attached links' addresses and MACs: a change
    of state keeps those the last apply read (no dump of the links), but for
    one told to read them again (reread: the link watch's, after an address
    or a MAC changed), which answers ARP only where the VIP's subnet is a
    link's now, with its MAC now."""
    vip = IPv4Address("10.1.40.101")
    config = from_flags([f"{vip}:80"], ["10.1.11.101:8080"], ["readdr"])
    index = fibnet.add_veth("readdr", "02:00:00:00:40:01")
    try:
        fibnet.sh("ip", "addr", "add", "10.1.40.1/24", "dev", "readdr")
        balancer.apply(config, relink=True)
        assert balancer.state.arp == {(index, vip): bytes.fromhex("020000004001")}
        fibnet.sh("ip", "addr", "del", "10.1.40.1/24", "dev", "readdr")
        fibnet.sh("ip", "link", "set", "readdr", "address", "02:00:00:00:40:02")
        balancer.apply(config, relink=False)
        assert balancer.state.arp == {(index, vip): bytes.fromhex("020000004001")}
        balancer.apply(config, relink=False, reread=True)
        assert balancer.state.arp == {}
        fibnet.sh("ip", "addr", "add", "10.1.40.1/24", "dev", "readdr")
        balancer.apply(config, relink=False, reread=True)
        assert balancer.state.arp == {(index, vip): bytes.fromhex("020000004002")}
    finally:
        fibnet.sh("ip", "link", "del", "readdr")


def test_a_vip_newly_answered_on_a_link_is_announced_by_a_gratuitous_arp(balancer, fibnet):
    """Clients that knew a VIP at another MAC (the box it moved from, lb's
    link before its MAC changed) kept sending there until their entry
    expired. Each VIP answered on a link where it was not, or with another
    MAC, is announced once by a gratuitous ARP: at the first apply, not by
    one that changes nothing there, with the link's new MAC once told, not
    by a backup, and on becoming active again; again when the link's carrier
    is back (the link watch tells), but by a backup."""
    from xlb import ha
    vip = IPv4Address("10.1.40.101")
    config = from_flags([f"{vip}:80"], ["10.1.11.101:8080"], ["garp"])
    index = fibnet.add_veth("garp", "02:00:00:00:40:01")
    listen = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))

    def announced(result) -> list[str]:
        """The MACs the VIP was announced at, as the apply counted them and
        as they came to garp's peer."""
        frames = []
        with contextlib.suppress(BlockingIOError):
            while True:
                frames.append(listen.recv(100, socket.MSG_DONTWAIT)[:42])
        macs = [f[6:12].hex() for f in frames if f == ha.garp_frame(f[6:12], vip)]
        assert len(macs) == result["gratuitous_arps"] and result["gratuitous_arps_unsent"] == []
        return macs

    def back(index: int) -> dict:
        return {"gratuitous_arps": balancer.carrier_back(index, "garp"),
                "gratuitous_arps_unsent": []}
    try:
        listen.bind(("garp-peer", 0))
        fibnet.sh("ip", "addr", "add", "10.1.40.1/24", "dev", "garp")
        assert announced(balancer.apply(config, relink=True)) == ["020000004001"]
        assert announced(balancer.apply(config, relink=True)) == []
        fibnet.sh("ip", "link", "set", "garp", "address", "02:00:00:00:40:02")
        assert announced(balancer.apply(config, relink=False)) == []    # not told yet
        assert announced(balancer.apply(config, relink=False, reread=True)) == ["020000004002"]
        assert announced(balancer.set_role("backup")) == []
        assert announced(back(index)) == []
        assert announced(balancer.set_role("active")) == ["020000004002"]
        assert announced(back(index)) == ["020000004002"]
        # In a worker thread, as the link watch calls it: not waiting for a
        # status that holds the balancer's lock through its map reads.
        held, release, answered = threading.Event(), threading.Event(), []
        holder = threading.Thread(target=lambda: (balancer.lock.acquire(), held.set(),
                                                  release.wait(30), balancer.lock.release()))
        holder.start()
        held.wait(10)
        backing = threading.Thread(target=lambda: answered.append(back(index)))
        backing.start()
        backing.join(10)
        waited = backing.is_alive()
        release.set()
        holder.join()
        backing.join()
        assert not waited and announced(answered[0]) == ["020000004002"]
        assert announced(back(socket.if_nametoindex("garp-peer"))) == []    # no VIP there
    finally:
        listen.close()
        fibnet.sh("ip", "link", "del", "garp")


def test_a_link_that_carries_no_ethernet_frames_is_refused_or_left_out(fibnet):
    """A TUN device (a VPN's tun0) hands the program IP packets, which it
    would parse as Ethernet frames: no ARP for a VIP comes there. Named, it
    was attached and said to serve; with no link named, it was among those."""
    fibnet.sh("ip", "tuntap", "add", "mode", "tun", "name", "xtun0")
    try:
        fibnet.sh("ip", "link", "set", "xtun0", "up")
        with pytest.raises(LookupError, match=r"^interface 'xtun0' carries no Ethernet "
                                              r"frames \(a tun, tunnel or wireguard link\)"):
            select_links(from_flags(["10.1.1.101:80"], ["10.1.11.101:8080"], ["xtun0"]))
        everywhere = select_links(from_flags(["10.1.1.101:80"], ["10.1.11.101:8080"]))
        assert everywhere and "xtun0" not in [link.name for link in everywhere]
    finally:
        fibnet.sh("ip", "link", "del", "xtun0")


def attached(balancer) -> list[tuple[str, int, str]]:
    """status's interfaces: name, ifindex and state."""
    return [(i["name"], i["ifindex"], i["state"]) for i in balancer.status()["interfaces"]]


def test_status_tells_a_link_deleted_gone_until_an_apply(balancer, fibnet):
    """A deleted link takes its program with it: status says so at once (it
    listed the link as attached until the next apply), and so does the link
    made again under its name, which runs nothing until an apply attaches it."""
    config = from_flags(["10.1.1.101:80"], ["10.1.11.101:8080"], ["ext", "deleted"])
    index = fibnet.add_veth("deleted")
    balancer.apply(config, relink=True)
    assert attached(balancer) == [("ext", fibnet.ifindex["ext"], "up"),
                                  ("deleted", index, "up")]

    fibnet.sh("ip", "link", "del", "deleted")
    assert attached(balancer) == [("ext", fibnet.ifindex["ext"], "up"),
                                  ("deleted", index, "gone")]
    again = fibnet.add_veth("deleted")
    assert attached(balancer) == [("ext", fibnet.ifindex["ext"], "up"),
                                  ("deleted", index, "gone")]

    balancer.apply(config, relink=True)
    assert attached(balancer) == [("ext", fibnet.ifindex["ext"], "up"),
                                  ("deleted", again, "up")]
    fibnet.sh("ip", "link", "del", "deleted")


def test_a_link_renamed_then_deleted_is_gone_under_the_name_it_had_last(balancer, fibnet):
    """The name status showed last, which `xlb apply` says it detached from,
    not the one it was attached under (which another link may have by now)."""
    config = from_flags(["10.1.1.101:80"], ["10.1.11.101:8080"], ["ext", "old"])
    index = fibnet.add_veth("old")
    balancer.apply(config, relink=True)
    fibnet.sh("ip", "link", "set", "old", "down")
    fibnet.sh("ip", "link", "set", "old", "name", "new")
    try:
        assert attached(balancer)[1] == ("new", index, "down")
    finally:
        fibnet.sh("ip", "link", "del", "new")
    assert attached(balancer)[1] == ("new", index, "gone")


@pytest.mark.parametrize("named", [True, False])
def test_an_apply_lists_a_renamed_link_under_its_new_name(balancer, fibnet, capsys, named):
    """A link renamed keeps the program; the next apply, a change of state's
    too, lists it under its new name (which the link watch, `xlb ha follow`
    and the logs read), and logs that once; as a warning where the config
    names the old name, and not the new: the frontends that name it are
    answered there (ARP) no more, as after an `xlb apply` naming it."""
    config = from_flags(["10.1.1.101:80"], ["10.1.11.101:8080"],
                        ["ext", "old"] if named else [])
    index = fibnet.add_veth("old")
    balancer.apply(config, relink=True)
    fibnet.sh("ip", "link", "set", "old", "down")
    fibnet.sh("ip", "link", "set", "old", "name", "new")
    try:
        capsys.readouterr()
        balancer.apply(config, relink=False)
        balancer.apply(config, relink=False)
        assert "old" not in balancer.links and balancer.links["new"].index == index
    finally:
        fibnet.sh("ip", "link", "del", "new")
    told = [line for line in capsys.readouterr().err.splitlines() if "event=link" in line]
    assert len(told) == 1, told
    assert ('level=warning event=link link=new reason="renamed from old: the frontends that '
            'name old have their VIPs answered on it (ARP) no more; name new in their '
            'interfaces"' if named else
            'level=info event=link link=new reason="renamed from old"') in told[0], told


def test_status_tells_a_link_down_renamed_or_detached_as_the_kernel_has_it(balancer, fibnet):
    """A link set down, or without carrier, keeps its program (it serves again
    once up); one renamed keeps it too, under its new name; one whose program was removed
    by hand (`ip link set dev X xdp off`) is served no more."""
    index = fibnet.add_veth("renamed")
    balancer.apply(from_flags(["10.1.1.101:80"], ["10.1.11.101:8080"], ["renamed"]),
                   relink=True)
    fibnet.sh("ip", "link", "set", "renamed", "down")
    assert attached(balancer) == [("renamed", index, "down")]
    fibnet.sh("ip", "link", "set", "renamed", "name", "other")
    assert attached(balancer) == [("other", index, "down")]
    fibnet.sh("ip", "link", "set", "other", "up")
    assert attached(balancer) == [("other", index, "up")]
    # Its peer down (a cable pulled): up, but NO-CARRIER, it carries nothing.
    # A data path without its control process (find_running) reads the same.
    fibnet.sh("ip", "link", "set", "renamed-peer", "down")
    assert attached(balancer) == [("other", index, "down")]
    running = find_running()
    running.close()
    assert [a.state for _, a in running.attached.values()] == ["down"]
    fibnet.sh("ip", "link", "set", "renamed-peer", "up")
    assert attached(balancer) == [("other", index, "up")]
    fibnet.sh("ip", "link", "set", "dev", "other", "xdp", "off")
    assert attached(balancer) == [("other", index, "detached")]
    fibnet.sh("ip", "link", "del", "other")


def test_status_shows_the_digest_of_the_maglev_table_the_maps_hold(balancer):
    """The digest of a Maglev pool's table (xlb_pool_table_info), read back from
    the maps by a control process that adopts them, is the one that any node
    with the same config and server states holds, though this one's servers
    have other ids; a server drained changes it."""
    from test_adopt import running_of
    from xlb import planner

    servers = ["10.1.11.101:8080", "10.1.11.102:8080"]
    config = from_flags(["10.1.1.101:80"], servers, algorithm="maglev")
    balancer.apply(from_flags(["10.1.1.101:80"], ["10.1.13.101:8080", *servers],
                              algorithm="maglev"), relink=False)
    balancer.apply(config, relink=False)
    lim = balancer.datapath.limits
    fresh = functools.partial(planner.desired, config, [], planner.DataplaneState(),
                              lim.max_services, lim.max_backends, lim.ring_size, lim.max_maglev)
    vip = (IPv4Address("10.1.1.101"), 80, 6)
    assert balancer.state.services[vip].slots != fresh().services[vip].slots   # other ids
    same = planner.table_digests(config, fresh())["default"]
    assert balancer.status()["pools"][0]["table_digest"] == same

    balancer.set_admin("drain", "default", "backend1")
    drained = planner.table_digests(config, fresh({("default", "backend1"): "drain"}))
    again = Datapath(running=running_of(balancer.datapath))
    try:
        adopted = Balancer(again)
        adopted.adopt(config, balancer.admin)
        assert adopted.status()["pools"][0]["table_digest"] == drained["default"] != same
    finally:
        again.close()


def test_an_adoption_reads_a_source_pool_back_and_a_maglev_config_flips_its_flag_alone(
        balancer, monkeypatch):
    """A source pool's digest (not maglev's of the same slots) is read back as
    the running instance showed it; an adoption by a config that says "maglev"
    writes the service's flags alone, the table it shares with "source" kept."""
    from test_adopt import running_of
    from xlb import planner
    from xlb.layout import SERVICE_MAGLEV

    servers = ["10.1.11.101:8080", "10.1.11.102:8080"]
    source = from_flags(["10.1.1.101:80"], servers, algorithm="source")
    maglev = from_flags(["10.1.1.101:80"], servers, algorithm="maglev")
    balancer.apply(source, relink=False)
    shown = balancer.status()["pools"][0]["table_digest"]
    again = Datapath(running=running_of(balancer.datapath))
    try:
        adopted = Balancer(again)
        adopted.adopt(source)
        assert adopted.status()["pools"][0]["table_digest"] == shown
        writes = []
        execute = planner.execute
        monkeypatch.setattr(planner, "execute", lambda dp, ops: (writes.extend(ops),
                                                                 execute(dp, ops)))
        adopted.apply(maglev, relink=False)
        assert writes == [("set_service", IPv4Address("10.1.1.101"), 80, 6, 0, 0,
                           again.limits.maglev_size, SERVICE_MAGLEV)]
        assert adopted.status()["pools"][0]["table_digest"] not in (None, shown)
    finally:
        again.close()


def test_a_maglev_tables_digest_is_computed_once_per_apply(balancer, monkeypatch):
    """Each digest hashes the table's 65,537 slots: 16 Maglev pools cost a
    status (each scrape, each second of `xlb top`) some 80 ms, with the lock
    held that applies wait for. They change only with what the maps hold."""
    from xlb import planner
    computed = counted(monkeypatch, planner, "table_digests")
    servers = ["10.1.11.101:8080", "10.1.11.102:8080"]
    balancer.apply(from_flags(["10.1.1.101:80"], servers, algorithm="maglev"), relink=False)
    first = [balancer.status()["pools"][0]["table_digest"] for _ in range(3)]
    balancer.set_admin("drain", "default", "backend1")
    drained = [balancer.status()["pools"][0]["table_digest"] for _ in range(2)]
    assert len(set(first)) == len(set(drained)) == 1 and first[0] != drained[0]
    assert len(computed) == 2


def test_the_config_is_dumped_once_per_apply(balancer, monkeypatch, tmp_path):
    """`xlb show` and the state each `xlb server` saves hold the config as
    TOML, which at 10,000 servers took 0.2 s to write: made once per config
    applied, and each answer is that of the config applied last."""
    from xlb import state as saved
    real = configfile.dump
    dumped = counted(monkeypatch, configfile, "dump")
    two = from_flags(["10.1.1.101:80"], ["10.1.11.101:8080", "10.1.11.102:8080"])
    one = from_flags(["10.1.1.101:80"], ["10.1.11.101:8080"])

    def shown():
        reply = answer(balancer, {"cmd": "show"}, no_sync)
        assert reply["ok"], reply
        return reply["result"]["text"]
    for config in (two, one):
        balancer.apply(config, relink=False)
        assert shown() == real(config)
        for action in ("drain", "enable"):
            reply = answer(balancer, {"cmd": "server", "action": action, "pool": "default",
                                      "server": "backend1"}, no_sync)
            assert reply["ok"], reply
            assert saved.load().config_text == real(config)
        assert shown() == real(config)
    assert dumped == [(two,), (one,)]


def test_a_change_of_state_keeps_the_rows_status_shows(balancer, monkeypatch):
    """A drain, an enable, a health change apply the config served: the rows
    of its servers that status shows (balancer._server_rows, a dict each of
    10,000 servers) are made again only for another config."""
    from xlb import balancer as module
    made = counted(monkeypatch, module, "_server_rows")
    two = from_flags(["10.1.1.101:80"], ["10.1.11.101:8080", "10.1.11.102:8080"])
    balancer.apply(two, relink=False)
    balancer.set_admin("drain", "default", "backend2")
    balancer.apply(balancer.config, relink=False)
    servers = balancer.status()["pools"][0]["servers"]
    assert [(s["name"], s["address"], s["state"]) for s in servers] == \
        [("backend1", "10.1.11.101", "up"), ("backend2", "10.1.11.102", "drain")]
    assert made == [(two,)]
    balancer.apply(from_flags(["10.1.1.101:80"], ["10.1.11.103:8080"]), relink=False)
    assert [s["address"] for s in balancer.status()["pools"][0]["servers"]] == ["10.1.11.103"]


def test_an_apply_attaches_again_where_the_program_was_removed_by_hand(balancer, fibnet):
    """`ip link set dev X xdp off` (or another tool's program put there): status
    says detached, and an apply takes the link back to the config, as a link
    new to it: attached, or refused where another program runs."""
    from bcc import BPF
    from xlb import netif

    config = from_flags(["10.1.1.101:80"], ["10.1.11.101:8080"], ["byhand"])
    index = fibnet.add_veth("byhand")
    balancer.apply(config, relink=True)
    fibnet.sh("ip", "link", "set", "dev", "byhand", "xdp", "off")
    assert attached(balancer) == [("byhand", index, "detached")]
    balancer.apply(config, relink=True)
    assert attached(balancer) == [("byhand", index, "up")]

    fibnet.sh("ip", "link", "set", "dev", "byhand", "xdp", "off")
    other = BPF(text="int xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }")
    try:
        netif.xdp_set(index, other.load_func(b"xdp_pass", BPF.XDP).fd, "native")
        with pytest.raises(LookupError, match="byhand: another XDP program"):
            balancer.apply(config, relink=True)
        assert attached(balancer) == [("byhand", index, "detached")]
    finally:
        fibnet.sh("ip", "link", "del", "byhand")
        other.cleanup()


def test_an_apply_names_what_nothing_uses(balancer, tmp_path):
    text = configfile.dump(balancer.config) + '[pools.spare]\nservers = ["backend1"]\n'
    reply = answer(balancer, {"cmd": "apply", "text": text, "path": str(tmp_path / "x.toml")},
                   no_sync)
    assert reply["ok"], reply
    assert [tuple(u) for u in reply["result"]["warnings"]] == \
        [("pools.spare", "no frontend uses it: it serves nothing")]


def test_an_apply_tells_and_logs_the_links_it_attaches_and_lets_go(balancer, fibnet, tmp_path,
                                                                    capsys):
    """`xlb apply` attaches to the links that came up since and lets go those
    gone or no longer named: its answer and its log line said nothing of
    either, so that only a status compared with the one before told where the
    program now runs."""
    def applied(*ifaces):
        text = configfile.dump(from_flags(["10.1.1.101:80"], ["10.1.11.101:8080"], ifaces))
        reply = answer(balancer, {"cmd": "apply", "text": text,
                                  "path": str(tmp_path / "x.toml")}, no_sync)
        assert reply["ok"], reply
        [logged] = [x.split() for x in capsys.readouterr().err.splitlines()
                    if "event=apply" in x.split()]
        return (reply["result"]["attached"], reply["result"]["detached"],
                [f for f in logged if f.startswith(("attached=", "detached="))])

    fibnet.add_veth("late")
    try:
        assert applied("ext") == (["ext"], [], ["attached=ext"])
        assert applied("ext", "late") == (["late"], [], ["attached=late"])
        assert applied("ext") == ([], ["late"], ["detached=late"])
    finally:
        fibnet.sh("ip", "link", "del", "late")


def test_an_apply_counts_servers_as_check_does(balancer, tmp_path):
    """A server in two pools is one server: `xlb apply` (and the start) say
    what `xlb check` of the same file says."""
    path = tmp_path / "x.toml"
    path.write_text(configfile.dump(balancer.config) + '[pools.spare]\nservers = ["backend1"]\n')
    reply = answer(balancer, {"cmd": "apply", "text": path.read_text(), "path": str(path)},
                   no_sync)
    assert reply["ok"], reply
    check = subprocess.run([os.path.join(os.path.dirname(sys.executable), "xlb"), "check",
                            str(path)], capture_output=True, text=True, timeout=60)
    assert check.stdout == f"{path}: ok: 1 frontends, 2 pools, 1 servers, 0 monitors\n"
    assert {k: reply["result"][k] for k in ("frontends", "pools", "servers")} == \
        {"frontends": 1, "pools": 2, "servers": 1}


def test_a_request_its_client_stopped_waiting_for_is_not_done(balancer, tmp_path):
    """A request queued while the instance starts (or behind a long apply) whose
    client gave up, and told the operator it failed, must not take effect later."""
    text = configfile.dump(balancer.config) + '[pools.spare]\nservers = ["backend1"]\n'
    late = {"cmd": "apply", "text": text, "path": str(tmp_path / "x.toml"),
            "deadline": time.monotonic() - 1}
    assert answer(balancer, late, no_sync) == {"ok": False,
                                               "error": "the client stopped waiting: not done"}
    assert len(balancer.config.pools) == 1 and balancer.applies == {"ok": 0, "error": 0}
    assert answer(balancer, {**late, "deadline": time.monotonic() + 30}, no_sync)["ok"]
    assert len(balancer.config.pools) == 2


def test_a_request_begun_before_its_deadline_is_waited_for_past_it(root, fibnet, own_control,
                                                                     monkeypatch):
    """A request whose turn came just before its client's deadline (queued
    behind a long change), and whose change took it past the deadline: the
    client said "did not answer within 1 s" and failed, while the change took
    effect. Once the instance has begun it, the client waits for its answer
    (as long again). Held here where the instance saves its state, the maps
    written: a drain first, the server's disable queued behind it."""
    held = {state: (threading.Event(), threading.Event()) for state in ("drain", "maint")}
    outcome = []
    from xlb import state as saved
    save = saved.save

    def held_save(state):
        if state.admin:             # the drain's, then the disable's; not the start's
            saving, release = held[state.admin[("default", "backend1")]]
            if not saving.is_set():
                saving.set()
                release.wait(30)
        save(state)

    monkeypatch.setattr(saved, "save", held_save)

    connected, at = threading.Event(), []     # the disable's client, and when
    connect = ctl._connect

    def connecting(timeout):
        sock = connect(timeout)
        if held["drain"][0].is_set():
            at.append(time.monotonic())
            connected.set()
        return sock

    monkeypatch.setattr(ctl, "_connect", connecting)

    def change(action, timeout):
        try:
            outcome.append(ctl.request("server", action=action, pool="default",
                                       server="backend1", timeout=timeout))
        except Exception as e:      # told as the CLI tells it: failed
            outcome.append(e)

    def drain_held_past_its_deadline():
        first = threading.Thread(target=change, args=("drain", 30))
        first.start()
        assert held["drain"][0].wait(30), "the drain: not held"
        timeout = 3.0
        client = threading.Thread(target=change, args=("disable", timeout))
        halfway = time.monotonic() + timeout / 2
        client.start()
        try:
            # Queued behind the first until halfway to its deadline (a time on
            # the clock, which the instance reads): a busy machine has the
            # other half to finish the drain and give it its turn before it
            # (a fixed 0.7 s of a 1 s timeout left it 0.3 s).
            assert connected.wait(30), "the disable: not sent"
            while time.monotonic() < halfway:
                time.sleep(0.01)
            held["drain"][1].set()
            first.join(30)
            assert held["maint"][0].wait(30), "the disable: not held"
            # Its deadline, read before it connected, is past: the change ends after it.
            while client.is_alive() and time.monotonic() <= at[0] + timeout:
                time.sleep(0.01)
        finally:
            for _, release in held.values():
                release.set()
        client.join(30)
        ctl.request("down")

    assert up_in_process(drain_held_past_its_deadline) == (0, False)
    assert isinstance(outcome[1], dict), outcome
    assert outcome[1]["state"] == "maint"


@pytest.mark.parametrize(("cmd", "told"), [("server", ctl.BEGUN), ("status", b"")])
def test_only_a_change_is_told_begun(balancer, cmd, told):
    """A status (or ping) that a hung instance never answers times out still,
    as `xlb top` says: only a change is waited for past its client's timeout."""
    async def told_before_the_answer() -> bytes:
        ours, theirs = socket.socketpair()
        with theirs:
            reader, writer = await asyncio.open_unix_connection(sock=ours)
            theirs.sendall(json.dumps({"cmd": cmd, "action": "drain", "pool": "default",
                                       "server": "backend1", "progress": True}).encode()
                           + b"\n")
            assert (await daemon._answer(balancer, lambda: None, asyncio.Lock(),
                                         asyncio.Event(), no_sync, reader, writer))["ok"]
            writer.close()
            await writer.wait_closed()
            return theirs.recv(4096)

    assert asyncio.run(told_before_the_answer()) == told


def test_a_request_nested_deeper_than_json_decodes_is_answered_as_malformed(balancer):
    """The decoder gives up on deep nesting with a RecursionError, no ValueError:
    the client got no answer, and the log a traceback."""
    reply = answer(balancer, b"[" * 10_000 + b"\n", no_sync)
    assert reply == {"ok": False, "error": f"malformed or oversized request "
                                           f"(limit {ctl.MAX_REQUEST} bytes)"}


def test_a_request_whose_client_hung_up_before_its_turn_is_not_done(balancer, tmp_path):
    """An operator who ended a command that waited behind a long apply (Ctrl-C,
    or a supervisor's timeout that killed it) takes it for not done."""
    text = configfile.dump(balancer.config) + '[pools.spare]\nservers = ["backend1"]\n'
    request = {"cmd": "apply", "text": text, "path": str(tmp_path / "x.toml")}
    assert answer(balancer, request, no_sync, then=socket.socket.close) == \
        {"ok": False, "error": "the client stopped waiting: not done"}
    assert len(balancer.config.pools) == 1 and balancer.applies == {"ok": 0, "error": 0}


@pytest.mark.parametrize("gone", ["hung-up", "deadline-passed"])
def test_a_request_that_stands_is_done_when_its_client_is_gone(balancer, gone):
    """`xlb ha follow` tells xlb backup when keepalived stops, which kills it a
    second later: an instance slower than that must still go silent, or it
    answers ARP for the VIPs beside the peer that took them over."""
    balancer.set_role("active")
    request = {"cmd": "role", "role": "backup", "stands": True}
    if gone == "hung-up":
        answer(balancer, request, no_sync, then=socket.socket.close)
    else:
        answer(balancer, {**request, "deadline": time.monotonic() - 1}, no_sync)
    assert balancer.role == "backup"


def test_a_request_whose_client_shut_down_its_writing_is_done(balancer):
    """socat and `nc -N` shut down their writing once the request is sent, and
    wait for the answer."""
    assert answer(balancer, {"cmd": "ping"}, no_sync,
                  then=lambda client: client.shutdown(socket.SHUT_WR))["ok"]


def test_drain_and_maint_go_with_the_server(balancer, tmp_path):
    """Drain and maint go with a server renamed, or in a renamed pool, at the
    same address and port: the same server, which an operator took out of
    service (it came back into the ring under its new name). A server gone
    from its pool loses its state, and the apply names each one it forgot,
    as it does a state whose name another server has taken."""
    text = ('[servers.a]\naddress = "10.1.11.101"\nport = 8080\n'
            '[servers.b]\naddress = "10.1.11.102"\nport = 8080\n'
            '[servers.c]\naddress = "10.1.11.103"\nport = 8080\n'
            '[pools.web]\nservers = ["a", "b", "c"]\n'
            '[frontends.www]\nvip = "10.1.1.101"\nport = 80\npool = "web"\n')

    def apply(text):
        reply = answer(balancer, {"cmd": "apply", "text": text,
                                  "path": str(tmp_path / "x.toml")}, no_sync)
        assert reply["ok"], reply
        return reply["result"]["admin_forgotten"]

    apply(text)
    balancer.set_admin("drain", "web", "a")
    balancer.set_admin("disable", "web", "b")
    renamed = text.replace("pools.web", "pools.www").replace('pool = "web"', 'pool = "www"')
    assert apply(renamed) == []
    assert balancer.admin == {("www", "a"): "drain", ("www", "b"): "maint"}
    swapped = renamed.replace("servers.a]", "servers.x]").replace("servers.b]", "servers.a]")
    swapped = swapped.replace("servers.x]", "servers.b]")
    assert apply(swapped) == []
    assert balancer.admin == {("www", "b"): "drain", ("www", "a"): "maint"}
    assert balancer.states == {("www", "a"): "maint", ("www", "b"): "drain", ("www", "c"): "up"}
    # c renamed a, at its own address; a (at .102) gone: a's state is not c's.
    taken = ('[servers.a]\naddress = "10.1.11.103"\nport = 8080\n'
             '[servers.b]\naddress = "10.1.11.101"\nport = 8080\n'
             '[pools.www]\nservers = ["a", "b"]\n'
             '[frontends.www]\nvip = "10.1.1.101"\nport = 80\npool = "www"\n')
    assert apply(taken) == ["maint of a in pool www"]
    assert balancer.admin == {("www", "b"): "drain"}
    assert apply(taken.replace('"a", "b"', '"a"')) == ["drain of b in pool www"]
    assert balancer.admin == {}

def test_a_fresh_start_tells_renamed_servers_by_the_saved_config():
    """With no data path to adopt, a start takes the saved states by the saved
    config's servers, as an apply does by the running ones': a state goes with
    its server renamed, or in a renamed pool, at the same address and port,
    and is forgotten, and named, when another server took its name."""
    from xlb import state as saved

    def config(pool, *servers):
        return configfile.load("".join(
            f'[servers.{name}]\naddress = "10.1.11.{host}"\nport = 8080\n'
            for name, host in servers) + f'[pools.{pool}]\nservers = {[n for n, _ in servers]}\n'
            f'[frontends.www]\nvip = "10.1.1.101"\nport = 80\npool = "{pool}"\n'.replace("'", '"'))

    web = config("web", ("a", 101), ("b", 102))
    kept = saved.State(None, configfile.dump(web), {("web", "a"): "drain", ("web", "b"): "maint"})

    def restored(new, kept=kept):
        b = Balancer(None)
        return b.restore(kept, new), b.admin

    assert restored(config("www", ("a", 101), ("x", 102))) == (
        [], {("www", "a"): "drain", ("www", "x"): "maint"})
    # b renamed a, at its own address; a (at .101) gone: a's drain is not b's.
    assert restored(config("web", ("a", 102))) == (["drain of a in pool web"],
                                                   {("web", "a"): "maint"})
    # An unreadable saved config names no one: the apply keeps the states by name.
    assert restored(web, replace(kept, config_text="x = ")) == ([], kept.admin)


def test_a_server_given_another_address_is_checked_anew_and_keeps_its_admin_state(balancer):
    """Down by the checks of its old address, it starts up at the new one, as
    a new server does, until its first check there; drain, the operator's
    word about the server by its name, stays."""
    key = ("default", "backend1")
    balancer.health[key] = "down"
    balancer.apply(balancer.config, relink=False)
    balancer.set_admin("drain", *key)
    pool = balancer.config.pools[0]
    moved = replace(pool, servers=(replace(pool.servers[0], address=IPv4Address("10.1.11.102")),))
    balancer.apply(replace(balancer.config, pools=(moved,)), relink=False)
    assert (balancer.admin, balancer.health) == ({key: "drain"}, {})
    balancer.set_admin("enable", *key)
    assert balancer.states[key] == "up"


def test_a_renamed_server_keeps_its_health(balancer):
    """Down by its checks, a server renamed at the same address and port (the
    same server, planner.renames) stays down, out of the ring, until its checks
    say otherwise: not up, taking new flows, until its first check."""
    balancer.health[("default", "backend1")] = "down"
    balancer.apply(balancer.config, relink=False)
    pool = balancer.config.pools[0]
    renamed = replace(pool, servers=(replace(pool.servers[0], name="was-1"),))
    balancer.apply(replace(balancer.config, pools=(renamed,)), relink=False)
    key = ("default", "was-1")
    assert (balancer.health, balancer.states) == ({key: "down"}, {key: "down"})
    assert balancer.state.services[(IPv4Address("10.1.1.101"), 80, 6)].slots == ()


def test_health_changes_go_with_the_server(balancer):
    """xlb_server_health_changes_total, which the control process keeps, goes
    with a server as its data path counters do: under its new name when it is
    renamed at the same address and port (two servers that swap names swap
    counts), from zero when it moves to another address."""
    balancer.apply(from_flags(["10.1.1.101:80"], ["10.1.11.101:8080", "10.1.11.102:8080"]),
                   relink=False)
    balancer.health_changes.update({("default", "backend1"): 3, ("default", "backend2"): 5})

    def counts(*servers):
        pool = balancer.config.pools[0]
        balancer.apply(replace(balancer.config, pools=(replace(pool, servers=servers),)),
                       relink=False)
        return {s["name"]: s["health_changes"] for s in balancer.status()["pools"][0]["servers"]}

    one, two = balancer.config.pools[0].servers
    assert counts(replace(one, name="backend2"), replace(two, name="backend1")) == \
        {"backend2": 3, "backend1": 5}
    assert counts(replace(one, name="was-1"), replace(two, name="backend1")) == \
        {"was-1": 3, "backend1": 5}
    assert counts(replace(one, name="was-1"),
                  replace(two, name="backend1", address=IPv4Address("10.1.11.103"))) == \
        {"was-1": 3, "backend1": 0}


# -- health checks reaching the data path (HealthSync) ----------------------------
# The servers listen on the FibNet's own 10.1.11.1, in this thread's namespace,
# where the checker runs too (over its lo, which the FibNet leaves down).

HERE_ADDRESS, CHECK_PORT = "10.1.11.1", 20000


@pytest.fixture
def checked(balancer):
    """The balancer, with its FibNet's lo up."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    return balancer


REMOTE = "10.1.11.101"             # a server address not local to the balancer fixture


def checked_config(ports, interval: float = 0.1, rise: int = 1, address: str = HERE_ADDRESS):
    text = [f'[monitors.m]\ntype = "tcp"\ninterval = {interval}\ntimeout = 0.05\n'
            f'rise = {rise}\nfall = 1\n']
    text += [f'[servers.s{p}]\naddress = "{address}"\nport = {p}\n' for p in ports]
    text.append(f'[pools.web]\nservers = {json.dumps([f"s{p}" for p in ports])}\n'
                f'monitor = "m"\n[frontends.www]\nvip = "10.1.1.101"\nport = 80\npool = "web"\n')
    return configfile.load("\n".join(text))


def listen(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((HERE_ADDRESS, port))
    s.listen(64)
    return s


until = functools.partial(waiting.until, seconds=10.0)


class Applies:
    """Counts the balancer's applies: after the first `done` of them, the next
    `failing` fail as a map write the kernel refuses would; the rest are done."""

    def __init__(self, balancer, failing: int = 0, done: int = 0):
        self.n, self.failing, self.done, self._apply = 0, failing, done, balancer.apply
        balancer.apply = self

    def __call__(self, *args, **kw):
        self.n += 1
        if self.done < self.n <= self.done + self.failing:
            raise DatapathError("Could not update table: Cannot allocate memory")
        return self._apply(*args, **kw)


@contextlib.asynccontextmanager
async def checking(balancer, config):
    """A HealthSync of the balancer, which serves config, and the lock its
    changes hold; its checker runs meanwhile."""
    lock = asyncio.Lock()
    sync = healthsync.HealthSync(balancer, lock)
    balancer.apply(config, relink=False)
    async with lock:
        await sync.sync_targets()
    run = asyncio.create_task(sync.checker.run())
    try:
        yield sync, lock
    finally:
        sync.checker.stop()
        await run


def test_health_changes_made_during_an_apply_are_taken_in_one(checked):
    """Servers that fail while an apply holds the lock go to the data path
    together once it is released: a mass failure costs one apply, not one
    per server in a row (which took 1,000 servers 13 s)."""
    ports = range(CHECK_PORT, CHECK_PORT + 20)
    config = checked_config(ports)
    listeners = [listen(p) for p in ports]

    async def scenario():
        async with checking(checked, config) as (sync, lock):
            checker = sync.checker
            await until(lambda: all(checker.last_check(("web", f"s{p}")) for p in ports),
                        "every first check")
            applies = Applies(checked)
            async with lock:                            # as an `xlb apply` would
                for s in listeners:
                    s.close()
                await until(lambda: set(checker.states().values()) == {"down"}, "all down")
            await until(lambda: set(checked.states.values()) == {"down"}, "all down applied")
            async with lock:                            # the queued changes have run
                pass
            return applies.n

    try:
        assert asyncio.run(scenario()) == 1
    finally:
        for s in listeners:
            s.close()


def test_a_renamed_server_goes_on_as_checked(checked):
    """The checker follows an apply's renames (a renamed pool here): the
    server's checks go on under its new name, last check, counts and all,
    where a new target's first check would decide at once, whatever fall."""
    config = checked_config([CHECK_PORT])
    renamed = configfile.load(configfile.dump(config).replace("[pools.web]", "[pools.www]")
                              .replace('pool = "web"', 'pool = "www"'))
    listener = listen(CHECK_PORT)

    async def scenario():
        async with checking(checked, config) as (sync, lock):
            checker = sync.checker
            await until(lambda: checker.last_check(("web", f"s{CHECK_PORT}")), "a first check")
            async with lock:
                last = checker.last_check(("web", f"s{CHECK_PORT}"))
                await asyncio.to_thread(checked.apply, renamed, relink=False)
                await sync.sync_targets()
                return last, checker.states(), checker.last_check(("www", f"s{CHECK_PORT}"))

    try:
        last, states, now = asyncio.run(scenario())
        assert states == {("www", f"s{CHECK_PORT}"): "up"} and now is last
    finally:
        listener.close()


def test_a_monitor_edited_by_an_apply_goes_on_as_checked(checked):
    """An apply that edits a server's monitor (its rise and interval here)
    changes how it is checked, not which server it is: the checker goes on
    with its state, last check and counts (health.HealthChecker._edit), where
    a new server's first check would decide at once, whatever rise."""
    key = ("web", f"s{CHECK_PORT}")

    async def scenario():
        async with checking(checked, checked_config([CHECK_PORT])) as (sync, lock):
            checker = sync.checker
            await until(lambda: checked.states[key] == "down", "down applied")
            async with lock:
                last = checker.last_check(key)
                checked.apply(checked_config([CHECK_PORT], interval=0.2, rise=3), relink=False)
                await sync.sync_targets()
                return last, checker.state(key), checker.last_check(key), checked.states[key]

    last, state, now, applied = asyncio.run(scenario())
    assert (state, applied) == ("down", "down") and now is last


def test_a_health_change_made_stale_by_an_apply_does_not_stick(checked):
    """A server fails while an apply holds the lock, and the apply moves it to
    another port, where it listens (the checker restarts it, provisionally up
    as the data path has it); its first check there passes. The change queued
    from before must not take it down: the checker, which now says up, would
    never say so again while it keeps passing."""
    key = ("web", f"s{CHECK_PORT}")
    listener = listen(CHECK_PORT)
    moved = configfile.load(configfile.dump(checked_config([CHECK_PORT])).replace(
        f"port = {CHECK_PORT}\n", f"port = {CHECK_PORT + 1}\n"))

    async def scenario():
        nonlocal listener
        async with checking(checked, checked_config([CHECK_PORT])) as (sync, lock):
            checker = sync.checker
            await until(lambda: checker.last_check(key), "the first check")
            async with lock:
                listener.close()
                await until(lambda: checker.state(key) == "down", "down")
                listener = listen(CHECK_PORT + 1)
                checked.apply(moved, relink=False)
                await sync.sync_targets()
            await until(lambda: checker.last_check(key), "the first check at the new port")
            async with lock:                            # the queued change has run
                pass
            return checker.last_check(key)[0], checker.state(key), checked.states[key]

    try:
        assert asyncio.run(scenario()) == (True, "up", "up")
    finally:
        listener.close()


def test_a_health_change_whose_apply_fails_is_applied_again(checked):
    """An apply of the checker's states can fail (the kernel refuses a map
    write): it is tried again, so that a dead server does not stay in the data
    path until some other check changes."""
    key = ("web", f"s{CHECK_PORT}")
    listener = listen(CHECK_PORT)

    async def scenario():
        async with checking(checked, checked_config([CHECK_PORT])) as (sync, _):
            checker = sync.checker
            await until(lambda: checker.last_check(key), "the first check")
            applies = Applies(checked, failing=1)
            listener.close()
            await until(lambda: checker.state(key) == "down", "down")
            await until(lambda: checked.states[key] == "down", "down applied", seconds=5)
            return (applies.n, checked.health_changes[key],
                    (await asyncio.to_thread(checked.status))["health_applies"])

    try:
        n, changes, shown = asyncio.run(scenario())
        # The failure counted; the data path no longer lags once the retry is done.
        assert (n, changes) == (2, 1)
        assert shown == {"failed": 1, "unapplied_since": None, "error": None}
    finally:
        listener.close()


def test_an_apply_whose_health_states_fail_to_follow_is_applied_and_warned_of(checked, tmp_path):
    """The config is applied (and saved) before the checks' states follow it
    to the data path: a failure there is a warning of the apply's answer, not
    its error (the operator would believe nothing applied), counted as the
    apply it was, and tried again."""
    ports = [8080, 8081]            # (not local: `apply` refuses a local server)
    request = {"cmd": "apply", "text": configfile.dump(checked_config(ports, address=REMOTE)),
               "path": str(tmp_path / "xlb.toml")}

    async def scenario():
        async with checking(checked, checked_config(ports[:1], address=REMOTE)) as (sync, lock):
            # the apply's own is done; that of the checks' states of its new server is not
            applies = Applies(checked, failing=1, done=1)
            reply = await exchange(checked, request, sync.sync_targets, lock)
            await until(lambda: applies.n > 2, "the retry", seconds=5)
            return reply, {s.name for p in checked.config.pools for s in p.servers}

    reply, servers = asyncio.run(scenario())
    assert reply["ok"], reply
    assert reply["result"]["warning"] == (
        "the health checks' states not in the data path: Could not update table: "
        "Cannot allocate memory (tried again)")
    assert servers == {f"s{p}" for p in ports}
    assert checked.applies == {"ok": 1, "error": 0}
    assert checked.health_applies["failed"] == 1


def test_an_apply_that_takes_the_health_states_in_ends_the_lag(checked):
    """A health change's apply fails; a `xlb server disable` meanwhile writes
    the checks' states with its own: the data path no longer lags, and status
    says so at once, not after the next retry (up to a minute later)."""
    key = ("web", f"s{CHECK_PORT}")
    listener = listen(CHECK_PORT)

    async def scenario():
        async with checking(checked, checked_config([CHECK_PORT])) as (sync, lock):
            checker = sync.checker
            await until(lambda: checker.last_check(key), "the first check")
            applies = Applies(checked, failing=1000)     # the change's, and retries
            listener.close()
            await until(lambda: checked.health_applies["failed"], "the failed apply")
            async with lock:                # no retry meanwhile
                applies.failing = applies.n                 # the next one is done
                await asyncio.to_thread(checked.set_admin, "disable", *key)
                return checked.states[key], (await asyncio.to_thread(checked.status))

    try:
        state, st = asyncio.run(scenario())
    finally:
        listener.close()
    assert state == "maint" and st["pools"][0]["servers"][0]["health"] == "down"
    assert st["health_applies"]["failed"] >= 1
    assert (st["health_applies"]["unapplied_since"], st["health_applies"]["error"]) == (None, None)


def freeze(datapath, name: str) -> None:
    """Makes the kernel refuse every write of the control plane to a map
    (BPF_MAP_FREEZE), for as long as the map lives."""
    from xlb import bpfsys

    class MapFd(ctypes.Structure):
        _fields_ = [("map_fd", ctypes.c_uint32)]
    bpfsys._bpf(22, MapFd(datapath._maps[name].map_fd))     # BPF_MAP_FREEZE


def test_a_health_change_the_kernel_refuses_is_counted_and_shown(checked):
    """The kernel refuses the write of a server's health change to the maps:
    the data path still sends it new flows while the checks say down. The
    metrics count the failed applies and say since when the data path lags,
    and status says why, with the state the maps still hold."""
    key = ("web", f"s{CHECK_PORT}")
    listener = listen(CHECK_PORT)

    async def scenario():
        async with checking(checked, checked_config([CHECK_PORT])) as (sync, _):
            checker = sync.checker
            await until(lambda: checker.last_check(key), "the first check")
            freeze(checked.datapath, "backends")
            before = time.time()
            listener.close()

            # status reads links with pyroute2: not in the loop's thread
            async def status():
                return await asyncio.to_thread(checked.status)

            async def failed():
                while not (await status())["health_applies"]["failed"]:
                    await asyncio.sleep(0.01)
            await asyncio.wait_for(failed(), 10)
            return before, await status()     # read whole after the failure

    try:
        before, st = asyncio.run(scenario())
    finally:
        listener.close()
    lag = st["health_applies"]
    assert lag["failed"] >= 1 and lag["unapplied_since"] >= before
    assert lag["error"] == "cannot write backends: Operation not permitted"
    server = st["pools"][0]["servers"][0]
    assert (server["health"], server["state"]) == ("down", "up")
    got = {(s.name, tuple(s.labels.items())): s.value
           for f in text_string_to_metric_families(metrics.render(st, {})) for s in f.samples}
    assert got[("xlb_health_apply_failures_total", ())] == lag["failed"]
    assert got[("xlb_health_unapplied_since_timestamp_seconds", ())] == lag["unapplied_since"]


def test_an_apply_whose_map_write_the_kernel_refuses_changes_nothing(balancer):
    """The kernel refuses a write part way through an apply: what the apply
    wrote before it is written back, so that the maps hold the config the
    balancer says it serves. Left there, a frontend the apply removed was
    no longer served while status still listed it, and every later apply
    that removed it too failed (a delete of a key that is gone)."""
    two = from_flags(["10.1.1.101:80", "10.1.1.102:80"], ["10.1.11.101:8080"])
    balancer.apply(two, relink=False)
    held = balancer.datapath.held()[0]
    # Without 10.1.1.102, with a new frontend on a Maglev pool: its table's
    # write is refused, after the deletes of 10.1.1.102's service and VIP.
    maglev = configfile.load(
        '[servers.backend1]\naddress = "10.1.11.101"\nport = 8080\n'
        '[pools.default]\nservers = ["backend1"]\n'
        '[pools.hashed]\nservers = ["backend1"]\nalgorithm = "maglev"\n'
        '[frontends.vip1]\nvip = "10.1.1.101"\nport = 80\npool = "default"\n'
        '[frontends.vip3]\nvip = "10.1.1.103"\nport = 80\npool = "hashed"\n')
    freeze(balancer.datapath, "maglev")
    with pytest.raises(Exception, match="Operation not permitted"):
        balancer.apply(maglev, relink=False)
    now = balancer.datapath.held()[0]
    assert (now.services, now.vips) == (held.services, held.vips)
    assert balancer.config is two
    one = from_flags(["10.1.1.101:80"], ["10.1.11.101:8080"])
    balancer.apply(one, relink=False)
    assert balancer.datapath.held()[0].vips == {IPv4Address("10.1.1.101")}



def _pools(ports: dict[str, int], frontends: str) -> Config:
    """150 servers a pool, at 10.2.<pool number>.<1-150> and the pool's port."""
    text = []
    for p, (pool, port) in enumerate(ports.items()):
        names = [f"{pool}-{i}" for i in range(150)]
        text += [f'[servers."{n}"]\naddress = "10.2.{p}.{i + 1}"\nport = {port}\n'
                 for i, n in enumerate(names)]
        text.append(f"[pools.{pool}]\nservers = {json.dumps(names)}\n")
    return configfile.load("".join(text) + frontends)


def test_an_apply_writes_each_servers_entries_as_its_plan_says(balancer):
    """An apply writes the backend and owner entries of its servers in batches
    (planner.execute): each holds what its op said, at its op's key, and the
    address filter has every server's bit; so after a change that closes some
    (removed, drained) and writes others (a pool's servers on another port)."""
    dp = balancer.datapath

    def check():
        state = balancer.state
        held, entries = dp.held()
        assert entries == {**{i: BackendState(i, a, p, True)
                              for i, (a, p) in state.retired_backends.items()},
                           **{b.id: b for b in state.backends.values()}}
        assert held.owners == state.owners
        bits = set()
        for addr, port in state.endpoints().values():
            value = int.from_bytes(addr.packed, "little") + (socket.htons(port) << 16)
            bits.add(filter_slot(value & 0xffffffff))
        words = dp._config().backend_bits
        assert {i for i in range(64 * len(words)) if words[i // 64] >> (i % 64) & 1} == bits
    frontends = ('[frontends.a]\nvip = "10.1.1.101"\nport = 80\npool = "a"\n'
                 '[frontends.b]\nvip = "10.1.1.102"\nport = 80\npool = "b"\n'
                 '[frontends.dns]\nvip = "10.1.1.101"\nport = 53\nprotocol = "udp"\n'
                 'pool = "a"\n')
    balancer.apply(_pools({"a": 8080, "b": 8081, "c": 8082}, frontends
                          + '[frontends.c]\nvip = "10.1.1.103"\nport = 80\npool = "c"\n'),
                   relink=False)
    assert len(balancer.state.backends) == 450 and len(balancer.state.owners) == 600
    check()
    balancer.apply(_pools({"a": 8080, "b": 9090}, frontends), relink=False)
    balancer.set_admin("drain", "a", "a-7")
    assert balancer.state.backends[("a", "a-7")].closed
    assert len(balancer.state.retired_backends) == 301
    check()



def test_a_batch_of_owners_holds_each_server_s_own_services(root):
    """set_owners makes one value for the servers that share their services:
    each entry holds its own, protocol too, not another's made before it."""
    dp = Datapath()
    try:
        a, b = (IPv4Address("10.1.1.101"), 80), (IPv4Address("10.1.1.102"), 443)
        dp.set_owners([(IPv4Address("10.9.0.1"), 8080, 6, [a]),
                       (IPv4Address("10.9.0.2"), 8080, 6, [a, b]),
                       (IPv4Address("10.9.0.3"), 8080, 17, [a]),
                       (IPv4Address("10.9.0.4"), 8080, 6, (a,))])
        held = {(str(IPv4Address(k.addr.to_bytes(4, "little"))), k.proto):
                [(str(IPv4Address(s.vip.to_bytes(4, "little"))), socket.ntohs(s.port), s.proto)
                 for s in v.services if s.port]
                for k, v in dp._maps["owners"].items()}
        assert held == {("10.9.0.1", 6): [("10.1.1.101", 80, 6)],
                        ("10.9.0.2", 6): [("10.1.1.101", 80, 6), ("10.1.1.102", 443, 6)],
                        ("10.9.0.3", 17): [("10.1.1.101", 80, 17)],
                        ("10.9.0.4", 6): [("10.1.1.101", 80, 6)]}
    finally:
        dp.close()


def test_an_apply_whose_batch_the_kernel_refuses_part_way_changes_nothing(root, fibnet):
    """The kernel writes a batch entry by entry and stops at the first it
    refuses (here: a full owners map): those before it are written, as a
    series of single writes stopped there would have left them, and the
    apply writes them back as it does any write before a refused one."""
    dp = Datapath(Limits(max_backends=4))       # owners: room for 8
    try:
        b = Balancer(dp)
        one = from_flags(["10.1.1.101:80"], ["10.1.11.101:8080"])
        b.apply(one, relink=False)
        vip = [(IPv4Address("10.1.1.101"), 80)]
        others = [(IPv4Address(f"10.9.0.{i}"), 80, 6, vip) for i in range(5)]
        dp.set_owners(others)                   # room left for 2
        three = [(IPv4Address(f"10.1.11.{i}"), 8080, 6, vip) for i in (102, 103, 104)]
        with pytest.raises(DatapathError, match="^cannot write owners: Argument list too long"):
            dp.set_owners(three)
        assert dp.held()[0].owners.keys() >= {(a, p, 6) for a, p, _, _ in three[:2]}
        assert (three[2][0], 8080, 6) not in dp.held()[0].owners
        for addr, port, proto, _ in three[:2]:
            dp.del_owner(addr, port, proto)

        held = dp.held()[0]
        four = from_flags(["10.1.1.101:80"], [f"10.1.11.{i}:8080" for i in range(101, 105)])
        with pytest.raises(DatapathError, match="^cannot write owners"):
            b.apply(four, relink=False)
        now = dp.held()[0]
        assert (now.services, now.vips, now.owners) == (held.services, held.vips, held.owners)
        assert b.config is one
        for addr, port, proto, _ in others:
            dp.del_owner(addr, port, proto)
        b.apply(four, relink=False)
        assert dp.held()[0].owners == b.state.owners and len(b.state.owners) == 4
    finally:
        dp.close()


def test_owners_deleted_in_a_batch_step_over_those_not_there(root, fibnet):
    """del_owners deletes each endpoint given in one batch, which the kernel
    stops at the first key not there: those after it are deleted too, as a
    series of single deletes would have (an apply's undo deletes what a
    refused write had not written yet), and none there is no error."""
    dp = Datapath()
    try:
        vip = [(IPv4Address("10.1.1.101"), 80)]
        there = [(IPv4Address(f"10.1.11.{i}"), 8080, 6) for i in (101, 103, 105)]
        dp.set_owners([(*e, vip) for e in there])
        gone = [(IPv4Address(f"10.1.11.{i}"), 8080, 6) for i in (102, 104)]
        dp.del_owners([there[0], gone[0], there[1], gone[1], there[2]])
        assert dp.held()[0].owners == {}
        dp.del_owners(gone)
    finally:
        dp.close()


def test_an_apply_refused_after_it_deleted_owners_changes_nothing(root, fibnet):
    """An apply that deletes servers' owner entries (one batch) and is refused
    a write after (here: the owners map full, the third of three new servers)
    is undone: the deleted are written back, and the written deleted, the
    batch stepping over the one never written (sorted before the last
    written), or the map held a server of neither config."""
    dp = Datapath(Limits(max_backends=8))       # owners: room for 16
    try:
        b = Balancer(dp)
        old = from_flags(["10.1.1.101:80"], ["10.1.11.105:8080", "10.1.11.106:8080"])
        b.apply(old, relink=False)
        vip = [(IPv4Address("10.1.1.101"), 80)]
        dp.set_owners([(IPv4Address(f"10.9.0.{i}"), 80, 6, vip) for i in range(14)])   # full
        held = dp.held()[0]
        new = from_flags(["10.1.1.101:80"], [f"10.1.11.{i}:8080" for i in (104, 102, 103)])
        with pytest.raises(DatapathError, match="^cannot write owners: Argument list too long"):
            b.apply(new, relink=False)
        now = dp.held()[0]
        assert (now.services, now.vips, now.owners) == (held.services, held.vips, held.owners)
        assert b.config is old
    finally:
        dp.close()


def test_status_tells_an_unchecked_server_from_one_whose_first_check_is_to_come(checked):
    """`not checked` is for a server that no monitor checks (none, or one of
    type `none`); a checked server before its first check (the checks are
    spread over the interval) is `first check pending`, which the demo's
    status showed as `not checked` too."""
    from xlb.units import last_check

    config = configfile.load(configfile.dump(checked_config([9, 10, 11], interval=30))
                             + '[monitors.off]\ntype = "none"\n')
    config = configfile.load(configfile.dump(config).replace(
        '[servers.s11]\n', '[servers.s11]\nmonitor = "off"\n'))

    def shown(config):
        checked.apply(config, relink=False)
        return {s["name"]: (s["monitor"], last_check(s))
                for s in checked.status()["pools"][0]["servers"]}
    assert shown(config) == {"s9": ("m", "first check pending"),
                             "s10": ("m", "first check pending"),
                             "s11": (None, "not checked")}
    unchecked = configfile.load(configfile.dump(config).replace('monitor = "m"\n', ""))
    assert shown(unchecked) == dict.fromkeys(["s9", "s10", "s11"], (None, "not checked"))
