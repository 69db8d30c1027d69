"""What xlb's watch of its links (daemon.LinkWatch) reads from the kernel, in
a network namespace of the test's own: the link each server is routed
through, and the links that lose their carrier, are set down or deleted."""

from __future__ import annotations

import os
from ipaddress import IPv4Address

import pytest
from fibnet import FibNet

from xlb.netif import LinkEvents, route_links

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="a network namespace: needs root")]


def told(events: LinkEvents, ignore_table: int | None = None) -> tuple[list[tuple], bool]:
    lost, changed = events.read(ignore_table)
    return [(loss.name, loss.how) for loss in lost], changed


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
            assert told(events) == ([], True)
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
