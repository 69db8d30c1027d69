"""The health checker against real servers and real sockets.

Everything runs on one worker thread that unshare(2)s a fresh network namespace
of its own (namespaces are per thread in Linux), brings its `lo` up and runs an
asyncio loop with both the test servers and the checker; the rest of the
process, and the host, never see a packet. Needs root; intervals are short
(0.2 s) so the file takes a few seconds; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import os
import socket
import struct
import threading
import time
from contextlib import asynccontextmanager
from ipaddress import IPv4Address

import pytest

from xlb.health import HealthChecker, Target, Transition
from xlb.model import Monitor, Server

pytestmark = pytest.mark.netns

CLONE_NEWNET = 0x40000000
LOCAL = IPv4Address("127.0.0.1")
INTERVAL, TIMEOUT = 0.2, 0.15
NOISE = 0.1                     # the product's scheduling-noise allowance


def tcp_monitor(**kw) -> Monitor:
    kw = {"interval": INTERVAL, "timeout": TIMEOUT, "rise": 2, "fall": 2, **kw}
    return Monitor("m", "tcp", **kw)


def http_monitor(**kw) -> Monitor:
    kw = {"interval": INTERVAL, "timeout": TIMEOUT, "rise": 2, "fall": 2, **kw}
    return Monitor("h", "http", **kw)


def bound(m: Monitor) -> float:
    """The promised time from a server's death to its down transition."""
    return m.fall * m.interval + m.timeout + NOISE


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

async def until(pred, timeout: float, what: str) -> float:
    """Wait (bounded) until pred() is true; the monotonic time it was seen."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.2f}s waiting for {what}")
        await asyncio.sleep(0.002)


class Listener:
    """An asyncio server on 127.0.0.1:port whose connections are counted."""

    def __init__(self, port: int, handle=None):
        self.port = port
        self.connections: list[float] = []
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._handle = handle
        self._tasks: set[asyncio.Task] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> Listener:
        self.server = await asyncio.start_server(self._on_conn, str(LOCAL), self.port,
                                                 reuse_address=True)
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
    def __init__(self, status=200, body=b"all good", hang=False, delay=0.0, hosts=None):
        self.status, self.body, self.hang, self.delay = status, body, hang, delay
        self.hosts = hosts or {}        # path -> the Host header it must carry

    async def __call__(self, srv: Listener, reader, writer) -> None:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        line, *fields = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (f.partition(":") for f in fields if f)}
        srv.requests.append((line, headers))
        if self.hang:
            await asyncio.sleep(5)      # cancelled by Listener.close long before
            return
        if self.delay:
            await asyncio.sleep(self.delay)
        path = line.split()[1]
        status, body = self.status, self.body
        want = self.hosts.get(path)
        if want is not None and headers.get("host") != want:
            status, body = 400, f"bad host {headers.get('host')!r}".encode()
        writer.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                     % (status, len(body), body))
        await writer.drain()


class Checks:
    """Every check of one key, seen by polling last_check (a new tuple per check)."""

    def __init__(self, hc: HealthChecker, key):
        self.hc, self.key = hc, key
        self.seen: list[tuple[float, tuple[bool, str, float]]] = []
        self.task = asyncio.create_task(self._poll())

    async def _poll(self) -> None:
        last = None
        while True:
            try:
                cur = self.hc.last_check(self.key)
            except KeyError:
                cur = None
            if cur is not None and cur is not last:
                self.seen.append((time.monotonic(), cur))
                last = cur
            await asyncio.sleep(0.002)

    def results(self) -> list[tuple[bool, str, float]]:
        return [r for _, r in self.seen]

    async def caught_up(self) -> None:
        """Until the latest check has been seen (on_change runs before the poll does)."""
        await until(lambda: self.seen and self.seen[-1][1] is self.hc.last_check(self.key),
                    0.1, "the check poller")


@asynccontextmanager
async def checker(targets):
    """A running HealthChecker; yields it and its transitions [(time, Transition)]."""
    transitions: list[tuple[float, Transition]] = []
    hc = HealthChecker(lambda tr: transitions.append((time.monotonic(), tr)))
    hc.set_targets(targets)
    task = asyncio.create_task(hc.run())
    try:
        yield hc, transitions
    finally:
        hc.stop()
        await asyncio.wait_for(task, 2)


def of(transitions, key) -> list[Transition]:
    return [tr for _, tr in transitions if tr.key == key]


# -- tests -----------------------------------------------------------------------

def test_tcp_down_within_the_bound_and_up_after_rise(netns):
    async def main():
        m = tcp_monitor(rise=3, fall=2)
        key = ("web", "a")
        srv = await Listener(8001).start()
        async with checker([Target(key, LOCAL, 8001, m)]) as (hc, transitions):
            checks = Checks(hc, key)
            await until(lambda: checks.seen, INTERVAL + 0.1, "the first check")
            assert checks.results()[0][:2] == (True, "check passed")
            assert hc.state(key) == "up" and hc.states() == {key: "up"}
            assert transitions == []            # a passing first check: no transition

            await srv.stop_listening()
            died = time.monotonic()
            seen = await until(lambda: of(transitions, key), bound(m) + 0.5, "down")
            assert seen - died <= bound(m), f"down after {seen - died:.3f}s"
            (tr,) = of(transitions, key)
            assert (tr.old, tr.new, tr.reason) == ("up", "down", "connect: connection refused")
            assert 0 <= tr.duration < m.timeout
            assert hc.state(key) == "down"
            await checks.caught_up()
            fails = [r for r in checks.results() if not r[0]]
            assert len(fails) == m.fall                     # exactly fall failures decided

            n_before = len(checks.seen)
            await srv.start()
            await until(lambda: sum(r[0] for r in checks.results()[n_before:]) >= 2,
                        4 * INTERVAL, "two successful checks")
            assert hc.state(key) == "down"                  # rise 3: not yet
            await until(lambda: len(of(transitions, key)) == 2, 2 * INTERVAL, "up")
            up = of(transitions, key)[1]
            assert (up.old, up.new, up.reason) == ("down", "up", "check passed")
            await checks.caught_up()
            after = [r[0] for r in checks.results()[n_before:]]
            assert after[-3:] == [True, True, True] and sum(after) == 3   # up at the 3rd
            checks.task.cancel()
        await srv.close()

    netns.run(main())


def test_first_check_failing_marks_down_at_once(netns):
    async def main():
        m = tcp_monitor(fall=3)
        key = ("web", "nothing")
        async with checker([Target(key, LOCAL, 8002, m)]) as (hc, transitions):
            assert hc.state(key) == "up" and hc.last_check(key) is None   # provisional
            t0 = time.monotonic()
            seen = await until(lambda: transitions, m.interval + m.timeout + NOISE, "down")
            assert seen - t0 <= m.interval + m.timeout + NOISE
            ok, reason, _ = hc.last_check(key)
            assert not ok and reason == "connect: connection refused"
            (tr,) = of(transitions, key)         # no "up" before it; fall 3 not waited for
            assert (tr.old, tr.new, tr.reason) == ("up", "down", "connect: connection refused")
            await asyncio.sleep(2 * m.interval)
            assert len(of(transitions, key)) == 1 and hc.state(key) == "down"

    netns.run(main())


def test_initial_down_is_decided_by_the_first_check(netns):
    """A control plane that takes over servers it finds down starts them down;
    the first passing check brings one up at once (rise is not waited for)."""
    async def main():
        m = tcp_monitor(rise=3)
        alive, dead = ("web", "alive"), ("web", "dead")
        srv = await Listener(8003).start()
        transitions: list[tuple[float, Transition]] = []
        hc = HealthChecker(lambda tr: transitions.append((time.monotonic(), tr)))
        hc.set_targets([Target(alive, LOCAL, 8003, m), Target(dead, LOCAL, 8004, m)],
                       initial={alive: "down", dead: "down"})
        assert hc.states() == {alive: "down", dead: "down"}
        task = asyncio.create_task(hc.run())
        try:
            await until(lambda: of(transitions, alive), m.interval + m.timeout + NOISE, "up")
            (tr,) = of(transitions, alive)
            assert (tr.old, tr.new, tr.reason) == ("down", "up", "check passed")
            await until(lambda: hc.last_check(dead), m.interval + m.timeout + NOISE, "checked")
            assert hc.state(dead) == "down" and of(transitions, dead) == []
        finally:
            hc.stop()
            await asyncio.wait_for(task, 2)
        await srv.close()

    netns.run(main())


def test_http_status_body_and_host(netns):
    async def main():
        behaviour = HttpBehaviour(hosts={"/a": "svc.example", "/b": "127.0.0.1"})
        srv = await Listener(8003, behaviour).start()
        ma = http_monitor(path="/a", host="svc.example", expect_body="good", rise=1)
        mb = http_monitor(path="/b")                 # Host: the address by default
        ka, kb = ("api", "a"), ("api", "b")
        targets = [Target(ka, LOCAL, 8003, ma), Target(kb, LOCAL, 8003, mb)]
        async with checker(targets) as (hc, transitions):
            await until(lambda: hc.last_check(ka) and hc.last_check(kb), INTERVAL + 0.2,
                        "the first checks")
            assert hc.last_check(ka)[:2] == (True, "check passed"), hc.last_check(ka)
            assert hc.last_check(kb)[:2] == (True, "check passed"), hc.last_check(kb)
            assert transitions == []
            line, headers = next(r for r in srv.requests if r[0].startswith("GET /a "))
            assert line == "GET /a HTTP/1.1"
            assert headers["host"] == "svc.example"
            assert headers["connection"] == "close"
            assert headers["user-agent"] == "xlb-health"
            assert next(h for ln, h in srv.requests if ln.startswith("GET /b "))["host"] \
                == "127.0.0.1"

            behaviour.status = 500                       # the TCP port stays open
            changed = time.monotonic()
            await until(lambda: len(of(transitions, ka)) == 1 and len(of(transitions, kb)) == 1,
                        bound(ma) + 0.3, "both down")
            for key in (ka, kb):
                (tr,) = of(transitions, key)
                assert (tr.old, tr.new) == ("up", "down")
                assert tr.reason == "http status 500, expected 200"
                assert 0 <= tr.duration < TIMEOUT
            assert transitions[-1][0] - changed <= bound(ma)

            behaviour.status = 200
            await until(lambda: len(of(transitions, ka)) == 2, 2 * INTERVAL + 0.2, "a up")
            assert of(transitions, ka)[1].new == "up"    # rise 1

            behaviour.body = b"not what you want"
            await until(lambda: len(of(transitions, ka)) == 3, bound(ma) + 0.3, "a down")
            tr = of(transitions, ka)[2]
            assert (tr.old, tr.new, tr.reason) == ("up", "down", "body lacks 'good'")
            await until(lambda: len(of(transitions, kb)) == 2, 3 * INTERVAL + 0.2, "b up")
            assert hc.state(kb) == "up"                  # b does not look at the body
        await srv.close()

    netns.run(main())


def test_http_server_that_never_answers_times_out(netns):
    async def main():
        srv = await Listener(8004, HttpBehaviour(hang=True)).start()
        m = http_monitor()
        key = ("api", "mute")
        async with checker([Target(key, LOCAL, 8004, m)]) as (hc, transitions):
            await until(lambda: transitions, INTERVAL + TIMEOUT + NOISE, "down")
            (tr,) = of(transitions, key)
            assert (tr.old, tr.new) == ("up", "down")
            assert tr.reason == f"timeout after {TIMEOUT}s (waiting for the response)"
            assert "timeout" in tr.reason
            assert TIMEOUT - 0.005 <= tr.duration <= TIMEOUT + 0.05
            assert srv.requests and srv.requests[0][0] == "GET / HTTP/1.1"   # it was asked
        await srv.close()

    netns.run(main())


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
            async with checker([Target(key, LOCAL, 8005, m)]) as (hc, transitions):
                await until(lambda: transitions, INTERVAL + TIMEOUT + NOISE, "down")
                (tr,) = of(transitions, key)
                assert tr.reason == f"timeout after {TIMEOUT}s (connect)"
                assert TIMEOUT - 0.005 <= tr.duration <= TIMEOUT + 0.05
        finally:
            filler.close()
            lsock.close()

    netns.run(main())


def test_separate_check_port(netns):
    async def main():
        service = await Listener(8006).start()
        check = await Listener(8007).start()
        m = tcp_monitor(port=8007)
        target = Target.for_server("web", Server("s1", LOCAL, 8006), m)
        assert (target.key, target.port) == (("web", "s1"), 8007)
        assert Target.for_server("web", Server("s1", LOCAL, 8006), tcp_monitor()).port == 8006
        async with checker([target]) as (hc, transitions):
            await until(lambda: hc.last_check(target.key), INTERVAL + 0.1, "the first check")
            assert hc.state(target.key) == "up"
            await check.stop_listening()                 # the service port stays open
            died = time.monotonic()
            seen = await until(lambda: transitions, bound(m) + 0.3, "down")
            assert seen - died <= bound(m)
            assert of(transitions, target.key)[0].reason == "connect: connection refused"
            assert service.connections == []            # never the service port
        await service.close()
        await check.close()

    netns.run(main())


def test_type_none_is_never_checked(netns):
    async def main():
        srv = await Listener(8008).start()
        key = ("web", "unchecked")
        m = Monitor("n", "none", interval=INTERVAL, timeout=TIMEOUT)
        async with checker([Target(key, LOCAL, 8008, m)]) as (hc, transitions):
            await asyncio.sleep(3 * INTERVAL)
            assert hc.state(key) == "up" and hc.last_check(key) is None
            assert transitions == [] and srv.connections == []
        await srv.close()

    netns.run(main())


def test_set_targets_while_running(netns):
    async def main():
        a_srv = await Listener(8009).start()
        b_srv = await Listener(8010).start()
        m = tcp_monitor(fall=1)
        ka, kb, kdead = ("p", "a"), ("p", "b"), ("p", "dead")
        a, b = Target(ka, LOCAL, 8009, m), Target(kb, LOCAL, 8010, m)
        dead = Target(kdead, LOCAL, 8011, m)             # nothing listens there
        async with checker([a, dead]) as (hc, transitions):
            await until(lambda: of(transitions, kdead), INTERVAL + TIMEOUT + NOISE, "dead down")
            await until(lambda: hc.last_check(ka), INTERVAL + 0.1, "a checked")
            assert b_srv.connections == []

            # Adding b starts its checks; a and dead keep their state and schedule.
            a_last = hc.last_check(ka)
            hc.set_targets([a, dead, b])
            assert hc.state(kdead) == "down" and hc.last_check(ka) is a_last
            await until(lambda: b_srv.connections and hc.last_check(kb), INTERVAL + 0.2,
                        "b checked")
            assert hc.state(kb) == "up"
            a_count = len(a_srv.connections)
            await asyncio.sleep(2 * INTERVAL)
            assert len(a_srv.connections) - a_count in (1, 2, 3)    # a's rate unchanged
            assert len(of(transitions, kdead)) == 1              # dead: no restart

            # Removing b stops its checks: no more connections to it.
            hc.set_targets([a, dead])
            assert kb not in hc.states()
            with pytest.raises(KeyError):
                hc.state(kb)
            await asyncio.sleep(TIMEOUT + 0.05)                 # a check in flight ends
            b_count = len(b_srv.connections)
            await asyncio.sleep(3 * INTERVAL)
            assert len(b_srv.connections) == b_count

            # A changed Target restarts as new: provisional up, first check decides.
            dead2 = Target(kdead, LOCAL, 8011, tcp_monitor(fall=1, rise=1))
            hc.set_targets([a, dead2])
            assert hc.state(kdead) == "up" and hc.last_check(kdead) is None
            await until(lambda: len(of(transitions, kdead)) == 2,
                        INTERVAL + TIMEOUT + NOISE, "dead down again")
            assert [(t.old, t.new) for t in of(transitions, kdead)] == [("up", "down")] * 2
            assert of(transitions, ka) == [] and hc.state(ka) == "up"
        await a_srv.close()
        await b_srv.close()

    netns.run(main())


def test_fixed_rate_and_spread_first_checks(netns):
    async def main():
        # Each check takes 0.12 s of a 0.2 s interval: checks still start every 0.2 s.
        slow = await Listener(8012, HttpBehaviour(delay=0.12)).start()
        m = http_monitor(timeout=0.18)
        key = ("p", "slow")
        # 20 targets on one port, added together: their first checks spread out.
        fast = await Listener(8013).start()
        many = [Target(("p", f"t{i}"), LOCAL, 8013, tcp_monitor(interval=0.5))
                for i in range(20)]
        async with checker([Target(key, LOCAL, 8012, m), *many]) as (hc, transitions):
            await until(lambda: len(slow.connections) >= 6, 8 * INTERVAL, "six slow checks")
            gaps = [b - a for a, b in zip(slow.connections, slow.connections[1:])]
            assert all(0.15 < g < 0.25 for g in gaps), gaps
            assert abs(sum(gaps) / len(gaps) - INTERVAL) < 0.02, gaps
            assert hc.state(key) == "up" and transitions == []
            firsts = sorted(fast.connections)[:20]
            assert firsts[-1] - firsts[0] > 0.5 / 3, firsts   # not one herd
        await slow.close()
        await fast.close()

    netns.run(main())


def test_callback_errors_do_not_stop_checking(netns):
    async def main():
        calls = []

        def on_change(tr):
            calls.append(tr)
            raise RuntimeError("callback bug")

        checks = []

        def on_check(key, ok, duration):
            checks.append((key, ok, duration))
            raise RuntimeError("metrics bug")

        hc = HealthChecker(on_change, on_check)
        key = ("p", "x")
        hc.set_targets([Target(key, LOCAL, 8014, tcp_monitor(rise=1, fall=1))])
        task = asyncio.create_task(hc.run())
        try:
            await until(lambda: calls, INTERVAL + TIMEOUT + NOISE, "down")
            srv = await Listener(8014).start()
            await until(lambda: len(calls) == 2, 2 * INTERVAL + 0.1, "up again")
            assert [t.new for t in calls] == ["down", "up"]
            assert [ok for _, ok, _ in checks][:1] == [False] and checks[-1][:2] == (key, True)
            assert all(0 <= d < TIMEOUT for _, _, d in checks)
            await srv.close()
        finally:
            hc.stop()
            await asyncio.wait_for(task, 2)

    netns.run(main())


def test_stop_from_another_thread_and_before_run(netns):
    hc = HealthChecker(lambda tr: None)
    hc.set_targets([Target(("p", "x"), LOCAL, 8015, tcp_monitor())])

    async def run_until_stopped():
        await asyncio.wait_for(hc.run(), 3)

    fut = asyncio.run_coroutine_threadsafe(run_until_stopped(), netns.loop)
    time.sleep(0.3)
    hc.stop()                                   # from this (the main) thread
    fut.result(3)
    hc.stop()                                   # before run(): that run returns at once
    netns.run(asyncio.wait_for(hc.run(), 1))


def test_cancelling_run_closes_every_socket(netns):
    async def main():
        fds = len(os.listdir("/proc/self/fd"))
        srv = await Listener(8016).start()
        hc = HealthChecker(lambda tr: None)
        m = tcp_monitor(interval=0.05, timeout=0.04)
        hc.set_targets([Target(("p", f"t{i}"), LOCAL, 8016 + i % 2, m) for i in range(40)])
        task = asyncio.create_task(hc.run())
        await until(lambda: all(hc.last_check(k) for k in hc.states()), 0.5, "every check")
        await asyncio.sleep(0.2)
        assert len(os.listdir("/proc/self/fd")) > fds        # the epoll, pooled sockets
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await srv.close()
        # (the server's own accepted connections may take a moment to close)
        await until(lambda: len(os.listdir("/proc/self/fd")) == fds, 1, "no fd left open")
        assert set(hc.states().values()) == {"up", "down"}   # the state survives run()

    netns.run(main())


def test_validation():
    hc = HealthChecker(lambda tr: None)
    t = Target(("p", "x"), LOCAL, 80, tcp_monitor())
    with pytest.raises(ValueError, match="given twice"):
        hc.set_targets([t, t])
    with pytest.raises(ValueError, match="monitor type"):
        hc.set_targets([Target(("p", "y"), LOCAL, 80, Monitor("m", "udp"))])
    with pytest.raises(ValueError, match="positive"):
        hc.set_targets([Target(("p", "y"), LOCAL, 80, tcp_monitor(interval=0))])
    with pytest.raises(ValueError, match="rise and fall"):
        hc.set_targets([Target(("p", "y"), LOCAL, 80, tcp_monitor(fall=0))])
    hc.set_targets([t])
    assert hc.states() == {t.key: "up"} and hc.last_check(t.key) is None


# -- the http response parser (no sockets) ----------------------------------------

def verdict(data: bytes, eof: bool = False, **kw):
    from xlb.health import _CheckFailed, _http_verdict
    try:
        return _http_verdict(bytearray(data), eof, http_monitor(**kw))
    except _CheckFailed as e:
        return "failed", str(e)


def test_http_parser():
    ok = (True, "check passed")
    assert verdict(b"HTTP/1.1 20") is None                           # read more
    assert verdict(b"HTTP/1.1 200 OK\r\n") == ok                     # no body wanted
    assert verdict(b"HTTP/1.0 200\r\n") == ok                        # no reason phrase
    assert verdict(b"HTTP/1.1 503 Busy\r\n") == (False, "http status 503, expected 200")
    assert verdict(b"HTTP/1.1 204 No\r\n", expect_status=204) == ok
    assert verdict(b"", eof=True) == ("failed", "http: connection closed without a response")
    assert verdict(b"HTTP/1.1 2", eof=True) == \
        ("failed", "http: connection closed before the status line")
    assert verdict(b"SSH-2.0-OpenSSH\r\n")[0] == "failed"            # not http
    assert "malformed status line" in verdict(b"SSH-2.0-OpenSSH\r\n")[1]

    head = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n"
    assert verdict(head + b"hello", expect_body="world") is None     # more to come
    assert verdict(head + b"hello world", expect_body="world") == ok
    assert verdict(head + b"hello there", expect_body="world") == \
        (False, "body lacks 'world'")                                # length reached
    assert verdict(head + b"hello", eof=True, expect_body="world") == \
        (False, "body lacks 'world'")
    assert verdict(b"HTTP/1.1 200 OK\r\nContent-Le", eof=True, expect_body="x") == \
        ("failed", "http: connection closed inside the headers")

    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"3\r\nwor\r\n3;ext=1\r\nld!\r\n")
    assert verdict(chunked, expect_body="world!") == ok              # split across chunks
    assert verdict(chunked, expect_body="world!!") is None           # the body goes on
    assert verdict(chunked + b"0\r\n\r\n", expect_body="world!!") == \
        (False, "body lacks 'world!!'")
    assert verdict(chunked + b"0\r\n\r\n", expect_body="nope") == (False, "body lacks 'nope'")

    big = b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * (64 * 1024) + b"needle"
    assert verdict(big, expect_body="needle") == (False, "body lacks 'needle'")   # 64 KiB
