"""Backend selection tables: pure functions from a pool's servers to the ring of
backend ids that the data plane walks, one slot per new flow."""

from __future__ import annotations

from functools import reduce
from math import gcd


def round_robin(ids: list[int]) -> list[int]:
    return list(ids)


def slots(weighted: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """(backend id, slots in the ring) of the backends of weight > 0: their
    weights divided by their gcd; if the sum still exceeds `size`, scaled down
    (each backend keeps one slot at least, so the shares stray from the
    weights)."""
    weighted = [(i, w) for i, w in weighted if w > 0]
    if not weighted:
        return []
    if len(weighted) > size:
        raise ValueError(f"{len(weighted)} backends do not fit a ring of {size}")
    g = reduce(gcd, (w for _, w in weighted))
    weighted = [(i, w // g) for i, w in weighted]
    total = sum(w for _, w in weighted)
    if total > size:
        weighted = [(i, max(1, w * size // total)) for i, w in weighted]
        while sum(w for _, w in weighted) > size:  # max(1, ..) may overshoot
            j = max(range(len(weighted)), key=lambda k: weighted[k][1])
            weighted[j] = (weighted[j][0], weighted[j][1] - 1)
    return weighted


def smooth_weighted(weighted: list[tuple[int, int]], size: int) -> list[int]:
    """nginx's smooth weighted round-robin as a ring: each backend appears in
    proportion to its slots (slots()), spread out rather than in runs."""
    weighted = slots(weighted, size)
    if all(w == 1 for _, w in weighted):
        return [i for i, _ in weighted]     # what the loop below gives, without its n² steps
    total = sum(w for _, w in weighted)
    current = [0] * len(weighted)
    ring = []
    for _ in range(total):
        for k, (_, w) in enumerate(weighted):
            current[k] += w
        best = max(range(len(weighted)), key=lambda k: current[k])
        current[best] -= total
        ring.append(weighted[best][0])
    return ring


def ring(algorithm: str, weighted: list[tuple[int, int]], size: int) -> list[int]:
    """The ring for a pool: `weighted` is (backend id, weight) in pool order."""
    if algorithm == "roundrobin":
        if len(weighted) > size:
            raise ValueError(f"{len(weighted)} backends do not fit a ring of {size}")
        return round_robin([i for i, _ in weighted])
    if algorithm == "weighted":
        return smooth_weighted(weighted, size)
    raise ValueError(f"unknown algorithm {algorithm!r}")
