"""From a config to the map writes that make the data plane serve it.

`desired` computes what the maps should hold (ids chosen stably, so that a
later config keeps the ids of what it keeps); `plan` lists the writes that
take the maps from one state to another in a safe order: a service's new ring
(or Maglev table) is written beside the one in use, then the service is
switched to it. Both are pure: `execute` is the only step that touches a
Datapath.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache
from ipaddress import IPv4Address
from itertools import groupby
from operator import itemgetter
from typing import Collection, Iterable, Mapping, Protocol

from . import maglev, scheduler
from .layout import OWNER_SLOTS, SERVICE_ADOPT, SERVICE_MAGLEV, SERVICE_SOURCE
from .model import MAGLEV_ALGORITHMS, MAX_ARP, MAX_LINKS, UNNAMED_LINKS, Config, Pool, Server

ServiceKey = tuple[IPv4Address, int, int]       # vip, port, protocol number
BackendKey = tuple[str, str]                    # pool, server


class CapacityError(ValueError):
    """The config needs more than the data plane's maps hold."""


@dataclass(frozen=True)
class ServiceState:
    id: int
    ring: int                       # 2*id or 2*id+1; Maglev: 2*k or 2*k+1, k its Maglev slot
    slots: tuple[int, ...]          # backend ids, in ring order, or the Maglev table
    maglev: bool = False
    # syn, established, closing, udp, in seconds; None when not known (maps read
    # back by a control plane that adopts them): plan sets them again.
    timeouts: tuple[int, int, int, int] | None = None
    source: bool = False            # Maglev by the client's address alone (algorithm "source")
    adopt: bool = False             # adopt_replies: takes over another node's connections

    @property
    def flags(self) -> int:
        """The data plane's service.flags."""
        return ((SERVICE_MAGLEV if self.maglev else 0) | (SERVICE_SOURCE if self.source else 0)
                | (SERVICE_ADOPT if self.adopt else 0))


@dataclass(frozen=True)
class BackendState:
    id: int
    address: IPv4Address
    port: int
    closed: bool = False            # takes no new flows: its server is not up


@dataclass(frozen=True)
class DataplaneState:
    services: dict[ServiceKey, ServiceState] = field(default_factory=dict)
    backends: dict[BackendKey, BackendState] = field(default_factory=dict)
    vips: frozenset[IPv4Address] = frozenset()
    arp: dict[tuple[int, IPv4Address], bytes] = field(default_factory=dict)
    # (address, port, protocol) of a server -> (vip, port) of the first frontends
    # it serves (layout.OWNER_SLOTS): its packets no reply entry knows may be
    # those frontends' replies
    owners: dict[tuple[IPv4Address, int, int], tuple[tuple[IPv4Address, int], ...]] = \
        field(default_factory=dict)
    # Ids of removed servers and frontends: their counters, and a removed
    # server's kept flows, still name them, so a newcomer takes one only when
    # no id is left that was never used; a server back at a retired backend's
    # address and port takes its id (desired). Backends by id: (address, port).
    retired_backends: Mapping[int, tuple[IPv4Address, int]] = field(default_factory=dict)
    retired_services: frozenset[int] = frozenset()

    def endpoints(self) -> dict[int, tuple[IPv4Address, int]]:
        """(address, port) of every backend id, retired ones too."""
        return {**self.retired_backends,
                **{b.id: (b.address, b.port) for b in self.backends.values()}}


class ArpLink(Protocol):
    index: int
    name: str
    mac: bytes

    def holds(self, addr: IPv4Address) -> bool: ...


def _allocate(keys: Iterable, previous: dict, retired: frozenset[int], limit: int,
              what: str) -> tuple[dict, frozenset[int]]:
    """Ids for keys, and the retired ids after them. A key keeps its id from
    `previous`; a new key takes an id never used first (neither in `previous`
    nor retired), so that counters and flows still naming a removed key's id
    are not a newcomer's; only when none is left, a retired one (one that this
    change retires last)."""
    ids = {k: previous[k] for k in keys if k in previous}
    prev_ids = set(previous.values())
    unused = (i for i in range(limit) if i not in prev_ids and i not in retired)
    reusable = iter([*sorted(retired), *sorted(prev_ids - set(ids.values()))])
    for k in keys:
        if k not in ids:
            i = next(unused, None)
            if i is None:
                i = next(reusable, None)
            if i is None:
                raise CapacityError(f"more {what} than the data plane holds ({limit})")
            ids[k] = i
    return ids, frozenset((retired | prev_ids) - set(ids.values()))


STATES = ("up", "down", "drain", "maint")      # what server_state gives


def server_state(server: Server, admin: str | None, health: str) -> str:
    """What status shows and what decides new flows: maint (disabled in the config
    or at run time) before down (failed health checks) before drain before up.
    A drained server that fails its checks is down, as in HAProxy, so that its
    established flows follow its pool's on_server_down: drain keeps them for a
    server that can still serve them."""
    if not server.enabled or admin == "maint":
        return "maint"
    if health == "down":
        return "down"
    return "drain" if admin == "drain" else "up"


def _choose(pool: Pool, states: Mapping[BackendKey, str]) -> list[Server]:
    """The servers that take new flows: the primaries that are up, or, while
    none is, the backups that are up."""
    up = [s for s in pool.servers if states.get((pool.name, s.name), "up") == "up"]
    primaries = [s for s in up if not s.backup]
    return primaries or [s for s in up if s.backup]


@lru_cache(maxsize=32)
def _maglev_table(backends: tuple[maglev.Backend, ...], size: int) -> tuple[int, ...]:
    """Built once for each set of servers: every health change plans anew, and
    pools it does not touch keep their tables."""
    return tuple(maglev.table(list(backends), size))


def _pool_services(config: Config) -> dict[str, set[ServiceKey]]:
    out: dict[str, set[ServiceKey]] = {}
    for f in config.frontends:
        out.setdefault(f.pool, set()).add((f.vip, f.port, f.proto_number))
    return out


def renames(old: Config, previous: DataplaneState, new: Config) -> dict[BackendKey, BackendKey]:
    """The servers of `previous` (named after `old`) that `new` has under another
    name at the same address and port: renamed, in a renamed pool, or both.
    They are the same real server, so they keep their ids, and with them
    their flows and counters. A pool of another name is the same pool when it
    serves a frontend the old one served; else an address in it is a new server."""
    endpoints = {(p.name, s.name): (int(s.address), s.port) for p in new.pools
                 for s in p.servers}
    left: dict[tuple[int, int], list[BackendKey]] = {}  # old servers gone from where they were
    for key, b in previous.backends.items():
        endpoint = (int(b.address), b.port)
        if endpoints.get(key) != endpoint:
            left.setdefault(endpoint, []).append(key)
    if not left:
        return {}
    served, serves = _pool_services(old), _pool_services(new)
    out = {}
    for key, endpoint in endpoints.items():
        b = previous.backends.get(key)
        if b is not None and (int(b.address), b.port) == endpoint:
            continue
        same = [k for k in left.get(endpoint, ())
                if k[0] == key[0] or served.get(k[0], set()) & serves.get(key[0], set())]
        if same:
            k = min(same, key=lambda c: (c[0] != key[0], c[1] != key[1],
                                         previous.backends[c].id))
            left[endpoint].remove(k)
            out[k] = key
    return out


def named_after(config: Config) -> DataplaneState:
    """A state whose backends are config's servers: what renames() compares
    with when no data path holds config (a fresh start from a saved one)."""
    servers = [(p.name, s) for p in config.pools for s in p.servers]
    return DataplaneState(backends={(pool, s.name): BackendState(i, s.address, s.port)
                                    for i, (pool, s) in enumerate(servers)})


def carried(states: Mapping[BackendKey, str], renamed: Mapping[BackendKey, BackendKey],
            keys: Collection[BackendKey]) -> dict[BackendKey, BackendKey]:
    """Where each of the run-time `states` (drain, maint) of servers goes after
    `renamed` (see renames): old name -> name among `keys`. A state goes with
    its server when it is renamed, and is lost when its server is gone or its
    name was taken by another server (whose state it is not)."""
    return {k: renamed.get(k, k) for k in states
            if (k in renamed or k not in renamed.values()) and renamed.get(k, k) in keys}


def table_digests(config: Config, state: DataplaneState) -> dict[str, str]:
    """maglev.digest of each Maglev pool's table in `state` (what the maps
    hold: the servers taking flows), by pool name; a pool that serves no
    frontend has none. Every frontend of a pool holds the same table. Rings
    have none: a ring picks by a per-CPU cursor, which no two nodes share."""
    endpoints, out = state.endpoints(), {}
    for fe in config.frontends:
        svc = state.services[(fe.vip, fe.port, fe.proto_number)]
        if svc.maglev and fe.pool not in out:
            out[fe.pool] = maglev.digest(svc.slots, endpoints, svc.source)
    return out


def arp_links(config: Config, links: Iterable[ArpLink]) -> list[tuple[ArpLink, IPv4Address]]:
    """(link, VIP) for each link on whose subnets a VIP's ARP requests arrive
    (the frontend's interfaces, if it names them): where an active node
    answers for the VIP."""
    links = list(links)
    return [(link, fe.vip) for fe in config.frontends for link in links
            if link.holds(fe.vip) and (not fe.interfaces or link.name in fe.interfaces)]


def desired(config: Config, links: Iterable[ArpLink], previous: DataplaneState,
            max_services: int, max_backends: int, ring_size: int, max_maglev: int,
            states: Mapping[BackendKey, str] = {}, max_arp: int = MAX_ARP,
            renamed: Mapping[BackendKey, BackendKey] = {},
            max_links: int = MAX_LINKS) -> DataplaneState:
    """`states` maps (pool, server) to server_state(); a missing key is "up".
    `renamed` (see renames) gives servers of `previous` their names in `config`.
    `links`: those the data plane runs on, at most `max_links` (tx_links)."""
    links = list(links)
    if len(links) > max_links:     # else the attach past the last fails, after the rest
        raise CapacityError(f"{len(links)} interfaces: the data plane holds {max_links}"
                            + ("" if config.attach_names() else f"; {UNNAMED_LINKS}"))
    # Ids go by a server's name and where it is: a server given another address
    # or port is a new server (a new id), and the flows still going to its old
    # address stay on the old id, retired, as a removed server's do. A renamed
    # one keeps its id. (Addresses as numbers: an IPv4Address hashes in Python,
    # 10,000 servers take 50 ms.)
    keys = [(p.name, s.name, int(s.address), s.port) for p in config.pools for s in p.servers]
    held = {(*renamed.get(k, k), int(b.address), b.port): b.id
            for k, b in previous.backends.items()}
    # A server back at a retired backend's address and port, removed or moved
    # away by an earlier change, takes that id (its counters cleared, plan):
    # the flows that still name it are connections to this server, its active
    # flows, ended by its maint. With an id of its own beside it, a restart
    # that reads the maps back (recover) found two entries at one address, and
    # one drained or down (in no ring) was named after the older: its active
    # flows read 0 while its connections went on.
    back = {(int(a), port): i for i, (a, port) in previous.retired_backends.items()}
    for k in keys:
        if k not in held and (i := back.pop(k[2:], None)) is not None:
            held[k] = i
    ids, retired = _allocate(keys, held,
                             frozenset(previous.retired_backends.keys() - held.values()),
                             max_backends, "backends")
    endpoints = previous.endpoints()
    retired_backends = {i: endpoints[i] for i in retired}
    backend_ids = {k[:2]: i for k, i in ids.items()}
    backends = {}
    for pool in config.pools:
        if pool.algorithm not in MAGLEV_ALGORITHMS and len(pool.servers) > ring_size:
            raise CapacityError(f"pool {pool.name}: {len(pool.servers)} servers do not fit "
                                f"a ring of {ring_size}")
        for s in pool.servers:
            key = (pool.name, s.name)
            backends[key] = BackendState(backend_ids[key], s.address, s.port,
                                         states.get(key, "up") != "up")

    service_keys = [(f.vip, f.port, f.proto_number) for f in config.frontends]
    service_ids, retired_services = _allocate(service_keys,
                                              {k: s.id for k, s in previous.services.items()},
                                              previous.retired_services, max_services,
                                              "frontends")
    maglev_keys = [key for f, key in zip(config.frontends, service_keys)
                   if config.pool(f.pool).algorithm in MAGLEV_ALGORITHMS]
    maglev_ids, _ = _allocate(maglev_keys,
                              {k: s.ring // 2 for k, s in previous.services.items() if s.maglev},
                              frozenset(), max_maglev, "frontends with a Maglev pool")
    # The Maglev tables read now: a frontend that leaves Maglev in this change
    # reads its table until its service switches (plan), and one that takes
    # its pair fills the other table of it.
    read = {s.ring for s in previous.services.values() if s.maglev}
    services = {}
    for fe, key in zip(config.frontends, service_keys):
        pool = config.pool(fe.pool)
        chosen = [(backends[(pool.name, s.name)].id, s) for s in _choose(pool, states)]
        is_maglev = key in maglev_ids
        if is_maglev:
            slots = _maglev_table(tuple(maglev.Backend(i, s.address, s.port, s.weight)
                                        for i, s in chosen), pool.maglev_size)
            index = maglev_ids[key]       # tables 2*index and 2*index+1 are this service's
        else:
            slots = tuple(scheduler.ring(pool.algorithm, [(i, s.weight) for i, s in chosen],
                                         ring_size))
            index = service_ids[key]      # and so are rings 2*index and 2*index+1
        old = previous.services.get(key)
        if old is None or old.maglev != is_maglev or old.ring // 2 != index:
            ring = 2 * index + 1 if is_maglev and 2 * index in read else 2 * index
        elif old.slots == slots:
            ring = old.ring
        else:
            ring = old.ring ^ 1          # the one not in use
        services[key] = ServiceState(service_ids[key], ring, slots, is_maglev, fe.timeouts,
                                     pool.algorithm == "source", fe.adopt_replies)

    arp = {(link.index, vip): link.mac for link, vip in arp_links(config, links)}
    if len(arp) > max_arp:
        raise CapacityError(f"{len(arp)} ARP answers (VIPs times the links on their subnets): "
                            f"the data plane holds {max_arp}")
    # A server that more frontends share than the data plane's slots has the
    # connections of the others mended by the sweep alone, when they lose
    # their reply entry (config refuses adopt_replies on a shared server).
    owners: dict[tuple[IPv4Address, int, int], tuple[tuple[IPv4Address, int], ...]] = {}
    for fe in config.frontends:
        owner = (fe.vip, fe.port)
        first = (owner,)
        for s in config.pool(fe.pool).servers:
            # One lookup for a server that no other frontend serves: the
            # addresses' hashes are dear at 10,000 servers.
            endpoint = (s.address, s.port, fe.proto_number)
            held = owners.setdefault(endpoint, first)
            if held is not first and len(held) < OWNER_SLOTS:
                owners[endpoint] = (*held, owner)
    return DataplaneState(services, backends, frozenset(f.vip for f in config.frontends), arp,
                          owners, retired_backends, retired_services)


def recover(config: Config, held: DataplaneState, backends: dict[int, BackendState],
            ids: Mapping[BackendKey, int] | None = None) -> DataplaneState:
    """The state that running maps hold (read back by a control plane that
    adopts them), with their backends named after `config`, the config they
    were written for, so that every id stays what it is. `held` is what the
    maps hold with no backend named, `backends` their entries by id. The maps
    know a backend by address and port only: a server that is in several pools is
    told apart by the rings of each pool's frontends (one in none of its own
    pool's, drained or down, is not one in another pool's), then by `ids`, the
    ids its control process saved (none from a build before it saved them),
    then by id order (the order `desired` gives ids in, until a server joins
    a pool later). Entries that no server matches stay unnamed (removed
    servers, closed to new flows): retired."""
    in_rings: dict[str, set[int]] = {}
    for fe in config.frontends:
        svc = held.services.get((fe.vip, fe.port, fe.proto_number))
        if svc is not None:
            in_rings.setdefault(fe.pool, set()).update(svc.slots)
    named: dict[BackendKey, BackendState] = {}
    taken: set[int] = set()
    for pool in config.pools:
        ringed = in_rings.get(pool.name, set())
        others = set().union(*(ids for name, ids in in_rings.items() if name != pool.name))
        for s in pool.servers:
            candidates = [b for b in backends.values() if b.id not in taken
                          and (b.address, b.port) == (s.address, s.port)]
            if candidates:
                saved = (ids or {}).get((pool.name, s.name))
                b = min(candidates, key=lambda b: (b.id not in ringed, b.id in others,
                                                   b.id != saved, b.id))
                taken.add(b.id)
                named[(pool.name, s.name)] = b
    return replace(held, backends=named, retired_backends={
        i: (b.address, b.port) for i, b in backends.items() if i not in taken})


@dataclass(frozen=True)
class FlowsToEnd:
    backend_ids: frozenset[int]
    service_ids: frozenset[int]
    # Those of removed servers (retired ids) through these services: of
    # frontends whose pool went from "keep", which kept them, to "reset".
    retired: tuple[frozenset[int], frozenset[int]] = (frozenset(), frozenset())


def flows_to_end(old: Config, old_states: Mapping[BackendKey, str], current: DataplaneState,
                 new: Config, new_states: Mapping[BackendKey, str], target: DataplaneState,
                 renamed: Mapping[BackendKey, BackendKey]) -> FlowsToEnd:
    """Established flows that a change ends: those of a server put in maint
    (disabled), those of a server that went down or away from a pool whose
    policy is "reset", and those of a frontend that is gone. Drained servers,
    and gone or down servers under "keep", keep their flows, until their
    pool goes to "reset": then they end. A server given another address or
    port (a new id) is gone from its old one; one renamed at the same address
    and port (`renamed`, as `target` was made with) is not."""
    was = {p.name: p.on_server_down for p in old.pools}
    policies = {**was, **{p.name: p.on_server_down for p in new.pools}}
    ended = set()
    for key, b in current.backends.items():
        before = old_states.get(key, "up")
        now = renamed.get(key, key)
        kept = now in target.backends and target.backends[now].id == b.id
        after = new_states.get(now, "up") if kept else "gone"
        if after == before and not (after == "down" and was[key[0]] == "keep"):
            continue
        if after == "maint" or (after in ("down", "gone") and before != "maint"
                                and policies[now[0] if kept else key[0]] == "reset"):
            ended.add(b.id)
    services = {s.id for k, s in current.services.items() if k not in target.services}
    kept_by = {(f.vip, f.port, f.proto_number) for f in old.frontends
               if was[f.pool] == "keep"}
    switched = {target.services[k].id for f in new.frontends
                if (k := (f.vip, f.port, f.proto_number)) in kept_by
                and policies[f.pool] == "reset"}
    retired = frozenset(target.retired_backends) if switched else frozenset()
    return FlowsToEnd(frozenset(ended), frozenset(services), (retired, frozenset(switched)))


# An operation is a Datapath method name and its arguments.
Op = tuple


def plan(current: DataplaneState, target: DataplaneState) -> list[Op]:
    """Writes that take the maps from `current` to `target`. Removals come
    first: the hash maps hold one config's worth of keys, not two (replacing
    every VIP would not fit), and what goes serves no new flow either way.
    Then everything a service may point to is written before the service."""
    ops: list[Op] = []
    for key in current.services.keys() - target.services.keys():
        ops.append(("del_service", *key))
    for endpoint in sorted(current.owners.keys() - target.owners.keys()):
        ops.append(("del_owner", *endpoint))
    for ifindex, vip in current.arp.keys() - target.arp.keys():
        ops.append(("del_arp", ifindex, vip))
    for vip in sorted(current.vips - target.vips):
        ops.append(("del_vip", vip))
    current_backends = {b.id: b for b in current.backends.values()}
    target_ids = {b.id for b in target.backends.values()}
    for b in current_backends.values():
        if b.id not in target_ids and not b.closed:     # removed: closed to new flows
            ops.append(("set_backend", b.id, b.address, b.port, True))
    # An id that another server or frontend had (taken again once every id was
    # used, see _allocate) starts its counters at zero: its traffic so far was
    # the other's, and would show as the newcomer's. A server renamed at the
    # same address and port keeps its id (renames), and its counters; so, at
    # capacity, does a newcomer that takes the id of a server at its address
    # and port that this change removes (plan knows no names).
    held = {b.id: (b.address, b.port) for b in current.backends.values()}
    for b in target.backends.values():
        if (b.id in held or b.id in current.retired_backends) and \
                held.get(b.id) != (b.address, b.port):
            ops.append(("clear_backend_counters", b.id))
        if current_backends.get(b.id) != b:
            ops.append(("set_backend", b.id, b.address, b.port, b.closed))
    for key, svc in target.services.items():
        old = current.services.get(key)
        if old is not None and (old.maglev, old.ring, old.slots) == (svc.maglev, svc.ring,
                                                                       svc.slots):
            continue
        if not svc.maglev:
            ops.append(("write_ring", svc.ring, list(svc.slots)))
        elif svc.slots:                 # an empty table is never read: length 0 drops
            ops.append(("write_maglev", svc.ring, list(svc.slots)))
    for vip in sorted(target.vips - current.vips):
        ops.append(("set_vip", vip))
    for (ifindex, vip), mac in target.arp.items():
        if current.arp.get((ifindex, vip)) != mac:
            ops.append(("set_arp", ifindex, vip, mac))
    for endpoint, owned in target.owners.items():
        if current.owners.get(endpoint) != owned:
            ops.append(("set_owner", *endpoint, owned))
    held_services = {s.id: k for k, s in current.services.items()}
    for key, svc in target.services.items():
        old = current.services.get(key)
        if (svc.id in held_services or svc.id in current.retired_services) and \
                held_services.get(svc.id) != key:
            ops.append(("clear_service_counters", svc.id))
        if old is None or old.id != svc.id or old.timeouts != svc.timeouts:
            ops.append(("set_timeouts", svc.id, *svc.timeouts))
        if old is None or (old.id, old.ring, len(old.slots), old.flags) != (
                svc.id, svc.ring, len(svc.slots), svc.flags):
            ops.append(("set_service", *key, svc.id, svc.ring, len(svc.slots), svc.flags))
    return ops


# Ops of which plan lists many in a row (one a server), and the Datapath
# method that takes a run of them at once.
BATCHED = {"set_backend": "set_backends", "set_owner": "set_owners", "del_owner": "del_owners"}


def execute(datapath, ops: list[Op]) -> None:
    """Runs ops in order; each run of consecutive BATCHED ops in one call, which
    writes them in the same order (Datapath._write_batch, del_owners): a packet sees the
    maps as it could between two of the ops, never another state (but for
    the address filter's bits of a run of backends, set before their
    entries: a set bit may be another address's, the exact maps decide)."""
    for name, run in groupby(ops, key=itemgetter(0)):
        if name in BATCHED:
            getattr(datapath, BATCHED[name])([op[1:] for op in run])
        else:
            for _, *args in run:
                getattr(datapath, name)(*args)
