"""The flow tables read in bulk: which connections are open, half-open or
closing, which are dead (idle past their state's timeout) and go, and which
lost their reply entry and get it back.

Pure: it works on the raw bytes that `Datapath._dump` reads and a clock
reading (the program's clock, `Datapath.now`), so it is tested without a
kernel.
"""

from __future__ import annotations

import operator
import struct
from dataclasses import dataclass, field
from itertools import compress
from typing import NamedTuple

from . import layout

NSEC_PER_SEC = 1_000_000_000
TABLES = ("flows", "flows_new")          # established, half-open (bpf/xlb_shared.h)

_KEY = struct.Struct(layout.struct_format(layout.FlowKey))
_VALUE = struct.Struct(layout.struct_format(layout.Flow))
assert _KEY.size == layout.ct.sizeof(layout.FlowKey)
assert _VALUE.size == layout.ct.sizeof(layout.Flow)

_VALUE_FIELDS = [name for name, _ in layout.Flow._fields_ if name != "pad"]
_KEY_FIELDS = [name for name, _ in layout.FlowKey._fields_ if name != "pad"]


class Row(NamedTuple):
    """One entry: its key's fields, then its value's (as the maps hold them)."""
    saddr: int
    daddr: int
    sport: int
    dport: int
    proto: int
    addr: int
    port: int
    dir: int
    state: int
    service_id: int
    backend_id: int
    timeout: int
    seen: int

    def key(self) -> bytes:
        return _KEY.pack(self.saddr, self.daddr, self.sport, self.dport, self.proto)

    def partner(self) -> bytes:
        """The key of the other entry of its connection (bpf/xlb.c partner_key)."""
        if self.dir == layout.FLOW_FORWARD:
            return _KEY.pack(self.addr, self.saddr, self.port, self.sport, self.proto)
        return _KEY.pack(self.daddr, self.addr, self.dport, self.port, self.proto)

    def reply(self) -> tuple[bytes, bytes]:
        """A forward entry's reply entry, key and value, as the program writes
        it (bpf/xlb.c flow_open)."""
        return self.partner(), _VALUE.pack(self.daddr, self.dport, layout.FLOW_REPLY,
                                           self.state, self.service_id, self.backend_id,
                                           self.timeout, self.seen)

    def as_now(self, value: bytes) -> Row:
        """This entry with the value its map holds now."""
        return Row(*self[:5], *_VALUE.unpack(value))


def _idle(timeout: int, seen: int, now: int) -> bool:
    """Whether an entry last seen at `seen` is idle past its timeout (0: never)."""
    return seen < _idle_before(timeout, now)


def _idle_before(timeout: int, now: int) -> int:
    """When an entry of this timeout must have been seen last to be idle past
    it: more than the timeout before now (a `seen` a moment ahead of now, of
    another CPU, is not idle); -1 for none (0: never)."""
    return now - timeout * NSEC_PER_SEC if timeout else -1


assert list(Row._fields) == _KEY_FIELDS + _VALUE_FIELDS


def decode(keys: bytes, values: bytes) -> list[Row]:
    return [Row(*k, *v) for k, v in zip(_KEY.iter_unpack(keys), _VALUE.iter_unpack(values))]


class Sweep(NamedTuple):
    dead: list[tuple[int, ...]]             # each dead connection's entries (those read):
                                            # their places in the dump, its forward entry first
    orphans: list[Row]                      # forward entries whose reply entry to put back


def sweep(keys: bytes, values: bytes, now: int, half_open: set[bytes] | None = None) -> Sweep:
    """A dump's dead connections: dead when both entries have been idle past
    the connection's timeout (one-way traffic keeps it alive); an entry whose
    partner is gone is judged alone, and is a connection only if it is the
    forward entry (a lone reply entry's connection was counted when its
    forward entry went).

    With half_open, the half-open table's keys, the dump is the established
    table's, and the LRU's evictions (of entries, not connections) are mended:
    a live forward entry whose reply entry went gets it back (its server's
    packets would leave un-NATed), unless that key is in the half-open table
    (another connection's: the same client port to two VIPs of one server); a
    lone reply entry whose connection opened again in the half-open table (its
    forward entry went) goes, as it would keep the new one from being answered.

    Read as columns, and only the entries idle past their timeout and (with
    half_open) those without their partner are looked at: every other entry
    is live with its partner. A Row for each entry of a million expired
    connections cost 18 s of CPU; only the orphans are decoded. (A key's
    hash is computed once and kept: the dict below costs one pass.)"""
    ks = key_list(keys)
    forward = bytes(_column(values, "dir")).translate(_IS_FORWARD)
    by_dir = [_partner_keys(keys, values, d) for d in (layout.FLOW_REPLY, layout.FLOW_FORWARD)]
    partners = [by_dir[f][at:at + _KEY.size] for f, at in zip(forward, range(0, len(keys), _KEY.size))]
    timeout, seen = _column(values, "timeout"), _column(values, "seen")
    # Each entry's _idle, by C-level iterators: a few timeouts, one bound each.
    before = {t: _idle_before(t, now) for t in set(timeout)}
    judged = set(compress(range(len(ks)), map(operator.lt, seen, map(before.__getitem__, timeout))))
    if half_open is not None:
        missing = set(partners).difference(ks)
        lone = {i for i, p in enumerate(partners) if p in missing} if missing else set()
        # A reply entry with its partner is judged with it, unlooked-up: a
        # random lookup in a dict of millions costs most of a mass expiry.
        judged = {i for i in judged if forward[i]} | lone
    index = dict(zip(ks, range(len(ks)))) if judged else {}    # a key read twice: as read last
    read_twice = len(index) < len(ks)
    dead, orphans = [], []
    order = sorted(judged)
    for i, j in zip(order, map(index.get, map(partners.__getitem__, order))):
        if j is not None and not forward[i] or read_twice and index[ks[i]] != i:
            continue                                    # judged with its forward entry
        last = seen[i] if j is None or seen[i] > seen[j] else seen[j]
        if last < before[timeout[i]]:
            dead.append((i,) if j is None else (i, j))
        elif j is None and half_open is not None:
            if not forward[i]:
                if partners[i] in half_open:
                    dead.append((i,))
            elif partners[i] not in half_open:
                orphans.append(i)
    return Sweep(dead, _rows(keys, values, orphans))


@dataclass
class Census:
    """Connections (forward entries) by what they are now."""
    open: dict[int, int] = field(default_factory=dict)    # backend id -> established, live
    established: int = 0
    closing: int = 0
    half_open: int = 0
    entries: dict[str, int] = field(default_factory=dict)  # entries per table
    forward: dict[str, int] = field(default_factory=dict)  # forward entries per table, any age


def open_count(forward: list[Row], read: list[Row], now: int) -> int:
    """How many connections of these forward entries are open: not closing,
    not idle past their timeout both ways (census), their reply entries
    among the entries `read` with them."""
    seen = {r.key(): r.seen for r in read if r.dir != layout.FLOW_FORWARD}
    closing = layout.FLOW_STATES["closing"]
    return sum(r.state != closing and not _idle(r.timeout, max(r.seen, seen.get(r.partner(), 0)),
                                                now) for r in forward)


_IS_FORWARD = bytes(int(d == layout.FLOW_FORWARD) for d in range(256))


def _column(values: bytes, name: str, ctype=layout.Flow):
    """One field of every value (layout.Flow), or key (layout.FlowKey), as a
    strided view: read in bulk without decoding the rest, as a million
    connections' rows take gigabytes and seconds to build."""
    f = getattr(ctype, name)
    column = memoryview(values).cast(layout.UNSIGNED_FORMATS[f.size])
    return column[f.offset // f.size::layout.ct.sizeof(ctype) // f.size]


def servers(keys: bytes, values: bytes) -> set[tuple[int, int]]:
    """The server ends of a dump's connections, each the source address and
    port of a reply entry's key, as the key holds them."""
    replies = [d == layout.FLOW_REPLY for d in _column(values, "dir")]
    return set(compress(zip(_column(keys, "saddr", layout.FlowKey),
                            _column(keys, "sport", layout.FlowKey)), replies))


def backends(keys: bytes, values: bytes) -> dict[int, tuple[int, int]]:
    """The backend of each connection of a dump, by id: its forward entry's
    address and port, as the value holds them."""
    forward = [d == layout.FLOW_FORWARD for d in _column(values, "dir")]
    return dict(compress(zip(_column(values, "backend_id"),
                             zip(_column(values, "addr"), _column(values, "port"))), forward))


def census(tables: dict[str, tuple[bytes, bytes]], now: int) -> Census:
    """tables: each flow table's keys and values, as Datapath.flow_dumps reads
    them. A connection is live while either of its entries was seen within
    its timeout, as the data path and the sweep judge it: a server that
    pushes to a silent client keeps it open."""
    c = Census()
    closing = layout.FLOW_STATES["closing"]
    for name, (keys, values) in tables.items():
        forward = bytes(_column(values, "dir")).translate(_IS_FORWARD)
        c.entries[name], c.forward[name] = len(forward), forward.count(1)
        state, backend_id = _column(values, "state"), _column(values, "backend_id")
        timeout, seen = _column(values, "timeout"), _column(values, "seen")
        before = {t: _idle_before(t, now) for t in set(timeout)}
        idle = {i for i in compress(range(len(forward)), forward)
                if seen[i] < before[timeout[i]]}
        if idle:        # few, but for one-way traffic: their reply entries are looked for
            partners = _partner_keys(keys, values, layout.FLOW_FORWARD)
            wanted = {partners[i * _KEY.size:(i + 1) * _KEY.size]: i for i in idle}
            for j, key in enumerate(key_list(keys)):
                if (i := wanted.get(key)) is not None and not forward[j] \
                        and seen[j] >= before[timeout[i]]:
                    idle.discard(i)
        for i in compress(range(len(forward)), forward):
            if i in idle:
                continue
            if state[i] == closing:
                c.closing += 1
            elif name == "flows_new":
                c.half_open += 1
            else:
                c.established += 1
                c.open[backend_id[i]] = c.open.get(backend_id[i], 0) + 1
    return c


def _split(data: bytes, size: int) -> list[bytes]:
    return [data[at:at + size] for at in range(0, len(data), size)]


def newer(old: tuple[bytes, bytes], new: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    """The entries (key, value) of dump `old` that dump `new` lacks, or holds
    as seen earlier. Only `seen` is read: a catch-up reads two whole tables,
    and the connections it brings over are balanced anew until it is done."""
    seen = dict(zip(_split(new[0], _KEY.size), _column(new[1], "seen")))
    return [(key, value) for key, value, s in zip(_split(old[0], _KEY.size),
                                                  _split(old[1], _VALUE.size),
                                                  _column(old[1], "seen"))
            if seen.get(key, -1) < s]


def fitting(keys: bytes, values: bytes, room: int) -> tuple[list[int], int]:
    """The entries of a dump (their places) to copy into a flow table of
    `room` entries, and how many connections do not fit. Whole connections
    (a forward entry with its reply entry): open ones before closing ones,
    each the most recently seen first; a reply entry without its forward
    entry last. Copied in hash order, a smaller table took closing
    connections and halves of open ones, and reset open connections that
    would have fitted. The places come least wanted first: should the LRU
    evict while they are written, it takes those written first."""
    ks = key_list(keys)
    forward = bytes(_column(values, "dir")).translate(_IS_FORWARD)
    partners = _partner_keys(keys, values, layout.FLOW_FORWARD)
    index = dict(zip(ks, range(len(ks))))
    state, seen = _column(values, "state"), _column(values, "seen")
    closing = layout.FLOW_STATES["closing"]
    ranked, paired = [], set()
    for i in compress(range(len(ks)), forward):
        j = index.get(partners[i * _KEY.size:(i + 1) * _KEY.size])
        members = (i,) if j is None or forward[j] else (i, j)
        paired.update(members)
        ranked.append((state[i] == closing, -max(seen[m] for m in members), members))
    ranked.sort()
    ranked += [(2, 0, (i,)) for i in range(len(ks)) if i not in paired]
    chosen, left = [], 0
    for _, _, members in ranked:
        if len(members) <= room:
            chosen.append(members)
            room -= len(members)
        elif forward[members[0]]:
            left += 1
    return [i for members in reversed(chosen) for i in members], left


def key_list(keys: bytes) -> list[bytes]:
    """The keys of a dump (Datapath.flow_dumps), one by one, as Row.key packs
    them (padding zeroed)."""
    out, pad = bytearray(keys), layout.FlowKey.pad
    for b in range(pad.size):
        out[pad.offset + b::_KEY.size] = bytes(len(keys) // _KEY.size)
    return _split(bytes(out), _KEY.size)


# Row.partner's fields, of an entry of each direction: (partner key's field,
# from the entry's key or value, its field).
_PARTNER = {
    layout.FLOW_FORWARD: (("saddr", "value", "addr"), ("daddr", "key", "saddr"),
                          ("sport", "value", "port"), ("dport", "key", "sport"),
                          ("proto", "key", "proto")),
    layout.FLOW_REPLY: (("saddr", "key", "daddr"), ("daddr", "value", "addr"),
                        ("sport", "key", "dport"), ("dport", "value", "port"),
                        ("proto", "key", "proto")),
}


def _partner_keys(keys: bytes, values: bytes, direction: int) -> bytes:
    """Row.partner of every entry as if it went that direction, built a byte
    column at a time."""
    out = bytearray(len(keys))
    source = {"key": (keys, layout.FlowKey), "value": (values, layout.Flow)}
    for to, side, name in _PARTNER[direction]:
        data, ctype = source[side]
        src, dst = getattr(ctype, name), getattr(layout.FlowKey, to)
        for b in range(dst.size):
            out[dst.offset + b::_KEY.size] = data[src.offset + b::layout.ct.sizeof(ctype)]
    return bytes(out)


def ending(keys: bytes, values: bytes, backend_ids: set[int], service_ids: set[int],
           crossed: tuple[set[int], set[int]] = (set(), set())) -> list[Row]:
    """The entries of a dump of these backends or services, or of crossed's
    backends through crossed's services (those that Datapath.delete_flows
    ends), decoded. Their ids are read as columns: decoding every entry to
    end one server's took seconds a change."""
    backends, services = _column(values, "backend_id"), _column(values, "service_id")
    ends = map(operator.or_, map(backend_ids.__contains__, backends),
               map(service_ids.__contains__, services))
    if all(crossed):
        ends = map(operator.or_, ends, map(operator.and_, map(crossed[0].__contains__, backends),
                                           map(crossed[1].__contains__, services)))
    return _rows(keys, values, compress(range(len(keys) // _KEY.size), ends))


def _rows(keys: bytes, values: bytes, indices) -> list[Row]:
    """The entries of a dump at these indices, decoded."""
    return [Row(*_KEY.unpack_from(keys, i * _KEY.size), *_VALUE.unpack_from(values, i * _VALUE.size))
            for i in indices]
