"""N-node scale-out in the namespace lab (netns-lab/ha-ecmp.sh, prefix xlbg):
three xlb nodes announce the VIP over BGP (real BIRD) to a router that spreads
flows with ECMP; one node dies silently under load and BFD takes its route
away; a node whose pool has no server up, or that stops, withdraws."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "netns-lab"))
from ha_client import describe, summary  # noqa: E402
from labctl import HERE, PY, VIP, Lab, pair_config, running_lab, wait_for  # noqa: E402

pytestmark = [pytest.mark.lab,
              pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")]

NODES = {"node1": "10.1.2.11", "node2": "10.1.2.12", "node3": "10.1.2.13"}
BFD_BOUND = 0.3         # the bound: a silent node's route goes within 0.3 s (BFD 100 ms x 3)


@pytest.fixture(scope="module")
def ecmp(tmp_path_factory):
    config = pair_config(tmp_path_factory.mktemp("ecmp"))
    with running_lab("xlbg", "ha-ecmp.sh") as lab, contextlib.ExitStack() as nodes:
        for node in NODES:
            nodes.enter_context(lab.xlb("--config", str(config), "--announce-table", "100",
                                        node=node))
            lab._lab("bird", node, str(config))
        yield lab


def nexthops(lab: Lab) -> set[str]:
    """The router's next hops for the VIP."""
    out = lab.run("router", "ip", "-j", "route", "show", f"{VIP}/32", check=True).stdout
    routes = json.loads(out)
    if not routes:
        return set()
    r = routes[0]
    return {h["gateway"] for h in r.get("nexthops", [])} | ({r["gateway"]} if "gateway" in r
                                                            else set())


def route_without(monitor, hop: str, since: float) -> float | None:
    """When the router's kernel first held the VIP's route without next hop
    `hop` after `since` (Unix time), from `ip -ts -o monitor route`'s lines."""
    monitor.terminate()
    for line in monitor.communicate()[0].splitlines():
        stamp, _, event = line.partition("] ")
        at = datetime.datetime.fromisoformat(stamp.lstrip("[")).timestamp()
        if at >= since and event.startswith(f"{VIP} ") and f"via {hop} " not in event:
            return at
    return None


def test_every_node_announces_and_withdraws_when_it_cannot_serve(ecmp):
    lab = ecmp
    wait_for(lambda: nexthops(lab) == set(NODES.values()), 30,
             "the router has a next hop for each node")
    st = lab.status("node1")
    assert st["ha"] == {"role": "active", "announce_table": 100, "announcing": [VIP]}
    metrics = lab.run("node1", "curl", "-s", "http://127.0.0.1:9717/metrics", check=True).stdout
    assert f'xlb_bgp_announcing{{vip="{VIP}"}} 1.0' in metrics
    assert 'xlb_node_role{role="active"} 1.0' in metrics
    # No server of its pool up on node2 (both disabled): it withdraws, and comes back.
    for server in ("was1", "was2"):
        lab.xlb_cmd("server", "disable", "was", server, node="node2", check=True)
    wait_for(lambda: nexthops(lab) == {NODES["node1"], NODES["node3"]}, 5,
             "node2's route goes when its pool has no server up")
    assert lab.status("node2")["ha"]["announcing"] == []
    for server in ("was1", "was2"):
        lab.xlb_cmd("server", "enable", "was", server, node="node2", check=True)
    wait_for(lambda: nexthops(lab) == set(NODES.values()), 5, "node2's route comes back")
    # A backup announces nothing either.
    lab.xlb_cmd("ha", "role", "backup", node="node2", check=True)
    wait_for(lambda: nexthops(lab) == {NODES["node1"], NODES["node3"]}, 5,
             "node2's route goes when it becomes backup")
    lab.xlb_cmd("ha", "role", "active", node="node2", check=True)
    wait_for(lambda: nexthops(lab) == set(NODES.values()), 5, "node2's route comes back")


def test_a_silent_node_loses_its_route_by_bfd_and_flows_survive(ecmp):
    lab = ecmp
    wait_for(lambda: nexthops(lab) == set(NODES.values()), 30, "three next hops")
    client = lab.spawn("client", PY, str(HERE / "ha_client.py"), "load", VIP, "80",
                       "--seconds", "5", "--every", "0.02", "--hold", "20",
                       "--hold-every", "0.1", "--timeout", "3")
    monitor = lab.spawn("router", "ip", "-ts", "-o", "monitor", "route")
    time.sleep(2)
    silenced_at = float(lab._lab("silence", "node3").stdout)     # when the drop took effect
    wait_for(lambda: NODES["node3"] not in nexthops(lab), 3, "node3's route goes")
    gone = route_without(monitor, NODES["node3"], silenced_at) - silenced_at
    out, _ = client.communicate(timeout=30)
    result = json.loads(out)
    seen = summary(result, silenced_at)
    print(f"\nnode3 silenced: its route went after {gone:.3f}s; {describe(seen)}")
    assert nexthops(lab) == {NODES["node1"], NODES["node2"]}
    assert gone <= BFD_BOUND
    assert seen["new"] >= 200 and seen["failed"] == 0
    # Maglev on every node: a flow the router moves reaches the same server.
    assert seen["held_survived"] == seen["held"]
