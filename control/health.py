"""Active health checks (tcp connect, http GET, https GET, udp request), standard library only.

A `Target` is one (pool, server) pair with the address, port and `Monitor` to
check it with; `HealthChecker.set_targets` may replace the set at any time, and
`on_change` hears of every state change as a `Transition`.

Semantics:

- State is "up" or "down". A new target starts "up" provisionally and its
  first check decides at once: a failure marks it down immediately (no `fall`
  wait), a success confirms it up. The provisional state produces no
  transition, so a first check that passes produces none either.
- After the first check: `fall` consecutive failures take an up target down,
  `rise` consecutive successes bring a down target up. Every change calls
  `on_change` exactly once (on the loop's thread), with the reason and the
  duration of the deciding check.
- Monitor type "none": always up, never checked (`last_check` stays None).
- A check the checker cannot make (no socket or local port: its process out
  of file descriptors, the host out of memory or ports) says nothing of the
  server: not counted, no state changes, the last check stays; logged as a
  warning (at most every 10 s), the next check made in its turn.
- tcp: connect within `timeout`, then close with an RST (SO_LINGER 0), so that
  1,000 checks a second leave no TIME_WAIT sockets on either side; a server
  may count these as reset connections.
- http: connect, send `GET {path} HTTP/1.1` with `Host: {host or address[:port]}`,
  `Connection: close`, `User-Agent: xlb-health`; read the status line and the
  headers, up to 64 KiB (and the body, up to 64 KiB, when `expect_body` is set;
  chunked bodies are decoded; lines may end in LF alone). Interim responses
  (1xx but 101) are skipped; the final one's bad status fails at once, a good
  one passes only once the headers are complete.
  Healthy iff the status is `expect_status` (by default any 2xx or 3xx, as
  HAProxy's `option httpchk`) and the body contains `expect_body`.
  The whole check, connect included, is bounded by `timeout`.
- https: the http check over TLS: connect, the TLS handshake, then the same
  request, read the same way (the Host header's default port is 443), all
  within `timeout`. The certificate is not verified (HAProxy's `verify
  none`: the check asks whether the service answers, and backends carry
  internal or self-signed certificates); the server name (SNI) is `host`'s
  name, none when it is an address or not given. A TLS error fails the
  check (`tls: ...`): a handshake refused, a plain-HTTP answer, a
  connection closed during the handshake.
- udp: send the datagram `send_hex` from a fresh connected socket and wait
  for one back: healthy iff it comes (from the server's address and port)
  within `timeout` and, with `expect_hex`, begins with those bytes. An ICMP
  error about the datagram (port, host or network unreachable) fails at
  once; a server that answers nothing (a dead host, a service that drops
  the request) fails by the timeout.
- Fixed rate: a target's checks start every `interval` seconds, counted from
  the previous check's scheduled start, so a slow check does not push later
  ones back; one that overruns the interval is followed at once by the next.
  To share wake-ups, a check may start up to 25 ms (at most interval/10)
  early, never late; the schedule itself does not drift.
  The first check of each target starts at a random offset in [0, interval),
  so targets added together do not check together.
- Hence the promise: a server that dies is marked down at most
  `fall * interval + timeout` (+ 100 ms of scheduling noise) later.
- `mark_down(keys, reason)`: down at once, without waiting for `fall` (the
  link toward the servers went), the reason reported and kept as the last
  check's, with no duration (no check ran); a check in flight is dropped,
  and `rise` passing checks bring it back. Targets of type "none" are left
  as they are.
- `check_now(keys)`: checks them at once, not at their turn (their link is
  back), the next an interval later; a check in flight is dropped for it
  (begun while the link was away, its packets lost, it would fail only by
  its timeout).
- `set_targets`: new keys start checking, removed keys stop (a check in flight
  is abandoned, the state forgotten). A key given again at the same address,
  or renamed (given as such), is the same server: it keeps its state, counts
  and schedule, also when its monitor or port changed, which is a change of
  policy: the counts go on against the new rise and fall (restart if what is
  checked changed), the next check is due the new interval after the last
  (`HealthChecker._edit`). One at another address, or checked for the first
  time (or no longer: type "none"), restarts as new. It may be called before
  `run()` or while it runs; from another thread it is validated at once and
  applied on the loop soon after.
- `run()` checks until cancelled or `stop()` (callable from any thread; a
  `stop()` before `run()` makes that run return at once). The state survives
  for a later `run()`.

Cost: all checks share one timer heap, one loop timer and one epoll (no task or
future per check), and tcp checks reuse their sockets (see `_Probe`): 1,000
tcp targets at interval 1 s take under 10% of a core (netns-lab/bench_health.py).
An https check is a TLS handshake more: about 0.8 ms of CPU each (OpenSSL 3.0's,
over ten times a tcp check) and 40 KiB while in flight (the SSLObject).
Linux only (epoll, SOCK_NONBLOCK, connect(AF_UNSPEC)); IPv4 targets.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import heapq
import os
import random
import re
import resource
import select
import socket
import ssl
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from ipaddress import IPv4Address

from . import log
from .model import BODY_LIMIT, HTTP_TYPES, MONITOR_TYPES, Monitor, Server, check_hex
from .units import quoted

HEAD_LIMIT = 64 * 1024          # http: the most status line + headers read
USER_AGENT = "xlb-health"
_LINGER_RST = struct.pack("ii", 1, 0)
_now = time.monotonic           # heap times; the loop's timer is armed relative to it


def _bug(what: str) -> None:
    """In an except block: a bug of the checker's (or of a callback's), logged
    as xlb logs, with its traceback; the checks go on."""
    log.event("health", level="error", error=f"{what}: {sys.exception()!r}")
    traceback.print_exc()


@dataclass(frozen=True)
class Target:
    key: tuple[str, str]        # (pool name, server name)
    address: IPv4Address
    port: int                   # the port checked (the monitor's port, else the server's)
    monitor: Monitor

    @classmethod
    def for_server(cls, pool: str, server: Server, monitor: Monitor) -> Target:
        """The target checking `server` of `pool` with `monitor`."""
        return cls((pool, server.name), server.address,
                   monitor.port if monitor.port is not None else server.port, monitor)


@dataclass(frozen=True)
class Transition:
    key: tuple[str, str]
    old: str                    # "up" / "down"
    new: str
    reason: str                 # the deciding check's outcome, e.g. "connect: connection refused"
    duration: float | None      # seconds the deciding check took; None: no check (mark_down)


class _Entry:
    """A target's state, its next scheduled check and its check in flight."""
    __slots__ = ("target", "sockaddr", "request", "expect", "sni", "probe_type", "slack", "state",
                 "checked", "successes", "failures", "last", "next_start", "seq", "probe")

    def __init__(self, target: Target):
        self.aim(target)
        self.state = "up"
        self.checked = False            # the first check has decided
        self.successes = 0
        self.failures = 0
        self.last: tuple[bool, str, float | None] | None = None
        self.next_start = 0.0           # loop time the next check is due
        self.seq = 0                    # the heap item of the next check; 0: none
        self.probe: _Probe | None = None

    def aim(self, target: Target) -> None:
        """Checks `target` from now on (a new key, monitor or port: see _apply)."""
        m = target.monitor
        self.target = target
        self.sockaddr = (str(target.address), target.port)
        self.slack = min(_SLACK, m.interval / 10)
        self.request = self.expect = b""
        self.sni = None
        self.probe_type = _Probe
        if m.type == "udp":
            self.probe_type = _UdpProbe
            self.request = bytes.fromhex(m.send_hex)
            self.expect = bytes.fromhex(m.expect_hex or "")
        elif m.type in HTTP_TYPES:
            default_port = 80
            if m.type == "https":
                self.probe_type, self.sni, default_port = _HttpsProbe, _server_name(m.host), 443
            # As a client writes the authority of http(s)://ADDRESS:PORT/ (RFC 9110 7.2).
            host = m.host or (f"{target.address}" if target.port == default_port
                              else f"{target.address}:{target.port}")
            self.request = (f"GET {m.path} HTTP/1.1\r\nHost: {host}\r\n"
                            f"Connection: close\r\nUser-Agent: {USER_AGENT}\r\n"
                            f"Accept: */*\r\n\r\n").encode("latin-1", "replace")


class _CheckFailed(Exception):
    pass


def _os_reason(op: str, code: int) -> str:
    return f"{op}: {os.strerror(code).lower()}"


def _validate(t: Target) -> None:
    m = t.monitor
    if m.type not in MONITOR_TYPES:
        raise ValueError(f"{t.key}: monitor type {m.type!r} is not one of {MONITOR_TYPES}")
    if m.type == "none":
        return
    if not m.interval > 0 or not m.timeout > 0:
        raise ValueError(f"{t.key}: interval and timeout must be positive")
    if m.rise < 1 or m.fall < 1:
        raise ValueError(f"{t.key}: rise and fall must be at least 1")
    if not 1 <= t.port <= 65535:
        raise ValueError(f"{t.key}: port {t.port} is out of range 1-65535")
    if m.type == "udp":
        if m.send_hex is None:
            raise ValueError(f"{t.key}: a udp monitor needs send_hex")
        try:
            for text in (m.send_hex, m.expect_hex):
                if text is not None:
                    check_hex(text)
        except ValueError as e:
            raise ValueError(f"{t.key}: {e}") from None


def _same_server(old: Target, new: Target) -> bool:
    """Whether `new` checks the server `old` did: the same address, and checked
    before as now (one checked for the first time, or no longer, starts anew)."""
    return old.address == new.address and \
        (old.monitor.type == "none") == (new.monitor.type == "none")


# A monitor's fields that say how often and how strictly it checks, not what:
# an edit of these alone leaves the checks so far counting.
_POLICY = ("name", "interval", "timeout", "rise", "fall")


def _same_check(a: Target, b: Target) -> bool:
    """Whether a and b check the same thing, their monitors' policies aside."""
    policy = {f: getattr(a.monitor, f) for f in _POLICY}
    return (a.address, a.port) == (b.address, b.port) and \
        replace(b.monitor, **policy) == a.monitor


_FIRE, _TIMEOUT = 0, 1          # kinds of heap items
# A check the checker cannot make says nothing of the server: its own process
# or host out of file descriptors (systemd's default soft limit is 1,024, which
# checks of a thousand unreachable servers waiting out their timeouts hold),
# buffers, memory or local ports. Not counted (no state changes, the last check
# stays), warned of, the next made in its turn; counted a failure, it took
# every server down, reachable or not.
_LOCAL_ERRORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
                           errno.EADDRNOTAVAIL))
_UNMADE_WARN_SECONDS = 10.0     # at most one warning of checks not made so often
_SWEEP_SLACK = 64               # stale heap items beyond the live ones' bound before a sweep
_SLACK = 0.025                  # a check may start this much early (at most interval/10)
                                # to share a wake-up: each wake-up of an idle thread
                                # costs about what ten checks do


class HealthChecker:
    """See the module docstring. All work happens on the loop running `run()`."""

    def __init__(self, on_change: Callable[[Transition], None],
                 on_check: Callable[[tuple[str, str], bool, float], None] | None = None):
        """on_check(key, ok, duration), if given, hears of every check (for metrics)."""
        self._on_change = on_change
        self._on_check = on_check
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._stop_requested = False
        self._lock = threading.Lock()   # guards _loop, _stop_requested, and _entries before run()
        # While running: one heap of (when, seq, kind, object) for every due check
        # and timeout, one loop timer for its head, one epoll for every socket.
        self._heap: list[tuple[float, int, int, object]] = []
        self._seq = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0
        self._ticking = False
        self._epoll: select.epoll | None = None
        self._probes: dict[int, _Probe] = {}     # fd -> the check it belongs to
        self._idle: list[tuple[socket.socket, int]] = []   # tcp sockets to reuse
        self._pooling = True
        self._unmade = 0                # checks not made (_LOCAL_ERRORS) since the last warning
        self._unmade_warned = -_UNMADE_WARN_SECONDS

    # -- queries ---------------------------------------------------------------

    def state(self, key: tuple[str, str]) -> str:
        return self._entries[key].state

    def states(self) -> dict[tuple[str, str], str]:
        return {k: e.state for k, e in list(self._entries.items())}

    def last_check(self, key: tuple[str, str]) -> tuple[bool, str, float | None] | None:
        """(ok, reason, duration) of the latest check; None before the first.
        A duration of None: no check ran, mark_down took the target down."""
        return self._entries[key].last

    # -- control ---------------------------------------------------------------

    def set_targets(self, targets: Iterable[Target],
                    initial: Mapping[tuple[str, str], str] = {},
                    renamed: Mapping[tuple[str, str], tuple[str, str] | None] = {}) -> None:
        """`initial`: the state a new target starts in ("up" if not given), as
        when a restarted control plane takes over servers found down; the first
        check decides at once either way. `renamed`: the keys that targets had
        before (old: new, None for gone or a new server under the same key):
        a target under its new key is no new target, and keeps its state,
        counts and schedule as one under the same key does."""
        new: dict[tuple[str, str], Target] = {}
        for t in targets:
            _validate(t)
            if t.key in new:
                raise ValueError(f"{t.key}: given twice")
            new[t.key] = t
        initial = {k: initial[k] for k in new if initial.get(k) == "down"}
        renamed = dict(renamed)
        with self._lock:
            loop = self._loop
            if loop is None:
                self._apply(new, initial, renamed)
                return
        if self._in_loop_thread(loop):
            self._apply(new, initial, renamed)
        else:
            loop.call_soon_threadsafe(self._apply, new, initial, renamed)

    def mark_down(self, keys: Iterable[tuple[str, str]], reason: str) -> None:
        """Takes these targets down at once, without waiting for `fall` failed
        checks (their link toward the servers went: linkwatch.LinkWatch), as a
        failed check would: the change reported with `reason`, which their
        last check shows; they come back after `rise` passing checks. Runs on
        the loop's thread."""
        for key in keys:
            entry = self._entries.get(key)
            if entry is None or entry.target.monitor.type == "none":
                continue
            # No pass from before the link went counts toward rise, nor one
            # in flight as it went.
            entry.successes, entry.failures = 0, entry.target.monitor.fall
            if _drop_probe(entry):
                entry.next_start = max(entry.next_start + entry.target.monitor.interval, _now())
                entry.seq = self._push(entry.next_start, _FIRE, entry)
            # No check ran: no duration to show, log or count (on_check hears nothing).
            entry.checked, entry.last = True, (False, reason, None)
            if entry.state == "up":
                entry.state = "down"
                self._report(Transition(key, "up", "down", reason, None))

    def check_now(self, keys: Iterable[tuple[str, str]]) -> None:
        """Checks these targets now, not at their turn (their link is back:
        linkwatch.LinkWatch), the next an interval later. A check in flight is
        dropped, counting nothing: it began while the link was away
        (mark_down dropped those from before), its packets were lost with
        it, and it would hold the server down until its timeout. Runs on the
        loop's thread."""
        if self._loop is None:
            return
        for key in keys:
            entry = self._entries.get(key)
            if entry is None:
                continue
            if not _drop_probe(entry) and not entry.seq:     # not checked (type none)
                continue
            entry.next_start = _now()
            entry.seq = self._push(entry.next_start, _FIRE, entry)

    def stop(self) -> None:
        with self._lock:
            self._stop_requested = True
            loop, event = self._loop, self._stop_event
        if loop is None or event is None:
            return
        if self._in_loop_thread(loop):
            event.set()
        else:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:        # the loop closed meanwhile: run() has ended
                pass

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._loop is not None:
                raise RuntimeError("HealthChecker.run() is already running")
            self._epoll = select.epoll()
            loop.add_reader(self._epoll.fileno(), self._on_events)
            self._loop = loop
            self._stop_event = asyncio.Event()
            if self._stop_requested:
                self._stop_event.set()
            for entry in self._entries.values():
                self._start(entry)
        try:
            await self._stop_event.wait()
        finally:
            for entry in self._entries.values():
                self._halt(entry)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._heap.clear()
            for sock, fd in self._idle:
                self._epoll.unregister(fd)
                sock.close()
            self._idle.clear()
            loop.remove_reader(self._epoll.fileno())
            self._epoll.close()
            self._epoll = None
            with self._lock:
                self._loop = self._stop_event = None
                self._stop_requested = False

    # -- scheduling ------------------------------------------------------------
    # No task per target, no asyncio timer per check: 1,000 checks a second
    # through tasks, futures and timeout scopes cost several times the sockets'
    # own cost. Stale heap items (a removed target, a finished check) are skipped
    # when they come up: an item is live while its seq is still its object's.

    @staticmethod
    def _in_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
        try:
            return asyncio.get_running_loop() is loop
        except RuntimeError:
            return False

    def _apply(self, new: dict[tuple[str, str], Target],
               initial: Mapping[tuple[str, str], str],
               renamed: Mapping[tuple[str, str], tuple[str, str] | None]) -> None:
        kept: dict[tuple[str, str], _Entry] = {}
        for key, entry in self._entries.items():
            to = renamed.get(key, key)
            target = new.get(to) if to is not None and to not in kept else None
            if target is not None and _same_server(entry.target, target):
                self._edit(entry, target)
                kept[to] = entry
            else:
                self._halt(entry)
        self._entries = kept
        for key, target in new.items():
            if key not in self._entries:
                entry = self._entries[key] = _Entry(target)
                entry.state = initial.get(key, "up")
                if self._loop is not None:
                    self._start(entry)

    def _edit(self, entry: _Entry, target: Target) -> None:
        """The server entry checks, renamed or with its monitor or port edited:
        a change of policy, not a new server (as HAProxy keeps a server's state
        and health counter across a reload). Its state goes on, and so do its
        counts, against the new rise and fall: a count already past the new
        one decides at the next check, not now (only a check changes a
        state). An edit of what is checked (port, type, path, expected
        answer...) starts the counts again, as those measured the old check,
        and drops a check of it in flight; the state still waits for rise or
        fall checks of the new one, not the first alone as a new server's does.
        A check in flight of the same thing finishes and counts. The next check
        is due the new interval after the last one was due (or the dropped
        one), or at once if that time has passed."""
        old = entry.target
        entry.aim(target)
        last = None
        if not _same_check(old, target):
            entry.successes = entry.failures = 0
            if _drop_probe(entry):
                last = entry.next_start
        if last is None and entry.seq and target.monitor.interval != old.monitor.interval:
            last = entry.next_start - old.monitor.interval
        if last is not None:
            entry.next_start = max(last + target.monitor.interval, _now())
            entry.seq = self._push(entry.next_start, _FIRE, entry)

    def _start(self, entry: _Entry) -> None:
        m = entry.target.monitor
        if m.type == "none" or entry.seq or entry.probe is not None:
            return
        entry.next_start = _now() + random.uniform(0, m.interval)
        entry.seq = self._push(entry.next_start, _FIRE, entry)

    def _halt(self, entry: _Entry) -> None:
        entry.seq = 0
        _drop_probe(entry)

    def _push(self, when: float, kind: int, obj: object) -> int:
        self._seq += 1
        heap = self._heap
        # Stale items wait for their time, up to an interval (a day at most),
        # a removed target's entry with them: a link that flaps (check_now), or
        # applies that remove or edit targets, added one each time, without
        # end. Swept once they may outnumber the live ones, at most two a
        # target (its next check, its check's timeout): amortized O(1) a push.
        # In place: _run_due holds the list.
        if len(heap) > 4 * len(self._entries) + _SWEEP_SLACK:
            heap[:] = [item for item in heap if _live(item)]
            heapq.heapify(heap)
        heapq.heappush(heap, (when, self._seq, kind, obj))
        if not self._ticking and (self._timer is None or when < self._timer_when):
            self._arm(when)
        return self._seq

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(when - _now(), self._tick)
        self._timer_when = when

    def _tick(self) -> None:
        self._timer = None
        self._ticking = True            # _push arms no timer meanwhile: one at the end
        try:
            self._run_due()
        finally:
            self._ticking = False
            if self._heap and self._loop is not None:
                self._arm(self._heap[0][0])

    def _run_due(self) -> None:
        # Woken at the earliest due time; also start every check whose window
        # [due - slack, due] is open. Timeouts have no slack: never early.
        heap = self._heap
        now = _now()
        later: list[tuple[float, int, int, object]] = []
        while heap and heap[0][0] <= now + _SLACK:
            item = heapq.heappop(heap)
            when, seq, kind, obj = item
            try:
                if not _live(item):
                    continue                # the target was removed or restarted, the check ended
                if kind == _FIRE:
                    if when - obj.slack > now:
                        later.append(item)
                        continue
                    obj.seq = 0
                    self._fire(obj)
                elif when > now:
                    later.append(item)
                else:
                    obj.on_timeout()
            except Exception:
                _bug("scheduling failed")
        for item in later:
            heapq.heappush(heap, item)

    def _fire(self, entry: _Entry) -> None:
        probe = entry.probe = entry.probe_type(self, entry)
        probe.begin()

    def _on_events(self) -> None:
        probes = self._probes
        for fd, events in self._epoll.poll(0, 1024):
            probe = probes.get(fd)
            if probe is not None:
                probe.on_event(events)

    def _finished(self, entry: _Entry, result: tuple[bool, str] | None,
                  duration: float) -> None:
        """A check ended (result None: it broke unexpectedly; no state change)."""
        entry.probe = None
        if result is not None:
            self._record(entry, result[0], result[1], duration)
        # on_change may have removed this target or stopped the checker.
        if self._loop is None or self._entries.get(entry.target.key) is not entry:
            return
        if entry.seq or entry.probe is not None:
            return
        now = _now()
        entry.next_start += entry.target.monitor.interval
        if entry.next_start < now:
            entry.next_start = now
        entry.seq = self._push(entry.next_start, _FIRE, entry)

    def _record(self, entry: _Entry, ok: bool, reason: str, duration: float) -> None:
        entry.last = (ok, reason, duration)
        if self._on_check is not None:
            try:
                self._on_check(entry.target.key, ok, duration)
            except Exception:       # a metrics bug must not stop this target's checks
                _bug(f"on_check callback failed for {'/'.join(entry.target.key)}")
        old = entry.state
        if ok:
            entry.successes += 1
            entry.failures = 0
            if old == "down" and (not entry.checked or
                                  entry.successes >= entry.target.monitor.rise):
                entry.state = "up"
        else:
            entry.failures += 1
            entry.successes = 0
            if old == "up" and (not entry.checked or
                                entry.failures >= entry.target.monitor.fall):
                entry.state = "down"
        entry.checked = True
        if entry.state != old:
            self._report(Transition(entry.target.key, old, entry.state, reason, duration))

    def _not_made(self, entry: _Entry, code: int) -> None:
        self._unmade += 1
        now = _now()
        if now - self._unmade_warned >= _UNMADE_WARN_SECONDS:
            log.event("health", level="warning",
                      error=f"{self._unmade} check(s) not made, no server's state changed for "
                            f"them ({os.strerror(code).lower()}, the last of "
                            f"{'/'.join(entry.target.key)}); open files at most "
                            f"{resource.getrlimit(resource.RLIMIT_NOFILE)[0]} (ulimit -n, "
                            f"systemd's LimitNOFILE)")
            self._unmade, self._unmade_warned = 0, now

    def _report(self, tr: Transition) -> None:
        try:
            self._on_change(tr)
        except Exception:
            _bug(f"on_change callback failed for {tr}")


_PHASES = {"connect": "connect", "tls": "the TLS handshake", "send": "sending the request",
           "recv": "waiting for the response"}
_EPOLLOUT, _EPOLLIN, _ONESHOT = select.EPOLLOUT, select.EPOLLIN, select.EPOLLONESHOT
_STREAM_NONBLOCK = socket.SOCK_STREAM | socket.SOCK_NONBLOCK   # one syscall, not two
_DGRAM_NONBLOCK = socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
_IP_RECVERR = getattr(socket, "IP_RECVERR", 11)     # <linux/in.h>; Python 3.11 lacks the name
_Socket = socket.SocketType     # the C socket type: no Python-level wrapper per check
_POOL_MAX = 256                 # idle tcp sockets kept for reuse


def _libc_disconnect():
    """connect(fd, {AF_UNSPEC}) from libc, or None where it cannot be loaded."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).connect
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    fn.restype = ctypes.c_int
    unspec = ctypes.create_string_buffer(16)    # struct sockaddr, sa_family 0 = AF_UNSPEC
    return lambda fd: fn(fd, unspec, 16)


_disconnect = _libc_disconnect()


def _live(item: tuple[float, int, int, object]) -> bool:
    """Whether a heap item still stands: a target's next check (its seq still
    the entry's), or the timeout of a check in flight."""
    _, seq, kind, obj = item
    return obj.seq == seq and (kind == _FIRE or not obj.ended)


def _drop_probe(entry: _Entry) -> bool:
    """Drops entry's check in flight, which reports nothing; whether one was."""
    if entry.probe is None:
        return False
    entry.probe.abort()
    entry.probe = None
    return True


class _Probe:
    """One check in flight: a non-blocking socket in the checker's epoll.

    Every path ends in `_end` exactly once, or in `abort`, which reports nothing.

    tcp checks reuse their sockets: connect(AF_UNSPEC) on Linux resets a TCP
    socket to CLOSE (sending the RST that a close with SO_LINGER 0 would), and
    the socket can connect again. That saves a socket(), a close() and two
    epoll registrations per check: 8.6% -> 6.0% of a core for 1,000 targets
    in netns-lab/bench_health.py. A pooled socket
    stays in the epoll, disarmed (EPOLLONESHOT), between checks; it is re-armed
    only after its new connect() has begun, so no event of an earlier
    connection can reach a later check. Sockets that end unusually (timeout,
    abort, an immediate connect error) are closed, not pooled.
    """
    __slots__ = ("checker", "entry", "sock", "fd", "registered", "mapped", "phase",
                 "start", "timeout", "seq", "out", "reader", "ended")

    def __init__(self, checker: HealthChecker, entry: _Entry):
        self.checker, self.entry = checker, entry
        self.sock = None
        self.fd = -1
        self.registered = False         # in the checker's epoll
        self.mapped = False             # in checker._probes (its events come here)
        self.phase = "connect"
        self.start = _now()
        # Its own: an edit of the monitor meanwhile applies from the next check on.
        self.timeout = entry.target.monitor.timeout
        self.seq = checker._push(self.start + self.timeout, _TIMEOUT, self)   # of its timeout
        self.ended = False

    def begin(self) -> None:
        checker, entry = self.checker, self.entry
        tcp = not entry.request
        try:
            if tcp and checker._idle:
                self.sock, self.fd = checker._idle.pop()
                self.registered = True
            else:
                self.sock = _Socket(socket.AF_INET, _STREAM_NONBLOCK)
                self.fd = self.sock.fileno()
                if tcp:     # close with an RST: no TIME_WAIT on either side
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            err = self.sock.connect_ex(entry.sockaddr)
            if err == errno.EINPROGRESS:
                self._watch(_EPOLLOUT | _ONESHOT if tcp else _EPOLLOUT)
            elif err == 0:
                self._connected()
            elif err in _LOCAL_ERRORS:
                self._not_made(err)
            else:
                self._end((False, _os_reason("connect", err)))
        except OSError as e:
            self._failed(e)
        except Exception:
            self._broken()

    def _failed(self, e: OSError) -> None:
        """The check ends with `e`, or is not made for want of the checker's own."""
        if e.errno in _LOCAL_ERRORS:
            self._not_made(e.errno)
        else:
            self._end((False, _os_reason(self.phase, e.errno) if e.errno
                       else f"{self.phase}: {e}"))

    def _not_made(self, code: int) -> None:
        """The check could not begin, for want of the checker's own (_LOCAL_ERRORS)."""
        self.checker._not_made(self.entry, code)
        self._end(None)

    def _watch(self, events: int) -> None:
        checker = self.checker
        if self.registered:
            checker._epoll.modify(self.fd, events)
        else:
            checker._epoll.register(self.fd, events)
            self.registered = True
        if not self.mapped:
            checker._probes[self.fd] = self
            self.mapped = True

    def abort(self) -> None:
        """Stop without reporting (the target was removed, or run() ended)."""
        if not self.ended:
            self.ended = True
            self._release(False)

    def _release(self, reuse: bool) -> None:
        checker, sock = self.checker, self.sock
        if sock is None:
            return
        self.sock = None
        if self.mapped:
            del checker._probes[self.fd]
            self.mapped = False
        if (reuse and self.registered and not self.entry.request and _disconnect is not None
                and checker._pooling and len(checker._idle) < _POOL_MAX):
            if _disconnect(self.fd) == 0:
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)   # clear ECONNRESET
                checker._idle.append((sock, self.fd))
                return
            checker._pooling = False
            log.event("health", level="warning",
                      error=f"connect(AF_UNSPEC) failed ({os.strerror(ctypes.get_errno())}); "
                            f"not reusing sockets")
        if self.registered:
            # Unregister before closing: a copy of the fd in a forked child would
            # otherwise keep the registration, and its events, alive.
            checker._epoll.unregister(self.fd)
            self.registered = False
        sock.close()

    def _end(self, result: tuple[bool, str] | None, reuse: bool = False) -> None:
        if self.ended:
            return
        self.ended = True
        try:
            self._release(reuse)
        except Exception:
            _bug("releasing a socket failed")
        self.checker._finished(self.entry, result, _now() - self.start)

    def _broken(self) -> None:
        _bug(f"the check of {'/'.join(self.entry.target.key)} failed unexpectedly")
        self._end(None)

    def on_timeout(self) -> None:
        self._end((False, f"timeout after {float(self.timeout)}s ({self._doing()})"))

    def _doing(self) -> str:
        """What the check was at as its time ran out: a body being read that
        lacks expect_body so far (one left open, no length nor chunks, or
        shorter than its length) is no server that has not answered."""
        if self.phase == "recv" and self.reader.body_at is not None:
            return f"reading the body, no {quoted(self.reader.m.expect_body)} in it so far"
        return _PHASES[self.phase]

    def on_event(self, events: int) -> None:
        try:
            if self.phase == "connect":
                err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    # An EPOLLONESHOT event has fired: the pooled socket is disarmed.
                    return self._end((False, _os_reason("connect", err)), reuse=True)
                self._connected()
            elif self.phase == "send":
                self._send()
            else:
                self._recv()
        except OSError as e:
            self._end((False, _os_reason(self.phase, e.errno) if e.errno
                       else f"{self.phase}: {e}"))
        except Exception:
            self._broken()

    def _connected(self) -> None:
        if not self.entry.request:
            return self._end((True, "check passed"), reuse=self.registered)
        self._request(self.entry.request)

    def _request(self, out: bytes) -> None:
        """Sends `out` (the request, as it goes on the wire), then reads the answer."""
        self.phase = "send"
        self.out = out
        self.reader = _HttpReader(self.entry.target.monitor)
        self._send()

    def _put(self) -> None:
        """Sends what of `out` the socket takes now."""
        try:
            n = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            n = 0
        self.out = self.out[n:]

    def _send(self) -> None:
        self._put()
        if self.out:
            self._watch(_EPOLLOUT)
        else:
            self.phase = "recv"
            self._watch(_EPOLLIN)

    def _recv(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        self._feed(data, not data)

    def _feed(self, data: bytes, eof: bool) -> None:
        """The response's next bytes (eof: the server closed) to its reader."""
        try:
            verdict = self.reader.feed(data, eof)
        except _CheckFailed as e:
            verdict = (False, str(e))
        if verdict is not None:
            self._end(verdict)


_tls_context: ssl.SSLContext | None = None     # made by the first https check


def _tls() -> ssl.SSLContext:
    """The https checks' TLS client context: no certificate verified, hence no
    host name checked either (module docstring)."""
    global _tls_context
    if _tls_context is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        _tls_context = context
    return _tls_context


def _server_name(host: str | None) -> str | None:
    """The SNI of the Host header `host`: its name, without port or final
    dot; None for an address (RFC 6066 has no place for one) or a name that
    is no DNS name (an empty or overlong label), which TLS cannot carry."""
    if host is None or host.startswith("["):
        return None
    name = host.partition(":")[0].rstrip(".")
    try:
        IPv4Address(name)
        return None
    except ValueError:
        pass
    try:
        name.encode("idna")
    except UnicodeError:
        return None
    return name or None


# How a plain-HTTP server's answer to the TLS hello begins: its status line,
# or a page with none (HTTP/0.9's way, as Python's http.server answers a
# request line it cannot read).
_PLAIN_HTTP = (b"HTTP/", b"<")


class _HttpsProbe(_Probe):
    """An https check: the http check (_Probe's request, _HttpReader) over TLS.
    TLS runs in memory (ssl.MemoryBIO) over the probe's own non-blocking
    socket, so the handshake is more events of the same epoll, in phase
    "tls"; the base's on_event hands every event after the connect and
    outside "send" to _recv. No socket is reused (_release: it has a request)."""
    __slots__ = ("tls", "tls_in", "tls_out", "heard")

    def _connected(self) -> None:
        self.tls_in, self.tls_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = _tls().wrap_bio(self.tls_in, self.tls_out,
                                   server_hostname=self.entry.sni)
        self.phase, self.out, self.heard = "tls", b"", b""
        self._tls_step(self._handshake)

    def _recv(self) -> None:
        self._tls_step(self._shake if self.phase == "tls" else self._read)

    def _tls_step(self, step: Callable[[], None]) -> None:
        try:
            step()
        except ssl.SSLError as e:
            if self.phase == "tls" and self.heard.startswith(_PLAIN_HTTP):
                reason = "the server answered in plain HTTP, not TLS"
            else:       # OpenSSL's reason, as its tools print it: "wrong version number"
                reason = (e.reason or str(e)).lower().replace("_", " ")
            self._end((False, f"tls: {reason}"))

    def _handshake(self) -> None:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self.out = self.tls_out.read()      # none when the server's flight is not all in
            if self.out:
                self._put()
            self._watch(_EPOLLOUT if self.out else _EPOLLIN)
            return
        self.tls.write(self.entry.request)
        self._request(self.tls_out.read())     # the handshake's last flight, then the request

    def _shake(self) -> None:
        """The handshake's event: room for what it has to send, or the server's bytes."""
        if self.out:
            self._put()
            if not self.out:
                self._watch(_EPOLLIN)
            return
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            return self._end((False, "tls: connection closed during the handshake"))
        if len(self.heard) < len(_PLAIN_HTTP[0]):
            self.heard += data[:len(_PLAIN_HTTP[0])]
        self.tls_in.write(data)
        self._handshake()

    def _read(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        if data:
            self.tls_in.write(data)
        else:
            self.tls_in.write_eof()
        plain, eof = bytearray(), not data
        while True:
            try:
                chunk = self.tls.read(65536)
            except ssl.SSLWantReadError:
                break
            # Closed with TLS's close_notify (b"" or SSLZeroReturnError) or, as
            # many servers do, without.
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                chunk = b""
            if not chunk:
                eof = True
                break
            plain += chunk
        if plain or eof:
            self._feed(bytes(plain), eof)


class _UdpProbe(_Probe):
    """A udp check: one datagram from a fresh connected socket, and one awaited
    back. Connected, the socket takes datagrams from the server's address and
    port alone, and hears of the ICMP errors its own met: port unreachable
    (ECONNREFUSED) and, with IP_RECVERR, those a router sends (host or
    network unreachable) too. No socket is reused: one that heard of an
    error, or whose reply came late, would tell the next check of it."""
    __slots__ = ()

    def begin(self) -> None:
        entry = self.entry
        try:
            self.sock = sock = _Socket(socket.AF_INET, _DGRAM_NONBLOCK)
            self.fd = sock.fileno()
            sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
            sock.connect(entry.sockaddr)        # a route lookup: no packet is sent
            self.phase = "send"
            sock.send(entry.request)
            self.phase = "recv"
            self._watch(_EPOLLIN)
        except OSError as e:
            self._failed(e)
        except Exception:
            self._broken()

    def on_event(self, events: int) -> None:
        want = self.entry.expect
        try:
            # A byte past what is expected tells a longer reply; the rest is not read.
            data = self.sock.recv(len(want) + 1)
        except (BlockingIOError, InterruptedError):
            return
        except ConnectionRefusedError:
            # strerror's words are TCP's: here no socket was bound to the port.
            return self._end((False, _os_reason(self.phase, errno.ECONNREFUSED)
                              + " (port unreachable)"))
        except OSError as e:
            return self._failed(e)
        except Exception:
            return self._broken()
        if data.startswith(want):
            return self._end((True, "check passed"))
        self._end((False, _udp_mismatch(data, want)))

    def _doing(self) -> str:
        return "waiting for a reply"


_SHOWN_BYTES = 32       # of a reply and of expect_hex, in a failed udp check's reason


def _hex_start(data: bytes, upto: int) -> str:
    """data's first bytes (up to upto, at most _SHOWN_BYTES) in hex, with "..."
    if it has more."""
    n = min(upto, _SHOWN_BYTES)
    return data[:n].hex() + ("..." if len(data) > n else "")


def _udp_mismatch(data: bytes, want: bytes) -> str:
    """A failed udp check's reason: the reply (data, read up to a byte past
    want) and expect_hex from where they part, when their first bytes shown
    are the same (else the two would read alike)."""
    at = next((i for i, (a, b) in enumerate(zip(data, want)) if a != b), len(data))
    if at < _SHOWN_BYTES:
        got = f"reply {_hex_start(data, len(want))}" if data else "empty reply"
        return f"udp: {got}, expected one beginning {_hex_start(want, len(want))}"
    then = _hex_start(data[at:], len(want) - at) if data[at:] else "its end"
    return (f"udp: reply as expected for {at} bytes, then {then}, expected "
            f"{_hex_start(want[at:], len(want) - at)}")


_HEAD_END = re.compile(rb"\n\r?\n")     # the blank line after the headers
_CHUNK_LINE_MAX = 1024                  # a chunk's size line, extensions and all
_HEX = b"0123456789abcdefABCDEF"


class _HttpReader:
    """An http check's response, parsed as it comes: each read goes on from
    where the last one stopped, so a server that trickles its answer a byte at
    a time costs each byte once, not a parse of everything so far."""
    __slots__ = ("m", "want", "buf", "line", "status", "status_end", "scan", "body_at",
                 "length", "chunked", "searched", "body", "at", "left", "ended")

    def __init__(self, m: Monitor):
        self.m = m
        self.want = None if m.expect_body is None else m.expect_body.encode()
        self.buf = bytearray()
        self.line = 0           # where the status line being read starts (past interim responses)
        self.status = None      # that line's status, once the line is whole
        self.status_end = 0
        self.scan = 0           # where the next look for a line's end starts
        self.body_at = None     # where the body starts: the final head is whole and passed
        self.length, self.chunked = None, False
        self.searched = 0       # how far expect_body has been looked for
        self.body = bytearray()     # a chunked body's data
        self.at = 0                 # ... and where its framing is read next
        self.left = None            # ... bytes of a chunk's data to come; None: a size line
        self.ended = False          # ... its last chunk came, or its framing broke

    def feed(self, data: bytes, eof: bool) -> tuple[bool, str] | None:
        """The check's outcome with `data` read (eof: the server closed); None: read more."""
        self.buf += data
        if self.body_at is None:
            verdict = self._head(eof)
            if verdict is not None or self.body_at is None:
                return verdict
        return self._body(eof)

    def _head(self, eof: bool) -> tuple[bool, str] | None:
        # Lines end in CRLF or, as RFC 9112 lets a recipient accept (and HAProxy
        # does), LF alone: small servers (a script behind nc, firmware) send those.
        buf, m = self.buf, self.m
        while True:
            if self.status is None:
                end = buf.find(b"\n", self.scan)
                if end < 0:
                    self.scan = len(buf)
                    if eof:
                        raise _CheckFailed("http: connection closed before the status line"
                                           if len(buf) > self.line else
                                           "http: connection closed without a response")
                    if len(buf) > HEAD_LIMIT:
                        raise _CheckFailed("http: no status line in the first 64 KiB")
                    return None
                line = bytes(buf[self.line:end]).rstrip(b"\r")
                parts = line.split(None, 2)
                if (len(parts) < 2 or not parts[0].startswith(b"HTTP/") or len(parts[1]) != 3
                        or not parts[1].isdigit()):
                    raise _CheckFailed(f"http: malformed status line {line[:80]!r}")
                self.status, self.status_end, self.scan = int(parts[1]), end, end
            status = self.status
            # An interim response (1xx but 101, e.g. 103 Early Hints) precedes the
            # final one, which decides (RFC 9110: a client must accept them).
            final = not (100 <= status < 200 and status not in (101, m.expect_status))
            if final and m.expect_status is None and not 200 <= status < 400:
                return False, f"http status {status}, expected 2xx or 3xx"
            if final and m.expect_status is not None and status != m.expect_status:
                return False, f"http status {status}, expected {m.expect_status}"
            # A good status passes only with the headers' end: a server that dies or
            # stalls right after its status line has not answered (HAProxy: "invalid
            # response").
            blank = _HEAD_END.search(buf, self.scan)
            if blank is None:
                self.scan = max(self.status_end, len(buf) - 2)  # "\n\r" may end this read
                if eof:
                    raise _CheckFailed("http: connection closed inside the headers")
                if len(buf) > HEAD_LIMIT:
                    raise _CheckFailed("http: headers longer than 64 KiB")
                return None
            if final:
                break
            self.line = self.scan = blank.end()
            self.status = None
        if self.want is None:
            return True, "check passed"
        for h in bytes(buf[self.status_end + 1:blank.start()]).split(b"\n"):
            name, _, value = h.partition(b":")
            name, value = name.strip().lower(), value.strip()
            if name == b"content-length" and value.isdigit():
                digits = value.lstrip(b"0")
                # int() refuses more than 4,300 digits; 19 are past the body limit already
                self.length = int(digits or b"0") if len(digits) < 19 else BODY_LIMIT
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                self.chunked = True
        self.body_at = self.at = blank.end()
        self.searched = 0 if self.chunked else self.body_at
        return None

    def _body(self, eof: bool) -> tuple[bool, str] | None:
        want, buf = self.want, self.buf
        if self.chunked:
            self._dechunk()
            hay, start, end = self.body, 0, min(len(self.body), BODY_LIMIT)
            # The framing of chunks of one byte is 6 bytes a byte of data.
            complete = (self.ended or len(self.body) >= BODY_LIMIT
                        or len(buf) - self.body_at >= 8 * BODY_LIMIT)
        else:
            limit = BODY_LIMIT if self.length is None else min(self.length, BODY_LIMIT)
            hay, start, end = buf, self.body_at, min(len(buf), self.body_at + limit)
            complete = end - start >= limit
        if hay.find(want, max(start, self.searched - len(want) + 1), end) >= 0:
            return True, "check passed"
        self.searched = end
        if complete or eof:
            # A 3xx passes the status test unfollowed: said, as its body is no page's.
            status = self.status
            moved = f"http status {status} (not followed): " if 300 <= status < 400 else ""
            return False, f"{moved}body lacks {quoted(self.m.expect_body)}"
        return None

    def _dechunk(self) -> None:
        """Reads on into body as much chunked data as there is, until its last
        chunk or until the framing breaks (a size that is no hexadecimal number,
        a chunk's data not followed by its line end: not chunked after all).
        Lines may end in LF alone, as the head's."""
        buf = self.buf
        while not self.ended:
            i = self.at
            if self.left is None:
                j = buf.find(b"\n", i)
                if j < 0:       # a size line longer than any is no size line
                    self.ended = len(buf) - i > _CHUNK_LINE_MAX
                    return
                size = bytes(buf[i:j]).split(b";", 1)[0].strip()
                if not size or size.strip(_HEX):
                    self.ended = True
                    return
                self.left, self.at = int(size, 16), j + 1
                self.ended = not self.left      # the last chunk
            elif self.left:
                n = min(self.left, len(buf) - i)
                if not n:
                    return
                if len(self.body) < BODY_LIMIT:
                    self.body += buf[i:i + n]
                self.left -= n
                self.at = i + n
            elif buf.startswith(b"\r\n", i) or buf.startswith(b"\n", i):
                self.at = buf.index(b"\n", i) + 1
                self.left = None
            else:               # the line end is to come, or what follows the data is none
                self.ended = buf[i:i + 2] not in (b"", b"\r")
                return
