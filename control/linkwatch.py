"""Takes checked servers down when the link that routes them is lost, and
checks them at once when they are routed again; attaches the links that come
up (made again under their names, or any where none is named) and follows
their addresses and MACs (LinkWatch)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from ipaddress import IPv4Address
from typing import TYPE_CHECKING

from . import log, netif
from .health import HealthChecker, Target
from .healthsync import RETRY_SECONDS

if TYPE_CHECKING:       # annotations only: balancer imports bcc, through the data path
    from .balancer import Balancer, Key


# Route lookups under churn take a fifth of a core at most.
LOOKUP_SECONDS, LOOKUP_SPACING = 1.0, 4.0


class LinkWatch:
    """Marks a checked server down the moment the link the kernel routes it
    through (`ip route get`: a gateway's link for a server behind one, the
    one picked for a server reached through several) loses its carrier, is
    set down or deleted: its health checks would take `fall` intervals to
    fail, all the while its VIPs announced (BGP) or held (VRRP on another
    link) by a node that can only drop their flows. Its checks bring it back
    (`rise`), the first at once when they are routed again through a link
    with carrier: theirs back (the kernel tells its carrier before it puts
    back the routes it flushed when the link was set down, and a gateway's
    route may come back later, from a routing daemon or an ifup script),
    another (the route moved), or theirs deleted and made again under
    another index. Servers no monitor checks are left as they are: nothing
    would bring them back. The routes are looked up again after
    changes of routes or links and applies, and used as they were before a
    loss. A node whose routing daemon imports its router's routes sees
    changes every second: the changes coalesce, and a round starts
    LOOKUP_SECONDS after the last ended at the soonest, or LOOKUP_SPACING
    times its length if longer (a round of 10,000 servers is some 20 ms)."""

    def __init__(self, balancer: Balancer, checker: HealthChecker, lock: asyncio.Lock):
        self.balancer, self.checker, self.lock = balancer, checker, lock
        self.events = netif.LinkEvents()
        self.routes: dict[IPv4Address, int] = {}    # server address: link index
        # Each server at its address that the last round routed (through
        # routes[address]): one new there (another pool's, another port's) is
        # new behind its link.
        self._placed: set[tuple[Key, IPv4Address]] = set()
        # The addresses of the servers a link's loss took down (a server renamed
        # keeps its own), until they are routed through it again with its
        # carrier: the link, and when (the loop's time).
        self._downed: dict[IPv4Address, tuple[int, float]] = {}
        self._recarrier: asyncio.Task | None = None
        # The servers of links regained, to be looked up before the next round.
        self._regained: set[IPv4Address] = set()
        self._rerouting: asyncio.Task | None = None
        self._lookup: asyncio.Task | None = None
        self._again = False
        self._attaching: asyncio.Task | None = None
        self._reapply = False    # a link made again, or readdressed: to apply
        # The attached links whose carrier came back, to announce again (index: name).
        self._carriers_back: dict[int, str] = {}
        self._announcing: asyncio.Task | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.events.fileno(), self._read)
        self.stale()
        if not self.balancer.config.attach_names():
            self._attaching = loop.create_task(self._attach_meanwhile())

    async def _attach_meanwhile(self) -> None:
        """Where no link is named, attaches those that came up while xlb up
        started: after its first apply chose its links, before these events
        were heard (the start's first health sync comes between), none is
        told. Once the carriers are known, for one that comes up after to be
        told; and only if the links read then differ from those the start
        applied: another apply changes nothing otherwise, and costs as much
        as the start's (0.4 s of CPU at 10,000 servers)."""
        try:
            await asyncio.to_thread(self.events.carrier)
            now = await asyncio.to_thread(netif.links)    # after these events are heard
        except Exception as e:      # a task's own: nobody else would hear of it
            log.event("link", level="error", error=f"links not read: {e}")
            now = None
        self._read()
        if now is None or self._unapplied(now):
            self._reapply = True
        await self._attach_again()

    def _unapplied(self, now: list[netif.Link]) -> bool:
        """Whether the links as read (`now`) hold what an apply that reads
        them would take, where no link is named: an attached one gone (made
        again, maybe), renamed, given another address or MAC, or an up
        Ethernet link not attached (to attach, or to warn of)."""
        by_index = {link.index: link for link in now}
        attached = {link.index: link for link in self.balancer.links.values()}
        return any((same := by_index.get(index)) is None or old.reread(same) != old
                   for index, old in attached.items()) or \
            any(link.ethernet and link.up and link.index not in attached for link in now)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.events.fileno())
        self.events.close()
        for task in (self._lookup, self._recarrier, self._rerouting, self._attaching,
                     self._announcing):
            if task is not None:
                task.cancel()

    def stale(self) -> None:
        """Routes may have changed: looks them up again."""
        if self._lookup is None or self._lookup.done():
            self._lookup = asyncio.get_running_loop().create_task(self._look_up())
        else:
            self._again = True

    async def _look_up(self) -> None:
        loop = asyncio.get_running_loop()
        self._again = True
        while self._again:
            self._again = False
            started = loop.time()
            try:
                found = await asyncio.to_thread(
                    self._routes, {t.address for t in self.balancer.health_targets()})
            except Exception as e:      # a task's own: nobody else would hear of it
                log.event("link", level="error", error=f"routes to the servers not read: {e}",
                          retry_in=RETRY_SECONDS[0])
                await asyncio.sleep(RETRY_SECONDS[0])
                self._again = True
                continue
            self._read()    # a loss told meanwhile goes by the routes before it
            if self.events.overrun:     # events lost: the carriers read again before they judge
                await self._carrier_again()
            # Servers newly routed through a link without carrier (an apply
            # while it is down): down now, not at their first failed check;
            # those a loss took down, newly routed through another with:
            # checked now, and again when theirs is back.
            targets = self.balancer.health_targets()
            dead: dict[int, list[Target]] = {}
            moved: list[Key] = []
            for t in targets:
                index = found.get(t.address)
                if index is None or (t.key, t.address) in self._placed \
                        and index == self.routes.get(t.address):
                    continue
                if self.events.lacks_carrier(index):
                    dead.setdefault(index, []).append(t)
                elif t.address in self._downed and self._downed[t.address][0] != index:
                    moved.append(t.key)
            self.routes = found
            self._placed = {(t.key, t.address) for t in targets if t.address in found}
            checked = {t.address for t in targets}
            self._downed = {a: d for a, d in self._downed.items() if a in checked}
            for index, behind in dead.items():
                with contextlib.suppress(OSError):      # gone since: its loss is told
                    self._take_down(index, socket.if_indextoname(index), "has no carrier", behind)
            self.checker.check_now(moved)
            self._routed_again(found, started)
            await asyncio.sleep(max(LOOKUP_SECONDS, LOOKUP_SPACING * (loop.time() - started)))

    def _routes(self, addresses: set[IPv4Address]) -> dict[IPv4Address, int]:
        self.events.carrier()
        return netif.route_links(addresses)

    def _routed_again(self, found: dict[IPv4Address, int], since: float) -> None:
        """Checks now the servers a loss before `since` took down that `found`
        (looked up since: one from before may hold a route the loss removed)
        routes through their link again, with carrier."""
        back = {a for a, (index, when) in self._downed.items()
                if when < since and found.get(a) == index and not self.events.lacks_carrier(index)}
        for address in back:
            del self._downed[address]
        self.checker.check_now([t.key for t in self.balancer.health_targets()
                                if t.address in back])

    async def _reroute(self) -> None:
        # Only the servers of links regained, sooner than the next round; as
        # a round, at most 1/LOOKUP_SPACING of a CPU while links flap.
        loop = asyncio.get_running_loop()
        while self._regained:
            addresses = {a for a in self._regained if a in self._downed}
            self._regained = set()
            started = loop.time()
            try:
                found = await asyncio.to_thread(netif.route_links, addresses)
            except Exception as e:      # the next round looks them up
                log.event("link", level="error", error=f"routes to the servers not read: {e}")
                return
            self._routed_again(found, started)
            await asyncio.sleep(LOOKUP_SPACING * (loop.time() - started))

    def _take_down(self, index: int, name: str, how: str, targets: list[Target]) -> None:
        log.event("link", level="warning", link=name, reason=how,
                  servers_down=log.some("/".join(t.key) for t in targets))
        self.checker.mark_down([t.key for t in targets], f"link {name} {how}")
        now = asyncio.get_running_loop().time()
        self._downed.update((t.address, (index, now)) for t in targets)

    def _read(self) -> None:
        announcer = self.balancer.announcer
        attached = {link.index: link for link in self.balancer.links.values()}
        lost, regained, changed, readdressed = self.events.read(
            announcer and announcer.table, attached)
        for loss in lost:
            if behind := [t for t in self.balancer.health_targets()
                          if self.routes.get(t.address) == loss.index]:
                self._take_down(loss.index, loss.name, loss.how, behind)
        for index in regained:
            if index in attached:
                with contextlib.suppress(OSError):      # gone again: nothing to announce
                    self._carriers_back[index] = socket.if_indextoname(index)
            # Back an interval sooner: rise - 1 intervals after they are routed.
            if back := {a for a, (i, _) in self._downed.items() if i == index}:
                self._regained |= back
                if self._rerouting is None or self._rerouting.done():
                    self._rerouting = asyncio.get_running_loop().create_task(self._reroute())
        if self._carriers_back and (self._announcing is None or self._announcing.done()):
            self._announcing = asyncio.get_running_loop().create_task(self._announce_again())
        # The ARP answers go by the attached links' addresses and MACs (and
        # names, which frontends name): those of one made again (attached or
        # not yet) too. Where no link is named,
        # xlb runs on every up Ethernet link: one that came up since too.
        joined = not self.balancer.config.attach_names()
        if any(self._made_again(index) or joined and index not in attached
               for index in regained) or \
                any(index in attached or self._made_again(index) for index in readdressed):
            self._reapply = True
            if self._attaching is None or self._attaching.done():
                self._attaching = asyncio.get_running_loop().create_task(self._attach_again())
        if self.events.overrun and (self._recarrier is None or self._recarrier.done()):
            # Its losses told now, not with the next round, which may be seconds away.
            self._recarrier = asyncio.get_running_loop().create_task(self._carrier_again())
        if lost or changed:
            self.stale()

    def _made_again(self, index: int) -> bool:
        """Whether link index has the name of one the data path was attached to
        under another index (deleted since, or renamed: Balancer.apply tells)."""
        try:
            name = socket.if_indextoname(index)
        except OSError:     # gone again
            return False
        old = self.balancer.links.get(name)
        return old is not None and old.index != index

    async def _attach_again(self) -> None:
        """Attaches the links made again under their names, as a change of state
        does (Balancer.apply), now rather than at the next one, those that
        came up where no link is named, and has the ARP answers take the
        attached links' addresses and MACs as they are now (reread): until
        one is told by an apply that began after it. One that fails is tried
        again as HealthSync's are: a link left without the program, or a VIP
        unanswered, would stay so until the next event."""
        backoff = RETRY_SECONDS[0]
        while self._reapply:
            self._reapply = False
            async with self.lock:
                try:
                    result = await asyncio.to_thread(self.balancer.apply, self.balancer.config,
                                                     relink=False, reread=True)
                    links = self.balancer.links     # as this apply read them
                except Exception as e:      # a task's own: nobody else would hear of it
                    result = None
                    log.event("link", level="error", error=f"links not applied: {e}",
                              retry_in=backoff)
            if result is None:
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, RETRY_SECONDS[1])
                self._reapply = True
                continue
            backoff = RETRY_SECONDS[0]
            for name in result["attached"]:
                # Attached as it is: one without carrier (its cable out, its veth's
                # peer down) receives nothing until it has one.
                log.event("link", link=name,
                          reason="came up: attached" if links[name].carrier else
                          "attached without carrier: serves once it has carrier")

    async def _announce_again(self) -> None:
        """Has the VIPs of the links whose carrier came back announced again
        (Balancer.carrier_back), a link at a time, in a worker thread: up to
        256 frames a link, sent from the loop's thread, held up the health
        checks and the control socket. Under the lock, as an apply, which
        announces too: an apply that takes another MAC of a link (told
        meanwhile) announces it after these frames or before they read the
        state, never amid them, which could leave the clients at the MAC
        before; a backup's apply (set_role) waits for them. A link whose
        carrier comes back again while it is announced is announced once
        more, after; one whose carrier comes back many times while it waits
        its turn, once."""
        while self._carriers_back:
            async with self.lock:
                index = next(iter(self._carriers_back))
                name = self._carriers_back.pop(index)
                await asyncio.to_thread(self.balancer.carrier_back, index, name)

    async def _carrier_again(self) -> None:
        # Until no overrun is left: one found meanwhile (by the reads here, or
        # the reader's) starts no other task while the reader's runs.
        while self.events.overrun:
            try:
                await asyncio.to_thread(self.events.carrier)
            except Exception as e:      # the next round reads them again
                log.event("link", level="error", error=f"links not read: {e}")
                return
            self._read()
