"""N-node scale-out in the namespace lab (netns-lab/ha-ecmp.sh, prefix xlbg):
three xlb nodes announce the VIP over BGP (real BIRD) to a router that spreads
flows with ECMP; one node goes silent under load and BFD takes its route
away; a node whose pool has no server up, or that becomes backup, withdraws,
and so does one whose link toward the servers goes, at once; with a "source"
pool, a client's connections reach one server whichever node they cross."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from ha_client import describe, summary
from labctl import HERE, PY, VIP, Lab, pair_config, running_lab, wait_for

pytestmark = [pytest.mark.lab,
              pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")]

NODES = {"node1": "10.1.2.11", "node2": "10.1.2.12", "node3": "10.1.2.13"}


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


def birdc(lab: Lab, *command: str) -> str:
    """The router's BIRD's answer to a `birdc` command (its control socket:
    ha-ecmp.sh start_bird)."""
    socket = f"/run/xlb-lab/{lab.prefix}/router-bird.ctl"
    return lab.run("router", "birdc", "-s", socket, *command, check=True).stdout


def bfd_state(lab: Lab, neighbour: str) -> str | None:
    """The state (Up, Down, Init, AdminDown) of the router's BFD session with
    neighbour, from `show bfd sessions`; None if it has none."""
    for line in birdc(lab, "show", "bfd", "sessions").splitlines():
        fields = line.split()
        if fields[:1] == [neighbour]:
            return fields[2]
    return None


def bgp_session(lab: Lab, node: str) -> tuple[str, str]:
    """The BGP state (Established, Idle, ...) of the router's session with node,
    and its last error ("" if none), from `show protocols all`."""
    state = error = ""
    for line in birdc(lab, "show", "protocols", "all", node).splitlines():
        key, _, value = line.strip().partition(":")
        if key == "BGP state":
            state = value.strip()
        elif key == "Last error":
            error = value.strip()
    return state, error


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
    wait_for(lambda: nexthops(lab) == {NODES["node1"], NODES["node3"]}, 30,
             "node2's route goes when its pool has no server up")
    assert lab.status("node2")["ha"]["announcing"] == []
    for server in ("was1", "was2"):
        lab.xlb_cmd("server", "enable", "was", server, node="node2", check=True)
    wait_for(lambda: nexthops(lab) == set(NODES.values()), 30, "node2's route comes back")
    # A backup announces nothing either.
    lab.xlb_cmd("ha", "role", "backup", node="node2", check=True)
    wait_for(lambda: nexthops(lab) == {NODES["node1"], NODES["node3"]}, 30,
             "node2's route goes when it becomes backup")
    lab.xlb_cmd("ha", "role", "active", node="node2", check=True)
    wait_for(lambda: nexthops(lab) == set(NODES.values()), 30, "node2's route comes back")


def test_the_nodes_show_one_maglev_table_digest_until_one_drains_a_server(ecmp):
    """A flow moved between nodes keeps its server only where their tables
    agree: each node shows its table's digest (README), the same on nodes of
    one config and states, another on a node that drained a server alone."""
    lab = ecmp

    def digests():
        return {node: lab.status(node)["pools"][0]["table_digest"] for node in NODES}
    wait_for(lambda: len(set(digests().values())) == 1, 20, "one digest on every node")
    same = digests()["node1"]
    assert same and same != "none"
    lab.xlb_cmd("server", "drain", "was", "was1", node="node2", check=True)
    try:
        seen = digests()
        assert seen["node1"] == seen["node3"] == same != seen["node2"]
    finally:
        lab.xlb_cmd("server", "enable", "was", "was1", node="node2", check=True)
    assert digests() == dict.fromkeys(NODES, same)


def test_a_node_that_loses_its_servers_link_withdraws_at_once(ecmp, tmp_path):
    """node1's eth1, its link toward the servers, loses its carrier (a cable
    pulled, a switch port down), then, once back, is set down by hand. Its
    servers are checked every 60 s and go down after 3 failures: their checks
    would take minutes, so only xlb's watch of its links can withdraw node1's
    route, whose flows it could only drop; it must, and say why. Back, the
    link brings the servers back by their checks (every 2 s again)."""
    lab = ecmp
    normal = pair_config(tmp_path)
    slow = tmp_path / "slow.toml"
    slow.write_text(normal.read_text().replace("interval = 2.0", "interval = 60.0"))
    wait_for(lambda: nexthops(lab) == set(NODES.values()), 30, "three next hops")
    for (where, link), how in ((("sw", "node1-eth1"), "lost its carrier"),
                               (("node1", "eth1"), "was set down")):
        lab.xlb_cmd("apply", str(slow), node="node1", check=True)
        lab.run(where, "ip", "link", "set", link, "down", check=True)
        try:
            wait_for(lambda: NODES["node1"] not in nexthops(lab), 10, "node1's route goes")
            st = lab.status("node1")
            assert st["ha"]["announcing"] == []
            assert [(s["name"], s["health"], s["last_check"]["ok"], s["last_check"]["reason"])
                    for s in st["pools"][0]["servers"]] == \
                [(name, "down", False, f"link eth1 {how}") for name in ("was1", "was2")]
        finally:
            lab.run(where, "ip", "link", "set", link, "up", check=True)
        lab.xlb_cmd("apply", str(normal), node="node1", check=True)
        wait_for(lambda: {s["health"] for s in lab.status("node1")["pools"][0]["servers"]}
                 == {"up"}, 20, "node1's servers come back by their checks")
        wait_for(lambda: nexthops(lab) == set(NODES.values()), 10, "node1's route comes back")


def test_a_source_pool_sends_a_clients_connections_through_any_node_to_one_server(ecmp,
                                                                                   tmp_path):
    """The router hashes ports too: one client's connections reach every node.
    With algorithm "source" on each, they all reach one server, and the nodes
    show one digest, another than maglev's."""
    lab = ecmp
    normal = pair_config(tmp_path)
    source = tmp_path / "source.toml"
    source.write_text(normal.read_text().replace('algorithm = "maglev"', 'algorithm = "source"'))

    def digests():
        return {lab.status(node)["pools"][0]["table_digest"] for node in NODES}
    wait_for(lambda: nexthops(lab) == set(NODES.values()), 30, "three next hops")
    wait_for(lambda: len(digests()) == 1, 20, "one digest on every node")
    (maglev_digest,) = digests()
    try:
        for node in NODES:
            lab.xlb_cmd("apply", str(source), node=node, check=True)
        assert len(digests()) == 1 and maglev_digest not in digests()
        before = {node: lab.status(node)["frontends"][0]["new_flows"] for node in NODES}
        out = lab.client("client", "http", VIP, "80", "--count", "60")
        assert out["errors"] == [] and len(set(out["names"])) == 1, out
        through = {node for node in NODES
                   if lab.status(node)["frontends"][0]["new_flows"] > before[node]}
        assert len(through) > 1, through
    finally:
        for node in NODES:
            lab.xlb_cmd("apply", str(normal), node=node, check=True)


def test_a_silent_node_loses_its_route_by_bfd_and_flows_survive(ecmp):
    """The route goes because BFD saw node3 fall silent: its BFD session is
    down and BIRD ended the BGP session for that reason (the BGP hold timer,
    240 s, would take minutes). How fast is printed, not asserted."""
    lab = ecmp
    wait_for(lambda: nexthops(lab) == set(NODES.values()), 30, "three next hops")
    wait_for(lambda: all(bfd_state(lab, addr) == "Up" for addr in NODES.values()), 10,
             "a BFD session up with each node")
    assert bgp_session(lab, "node3") == ("Established", "")
    client = lab.spawn("client", PY, str(HERE / "ha_client.py"), "load", VIP, "80",
                       "--seconds", "5", "--every", "0.02", "--hold", "20",
                       "--hold-every", "0.1", "--timeout", "3")
    monitor = lab.spawn("router", "ip", "-ts", "-o", "monitor", "route")
    time.sleep(2)
    silenced_at = float(lab._lab("silence", "node3").stdout)     # when the drop took effect
    wait_for(lambda: NODES["node3"] not in nexthops(lab), 10, "node3's route goes")
    gone_at = route_without(monitor, NODES["node3"], silenced_at)
    bfd = {node: bfd_state(lab, addr) for node, addr in NODES.items()}
    bgp = bgp_session(lab, "node3")
    out, _ = client.communicate(timeout=30)
    result = json.loads(out)
    seen = summary(result, silenced_at)
    took = "at an unseen time" if gone_at is None else f"after {gone_at - silenced_at:.3f}s"
    print(f"\nnode3 silenced: its route went {took}; BFD {bfd}; BGP node3 {bgp}; "
          f"{describe(seen)}")
    assert nexthops(lab) == {NODES["node1"], NODES["node2"]}
    # Why it went: BFD, not the BGP hold timer or anything else.
    assert bfd == {"node1": "Up", "node2": "Up", "node3": "Down"}
    assert bgp[0] != "Established" and "BFD session down" in bgp[1], bgp
    # A connection whose answer was on its way through node3 when it fell
    # silent is lost: the server resends the answer where its connection mark
    # says (node3, see ha-ecmp.sh), and the client, waiting, sends nothing that
    # would move it. Every other one went through, some after a resent SYN.
    assert seen["new"] >= 200 and seen["failed"] == seen["unanswered"]
    # Maglev on every node: a flow the router moves reaches the same server.
    assert seen["held_survived"] == seen["held"]


def test_a_node_stopped_loses_the_answers_on_their_way_through_it_unless_made_backup_first(
        ecmp):
    """Clients wait for an answer the servers hold (/hold), silent meanwhile. The node
    holding most of them is made backup: it withdraws, its data path still
    serves the answers that come back through it, and none is lost. Active
    again, then stopped at once by `xlb down` (which withdraws and removes
    its data path together), it loses every one it held: the server resends
    each through it (the connection's mark), so no other node sees it, with
    adopt_replies or without. Run last: the node stays stopped."""
    lab = ecmp
    wait_for(lambda: len(nexthops(lab)) >= 2, 30, "two next hops")

    def created() -> dict[str, int]:
        return {node: lab.status(node)["flows"]["created"] for node in NODES}

    def waiting_clients(count: int) -> tuple[list[subprocess.Popen], str, str, int]:
        """count clients waiting for their answer, which the servers hold until
        answered() releases it (servers.py /hold/); the release's name, the
        node holding the most of their connections, and how many it holds."""
        before = created()
        release = f"release_{uuid.uuid4().hex}"
        clients = [lab.spawn("client", "curl", "-s", "--noproxy", "*", "-m", "60", "-o",
                             "/dev/null", "-w", "%{http_code}", f"http://{VIP}/hold/{release}")
                   for _ in range(count)]
        wait_for(lambda: sum(created().values()) - sum(before.values()) >= count, 30,
                 "every connection created on some node")
        held = {node: n - before[node] for node, n in created().items()}
        node = max(held, key=held.get)
        return clients, release, node, held[node]

    def answered(clients: list[subprocess.Popen], release: str) -> int:
        """The servers answer, and how many clients got theirs."""
        (Path(f"/run/xlb-lab/{lab.prefix}") / release).touch()
        return sum(c.communicate(timeout=90)[0] == "200" for c in clients)

    # The answers wait for what the test does to the node, however long it
    # takes to land on a busy machine.
    clients, release, node, _ = waiting_clients(8)
    lab.xlb_cmd("ha", "role", "backup", node=node, check=True)
    wait_for(lambda: NODES[node] not in nexthops(lab), 30, f"{node}'s route goes")
    assert answered(clients, release) == 8
    lab.xlb_cmd("ha", "role", "active", node=node, check=True)
    wait_for(lambda: NODES[node] in nexthops(lab), 30, f"{node}'s route comes back")

    clients, release, node, held = waiting_clients(8)
    lab.xlb_cmd("down", node=node, check=True)
    assert not lab.xdp_attached(node)
    assert answered(clients, release) == 8 - held
