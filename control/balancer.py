"""The Balancer: the config and the servers' run-time states (health, drain,
maint, role) taken to the data path, and read back from it (status); and the
choice of the links it runs on, which `xlb up` makes first with the same
functions. Everything that can be refused is checked before the first write,
and a write that fails is undone."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterable
from ipaddress import IPv4Address
from pathlib import Path

from . import __version__, config as configfile, flowtable, ha, log, metrics, netif, planner
from . import state as saved
from .datapath import Datapath, FlowLedger
from .health import HealthChecker, Target
from .layout import REASON_ACTIONS, XDP_ACTIONS
from .model import UNNAMED_LINKS, Config, ConfigError
from .units import quoted

EMPTY = Config(frontends=(), pools=())
# A status (each scrape, each `xlb top` frame) reads the flow tables whole:
# 1.1 s of CPU beside a million connections. A read that took more than
# LEDGER_SLOW seconds stands for LEDGER_REUSE times as long (until an apply),
# so that however often they ask, reading them takes a tenth of a CPU at
# most; a quicker one is read anew each time, exact right after a change.
LEDGER_SLOW = 0.05
LEDGER_REUSE = 10
ADMIN_ACTIONS = {"disable": "maint", "drain": "drain", "enable": None}

Key = tuple[str, str]


@contextlib.contextmanager
def collector_paused():
    """Python's cyclic garbage collector held off: a config of 10,000 servers
    read and applied makes hundreds of thousands of objects that live on, and
    the collections they set off (one each 700 allocations, some of them of
    the whole heap, the config and state served until then too) found nothing
    and took a third of an apply's time. What is left is collected after."""
    if not gc.isenabled():      # held off already, by a caller
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class Balancer:
    """A running instance: the config it serves, the runtime state of its
    servers, and the data path serving them."""

    def __init__(self, datapath: Datapath, config_path: Path | None = None,
                 role: str = "active", announcer: ha.Announcer | None = None):
        self.datapath = datapath
        self.config_path = config_path
        self.role = role                          # ha.ROLES: a backup answers no ARP
        self.announcer = announcer                # the VIP routes BIRD announces
        self.config = EMPTY
        self.links: dict[str, netif.Link] = {}    # attached, by name
        # Links that came up running another XDP program, as (index, program
        # id), warned of once each: the watch's applies read the links at
        # each address change.
        self._foreign: frozenset[tuple[int, int]] = frozenset()
        self.state = planner.DataplaneState()     # what the maps hold
        self.states: dict[Key, str] = {}          # server states the maps reflect
        self.admin: dict[Key, str] = {}           # `xlb server drain|disable`: drain, maint
        self.server_rows: dict[Key, dict] = {}
        self.health: dict[Key, str] = {}          # health checks: up, down
        self.health_changes: dict[Key, int] = {}
        # The checker counts changes and check durations in the loop's thread
        # while an apply, in a worker thread, carries them over to the config
        # it applies.
        self._changes_lock = threading.Lock()
        # The last apply's renames (old name: new, or None for a server gone or
        # moved), for the checker's reports under a server's old name until it
        # has the new names (checker_synced).
        self._checked_as: dict[Key, Key | None] = {}
        self.checker: HealthChecker | None = None
        self.check_durations = metrics.CheckDurations()
        self.applies = {"ok": 0, "error": 0}       # `xlb apply` requests, by result
        # Applies of the checker's states (HealthSync) that failed; since when
        # and why the maps lack its latest states (None while they hold them).
        # Replaced whole, never changed: status() reads one or the next.
        self.health_applies = {"failed": 0, "unapplied_since": None, "error": None}
        self.last_apply = time.time()
        self.started = time.monotonic()     # uptime: a step of the clock moves no start
        # status() (the CLI, metrics scrapes) sees one applied state or the next,
        # never half of each.
        self.lock = threading.RLock()
        # The Maglev tables' digests of (config, state): each hashes 65,537 slots,
        # too many for every status while only an apply changes them.
        self._digests: tuple[Config, planner.DataplaneState, dict[str, str]] | None = None
        self._ledger_kept: tuple[FlowLedger, float] | None = None   # and until when (_ledger)
        self._dumped: tuple[Config, str] | None = None              # (dumped)

    def health_targets(self) -> list[Target]:
        """Every server whose pool or own monitor checks it."""
        return [Target.for_server(p.name, s, m) for p in self.config.pools for s in p.servers
                if (m := self.config.monitor_for(p, s)) is not None]

    @staticmethod
    def _server_states(config: Config, admin: dict[Key, str],
                       health: dict[Key, str]) -> dict[Key, str]:
        return {(p.name, s.name): planner.server_state(s, admin.get((p.name, s.name)),
                                                       health.get((p.name, s.name), "up"))
                for p in config.pools for s in p.servers}

    def apply(self, config: Config, admin: dict[Key, str] | None = None, *,
              relink: bool, reread: bool = False) -> dict:
        """Takes the data plane to `config`. Raises (LookupError, CapacityError,
        DatapathError, bcc's error of a map write the kernel refused) with
        nothing changed. relink: a new config, whose links
        are looked at again (attached, detached); a change of state (health,
        admin, role) keeps the links as they are, so that no link's trouble
        keeps it from taking effect, but for one deleted and made again under
        its name, which it attaches (_made_again); reread (LinkWatch, after
        an address or MAC of one changed, or a link came up): their addresses
        and MACs as they are now, which the ARP answers go by, and where no
        link is named, every up Ethernet link that came up since, attached."""
        with collector_paused():
            return self._apply(config, admin, relink=relink, reread=reread)

    def _apply(self, config: Config, admin: dict[Key, str] | None, *,
               relink: bool, reread: bool) -> dict:
        warned: list[str] = []      # about the links attached: logged, and answered
        answered = self.state.arp
        if relink:
            links = select_links(config, self.datapath.holds)
            # Those that do not run this program: new links, one made again
            # under a name (another ifindex), one whose program was removed or
            # replaced by hand, one running the program an adoption takes over.
            ours = self.datapath.program()["id"]
            fresh = [link for link in links if link.xdp_prog_id != ours]
            check_host(config, fresh, warned)
            refuse_taken((link for link in fresh if not self.datapath.holds(link)), config)
        else:
            now = netif.links() if reread else None     # one dump for both
            links, fresh = _made_again(self.links, now)
            if now is not None and not config.attach_names():
                links, came, self._foreign = _came_up(links, now, warned, self._foreign)
                fresh += came
        endpoints = {(p.name, s.name): (s.address, s.port)
                     for p in config.pools for s in p.servers}
        keys = set(endpoints)
        # A server given another address or port is a new server (planner.desired):
        # up until its first check there, whatever the checks of its old address said,
        # its health changes and check durations counted from zero. One renamed at the
        # same address and port is the same server, as checked, with its counts, and
        # drained or in maint as it was; the name it left is no longer its state's.
        renamed = planner.renames(self.config, self.state, config)
        admin, forgotten = _carry(self.admin if admin is None else admin, renamed, keys)
        stays = {k: renamed.get(k, k) for k, b in self.state.backends.items()
                 if endpoints.get(renamed.get(k, k)) == (b.address, b.port)}
        checked_as = {k: stays.get(k) for k in self.state.backends if stays.get(k) != k}

        def carried(values: dict[Key, int | str]) -> dict:
            """values of the servers that stay, under their names in config."""
            return {stays[k]: v for k, v in values.items() if k in stays}
        health = carried(self.health)
        states = self._server_states(config, admin, health)
        lim = self.datapath.limits
        target = planner.desired(config, links, self.state, lim.max_services, lim.max_backends,
                                 lim.ring_size, lim.max_maglev, states, lim.max_arp, renamed,
                                 lim.max_tx_links)
        if self.role == "backup":
            target = dataclasses.replace(target, arp={})
        ends = planner.flows_to_end(self.config, self.states, self.state, config, states, target,
                                    renamed)

        dp = self.datapath
        kept = {link.index for link in links}
        let_go = [old for old in self.links.values() if old.index not in kept]
        attached = []
        try:
            planner.execute(dp, planner.plan(self.state, target))
            # The links let go leave tx_links before the new take their places:
            # many swapped for as many others would not fit both. Their packets
            # go by the kernel meanwhile, as once they are detached.
            for old in let_go:
                dp.set_tx_link(old.index, None)
            for link in fresh:
                attached.append(_attach(dp, link, warned))
        except Exception:
            # A write the kernel refused, or a link that takes no program: what
            # was written is written back (writes are idempotent, and a delete
            # of what was never written is none), or the maps would hold part
            # of the change while self.state says none, and each apply after
            # would fail on it (a delete of what is gone) or leave it there.
            for att in attached:
                dp.detach(att.ifindex)
            for old in let_go:
                dp.restore_tx_link(old.index)
            planner.execute(dp, planner.plan(target, self.state))
            dp.counters_cleared(undo=True)
            raise
        dp.counters_cleared(undo=False)
        dp.swapped()                # an adoption's copied flow tables catch up
        # Once all are attached: a veth whose peer xlb attaches too (now, or once
        # it is set up where no link is named) has a program at its peer.
        for att in attached:
            _warn_veth(dp, att, warned, not config.attach_names())
        ended = dp.delete_flows(set(ends.backend_ids), set(ends.service_ids), ends.retired)
        unserved = _unserved(config, links) if relink and config.attach_names() else []
        for old in let_go:
            dp.detach(old.index)

        # A change of state (drain, health) keeps the config and its rows.
        rows = self.server_rows if config is self.config else _server_rows(config)
        was = {old.index: old.name for old in self.links.values()}
        relabelled = [(was[link.index], link.name) for link in links
                      if was.get(link.index, link.name) != link.name]
        with self.lock:
            self.config, self.state, self.states, self.admin = config, target, states, admin
            self.server_rows = rows
            self.health = health
            self._ledger_kept = None        # connections it ended, servers it took away
            # The maps now hold the checks' latest states, whichever apply wrote them.
            self.health_applies = {**self.health_applies, "unapplied_since": None, "error": None}
            with self._changes_lock:
                self.health_changes = carried(self.health_changes)
                self._checked_as = checked_as
                self.check_durations.track({t.key for t in self.health_targets()}, stays)
            self.links = {link.name: link for link in links}
            if relink:                      # a new config, not a change of state
                self.last_apply = time.time()
        for old_name, name in relabelled:
            _link_renamed(config, old_name, name)
        self._announce()
        garps, unsent = _announce_arp(answered, target.arp)
        return {"frontends": len(config.frontends), "pools": len(config.pools),
                "servers": config.server_count(), "flows_ended": sum(ended.values()),
                "admin_forgotten": forgotten, "attached": [att.ifname for att in attached],
                "detached": [old.name for old in let_go], "unserved": unserved,
                "attach_warnings": warned, "gratuitous_arps": garps,
                "gratuitous_arps_unsent": unsent}

    def carrier_back(self, index: int, name: str) -> int:
        """Announces again the VIPs answered on link index, whose carrier is
        back, as the kernel announces a link's own addresses (arp_notify):
        what was announced while it had none was lost (a VIP that moved here,
        lb's MAC changed), and the switch may have forgotten where lb's MAC
        is. Returns how many gratuitous ARPs went out. Called in a worker
        thread, under the event loop's lock (LinkWatch), as an apply; without
        self.lock, which a status holds through its map reads: an apply
        replaces the state whole."""
        entries = {key: mac for key, mac in self.state.arp.items() if key[0] == index}
        return _announce_arp({}, entries, link=name, reason="carrier back")[0]

    def _announce(self) -> None:
        """Announces the VIPs served while active. A route that cannot be written
        is a warning, not a failed apply: the maps already serve the config."""
        if self.announcer is None:
            return
        taking = {fe.name: len(set(self.state.services[(fe.vip, fe.port, fe.proto_number)].slots))
                  for fe in self.config.frontends}
        sync_routes(self.announcer,
                     ha.served_vips(self.config, taking) if self.role == "active" else ())

    def count_health_change(self, key: Key) -> None:
        with self._changes_lock:
            key = self._checked_as.get(key, key)
            if key is not None:
                self.health_changes[key] = self.health_changes.get(key, 0) + 1

    def observe_check(self, key: Key, seconds: float) -> None:
        """A check's duration, counted as count_health_change counts a change."""
        with self._changes_lock:
            key = self._checked_as.get(key, key)
            if key is not None:
                self.check_durations.observe(key, seconds)

    def checker_synced(self) -> dict[Key, Key | None]:
        """The checker takes the config's names: it reports under them from now
        on. Returns the last apply's renames, for it to follow (old: new)."""
        with self._changes_lock:
            renamed, self._checked_as = self._checked_as, {}
        return renamed

    def cut_off(self) -> list[str]:
        """The VIPs this node cannot answer for: every link xlb runs on that
        their ARP requests arrive on has lost its carrier (or was set down),
        as "VIP (LINK, ...)". keepalived cannot see it when VRRP runs on
        another link; `xlb ha follow` tells it."""
        with self.lock:
            on = planner.arp_links(self.config, self.links.values())
        carrier = {link.index for link in netif.links() if link.carrier}
        links: dict[IPv4Address, list[str]] = {}
        for link, vip in on:
            links.setdefault(vip, []).append(link.name)
        live = {vip for link, vip in on if link.index in carrier}
        return [f"{vip} ({', '.join(names)})" for vip, names in sorted(links.items())
                if vip not in live]

    def set_role(self, role: str) -> dict:
        """active: answer ARP for the VIPs (a gratuitous ARP for each on becoming
        active) and announce them; backup: silent, still checking health."""
        if role not in ha.ROLES:
            raise BadRequest(f"unknown role {role!r} (active or backup)")
        was, self.role = self.role, role
        try:
            result = self.apply(self.config, relink=False)
        except Exception:
            self.role = was
            raise
        garps, unsent = result["gratuitous_arps"], result["gratuitous_arps_unsent"]
        log.event("role", level="warning" if unsent else "info", old=was, new=role,
                  gratuitous_arps=garps, unsent=log.some(unsent, sep="; "))
        return {"role": role, "previous": was, "gratuitous_arps": garps,
                "gratuitous_arps_unsent": unsent}

    def adopt(self, config: Config, admin: dict[Key, str] | None = None,
              ids: dict[Key, int] | None = None) -> None:
        """Takes over maps that a previous control process filled for `config`
        (with `admin` server states and the backend `ids` it saved, which
        planner.recover goes by): reads back what they hold instead of
        writing them anew, so every id, flow and counter stays. A server whose
        backend is closed for no other reason was down by its health checks,
        and starts down until its first check."""
        state = planner.recover(config, *self.datapath.held(), ids)
        if self.datapath.emptied("backends"):
            # Taken from the connections (another layout emptied the map), and
            # written back: a server's open to new flows (the apply closes one
            # that is not up), a removed one's closed.
            self.datapath.set_backends(
                [(b.id, b.address, b.port, False) for b in state.backends.values()]
                + [(i, address, port, True)
                   for i, (address, port) in state.retired_backends.items()])
        keys = {(p.name, s.name) for p in config.pools for s in p.servers}
        admin = {k: v for k, v in (admin or {}).items() if k in keys}
        enabled = {(p.name, s.name) for p in config.pools for s in p.servers if s.enabled}
        health = {k: "down" for k, b in state.backends.items()
                  if b.closed and k in enabled and k not in admin}
        with self.lock:
            self.config, self.state, self.admin, self.health = config, state, admin, health
            self.states = self._server_states(config, admin, health)
            self.server_rows = _server_rows(config)

    def set_admin(self, action: str, pool: str, server: str) -> dict:
        if not any(p.name == pool for p in self.config.pools):
            raise LookupError(f"no pool {quoted(pool)}")
        if not any(s.name == server for s in self.config.pool(pool).servers):
            raise LookupError(f"no server {quoted(server)} in pool {quoted(pool)}")
        admin = dict(self.admin)
        admin.pop((pool, server), None)
        if ADMIN_ACTIONS[action]:
            admin[(pool, server)] = ADMIN_ACTIONS[action]
        result = self.apply(self.config, admin, relink=False)
        return {"pool": pool, "server": server, "state": self.states[(pool, server)],
                "flows_ended": result["flows_ended"]}

    def restore(self, kept: saved.State | None, config: Config) -> list[str]:
        """Takes back the server states set at run time before a restart (drain,
        maint; `kept`, the saved state), to apply `config` next. The apply keeps
        those of the servers config still has, or has renamed from the data
        path adopted. A fresh start has none: the saved config tells renamed
        servers instead, their states named anew here. Returns the states
        forgotten meanwhile (as apply's admin_forgotten)."""
        self.admin = dict(kept.admin) if kept else {}
        if kept is None or self.state.backends:
            return []
        try:
            old = configfile.load(kept.config_text, dumped=True)
        except ConfigError:
            return []               # the apply keeps those of the same names
        renamed = planner.renames(old, planner.named_after(old), config)
        self.admin, forgotten = _carry(
            self.admin, renamed, {(p.name, s.name) for p in config.pools for s in p.servers})
        return forgotten

    def dumped(self) -> str:
        """The config served, as TOML (config.dump), kept until an apply
        replaces it: at 10,000 servers a dump took 0.2 s, which `xlb show`
        and each state save (a drain, an enable) spent anew."""
        config = self.config
        kept = self._dumped
        if kept is None or kept[0] is not config:
            kept = self._dumped = (config, configfile.dump(config))
        return kept[1]

    def remember(self) -> str | None:
        """Saves in xlb's state directory what no file holds: the file served,
        the config that runs, drain and maint, the role, the announce table.
        Returns a warning if it could not."""
        try:
            saved.save(saved.State(str(self.config_path) if self.config_path else None,
                                   self.dumped(), dict(self.admin), self.role,
                                   self.announcer and self.announcer.table,
                                   self.datapath.identity,
                                   {k: b.id for k, b in self.state.backends.items()}))
        except OSError as e:
            warning = (f"state not saved in {saved.directory()} ({e.strerror}): a restart "
                       f"would not find this change")
            log.event("state", level="warning", error=warning)
            return warning
        return None

    def _last_check(self, key: Key) -> dict | None:
        """The latest check of a checked server; None when it is not checked."""
        if self.checker is None:
            return None
        try:
            return _check_dict(self.checker.last_check(key))
        except KeyError:                      # a server it does not check
            return None

    def status(self) -> dict:
        with self.lock:
            return self._status()

    def _status(self) -> dict:
        dp = self.datapath
        frontends = []
        for fe in self.config.frontends:
            svc = self.state.services[(fe.vip, fe.port, fe.proto_number)]
            frontends.append({"name": fe.name, "vip": str(fe.vip), "port": fe.port,
                              "protocol": fe.protocol, "pool": fe.pool,
                              "servers_taking_flows": len(set(svc.slots)),
                              **_counters(dp.service_counters(svc.id))})
        ledger = self._ledger()
        census = ledger.census
        counters = dp.backend_counters_many({b.id for b in self.state.backends.values()})
        config, state, digests = self._digests or (None, None, {})
        if config is not self.config or state is not self.state:   # an apply since
            digests = planner.table_digests(self.config, self.state)
            self._digests = (self.config, self.state, digests)
        pools = []
        for pool in self.config.pools:
            servers = []
            for s in pool.servers:
                key = (pool.name, s.name)
                b = self.state.backends[key]
                servers.append({**self.server_rows[key],
                                "state": self.states[key],
                                "health": self.health.get(key, "up"),
                                "last_check": self._last_check(key),
                                "health_changes": self.health_changes.get(key, 0),
                                "active_flows": census.open.get(b.id, 0),
                                **counters[b.id]})
            pools.append({"name": pool.name, "algorithm": pool.algorithm,
                          "on_server_down": pool.on_server_down,
                          "table_digest": digests.get(pool.name), "servers": servers})
        reasons = dp.reason_counters()
        actions = dict.fromkeys(XDP_ACTIONS, 0)
        for tally, action in zip(reasons.values(), REASON_ACTIONS):
            actions[action] += tally.packets
        return {
            "version": __version__, "pid": os.getpid(),
            "uptime_seconds": round(time.monotonic() - self.started, 1),
            "config": str(self.config_path) if self.config_path else None,
            "interfaces": attached_interfaces(dp),
            "forwarding": "fast" if dp.fast_path else "kernel",
            "program": dp.program(),
            "frontends": frontends, "pools": pools,
            "flows": self._flows(ledger),
            "map_memory_bytes": sum(dp.map_memory().values()),
            "applies": dict(self.applies), "last_apply": self.last_apply,
            "health_applies": self.health_applies,
            "ha": {"role": self.role,
                   "announce_table": self.announcer and self.announcer.table,
                   "announcing": sorted(map(str, self.announcer.announced))
                   if self.announcer else []},
            "actions": actions,
            "reasons": {name: {"packets": t.packets, "bytes": t.bytes}
                        for name, t in reasons.items()},
        }

    def _ledger(self) -> FlowLedger:
        """The flow tables' census and counters: the last read while it
        stands (LEDGER_SLOW), else read anew."""
        start = time.monotonic()
        if self._ledger_kept is not None and start < self._ledger_kept[1]:
            return self._ledger_kept[0]
        ledger = self.datapath.flow_ledger()
        took = time.monotonic() - start
        self._ledger_kept = (ledger, start + LEDGER_REUSE * took) if took > LEDGER_SLOW else None
        return ledger

    def _flows(self, ledger: FlowLedger) -> dict:
        """The flow tables: connections by state, what came and went, and the
        LRU's evictions (Datapath.flow_ledger)."""
        census, fc, lim = ledger.census, ledger.program, self.datapath.limits
        capacity = {"flows": lim.max_flows, "flows_new": lim.max_new_flows}
        return {
            "entries": sum(census.entries.values()), "capacity": sum(capacity.values()),
            "connections_capacity": lim.connections,
            "established": census.established, "closing": census.closing,
            "half_open": census.half_open,
            "tables": {t: {"entries": census.entries[t], "capacity": capacity[t]}
                       for t in flowtable.TABLES},
            "created": fc.created, "promoted": fc.established, "adopted": fc.adopted,
            "replies_restored": ledger.control.replies_restored,
            "removed": {"expired": fc.expired + ledger.control_total("expired"),
                        "reopened": fc.reopened, "ended": ledger.control_total("ended"),
                        "evicted": ledger.control_total("evicted")},
        }


def sync_routes(announcer: ha.Announcer, vips) -> None:
    """Logs a refusal as it begins or changes, and its end: not again at each
    apply while it lasts (a start makes three)."""
    before = announcer.refused
    try:
        announcer.sync(vips)
    except OSError as e:
        if str(e) != before:
            log.event("announce", level="warning", table=announcer.table, error=str(e),
                      announcing=log.some(map(str, sorted(announcer.announced))))
        return
    if before is not None:
        log.event("announce", table=announcer.table, reason="no route refused now",
                  announcing=log.some(map(str, sorted(announcer.announced))))


def _server_rows(config: Config) -> dict[Key, dict]:
    """What status shows of each server that only apply changes; `monitor`:
    the name of the monitor that checks it, None when none does."""
    return {(p.name, s.name): {"name": s.name, "address": str(s.address), "port": s.port,
                               "weight": s.weight, "backup": s.backup,
                               "monitor": m.name if (m := config.monitor_for(p, s)) else None}
            for p in config.pools for s in p.servers}


def _check_dict(last) -> dict | None:
    if last is None:
        return None
    ok, reason, duration = last
    return {"ok": ok, "reason": reason,
            "duration_seconds": None if duration is None else round(duration, 6)}


def _counters(c) -> dict:
    return {"packets_in": c.packets_in, "bytes_in": c.bytes_in, "packets_out": c.packets_out,
            "bytes_out": c.bytes_out, "new_flows": c.new_flows}


def attached_interfaces(datapath: Datapath) -> list[dict]:
    """The links the data path is attached to, as the kernel has them now."""
    return [{"name": a.ifname, "ifindex": a.ifindex, "mode": a.mode, "state": a.state}
            for a in datapath.attachments()]


def _announce_arp(answered: dict, answering: dict, **why) -> tuple[int, list[str]]:
    """Announces by a gratuitous ARP each VIP answered on a link now that was
    not, or with another MAC (ARP entries, planner.desired's: a backup has
    none): one that moved here from another box (at the start, becoming
    active, by an `xlb apply`), a link that came up or was given its address
    back, lb's MAC changed. Clients that knew the VIP at another MAC use this
    one at once, not once their entry expires (tens of seconds, all lost).
    Returns how many went out, and why the others did not (a link down)."""
    news = {key: mac for key, mac in answering.items() if answered.get(key) != mac}
    if not news:
        return 0, []
    garps, unsent = ha.send_garp(news)
    log.event("arp", **why, gratuitous_arps=garps, unsent=log.some(unsent, sep="; "))
    return garps, unsent


def _link_renamed(config: Config, old: str, name: str) -> None:
    """Logs a link renamed, as the link watch logs a link's news; a warning
    where the config names the old name and not the new: the frontends that
    name it have their VIPs answered there (ARP) no more."""
    named = config.attach_names()
    lost = old in named and name not in named
    log.event("link", level="warning" if lost else "info", link=name,
              reason=f"renamed from {old}" + (
                  f": the frontends that name {old} have their VIPs answered on it (ARP) "
                  f"no more; name {name} in their interfaces" if lost else ""))


def _warn_link(warned: list[str], event: str, name: str, reason: str, **fields) -> None:
    """Logs a warning about link `name` and adds it to warned, which an apply
    answers with: `xlb apply` says it where the instance's log is not seen."""
    log.event(event, level="warning", interface=name, reason=reason, **fields)
    warned.append(f"{name}: {reason}")


def _attach(datapath: Datapath, link: netif.Link, warned: list[str]):
    """Native XDP where the driver takes it, generic with a warning elsewhere."""
    att = datapath.attach(link.index, link.name)
    if att.mode != "native":
        _warn_link(warned, "attach", link.name, f"native XDP refused ({att.note}); generic "
                   f"XDP is slower", mode="generic")
    return att


def _warn_veth(datapath: Datapath, att, warned: list[str], joins: bool) -> None:
    """A warning where a veth's peer would lose what xlb transmits: asked once
    every link of the apply is attached, as xlb may attach the peer itself,
    now or, where no link is named (joins), once it is set up."""
    if att.mode != "native":
        return
    peer = netif.veth_peer_without_xdp(att.ifindex, joins)
    if peer is not None:
        lost = ("answers for VIPs (ARP, ping, fragmentation needed)"
                + (" and fast-path packets" if datapath.fast_path else ""))
        _warn_link(warned, "attach", att.ifname,
                   f"its veth peer {peer} runs no XDP program, so the {lost} that "
                   f"xlb sends out of {att.ifname} are lost; attach one to {peer} "
                   f"(one that passes everything will do)", mode="native")


def _index_of(name: str) -> int | None:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def _made_again(attached: dict[str, netif.Link], now: list[netif.Link] | None = None
                ) -> tuple[list[netif.Link], list[netif.Link]]:
    """The links attached, as they are, but each one deleted and made again
    under its name since (a veth, a VLAN, a NIC whose driver was reloaded:
    another ifindex, no program) as it is now; and those, to attach. Left
    unattached, the made one let the servers' replies reach the clients
    un-NATed, every connection failing, until an `xlb apply`. Where the
    links are read (one made again, or `now`, read by the caller), those
    still there have their names, addresses and MACs as they are now (a
    renamed link keeps the program)."""
    if now is None and all(_index_of(name) == old.index for name, old in attached.items()):
        return list(attached.values()), []      # the usual case, without a dump of the links
    by_index = {link.index: link for link in (netif.links() if now is None else now)}
    made = {link.name: link for link in by_index.values()
            if link.ethernet and not link.xdp_prog_id}
    links, fresh = [], []
    for name, old in attached.items():
        if (same := by_index.get(old.index)) is not None:
            links.append(old.reread(same))
        elif new := made.get(name):
            links.append(new)
            fresh.append(new)
        else:
            links.append(old)
    return links, fresh


def _came_up(attached: list[netif.Link], now: list[netif.Link], warned: list[str],
             foreign: frozenset[tuple[int, int]]
             ) -> tuple[list[netif.Link], list[netif.Link], frozenset[tuple[int, int]]]:
    """The links a config that names no link runs on: those attached that
    are still there, and the up Ethernet links (`now`: as they are) not
    among them (new, or set up since the last apply); those, to attach; and
    those of them left to another XDP program, as (index, program id).
    Left out, the servers' replies that the kernel routes through one (a
    VLAN added for them, say) reached the clients un-NATed until an `xlb
    apply`. One running another XDP program is left to it, with a warning
    (`xlb up` refuses it) unless it is among `foreign`, warned of already.
    One gone is let go: kept until an `xlb apply` (none in the one-line
    form), links that come and go (containers' veths) took every place of
    the data plane's links, and each apply failed on its capacity."""
    there = {link.index for link in now}
    known = {link.index for link in attached}
    came, left = [], set()
    for link in now:
        if link.index in known or not (link.ethernet and link.up):
            continue
        if not link.xdp_prog_id:
            came.append(link)
            continue
        left.add((link.index, link.xdp_prog_id))
        if (link.index, link.xdp_prog_id) not in foreign:
            _warn_link(warned, "attach", link.name, f"came up running another XDP program "
                       f"(id {link.xdp_prog_id}): not attached; {UNNAMED_LINKS}")
    return [link for link in attached if link.index in there] + came, came, frozenset(left)


def select_links(config: Config, holds: Callable[[netif.Link], bool] = lambda link: False
            ) -> list[netif.Link]:
    """The links a config attaches to (raises LookupError): those it names, or
    every up Ethernet one (not the loopback) and those that run the program
    already, by ifindex (a link that goes down keeps its program, and serves
    again when it comes back up; so does one that runs the program an adoption
    takes over)."""
    names = config.attach_names()
    if names:
        links = netif.select(names)
        for link in links:
            if link.loopback:   # what a host sends to a VIP leaves by a link, not lo
                raise LookupError(f"interface {link.name!r} is the loopback: no packet for a "
                                  f"VIP arrives there")
            if not link.ethernet:   # the program would parse IP packets as frames
                raise LookupError(f"interface {link.name!r} carries no Ethernet frames (a tun, "
                                  f"tunnel or wireguard link): no ARP for a VIP arrives there")
        return links
    links = [link for link in netif.links()
             if link.ethernet and (link.up or holds(link))]
    if not links:
        raise LookupError("no up Ethernet interface in this network namespace")
    return links


def refuse_taken(links: Iterable[netif.Link], config: Config) -> None:
    """Raises LookupError for a link that runs an XDP program not xlb's, which
    the attach would not replace (XDP_FLAGS_UPDATE_IF_NOEXIST): found there,
    it came after the compile (`up`) or the map writes (`apply`). Where the
    config names no links, the link is one of every up Ethernet link, and the
    error says how to leave it out."""
    for link in links:
        if link.xdp_prog_id:
            raise LookupError(f"{link.name}: another XDP program (id {link.xdp_prog_id}) is "
                              f"attached already"
                              + ("" if config.attach_names() else f"; {UNNAMED_LINKS}"))


def check_host(config: Config, new_links: list[netif.Link], warned: list[str]) -> None:
    """Refuses VIPs and servers that are the host's own addresses; warns (into
    warned), once per link it is about to attach, where replies would be filtered."""
    found = netif.links()
    local = netif.local_addresses(found)
    # Each prefix as the numbers `addr in prefix` compares: 10,000 servers
    # against five routes took 28 ms with `in`, 11-19 ms so.
    routes = [(int(prefix.network_address), int(prefix.netmask), prefix, kind, dev)
              for prefix, kind, dev in netif.local_routes(found)]

    def owned(addr: IPv4Address) -> tuple[str, str] | None:
        """How the kernel owns addr ("local" or "broadcast", and where), or None.
        Not only a link's address: an address of a `local` route, and a
        subnet's broadcast address (which clients send to every host of the link)."""
        if addr in local:
            return "local", f"a local address (on {local[addr]})"
        number = int(addr)
        for network, mask, prefix, kind, dev in routes:
            if number & mask == network:
                return kind, (f"a broadcast address of this host (of {dev}'s subnet)"
                              if kind == "broadcast" else
                              f"a local address (local route {prefix} on {dev})")
        return None

    for fe in config.frontends:
        if found := owned(fe.vip):
            kind, what = found
            raise LookupError(f"VIP {fe.vip} is {what}: " + (
                "no client can reach a server there" if kind == "broadcast" else
                "reverse-NATed replies would look martian; remove it from the host"))
    for pool in config.pools:
        for s in pool.servers:
            if found := owned(s.address):
                # The host's own answers leave by its stack, never through XDP
                # (nor does it get a subnet's broadcast as one host's traffic).
                raise LookupError(f"server {s.name} ({s.address}:{s.port}) is {found[1]}: "
                                  f"its replies would not pass xlb to be reverse-NATed")
    for link in new_links:
        if netif.strict_rp_filter(link.name):
            _warn_link(warned, "rp_filter", link.name,
                       f"strict rp_filter drops reverse-NATed replies (their source is "
                       f"the VIP); set net.ipv4.conf.{link.name}.rp_filter=0 or 2")


def _unserved(config: Config, links: list[netif.Link]) -> list[str]:
    """Where a config names its links (and so may leave one out), what the
    links left out keep from working, as warnings (also logged): a VIP on the
    subnet of one, whose ARP requests nothing answers there; servers routed
    through one, whose replies come back there, where no program NATs them
    back to the VIP (they leave from the server's own address, which no
    client takes), as the kernel routes them (netif.route_links). Not
    refused: a router may route the VIP to this node another way, and
    replies may come back another way."""
    warnings = []
    answered = {(link.index, vip) for link, vip in planner.arp_links(config, links)}
    found = netif.links()
    for link in found:
        for fe in config.frontends:
            if link.up and link.ethernet and not link.loopback and link.holds(fe.vip) \
                    and (link.index, fe.vip) not in answered:
                warnings.append(("arp", link.name,
                                 f"VIP {fe.vip} of {configfile.key_path('frontends', fe.name)} "
                                 f"is on {link.name}'s subnet, where xlb answers no ARP for "
                                 f"it (the interfaces named leave {link.name} out): clients "
                                 f"there cannot reach it; name {link.name} in its interfaces"))
    servers: dict[IPv4Address, list[str]] = {}
    for pool in config.pools:
        for s in pool.servers:
            servers.setdefault(s.address, []).append(s.name)
    on = {link.index for link in links}
    behind: dict[int, list[str]] = {}
    for address, index in netif.route_links(servers).items():
        if index not in on:
            behind.setdefault(index, []).extend(servers[address])
    link_names = {link.index: link.name for link in found}
    for index, names in behind.items():
        if (name := link_names.get(index)) is None:     # made since the links were read
            continue
        names = sorted(set(names))
        shown = log.some(names, 3, ", ")
        warnings.append(("route", name,
                         f"{'servers' if len(names) > 1 else 'server'} {shown} "
                         f"{'are' if len(names) > 1 else 'is'} routed through {name}, which "
                         f"xlb does not run on (the interfaces named leave it out): replies "
                         f"come back there and leave from the server's address, not NATed "
                         f"back to the VIP; name {name} too"))
    for event, name, warning in warnings:
        log.event(event, level="warning", interface=name, reason=warning)
    return [warning for _, _, warning in warnings]


def _carry(states: dict[Key, str], renamed: dict[Key, Key],
           keys: Collection[Key]) -> tuple[dict[Key, str], list[str]]:
    """states (drain, maint) under their servers' names after `renamed`
    (planner.carried), and "drain of was1 in pool web" for each one lost with
    its server, which the operator should hear of."""
    names = planner.carried(states, renamed, keys)
    return ({names[k]: v for k, v in states.items() if k in names},
            [f"{state} of {server} in pool {pool}"
             for (pool, server), state in sorted(states.items()) if (pool, server) not in names])


class BadRequest(Exception):
    """A request that names no known command or lacks what its command needs."""
