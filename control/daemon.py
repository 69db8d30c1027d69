"""`xlb up`: wires the parts together and serves until told to stop.

Order matters for the promise that bad input or a failure leaves nothing
behind: claim the control socket (one instance per namespace), check
everything that can refuse the input, compile the program (on the running
one's maps, when a data path runs here already), fill its maps, attach it;
a failed fresh start detaches what it attached. The program is attached
through netlink, so it outlives this process: a crash leaves it forwarding
with the last state, and the next `xlb up` adopts it. Later changes
(`apply`, `server ...`) follow the same rule: everything that can be refused
is checked before the first write, and a write that fails is undone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import select
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

from . import config as configfile, ctl, ha, log, metrics, netif, planner
from . import state as saved
from .balancer import (ADMIN_ACTIONS, Balancer, BadRequest, Key, attached_interfaces, check_host,
                       collector_paused, refuse_taken, select_links, sync_routes)
from .datapath import Datapath, DatapathError, Limits, find_running
from .healthsync import HealthSync
from .linkwatch import LinkWatch
from .model import Config, ConfigError
from .sweep import sweep_forever
from .units import interfaces

# The requests that change something: told begun (ctl.BEGUN), their clients
# wait for the answer. A status or ping of a hung instance still times out.
CHANGES = frozenset({"apply", "server", "role", "down"})


# The exit status of `xlb up` after `xlb down --keep-datapath` (EX_TEMPFAIL):
# its data path still runs, and a supervisor that restarts on failure starts
# the next `xlb up` (a new version, say), which adopts it.
HANDED_OVER = 75


class _Stop(BaseException):
    """SIGINT or SIGTERM while `xlb up` starts. Not an Exception, which a step
    of the start would take for its own failure."""


class _StopSignals:
    """SIGINT and SIGTERM, through one Python handler from before the claim of
    the control socket to the exit. Not the serving loop's own handlers
    (loop.add_signal_handler): closing the loop gives the signals their
    default action back, and a SIGTERM then killed the process before its
    clean-up, leaving the data path without its control process.

    While it starts, the handler only notes the signal, and the start stops
    at its next step (check()). An exception raised where the process happens
    to be was lost or mangled there: asyncio callbacks of pyroute2's own loop
    swallowed it, and one raised inside an event loop's constructor left a
    half-made loop whose finaliser printed a traceback. The steps that take
    long (compiling) run in C, where no handler runs before they return, so
    stopping between steps is no later. While serving, it stops the loop."""

    def __init__(self):
        self.received = self.hung_up = False
        self.wake = None      # while serving: stops the loop, from wherever the main thread is
        self.soon = None      # while serving: has the loop call a function
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)
        signal.signal(signal.SIGHUP, self._hang_up)

    def _handle(self, signum, frame) -> None:
        if self.received:
            return
        self.received = True
        _hold_hangups()
        if self.wake is not None:
            self.wake()

    def _hang_up(self, signum, frame) -> None:
        # Python runs the handlers of signals that came together in the order of
        # their numbers: a Ctrl-C just before the hang-up is told after it. So
        # the hang-up acts once they have run: the loop's next call while it
        # serves, else the start's next step.
        self.hung_up = True
        if self.soon is not None:
            self.soon(self.end_if_hung_up)

    def end_if_hung_up(self) -> None:
        """A hang-up ends the process as a crash does (SIGHUP's default action),
        unless a stop has begun."""
        if self.hung_up and not self.received:
            signal.signal(signal.SIGHUP, signal.SIG_DFL)
            signal.raise_signal(signal.SIGHUP)

    def check(self) -> None:
        """Between two steps of the start: stop there if a signal came."""
        if self.received:
            raise _Stop
        self.end_if_hung_up()


def _ignore_stops() -> None:
    """SIGINT and SIGTERM ignored from now on, to the exit: as it exits, Python
    gives a signal its default action back if a handler of its own took it.
    Blocked while the disposition changes: one that came between Python's look
    at pending signals and the change was reported "ignored due to race
    condition", with a traceback. Ignoring a signal discards one pending."""
    stops = {signal.SIGINT, signal.SIGTERM}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    for sig in stops:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _hold_hangups() -> None:
    """A stop has begun: a terminal that hangs up now (Ctrl-C, then the window
    closed) must not cut it short. SIGHUP kills only an instance that serves."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _more_open_files() -> None:
    """The soft limit of open files raised to the hard one, as HAProxy raises
    its own: each health check in flight holds a socket, and checks of a
    thousand unreachable servers waiting out their timeouts reach systemd's
    default soft limit (1,024); the loop's epoll takes any number."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def up(config: Config, config_path: Path | None = None,
       metrics_address: tuple[str, int] | None = None, limits: Limits | None = None,
       fast_path: bool | None = None, role: str | None = None,
       announce_table: int | None = None) -> int:
    """Runs the balancer in the foreground until SIGINT or SIGTERM (or `xlb down`).

    Everything that can refuse the input is checked before the program is
    compiled. The data path outlives this process: only a clean stop (a
    signal, `xlb down`) or a failed fresh start detaches it; after a crash it
    keeps forwarding, and the next `xlb up` adopts it (see Datapath). Without
    limits (no --flow-table), an adopted flow table keeps its size: another
    would be a copy, which loses what does not fit. Without fast_path (no
    --forwarding), an adopted data path forwards as it did: a restart does not
    turn on a fast path that its links cannot carry (veth peers without XDP)."""
    # Until a stop begins (_hold_hangups), SIGHUP takes its default action once
    # the handlers of the signals that came with it have run: a terminal that
    # hangs up (a dropped ssh session) ends the process as a crash does, and the
    # VIPs stay served. SIGINT and SIGTERM are taken before the claim:
    # with their default action after it, one killed the process and left the
    # socket's file for the next `xlb up` to find stale.
    signals = _StopSignals()
    _more_open_files()
    control = ctl.Listener()
    datapath = running = exporter = None
    serving = stopping = False
    announcer = ha.Announcer(announce_table) if announce_table is not None else None
    try:
        links = select_links(config)
        check_host(config, [], [])    # local VIPs; the warnings come with the attach
        cap = limits or Limits()        # the flow table's size is no capacity of a config
        planner.desired(config, links, planner.DataplaneState(), cap.max_services,
                        cap.max_backends, cap.ring_size, cap.max_maglev,
                        max_arp=cap.max_arp, max_links=cap.max_tx_links)  # capacity
        if metrics_address is not None:
            try:
                exporter = metrics.bind(metrics_address)
            except OSError as e:
                raise LookupError(f"--metrics {metrics_address[0]}:{metrics_address[1]}: "
                                  f"{e.strerror}") from None
        signals.check()
        running = find_running()
        refuse_taken((link for link in links
                       if running is None or link.index not in running.attached), config)
        if limits is None:
            limits = running.limits() if running is not None else Limits()
        if running is not None:
            log.event("adopt", program=running.info.id, tag=running.info.tag,
                      interfaces=",".join(a.ifname for _, a in running.attached.values()))
        datapath = Datapath(limits, running)    # compiles: the old program serves meanwhile
        signals.check()
        if fast_path is None:
            fast_path = datapath.fast_path if datapath.kept("config") else True
        datapath.set_forwarding(fast_path)
        for name in datapath.fresh_maps:
            log.event("adopt", level="warning", map=name,
                      reason="another layout or size: the running map could not be kept "
                             "as it is")
        kept = saved.load()
        if running is not None:
            ran, admin, kept_role, ids = _running_state(config, _describing(kept, running))
            if kept_role is not None and role is not None and kept_role != role:
                # keepalived says a role once, when it changes: a restart must
                # not make an active node silent, or a backup answer too.
                log.event("adopt", role=kept_role, given=role,
                          reason="the running data path's role; --role is for a fresh start")
            role = kept_role or role
        role = role or "active"
        balancer = Balancer(datapath, config_path, role, announcer)
        if running is not None:
            balancer.adopt(ran, admin, ids)
        forgotten = balancer.restore(kept, config)
        applied = balancer.apply(config, relink=True)
        forgotten += applied["admin_forgotten"]
        if balancer.admin or forgotten:
            log.event("restore", level="warning" if forgotten else "info",
                      servers=log.some(f"{p}/{s}={v}" for (p, s), v in
                                       sorted(balancer.admin.items())),
                      forgotten=log.some(forgotten, sep="; "))
        signals.check()
        let_go = datapath.settle()
        if kept is not None and kept.announce_table not in (None, announce_table):
            # The routes a killed instance left where this one announces nothing:
            # BIRD would go on announcing them. Withdrawn before remember()
            # forgets the table.
            sync_routes(ha.Announcer(kept.announce_table), ())
        balancer.remember()
        if exporter is not None:
            metrics.serve(exporter, balancer, balancer.check_durations)
        serving = True
        attached = attached_interfaces(datapath)
        # The links an adoption let go (no longer named), said as an apply says them.
        adopted = (" (adopted the running data path"
                   + (f"; detached from {', '.join(let_go)}" if let_go else "") + ")")
        _say(f"xlb: serving {_summary(config)} on {interfaces(attached)}"
             f"{adopted if running else ''}")
        log.event("start", pid=os.getpid(), frontends=len(config.frontends),
                  servers=config.server_count(),
                  interfaces=",".join(i["name"] for i in attached),
                  detached=",".join(let_go) or None,
                  config=config_path, adopted=running is not None,
                  # As `xlb apply` says it: the adopted flows its config ended.
                  flows_ended=applied["flows_ended"] if running is not None else None,
                  metrics=metrics_address and f"{metrics_address[0]}:{metrics_address[1]}")
        kept = asyncio.run(_serve(balancer, control, signals))
        stopping = not kept
    except BaseException as e:
        # A failure after a signal (a step that failed before the next
        # check()) ends as the stop the operator asked for.
        if not signals.received:
            raise
        stopping = True
        if not isinstance(e, _Stop):
            log.event("stop", level="warning",
                      error=f"{e!r}, taken for the stop that a signal asked for")
    finally:
        # Stopping already: a second signal must not cut the clean-up short,
        # nor kill the process as it exits.
        _ignore_stops()
        _hold_hangups()
        # Until its socket is closed, a client is told at once that it stops
        # (unread, unlogged), not left to wait for the close to cut it off.
        control.refuse(json.dumps(_refusal()).encode() + b"\n")
        if exporter is not None:
            if serving:
                exporter.shutdown()
            exporter.server_close()
        if announcer is not None and stopping:     # withdraw before the data path goes
            sync_routes(announcer, ())
        if datapath is not None:
            # A failed adoption leaves the running data path as it was found.
            if stopping or (running is None and not serving):
                datapath.detach_all()
            datapath.close()
        else:
            if stopping and running is None:
                # Stopped before it looked: a crashed instance's data path,
                # which it would have adopted, goes too.
                running = find_running()
            if running is not None:     # stopped (or failed) while compiling onto it
                if stopping:
                    running.detach()
                running.close()
        control.close()
    log.event("stop", pid=os.getpid(), datapath="detached" if stopping else "running")
    if not stopping:
        _say("xlb: stopped; the data path keeps running, the next `xlb up` adopts it")
        return HANDED_OVER
    _say("xlb: stopped, XDP detached")
    return 0


def _say(line: str) -> None:
    """Prints a line on stdout. One that cannot be written (a pipe whose reader
    is gone, as in `xlb up | head -1`) is dropped, as log.event drops its own:
    what it tells of happens all the same (serving, a clean stop and its exit
    status), not a crash that leaves the data path without its control
    process. stdout is /dev/null from then on (log.silence)."""
    try:
        print(line, flush=True)
    except OSError:
        log.silence(sys.stdout)


def _describing(kept: saved.State | None, running) -> saved.State | None:
    """kept, if it describes the running data path: not if an earlier instance
    saved it and the one that started this data path was killed before saving
    its own (its config, role and server states would be taken for this one's:
    a backup's role silences an active data path)."""
    if kept is None or kept.datapath in (None, running.identity):
        return kept
    log.event("adopt", level="warning", reason="the saved state is an earlier data path's; "
              "the maps are read back by the given config, in the given role")
    return None


def _running_state(given: Config, kept: saved.State | None
                   ) -> tuple[Config, dict[Key, str], str | None, dict[Key, int]]:
    """The config a running data path was written for, its servers' run-time
    states, its role and its servers' backend ids, as its control process saved
    them in `kept` (the given config, none, None and none when it saved none)."""
    if kept is None:
        return given, {}, None, {}
    try:
        return (configfile.load(kept.config_text, dumped=True), kept.admin, kept.role,
                kept.backends)
    except ConfigError:
        log.event("adopt", level="warning", error="the saved config is not valid; "
                  "the maps are read back by the given one")
        return given, {}, kept.role, {}


def _summary(config: Config, most: int = 4) -> str:
    """"10.1.1.101:80/tcp -> 10.1.11.101:8080, 10.1.11.102:8080", shortened when long."""
    def some(items):
        return log.some(dict.fromkeys(items), most, ", ") or ""
    return (some(f.endpoint for f in config.frontends) + " -> "
            + some(f"{s.address}:{s.port}" for p in config.pools for s in p.servers))


async def _serve(balancer: Balancer, control: ctl.Listener, signals: _StopSignals) -> bool:
    """Serves until a signal or `xlb down`; returns True when the data path is
    to keep running (`xlb down --keep-datapath`)."""
    stop = asyncio.Event()
    # One change at a time; each runs in a worker thread, because pyroute2's
    # synchronous API runs an event loop of its own.
    lock = asyncio.Lock()
    loop = asyncio.get_running_loop()

    def stopping() -> None:
        _hold_hangups()
        stop.set()

    def soon(call) -> None:
        # The handler runs in the main thread wherever it is: in the loop's own
        # code, or in its wait, which call_soon_threadsafe ends.
        if not loop.is_closed():
            loop.call_soon_threadsafe(call)

    signals.wake = lambda: soon(stopping)
    signals.soon = soon
    if signals.received:    # a signal after the start's last step
        stopping()
    signals.end_if_hung_up()

    # `xlb down` (keep the data path or not): acted on once the request is
    # answered, so that the answer is not lost with the loop.
    downs: list[bool] = []

    def request_stop(keep_datapath: bool) -> None:   # from the worker thread of a `down` request
        downs.append(keep_datapath)

    health = HealthSync(balancer, lock)
    checker = health.checker
    links = LinkWatch(balancer, checker, lock)

    async def sync_targets() -> str | None:
        unapplied = await health.sync_targets()
        links.stale()           # new servers, or new addresses
        return unapplied

    answering: dict[asyncio.Task, asyncio.StreamWriter] = {}    # connections open

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answering[asyncio.current_task()] = writer
        try:
            reply = await _answer(balancer, request_stop, lock, stop, sync_targets, reader,
                                  writer)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except ConnectionError:    # the client left (or reset) before its answer: its loss
            pass
        finally:
            writer.close()
            del answering[asyncio.current_task()]
            if downs:
                stopping()

    async with lock:
        await sync_targets()
    checks = loop.create_task(checker.run())
    links.start()
    sweeps = loop.create_task(sweep_forever(balancer))
    neighbours = loop.create_task(_renew_neighbours_forever(balancer.datapath))
    # A copy: the server closes it when the loop ends, while the control
    # socket stays bound until the data path is detached, so that `xlb down`
    # (which waits until nothing listens) returns only then.
    servers = [await asyncio.start_unix_server(handle, sock=control.socket.dup(),
                                               limit=ctl.MAX_REQUEST)]
    reachable = loop.create_task(_keep_reachable(control, handle, servers))
    woken = _SignalWakeup(loop)
    try:
        await stop.wait()
        # The request under way is carried out and answered: its client would
        # take a change that took effect for one that failed. Those that come
        # meanwhile, or wait their turn, are refused (_answer).
        async with lock:
            pass
    finally:
        woken.close()
        reachable.cancel()
        for server in servers:
            server.close()
        if answering:
            _, late = await asyncio.wait(answering, timeout=STOP_ANSWER_SECONDS)
            for task in late:       # a client that does not read its answer
                answering[task].transport.abort()
        for server in servers:      # from Python 3.12, also waits for its connections
            await server.wait_closed()
        checker.stop()
        links.close()
        sweeps.cancel()
        neighbours.cancel()
        await checks
    return bool(downs) and downs[-1]


class _SignalWakeup:
    """A signal that the kernel gives another thread (a worker's) runs its
    Python handler in the main thread only once that thread runs Python: the
    loop's wait would hold it until its next timer. Python's C handler writes
    the signal's number to a wakeup fd from whichever thread it runs in; this
    one is the loop's to read, which ends the wait."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._read, self._write = socket.socketpair()
        for end in (self._read, self._write):
            end.setblocking(False)
        loop.add_reader(self._read.fileno(), self._drain)
        self._previous = signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)

    def _drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._read.recv(4096)

    def close(self) -> None:
        signal.set_wakeup_fd(self._previous)
        self._loop.remove_reader(self._read.fileno())
        self._read.close()
        self._write.close()


NEIGHBOUR_SECONDS = 5.0    # the kernel's delay_first_probe_time: a probe is no sooner


async def _renew_neighbours_forever(datapath: Datapath) -> None:
    """Every NEIGHBOUR_SECONDS, has the kernel check the stale neighbour
    entries the fast path sent to meanwhile (netif.renew_stale), as it checks
    those it sends to itself (with kernel forwarding, every packet)."""
    since = datapath.now()
    while True:
        await asyncio.sleep(NEIGHBOUR_SECONDS)
        now = datapath.now()
        if not datapath.fast_path:
            since = now
            continue
        try:
            if hops := await asyncio.to_thread(datapath.next_hops, since):
                await asyncio.to_thread(netif.renew_stale, hops)
        except Exception as e:      # one round's: ending the task would end them, unsaid
            log.event("neighbours", level="warning", error=str(e) or type(e).__name__)
        since = now


STOP_ANSWER_SECONDS = 5.0   # how long a stop waits for clients to read their answers
RESTORE_SECONDS = 1.0   # how often the instance looks whether clients still find its socket


async def _keep_reachable(control: ctl.Listener, handle, servers: list) -> None:
    """Makes the control socket again when clients no longer find it (its
    directory removed by `rm -rf /run/xlb`, say), serving it as the first:
    otherwise no command could reach the instance, `xlb status` and `xlb down`
    would take its data path for one without its control process, and an
    `xlb up` could start beside it. Why it cannot (/run/xlb made by another
    user, say) is logged once, and it tries again every second."""
    failed = None
    while True:
        await asyncio.sleep(RESTORE_SECONDS)
        if not control.lost():
            continue
        try:
            sock = control.restore()
        except (ctl.ControlError, ctl.AlreadyRunning) as e:
            if str(e) != failed:
                log.event("control", level="error", socket=ctl.address(),
                          error=f"gone, and not made again: {e}")
            failed = str(e)
            continue
        failed = None
        servers.pop().close()
        servers.append(await asyncio.start_unix_server(handle, sock=sock.dup(),
                                                       limit=ctl.MAX_REQUEST))
        log.event("control", level="warning", socket=ctl.address(),
                  reason="it was gone (its directory removed?); made again")


async def _answer(balancer: Balancer, request_stop, lock: asyncio.Lock, stop: asyncio.Event,
                  sync_targets, reader, writer) -> dict:
    try:
        line = await asyncio.wait_for(reader.readline(), timeout=5)
        req = json.loads(line)
        cmd = req["cmd"]
        if not isinstance(cmd, str):
            raise TypeError
    # RecursionError: a request nested deeper than the decoder follows
    except (ValueError, RecursionError, asyncio.LimitOverrunError):
        return {"ok": False,
                "error": f"malformed or oversized request (limit {ctl.MAX_REQUEST} bytes)"}
    except (KeyError, TypeError):
        return {"ok": False, "error": "request has no \"cmd\""}
    except asyncio.TimeoutError:
        return {"ok": False, "error": "request timed out"}
    deadline = req.get("deadline")
    try:
        if stop.is_set():       # refused at once, not after the request under way
            return _refused(cmd)
        async with lock:
            if stop.is_set():   # a signal or `xlb down` came while it waited its turn
                return _refused(cmd)
            if not req.get("stands") and (
                    isinstance(deadline, (int, float)) and time.monotonic() > deadline
                    or _hung_up(writer)):
                # Its client (same machine, same clock) stopped waiting and said it
                # failed, or was ended meanwhile (Ctrl-C, a supervisor's timeout).
                # One that stands told nobody so (see `xlb ha follow`'s stop).
                log.event(cmd, level="warning", error="its client stopped waiting: not done")
                return {"ok": False, "error": "the client stopped waiting: not done"}
            if req.get("progress") is True and cmd in CHANGES:
                # From here on its client waits for the answer, however long the
                # change takes: at its deadline it said failed of a change made.
                writer.write(ctl.BEGUN)
            try:
                result = await asyncio.to_thread(_dispatch, balancer, request_stop, cmd, req)
                if cmd == "apply" and (unapplied := await sync_targets()):
                    # The config is applied (and saved): the checks' states
                    # follow when the retry takes (status, metrics, alert).
                    result["warning"] = "; ".join(filter(None, (result["warning"], unapplied)))
            except Exception:
                if cmd == "apply":      # counted as answered
                    balancer.applies["error"] += 1
                raise
            if cmd == "apply":
                balancer.applies["ok"] += 1
        return {"ok": True, "result": result}
    except ConfigError as e:
        log.event(cmd, level="warning", error="invalid config: nothing applied",
                  problems=len(e.problems))
        return {"ok": False, "error": "invalid config: nothing applied", "problems": e.problems,
                "bad_input": True}
    except (BadRequest, LookupError, planner.CapacityError, DatapathError) as e:
        message = str(e.args[0]) if isinstance(e, LookupError) else str(e)
        log.event(str(cmd), level="warning", error=message)
        return {"ok": False, "error": message, "bad_input": not isinstance(e, DatapathError)}
    except Exception as e:  # a bug: answer, log, and keep serving
        traceback.print_exc()
        return {"ok": False, "error": f"internal error: {e!r}"}


# The answer to a request that a stop came before; "stopping" tells `xlb down`
# to wait for that stop rather than fail.
REFUSED = {"ok": False, "error": "xlb is stopping: not done", "stopping": True}


def _refusal() -> dict:
    """REFUSED, naming the process that stops: `xlb down` waits for it alone."""
    return {**REFUSED, "pid": os.getpid()}


def _refused(cmd: str) -> dict:
    log.event(cmd, level="warning", error=REFUSED["error"])
    return _refusal()


def _hung_up(writer: asyncio.StreamWriter) -> bool:
    """The client closed its end: no one waits for the answer (a client that only
    shut down its writing, as socat does, still reads it)."""
    poller = select.poll()
    poller.register(writer.get_extra_info("socket").fileno(), 0)
    return any(events & select.POLLHUP for _, events in poller.poll(0))


def _field(req: dict, name: str) -> str:
    value = req.get(name)
    if not isinstance(value, str):
        raise BadRequest(f"malformed {req['cmd']!r} request: {name!r} must be a string")
    return value


def _dispatch(balancer: Balancer, request_stop, cmd, req: dict):
    if cmd == "ping":
        # who answers (`xlb ha follow` tells a new instance its role), and
        # whether it can answer for the VIPs (follow tells keepalived)
        return {"pid": os.getpid(), "cut_off": balancer.cut_off()}
    if cmd == "status":
        return balancer.status()
    if cmd == "show":
        return {"text": balancer.dumped(),
                "config": str(balancer.config_path) if balancer.config_path else None}
    if cmd == "apply":
        text, path = _field(req, "text"), _field(req, "path")
        if not os.path.isabs(path):
            raise BadRequest("malformed 'apply' request: 'path' must be absolute")
        t0 = time.perf_counter()
        with collector_paused():        # as the apply's: its objects live on
            cfg = configfile.load(text)
        t1 = time.perf_counter()
        result = balancer.apply(cfg, relink=True)
        t2 = time.perf_counter()
        balancer.config_path = Path(path)    # from now on, the file this instance serves
        forgotten = result.pop("admin_forgotten")
        # The links it attached to (up since) and let go (gone, or named no more).
        links = {k: result.pop(k) for k in ("attached", "detached")}
        # Logged as they were found: what the links left out keep from working,
        # and what the links attached warn of.
        warned = {k: result.pop(k) for k in ("unserved", "attach_warnings")}
        for k in ("gratuitous_arps", "gratuitous_arps_unsent"):     # logged as they went
            result.pop(k)
        log.event("apply", result="ok", seconds=t2 - t0, config=path, **result,
                  **{k: ",".join(names) or None for k, names in links.items()},
                  admin_forgotten=log.some(forgotten, sep="; "))
        return {**result, **links, "admin_forgotten": forgotten, "warnings": cfg.warnings,
                **warned, "validate_seconds": t1 - t0,
                "apply_seconds": t2 - t1, "config": path, "warning": balancer.remember()}
    if cmd == "server":
        action = _field(req, "action")
        if action not in ADMIN_ACTIONS:
            raise BadRequest(f"unknown server action {action!r}")
        result = balancer.set_admin(action, _field(req, "pool"), _field(req, "server"))
        log.event("server", action=action, **result)
        return {**result, "warning": balancer.remember()}
    if cmd == "role":
        return {**balancer.set_role(_field(req, "role")), "warning": balancer.remember()}
    if cmd == "down":
        keep = req.get("keep_datapath", False)
        if not isinstance(keep, bool):
            raise BadRequest("malformed 'down' request: 'keep_datapath' must be true or false")
        request_stop(keep)
        if not keep:
            saved.clear()     # the service ends here: the next `xlb up` starts afresh
        return {"pid": os.getpid()}     # `xlb down` waits until this process is gone
    raise BadRequest(f"unknown command {cmd!r}")
