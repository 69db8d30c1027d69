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
import dataclasses
import json
import os
import resource
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Collection, Iterable
from ipaddress import IPv4Address
from pathlib import Path

from . import __version__, config as configfile, ctl, flowtable, ha, log, metrics, netif, planner
from . import state as saved
from .datapath import Datapath, DatapathError, FlowLedger, Limits, find_running
from .health import HealthChecker, Target
from .healthsync import HealthSync
from .layout import REASON_ACTIONS, XDP_ACTIONS
from .linkwatch import LinkWatch
from .model import UNNAMED_LINKS, Config, ConfigError
from .sweep import sweep_forever
from .units import interfaces, quoted

EMPTY = Config(frontends=(), pools=())
ADMIN_ACTIONS = {"disable": "maint", "drain": "drain", "enable": None}
# The requests that change something: told begun (ctl.BEGUN), their clients
# wait for the answer. A status or ping of a hung instance still times out.
CHANGES = frozenset({"apply", "server", "role", "down"})

Key = tuple[str, str]


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
              relink: bool) -> dict:
        """Takes the data plane to `config`. Raises (LookupError, CapacityError,
        DatapathError, bcc's error of a map write the kernel refused) with
        nothing changed. relink: a new config, whose links
        are looked at again (attached, detached); a change of state (health,
        admin, role) keeps the links as they are, so that no link's trouble
        keeps it from taking effect."""
        warned: list[str] = []      # about the links attached: logged, and answered
        if relink:
            links = _select(config, self.datapath.holds)
            # Those that do not run this program: new links, one made again
            # under a name (another ifindex), one whose program was removed or
            # replaced by hand, one running the program an adoption takes over.
            ours = self.datapath.program()["id"]
            fresh = [link for link in links if link.xdp_prog_id != ours]
            _check_host(config, fresh, warned)
            _refuse_taken((link for link in fresh if not self.datapath.holds(link)), config)
        else:
            links, fresh = list(self.links.values()), []
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
        attached = []
        try:
            planner.execute(dp, planner.plan(self.state, target))
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
            planner.execute(dp, planner.plan(target, self.state))
            raise
        dp.swapped()                # an adoption's copied flow tables catch up
        for att in attached:        # once all are attached: a veth whose peer xlb
            _warn_veth(dp, att, warned)     # attaches too has a program at its peer
        ended = dp.delete_flows(set(ends.backend_ids), set(ends.service_ids), ends.retired)
        kept = {link.index for link in links}
        unserved = _unserved(config, links) if relink and config.attach_names() else []
        let_go = [old for old in self.links.values() if old.index not in kept]
        for old in let_go:
            dp.detach(old.index)

        rows = _server_rows(config)
        with self.lock:
            self.config, self.state, self.states, self.admin = config, target, states, admin
            self.server_rows = rows
            self.health = health
            # The maps now hold the checks' latest states, whichever apply wrote them.
            self.health_applies = {**self.health_applies, "unapplied_since": None, "error": None}
            with self._changes_lock:
                self.health_changes = carried(self.health_changes)
                self._checked_as = checked_as
                self.check_durations.track({t.key for t in self.health_targets()}, stays)
            self.links = {link.name: link for link in links}
            if relink:                      # a new config, not a change of state
                self.last_apply = time.time()
        self._announce()
        return {"frontends": len(config.frontends), "pools": len(config.pools),
                "servers": config.server_count(), "flows_ended": sum(ended.values()),
                "admin_forgotten": forgotten, "attached": [att.ifname for att in attached],
                "detached": [old.name for old in let_go], "unserved": unserved,
                "attach_warnings": warned}

    def _announce(self) -> None:
        """Announces the VIPs served while active. A route that cannot be written
        is a warning, not a failed apply: the maps already serve the config."""
        if self.announcer is None:
            return
        taking = {fe.name: len(set(self.state.services[(fe.vip, fe.port, fe.proto_number)].slots))
                  for fe in self.config.frontends}
        _sync_routes(self.announcer,
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
            self.apply(self.config, relink=False)
        except Exception:
            self.role = was
            raise
        garps, unsent = ha.send_garp(self.state.arp) if role == "active" and was != "active" \
            else (0, [])
        log.event("role", level="warning" if unsent else "info", old=was, new=role,
                  gratuitous_arps=garps, unsent="; ".join(unsent) or None)
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
            for b in state.backends.values():
                self.datapath.set_backend(b.id, b.address, b.port)
            for i, (address, port) in state.retired_backends.items():
                self.datapath.set_backend(i, address, port, closed=True)
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

    def remember(self) -> str | None:
        """Saves in xlb's state directory what no file holds: the file served,
        the config that runs, drain and maint, the role, the announce table.
        Returns a warning if it could not."""
        try:
            saved.save(saved.State(str(self.config_path) if self.config_path else None,
                                   configfile.dump(self.config), dict(self.admin), self.role,
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
        ledger = dp.flow_ledger()
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
            "interfaces": _interfaces(dp),
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


def _sync_routes(announcer: ha.Announcer, vips) -> None:
    try:
        announcer.sync(vips)
    except OSError as e:
        log.event("announce", level="warning", table=announcer.table, error=str(e),
                  announcing=",".join(map(str, sorted(announcer.announced))) or None)

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


def _interfaces(datapath: Datapath) -> list[dict]:
    """The links the data path is attached to, as the kernel has them now."""
    return [{"name": a.ifname, "ifindex": a.ifindex, "mode": a.mode, "state": a.state}
            for a in datapath.attachments()]


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


def _warn_veth(datapath: Datapath, att, warned: list[str]) -> None:
    """A warning where a veth's peer would lose what xlb transmits: asked once
    every link of the apply is attached, as xlb may attach the peer itself."""
    if att.mode != "native":
        return
    peer = netif.veth_peer_without_xdp(att.ifindex)
    if peer is not None:
        lost = ("answers for VIPs (ARP, ping, fragmentation needed)"
                + (" and fast-path packets" if datapath.fast_path else ""))
        _warn_link(warned, "attach", att.ifname,
                   f"its veth peer {peer} runs no XDP program, so the {lost} that "
                   f"xlb sends out of {att.ifname} are lost; attach one to {peer} "
                   f"(one that passes everything will do)", mode="native")


def _select(config: Config, holds: Callable[[netif.Link], bool] = lambda link: False
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


def _refuse_taken(links: Iterable[netif.Link], config: Config) -> None:
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


def _check_host(config: Config, new_links: list[netif.Link], warned: list[str]) -> None:
    """Refuses VIPs and servers that are the host's own addresses; warns (into
    warned), once per link it is about to attach, where replies would be filtered."""
    found = netif.links()
    local, routes = netif.local_addresses(found), netif.local_routes(found)

    def owned(addr: IPv4Address) -> tuple[str, str] | None:
        """How the kernel owns addr ("local" or "broadcast", and where), or None.
        Not only a link's address: an address of a `local` route, and a
        subnet's broadcast address (which clients send to every host of the link)."""
        if addr in local:
            return "local", f"a local address (on {local[addr]})"
        for prefix, kind, dev in routes:
            if addr in prefix:
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
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        warnings.append(("route", name,
                         f"{'servers' if len(names) > 1 else 'server'} {shown} "
                         f"{'are' if len(names) > 1 else 'is'} routed through {name}, which "
                         f"xlb does not run on (the interfaces named leave it out): replies "
                         f"come back there and leave from the server's address, not NATed "
                         f"back to the VIP; name {name} too"))
    for event, name, warning in warnings:
        log.event(event, level="warning", interface=name, reason=warning)
    return [warning for _, _, warning in warnings]


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
        links = _select(config)
        _check_host(config, [], [])    # local VIPs; the warnings come with the attach
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
        _refuse_taken((link for link in links
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
                      servers=",".join(f"{p}/{s}={v}" for (p, s), v in
                                       sorted(balancer.admin.items())) or None,
                      forgotten="; ".join(forgotten) or None)
        signals.check()
        let_go = datapath.settle()
        if kept is not None and kept.announce_table not in (None, announce_table):
            # The routes a killed instance left where this one announces nothing:
            # BIRD would go on announcing them. Withdrawn before remember()
            # forgets the table.
            _sync_routes(ha.Announcer(kept.announce_table), ())
        balancer.remember()
        if exporter is not None:
            metrics.serve(exporter, balancer, balancer.check_durations)
        serving = True
        attached = _interfaces(datapath)
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
            _sync_routes(announcer, ())
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


def _carry(states: dict[Key, str], renamed: dict[Key, Key],
           keys: Collection[Key]) -> tuple[dict[Key, str], list[str]]:
    """states (drain, maint) under their servers' names after `renamed`
    (planner.carried), and "drain of was1 in pool web" for each one lost with
    its server, which the operator should hear of."""
    names = planner.carried(states, renamed, keys)
    return ({names[k]: v for k, v in states.items() if k in names},
            [f"{state} of {server} in pool {pool}"
             for (pool, server), state in sorted(states.items()) if (pool, server) not in names])


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
        items = list(dict.fromkeys(items))
        return ", ".join(items[:most]) + (f" and {len(items) - most} more"
                                          if len(items) > most else "")
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
    links = LinkWatch(balancer, checker)

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


class BadRequest(Exception):
    """A request that names no known command or lacks what its command needs."""


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
        return {"text": configfile.dump(balancer.config),
                "config": str(balancer.config_path) if balancer.config_path else None}
    if cmd == "apply":
        text, path = _field(req, "text"), _field(req, "path")
        if not os.path.isabs(path):
            raise BadRequest("malformed 'apply' request: 'path' must be absolute")
        t0 = time.perf_counter()
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
        log.event("apply", result="ok", seconds=t2 - t0, config=path, **result,
                  **{k: ",".join(names) or None for k, names in links.items()},
                  admin_forgotten="; ".join(forgotten) or None)
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
