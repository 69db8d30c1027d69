"""The routes xlb keeps for BIRD (ha.Announcer), in a routing table of a
network namespace of the test's own: xlb adds and removes its VIP routes and
leaves the operator's alone."""

from __future__ import annotations

import os
import subprocess
from ipaddress import IPv4Address

import pytest
from fibnet import FibNet

from xlb.balancer import sync_routes
from xlb.ha import Announcer

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="a network namespace: needs root")]

# The operator's routes in the same table: /32 routes that are not blackholes,
# or not of xlb's protocol, and a prefix.
OPERATORS = {"unreachable 10.9.9.9 proto static", "blackhole 10.9.9.8 proto dhcp",
             "blackhole 10.9.9.0/24 proto static"}


def table(net: FibNet, number: int) -> set[str]:
    out = subprocess.run(["ip", "-n", net.name, "route", "show", "table", str(number)],
                         check=True, capture_output=True, text=True).stdout
    return {line.strip() for line in out.splitlines()}


def test_the_announcer_adds_and_removes_its_own_routes_only():
    with FibNet("xlbt-announce").entered({}) as net:
        for route in OPERATORS:
            net.sh("ip", "route", "add", *route.split(), "table", "100")
        announcer = Announcer(100)
        announcer.sync([IPv4Address("10.1.1.101"), IPv4Address("10.1.1.102")])
        assert table(net, 100) == {"blackhole 10.1.1.101 proto static",
                                   "blackhole 10.1.1.102 proto static", *OPERATORS}
        announcer.sync([IPv4Address("10.1.1.102")])
        assert table(net, 100) == {"blackhole 10.1.1.102 proto static", *OPERATORS}
        Announcer(100).sync(())             # another instance's: what a killed one left
        assert table(net, 100) == OPERATORS


def test_a_route_the_kernel_refuses_keeps_no_other_out_and_is_not_said_announced():
    """The operator's route for a VIP (the same /32, not a blackhole) makes the
    kernel refuse xlb's: the error names it, the other VIPs are announced all
    the same, and `announced` (xlb_bgp_announcing) is what the table holds,
    not what was asked for."""
    vips = [IPv4Address(f"10.1.1.{i}") for i in range(101, 105)]
    with FibNet("xlbt-announce").entered({}) as net:
        net.sh("ip", "route", "add", "unreachable", "10.1.1.102", "proto", "static",
               "table", "100")
        announcer = Announcer(100)
        with pytest.raises(OSError, match="10.1.1.102"):
            announcer.sync(vips)
        assert table(net, 100) == {"blackhole 10.1.1.101 proto static",
                                   "unreachable 10.1.1.102 proto static",
                                   "blackhole 10.1.1.103 proto static",
                                   "blackhole 10.1.1.104 proto static"}
        assert announcer.announced == {vips[0], vips[2], vips[3]}


def test_a_refusal_is_logged_as_it_begins_changes_and_ends_not_at_each_sync(capsys):
    """Each apply syncs the routes (a start makes three): a refusal that lasts
    is one warning, a new one another, and its end is told."""
    vips = [IPv4Address("10.1.1.101"), IPv4Address("10.1.1.102")]
    with FibNet("xlbt-announce").entered({}) as net:
        net.sh("ip", "route", "add", "unreachable", "10.1.1.102", "proto", "static",
               "table", "100")
        announcer = Announcer(100)
        for _ in range(3):
            sync_routes(announcer, vips)
        net.sh("ip", "route", "add", "unreachable", "10.1.1.103", "proto", "static",
               "table", "100")
        sync_routes(announcer, [*vips, IPv4Address("10.1.1.103")])
        sync_routes(announcer, [*vips, IPv4Address("10.1.1.103")])
        net.sh("ip", "route", "del", "unreachable", "10.1.1.102", "table", "100")
        net.sh("ip", "route", "del", "unreachable", "10.1.1.103", "table", "100")
        sync_routes(announcer, vips)
        sync_routes(announcer, vips)
    lines = [line for line in capsys.readouterr().err.splitlines() if "event=announce" in line]
    assert len(lines) == 3, lines
    assert "level=warning" in lines[0] and "add 10.1.1.102/32" in lines[0] \
        and "10.1.1.103" not in lines[0], lines
    assert "level=warning" in lines[1] and "add 10.1.1.103/32" in lines[1], lines
    assert "level=warning" not in lines[2] and 'reason="no route refused now"' in lines[2] \
        and "announcing=10.1.1.101,10.1.1.102" in lines[2], lines
