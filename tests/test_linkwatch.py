"""What xlb's watch of its links (linkwatch.LinkWatch) reads from the kernel, in
a network namespace of the test's own: the link each server is routed
through, and the links that lose their carrier, are set down or deleted."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from ipaddress import IPv4Address

import pytest
from fibnet import FibNet
from pyroute2 import IPRoute

from waiting import until
from xlb import linkwatch, netif
from xlb.health import HealthChecker, Target
from xlb.linkwatch import LOOKUP_SECONDS, LinkWatch
from xlb.model import Monitor, from_flags
from xlb.netif import LinkEvents, route_links

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="a network namespace: needs root")]


def told(events: LinkEvents, ignore_table: int | None = None) -> tuple[list[tuple], bool]:
    lost, _, changed, _ = events.read(ignore_table)
    return [(loss.name, loss.how) for loss in lost], changed


def read_links(*indexes: int) -> dict[int, netif.Link]:
    """The links at these indexes as read now: those LinkEvents.read is asked about."""
    return {link.index: link for link in netif.links() if link.index in indexes}


def test_servers_are_routed_as_the_kernel_routes_them():
    """A server on a link's subnet by that link, one behind a gateway by the
    gateway's link, one with no route left out."""
    on_int, behind, client_side, nowhere = map(
        IPv4Address, ("10.1.11.101", "10.1.20.5", "10.1.1.50", "192.0.2.1"))
    with FibNet("xlbt-links").entered({}) as net:
        net.sh("ip", "route", "add", "10.1.20.0/24", "via", "10.1.11.2")
        assert route_links([on_int, behind, client_side, nowhere]) == \
            {on_int: net.ifindex["int"], behind: net.ifindex["int"],
             client_side: net.ifindex["ext"]}


def test_route_links_answers_as_ip_route_get_does():
    """netif.route_links, its lookups batched on one socket, names the link
    `ip route get` names for each address: the longest prefix, the lowest
    metric, a path of a multipath route, the default table after the main
    one (a throw route's lookup goes on to it), the operator's own rules; a
    blackhole's address and one with no route left out; and so in batches
    larger than one socket's send, and for no address at all."""
    def ip_route_get(addr):
        r = subprocess.run(["ip", "-j", "route", "get", str(addr)], capture_output=True,
                           text=True)
        return json.loads(r.stdout)[0]["dev"] if r.returncode == 0 else None

    def agrees():
        found = route_links(addresses)
        names = {index: name for name, index in net.ifindex.items()}
        assert {a: names[i] for a, i in found.items()} == \
            {a: dev for a in addresses if (dev := ip_route_get(a)) is not None}
        return {a: names[i] for a, i in found.items()}

    addresses = [IPv4Address(a) for a in ("10.1.11.101", "10.1.20.5", "10.1.20.7", "10.1.1.50",
                                          "10.1.21.1", "10.1.22.1", "10.1.23.1", "10.1.25.1",
                                          "192.0.2.1")]
    with FibNet("xlbt-links").entered({}) as net:
        net.sh("ip", "route", "add", "10.1.20.0/24", "via", "10.1.11.2")
        net.sh("ip", "route", "add", "10.1.20.7/32", "via", "10.1.1.2")
        net.sh("ip", "route", "add", "blackhole", "10.1.21.0/24")
        net.sh("ip", "route", "add", "10.1.22.0/24", "via", "10.1.1.2", "metric", "20")
        net.sh("ip", "route", "add", "10.1.22.0/24", "via", "10.1.11.2", "metric", "10")
        net.sh("ip", "route", "add", "10.1.23.0/24", "nexthop", "via", "10.1.11.2",
               "nexthop", "via", "10.1.1.2")
        net.sh("ip", "route", "add", "10.1.25.0/24", "via", "10.1.1.2", "table", "default")
        found = agrees()
        assert (found[IPv4Address("10.1.20.7")], found[IPv4Address("10.1.22.1")],
                found[IPv4Address("10.1.25.1")]) == ("ext", "int", "ext")
        assert IPv4Address("10.1.23.1") in found and IPv4Address("10.1.21.1") not in found
        net.sh("ip", "route", "add", "10.1.20.0/24", "via", "10.1.1.2", "table", "100")
        net.sh("ip", "rule", "add", "to", "10.1.20.0/24", "lookup", "100", "priority", "100")
        net.sh("ip", "route", "add", "throw", "10.1.25.0/24")
        found = agrees()
        assert (found[IPv4Address("10.1.20.5")], found[IPv4Address("10.1.25.1")]) == \
            ("ext", "ext")
        many = [IPv4Address(0x0A010B00 + i) for i in range(101, 201)] * 3
        assert route_links(many) == {a: net.ifindex["int"] for a in many}
        assert route_links([]) == {}


def test_table_routes_reads_one_table_as_ip_route_show_does(monkeypatch):
    """netif.table_routes lists a table's routes as `ip route show table N`
    does (a table above 255 too, none for a table that does not exist), and
    asks the kernel for that table alone: beside 20,000 routes in main, the
    local table's few take one small answer, not a dump of every table (a
    host that speaks BGP may hold a full table: every apply reads this)."""
    received = []

    class Counted(socket.socket):
        def recv(self, *args):
            data = super().recv(*args)
            received.append(len(data))
            return data

    def shown(table):
        out = subprocess.run(["ip", "-j", "route", "show", "table", str(table)], check=True,
                             capture_output=True, text=True).stdout
        return {(r["dst"] if "/" in r["dst"] or r["dst"] == "default" else f"{r['dst']}/32",
                 r.get("type", "unicast"), r.get("dev")) for r in json.loads(out or "[]")}

    def read(table):
        names = {index: name for name, index in net.ifindex.items()}
        types = dict(enumerate(("unspec", "unicast", "local", "broadcast", "anycast",
                                "multicast", "blackhole", "unreachable", "prohibit", "throw")))
        return {(str(r.dst).replace("0.0.0.0/0", "default"), types[r.type], names.get(r.oif))
                for r in netif.table_routes(table)}

    with FibNet("xlbt-links").entered({}) as net:
        net.ifindex["lo"] = socket.if_nametoindex("lo")
        net.sh("ip", "route", "add", "local", "10.9.0.0/16", "dev", "lo", "table", "local")
        net.sh("ip", "route", "add", "blackhole", "10.1.1.101", "proto", "static",
               "table", "70000")
        net.sh("ip", "route", "add", "10.1.20.0/24", "via", "10.1.11.2", "table", "100")
        routes = "".join(f"route add 172.16.{i // 256}.{i % 256}/32 via 10.1.11.2\n"
                         for i in range(20_000))
        subprocess.run(["ip", "-batch", "-"], input=routes, text=True, check=True)
        for table in (255, 254, 100, 70000):
            assert read(table) == shown(table)
        assert netif.table_routes(4242) == []
        assert {r.protocol for r in netif.table_routes(70000)} == {4}      # static
        monkeypatch.setattr(netif.socket, "socket", Counted)
        assert ("10.9.0.0/16", "local", "lo") in read(255)
        assert 0 < sum(received) < 4096

def test_the_stale_neighbours_of_the_next_hops_are_checked_and_no_other():
    """netif.renew_stale has the kernel check (a probe soon: DELAY) the stale
    entries of the next hops given (link, MAC), among hundreds of others: not
    another MAC on that link, nor that MAC on another link, nor an entry of
    theirs that is not stale."""
    def states():
        out = subprocess.run(["ip", "-j", "neigh", "show"], check=True, capture_output=True,
                             text=True).stdout
        return {(n["dst"], n["dev"]): n["state"][0] for n in json.loads(out)}

    used = "02:00:00:00:0a:01"
    with FibNet("xlbt-links").entered({}) as net:
        entries = "".join(f"neigh add 10.1.11.{i} lladdr 02:00:00:00:0b:{i:02x} dev int "
                          f"nud stale\n" for i in range(2, 250))
        subprocess.run(["ip", "-batch", "-"], input=entries, text=True, check=True)
        for addr, dev, nud in (("10.1.11.250", "int", "stale"), ("10.1.1.250", "ext", "stale"),
                               ("10.1.11.251", "int", "permanent")):
            net.sh("ip", "neigh", "add", addr, "lladdr", used, "dev", dev, "nud", nud)
        before = states()
        netif.renew_stale({(net.ifindex["int"], bytes.fromhex(used.replace(":", "")))})
        assert states() == {**before, ("10.1.11.250", "int"): "DELAY"}
        assert before[("10.1.11.250", "int")] == "STALE"


def test_each_loss_of_a_link_is_told_once_with_how():
    with FibNet("xlbt-links").entered({}) as net:
        events = LinkEvents()
        try:
            events.carrier()
            assert told(events) == ([], False)
            # int's cable pulled: its peer (here too) is set down
            net.sh("ip", "link", "set", "int-peer", "down")
            assert told(events)[0] == [("int-peer", "was set down"), ("int", "lost its carrier")]
            net.sh("ip", "addr", "add", "10.1.12.1/24", "dev", "int")
            net.sh("ip", "link", "set", "int", "down")          # down already: no loss
            assert told(events)[0] == []
            net.sh("ip", "link", "set", "int", "up")
            net.sh("ip", "link", "set", "int-peer", "up")       # back: routes to look up
            lost, regained, changed, _ = events.read()
            assert (lost, changed) == ([], True) and net.ifindex["int"] in regained
            net.sh("ip", "link", "set", "small", "down")
            net.sh("ip", "link", "del", "nofwd")
            # Their peers here too: one loses its carrier, one goes with its veth.
            assert told(events)[0] == [("small", "was set down"),
                                       ("small-peer", "lost its carrier"),
                                       ("nofwd", "was deleted"), ("nofwd-peer", "was deleted")]
            # A route of the table it is told to ignore (xlb's announce table) is
            # no change of the servers' routes; one of another is.
            net.sh("ip", "route", "add", "blackhole", "10.1.1.101", "table", "100")
            assert told(events, 100) == ([], False)
            net.sh("ip", "route", "add", "10.1.30.0/24", "via", "10.1.11.2")
            assert told(events, 100) == ([], True)
        finally:
            events.close()


def test_a_carrier_back_in_an_overrun_is_told_once_the_carriers_are_read_again():
    """A link that regains its carrier while events are lost to an overrun
    is told regained once the links are read again, as a loss is: the
    servers its loss took down are checked then, not at their next turn."""
    with FibNet("xlbt-links").entered({}) as net, IPRoute() as ipr:
        events = LinkEvents()
        try:
            events.carrier()
            net.sh("ip", "link", "set", "int-peer", "down")
            assert told(events)[0] == [("int-peer", "was set down"), ("int", "lost its carrier")]
            events._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            for n in range(200):            # overruns it: what follows is lost
                ipr.route("add", dst=f"10.2.{n}.0/24", gateway="10.1.11.2")
            net.sh("ip", "link", "set", "int-peer", "up")
            assert events.read() == ([], [], True, set())
            events.carrier()
            assert sorted(events.read()[1]) == sorted(
                [net.ifindex["int"], *ipr.link_lookup(ifname="int-peer")])
        finally:
            events.close()


def test_a_links_address_or_mac_changed_is_told():
    """An IPv4 address added to or removed from a link, and another MAC given
    to one of the links it is asked about (those xlb answers ARP on), are
    told by their indexes; a link's other news (set down) is not, nor the
    MAC of a link it is not asked about."""
    with FibNet("xlbt-links").entered({}) as net:
        ext, small = net.ifindex["ext"], net.ifindex["small"]
        events = LinkEvents()
        try:
            events.carrier()
            known = read_links(ext)
            net.sh("ip", "addr", "add", "10.1.40.1/24", "dev", "ext")
            assert events.read(known=known)[3] == {ext}
            net.sh("ip", "addr", "del", "10.1.40.1/24", "dev", "ext")
            assert events.read(known=known)[3] == {ext}
            net.sh("ip", "link", "set", "small", "down")
            net.sh("ip", "link", "set", "small", "address", "02:00:00:00:40:02")
            assert events.read(known=known)[3] == set()
            known.update(read_links(small))
            net.sh("ip", "link", "set", "ext", "address", "02:00:00:00:40:01")
            assert events.read(known=known)[3] == {ext}
        finally:
            events.close()


def test_a_link_renamed_is_told_among_those_readdressed():
    """A link renamed (set down first, as the kernel asks) is told by its
    index among those to read again, if it is among the links it is asked
    about (those xlb runs on, as they were read then), not otherwise.
    The kernel tells a link's IPv4 addresses again when it is renamed: not
    those of one without any (here), which was not told."""
    with FibNet("xlbt-links").entered({}) as net:
        bare, other = net.add_veth("bare"), net.add_veth("other")
        events = LinkEvents()
        try:
            events.carrier()
            known = read_links(bare)
            net.sh("ip", "link", "set", "other", "down")
            net.sh("ip", "link", "set", "other", "name", "another")
            assert events.read(known=known)[3] == set()
            known.update(read_links(other))
            net.sh("ip", "link", "set", "bare", "down")
            net.sh("ip", "link", "set", "bare", "name", "renamed")
            assert events.read(known=known)[3] == {bare}
        finally:
            events.close()


def test_a_port_taken_out_of_its_bridge_is_not_told_deleted():
    """The kernel tells a port's leaving its bridge as an RTM_DELLINK of the
    bridge family (AF_BRIDGE) about the port, which is still there, carrier
    and all (and its joining as an RTM_NEWLINK): news of the bridge's, not
    the link's."""
    with FibNet("xlbt-links").entered({}) as net:
        net.sh("ip", "link", "add", "br0", "type", "bridge")      # down: no carrier to lose
        net.sh("ip", "link", "set", "small", "master", "br0")
        events = LinkEvents()
        try:
            events.carrier()
            net.sh("ip", "link", "set", "small", "nomaster")
            assert events.read() == ([], [], False, set())
            assert not events.lacks_carrier(net.ifindex["small"])
        finally:
            events.close()


class Servers:
    """The part of a Balancer that LinkWatch reads: the servers checked (here
    all by one tcp monitor), no announcer and no link attached, of a config
    that names its links (so that no link that comes up is to be attached)."""
    announcer = None
    links: dict = {}
    config = from_flags(["10.1.1.101:80"], ["10.1.11.101:8080"], ["ext", "int"])

    def __init__(self, addresses: list[str]):
        m = Monitor("m", "tcp", interval=1.0, timeout=0.5, rise=2, fall=2)
        self.targets = [Target(("web", a), IPv4Address(a), 80, m) for a in addresses]

    def health_targets(self) -> list[Target]:
        return self.targets


class CountedWatch(LinkWatch):
    """A LinkWatch counting its rounds of route lookups."""
    rounds = 0

    def _routes(self, addresses):
        self.rounds += 1
        return super()._routes(addresses)


@contextlib.contextmanager
def watching(servers: Servers, on_change=lambda tr: None):
    """A running CountedWatch of these servers, its checker not running."""
    hc = HealthChecker(on_change)
    hc.set_targets(servers.targets)
    watch = CountedWatch(servers, hc, asyncio.Lock())
    watch.start()
    try:
        yield watch, hc
    finally:
        watch.close()


def test_route_churn_looks_up_the_servers_routes_a_round_a_second_at_most():
    """A node whose BIRD imports its router's routes into the main table sees
    several changes a second, for ever: a round of lookups after each would
    cost a round a change (at 10,000 servers, 20 ms; 1.9 s through pyroute2). The changes
    coalesce; a link lost meanwhile is judged by the routes known before."""
    async def churn(net, seconds) -> int:
        loop = asyncio.get_running_loop()
        end, n = loop.time() + seconds, 0
        while loop.time() < end:
            n += 1
            await asyncio.to_thread(net.sh, "ip", "route", "replace", "10.1.40.0/24",
                                    "via", f"10.1.11.{2 + n % 2}")    # a change each time
            await asyncio.sleep(0.02)
        return n

    async def main(net):
        loop = asyncio.get_running_loop()
        since = loop.time()
        with watching(Servers(["10.1.11.101", "10.1.1.50"])) as (watch, hc):
            changes = await churn(net, 3 * LOOKUP_SECONDS)
            # Rounds start LOOKUP_SECONDS apart at the soonest, however slow the
            # machine; a round for each change would be many more.
            most = 1 + (loop.time() - since) / LOOKUP_SECONDS
            assert watch.rounds <= most < changes
            await until(lambda: watch.rounds >= 2, "a round after the changes", 10.0)
            await asyncio.to_thread(net.sh, "ip", "link", "set", "int-peer", "down")
            await until(lambda: hc.state(("web", "10.1.11.101")) == "down", "marked down", 5.0)
            assert hc.state(("web", "10.1.1.50")) == "up"

    with FibNet("xlbt-links").entered({}) as net:
        asyncio.run(main(net))


def test_a_loss_in_an_overrun_is_told_once_the_carriers_are_read_again():
    """Events lost to an overrun socket (ENOBUFS: a burst of route changes)
    may hold a link's loss: once the links are read again, those that had
    their carrier before it and have none now are told lost."""
    with FibNet("xlbt-links").entered({}) as net, IPRoute() as ipr:
        events = LinkEvents()
        try:
            events.carrier()
            events._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            for n in range(200):            # overruns it: what follows is lost
                ipr.route("add", dst=f"10.2.{n}.0/24", gateway="10.1.11.2")
            net.sh("ip", "link", "set", "int-peer", "down")
            net.sh("ip", "link", "del", "nofwd")
            net.sh("ip", "link", "set", "small", "name", "tiny")
            assert told(events) == ([], True)
            events.carrier()
            assert sorted(told(events)[0]) == [
                ("int", "lost its carrier"), ("int-peer", "was set down"),
                ("nofwd", "was deleted"), ("nofwd-peer", "was deleted")]
            net.sh("ip", "link", "set", "tiny", "down")     # known by its new name
            assert told(events)[0] == [("tiny", "was set down"), ("small-peer", "lost its carrier")]
        finally:
            events.close()


def test_events_are_read_while_the_links_are_read_again(monkeypatch):
    """After an overrun the links are read again in a worker thread; the event
    loop reads its events meanwhile, not waiting for that dump (all the links
    and addresses, longer the more there are), and a loss it reads while the
    carriers are not known, which the dump may have missed, is told once they
    are read again."""
    with FibNet("xlbt-links").entered({}) as net, IPRoute() as ipr:
        events = LinkEvents()
        dumped, release, dumps = threading.Event(), threading.Event(), []
        links = netif.links

        def held():
            found = links()
            dumps.append(found)
            dumped.set()
            release.wait(10)
            return found
        try:
            events.carrier()
            events._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            for n in range(200):            # overruns it: what follows is lost
                ipr.route("add", dst=f"10.2.{n}.0/24", gateway="10.1.11.2")
            assert told(events) == ([], True)
            events._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            monkeypatch.setattr(netif, "links", held)
            again = threading.Thread(target=events.carrier)
            again.start()
            assert dumped.wait(10)
            net.sh("ip", "link", "set", "int-peer", "down")     # after the dump
            got = []
            reading = threading.Thread(target=lambda: got.append(told(events)))
            reading.start()
            reading.join(5)
            read_meanwhile = not reading.is_alive()
            release.set()
            again.join()
            reading.join()
            assert read_meanwhile, "read() waited for the links' dump"
            assert events.overrun           # the dump may have missed what was read
            events.carrier()
            assert not events.overrun and len(dumps) == 2
            assert sorted(told(events)[0]) == [("int", "lost its carrier"),
                                               ("int-peer", "was set down")]
        finally:
            release.set()
            events.close()


@contextlib.contextmanager
def served(net: FibNet, peers: dict[str, str], address: str):
    """A server listening on address, port 80, in a namespace of its own,
    xlbt-srv, that holds these veths' peers (name: address/prefix), up: a
    link's cable pulled there is its carrier lost here. An address none of
    them has goes on lo."""
    subprocess.run(["ip", "netns", "add", "xlbt-srv"], check=True)
    server = None
    try:
        net.sh("ip", "-n", "xlbt-srv", "link", "set", "lo", "up")
        if not any(a.startswith(f"{address}/") for a in peers.values()):
            net.sh("ip", "-n", "xlbt-srv", "addr", "add", f"{address}/32", "dev", "lo")
        for name, addr in peers.items():
            net.sh("ip", "link", "set", f"{name}-peer", "netns", "xlbt-srv")
            for cmd in (("addr", "add", addr, "dev", f"{name}-peer"),
                        ("link", "set", f"{name}-peer", "up")):
                net.sh("ip", "-n", "xlbt-srv", *cmd)
        server = subprocess.Popen(
            ["ip", "netns", "exec", "xlbt-srv", sys.executable, "-c",
             f"import socket, time; s = socket.create_server(({address!r}, 80)); "
             "print(flush=True); time.sleep(120)"], stdout=subprocess.PIPE)
        server.stdout.readline()        # listening
        yield
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "netns", "del", "xlbt-srv"], check=True)


@contextlib.asynccontextmanager
async def checking(servers: Servers, on_change=lambda tr: None):
    """watching(), and the servers' checker running."""
    with watching(servers, on_change) as (watch, hc):
        checks = asyncio.create_task(hc.run())
        try:
            yield watch, hc
        finally:
            hc.stop()
            await checks


def checked_rarely(address: str, timeout: float = 1.0) -> Servers:
    """A server at address, checked every ten minutes (rise 1): a check that
    brings it back sooner is one the watch asked for."""
    servers = Servers([address])
    servers.targets = [Target(t.key, t.address, 80,
                              Monitor("m", "tcp", interval=600.0, timeout=timeout, rise=1,
                                      fall=3)) for t in servers.targets]
    return servers


async def back_at_once(net: FibNet, address: str, going, returning) -> None:
    """A server at address, checked every ten minutes (rise 1), is taken down
    by going() (in a thread), and checked, so up, at once after returning()."""
    servers = checked_rarely(address)
    key = servers.targets[0].key
    async with checking(servers) as (watch, hc):
        await until(lambda: watch.routes, "the routes", 5.0)
        await asyncio.to_thread(going)
        await until(lambda: hc.state(key) == "down", "marked down", 5.0)
        await asyncio.to_thread(returning)
        await until(lambda: hc.state(key) == "up", "up again", 10.0)
        assert hc.last_check(key)[:2] == (True, "check passed")


def test_servers_a_link_took_down_are_checked_as_soon_as_it_is_back():
    """Its carrier back, the servers it took down are checked at once, not at
    their next turn (here ten minutes away): rise 1, one pass brings them back."""
    def cable(state):
        return lambda: net.sh("ip", "-n", "xlbt-srv", "link", "set", "int-peer", state)

    with FibNet("xlbt-links").entered({}) as net, served(net, {"int": "10.1.11.101/24"},
                                                          "10.1.11.101"):
        asyncio.run(back_at_once(net, "10.1.11.101", cable("down"), cable("up")))


def test_servers_of_a_link_deleted_are_checked_as_soon_as_it_is_made_again():
    """A link deleted and made again under its name (ifdown and ifup of a
    VLAN, a bond) has another index: the servers its deletion took down are
    checked at once when they are routed through it again, not at their
    next turn."""
    def remake():
        net.sh("ip", "link", "add", "int", "type", "veth", "peer", "name", "int-peer",
               "netns", "xlbt-srv")
        net.sh("ip", "addr", "add", "10.1.11.1/24", "dev", "int")
        net.sh("ip", "link", "set", "int", "up")
        net.sh("ip", "-n", "xlbt-srv", "addr", "add", "10.1.11.101/24", "dev", "int-peer")
        net.sh("ip", "-n", "xlbt-srv", "link", "set", "int-peer", "up")

    with FibNet("xlbt-links").entered({}) as net, served(net, {"int": "10.1.11.101/24"},
                                                          "10.1.11.101"):
        asyncio.run(back_at_once(net, "10.1.11.101",
                                 lambda: net.sh("ip", "link", "del", "int"), remake))


def test_a_links_loss_names_twenty_of_its_servers_and_counts_the_rest(capsys):
    """The line that tells a link's loss names the servers it takes down:
    the first twenty, and how many more (each has its own health line)."""
    async def main():
        with watching(servers) as (watch, _):
            watch._take_down(net.ifindex["int"], "int", "lost its carrier", servers.targets)

    servers = Servers([f"10.1.{11 + i // 250}.{i % 250 + 1}" for i in range(1000)])
    with FibNet("xlbt-links").entered({}) as net:
        asyncio.run(main())
    [line] = [x for x in capsys.readouterr().err.splitlines() if "servers_down" in x]
    assert line.endswith(' servers_down="' + ",".join(f"web/10.1.11.{i}" for i in range(1, 21))
                         + ' and 980 more"'), line


class Announcing(Servers):
    """Servers whose data path is attached to link int (its index given),
    with the links whose carrier came back recorded."""

    def __init__(self, int_index: int):
        super().__init__([])
        self.links = {"int": netif.Link(int_index, "int", b"\x02" * 6, True, False, ())}
        self.carriers_back: list[tuple[int, str]] = []

    def carrier_back(self, index: int, name: str) -> int:
        self.carriers_back.append((index, name))
        return 1


def test_a_link_attached_whose_carrier_is_back_has_its_vips_announced_again():
    """An attached link's carrier back (its cable plugged again, its switch
    port up) has the balancer announce its VIPs again (gratuitous ARP), once:
    one announced while it had no carrier was lost; a link not attached, or a
    carrier lost, has none. The lock held (an apply under way), what the
    watch asks to announce as it reads each event waits its turn, to be seen."""
    def without_carrier(watch, *links):
        return lambda: not watch.events.overrun and \
            all(watch.events.lacks_carrier(net.ifindex[name]) == (name in links)
                for name in ("int", "ext"))

    async def main():
        with watching(servers) as (watch, _):
            await until(lambda: not watch.events.overrun, "the carriers read", 5.0)
            async with watch.lock:
                for peer in ("int-peer", "ext-peer"):
                    await asyncio.to_thread(net.sh, "ip", "link", "set", peer, "down")
                await until(without_carrier(watch, "int", "ext"), "the losses read", 5.0)
                assert watch._carriers_back == {} and servers.carriers_back == []
                for peer in ("int-peer", "ext-peer"):
                    await asyncio.to_thread(net.sh, "ip", "link", "set", peer, "up")
                await until(without_carrier(watch), "the carriers back read", 5.0)
                assert watch._carriers_back == {net.ifindex["int"]: "int"}
            await until(lambda: not watch._carriers_back and servers.carriers_back,
                        "announced", 5.0)

    with FibNet("xlbt-links").entered({}) as net:
        servers = Announcing(net.ifindex["int"])
        asyncio.run(main())
    assert servers.carriers_back == [(net.ifindex["int"], "int")]


class SlowAnnouncing(Announcing):
    """Announcing, each announcement held until `release` is set (a slow
    send), or ten seconds have passed: whether it was set then is recorded."""

    def __init__(self, int_index: int):
        super().__init__(int_index)
        self.release = threading.Event()
        self.released: list[bool] = []
        self.running = self.most = 0

    def carrier_back(self, index: int, name: str) -> int:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            self.carriers_back.append((index, name))
            self.released.append(self.release.wait(10))
            return 1
        finally:
            self.running -= 1


def test_a_links_vips_are_announced_again_off_the_event_loop_one_announcement_at_a_time():
    """A link's VIPs announced again once its carrier is back (up to 256
    frames) are sent in a worker thread: the loop goes on meanwhile (health
    checks, the control socket; here, the link watch reads the next carrier
    back, and this test's coroutine ends the send). Under the lock, as an
    apply: not while one holds it. A carrier back again meanwhile is
    announced once more, after, not alongside."""
    def flap():
        net.sh("ip", "link", "set", "int-peer", "down")
        net.sh("ip", "link", "set", "int-peer", "up")

    async def main():
        with watching(servers) as (watch, _):
            await until(lambda: not watch.events.overrun, "the carriers read", 5.0)
            async with watch.lock:          # an apply under way
                await asyncio.to_thread(flap)
                await until(lambda: watch._carriers_back, "the carrier back read", 5.0)
                assert servers.carriers_back == []
            await until(lambda: servers.running, "announcing", 5.0)
            await asyncio.to_thread(flap)
            await until(lambda: watch._carriers_back, "the carrier back read meanwhile", 5.0)
            assert servers.running == 1 and len(servers.carriers_back) == 1
            servers.release.set()
            await until(lambda: len(servers.carriers_back) == 2 and not servers.running,
                        "announced again", 5.0)

    with FibNet("xlbt-links").entered({}) as net:
        servers = SlowAnnouncing(net.ifindex["int"])
        asyncio.run(main())
    assert servers.released == [True, True] and servers.most == 1
    assert servers.carriers_back == [(net.ifindex["int"], "int")] * 2


class Attaching(Servers):
    """Servers of a config that names no link (so every up Ethernet link is
    served), whose applies are recorded and attach link late, with carrier;
    the first fails."""
    config = from_flags(["10.1.1.101:80"], ["10.1.11.101:8080"])
    links = {"late": netif.Link(0, "late", b"\x02" * 6, True, False, ())}

    def __init__(self, addresses: list[str]):
        super().__init__(addresses)
        self.applies: list[tuple[bool, bool]] = []

    def apply(self, config, *, relink: bool, reread: bool = False) -> dict:
        self.applies.append((relink, reread))
        if len(self.applies) == 1:
            raise OSError("a netlink error")
        return {"attached": ["late"]}


def test_a_link_that_comes_up_is_applied_where_no_link_is_named_again_until_it_is(
        monkeypatch, capsys):
    """Where no link is named, xlb runs on every up Ethernet link: one that
    comes up (here made, as a VLAN added for the servers would be) has the
    watch apply the links as they are (Balancer.apply attaches it), without
    an `xlb apply`. An apply that fails is tried again: it was logged, and
    the link left without the program, its servers' replies un-NATed, until
    the next event. Where the links are named, none comes of it."""
    monkeypatch.setattr(linkwatch, "RETRY_SECONDS", (0.1, 1.0))

    async def main(servers):
        with watching(servers) as (watch, _):
            await until(lambda: not watch.events.overrun, "the carriers read", 5.0)
            if isinstance(servers, Attaching):      # the start's, failed and tried again
                await until(lambda: len(servers.applies) == 2, "applied again", 10.0)
            late = net.add_veth("late")
            if isinstance(servers, Attaching):
                await until(lambda: len(servers.applies) == 3, "applied", 10.0)
            else:
                await until(lambda: not watch.events.overrun and
                            not watch.events.lacks_carrier(late), "its carrier read", 5.0)
                assert watch._attaching is None     # no apply asked for

    with FibNet("xlbt-links").entered({}) as net:
        asyncio.run(main(Servers([])))
        net.sh("ip", "link", "del", "late")
        attaching = Attaching([])
        asyncio.run(main(attaching))
    assert attaching.applies == [(False, True)] * 3
    log = capsys.readouterr().err
    assert "level=error event=link error=\"links not applied: a netlink error\" retry_in=0.1" \
        in log and "event=link link=late reason=\"came up: attached\"" in log, log


def test_a_link_that_came_up_while_xlb_up_started_is_applied_where_no_link_is_named(capsys):
    """xlb up chooses its links before its watch hears the kernel (its first
    health sync comes between): a link that comes up then (at boot, as the
    network comes up) is told by no event, and was left without the
    program until an `xlb apply`. Where no link is named, the watch applies
    the links as they are once it knows their carriers; where they are named,
    it does not."""
    async def main(servers):
        with watching(servers) as (watch, _):
            if isinstance(servers, Attaching):      # the first fails: tried again
                await until(lambda: len(servers.applies) == 2, "applied", 10.0)
            else:
                await until(lambda: not watch.events.overrun, "the carriers read", 5.0)
                assert watch._attaching is None     # no apply asked for

    with FibNet("xlbt-links").entered({}) as net:
        net.add_veth("early")
        asyncio.run(main(Servers([])))
        assert "error" not in capsys.readouterr().err   # Servers has no apply to call
        attaching = Attaching([])
        asyncio.run(main(attaching))
    assert attaching.applies == [(False, True)] * 2


class AttachingAll(Servers):
    """Servers of a config that names no link, whose applies attach every up
    Ethernet link of the namespace not attached yet, as Balancer.apply does
    (reread): self.links, as the kernel had them then; with the links whose
    carrier came back recorded."""
    config = Attaching.config

    def __init__(self):
        super().__init__([])
        self.links: dict[str, netif.Link] = {}
        self.carriers_back: list[str] = []

    def apply(self, config, *, relink: bool, reread: bool = False) -> dict:
        came = [link for link in netif.links()
                if link.ethernet and link.up and link.name not in self.links]
        self.links = {**self.links, **{link.name: link for link in came}}
        return {"attached": [link.name for link in came]}

    def carrier_back(self, index: int, name: str) -> int:
        self.carriers_back.append(name)
        return 0


def test_a_link_attached_without_carrier_is_logged_so(capsys):
    """Where no link is named, every up Ethernet link is attached, one
    without carrier too (a veth whose peer is down, a cable out): the line
    that tells it says so, and that it serves once it has carrier, where it
    said "came up: attached", as of one with carrier."""
    async def main():
        with watching(servers) as (watch, _):
            await until(lambda: "dark" in servers.links, "the start's apply", 10.0)
            net.sh("ip", "link", "set", "dark-peer", "up")
            await until(lambda: "dark-peer" in servers.links and servers.carriers_back,
                        "dark's carrier back", 10.0)

    with FibNet("xlbt-links").entered({}) as net:
        net.sh("ip", "link", "add", "dark", "type", "veth", "peer", "name", "dark-peer")
        net.sh("ip", "link", "set", "dark", "up")
        servers = AttachingAll()
        asyncio.run(main())
    assert servers.carriers_back == ["dark"]
    log = capsys.readouterr().err
    assert 'event=link link=dark reason="attached without carrier: serves once it has ' \
           'carrier"' in log and 'event=link link=dark-peer reason="came up: attached"' \
           in log and 'link=dark reason="came up: attached"' not in log, log


class Renaming(Servers):
    """Servers of a config that names its links, one attached (as the kernel
    has it), whose applies are recorded."""

    def __init__(self, index: int, name: str, mac: str):
        super().__init__([])
        self.links = {name: netif.Link(index, name, bytes.fromhex(mac.replace(":", "")), True,
                                       False, ())}
        self.applies: list[tuple[bool, bool]] = []

    def apply(self, config, *, relink: bool, reread: bool = False) -> dict:
        self.applies.append((relink, reread))
        return {"attached": []}


def test_a_link_renamed_is_applied_under_its_new_name():
    """An attached link renamed (`ip link set bare name renamed`, once it is
    down) has the watch apply the links as they are (reread: Balancer.apply
    takes its new name, and logs it): one without an IPv4 address, whose
    rename the kernel tells by no address message, kept its old name in the
    list of links xlb runs on, which the logs, the watch and `xlb ha
    follow` read, and the ARP answers go by (a frontend's interfaces), until
    an `xlb apply`."""
    async def main():
        with watching(servers) as (watch, _):
            await until(lambda: not watch.events.overrun, "the carriers read", 5.0)
            await asyncio.to_thread(net.sh, "ip", "link", "set", "bare", "down")
            await asyncio.to_thread(net.sh, "ip", "link", "set", "bare", "name", "renamed")
            await until(lambda: servers.applies, "applied", 10.0)

    with FibNet("xlbt-links").entered({}) as net:
        mac = "02:00:00:00:40:01"
        servers = Renaming(net.add_veth("bare", mac), "bare", mac)
        asyncio.run(main())
    assert servers.applies[0] == (False, True)


def test_servers_a_link_took_down_renamed_meanwhile_are_checked_as_soon_as_it_is_back():
    """A server renamed (or its pool) while its link is down is the same
    server, still down: checked at once when the link is back, as under its
    old name."""
    async def main(net):
        m = Monitor("m", "tcp", interval=600.0, timeout=1.0, rise=1, fall=3)
        old, new = ("web", "a"), ("web", "b")
        servers = Servers([])
        servers.targets = [Target(old, IPv4Address("10.1.11.101"), 80, m)]
        async with checking(servers) as (watch, hc):
            await until(lambda: watch.routes, "the routes", 5.0)
            await asyncio.to_thread(net.sh, "ip", "link", "set", "int", "down")
            await until(lambda: hc.state(old) == "down", "marked down", 5.0)
            servers.targets = [Target(new, IPv4Address("10.1.11.101"), 80, m)]
            hc.set_targets(servers.targets, renamed={old: new})
            watch.stale()
            await asyncio.to_thread(net.sh, "ip", "link", "set", "int", "up")
            await until(lambda: hc.state(new) == "up", "up again", 10.0)

    with FibNet("xlbt-links").entered({}) as net, served(net, {"int": "10.1.11.101/24"},
                                                          "10.1.11.101"):
        asyncio.run(main(net))


def test_servers_a_link_took_down_are_checked_once_routed_again_after_it_is_back():
    """The kernel flushes a link's routes when it is set down, and tells its
    carrier back before it routes through it again (its subnet's route), or
    long before (a gateway's route, put back by a routing daemon or an ifup
    script): servers it took down are checked when they are routed through
    it again, not while no route reaches them, which would leave them down
    until their next turn."""
    def back():
        net.sh("ip", "link", "set", "int", "up")
        net.sh("ip", "route", "add", "10.1.20.0/24", "via", "10.1.11.2")

    with FibNet("xlbt-links").entered({}) as net, served(net, {"int": "10.1.11.2/24"},
                                                          "10.1.20.5"):
        net.sh("ip", "route", "add", "10.1.20.0/24", "via", "10.1.11.2")
        asyncio.run(back_at_once(net, "10.1.20.5",
                                 lambda: net.sh("ip", "link", "set", "int", "down"), back))


def test_a_flapping_link_has_its_servers_looked_up_one_lookup_at_a_time(monkeypatch):
    """Each carrier back has its servers' routes looked up before the next
    round (some 20 ms of CPU at 10,000 servers): a link that flaps has one such
    lookup at a time, those it regains meanwhile looked up after it, not a
    lookup each, all at once."""
    lookups, running, most = [0], [0], [0]
    lock = threading.Lock()
    route_links = netif.route_links

    def slow(addresses):            # as at 10,000 servers
        with lock:
            lookups[0] += 1
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            time.sleep(0.3)
            return route_links(addresses)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(netif, "route_links", slow)

    def cable(state):
        net.sh("ip", "-n", "xlbt-srv", "link", "set", "int-peer", state)

    async def main():
        servers = checked_rarely("10.1.11.101")
        key, address = servers.targets[0].key, servers.targets[0].address
        async with checking(servers) as (watch, hc):
            await until(lambda: watch.routes, "the routes", 5.0)
            for _ in range(4):
                lost = watch._downed.get(address, (0, 0.0))[1]
                await asyncio.to_thread(cable, "down")
                await until(lambda: watch._downed.get(address, (0, lost))[1] != lost,
                            "the loss", 5.0)
                n = lookups[0]
                await asyncio.to_thread(cable, "up")
                await until(lambda: lookups[0] > n or watch._regained, "the carrier back", 5.0)
            await until(lambda: hc.state(key) == "up", "up again", 10.0)
        assert most[0] <= 2             # a round's and the regained servers'

    with FibNet("xlbt-links").entered({}) as net, served(net, {"int": "10.1.11.101/24"},
                                                          "10.1.11.101"):
        asyncio.run(main())


def test_servers_routed_through_another_link_while_theirs_is_down_are_checked_at_once():
    """A server behind a gateway whose link lost its carrier, routed through
    another link with carrier (the operator's route, a routing daemon's): it
    is checked at once, not at its next turn."""
    with FibNet("xlbt-links").entered({}) as net, served(
            net, {"int": "10.1.11.2/24", "small": "10.1.13.2/24"}, "10.1.20.5"):
        net.sh("ip", "route", "add", "10.1.20.0/24", "via", "10.1.11.2")
        asyncio.run(back_at_once(
            net, "10.1.20.5",
            lambda: net.sh("ip", "-n", "xlbt-srv", "link", "set", "int-peer", "down"),
            lambda: net.sh("ip", "route", "replace", "10.1.20.0/24", "via", "10.1.13.2")))


def test_servers_checked_through_another_link_are_checked_again_once_theirs_is_back():
    """A server whose link was set down, routed meanwhile through a link with
    carrier that does not reach it (a backup route), fails the check there:
    it is checked again at once when its link is back and routes it."""
    async def main(net):
        servers = checked_rarely("10.1.20.5", timeout=0.5)
        key = servers.targets[0].key
        async with checking(servers) as (watch, hc):
            await until(lambda: watch.routes, "the routes", 5.0)
            await asyncio.to_thread(net.sh, "ip", "link", "set", "int", "down")
            await until(lambda: hc.last_check(key)[1] not in ("check passed",
                                                              "link int was set down"),
                        "checked through small", 5.0)
            assert hc.state(key) == "down"
            await asyncio.to_thread(back)
            await until(lambda: hc.state(key) == "up", "up again", 10.0)

    def back():
        net.sh("ip", "link", "set", "int", "up")
        net.sh("ip", "route", "add", "10.1.20.0/24", "via", "10.1.11.2", "metric", "10")

    with FibNet("xlbt-links").entered({}) as net, served(
            net, {"int": "10.1.11.2/24", "small": "10.1.13.2/24"}, "10.1.20.5"):
        net.sh("ip", "route", "add", "10.1.20.0/24", "via", "10.1.11.2", "metric", "10")
        # The backup's gateway answers no ARP: the check through it fails.
        net.sh("ip", "route", "add", "10.1.20.0/24", "via", "10.1.13.3", "metric", "100")
        asyncio.run(main(net))


def test_servers_applied_behind_a_link_without_carrier_are_down_at_once():
    """An apply while a link has no carrier: the servers it adds behind it are
    taken down as their routes are read, not left up (their VIP announced
    again) until their first check fails, up to an interval later, even at
    an address routed before (the same server in another pool); those
    already down stay as they are, counts and all."""
    async def main(net):
        m = Monitor("m", "tcp", interval=600.0, timeout=1.0, rise=2, fall=2)
        old, new, other = ("web", "old"), ("web", "new"), ("web", "other")
        twin = ("tls", "old")       # old, in another pool, checked on another port
        servers = Servers([])
        servers.targets = [Target(old, IPv4Address("10.1.11.101"), 80, m),
                           Target(other, IPv4Address("10.1.1.50"), 80, m)]
        changes = []
        async with checking(servers, changes.append) as (watch, hc):
            await until(lambda: len(watch.routes) == 2, "the routes", 5.0)
            net.sh("ip", "link", "set", "int-peer", "down")
            await until(lambda: hc.state(old) == "down", "marked down", 5.0)
            servers.targets = servers.targets + [Target(new, IPv4Address("10.1.11.102"), 80, m),
                                                 Target(twin, IPv4Address("10.1.11.101"), 443, m)]
            hc.set_targets(servers.targets)
            watch.stale()
            await until(lambda: hc.state(new) == hc.state(twin) == "down", "the new ones down",
                        5.0)
            assert hc.last_check(twin)[:2] == (False, "link int has no carrier")
            assert sorted((tr.key, tr.reason) for tr in changes) == \
                [(twin, "link int has no carrier"), (new, "link int has no carrier"),
                 (old, "link int lost its carrier")]
            assert hc.state(other) == "up"

    with FibNet("xlbt-links").entered({}) as net:
        asyncio.run(main(net))


def test_a_loss_in_an_overrun_takes_its_servers_down_before_the_next_round(monkeypatch, tmp_path):
    """After an overrun the carriers are read again at once, not with the next
    round of route lookups (here ten minutes away): a loss among the events
    lost takes its servers down then."""
    monkeypatch.setattr(linkwatch, "LOOKUP_SECONDS", 600.0)

    batch = tmp_path / "routes"
    batch.write_text("".join(f"route add 10.2.{n}.0/24 via 10.1.11.2\n" for n in range(200)))

    async def main(net):
        with watching(Servers(["10.1.11.101", "10.1.1.50"])) as (watch, hc):
            await until(lambda: watch.routes, "the routes", 5.0)
            watch.events._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            # The loop held meanwhile: they overrun it, and what follows is lost.
            net.sh("ip", "-batch", str(batch))
            net.sh("ip", "link", "set", "int-peer", "down")
            await until(lambda: hc.state(("web", "10.1.11.101")) == "down", "marked down", 5.0)
            assert hc.state(("web", "10.1.1.50")) == "up" and watch.rounds == 1

    with FibNet("xlbt-links").entered({}) as net:
        asyncio.run(main(net))


def test_an_overrun_while_the_carriers_are_read_again_has_them_read_again(monkeypatch, tmp_path):
    """Events lost again while the carriers are read again after an overrun
    (a burst goes on) have them read again at once too, not with the next
    round of route lookups (here ten minutes away): a loss among them takes
    its servers down then."""
    monkeypatch.setattr(linkwatch, "LOOKUP_SECONDS", 600.0)
    batches = []
    for first in (2, 3):
        batches.append(tmp_path / f"routes{first}")
        batches[-1].write_text("".join(f"route add 10.{first}.{n}.0/24 via 10.1.11.2\n"
                                       for n in range(200)))

    async def main(net):
        with watching(Servers(["10.1.11.101", "10.1.1.50"])) as (watch, hc):
            await until(lambda: watch.routes, "the routes", 5.0)
            carrier = watch.events.carrier

            def and_lost_again():       # in a worker thread: the loop reads on
                carrier()
                if len(batches) == 1:
                    net.sh("ip", "-batch", str(batches.pop()))
                    net.sh("ip", "link", "set", "int-peer", "down")
            monkeypatch.setattr(watch.events, "carrier", and_lost_again)
            watch.events._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            net.sh("ip", "-batch", str(batches.pop(0)))     # the loop held: overrun
            await until(lambda: hc.state(("web", "10.1.11.101")) == "down", "marked down", 5.0)
            assert hc.state(("web", "10.1.1.50")) == "up" and watch.rounds == 1

    with FibNet("xlbt-links").entered({}) as net:
        asyncio.run(main(net))


def test_servers_applied_behind_a_link_without_carrier_in_an_overrun_are_down_at_once(
        tmp_path):
    """Events lost while a round looks the routes up (a burst of route
    changes): which links have carrier is read again before the round judges
    the servers new behind one, not taken as unknown, which let them stay up
    (no loss told after: that link had none before either)."""
    batch = tmp_path / "routes"
    batch.write_text("".join(f"route add 10.2.{n}.0/24 via 10.1.11.2\n" for n in range(200)))
    new = IPv4Address("10.1.11.102")

    async def main(net):
        with watching(Servers(["10.1.1.50"])) as (watch, hc):
            await until(lambda: watch.routes, "the routes", 5.0)
            net.sh("ip", "link", "set", "int-peer", "down")
            await until(lambda: watch.events.lacks_carrier(net.ifindex["int"]), "the loss", 5.0)
            routes, read = watch._routes, watch._read

            def routes_then_overrun(addresses):
                found = routes(addresses)
                if new in addresses:
                    watch._read = overrun_then_read
                return found

            def overrun_then_read():        # the round's own read, the loop held
                watch._read = read
                watch.events._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                net.sh("ip", "-batch", str(batch))
                batch.unlink()
                read()
            watch._routes = routes_then_overrun
            target = Target(("web", "new"), new, 80, watch.balancer.targets[0].monitor)
            watch.balancer.targets = watch.balancer.targets + [target]
            hc.set_targets(watch.balancer.targets)
            watch.stale()
            await until(lambda: not batch.exists(), "the overrun", 5.0)
            await until(lambda: hc.state(target.key) == "down", "the new one down", 5.0)
            assert hc.last_check(target.key)[:2] == (False, "link int has no carrier")

    with FibNet("xlbt-links").entered({}) as net:
        asyncio.run(main(net))
