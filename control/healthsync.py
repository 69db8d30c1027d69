"""Takes the health checker's states to the data path (HealthSync)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from . import log
from .health import HealthChecker, Transition

if TYPE_CHECKING:       # annotations only: balancer imports bcc, through the data path
    from .balancer import Balancer


# A health change that could not be applied is tried again after 1 s, then
# after twice as long each time it fails, up to 60 s.
RETRY_SECONDS = (1.0, 60.0)


class HealthSync:
    """Takes the health checker's states to the data path. `lock` is the one
    every change of the balancer holds.

    Each change applies the checker's states as they are then, not the state
    its transition named: transitions that came while an apply held the lock
    are all taken in by the first to run (the rest find nothing to do), so that
    a thousand servers failing at once cost a few applies, not a thousand in a
    row; and a transition made stale meanwhile (its target restarted by an
    apply, or no longer checked) cannot put back a state the checker no
    longer holds, which its next checks might never correct."""

    def __init__(self, balancer: Balancer, lock: asyncio.Lock):
        self.balancer, self.lock = balancer, lock
        self.checker = balancer.checker = HealthChecker(
            self._on_change, lambda key, ok, seconds: balancer.observe_check(key, seconds))
        self._failed = False            # the last apply failed: the data path lags
        self._retry: asyncio.TimerHandle | None = None
        self._backoff = RETRY_SECONDS[0]

    def _on_change(self, tr: Transition) -> None:
        log.event("health", pool=tr.key[0], server=tr.key[1], old=tr.old, new=tr.new,
                  reason=tr.reason, check_duration=tr.duration)
        # Counted here, as logged: another change's apply may take it in first.
        self.balancer.count_health_change(tr.key)
        asyncio.get_running_loop().create_task(self._changed())

    async def _changed(self) -> None:
        async with self.lock:
            await self.follow()

    async def follow(self) -> str | None:
        """Takes the checker's states to the data path; a failure is logged,
        tried again (even if no check changes again: a dead server must not
        stay in the data path for want of a next change) and returned. Called
        with the lock held."""
        try:
            await self._follow()
        except Exception as e:
            loop = asyncio.get_running_loop()
            if self._retry is None:
                self._retry = loop.call_later(self._backoff, self._again)
                self._backoff = min(2 * self._backoff, RETRY_SECONDS[1])
            log.event("health", level="error", error=f"not applied: {e}",
                      retry_in=round(self._retry.when() - loop.time(), 1))
            return f"the health checks' states not in the data path: {e} (tried again)"
        return None

    def _again(self) -> None:
        self._retry = None
        asyncio.get_running_loop().create_task(self._changed())

    async def sync_targets(self) -> str | None:
        """Gives the checker the config's targets; new ones, and those moved to
        another address or port (None in the renames), start as up
        (provisionally, until their first check), as the checker sees them;
        renamed ones and those whose monitor changed go on as checked, under
        the new monitor. Then follow(): what it returns. Called with the lock
        held."""
        self.checker.set_targets(self.balancer.health_targets(), initial=self.balancer.health,
                                 renamed=self.balancer.checker_synced())
        return await self.follow()

    async def _follow(self) -> None:
        b, health = self.balancer, self.checker.states()
        if health != b.health or self._failed:
            b.health = health
            self._failed = True
            try:
                await asyncio.to_thread(b.apply, b.config, relink=False)
            except Exception as e:
                # Counted and shown (status, metrics): the log alone would leave a
                # server the checks call down taking new flows, unseen.
                was = b.health_applies
                b.health_applies = {"failed": was["failed"] + 1,
                                    "unapplied_since": was["unapplied_since"] or time.time(),
                                    "error": str(e)}
                raise
            self._failed, self._backoff = False, RETRY_SECONDS[0]
