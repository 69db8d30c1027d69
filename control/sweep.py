"""The sweep of the flow tables, at intervals that keep its cost to a
hundredth of a CPU."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from . import log
from .datapath import Datapath

if TYPE_CHECKING:       # annotations only
    from .balancer import Balancer


SWEEP_COST = 100        # the sweep may take at most 1/SWEEP_COST of a CPU,
SWEEP_MIN_INTERVAL = 1.0  # at intervals of a second or more


def _sweep(datapath: Datapath) -> tuple[dict[str, int], int, float]:
    """Datapath.sweep_flows, and the CPU time it took in this thread (waiting
    for the GIL or a CPU is no cost of the sweep)."""
    t0 = time.thread_time()
    expired, restored = datapath.sweep_flows()
    return expired, restored, time.thread_time() - t0


async def sweep_forever(balancer: Balancer) -> None:
    """Removes idle flows, and puts back evicted reply entries. The program
    already treats an idle flow as dead when its next packet comes; this gives
    the memory back and counts them. A large table takes longer to read, so
    the interval grows with the sweep's cost, without bound: a million
    connections cost seconds a sweep, and a cap of 30 s let it take a fifth
    of a CPU."""
    while True:
        cost = 0.0
        try:
            expired, restored, cost = await asyncio.to_thread(_sweep, balancer.datapath)
            if any(expired.values()) or restored:
                log.event("sweep", level="debug", restored_replies=restored,
                          **{f"expired_{t}": n for t, n in expired.items()})
        except Exception as e:
            # Any failure (the kernel refusing a test-run or a map write) is
            # one sweep's: ending the task would end the sweeps, unsaid.
            log.event("sweep", level="warning", error=str(e) or type(e).__name__)
        await asyncio.sleep(max(cost * SWEEP_COST, SWEEP_MIN_INTERVAL))
