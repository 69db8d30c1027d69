"""The fast path and the flow tables end to end in the lab (prefix xlbf): real
clients on both sides of the balancer, real servers, XDP on veth."""

from __future__ import annotations

import json
import os
import signal

import pytest

from labctl import HERE, PY, VIP, WAS, running_lab, wait_for

pytestmark = [pytest.mark.lab,
              pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")]

BACKENDS = ("--backend", f"{WAS['WAS1']}:8080", "--backend", f"{WAS['WAS2']}:8080")
REMOTE = "remote"        # 198.51.100.10, routed to the VIP through fwex


@pytest.fixture(scope="module")
def lab():
    with running_lab("xlbf") as lab:
        yield lab


def reasons(lab) -> dict[str, int]:
    return {k: v["packets"] for k, v in lab.status()["reasons"].items()}


def delta(after: dict, before: dict) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def active(status: dict) -> int:
    return sum(s["active_flows"] for p in status["pools"] for s in p["servers"])


@pytest.mark.parametrize("forwarding, forward, reply", [
    ("fast", "forward_redirect", "reply_redirect"),
    ("kernel", "forward", "reply"),
])
def test_http_and_udp_from_both_clients(lab, forwarding, forward, reply):
    with lab.xlb("--vip", f"{VIP}:80", "--vip", f"{VIP}:80/udp", *BACKENDS,
                 "--forwarding", forwarding) as x:
        assert lab.status()["forwarding"] == forwarding
        before = reasons(lab)
        for node in ("client", REMOTE):
            http = lab.client(node, "http", VIP, "80", "--count", "20")
            assert http["errors"] == [] and sorted(set(http["names"])) == ["WAS1", "WAS2"]
            udp = lab.client(node, "udp", VIP, "80", "--count", "10")
            assert udp["errors"] == [] and len(udp["replies"]) == 10
            assert {(src, sport) for _, src, sport, _ in udp["replies"]} == {(VIP, 80)}
            # 3,000 bytes each way: fragments, the answer's as the query's.
            big = lab.client(node, "udp", VIP, "80", "--count", "4", "--size", "3000")
            assert big["errors"] == [] and len(big["replies"]) == 4
            assert {(src, sport, size) for _, src, sport, size in big["replies"]} == \
                {(VIP, 80, 3000)}
        moved = delta(reasons(lab), before)
        # Each TCP connection is at least SYN, ACK, request, FIN, ACK in, and as many out;
        # a few may wait for the kernel to resolve a neighbour first.
        assert moved.get(forward, 0) >= 0.9 * (2 * 20 * 5 + 2 * 10)
        assert moved.get(reply, 0) >= 0.9 * (2 * 20 * 4 + 2 * 10)
        assert not {k for k in moved if k.startswith(("drop_", "fib_no_route", "ttl_"))}
        if forwarding == "kernel":
            assert not {k for k in moved if k.endswith(("_tx", "_redirect"))}
    assert "veth peer" not in x.stderr       # the lab's switch ports run XDP


@pytest.mark.parametrize("eth0", ["native", "generic"])
def test_servers_behind_a_bridge_on_the_balancer_are_served(lab, eth0):
    """lb's link to the servers a port of a bridge that holds its address, as
    on a router whose LAN is a bridge: xlb attaches to the port natively and to
    the bridge generically. A native program cannot send into a bridge (every
    connection timed out, counted forward_redirect): the kernel forwards what
    goes out of it, and both clients are served, the replies still by the fast
    path. Where the clients' link runs the program generically (its MTU too
    large for native XDP on a veth), it sends skbs, which a bridge takes: the
    forwards go by the fast path, and the replies, which a native program
    cannot know that link takes, by the kernel."""
    lab.run("lb", "ip", "addr", "del", "10.1.11.1/24", "dev", "eth1", check=True)
    lab.run("lb", "ip", "link", "add", "br0", "type", "bridge", check=True)
    if eth0 == "generic":       # its peer's XDP program would cap the MTU
        lab.run("sw", "ip", "link", "set", "lb-eth0", "xdp", "off", check=True)
        lab.run("sw", "ip", "link", "set", "lb-eth0", "mtu", "9000", check=True)
        lab.run("lb", "ip", "link", "set", "eth0", "mtu", "9000", check=True)
    try:
        lab.run("lb", "ip", "link", "set", "br0", "type", "bridge", "stp_state", "0",
                "forward_delay", "0", check=True)
        lab.run("lb", "ip", "link", "set", "eth1", "master", "br0", check=True)
        lab.run("lb", "ip", "link", "set", "br0", "up", check=True)
        lab.run("lb", "ip", "addr", "add", "10.1.11.1/24", "dev", "br0", check=True)
        with lab.xlb("--vip", f"{VIP}:80", *BACKENDS) as x:
            assert "br0 (generic)" in x.serving_line and "eth1 (native)" in x.serving_line
            assert f"eth0 ({eth0})" in x.serving_line
            before = reasons(lab)
            for node in ("client", REMOTE):
                http = lab.client(node, "http", VIP, "80", "--count", "4")
                assert http["errors"] == [] and sorted(set(http["names"])) == ["WAS1", "WAS2"]
            moved = delta(reasons(lab), before)
            # Each connection is at least 5 packets in and 4 out; a few may wait for
            # the kernel to resolve a neighbour first.
            forward, reply = ("forward", "reply_redirect") if eth0 == "native" else \
                ("forward_redirect", "reply")
            assert moved.get(forward, 0) >= 0.9 * 2 * 4 * 5, moved
            assert moved.get(reply, 0) >= 0.9 * 2 * 4 * 4, moved
            assert eth0 == "generic" or "forward_redirect" not in moved
    finally:
        if eth0 == "generic":
            lab.run("lb", "ip", "link", "set", "eth0", "mtu", "1500", check=True)
            lab.run("sw", "ip", "link", "set", "lb-eth0", "mtu", "1500", check=True)
            lab.run("sw", PY, str(HERE / "xdp_pass.py"), "lb-eth0", check=True)
        lab.run("lb", "ip", "link", "del", "br0", check=True)
        lab.run("lb", "ip", "addr", "add", "10.1.11.1/24", "dev", "eth1", check=True)


def test_a_veth_peer_without_xdp_is_warned_about(lab):
    """The switch port facing lb's eth1 loses its XDP program: xlb says what
    will be lost and where to attach one."""
    lab.run("sw", "ip", "link", "set", "lb-eth1", "xdp", "off", check=True)
    try:
        with lab.xlb("--vip", f"{VIP}:80", *BACKENDS) as x:
            pass
    finally:
        lab.run("sw", PY, str(HERE / "xdp_pass.py"), "lb-eth1", check=True)
    warnings = [line for line in x.stderr.splitlines() if "veth peer" in line]
    assert len(warnings) == 1, x.stderr
    (line,) = warnings
    assert "level=warning" in line and "interface=eth1" in line and "lb-eth1" in line
    assert "fast-path packets" in line


def test_an_apply_that_attaches_such_a_veth_says_so_itself(lab, tmp_path):
    """The warnings of the links an apply attaches are in `xlb apply`'s own
    output, not only in the log of an instance that runs under systemd."""
    config = tmp_path / "xlb.toml"
    config.write_text((HERE / "seed.toml").read_text().replace(
        'pool = "was"\n', 'pool = "was"\ninterfaces = ["eth0", "eth1"]\n'))
    lab.run("sw", "ip", "link", "set", "lb-eth1", "xdp", "off", check=True)
    try:
        with lab.xlb("--vip", f"{VIP}:80", *BACKENDS, "--iface", "eth0"):
            r = lab.xlb_cmd("apply", str(config))
    finally:
        lab.run("sw", PY, str(HERE / "xdp_pass.py"), "lb-eth1", check=True)
    assert r.returncode == 0 and "; attached to eth1" in r.stdout, (r.stdout, r.stderr)
    assert [line for line in r.stderr.splitlines() if "veth peer" in line] == [
        "xlb: warning: eth1: its veth peer lb-eth1 runs no XDP program, so the answers for "
        "VIPs (ARP, ping, fragmentation needed) and fast-path packets that xlb sends out of "
        "eth1 are lost; attach one to lb-eth1 (one that passes everything will do)"]


def test_a_veth_pair_xlb_attaches_both_ends_of_is_not_warned_about(lab):
    """Both ends of a veth pair in lb, both up: xlb attaches to each, so each
    end's peer runs its program, and nothing it sends there is lost."""
    lab.run("lb", "ip", "link", "add", "vt0", "type", "veth", "peer", "name", "vt1", check=True)
    try:
        for end in ("vt0", "vt1"):
            lab.run("lb", "ip", "link", "set", end, "up", check=True)
        with lab.xlb("--vip", f"{VIP}:80", *BACKENDS) as x:
            attached = {i["name"] for i in lab.status()["interfaces"]}
    finally:
        lab.run("lb", "ip", "link", "del", "vt0", check=True)
    assert {"vt0", "vt1"} <= attached
    assert "veth peer" not in x.stderr, x.stderr


def test_a_veth_whose_peer_in_lb_is_down_is_warned_about_only_where_named(lab):
    """One end of a veth pair in lb is up at the start, its peer down: where
    no link is named, xlb attaches the peer as it is set up, so nothing is
    lost and nothing is warned of (it told that what it sent out of the first
    end was lost, then attached the peer); where the links are named and the
    peer is not, what it sends there will be lost once the peer is up: warned."""
    lab.run("lb", "ip", "link", "add", "vt0", "type", "veth", "peer", "name", "vt1", check=True)
    try:
        lab.run("lb", "ip", "link", "set", "vt0", "up", check=True)
        with lab.xlb("--vip", f"{VIP}:80", *BACKENDS) as unnamed:
            lab.run("lb", "ip", "link", "set", "vt1", "up", check=True)
            wait_for(lambda: {("vt0", "up"), ("vt1", "up")} <= {
                (i["name"], i["state"]) for i in lab.status()["interfaces"]}, 20,
                "both ends attached")
        lab.run("lb", "ip", "link", "set", "vt1", "down", check=True)
        with lab.xlb("--vip", f"{VIP}:80", *BACKENDS, "--iface", "eth0", "--iface", "eth1",
                     "--iface", "vt0") as named:
            pass
    finally:
        lab.run("lb", "ip", "link", "del", "vt0", check=True)
    assert "veth peer" not in unnamed.stderr, unnamed.stderr
    (warning,) = [line for line in named.stderr.splitlines() if "veth peer" in line]
    assert "interface=vt0" in warning and "peer vt1" in warning


def test_active_counts_open_connections_and_returns_to_zero(lab):
    with lab.xlb("--vip", f"{VIP}:80", *BACKENDS):
        held = [lab.hold("--count", "3", "--step")[0] for _ in range(4)]
        st = lab.status()
        assert active(st) == 4
        assert st["flows"]["established"] == 4
        for proc in held:
            rest = [json.loads(line)
                    for line in proc.communicate("\n" * 2, timeout=30)[0].splitlines()]
            assert all("name" in r for r in rest), rest
        wait_for(lambda: active(lab.status()) == 0, 30, "ACTIVE back to 0")
        st = lab.status()
        assert active(st) == 0
        assert st["flows"]["established"] == 0 and st["flows"]["closing"] >= 4


def test_an_idle_connection_expires_after_its_timeout(lab, tmp_path):
    """timeout_established = 2: a keep-alive connection left idle is gone from
    the table (ACTIVE 0, counted expired) once the sweep finds it past its
    timeout, not the default 900 s; its next request is a new flow to the
    only server, which still knows the connection, so it is answered."""
    config = tmp_path / "xlb.toml"
    config.write_text(f'[servers.was1]\naddress = "{WAS["WAS1"]}"\nport = 8080\n\n'
                      f'[pools.web]\nservers = ["was1"]\n\n'
                      f'[frontends.www]\nvip = "{VIP}"\nport = 80\npool = "web"\n'
                      f'timeout_established = 2\n')
    with lab.xlb("--config", str(config)):
        proc, _ = lab.hold("--count", "2", "--step")
        st = lab.status()
        assert active(st) == 1 and st["frontends"][0]["new_flows"] == 1
        wait_for(lambda: active(lab.status()) == 0, 60, "the idle connection expires")
        rest = [json.loads(line) for line in proc.communicate("\n", timeout=30)[0].splitlines()]
        assert [(r["i"], r.get("name")) for r in rest] == [(1, "WAS1")], rest
        st = lab.status()
        assert st["frontends"][0]["new_flows"] == 2    # balanced anew
        assert st["flows"]["removed"]["expired"] >= 1


@pytest.mark.parametrize("forwarding", ["fast", "kernel"])
def test_path_mtu_discovery_and_ping_through_xlb(lab, forwarding):
    """lb's link to the backends gets MTU 1000 while the backends keep 1500 (so
    they offer MSS 1460): a client's large request does not fit, xlb tells the
    client "fragmentation needed" about the packet it sent to the VIP (in
    either forwarding mode: the kernel's would quote the packet to the
    backend), the client's kernel lowers its path MTU to the VIP and resends
    in smaller segments, and the request is answered."""
    lab.run("lb", "ip", "link", "set", "eth1", "mtu", "1000", check=True)
    try:
        with lab.xlb("--vip", f"{VIP}:80", *BACKENDS, "--forwarding", forwarding):
            before = reasons(lab)
            ping = lab.run("client", "ping", "-c", "2", "-W", "2", VIP)
            assert ping.returncode == 0, ping.stdout + ping.stderr
            big = lab.run("client", "curl", "-sS", "--max-time", "15",
                          "-H", "X-Pad: " + "x" * 3000, f"http://{VIP}/")
            assert big.returncode == 0 and big.stdout.strip() in ("WAS1", "WAS2"), big.stderr
            moved = delta(reasons(lab), before)
            assert moved.get("icmp_echo_reply") == 2
            assert moved.get("icmp_too_big", 0) >= 1
            route = lab.run("client", "ip", "route", "get", VIP).stdout
            assert "mtu 1000" in route, route
    finally:
        lab.run("lb", "ip", "link", "set", "eth1", "mtu", "1500", check=True)
        lab.run("client", "ip", "route", "flush", "cache")


def test_a_large_ping_of_the_vip_is_answered_over_a_narrower_way_back(lab):
    """fwex sends remote's traffic on by a route of MTU 1000, which remote's
    requests do not take: ping's 1,428-byte requests (DF set, as iputils
    sends them) reach the VIP whole, and the replies, without DF as a Linux
    host sends them, are fragmented by fwex. With DF, fwex's "fragmentation
    needed" went to the VIP about no flow, and no reply came back."""
    lab.run("fwex", "ip", "route", "replace", "198.51.100.10", "dev", "eth1",
            "mtu", "lock", "1000", check=True)
    try:
        with lab.xlb("--vip", f"{VIP}:80", *BACKENDS):
            for dst in (WAS["WAS1"], VIP):      # a server's Linux, then xlb
                ping = lab.run(REMOTE, "ping", "-c", "2", "-W", "2", "-s", "1400", dst)
                assert ping.returncode == 0, ping.stdout + ping.stderr
    finally:
        lab.run("fwex", "ip", "route", "del", "198.51.100.10", "dev", "eth1", check=True)


@pytest.mark.parametrize("forwarding", ["fast", "kernel"])
def test_a_probe_whose_ttl_runs_out_at_xlb_is_answered_as_by_a_router(lab, forwarding):
    """A TCP connect to the VIP with TTL 1, as `traceroute -T` sends: lb's
    kernel answers "time exceeded" from its own address about the packet the
    client sent, so the client's kernel matches it to the connection (the
    kernel's answer about the rewritten packet would be lost, and traceroute
    would show no hop); with TTL 2 the connection is made. A port that no
    frontend has shows the same hop (traceroute's UDP probes go to such)."""
    with lab.xlb("--vip", f"{VIP}:80", *BACKENDS, "--forwarding", forwarding):
        before = reasons(lab)
        for port in ("80", "22"):
            probe = lab.client("client", "hop", VIP, port, "--ttl", "1", "--timeout", "5")
            assert probe.get("icmp") == [11, 0] and probe.get("from") == "10.1.1.1", probe
        assert delta(reasons(lab), before).get("ttl_expired") == 2
        assert lab.client("client", "hop", VIP, "80", "--ttl", "2") == {"connected": True}


# What the servers' firewalls send the client instead of an answer.
REJECT = """table inet xlbrej {
	chain input {
		type filter hook input priority filter; policy accept;
		ip saddr 10.1.1.10 tcp dport 8080 reject with icmp admin-prohibited
	}
}
"""


@pytest.mark.parametrize("forwarding", ["fast", "kernel"])
def test_the_readmes_firewall_on_the_balancer_serves_both_clients(lab, forwarding, tmp_path):
    """lb-firewall.nft (forward policy drop; balanced packets untracked, by
    address) on lb, its neighbour table flushed so that the fast path's first
    packets go through the kernel too: both clients are served, the rules saw
    balanced packets, and a forward they do not allow is dropped. The ICMP
    errors about balanced packets that xlb rewrites and hands to the kernel
    get through too: a server's large replies reach the remote client over
    fwex's narrower link (its "fragmentation needed" to the VIP goes on to the
    server: without it, the download stalled), and a server's own "prohibited"
    reaches the client at once (without it, the client waited out its timeout)."""
    ruleset = HERE / "lb-firewall.nft"
    assert ruleset.read_text() in (HERE.parent / "README.md").read_text()
    reject = tmp_path / "reject.nft"
    reject.write_text(REJECT)
    lab.run("lb", "nft", "-f", str(ruleset), check=True)
    lab.run("fwex", "ip", "link", "set", "eth1", "mtu", "1000", check=True)
    try:
        lab.run("lb", "ip", "neigh", "flush", "all", check=True)
        with lab.xlb("--vip", f"{VIP}:80", *BACKENDS, "--forwarding", forwarding):
            for node in ("client", REMOTE):
                http = lab.client(node, "http", VIP, "80", "--count", "4")
                assert http["errors"] == [] and sorted(set(http["names"])) == ["WAS1", "WAS2"]
            big = lab.run(REMOTE, "curl", "-sS", "--max-time", "10", "-o", "/dev/null",
                          "-w", "%{size_download}", f"http://{VIP}/pad/100000")
            assert big.stdout == "100000", big.stderr
            for was in ("was1", "was2"):
                lab.run(was, "nft", "-f", str(reject), check=True)
            refused = lab.run("client", "curl", "-sS", "--max-time", "3", f"http://{VIP}/")
            assert refused.returncode == 7, refused.stderr      # not 28: timed out
        chain = json.loads(lab.run("lb", "nft", "-j", "list", "chain", "inet", "lbfw", "forward",
                                   check=True).stdout)["nftables"]
        untracked = [e["counter"]["packets"] for r in chain if "rule" in r
                     for e in r["rule"]["expr"] if "counter" in e]
        assert untracked and untracked[0] > 0
        closed_port = lab.run("client", "curl", "-sS", "--max-time", "2",
                              f"http://{WAS['WAS1']}:8081/")
        assert closed_port.returncode == 28, closed_port.stderr    # dropped, not refused
    finally:
        lab.run("lb", "nft", "delete", "table", "inet", "lbfw", check=True)
        lab.run("fwex", "ip", "link", "set", "eth1", "mtu", "1500", check=True)
        for node in ("was1", "was2"):
            lab.run(node, "nft", "delete", "table", "inet", "xlbrej")
            lab.run(node, "ip", "route", "flush", "cache")     # the path MTU it learnt


# Any rule that uses conntrack has lb's kernel reassemble what it forwards.
CONNTRACK = """table inet xlbct {
	chain forward {
		type filter hook forward priority filter; policy accept;
		ct state invalid counter
	}
}
"""


@pytest.mark.parametrize("forwarding", ["fast", "kernel"])
def test_fragments_get_through_a_balancer_whose_kernel_reassembles(lab, forwarding, tmp_path):
    """With conntrack on lb, its kernel holds the fragments it forwards until
    it has the whole datagram: the later fragments, which carry no ports,
    must go the way the first went, or it holds them for a first that the
    fast path sent on. 3,000 bytes each way."""
    rules = tmp_path / "conntrack.nft"
    rules.write_text(CONNTRACK)
    lab.run("lb", "nft", "-f", str(rules), check=True)
    try:
        with lab.xlb("--vip", f"{VIP}:80/udp", *BACKENDS, "--forwarding", forwarding):
            for node in ("client", REMOTE):
                big = lab.client(node, "udp", VIP, "80", "--count", "4", "--size", "3000",
                                 "--timeout", "1")
                assert big["errors"] == [] and len(big["replies"]) == 4
    finally:
        lab.run("lb", "nft", "delete", "table", "inet", "xlbct", check=True)


def test_a_server_whose_mac_changed_is_reached_again_with_no_check(lab):
    """A server's MAC changes (its NIC or VM replaced, `ip link set address`)
    and no health check runs: xlb up has the kernel check the stale
    neighbour entries the fast path sends to, as it checks those it sends to
    itself; it probes the server's, finds it dead and resolves the new MAC.
    Nothing the fast path sends does that: the entry stayed stale with the
    old MAC, and every connection to that server was lost for good."""
    mac = lab.mac("was1", "eth0")
    with lab.xlb("--vip", f"{VIP}:80", *BACKENDS, "--check", "none"):
        http = lab.client("client", "http", VIP, "80", "--count", "2")
        assert http["errors"] == [] and sorted(http["names"]) == ["WAS1", "WAS2"]
        lab.run("was1", "ip", "link", "set", "eth0", "address", "02:00:00:00:0a:01", check=True)
        try:
            # Stale, as the fast path leaves every entry once its reachable
            # time is over (nothing it sends confirms one); a reachable one is
            # used up to 45 s more, as the kernel's forwarding uses it.
            lab.run("lb", "ip", "neigh", "change", WAS["WAS1"], "dev", "eth1", "lladdr", mac,
                    "nud", "stale", check=True)
            wait_for(lambda: "WAS1" in lab.client("client", "http", VIP, "80", "--count", "2",
                                                  "--timeout", "1")["names"],
                     30, "WAS1 answering at its new MAC")
        finally:
            lab.run("was1", "ip", "link", "set", "eth0", "address", mac, check=True)
            lab.run("lb", "ip", "neigh", "flush", "dev", "eth1", check=True)


def test_a_port_the_vip_does_not_serve_is_dropped_not_routed(lab):
    """VIP:443, no service: xlb drops it, from either client. Passed, lb's
    kernel (which does not own the VIP) would ARP for the VIP on the client
    link, and answer "host unreachable" seconds later."""
    with lab.xlb("--vip", f"{VIP}:80", *BACKENDS):
        before = reasons(lab)
        for node in ("client", REMOTE):
            probe = lab.run(node, "curl", "-sS", "--max-time", "2", f"http://{VIP}:443/")
            assert probe.returncode == 28, probe.stderr        # no answer at all
        assert delta(reasons(lab), before).get("drop_no_service", 0) >= 2
        assert lab.run("lb", "ip", "neigh", "show", VIP, check=True).stdout == ""


def evict_replies(program_id: int) -> int:
    """Deletes every reply entry of the program's established table, as the
    LRU evicts entries when the table is full; returns how many."""
    import ctypes as ct

    from bcc.libbcc import lib
    from xlb import bpfsys, layout
    from xlb.datapath import maps_of
    prog = bpfsys.prog_fd_by_id(program_id)
    try:
        maps = maps_of(bpfsys.prog_info(prog))
    finally:
        os.close(prog)
    flows = maps["flows"][0]
    try:
        keys, nxt = [], layout.FlowKey()
        while lib.bpf_get_next_key(flows, ct.byref(keys[-1]) if keys else None,
                                   ct.byref(nxt)) == 0:
            keys.append(layout.FlowKey.from_buffer_copy(nxt))
        value, evicted = layout.Flow(), 0
        for k in keys:
            if lib.bpf_lookup_elem(flows, ct.byref(k), ct.byref(value)) == 0 and \
                    value.dir == layout.FLOW_REPLY:
                evicted += lib.bpf_delete_elem(flows, ct.byref(k)) == 0
        return evicted
    finally:
        for fd, _ in maps.values():
            os.close(fd)


def test_connections_whose_reply_entries_were_evicted_answer_after_the_sweep(lab):
    """The LRU evicts entries, not connections: 32 idle keep-alive
    connections lose their reply entries (deleted here, as evictions would
    go), the sweep puts them back, and each connection's next request is
    answered by its server. Without them, the servers' answers leave
    un-NATed and never reach the client (seen: every request timed out)."""
    with lab.xlb("--vip", f"{VIP}:80", *BACKENDS):
        holder = lab.spawn("client", PY, str(HERE / "flood.py"), "hold", VIP, "80", "32")
        try:
            ready = json.loads(holder.stdout.readline())["ready"]
            st = lab.status()
            assert st["flows"]["established"] == 32
            assert evict_replies(st["program"]["id"]) == 32
            wait_for(lambda: lab.status()["flows"]["replies_restored"] >= 32, 60,
                     "the sweep to put the reply entries back")
            assert lab.status()["flows"]["replies_restored"] == 32
            assert "flow replies restored: 32 " in lab.xlb_cmd("status", check=True).stdout
            holder.send_signal(signal.SIGUSR1)
            answers = json.loads(holder.stdout.readline())["answers"]
        finally:
            holder.kill()
            holder.wait()
        assert answers == ready


def test_the_flood_goes_on_when_the_kernel_refuses_frames_and_counts_what_left(lab):
    """A queue on the client's way out that fills (here a rate limit; in CI a
    busy CPU's backlog) refuses frames with ENOBUFS: the flood counts them
    apart and goes on, and every frame it counts as sent reaches xlb."""
    lb_mac = lab.mac("lb", "eth0")
    lab.run("client", "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", "1mbit",
            "burst", "10k", "limit", "10k", check=True)
    try:
        with lab.xlb("--vip", f"{VIP}:80", *BACKENDS):
            out = json.loads(lab.run("client", PY, str(HERE / "flood.py"), "syn", "eth0",
                                     lb_mac, VIP, "80", "--seconds", "1", check=True).stdout)
            assert out["refused"] > 0 and out["sent"] > 0
            # Every SYN another flow: at this rate the flood's sources repeat
            # no connection (its first repeat is in its 21st batch of 256).
            wait_for(lambda: lab.status()["flows"]["created"] >= out["sent"], 10,
                     "xlb to see every frame sent")
            assert lab.status()["flows"]["created"] == out["sent"]
    finally:
        lab.run("client", "tc", "qdisc", "del", "dev", "eth0", "root", check=True)


def test_a_syn_flood_costs_no_established_connection(lab):
    """32 idle keep-alive connections, then 5 s of random-source SYNs from
    one sender CPU (several times the half-open table): every connection
    still answers, and xlb counts what the flood did."""
    lb_mac = lab.mac("lb", "eth0")
    with lab.xlb("--vip", f"{VIP}:80", *BACKENDS, "--flow-table", "4096"):
        holder = lab.spawn("client", PY, str(HERE / "flood.py"), "hold", VIP, "80", "32")
        ready = json.loads(holder.stdout.readline())["ready"]
        assert sorted(set(ready)) == ["WAS1", "WAS2"] and len(ready) == 32
        assert lab.status()["flows"]["established"] == 32
        out = lab.run("client", PY, str(HERE / "flood.py"), "syn", "eth0", lb_mac, VIP, "80",
                      "--seconds", "5", check=True, timeout=60)
        sent = json.loads(out.stdout)["sent"]
        st = lab.status()
        flows = st["flows"]
        capacity = flows["tables"]["flows_new"]["capacity"]
        assert sent > 2 * capacity, f"only {sent} SYNs: the flood did not fill the table"
        assert flows["established"] == 32
        assert flows["created"] >= 0.9 * sent
        assert flows["removed"]["evicted"] > 0
        holder.send_signal(signal.SIGUSR1)
        answers = json.loads(holder.stdout.readline())["answers"]
        holder.kill()
        holder.wait()
        assert answers == ready
