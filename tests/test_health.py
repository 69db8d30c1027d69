"""The health checker against real servers and real sockets.

Everything runs on one worker thread that unshare(2)s a fresh network namespace
of its own (namespaces are per thread in Linux), brings its `lo` up and runs an
asyncio loop with both the test servers and the checker; the rest of the
process, and the host, never see a packet. Needs root; intervals are short
(0.2 s) so the file takes a few seconds; every wait is bounded.

The tests assert what happened and in which order (which checks, how many,
which transitions, with which reasons), never how long it took: the promised
`fall * interval + timeout` is a speed figure, measured by netns-lab/bench_health.py.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import functools
import os
import re
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import replace
from ipaddress import IPv4Address

import pytest

from xlb import health
from xlb.health import HealthChecker, Target, Transition
from xlb.model import Monitor, Server

import waiting

CLONE_NEWNET = 0x40000000
LOCAL = IPv4Address("127.0.0.1")
INTERVAL, TIMEOUT = 0.2, 0.15
PATIENCE = 3.0                  # a deadline for what takes an interval or two: only a
                                # broken checker misses it, however busy the machine


def tcp_monitor(**kw) -> Monitor:
    kw = {"interval": INTERVAL, "timeout": TIMEOUT, "rise": 2, "fall": 2, **kw}
    return Monitor("m", "tcp", **kw)


def http_monitor(type: str = "http", **kw) -> Monitor:
    kw = {"interval": INTERVAL, "timeout": TIMEOUT, "rise": 2, "fall": 2, **kw}
    return Monitor("h", type, **kw)


NTP_REQUEST = "1b" + "00" * 47          # an NTP v3 client request (mode 3)


def udp_monitor(**kw) -> Monitor:
    kw = {"interval": INTERVAL, "timeout": TIMEOUT, "rise": 2, "fall": 2,
          "send_hex": NTP_REQUEST, **kw}
    return Monitor("u", "udp", **kw)


# -- the namespace thread ------------------------------------------------------

def _lo_up() -> None:
    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH14x", b"lo", 0))
        flags = struct.unpack("16sH14x", ifr)[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


class NetnsLoop:
    """A thread in a network namespace of its own, running an asyncio loop."""

    def __init__(self):
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._main, name="netns-loop", daemon=True)
        self.thread.start()
        if not self._ready.wait(5) or self.error is not None:
            raise RuntimeError(f"namespace thread failed: {self.error!r}")

    def _main(self) -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
            if os.readlink("/proc/thread-self/ns/net") == os.readlink("/proc/self/ns/net"):
                raise RuntimeError("still in the process's network namespace")
            _lo_up()
            self.loop = asyncio.new_event_loop()
        except BaseException as e:
            self.error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def run(self, coro, timeout: float = 10.0):
        """Run `coro` on the namespace's loop; its sockets are the namespace's."""
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise

    def close(self) -> None:
        async def cancel_all():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run(cancel_all(), 5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


@pytest.fixture(scope="module")
def netns():
    if os.geteuid() != 0:
        pytest.skip("needs root: the tests run in a network namespace of their own")
    ns = NetnsLoop()
    try:
        yield ns
    finally:
        ns.close()


# -- helpers that run on the namespace's loop ------------------------------------

until = functools.partial(waiting.until, seconds=PATIENCE)


class Listener:
    """An asyncio server on 127.0.0.1:port whose connections are counted; with
    `tls`, a TLS server (its connections counted once their handshake is done)."""

    def __init__(self, port: int, handle=None, tls: ssl.SSLContext | None = None):
        self.port, self.tls = port, tls
        self.connections: list[float] = []
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._handle = handle
        self._tasks: set[asyncio.Task] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> Listener:
        self.server = await asyncio.start_server(self._on_conn, str(LOCAL), self.port,
                                                 reuse_address=True, ssl=self.tls)
        return self

    async def _on_conn(self, reader, writer) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self.connections.append(time.monotonic())
        try:
            if self._handle is not None:
                await self._handle(self, reader, writer)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def stop_listening(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    async def close(self) -> None:
        await self.stop_listening()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class HttpBehaviour:
    def __init__(self, status=200, body=b"all good", hang=False, delay=0.0, hosts=None,
                 statuses=None):
        self.status, self.body, self.hang, self.delay = status, body, hang, delay
        self.hosts = hosts or {}        # path -> the Host header it must carry
        self.statuses = statuses or {}  # path -> its status, if not `status`
        self.on_request = None          # f(path), if set: called as each request comes

    async def __call__(self, srv: Listener, reader, writer) -> None:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        line, *fields = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (f.partition(":") for f in fields if f)}
        srv.requests.append((line, headers))
        path = line.split()[1]
        if self.on_request is not None:
            self.on_request(path)
        if self.hang:
            await asyncio.sleep(5)      # cancelled by Listener.close long before
            return
        if self.delay:
            await asyncio.sleep(self.delay)
        status, body = self.statuses.get(path, self.status), self.body
        want = self.hosts.get(path)
        if want is not None and headers.get("host") != want:
            status, body = 400, f"bad host {headers.get('host')!r}".encode()
        writer.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                     % (status, len(body), body))
        await writer.drain()


class UdpServer:
    """A UDP socket on 127.0.0.1:port, read on the loop, that answers each
    datagram with answer(data) (None: none), sent from the UdpServer `source`
    (default: itself). A socket, not an asyncio transport: that sends no
    empty datagram."""

    def __init__(self, port: int, answer=lambda data: data, source: UdpServer | None = None):
        self.port, self.answer, self.source = port, answer, source
        self.requests: list[bytes] = []
        self.sock: socket.socket | None = None

    async def start(self) -> UdpServer:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.bind((str(LOCAL), self.port))
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._on_datagram)
        return self

    def _on_datagram(self) -> None:
        data, addr = self.sock.recvfrom(65535)
        self.requests.append(data)
        self.addr = addr
        reply = self.answer(data)
        if reply is not None:
            (self.source or self).sock.sendto(reply, addr)

    def close(self) -> None:
        if self.sock is not None:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None


@asynccontextmanager
async def serving(*servers: UdpServer):
    """The servers started, and closed at the end."""
    try:
        for srv in servers:
            await srv.start()
        yield servers
    finally:
        for srv in servers:
            srv.close()


class Recorder:
    """Every check (on_check) and transition (on_change) of one HealthChecker, in
    the order reported. A check's on_check comes just before the on_change it
    causes, so the event before a transition is the check that decided it."""

    def __init__(self):
        self.hc: HealthChecker | None = None
        # (key, (ok, reason, duration)) for a check, (key, Transition) for a change
        self.events: list[tuple[tuple[str, str], tuple[bool, str, float] | Transition]] = []
        self.transitions: list[Transition] = []
        self.after_check = None         # f(key, ok), if set: called after each check is recorded

    def on_check(self, key, ok: bool, duration: float) -> None:
        try:
            reason = self.hc.last_check(key)[1]
        except KeyError:                # a removed target's check: recorded all the same
            reason = None
        self.events.append((key, (ok, reason, duration)))
        if self.after_check is not None:
            self.after_check(key, ok)

    def on_change(self, tr: Transition) -> None:
        self.events.append((tr.key, tr))
        self.transitions.append(tr)

    def mark(self) -> int:
        """A point in the events: the `since` of later queries."""
        return len(self.events)

    def checks(self, key, since: int = 0) -> list[tuple[bool, str, float]]:
        return [e for k, e in self.events[since:] if k == key and not isinstance(e, Transition)]

    def of(self, key) -> list[Transition]:
        return [tr for tr in self.transitions if tr.key == key]

    def story(self, key, since: int = 0, through: str | None = None) -> list[str]:
        """key's events from `since` on: "pass"/"fail" per check, "up"/"down" per
        transition; with `through`, only up to the first transition to it."""
        s = [e.new if isinstance(e, Transition) else ("pass" if e[0] else "fail")
             for k, e in self.events[since:] if k == key]
        return s[:s.index(through) + 1] if through is not None else s

    def decided_by(self, tr: Transition) -> tuple[bool, str, float]:
        """The check reported just before `tr`."""
        i = next(i for i, (_, e) in enumerate(self.events) if e is tr)
        key, check = self.events[i - 1]
        assert key == tr.key and not isinstance(check, Transition), self.events[i - 1]
        return check


def assert_decided(rec: Recorder, tr: Transition) -> None:
    """tr carries the outcome, reason and duration of the check that caused it."""
    ok, reason, duration = rec.decided_by(tr)
    assert (ok, reason, duration) == (tr.new == "up", tr.reason, tr.duration)


@asynccontextmanager
async def checker(targets, rec: Recorder | None = None):
    """A running HealthChecker; yields it and the Recorder of what it reports."""
    rec = rec or Recorder()
    hc = rec.hc = HealthChecker(rec.on_change, rec.on_check)
    hc.set_targets(targets)
    task = asyncio.create_task(hc.run())
    try:
        yield hc, rec
    finally:
        hc.stop()
        await asyncio.wait_for(task, 2)


async def all_pass(srv: Listener, targets) -> None:
    """Every check passes until each target has had two, none changes state; closes srv."""
    async with checker(targets) as (hc, rec):
        await until(lambda: all(len(rec.checks(t.key)) >= 2 for t in targets),
                    "two checks each")
        assert {(ok, reason) for t in targets for ok, reason, _ in rec.checks(t.key)} \
            == {(True, "check passed")}
        assert rec.transitions == []
    await srv.close()


# -- tests -----------------------------------------------------------------------

@pytest.mark.netns
def test_tcp_down_at_fall_failures_up_at_rise_successes(netns):
    async def main():
        m = tcp_monitor(rise=3, fall=2)
        key = ("web", "a")
        srv = await Listener(8001).start()
        async with checker([Target(key, LOCAL, 8001, m)]) as (hc, rec):
            await until(lambda: rec.checks(key), "the first check")
            assert rec.checks(key)[0][:2] == (True, "check passed")
            assert hc.state(key) == "up" and hc.states() == {key: "up"}
            assert rec.transitions == []        # a passing first check: no transition

            await srv.stop_listening()
            died = rec.mark()
            await until(lambda: rec.of(key), "down")
            (tr,) = rec.of(key)
            assert (tr.old, tr.new, tr.reason) == ("up", "down", "connect: connection refused")
            assert hc.state(key) == "down"
            assert_decided(rec, tr)
            # Down with the fall-th failure in a row, not one sooner or later (a
            # check in flight when the server died may still have passed).
            down = ["fail"] * m.fall + ["down"]
            assert rec.story(key, died, through="down") in (down, ["pass"] + down)
            assert {r for ok, r, _ in rec.checks(key, died) if not ok} == \
                {"connect: connection refused"}

            back = rec.mark()
            await srv.start()
            await until(lambda: len(rec.of(key)) == 2, "up")
            up = rec.of(key)[1]
            assert (up.old, up.new, up.reason) == ("down", "up", "check passed")
            assert_decided(rec, up)
            # Up with the rise-th success in a row: not at the 2nd (rise 3), not later
            # (checks before the server listened again may have failed).
            s = rec.story(key, back, through="up")
            assert s[s.index("pass"):] == ["pass"] * m.rise + ["up"], s
        await srv.close()

    netns.run(main())


@pytest.mark.netns
def test_failures_with_passes_between_them_take_no_server_down(netns):
    """fall failures in a row take a server down: a pass between two starts
    the count again. The server fails every other check."""
    async def main():
        behaviour, asked = HttpBehaviour(), []

        def every_other(path):
            asked.append(path)
            behaviour.status = 200 if len(asked) % 2 else 503
        behaviour.on_request = every_other
        srv = await Listener(8040, behaviour).start()
        key = ("web", "a")
        # A timeout of a whole interval: no check of a busy machine fails by its own slowness.
        m = http_monitor(interval=0.5, timeout=0.5, fall=2)
        async with checker([Target(key, LOCAL, 8040, m)]) as (hc, rec):
            await until(lambda: len(rec.checks(key)) >= 6, "six checks", seconds=PATIENCE + 3)
            assert rec.story(key)[:6] == ["pass", "fail"] * 3
            assert rec.of(key) == []
        await srv.close()

    netns.run(main())


@pytest.mark.netns
def test_marked_down_at_once_and_back_by_rise_checks(netns):
    """mark_down (the link toward the server went): down with no check failed,
    the reason told and shown as its last check's; one already down and one
    not checked (type none) change nothing. Its server answering all along,
    it comes back with rise passing checks, no sooner."""
    async def main():
        m = tcp_monitor(rise=3, fall=2)
        key, down, unchecked = ("web", "a"), ("web", "b"), ("web", "c")
        srv = await Listener(8011).start()
        targets = [Target(key, LOCAL, 8011, m), Target(down, LOCAL, 8012, m),
                   Target(unchecked, LOCAL, 8011, Monitor("n", "none"))]
        async with checker(targets) as (hc, rec):
            await until(lambda: rec.checks(key) and rec.of(down), "the first checks")
            assert rec.checks(key)[-1][:2] == (True, "check passed")
            cut = rec.mark()
            hc.mark_down([key, down, unchecked, ("web", "gone")], "link eth1 lost its carrier")
            assert [(tr.key, tr.old, tr.new, tr.reason) for tr in rec.transitions[1:]] == \
                [(key, "up", "down", "link eth1 lost its carrier")]
            assert hc.states() == {key: "down", down: "down", unchecked: "up"}
            assert hc.last_check(key)[:2] == (False, "link eth1 lost its carrier")
            assert hc.last_check(unchecked) is None
            await until(lambda: len(rec.of(key)) == 2, "up again")
            assert rec.story(key, cut) == ["down"] + ["pass"] * m.rise + ["up"]
        await srv.close()

    netns.run(main())


@pytest.mark.netns
def test_a_check_in_flight_as_check_now_comes_is_dropped_for_one_at_once(netns):
    """check_now (the server's link is back) while a check begun while it was
    away is in flight (mark_down dropped those from before): that one, whose
    packets the link lost, is dropped and counts nothing, and a new one starts
    at once; it went on until its timeout, up to `timeout` after the link."""
    async def main():
        answered = []

        class FirstHangs(HttpBehaviour):
            async def __call__(self, srv, reader, writer):
                self.hang = not answered
                answered.append(True)
                await super().__call__(srv, reader, writer)

        srv = await Listener(8013, FirstHangs()).start()
        # A first check left to go on would end past PATIENCE: the server holds it
        # 5 s (HttpBehaviour.hang), its timeout is 60 s.
        m = http_monitor(interval=600.0, timeout=60.0, rise=1)
        key = ("web", "a")
        async with checker([Target(key, LOCAL, 8013, m)]) as (hc, rec):
            await asyncio.sleep(0)              # run() begins
            hc.mark_down([key], "link eth1 lost its carrier")
            hc.check_now([key])                 # before its turn: in [0, 600) s
            await until(lambda: srv.requests, "the first check in flight")
            hc.check_now([key])
            await until(lambda: hc.state(key) == "up", "up by a second check")
            assert [c[:2] for c in rec.checks(key)] == [(True, "check passed")]
            assert rec.story(key) == ["down", "pass", "up"]
            assert len(srv.requests) == 2
        await srv.close()

    netns.run(main())


@pytest.mark.netns
def test_checks_put_forward_and_targets_removed_leave_no_heap_items_piling_up(netns):
    """A check put forward (check_now: a link back, a link that flaps) leaves
    the one it replaces in the heap until its time, as a removed target does
    its next check, its entry with it: with an interval of an hour, one more
    each time for an hour. They are swept; the heap stays within a bound of
    the targets it checks."""
    async def main():
        m = tcp_monitor(interval=3600.0)
        key = ("web", "a")
        srv = await Listener(8014).start()
        async with checker([Target(key, LOCAL, 8014, m)]) as (hc, rec):
            await asyncio.sleep(0)              # run() begins: its first check is within the hour
            for _ in range(300):
                n = len(rec.checks(key))
                hc.check_now([key])
                await until(lambda: len(rec.checks(key)) > n, "the check put forward")
            for i in range(300):
                hc.set_targets([Target(key, LOCAL, 8014, m), Target(("web", f"b{i}"), LOCAL, 8014, m)])
            assert len(hc.states()) == 2
            # Two live items a target at most, twice over, and the sweep's
            # slack (64); without the sweep, some 900 (300 + 300 + the timeouts).
            assert len(hc._heap) <= 4 * 2 + 64, len(hc._heap)
        await srv.close()

    netns.run(main())


@pytest.mark.netns
def test_first_check_failing_marks_down_at_once(netns):
    async def main():
        m = tcp_monitor(fall=3)
        key = ("web", "nothing")
        async with checker([Target(key, LOCAL, 8002, m)]) as (hc, rec):
            assert hc.state(key) == "up" and hc.last_check(key) is None   # provisional
            await until(lambda: rec.transitions, "down")
            (tr,) = rec.of(key)                 # no "up" before it
            assert (tr.old, tr.new, tr.reason) == ("up", "down", "connect: connection refused")
            assert_decided(rec, tr)
            # The transition comes with the first failed check (fall 3 not waited
            # for); the failures after it change nothing.
            await until(lambda: len(rec.checks(key)) >= 3, "two more checks")
            assert rec.story(key)[:4] == ["fail", "down", "fail", "fail"]
            assert len(rec.of(key)) == 1 and hc.state(key) == "down"

    netns.run(main())


@pytest.mark.netns
def test_initial_down_is_decided_by_the_first_check(netns):
    """A control plane that takes over servers it finds down starts them down;
    the first passing check brings one up at once (rise is not waited for)."""
    async def main():
        m = tcp_monitor(rise=3)
        alive, dead = ("web", "alive"), ("web", "dead")
        srv = await Listener(8003).start()
        rec = Recorder()
        hc = rec.hc = HealthChecker(rec.on_change, rec.on_check)
        hc.set_targets([Target(alive, LOCAL, 8003, m), Target(dead, LOCAL, 8004, m)],
                       initial={alive: "down", dead: "down"})
        assert hc.states() == {alive: "down", dead: "down"}
        task = asyncio.create_task(hc.run())
        try:
            await until(lambda: rec.of(alive), "up")
            (tr,) = rec.of(alive)
            assert (tr.old, tr.new, tr.reason) == ("down", "up", "check passed")
            assert rec.story(alive)[:2] == ["pass", "up"]
            await until(lambda: hc.last_check(dead), "checked")
            assert hc.state(dead) == "down" and rec.of(dead) == []
        finally:
            hc.stop()
            await asyncio.wait_for(task, 2)
        await srv.close()

    netns.run(main())


@pytest.mark.netns
def test_http_status_body_and_host(netns):
    async def main():
        behaviour = HttpBehaviour(hosts={"/a": "svc.example", "/b": "127.0.0.1:8003"})
        srv = await Listener(8003, behaviour).start()
        ma = http_monitor(path="/a", host="svc.example", expect_body="good", rise=1)
        mb = http_monitor(path="/b")     # Host: the address and port, as curl writes it
        ka, kb = ("api", "a"), ("api", "b")
        targets = [Target(ka, LOCAL, 8003, ma), Target(kb, LOCAL, 8003, mb)]
        async with checker(targets) as (hc, rec):
            await until(lambda: hc.last_check(ka) and hc.last_check(kb), "the first checks")
            assert hc.last_check(ka)[:2] == (True, "check passed"), hc.last_check(ka)
            assert hc.last_check(kb)[:2] == (True, "check passed"), hc.last_check(kb)
            assert rec.transitions == []
            line, headers = next(r for r in srv.requests if r[0].startswith("GET /a "))
            assert line == "GET /a HTTP/1.1"
            assert headers["host"] == "svc.example"
            assert headers["connection"] == "close"
            assert headers["user-agent"] == "xlb-health"
            assert next(h for ln, h in srv.requests if ln.startswith("GET /b "))["host"] \
                == "127.0.0.1:8003"

            behaviour.status = 500                       # the TCP port stays open
            changed = rec.mark()
            await until(lambda: len(rec.of(ka)) == 1 and len(rec.of(kb)) == 1, "both down")
            for key, m in ((ka, ma), (kb, mb)):
                (tr,) = rec.of(key)
                assert (tr.old, tr.new) == ("up", "down")
                assert tr.reason == "http status 500, expected 2xx or 3xx"
                assert_decided(rec, tr)
                down = ["fail"] * m.fall + ["down"]      # (an answer in flight may pass)
                assert rec.story(key, changed, through="down") in (down, ["pass"] + down)

            behaviour.status = 200
            fixed = rec.mark()
            await until(lambda: len(rec.of(ka)) == 2, "a up")
            assert rec.of(ka)[1].new == "up"
            s = rec.story(ka, fixed, through="up")
            assert s[s.index("pass"):] == ["pass", "up"], s    # rise 1: the first pass

            behaviour.body = b"not what you want"
            bad = rec.mark()
            await until(lambda: len(rec.of(ka)) == 3, "a down")
            tr = rec.of(ka)[2]
            assert (tr.old, tr.new, tr.reason) == ("up", "down", "body lacks 'good'")
            s = rec.story(ka, bad, through="down")
            assert s[s.index("fail"):] == ["fail"] * ma.fall + ["down"], s
            await until(lambda: len(rec.of(kb)) == 2, "b up")
            s = rec.story(kb, fixed, through="up")
            assert s[s.index("pass"):] == ["pass"] * mb.rise + ["up"], s
            # b does not look at the body: its checks since the body changed pass.
            await until(lambda: len(rec.checks(kb, bad)) >= 2, "b checked twice more")
            assert all(ok for ok, _, _ in rec.checks(kb, bad)) and hc.state(kb) == "up"
        await srv.close()

    netns.run(main())


@pytest.mark.netns
def test_http_answer_with_bare_lf_lines(netns):
    """Lines ended by LF alone, as small servers (a shell script behind nc,
    firmware) send them and RFC 9112 lets a recipient accept: read as CRLF
    ones, as HAProxy does."""
    async def main():
        async def bare_lf(srv, reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.0 200 OK\nContent-Type: text/plain\nContent-Length: 9\n\n"
                         b"all good\n")
            await writer.drain()

        srv = await Listener(8011, bare_lf).start()
        await all_pass(srv, [Target(("api", "plain"), LOCAL, 8011, http_monitor()),
                             Target(("api", "body"), LOCAL, 8011,
                                    http_monitor(expect_body="all good"))])

    netns.run(main())


@pytest.mark.netns
def test_http_answer_cut_off_in_its_headers_is_down(netns):
    """A 200 status line and no end of the headers, the connection then closed
    or left hanging (a server that dies or stalls mid-answer): no complete
    response, so down, as HAProxy's check has it ("invalid response")."""
    async def main():
        async def status_line_only(srv, reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/pl")
            await writer.drain()
            if srv.port == 8021:
                await asyncio.sleep(5)      # cancelled by Listener.close long before

        closed_srv = await Listener(8020, status_line_only).start()
        hung_srv = await Listener(8021, status_line_only).start()
        closed, hung = ("api", "closed"), ("api", "hung")
        targets = [Target(closed, LOCAL, 8020, http_monitor()),
                   Target(hung, LOCAL, 8021, http_monitor())]
        async with checker(targets) as (hc, rec):
            await until(lambda: rec.of(closed) and rec.of(hung), "both down")
            assert rec.of(closed)[0].reason == "http: connection closed inside the headers"
            assert rec.of(hung)[0].reason == f"timeout after {TIMEOUT}s (waiting for the response)"
            assert not any(ok for ok, _, _ in rec.checks(closed) + rec.checks(hung))
        await closed_srv.close()
        await hung_srv.close()

    netns.run(main())


@pytest.mark.netns
def test_http_chunked_body_read_by_its_framing(netns):
    """A chunked body is whole at its last (zero-size) chunk, not when what has
    come so far ends in "0\\r\\n\\r\\n": a line "queue: 0\\r\\n" sent as a chunk of
    its own ends so; the body's next chunk still counts. Chunk lines ended by
    LF alone are read as the status line and headers are."""
    async def main():
        async def chunked(srv, reader, writer):
            head = await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            if head.startswith(b"GET /lines "):
                writer.write(b"a\r\nqueue: 0\r\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.05)   # flushed: its own segment, read on its own
                writer.write(b"c\r\nstatus: ok\r\n\r\n0\r\n\r\n")
            else:
                writer.write(b"a\nqueue: 0\r\n\nc\nstatus: ok\r\n\n0\n\n")
            await writer.drain()

        srv = await Listener(8022, chunked).start()
        m = {"interval": 0.5, "timeout": 0.4, "expect_body": "status: ok"}
        await all_pass(srv, [Target(("api", "lines"), LOCAL, 8022,
                                    http_monitor(path="/lines", **m)),
                             Target(("api", "lf"), LOCAL, 8022, http_monitor(path="/lf", **m))])

    netns.run(main())


@pytest.mark.netns
def test_http_interim_responses_before_the_final_one(netns):
    """A 103 Early Hints (or 100 Continue) before the answer: the answer
    decides, as RFC 9110 has a client take them."""
    async def main():
        async def hints(srv, reader, writer):
            head = await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.02)
            status = 503 if head.startswith(b"GET /busy ") else 200
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n"
                         b"HTTP/1.1 %d X\r\nContent-Length: 8\r\n\r\nall good" % status)
            await writer.drain()

        srv = await Listener(8023, hints).start()
        good, busy = ("api", "good"), ("api", "busy")
        targets = [Target(good, LOCAL, 8023, http_monitor(expect_body="all good")),
                   Target(busy, LOCAL, 8023, http_monitor(path="/busy"))]
        async with checker(targets) as (hc, rec):
            await until(lambda: len(rec.checks(good)) >= 2 and rec.of(busy), "checked, down")
            assert {(ok, reason) for ok, reason, _ in rec.checks(good)} == \
                {(True, "check passed")}
            assert rec.of(busy)[0].reason == "http status 503, expected 2xx or 3xx"
            assert rec.of(good) == []
        await srv.close()

    netns.run(main())


@pytest.mark.netns
def test_http_server_that_never_answers_times_out(netns):
    async def main():
        srv = await Listener(8004, HttpBehaviour(hang=True)).start()
        m = http_monitor()
        key = ("api", "mute")
        async with checker([Target(key, LOCAL, 8004, m)]) as (hc, rec):
            await until(lambda: rec.transitions, "down")
            (tr,) = rec.of(key)
            assert (tr.old, tr.new) == ("up", "down")
            assert tr.reason == f"timeout after {TIMEOUT}s (waiting for the response)"
            assert tr.duration >= TIMEOUT - 1e-6     # never early (1e-6: float rounding)
            assert srv.requests and srv.requests[0][0] == "GET / HTTP/1.1"   # it was asked
        await srv.close()

    netns.run(main())


@pytest.mark.netns
def test_http_body_without_the_expected_text_left_open_times_out_saying_so(netns):
    """A whole head, then a body that lacks `expect_body` and never ends (no
    length, no chunks, the connection kept open): the timeout says the body
    was being read, not that the server had not answered, which sends the
    operator after a hung server that answers at once."""
    async def main():
        async def open_ended(srv, reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n\r\nstarting")
            await writer.drain()
            await asyncio.sleep(5)          # cancelled by Listener.close long before

        srv = await Listener(8025, open_ended).start()
        key = ("api", "open")
        async with checker([Target(key, LOCAL, 8025, http_monitor(expect_body="ready"))]) \
                as (hc, rec):
            await until(lambda: rec.transitions, "down")
            (tr,) = rec.of(key)
            assert tr.reason == \
                f"timeout after {TIMEOUT}s (reading the body, no 'ready' in it so far)"
        await srv.close()

    netns.run(main())


def tls_server(pem, names: list | None = None) -> ssl.SSLContext:
    """A TLS server context with the self-signed `pem`; `names` hears each
    client's server name (SNI: None if it sent none)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pem)
    if names is not None:
        context.sni_callback = lambda sslobj, name, ctx: names.append(name)
    return context


@pytest.mark.netns
def test_https_status_body_host_and_server_name(netns, tls_pem):
    """The http check over TLS, against a server of a self-signed certificate
    (not verified): the same request, statuses and body, the same reasons;
    the server name (SNI) is `host`'s name, none for an address."""
    async def main():
        names = []
        behaviour = HttpBehaviour(hosts={"/a": "svc.example:8443", "/b": "127.0.0.1:8443"})
        srv = await Listener(8443, behaviour, tls_server(tls_pem, names)).start()
        ma = http_monitor("https", path="/a", host="svc.example:8443", expect_body="good")
        mb = http_monitor("https", path="/b")
        ka, kb = ("api", "a"), ("api", "b")
        async with checker([Target(ka, LOCAL, 8443, ma), Target(kb, LOCAL, 8443, mb)]) \
                as (hc, rec):
            await until(lambda: hc.last_check(ka) and hc.last_check(kb), "the first checks")
            assert hc.last_check(ka)[:2] == (True, "check passed"), hc.last_check(ka)
            assert hc.last_check(kb)[:2] == (True, "check passed"), hc.last_check(kb)
            line, headers = next(r for r in srv.requests if r[0].startswith("GET /a "))
            assert (line, headers["user-agent"]) == ("GET /a HTTP/1.1", "xlb-health")
            assert set(names) == {"svc.example", None}

            behaviour.status = 500
            await until(lambda: len(rec.of(ka)) == 1 and len(rec.of(kb)) == 1, "both down")
            assert {tr.reason for tr in rec.transitions} == \
                {"http status 500, expected 2xx or 3xx"}
            behaviour.status, behaviour.body = 200, b"not what you want"
            await until(lambda: len(rec.of(kb)) == 2, "b up")
            await until(lambda: hc.last_check(ka)[0] is False
                        and hc.last_check(ka)[1] != rec.of(ka)[0].reason, "a checked anew")
            assert hc.last_check(ka)[1] == "body lacks 'good'" and hc.state(ka) == "down"
        await srv.close()

    netns.run(main())


def test_https_host_header_and_server_name():
    """https's Host header leaves out its default port, 443, as http's does 80;
    the server name is `host`'s name (no port, no final dot), never an address."""
    def request(mtype, port, **kw):
        return health._Entry(Target(("p", "s"), LOCAL, port, Monitor("m", mtype, **kw)))

    assert b"Host: 127.0.0.1\r\n" in request("https", 443).request
    assert b"Host: 127.0.0.1:443\r\n" in request("http", 443).request
    assert b"Host: 127.0.0.1:80\r\n" in request("https", 80).request
    for host, name in [(None, None), ("svc.example", "svc.example"),
                       ("Svc.Example.:8443", "Svc.Example"), ("10.0.0.1:443", None),
                       ("[::1]:443", None), ("a..b", None)]:
        assert request("https", 443, host=host).sni == name, host
    assert request("http", 80, host="svc.example").sni is None


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((str(LOCAL), port)) == 0


@asynccontextmanager
async def s_server(port: int, pem, *args: str):
    """OpenSSL's own TLS server (-www) on port, with the certificate `pem`
    and s_server's `args`; started from the namespace's thread, it is in the
    test's namespace."""
    proc = await asyncio.create_subprocess_exec(
        "openssl", "s_server", "-quiet", "-www", "-accept", str(port), "-cert", str(pem),
        *args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await until(lambda: listening(port), "openssl s_server")
        yield
    finally:
        proc.terminate()
        await proc.wait()


@pytest.mark.netns
def test_https_tls_failures(netns, tls_pem):
    """A plain-HTTP server on the port (with a status line, or with a page
    alone, as Python's http.server, the lab's, answers the hello), a server
    that closes during the handshake, one that never handshakes and one that
    refuses the handshake (OpenSSL's own server, wanting a client
    certificate) each fail the check with a tls reason (the fourth by the
    timeout, saying where it was)."""
    async def plain_http(srv, reader, writer):
        await reader.read(65536)                # the TLS hello, read as a bad request
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                     b"Connection: close\r\n\r\n")
        writer.write_eof()
        await reader.read()                     # closed only after the client: no RST

    async def page(srv, reader, writer):
        await reader.read(65536)
        writer.write(b'<!DOCTYPE HTML>\n<html lang="en">\n<p>Error code: 400</p>\n</html>\n')
        writer.write_eof()
        await reader.read()

    async def closes(srv, reader, writer):
        await reader.read(65536)
        writer.write_eof()
        await reader.read()

    async def mute(srv, reader, writer):
        await asyncio.sleep(5)                  # cancelled by Listener.close long before

    async def main():
        servers = [await Listener(port, handle).start()
                   for port, handle in ((8030, plain_http), (8034, page), (8031, closes),
                                        (8032, mute))]
        async with s_server(8033, tls_pem, "-tls1_2", "-Verify", "1"):
            keys = [("api", name) for name in ("plain", "page", "closes", "mute", "refuses")]
            targets = [Target(key, LOCAL, port, http_monitor("https"))
                       for key, port in zip(keys, (8030, 8034, 8031, 8032, 8033))]
            async with checker(targets) as (hc, rec):
                await until(lambda: all(rec.of(key) for key in keys), "all down")
                assert [rec.of(key)[0].reason for key in keys] == [
                    "tls: the server answered in plain HTTP, not TLS",
                    "tls: the server answered in plain HTTP, not TLS",
                    "tls: connection closed during the handshake",
                    f"timeout after {TIMEOUT}s (the TLS handshake)",
                    "tls: sslv3 alert handshake failure"]     # OpenSSL's words for its alert
        for srv in servers:
            await srv.close()

    netns.run(main())


@pytest.mark.netns
def test_https_long_chain_tls12_long_chunked_body_and_close_after_the_handshake(netns, tls_pem,
                                                                              tmp_path):
    """A TLS 1.2 server (OpenSSL's) sending a long certificate chain (its
    flight in many reads) passes; so does a chunked body whose expect_body
    comes after 48 KiB of TLS records. A server that closes right after the
    handshake has not answered: the http check's reason, not a TLS one."""
    chain = tmp_path / "chain.pem"
    chain.write_text(tls_pem.read_text().split("-----END PRIVATE KEY-----")[1] * 40)

    async def chunked(srv, reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + (b"10\r\n" + b"x" * 16 + b"\r\n") * 3000
                     + b"5\r\nready\r\n0\r\n\r\n")
        await writer.drain()

    async def closes(srv, reader, writer):
        pass            # Listener closes it, the handshake done

    async def main():
        servers = [await Listener(port, handle, tls_server(tls_pem)).start()
                   for port, handle in ((8035, chunked), (8036, closes))]
        async with s_server(8034, tls_pem, "-cert_chain", str(chain), "-tls1_2"):
            m = {"interval": 0.5, "timeout": 0.4}
            passing = [Target(("api", "chain"), LOCAL, 8034, http_monitor("https", **m)),
                       Target(("api", "chunked"), LOCAL, 8035,
                              http_monitor("https", expect_body="ready", **m))]
            closed = ("api", "closes")
            async with checker([*passing, Target(closed, LOCAL, 8036,
                                                 http_monitor("https", **m))]) as (hc, rec):
                await until(lambda: all(len(rec.checks(t.key)) >= 2 for t in passing)
                            and rec.checks(closed), "two checks each")
                assert {c[:2] for t in passing for c in rec.checks(t.key)} \
                    == {(True, "check passed")}
                assert rec.checks(closed)[0][:2] == \
                    (False, "http: connection closed without a response")
        for srv in servers:
            await srv.close()

    netns.run(main())


@pytest.mark.netns
def test_no_server_goes_down_for_the_checkers_own_lack_of_file_descriptors(netns, capfd):
    """A check the checker cannot make (no socket: its process at its limit of
    open files, as systemd's default soft limit of 1024 is reached while
    checks of a thousand unreachable servers wait out their timeouts) says
    nothing of the server: it is not counted, and takes no server down (all
    of them would go, a whole pool with them); the next is made in its turn.
    It is a warning in xlb's log, a logfmt line as every other."""
    import resource

    async def main():
        srv = await Listener(8026, HttpBehaviour()).start()
        key = ("api", "fine")
        m = http_monitor(rise=1, fall=1)            # http: no socket kept for reuse
        async with checker([Target(key, LOCAL, 8026, m)]) as (hc, rec):
            await until(lambda: len(rec.checks(key)) >= 1, "a first check")
            unmade, not_made = [], hc._not_made

            def counted(entry, code):       # the checks tried and not made
                unmade.append(entry.target.key)
                not_made(entry, code)
            hc._not_made = counted
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            held = []
            mark = rec.mark()
            try:
                # No descriptor left: the limit at the highest in use, the holes below filled.
                resource.setrlimit(resource.RLIMIT_NOFILE, (max(map(int, os.listdir(
                    "/proc/self/fd"))) + 1, hard))
                try:
                    while True:
                        held.append(os.open("/dev/null", os.O_RDONLY))
                except OSError:
                    pass
                await until(lambda: unmade.count(key) >= 3, "three checks not made")
                assert rec.transitions == [] and hc.state(key) == "up"
                assert all(ok for ok, _, _ in rec.checks(key, mark)), rec.checks(key, mark)
            finally:
                for fd in held:
                    os.close(fd)
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            mark = rec.mark()
            await until(lambda: rec.checks(key, mark), "checks again")
            assert rec.checks(key, mark)[0][:2] == (True, "check passed")
        await srv.close()

    netns.run(main())
    warned = [line for line in capfd.readouterr().err.splitlines() if "not made" in line]
    assert warned and all(re.match(r'ts=\S+ level=warning event=health error="\d+ check\(s\) '
                                   r'not made, ', line) for line in warned), warned


@pytest.mark.netns
def test_tcp_connect_timeout_when_syns_go_unanswered(netns):
    async def main():
        # A listener whose accept queue (backlog 0: one connection) is full drops SYNs.
        lsock = socket.socket()
        filler = socket.socket()
        try:
            lsock.bind((str(LOCAL), 8005))
            lsock.listen(0)
            filler.setblocking(False)
            await asyncio.get_running_loop().sock_connect(filler, (str(LOCAL), 8005))
            m = tcp_monitor()
            key = ("db", "full")
            async with checker([Target(key, LOCAL, 8005, m)]) as (hc, rec):
                await until(lambda: rec.transitions, "down")
                (tr,) = rec.of(key)
                assert tr.reason == f"timeout after {TIMEOUT}s (connect)"
                assert tr.duration >= TIMEOUT - 1e-6     # never early (1e-6: float rounding)
        finally:
            filler.close()
            lsock.close()

    netns.run(main())


@pytest.mark.netns
def test_udp_down_when_its_port_is_unreachable_up_when_it_answers(netns):
    """Each check sends send_hex in one datagram; a reply passes. Once nothing
    listens on the port, the ICMP port unreachable fails each check at once."""
    async def main():
        m = udp_monitor(rise=3, fall=2)
        key = ("ntp", "a")
        srv = UdpServer(8101, lambda data: b"\x1c" + data[1:])
        async with serving(srv), checker([Target(key, LOCAL, 8101, m)]) as (hc, rec):
            await until(lambda: rec.checks(key), "the first check")
            assert rec.checks(key)[0][:2] == (True, "check passed")
            assert srv.requests[0] == bytes.fromhex(NTP_REQUEST)
            assert rec.transitions == []

            srv.close()
            died = rec.mark()
            await until(lambda: rec.of(key), "down")
            (tr,) = rec.of(key)
            refused = "recv: connection refused (port unreachable)"
            assert (tr.old, tr.new, tr.reason) == ("up", "down", refused)
            assert_decided(rec, tr)
            down = ["fail"] * m.fall + ["down"]
            assert rec.story(key, died, through="down") in (down, ["pass"] + down)
            assert {r for ok, r, _ in rec.checks(key, died) if not ok} == {refused}

            back = rec.mark()
            await srv.start()
            await until(lambda: len(rec.of(key)) == 2, "up")
            up = rec.of(key)[1]
            assert (up.old, up.new, up.reason) == ("down", "up", "check passed")
            s = rec.story(key, back, through="up")
            assert s[s.index("pass"):] == ["pass"] * m.rise + ["up"], s

    netns.run(main())


@pytest.mark.netns
def test_udp_server_that_never_answers_times_out(netns):
    """A server that takes the datagram and answers nothing, or answers from
    another port (which no connected socket takes), fails by the timeout."""
    async def main():
        elsewhere = UdpServer(8104, lambda data: None)
        silent, stray = UdpServer(8102, lambda data: None), UdpServer(8103, source=elsewhere)
        keys = ("dns", "mute"), ("dns", "stray")
        async with serving(silent, stray, elsewhere), \
                checker([Target(keys[0], LOCAL, 8102, udp_monitor()),
                         Target(keys[1], LOCAL, 8103, udp_monitor())]) as (hc, rec):
            await until(lambda: all(rec.of(k) for k in keys), "down")
            for key in keys:
                (tr,) = rec.of(key)
                assert tr.reason == f"timeout after {TIMEOUT}s (waiting for a reply)"
                assert tr.duration >= TIMEOUT - 1e-6     # never early (1e-6: float rounding)
            assert silent.requests and stray.requests     # both were asked

    netns.run(main())


def _checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data + b"\0" * (len(data) % 2)))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def host_unreachable(icmp: socket.socket, port: int, data: bytes, addr) -> None:
    """Sends over the raw ICMP socket what a router sends for a datagram to
    127.0.0.1:port from addr that it cannot deliver: host unreachable, quoting
    its IP header and the UDP header."""
    udp = struct.pack("!HHHH", addr[1], port, 8 + len(data), 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp) + len(data), 0, 0, 64,
                     socket.IPPROTO_UDP, 0, socket.inet_aton(addr[0]), LOCAL.packed)
    body = struct.pack("!I", 0) + ip + udp
    head = struct.pack("!BBH", 3, 1, 0)                 # destination unreachable: host
    icmp.sendto(head[:2] + struct.pack("!H", _checksum(head + body)) + body, (addr[0], 0))


@pytest.mark.netns
def test_udp_icmp_host_unreachable_fails_at_once(netns):
    """A router's ICMP host unreachable about the check's datagram (a soft
    error, which a connected UDP socket hears of only with IP_RECVERR) fails
    the check as it comes, not by the timeout."""
    async def main():
        icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        srv = UdpServer(8108, lambda data: host_unreachable(icmp, 8108, data, srv.addr))
        key = ("dns", "gone")
        try:
            async with serving(srv), checker([Target(key, LOCAL, 8108, udp_monitor(
                    interval=1.0, timeout=0.9))]) as (hc, rec):
                await until(lambda: rec.of(key), "down")
                (tr,) = rec.of(key)
                assert tr.reason == "recv: no route to host"        # not the timeout
        finally:
            icmp.close()

    netns.run(main())


@pytest.mark.netns
def test_udp_what_comes_after_its_check_reaches_no_later_check(netns):
    """Each check has a socket of its own: a second reply, or a router's ICMP
    error about a datagram once its check has ended, passes or fails no later
    check; nor does a reply that comes after its check's timeout."""
    async def main():
        icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        loop = asyncio.get_running_loop()

        def twice_then_unreachable(data: bytes) -> bytes:
            addr, after = twice.addr, TIMEOUT * 1.2
            loop.call_later(after / 2, twice.sock.sendto, b"\x1c second", addr)
            loop.call_later(after, host_unreachable, icmp, 8109, data, addr)
            return b"\x1c" + data[1:]

        def late(data: bytes) -> None:
            loop.call_later(TIMEOUT * 1.3, slow.sock.sendto, b"\x1c" + data[1:], slow.addr)

        twice, slow = UdpServer(8109, twice_then_unreachable), UdpServer(8110, late)
        keys = ("ntp", "twice"), ("ntp", "late")
        try:
            async with serving(twice, slow), \
                    checker([Target(keys[0], LOCAL, 8109, udp_monitor(expect_hex="1c")),
                             Target(keys[1], LOCAL, 8110, udp_monitor())]) as (hc, rec):
                await until(lambda: all(len(rec.checks(k)) >= 4 for k in keys), "four checks each")
                assert {c[:2] for c in rec.checks(keys[0])} == {(True, "check passed")}
                assert {c[:2] for c in rec.checks(keys[1])} == \
                    {(False, f"timeout after {TIMEOUT}s (waiting for a reply)")}
        finally:
            icmp.close()

    netns.run(main())


@pytest.mark.netns
def test_udp_reply_must_begin_with_expect_hex(netns):
    async def main():
        servers = (UdpServer(8105, lambda data: b"\x1c" + bytes(47)),
                   UdpServer(8106, lambda data: b"\x1c"), UdpServer(8107, lambda data: b""))
        targets = {
            ("ntp", "good"): (8105, "1C 00", (True, "check passed")),
            ("ntp", "any"): (8107, None, (True, "check passed")),
            ("ntp", "wrong"): (8105, "24", (False, "udp: reply 1c..., expected one beginning 24")),
            ("ntp", "long"): (8105, "1c" + "00" * 47 + "ff",
                              (False, "udp: reply as expected for 48 bytes, then its end, "
                                      "expected ff")),
            ("ntp", "late"): (8105, "1c" + "00" * 40 + "ff" + "00" * 7,
                              (False, f"udp: reply as expected for 41 bytes, then {'00' * 7}, "
                                      f"expected ff{'00' * 7}")),
            ("ntp", "short"): (8106, "1c04", (False, "udp: reply 1c, expected one beginning 1c04")),
            ("ntp", "empty"): (8107, "1c", (False, "udp: empty reply, expected one beginning 1c")),
        }
        async with serving(*servers), \
                checker([Target(key, LOCAL, port, udp_monitor(expect_hex=expect))
                         for key, (port, expect, _) in targets.items()]) as (hc, rec):
            await until(lambda: all(rec.checks(k) for k in targets), "a check each")
            assert {k: rec.checks(k)[0][:2] for k in targets} == \
                {k: want for k, (_, _, want) in targets.items()}

    netns.run(main())


@pytest.mark.netns
def test_separate_check_port(netns):
    async def main():
        service = await Listener(8006).start()
        check = await Listener(8007).start()
        m = tcp_monitor(port=8007)
        target = Target.for_server("web", Server("s1", LOCAL, 8006), m)
        assert (target.key, target.port) == (("web", "s1"), 8007)
        assert Target.for_server("web", Server("s1", LOCAL, 8006), tcp_monitor()).port == 8006
        async with checker([target]) as (hc, rec):
            await until(lambda: hc.last_check(target.key), "the first check")
            assert hc.state(target.key) == "up"
            await check.stop_listening()                 # the service port stays open
            died = rec.mark()
            await until(lambda: rec.transitions, "down")
            assert rec.of(target.key)[0].reason == "connect: connection refused"
            down = ["fail"] * m.fall + ["down"]          # (a check in flight may pass)
            assert rec.story(target.key, died, through="down") in (down, ["pass"] + down)
            assert service.connections == []            # never the service port
        await service.close()
        await check.close()

    netns.run(main())


@pytest.mark.netns
def test_type_none_is_never_checked(netns):
    async def main():
        srv, clock_srv = await Listener(8008).start(), await Listener(8009).start()
        key, clock = ("web", "unchecked"), ("web", "clock")
        m = Monitor("n", "none", interval=INTERVAL, timeout=TIMEOUT)
        # A target checked at the same interval: by its third check, one checked
        # by mistake has had its first, and that one has ended (its timeout is
        # shorter than an interval).
        async with checker([Target(key, LOCAL, 8008, m),
                            Target(clock, LOCAL, 8009, tcp_monitor())]) as (hc, rec):
            await until(lambda: len(rec.checks(clock)) >= 3, "three checks of another")
            assert hc.state(key) == "up" and hc.last_check(key) is None
            assert rec.checks(key) == [] and rec.of(key) == [] and srv.connections == []
        await srv.close()
        await clock_srv.close()

    netns.run(main())


@pytest.mark.netns
def test_set_targets_while_running(netns):
    async def main():
        a_srv = await Listener(8009).start()
        b_srv = await Listener(8010).start()
        m = tcp_monitor(fall=1)
        ka, kb, kdead = ("p", "a"), ("p", "b"), ("p", "dead")
        a, b = Target(ka, LOCAL, 8009, m), Target(kb, LOCAL, 8010, m)
        dead = Target(kdead, LOCAL, 8011, m)             # nothing listens there
        async with checker([a, dead]) as (hc, rec):
            await until(lambda: rec.of(kdead) and hc.last_check(ka), "dead down, a checked")
            assert b_srv.connections == []

            # Adding b starts its checks; a and dead keep their state and schedule.
            a_last = hc.last_check(ka)
            added = rec.mark()
            hc.set_targets([a, dead, b])
            assert hc.state(kdead) == "down" and hc.last_check(ka) is a_last
            await until(lambda: len(rec.checks(kb, added)) >= 4, "four checks of b")
            assert hc.state(kb) == "up" and b_srv.connections
            # a goes on at its own rate: while b (the same interval) was checked 4
            # times, a was checked 4 times too, give or take one at either end.
            checked = [k for k, e in rec.events[added:] if not isinstance(e, Transition)]
            b4 = [i for i, k in enumerate(checked) if k == kb][3]
            assert 2 <= checked[:b4].count(ka) <= 5, rec.story(ka, added)
            assert rec.checks(kdead, added) and len(rec.of(kdead)) == 1   # dead: no restart

            # Removing b stops its checks, the one in flight included.
            removed = rec.mark()
            hc.set_targets([a, dead])
            assert kb not in hc.states()
            with pytest.raises(KeyError):
                hc.state(kb)
            # a's next check: the loop went on (and took any connection b had in
            # flight); then three more of a's, over which b was due twice.
            await until(lambda: rec.checks(ka, removed), "a checked after the removal")
            b_count = len(b_srv.connections)
            await until(lambda: len(rec.checks(ka, removed)) >= 4, "three more checks of a")
            assert len(b_srv.connections) == b_count
            assert rec.checks(kb, removed) == []        # not even the one in flight

            # One at another address restarts as new: provisional up, first check
            # decides (one whose monitor is edited goes on: the tests below).
            dead2 = Target(kdead, IPv4Address("127.0.0.2"), 8011, tcp_monitor(fall=2))
            hc.set_targets([a, dead2])
            assert hc.state(kdead) == "up" and hc.last_check(kdead) is None
            await until(lambda: len(rec.of(kdead)) == 2, "dead down again")
            assert [(t.old, t.new) for t in rec.of(kdead)] == [("up", "down")] * 2
            assert rec.of(ka) == [] and hc.state(ka) == "up"
        await a_srv.close()
        await b_srv.close()

    netns.run(main())


@pytest.mark.netns
def test_a_renamed_target_goes_on_as_checked(netns):
    """A target renamed (given as such) with the same check is no new target:
    its state, last check and counts go on under the new key, so that it goes
    down at the fall-th failure, where a new one's first check decides."""
    async def main():
        srv = await Listener(8017).start()
        m = tcp_monitor(fall=3)
        old, new = ("web", "a"), ("www", "a")
        async with checker([Target(old, LOCAL, 8017, m)]) as (hc, rec):
            await until(lambda: hc.last_check(old), "the first check")
            last = hc.last_check(old)
            hc.set_targets([Target(new, LOCAL, 8017, m)], renamed={old: new})
            assert hc.states() == {new: "up"} and hc.last_check(new) is last
            await srv.stop_listening()
            died = rec.mark()
            await until(lambda: rec.of(new), "down")
            down = ["fail"] * m.fall + ["down"]
            assert rec.story(new, died, through="down") in (down, ["pass"] + down)
            assert rec.of(old) == []
        await srv.close()

    netns.run(main())


class ScheduleRecorder(Recorder):
    """Also records, per check, when it was due: the checker's own schedule
    (`_Entry.next_start`, private: this reads how health.py keeps it), on
    health's clock, and when the check was reported."""

    def __init__(self):
        super().__init__()
        self.due: dict[tuple[str, str], list[tuple[float, float]]] = {}

    def on_check(self, key, ok: bool, duration: float) -> None:
        super().on_check(key, ok, duration)
        # on_check runs before the checker moves next_start on to the next check.
        self.due.setdefault(key, []).append((self.hc._entries[key].next_start, health._now()))


@pytest.mark.netns
def test_fixed_rate_and_spread_first_checks(netns):
    """Read from the schedule the checker keeps, not from gaps between checks."""
    async def main():
        # Each check takes at least half its interval (the server answers after
        # 0.1 s of a 0.2 s interval): the next one is still due an interval after it.
        slow = await Listener(8012, HttpBehaviour(delay=0.1)).start()
        m = http_monitor(timeout=0.18)
        key = ("p", "slow")
        # 20 targets on one port, added together: their first checks spread out.
        fast = await Listener(8013).start()
        many = [Target(("p", f"t{i}"), LOCAL, 8013, tcp_monitor(interval=0.5))
                for i in range(20)]
        targets = [Target(key, LOCAL, 8012, m), *many]
        rec = ScheduleRecorder()
        before = health._now()
        async with checker(targets, rec) as (hc, rec):
            await until(lambda: len(rec.due.get(key, ())) >= 5
                        and all(len(rec.due.get(t.key, ())) >= 2 for t in many),
                        "five slow checks and two of each fast one")
        started = min(reported for due in rec.due.values() for _, reported in due)

        assert all(d >= 0.1 - 1e-6 for _, _, d in rec.checks(key)), rec.checks(key)  # slow
        for t in targets:
            interval, due = t.monitor.interval, rec.due[t.key]
            # The first check: at an offset in [0, interval) from when run() began
            # (after `before`, before any check was reported).
            assert before <= due[0][0] < started + interval, (t.key, before, due[0], started)
            # The next: an interval after the previous one was due, however long that
            # took; or, had it overrun (only a stalled machine makes a check outlast
            # its timeout, which is under the interval), at once: due when it ended,
            # not an interval after that.
            for (was, ended), (then, _) in zip(due, due[1:]):
                assert then == pytest.approx(was + interval, abs=1e-6) or \
                    (then > was + interval and ended <= then < ended + interval / 2), \
                    (t.key, due)
        firsts = sorted(rec.due[t.key][0][0] for t in many)
        assert firsts[-1] - firsts[0] > 0.5 / 3, firsts      # not one herd (p ~ 1e-8)
        assert fast.connections and slow.connections
        await slow.close()
        await fast.close()

    netns.run(main())


class Edits:
    """Monitor edits made at chosen moments as `xlb apply` makes them: the whole
    set of targets again, with the checker's states as `initial` (as the daemon
    gives them)."""

    def __init__(self, hc: HealthChecker, rec: Recorder, targets):
        self.hc, self.rec = hc, rec
        self.targets = {t.key: t for t in targets}
        self.asked: set[tuple[str, str]] = set()
        self.at: dict[tuple[str, str], int] = {}        # the mark of each key's edit
        self.states: dict[tuple[str, str], str] = {}    # its state just after
        self.clock: dict[tuple[str, str], tuple[float, float]] = {}   # health's, around it

    def soon(self, key, delay: float = 0.0, **changes) -> None:
        """Edits key's monitor once the caller (a callback of the checker) has returned."""
        self.asked.add(key)
        asyncio.get_running_loop().call_later(delay, functools.partial(self.now, key, **changes))

    def now(self, key, **changes) -> None:
        self.asked.add(key)
        t = self.targets[key]
        self.targets[key] = replace(t, monitor=replace(t.monitor, **changes),
                                    port=changes.get("port", t.port))
        before = health._now()
        self.hc.set_targets(self.targets.values(), initial=self.hc.states())
        self.clock[key] = (before, health._now())
        self.at[key] = self.rec.mark()
        self.states[key] = self.hc.state(key)

    def checks_before(self, key) -> int:
        return len(self.rec.checks(key)) - len(self.rec.checks(key, self.at[key]))


@pytest.mark.netns
def test_an_edited_monitor_goes_on_with_the_counts_so_far(netns):
    """An edit of a monitor's rise or fall is a change of policy, not a new
    server: the checks so far count against the new value, and only a check
    changes a state. fall 3 -> 5 after 2 failures: 3 more take the server
    down (where a new server's first check would, at once); fall 5 -> 2 after
    3: the next one does. rise 2 -> 4 after 1 pass: 3 more bring it up;
    rise 4 -> 2 after 3: the next one does."""
    async def main():
        dying = await Listener(8030).start()
        ka, kb, kc, kd = (("p", n) for n in "abcd")
        targets = [Target(ka, LOCAL, 8030, tcp_monitor(fall=3)),
                   Target(kb, LOCAL, 8030, tcp_monitor(fall=5)),
                   Target(kc, LOCAL, 8031, tcp_monitor(rise=2)),    # nothing there yet
                   Target(kd, LOCAL, 8031, tcp_monitor(rise=4))]
        # key: the outcome counted, how many come before the edit, the edit, what follows
        plan = {ka: ("fail", 2, {"fall": 5}, ["fail"] * 3 + ["down"]),
                kb: ("fail", 3, {"fall": 2}, ["fail", "down"]),
                kc: ("pass", 1, {"rise": 4}, ["pass"] * 3 + ["up"]),
                kd: ("pass", 3, {"rise": 2}, ["pass", "up"])}
        async with checker(targets) as (hc, rec):
            await until(lambda: all(hc.last_check(t.key) for t in targets), "the first checks")
            assert hc.states() == {ka: "up", kb: "up", kc: "down", kd: "down"}
            edits = Edits(hc, rec, targets)
            turned = rec.mark()

            def after_check(key, ok):
                outcome, n, changes, _ = plan[key]
                if key not in edits.asked and rec.story(key, turned).count(outcome) == n:
                    edits.soon(key, **changes)
            rec.after_check = after_check
            await dying.stop_listening()
            coming = await Listener(8031).start()
            await until(lambda: all(k in edits.at and after[-1] in rec.story(k, edits.at[k])
                                    for k, (*_, after) in plan.items()),
                        "every server edited and changed", seconds=PATIENCE + 12 * INTERVAL)
            assert edits.states == {ka: "up", kb: "up", kc: "down", kd: "down"}
            for key, (_, _, _, after) in plan.items():
                assert rec.story(key, edits.at[key], through=after[-1]) == after, key
        await dying.close()
        await coming.close()

    netns.run(main())


@pytest.mark.netns
def test_an_edited_interval_counts_from_the_last_check(netns):
    """An edited interval counts from the last check's due time: the next
    check is due the new interval after it (not at once, nor the old interval
    after it), or at once when that time has passed."""
    async def main():
        srv = await Listener(8032).start()
        ke, kf, kg = ("p", "e"), ("p", "f"), ("p", "g")
        targets = [Target(ke, LOCAL, 8032, tcp_monitor(interval=0.2)),
                   Target(kf, LOCAL, 8032, tcp_monitor(interval=0.5)),
                   Target(kg, LOCAL, 8032, tcp_monitor(interval=1.0))]
        new = {ke: 0.5, kf: 0.2, kg: 0.2}
        rec = ScheduleRecorder()
        async with checker(targets, rec) as (hc, rec):
            edits = Edits(hc, rec, targets)

            def after_check(key, ok):
                if key not in edits.asked:          # after its first check; g's 0.4 s
                    edits.soon(key, 0.4 if key == kg else 0, interval=new[key])
            rec.after_check = after_check
            await until(lambda: all(len(rec.checks(k, edits.at[k])) >= 1
                                    for k in new if k in edits.at)
                        and len(edits.at) == 3, "a check of each after its edit",
                        seconds=PATIENCE + 2)
        for key in (ke, kf):
            n = edits.checks_before(key)
            last, following = rec.due[key][n - 1][0], rec.due[key][n][0]
            assert following == pytest.approx(last + new[key], abs=1e-6), (key, rec.due[key])
        # g: its first check + 0.2 had passed when the edit came 0.4 s after it.
        n = edits.checks_before(kg)
        before, after = edits.clock[kg]
        assert rec.due[kg][n - 1][0] + 0.2 < before <= rec.due[kg][n][0] <= after
        await srv.close()

    netns.run(main())


@pytest.mark.netns
def test_a_check_in_flight_as_its_monitor_is_edited_counts_under_the_edit(netns):
    """A check in flight when an edit of its fall and interval lands goes on
    and counts against the new fall; the next is due the new interval after
    it: no check lost, none doubled."""
    async def main():
        behaviour = HttpBehaviour(delay=0.05)
        srv = await Listener(8033, behaviour).start()
        key = ("p", "h")
        target = Target(key, LOCAL, 8033, http_monitor(fall=2))
        rec = ScheduleRecorder()
        async with checker([target], rec) as (hc, rec):
            await until(lambda: rec.checks(key), "the first check")
            edits = Edits(hc, rec, [target])

            def on_request(path):
                if key not in edits.asked and rec.story(key, failing).count("fail") == 1:
                    edits.now(key, fall=3, interval=0.3)    # while this check is in flight
            failing = rec.mark()
            behaviour.status = 500
            behaviour.on_request = on_request
            await until(lambda: rec.of(key), "down", seconds=PATIENCE + 6 * INTERVAL)
            s = rec.story(key, failing, through="down")
            assert s[s.index("fail"):] == ["fail"] * 3 + ["down"], s    # (one in flight may pass)
            assert edits.states == {key: "up"}
            n = edits.checks_before(key)            # due[n]: the check in flight at the edit
            assert [d for d, _ in rec.due[key][n:]] == pytest.approx(
                [rec.due[key][n][0], rec.due[key][n][0] + 0.3], abs=1e-6), rec.due[key]
        await srv.close()

    netns.run(main())


@pytest.mark.netns
def test_a_monitor_edited_to_check_something_else_counts_anew(netns):
    """An edit of what is checked (here the http path) keeps the state, but
    the checks so far, of the old path, no longer count, and a check of it in
    flight is dropped: `rise` or `fall` checks of the new path decide (not the
    first alone, as for a new server, nor fewer for the old path's checks).
    The next check is due an interval after the one dropped."""
    async def main():
        behaviour = HttpBehaviour(delay=0.05, statuses={"/new": 404, "/missing": 404})
        srv = await Listener(8034, behaviour).start()
        ku, kd = ("p", "u"), ("p", "d")
        targets = [Target(ku, LOCAL, 8034, http_monitor(path="/old", fall=3)),
                   Target(kd, LOCAL, 8034, http_monitor(path="/missing", rise=2))]
        rec = ScheduleRecorder()
        async with checker(targets, rec) as (hc, rec):
            await until(lambda: hc.last_check(ku) and hc.last_check(kd), "the first checks")
            assert hc.states() == {ku: "up", kd: "down"}
            edits = Edits(hc, rec, targets)
            dropped = []

            def on_request(path):
                # u: its third /old check after two failures, in flight
                if path == "/old" and ku not in edits.asked and \
                        rec.story(ku, failing).count("fail") == 2:
                    dropped.append(hc._entries[ku].next_start)     # when it was due
                    edits.now(ku, path="/new")

            def after_check(key, ok):
                if key == kd and key not in edits.asked:
                    edits.soon(kd, path="/")
            failing = rec.mark()
            behaviour.statuses["/old"] = 503
            behaviour.on_request = on_request
            rec.after_check = after_check
            await until(lambda: rec.of(ku) and rec.of(kd), "u down, d up",
                        seconds=PATIENCE + 10 * INTERVAL)
            assert edits.states == {ku: "up", kd: "down"}
            assert rec.story(kd, edits.at[kd], through="up") == ["pass", "pass", "up"]
            s = rec.story(ku, failing, through="down")
            assert s[s.index("fail"):] == ["fail"] * 5 + ["down"], s
            # None of /old after the edit: the one in flight was dropped, unreported.
            assert {r for _, r, _ in rec.checks(ku, edits.at[ku])} == \
                {"http status 404, expected 2xx or 3xx"}
            n = edits.checks_before(ku)
            assert rec.due[ku][n][0] == pytest.approx(dropped[0] + INTERVAL, abs=1e-6)
        await srv.close()

    netns.run(main())


@pytest.mark.netns
def test_callback_errors_do_not_stop_checking(netns):
    async def main():
        calls = []
        checks = []

        def on_change(tr):
            calls.append((tr, len(checks)))
            raise RuntimeError("callback bug")

        def on_check(key, ok, duration):
            checks.append((key, ok, duration))
            raise RuntimeError("metrics bug")

        hc = HealthChecker(on_change, on_check)
        key = ("p", "x")
        hc.set_targets([Target(key, LOCAL, 8014, tcp_monitor(rise=1, fall=1))])
        task = asyncio.create_task(hc.run())
        try:
            await until(lambda: calls, "down")
            srv = await Listener(8014).start()
            await until(lambda: len(calls) == 2, "up again")
            assert [tr.new for tr, _ in calls] == ["down", "up"]
            assert [ok for _, ok, _ in checks][:1] == [False] and checks[-1][:2] == (key, True)
            for tr, n in calls:                 # each heard of the check that decided it
                assert checks[n - 1] == (key, tr.new == "up", tr.duration)
            await srv.close()
        finally:
            hc.stop()
            await asyncio.wait_for(task, 2)

    netns.run(main())


@pytest.mark.netns
def test_stop_from_another_thread_and_before_run(netns):
    hc = HealthChecker(lambda tr: None)
    key = ("p", "x")
    hc.set_targets([Target(key, LOCAL, 8015, tcp_monitor())])

    async def run_until_stopped():
        await asyncio.wait_for(hc.run(), 2 * PATIENCE)

    fut = asyncio.run_coroutine_threadsafe(run_until_stopped(), netns.loop)
    deadline = time.monotonic() + PATIENCE
    while hc.last_check(key) is None:           # run() is running once it has checked
        assert time.monotonic() < deadline, "run() never checked"
        time.sleep(0.002)
    assert not fut.done()
    hc.stop()                                   # from this (the main) thread
    fut.result(PATIENCE)                        # run() returned (TimeoutError: it did not)
    hc.stop()                                   # before run(): that run returns at once
    netns.run(asyncio.wait_for(hc.run(), PATIENCE))


SIOCGSKNS = 0x894C      # a socket's network namespace, as an fd


def sockets_and_epolls() -> set[tuple[str, str]]:
    """The sockets of the calling thread's network namespace and the epoll
    instances that this process has open, by fd and what it names (a socket's
    inode): a number reused is another file. Counting every fd failed when
    another thread's file closed meanwhile; a socket of another namespace is
    another thread's (the checker's are made in the namespace's loop)."""
    here = os.stat("/proc/thread-self/ns/net").st_ino
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:"):
                ns = fcntl.ioctl(int(fd), SIOCGSKNS)
                try:
                    if os.fstat(ns).st_ino != here:
                        continue
                finally:
                    os.close(ns)
        except OSError:         # closed meanwhile, or no longer a socket
            continue
        if target.startswith(("socket:", "anon_inode:[eventpoll]")):
            out.add((fd, target))
    return out


@pytest.mark.netns
def test_cancelling_run_closes_every_socket(netns):
    async def main():
        before = sockets_and_epolls()
        srv = await Listener(8016).start()
        hc = HealthChecker(lambda tr: None)
        m = tcp_monitor(interval=0.05, timeout=0.04)
        hc.set_targets([Target(("p", f"t{i}"), LOCAL, 8016 + i % 2, m) for i in range(40)])
        task = asyncio.create_task(hc.run())
        await until(lambda: all(hc.last_check(k) for k in hc.states()), "every check")
        await asyncio.sleep(0.2)
        opened = sockets_and_epolls() - before
        assert any("eventpoll" in t for _, t in opened)      # the epoll, pooled sockets
        assert any("socket" in t for _, t in opened)
        states = hc.states()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await srv.close()
        # (the server's own accepted connections may take a moment to close)
        await until(lambda: not sockets_and_epolls() - before,
                    lambda: f"no fd left open: {sorted(sockets_and_epolls() - before)}")
        assert hc.states() == states                         # the state survives run()

    netns.run(main())


def test_validation():
    hc = HealthChecker(lambda tr: None)
    t = Target(("p", "x"), LOCAL, 80, tcp_monitor())
    with pytest.raises(ValueError, match="given twice"):
        hc.set_targets([t, t])
    with pytest.raises(ValueError, match="monitor type"):
        hc.set_targets([Target(("p", "y"), LOCAL, 80, Monitor("m", "icmp"))])
    with pytest.raises(ValueError, match="needs send_hex"):
        hc.set_targets([Target(("p", "y"), LOCAL, 80, Monitor("m", "udp"))])
    with pytest.raises(ValueError, match="odd number"):
        hc.set_targets([Target(("p", "y"), LOCAL, 80, udp_monitor(expect_hex="1c0"))])
    with pytest.raises(ValueError, match="positive"):
        hc.set_targets([Target(("p", "y"), LOCAL, 80, tcp_monitor(interval=0))])
    for counts in ({"rise": 0}, {"fall": 0}):
        with pytest.raises(ValueError, match="rise and fall"):
            hc.set_targets([Target(("p", "y"), LOCAL, 80, tcp_monitor(**counts))])
    hc.set_targets([t])
    assert hc.states() == {t.key: "up"} and hc.last_check(t.key) is None


def test_a_server_its_link_took_down_shows_no_check_duration():
    """mark_down runs no check: `xlb status` and `xlb top` showed "link eth1
    lost its carrier (0.0 ms)" as if one had run and taken 0.0 ms, and the
    log its check_duration=0.0. No duration is told, and none is counted
    (on_check, which feeds the check-duration histogram, hears nothing)."""
    from xlb.balancer import _check_dict
    from xlb.units import last_check
    changes, checks = [], []
    hc = HealthChecker(changes.append, lambda *check: checks.append(check))
    key, reason = ("web", "a"), "link eth1 lost its carrier"
    hc.set_targets([Target(key, LOCAL, 80, tcp_monitor())])
    hc.mark_down([key], reason)
    assert changes == [Transition(key, "up", "down", reason, None)] and checks == []
    shown = {"monitor": "m", "last_check": _check_dict(hc.last_check(key))}
    assert last_check(shown) == reason


# -- the http response parser (no sockets) ----------------------------------------

def verdict(data: bytes, eof: bool = False, **kw):
    """The reader's outcome for `data` read at once, checked to be the outcome
    of the same bytes read one at a time (the first a piece decides)."""
    from xlb.health import _CheckFailed, _HttpReader

    def read(pieces):
        reader = _HttpReader(http_monitor(**kw))
        try:
            for piece in pieces:
                if (v := reader.feed(piece, False)) is not None:
                    return v
            return reader.feed(b"", True) if eof else None
        except _CheckFailed as e:
            return "failed", str(e)
    whole = read([data])
    assert read(data[i:i + 1] for i in range(len(data))) == whole
    return whole


def test_http_parser():
    ok = (True, "check passed")
    assert verdict(b"HTTP/1.1 20") is None                           # read more
    assert verdict(b"HTTP/1.1 200 OK\r\n\r\n") == ok                 # no body wanted
    assert verdict(b"HTTP/1.0 200\r\n\r\n") == ok                    # no reason phrase
    # A good status passes with the headers' end only, a bad one fails at once.
    assert verdict(b"HTTP/1.1 200 OK\r\n") is None
    assert verdict(b"HTTP/1.1 200 OK\r\nServer: x\r\n") is None
    assert verdict(b"HTTP/1.1 200 OK\r\nServer: x\r\n", eof=True) == \
        ("failed", "http: connection closed inside the headers")
    assert verdict(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 11000) == \
        ("failed", "http: headers longer than 64 KiB")
    # By default any 2xx or 3xx, as HAProxy's httpchk; else the one given.
    assert verdict(b"HTTP/1.1 503 Busy\r\n") == (False, "http status 503, expected 2xx or 3xx")
    assert verdict(b"HTTP/1.1 199 Hm\r\n\r\n", eof=True) == \
        ("failed", "http: connection closed without a response")    # interim only (below)
    assert verdict(b"HTTP/1.1 302 Found\r\n\r\n") == ok
    assert verdict(b"HTTP/1.1 399 Odd\r\n\r\n") == ok
    assert verdict(b"HTTP/1.1 400 Bad\r\n") == (False, "http status 400, expected 2xx or 3xx")
    assert verdict(b"HTTP/1.1 204 No\r\n\r\n", expect_status=204) == ok
    assert verdict(b"HTTP/1.1 200 OK\r\n", expect_status=204) == \
        (False, "http status 200, expected 204")
    assert verdict(b"", eof=True) == ("failed", "http: connection closed without a response")
    assert verdict(b"HTTP/1.1 2", eof=True) == \
        ("failed", "http: connection closed before the status line")
    # Interim responses (1xx but 101) come before the final one, which decides.
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
    assert verdict(hints) is None
    assert verdict(hints + b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n") == ok
    assert verdict(hints + b"HTTP/1.1 503 Busy\r\n") == \
        (False, "http status 503, expected 2xx or 3xx")
    assert verdict(hints, eof=True) == ("failed", "http: connection closed without a response")
    assert verdict(hints[:30], eof=True) == \
        ("failed", "http: connection closed inside the headers")
    assert verdict(b"HTTP/1.1 101 Switching\r\n\r\n") == \
        (False, "http status 101, expected 2xx or 3xx")
    assert verdict(b"HTTP/1.1 102 Processing\r\n\r\n", expect_status=102) == ok
    assert verdict(b"SSH-2.0-OpenSSH\r\n")[0] == "failed"            # not http
    # A status is three digits: 0200 is no 200, nor 2000 a status at all.
    for line in (b"HTTP/1.1 0200 OK", b"HTTP/1.1 2000 OK", b"HTTP/1.1 20 OK"):
        assert verdict(line + b"\r\n\r\n") == \
            ("failed", f"http: malformed status line {line!r}"), line
    assert "malformed status line" in verdict(b"SSH-2.0-OpenSSH\r\n")[1]

    head = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n"
    assert verdict(head + b"hello", expect_body="world") is None     # more to come
    assert verdict(head + b"hello world", expect_body="world") == ok
    assert verdict(head + b"hello there", expect_body="world") == \
        (False, "body lacks 'world'")                                # length reached
    assert verdict(head + b"hello", eof=True, expect_body="world") == \
        (False, "body lacks 'world'")
    assert verdict(head + b"hello there world", expect_body="world") == \
        (False, "body lacks 'world'")                                # past the length: no body
    assert verdict(b"HTTP/1.1 200 OK\r\nContent-Le", eof=True, expect_body="x") == \
        ("failed", "http: connection closed inside the headers")
    # Another header's number is no length.
    assert verdict(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nAge: 5\r\n\r\nhello world",
                   expect_body="world") == ok
    # A length of more digits than int() reads: past the body limit, or as
    # long as it is without its leading zeros.
    assert verdict(b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\nhello",
                   expect_body="world") is None
    padded = b"HTTP/1.1 200 OK\r\nContent-Length: " + b"0" * 5000 + b"11\r\n\r\n"
    assert verdict(padded + b"hello world", expect_body="world") == ok
    assert verdict(padded + b"hello there world", expect_body="world") == \
        (False, "body lacks 'world'")
    # What is read stays bounded: a status line or headers past 64 KiB end the check.
    assert verdict(b"x" * (64 * 1024 + 1)) == ("failed", "http: no status line in the first 64 KiB")
    assert verdict(b"x" * (64 * 1024)) is None
    assert verdict(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 11000, expect_body="x") == \
        ("failed", "http: headers longer than 64 KiB")

    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"3\r\nwor\r\n3;ext=1\r\nld!\r\n")
    assert verdict(chunked, expect_body="world!") == ok              # split across chunks
    assert verdict(chunked, expect_body="world!!") is None           # the body goes on
    assert verdict(chunked + b"0\r\n\r\n", expect_body="world!!") == \
        (False, "body lacks 'world!!'")
    assert verdict(chunked + b"0\r\n\r\n", expect_body="nope") == (False, "body lacks 'nope'")
    # Sizes are hexadecimal, and a chunk may be one byte long.
    sized = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"1A\r\n" + b"a" * 20 + b"needle\r\n1\r\n!\r\n0\r\n\r\n")
    assert verdict(sized, expect_body="needle!") == ok
    # Whole at the last chunk, not at bytes that look like it; LF alone ends lines.
    lines = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"a\r\nqueue: 0\r\n\r\n")
    assert verdict(lines, expect_body="status: ok") is None
    assert verdict(lines + b"c\r\nstatus: ok\r\n\r\n", expect_body="status: ok") == ok
    assert verdict(lines + b"0\r\n\r\n", expect_body="status: ok") == \
        (False, "body lacks 'status: ok'")
    assert verdict(lines + b"0\r\nX-Trailer: 1\r\n", expect_body="status: ok") == \
        (False, "body lacks 'status: ok'")                          # trailers: no body
    # Header names and transfer codings are case-insensitive (RFC 9110, 9112).
    shouted = b"HTTP/1.1 200 OK\r\nTRANSFER-ENCODING: Chunked\r\n\r\n3\r\nwor\r\n3\r\nld!\r\n"
    assert verdict(shouted, expect_body="world!") == ok
    lf = b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n3\nwor\n3;x=1\nld!\n"
    assert verdict(lf, expect_body="world!") == ok
    assert verdict(lf, expect_body="world!!") is None
    assert verdict(lf + b"0\n\n", expect_body="world!!") == (False, "body lacks 'world!!'")

    # Chunks of a byte: 64 KiB of data is 384 KiB of framing, all read.
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    tiny = head + b"".join(b"1\r\n%c\r\n" % c for c in b"x" * (50 * 1024) + b"needle")
    assert verdict(tiny, expect_body="needle") == ok
    assert verdict(tiny, expect_body="needles") is None
    # Not chunked after all: done at the broken framing, not at a size cap.
    assert verdict(head + b"all good, no chunks here\r\n", expect_body="healthy") == \
        (False, "body lacks 'healthy'")
    assert verdict(head + b"3\r\nwor!!\r\n", expect_body="healthy") == \
        (False, "body lacks 'healthy'")
    assert verdict(head + b"3\r\nwor\r", expect_body="healthy") is None     # its CR came
    assert verdict(head + b"x" * 2000, expect_body="healthy") == \
        (False, "body lacks 'healthy'")                             # no size line that long

    big = b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * (64 * 1024) + b"needle"
    assert verdict(big, expect_body="needle") == (False, "body lacks 'needle'")   # 64 KiB


def test_a_redirect_whose_body_lacks_the_text_says_it_was_a_redirect():
    """A 3xx passes the default status test but is not followed: its body
    (a login page's link, nothing) lacks expect_body, and the reason names the
    status, lest the operator, whose browser or curl -L follows it to the
    expected text, look for the text where it is."""
    moved = b"HTTP/1.1 302 Found\r\nLocation: /login\r\nContent-Length: 9\r\n\r\nGo there."
    assert verdict(moved, expect_body="healthy") == \
        (False, "http status 302 (not followed): body lacks 'healthy'")
    assert verdict(moved, expect_body="Go") == (True, "check passed")
    choices = b"HTTP/1.1 300 Multiple Choices\r\nContent-Length: 2\r\n\r\nGo"
    assert verdict(choices, expect_body="healthy") == \
        (False, "http status 300 (not followed): body lacks 'healthy'")
    plain = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nGo there."
    assert verdict(plain, expect_body="healthy") == (False, "body lacks 'healthy'")


def test_xlb_up_may_hold_as_many_sockets_as_its_hard_limit_allows():
    """systemd's default soft limit of open files (1,024) is reached by the
    checks of a thousand unreachable servers waiting out their timeouts:
    `xlb up` raises it to the hard limit, as HAProxy does."""
    code = ("import resource\n"
            "from xlb import daemon\n"
            "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))\n"
            "daemon._more_open_files()\n"
            "print(resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout == "True\n", r.stderr
