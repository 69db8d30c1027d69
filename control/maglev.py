"""Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4), weighted.

`table` fills a lookup table of M slots (M prime) with backend ids; the data
plane picks the slot `flow_hash(...) % M` (`source_hash(client) % M` for a
pool of algorithm "source") for a flow it does not know, so a
node that never saw a flow (or lost it) sends it to the same backend as the
node that did. Two nodes with the same config build the same table: a
backend's permutation depends only on its address and port, never on xlb's
backend id (which is local to a node), and the turn order only on those too.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
from collections.abc import Iterator, Mapping, Sequence
from ipaddress import IPv4Address
from typing import NamedTuple

DEFAULT_SIZE = 65537                # prime; the paper's size for small pools

_MASK = 0xFFFFFFFF


class Backend(NamedTuple):
    id: int                         # what the table holds: xlb's (node-local) backend id
    address: IPv4Address            # address and port: the identity every node shares
    port: int
    weight: int = 1


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, int(n ** 0.5) + 1))


def _permutation(b: Backend, size: int) -> tuple[int, int]:
    """(offset, skip) of the backend's preference list offset + j*skip mod size,
    from a hash of its address and port that is the same on every node and
    every Python (not `hash()`, which is salted per process)."""
    digest = hashlib.blake2b(f"{b.address}:{b.port}".encode(), digest_size=16).digest()
    offset = int.from_bytes(digest[:8], "little") % size
    skip = int.from_bytes(digest[8:], "little") % (size - 1) + 1
    return offset, skip


def _turns(weights: list[int]) -> Iterator[int]:
    """Indexes of `weights` in turn order, without end: the k-th turn of weight w
    falls in round ceil(k * W / w), W the largest weight, so the heaviest takes a
    turn every round and each takes turns in proportion to its weight; within a
    round, by index."""
    top = max(weights)
    if all(w == top for w in weights):
        yield from itertools.cycle(range(len(weights)))     # the heap's order, faster

    def round_of(k: int, w: int) -> int:
        return (k * top + w - 1) // w

    heap = [(round_of(1, w), i, 1) for i, w in enumerate(weights)]
    while True:
        _, i, k = heap[0]
        yield i
        heapq.heapreplace(heap, (round_of(k + 1, weights[i]), i, k + 1))


def table(backends: list[Backend], size: int = DEFAULT_SIZE) -> list[int]:
    """The Maglev table: `size` backend ids; empty when there is no backend.

    Backends take turns (`_turns`, by weight); at each turn a backend claims the
    next slot of its permutation that is still free, so its slots are in
    proportion to its weight. Within a round, turns go in order of (address,
    port), which makes the table independent of the config's order. With equal
    weights this is the paper's algorithm exactly."""
    if not is_prime(size):
        raise ValueError(f"Maglev table size {size} is not prime")
    if not backends:
        return []
    backends = sorted(backends, key=lambda b: (int(b.address), b.port, b.id))
    position, skip = map(list, zip(*(_permutation(b, size) for b in backends)))
    slots = [-1] * size                             # index in `backends`, -1 while free
    for i, _ in zip(_turns([b.weight for b in backends]), range(size)):
        c, step = position[i], skip[i]
        while slots[c] >= 0:
            c += step
            if c >= size:
                c -= size
        slots[c] = i
        c += step
        position[i] = c - size if c >= size else c
    ids = [b.id for b in backends]
    return [ids[i] for i in slots]


def digest(slots: Sequence[int], endpoints: Mapping[int, tuple[IPv4Address, int]],
           source: bool = False) -> str:
    """A short digest of a table as nodes can compare it: the address and port
    of each slot's backend (`endpoints` by id), in slot order, never the ids
    (which are each node's own), and whether flows pick a slot by source_hash.
    Two tables of one digest send every flow to the same server."""
    packed = {i: a.packed + p.to_bytes(2, "big") for i, (a, p) in endpoints.items()}
    return hashlib.blake2b(b"".join(map(packed.__getitem__, slots)), digest_size=8,
                           person=b"source" if source else b"").hexdigest()


def _mix(h: int) -> int:
    """murmur3's 32-bit finalizer."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK
    h ^= h >> 16
    return h


def flow_hash(saddr: IPv4Address, daddr: IPv4Address, sport: int, dport: int,
              proto: int) -> int:
    """The data plane's hash of a flow's 5-tuple (bpf/ computes the same, bit for
    bit): each field read as a little-endian integer of its bytes as they lie in
    the packet, as the C reads them on a little-endian machine."""
    src = int.from_bytes(saddr.packed, "little")
    dst = int.from_bytes(daddr.packed, "little")
    ports = (int.from_bytes(sport.to_bytes(2, "big"), "little")
             | int.from_bytes(dport.to_bytes(2, "big"), "little") << 16)
    return _mix(src ^ _mix(dst ^ _mix(ports ^ _mix(proto ^ 0x9E3779B9))))


def source_hash(saddr: IPv4Address) -> int:
    """The data plane's hash of a client's address alone (algorithm "source"), as
    flow_hash reads it."""
    return _mix(int.from_bytes(saddr.packed, "little") ^ 0x9E3779B9)
