"""The XDP program's flow tables and fast path, under BPF_PROG_TEST_RUN.

Runs inside a private network namespace (conftest.FibNet) so that
bpf_fib_lookup sees known routes and neighbours: ext 10.1.1.0/24 (clients),
int 10.1.11.0/24 (backends). Frames go in, exact bytes come out; the flow
tables are read back through Datapath to check each connection's state.
"""

import contextlib
import random
import socket
import struct
import threading
import time
from dataclasses import replace
from ipaddress import IPv4Address

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_EOL, IPOption_NOP
from scapy.layers.l2 import Ether
from scapy.packet import Raw, raw

from packets import (BACKEND_MAC, CLIENT_MAC, LB_MAC, XDP_DROP, XDP_PASS, XDP_TX, Harness,
                     assert_checksums, ip_id_for_zero_checksum, ip_of, l4_segment, ones_sum,
                     priority_tagged, pseudo_header, tcp_frame, udp_frame, untagged,
                     word_for_zero_checksum)
from xlb import flowtable, layout
from xlb.datapath import filter_slot
from xlb.maglev import flow_hash, source_hash

pytestmark = pytest.mark.kernel

XDP_REDIRECT = layout.XDP_ACTIONS["XDP_REDIRECT"]
TCP_P, UDP_P = socket.IPPROTO_TCP, socket.IPPROTO_UDP
VIP = IPv4Address("10.1.1.101")
MVIP = IPv4Address("10.1.1.102")          # the Maglev service's VIP
VIP2 = IPv4Address("10.1.1.103")          # a second VIP on backend 1 (second_vip)
CLIENT = IPv4Address("10.1.1.10")
BACKENDS = {1: (IPv4Address("10.1.11.101"), 8080), 2: (IPv4Address("10.1.11.102"), 8080)}
BY_ADDR = {addr: bid for bid, (addr, _) in BACKENDS.items()}
SVC_TCP, SVC_UDP, SVC_MAGLEV, SVC_UDP2 = 1, 2, 3, 4
TIMEOUTS = {"syn": 60, "established": 900, "closing": 120, "udp": 300}
MAGLEV_TABLE = 0
MAGLEV_SLOTS = [1, 2, 2, 1, 1, 2, 1, 2, 2, 1, 2, 1, 1]    # a prime number of slots: 13
STATE = layout.FLOW_STATES
SEC = 1_000_000_000


@pytest.fixture(scope="module")
def lb(datapath, fibnet):
    dp = datapath
    for bid, (addr, port) in BACKENDS.items():
        dp.set_backend(bid, addr, port)
    dp.write_ring(2, [1, 2])
    dp.write_ring(4, [1, 2])
    dp.write_maglev(MAGLEV_TABLE, MAGLEV_SLOTS)
    dp.set_service(VIP, 80, TCP_P, SVC_TCP, 2, 2)
    dp.set_service(VIP, 80, UDP_P, SVC_UDP, 4, 2)
    dp.set_service(MVIP, 80, TCP_P, SVC_MAGLEV, MAGLEV_TABLE, len(MAGLEV_SLOTS),
                   layout.SERVICE_MAGLEV)
    for sid in (SVC_TCP, SVC_UDP, SVC_MAGLEV):
        dp.set_timeouts(sid, *TIMEOUTS.values())
    for vip in (VIP, MVIP):
        dp.set_vip(vip)
    dp.set_forwarding(True)
    fibnet.as_native(dp)
    return Harness(dp, service_ids=(SVC_TCP, SVC_UDP, SVC_MAGLEV, SVC_UDP2), backend_ids=BACKENDS)


def flow_rows(dp) -> dict[str, list]:
    """Every entry of both flow tables, decoded."""
    return {name: flowtable.decode(*dump) for name, dump in dp.flow_dumps().items()}


def entries(dp, table: str) -> dict[tuple, object]:
    """A flow table as {(saddr, daddr, sport, dport, proto): row}, addresses as
    IPv4Address and ports as numbers."""
    out = {}
    for r in flow_rows(dp)[table]:
        key = (IPv4Address(r.saddr.to_bytes(4, "little")), IPv4Address(r.daddr.to_bytes(4, "little")),
               socket.ntohs(r.sport), socket.ntohs(r.dport), r.proto)
        out[key] = r
    return out


def as_dumped(rows: list) -> tuple[bytes, bytes]:
    """Rows as Datapath.flow_dumps reads them: their keys, their values."""
    value, at = struct.Struct(layout.struct_format(layout.Flow)), flowtable.Row._fields.index("addr")
    return b"".join(r.key() for r in rows), b"".join(value.pack(*r[at:]) for r in rows)


def map_key(t, key):
    """The flow table t's key for (saddr, daddr, sport, dport, proto) as `entries` gives it."""
    return t.Key(*[int.from_bytes(v.packed, "little") if isinstance(v, IPv4Address) else
                   socket.htons(v) if i in (2, 3) else v for i, v in enumerate(key)])


def connection(dp, sport: int, proto: int = TCP_P, vip=VIP):
    """(table, forward row, reply row) of the client's connection from sport."""
    for table in ("flows", "flows_new"):
        rows = entries(dp, table)
        fwd = rows.get((CLIENT, vip, sport, 80, proto))
        if fwd is not None:
            be = BACKENDS[fwd.backend_id]
            return table, fwd, rows.get((be[0], CLIENT, be[1], sport, proto))
    return None, None, None


def on_a_vips_bit(vip: IPv4Address) -> IPv4Address:
    """A client address (of 100.64.0.0/16) that the VIP filter takes for
    vip's: it falls on the same bit."""
    slot = filter_slot(int.from_bytes(vip.packed, "little"))
    return next(a for a in (IPv4Address("100.64.0.0") + i for i in range(1, 1 << 16))
                if filter_slot(int.from_bytes(a.packed, "little")) == slot)


ON_A_VIPS_BIT = on_a_vips_bit(VIP)


def counters(dp) -> dict[str, int]:
    c = dp.flow_counters()
    return {name: getattr(c, name) for name, _ in c._fields_}


def syn(sport, **kw):
    return tcp_frame(CLIENT, VIP, sport, 80, flags="S", **kw)


def from_backend(bid, sport, flags, **kw):
    addr, port = BACKENDS[bid]
    return tcp_frame(addr, CLIENT, port, sport, flags=flags, eth_src=BACKEND_MAC, **kw)


def backend_of(frame: bytes) -> int:
    return BY_ADDR[ip_of(frame, "dst")]


def handshake(lb, fibnet, sport) -> int:
    """SYN, SYN-ACK, ACK of a new connection; returns its backend."""
    bid = backend_of(lb.send(syn(sport), fibnet.ifindex["ext"]).data)
    lb.send(from_backend(bid, sport, "SA"), fibnet.ifindex["int"])
    lb.send(tcp_frame(CLIENT, VIP, sport, 80, flags="A"), fibnet.ifindex["ext"])
    return bid


def one_backend(limits, fibnet):
    """A Datapath of its own with these limits: the TCP service on VIP:80 with
    backend 1 alone, fast path on, out of fibnet's links."""
    from xlb.datapath import Datapath

    dp = Datapath(limits)
    be_addr, be_port = BACKENDS[1]
    dp.set_backend(1, be_addr, be_port)
    dp.write_ring(2, [1])
    dp.set_service(VIP, 80, TCP_P, SVC_TCP, 2, 1)
    dp.set_vip(VIP)
    dp.set_forwarding(True)
    fibnet.as_native(dp)
    return dp


# The fast path --------------------------------------------------------------------

def test_forward_is_redirected_to_the_backends_link_with_next_hop_macs(lb, fibnet):
    res = lb.send(syn(50000), fibnet.ifindex["ext"])
    assert res.action == XDP_REDIRECT
    bid = backend_of(res.data)
    be_addr, be_port = BACKENDS[bid]
    # NAT, TTL 64 -> 63, the int link's MAC as source, the backend's as destination.
    assert res.data == tcp_frame(CLIENT, be_addr, 50000, be_port, flags="S", ttl=63,
                                 eth_src=fibnet.MACS["int"], eth_dst=BACKEND_MAC)
    assert_checksums(res.data)
    lb.expect("forward_redirect", flow=("in", SVC_TCP, bid, True))

    res = lb.send(from_backend(bid, 50000, "SA"), fibnet.ifindex["int"])
    assert res.action == XDP_REDIRECT
    assert res.data == tcp_frame(VIP, CLIENT, 80, 50000, flags="SA", ttl=63,
                                 eth_src=fibnet.MACS["ext"], eth_dst=CLIENT_MAC)
    assert_checksums(res.data)
    lb.expect("reply_redirect", flow=("out", SVC_TCP, bid, False))


def test_out_the_link_it_came_in_is_xdp_tx(lb, fibnet):
    res = lb.send(syn(50001), fibnet.ifindex["int"])
    assert res.action == XDP_TX
    bid = backend_of(res.data)
    assert res.data == tcp_frame(CLIENT, BACKENDS[bid][0], 50001, 8080, flags="S", ttl=63,
                                 eth_src=fibnet.MACS["int"], eth_dst=BACKEND_MAC)
    lb.expect("forward_tx", flow=("in", SVC_TCP, bid, True))

    # A reply that comes in by the client's link leaves by it too.
    res = lb.send(from_backend(bid, 50001, "SA"), fibnet.ifindex["ext"])
    assert (res.action, res.data) == (XDP_TX, tcp_frame(VIP, CLIENT, 80, 50001, flags="SA", ttl=63,
                                                        eth_src=fibnet.MACS["ext"],
                                                        eth_dst=CLIENT_MAC))
    lb.expect("reply_tx", flow=("out", SVC_TCP, bid, False))


def test_checksums_that_compute_to_zero_are_sent_as_zero(lb, fibnet):
    """The incremental updates (csum.h: NAT, then TTL - 1) give 0x0000 where
    the sum makes it, as a checksum computed anew does; 0xffff is UDP's
    alone. A TCP segment with options, its TCP checksum and its IP header
    checksum as forwarded both 0."""
    sport = 50002
    bid = backend_of(lb.send(syn(sport), fibnet.ifindex["ext"]).data)
    be_addr, be_port = BACKENDS[bid]

    def data(dst, dport, payload, **kw):
        return tcp_frame(CLIENT, dst, sport, dport, flags="PA", payload=payload,
                         options=[("NOP", None), ("NOP", None), ("Timestamp", (7, 9))], **kw)
    base = b"0123456789"
    payload = base + word_for_zero_checksum(data(be_addr, be_port, base + b"\0\0"))
    ip_id = ip_id_for_zero_checksum(data(be_addr, be_port, payload, ttl=63))
    want = data(be_addr, be_port, payload, id=ip_id, ttl=63, eth_src=fibnet.MACS["int"],
                eth_dst=BACKEND_MAC)
    assert want[24:26] == want[50:52] == b"\0\0"          # IP, TCP checksums: scapy agrees
    frame = data(VIP, 80, payload, id=ip_id)
    assert b"\0\0" not in (frame[24:26], frame[50:52])
    res = lb.send(frame, fibnet.ifindex["ext"])
    assert (res.action, res.data) == (XDP_REDIRECT, want)
    lb.expect("forward_redirect", flow=("in", SVC_TCP, bid, False))


@pytest.mark.parametrize("client, ifname, reason", [
    ("198.51.100.10", "ext", "fib_no_neigh"),   # the reply's next hop 10.1.1.2 is unresolved
    ("203.0.113.10", "ext", "fib_no_route"),    # blackholed
    ("192.0.2.130", "ext", "fib_no_route"),     # unreachable
    ("192.0.2.194", "ext", "fib_no_route"),     # prohibited
    ("192.0.2.10", "ext", "fib_no_route"),      # no route at all
    ("10.1.1.10", "nofwd", "fib_fwd_disabled"),
])
def test_what_the_fib_cannot_resolve_goes_to_the_kernel_rewritten_only(lb, fibnet, client, ifname,
                                                                       reason):
    """The kernel gets the packet NATed and otherwise as it came (MACs, TTL):
    it routes it, resolves the neighbour or answers with ICMP, as it would
    without the fast path."""
    sport = 50100
    fwd = tcp_frame(client, VIP, sport, 80, flags="S")
    res = lb.send(fwd, fibnet.ifindex[ifname])
    bid = backend_of(res.data)
    be_addr, be_port = BACKENDS[bid]
    if reason == "fib_fwd_disabled":
        assert res.action == XDP_PASS
        assert res.data == tcp_frame(client, be_addr, sport, be_port, flags="S")
        lb.expect(reason, flow=("in", SVC_TCP, bid, True))
        return
    reply = tcp_frame(be_addr, client, be_port, sport, flags="SA", eth_src=BACKEND_MAC)
    res = lb.send(reply, fibnet.ifindex["int"])
    assert res.action == XDP_PASS
    assert res.data == tcp_frame(VIP, client, 80, sport, flags="SA", eth_src=BACKEND_MAC)
    assert_checksums(res.data)
    lb.expect(reason, flow=("out", SVC_TCP, bid, False))


@contextlib.contextmanager
def forwarding(lb, mode: str):
    """The program in `mode` ("fast" or "kernel") for the block, fast after."""
    lb.dp.set_forwarding(mode == "fast")
    try:
        yield
    finally:
        lb.dp.set_forwarding(True)


@pytest.mark.parametrize("mode, client, reason", [
    ("fast", "10.1.13.50", "fib_frag_needed"),       # behind the link of MTU 1280
    ("kernel", "10.1.13.52", "reply"),
])
@pytest.mark.parametrize("header", [dict(ip_flags=0),
                                    dict(ip_flags=0, ip_options=[IPOption_NOP()] * 3
                                         + [IPOption_EOL()])],
                         ids=["no-df", "no-df-ip-options"])
def test_over_the_egress_mtu_without_df_goes_to_the_kernel_to_fragment(lb, fibnet, mode, client,
                                                                         reason, header):
    """Without DF the kernel fragments it: it gets it rewritten."""
    sport = 50200 + len(mode) + (10 if "ip_options" in header else 0)
    with forwarding(lb, mode):
        bid = backend_of(lb.send(tcp_frame(client, VIP, sport, 80, flags="S"),
                                 fibnet.ifindex["ext"]).data)
        be_addr, be_port = BACKENDS[bid]
        big = tcp_frame(be_addr, client, be_port, sport, flags="A", payload=b"x" * 1300,
                        eth_src=BACKEND_MAC, **header)
        res = lb.send(big, fibnet.ifindex["int"])
    assert res.action == XDP_PASS
    assert res.data == tcp_frame(VIP, client, 80, sport, flags="A", payload=b"x" * 1300,
                                 eth_src=BACKEND_MAC, **header)
    lb.expect(reason, flow=("out", SVC_TCP, bid, False))


def gro_partial(frame: bytes) -> bytes:
    """The TCP frame as GRO leaves an aggregate (or a local sender's GSO):
    its checksum field partial, the pseudo-header's sum, not inverted."""
    return frame[:50] + struct.pack("!H", ones_sum(pseudo_header(frame))) + frame[52:]


@pytest.mark.parametrize("mode", ["fast", "kernel"])
@pytest.mark.parametrize("way", ["forward", "reply"])
def test_an_aggregate_over_the_ingress_mtu_goes_to_the_kernel_with_its_partial_checksum(
        lb, fibnet, way, mode):
    """Generic XDP sees a GRO aggregate (or a local sender's GSO segment)
    whole: 2,954 bytes in by a link of MTU 1500. No sender sent it, so xlb
    answers no "fragmentation needed" (the sender, sending 1500 already,
    would learn nothing, and its data would be lost): the kernel, which cuts
    it into segments that fit, gets it rewritten, its partial checksum (the
    pseudo-header's sum, which the kernel completes per segment) moved by
    the addresses' change."""
    ext, int_ = fibnet.ifindex["ext"], fibnet.ifindex["int"]
    sport = 50400 + len(mode) + 10 * len(way)
    bid = handshake(lb, fibnet, sport)
    be_addr, be_port = BACKENDS[bid]
    data = bytes(range(256)) * 11 + b"x" * 84          # 2,900 bytes: two segments' worth
    if way == "forward":
        sent = tcp_frame(CLIENT, VIP, sport, 80, flags="A", payload=data)
        want = tcp_frame(CLIENT, be_addr, sport, be_port, flags="A", payload=data)
        ifindex, direction = ext, "in"
    else:
        sent = tcp_frame(be_addr, CLIENT, be_port, sport, flags="A", payload=data,
                         eth_src=BACKEND_MAC)
        want = tcp_frame(VIP, CLIENT, 80, sport, flags="A", payload=data, eth_src=BACKEND_MAC)
        ifindex, direction = int_, "out"
    with forwarding(lb, mode):
        res = lb.send(gro_partial(sent), ifindex)
    assert (res.action, res.data) == (XDP_PASS, gro_partial(want))
    lb.expect("fib_frag_needed" if mode == "fast" else way,
              flow=(direction, SVC_TCP, bid, False))


def test_kernel_forwarding_passes_rewritten_packets(lb, fibnet):
    with forwarding(lb, "kernel"):
        res = lb.send(syn(50300), fibnet.ifindex["ext"])
        assert res.action == XDP_PASS
        bid = backend_of(res.data)
        assert res.data == tcp_frame(CLIENT, BACKENDS[bid][0], 50300, 8080, flags="S")
        lb.expect("forward", flow=("in", SVC_TCP, bid, True))


@pytest.mark.parametrize("client, ifname", [
    ("198.51.100.10", "ext"),   # the reply's next hop 10.1.1.2 is unresolved
    ("203.0.113.10", "ext"),    # blackholed
    ("10.1.1.10", "nofwd"),
])
def test_kernel_forwarding_leaves_what_the_fib_cannot_resolve_to_the_kernel(lb, fibnet, client,
                                                                            ifname):
    """What the fast path counts by the FIB's reason, kernel forwarding passes
    as it passes every packet: as `forward` or `reply`, rewritten only."""
    sport = 50400 + len(ifname) + len(client)
    with forwarding(lb, "kernel"):
        res = lb.send(tcp_frame(client, VIP, sport, 80, flags="S"), fibnet.ifindex[ifname])
        bid = backend_of(res.data)
        be_addr, be_port = BACKENDS[bid]
        assert res.action == XDP_PASS
        assert res.data == tcp_frame(client, be_addr, sport, be_port, flags="S")
        lb.expect("forward", flow=("in", SVC_TCP, bid, True))
        res = lb.send(tcp_frame(be_addr, client, be_port, sport, flags="SA", eth_src=BACKEND_MAC),
                      fibnet.ifindex["int"])
    assert res.action == XDP_PASS
    assert res.data == tcp_frame(VIP, client, 80, sport, flags="SA", eth_src=BACKEND_MAC)
    lb.expect("reply", flow=("out", SVC_TCP, bid, False))


@pytest.mark.parametrize("mode", ["fast", "kernel"])
def test_a_packet_whose_ttl_runs_out_goes_to_the_kernel_as_it_came(lb, fibnet, mode):
    """TTL <= 1, either way through: the kernel gets the packet unrewritten,
    so that its "time exceeded" quotes what the sender sent (the client's to
    the VIP, the backend's to the client). The flow is kept and counted, as
    conntrack keeps one for a packet the router then drops."""
    sport = 50500 + len(mode)
    with forwarding(lb, mode):
        res = lb.send(syn(sport, ttl=1), fibnet.ifindex["ext"])
        assert (res.action, res.data) == (XDP_PASS, syn(sport, ttl=1))
        _, fwd, _ = connection(lb.dp, sport)
        bid = fwd.backend_id
        lb.expect("ttl_expired", flow=("in", SVC_TCP, bid, True))
        res = lb.send(syn(sport), fibnet.ifindex["ext"])
        assert backend_of(res.data) == bid                  # the retry: same flow, same backend
        for ttl in (1, 0):
            res = lb.send(from_backend(bid, sport, "SA", ttl=ttl), fibnet.ifindex["int"])
            assert (res.action, res.data) == (XDP_PASS, from_backend(bid, sport, "SA", ttl=ttl))
            lb.expect("ttl_expired", flow=("out", SVC_TCP, bid, False))


# Connection states ---------------------------------------------------------------------

def test_a_connection_moves_to_the_established_table_when_the_handshake_completes(lb, fibnet):
    dp, ext, int_ = lb.dp, fibnet.ifindex["ext"], fibnet.ifindex["int"]
    before = counters(dp)
    bid = backend_of(lb.send(syn(51000), ext).data)
    table, fwd, rep = connection(dp, 51000)
    assert table == "flows_new"
    assert (fwd.state, fwd.timeout, rep.state, rep.timeout) == (STATE["new"], 60, STATE["new"], 60)

    lb.send(syn(51000), ext)                                 # a retransmitted SYN
    assert backend_of(lb.send(syn(51000), ext).data) == bid  # keeps its backend
    lb.send(from_backend(bid, 51000, "SA"), int_)
    table, fwd, rep = connection(dp, 51000)
    # The reply entry's first packet marks both: the client's next one asks its own entry only.
    assert table == "flows_new" and (fwd.state, rep.state) == (STATE["answered"], STATE["answered"])

    res = lb.send(tcp_frame(CLIENT, VIP, 51000, 80, flags="A"), ext)
    assert res.action == XDP_REDIRECT and backend_of(res.data) == bid
    table, fwd, rep = connection(dp, 51000)
    assert table == "flows"
    assert (fwd.state, fwd.timeout, rep.state, rep.timeout) == \
        (STATE["established"], 900, STATE["established"], 900)
    # Both entries left the half-open table (`connection` looks in flows first).
    be_addr, be_port = BACKENDS[bid]
    half_open = entries(dp, "flows_new")
    assert (CLIENT, VIP, 51000, 80, TCP_P) not in half_open
    assert (be_addr, CLIENT, be_port, 51000, TCP_P) not in half_open
    after = counters(dp)
    assert after["created"] - before["created"] == 1
    assert after["established"] - before["established"] == 1

    # Data both ways keep going through the established table.
    res = lb.send(tcp_frame(CLIENT, VIP, 51000, 80, flags="PA", payload=b"GET /"), ext)
    assert backend_of(res.data) == bid
    lb.expect("forward_redirect", flow=("in", SVC_TCP, bid, False))
    res = lb.send(from_backend(bid, 51000, "PA", payload=b"200 OK"), int_)
    assert ip_of(res.data, "src") == VIP
    lb.expect("reply_redirect", flow=("out", SVC_TCP, bid, False))


def test_a_client_that_never_hears_the_backend_stays_half_open(lb, fibnet):
    """A spoofed source sends its SYN and then data blindly: the backend's answer
    went elsewhere, so the flow never reaches the established table."""
    ext = fibnet.ifindex["ext"]
    lb.send(syn(51100), ext)
    for _ in range(3):
        lb.send(tcp_frame(CLIENT, VIP, 51100, 80, flags="A"), ext)
    table, fwd, rep = connection(lb.dp, 51100)
    assert table == "flows_new" and fwd.state == STATE["new"]


@pytest.mark.parametrize("closer", ["client", "backend"])
@pytest.mark.parametrize("flag", ["F", "R"])
def test_fin_or_rst_either_way_closes_both_entries(lb, fibnet, closer, flag):
    sport = 51200 + (closer == "backend") * 10 + (flag == "R")
    bid = handshake(lb, fibnet, sport)
    if closer == "client":
        lb.send(tcp_frame(CLIENT, VIP, sport, 80, flags=flag + "A"), fibnet.ifindex["ext"])
    else:
        lb.send(from_backend(bid, sport, flag + "A"), fibnet.ifindex["int"])
    table, fwd, rep = connection(lb.dp, sport)
    assert table == "flows"
    assert (fwd.state, fwd.timeout, rep.state, rep.timeout) == \
        (STATE["closing"], 120, STATE["closing"], 120)
    assert lb.dp.flow_census().open.get(bid, 0) == sum(
        1 for r in entries(lb.dp, "flows").values()
        if r.dir == layout.FLOW_FORWARD and r.backend_id == bid and r.state == STATE["established"])


@pytest.mark.parametrize("flag", ["F", "R"])
def test_a_fin_or_rst_no_entry_knows_is_forwarded_and_its_connection_closing(lb, fibnet, flag):
    """A client's FIN or RST of a connection this node lost (or never saw)
    reaches a backend, to end it there, and the connection is closing: not
    half-open with the SYN timeout, not counted as such, and no new
    connection of the frontend or the server (their CONNS)."""
    sport = 51250 + (flag == "R")
    res = lb.send(tcp_frame(CLIENT, VIP, sport, 80, flags=flag + "A"), fibnet.ifindex["ext"])
    assert res.action == XDP_REDIRECT
    lb.expect("forward_redirect", flow=("in", SVC_TCP, backend_of(res.data), False))
    table, fwd, rep = connection(lb.dp, sport)
    assert (table, fwd.backend_id) == ("flows_new", backend_of(res.data))
    assert (fwd.state, fwd.timeout, rep.state, rep.timeout) == \
        (STATE["closing"], 120, STATE["closing"], 120)
    census = lb.dp.flow_census()
    half_open = sum(1 for r in entries(lb.dp, "flows_new").values()
                    if r.dir == layout.FLOW_FORWARD and r.state != STATE["closing"])
    assert census.half_open == half_open


def test_a_syn_on_a_closing_connection_opens_a_new_one(lb, fibnet):
    """A client reusing its port after a close: balanced anew (round-robin may
    pick the other backend), counted as reopened, the old entries gone."""
    dp = lb.dp
    bid = handshake(lb, fibnet, 51300)
    lb.send(tcp_frame(CLIENT, VIP, 51300, 80, flags="FA"), fibnet.ifindex["ext"])
    before = counters(dp)
    res = lb.send(syn(51300), fibnet.ifindex["ext"])
    new_bid = backend_of(res.data)
    lb.expect("forward_redirect", flow=("in", SVC_TCP, new_bid, True))
    assert counters(dp)["reopened"] - before["reopened"] == 1
    table, fwd, rep = connection(dp, 51300)
    assert table == "flows_new" and fwd.state == STATE["new"]
    old_reply = (BACKENDS[bid][0], CLIENT, 8080, 51300, TCP_P)
    assert old_reply not in entries(dp, "flows")
    assert (CLIENT, VIP, 51300, 80, TCP_P) not in entries(dp, "flows")


def test_a_syn_ack_opens_again_a_connection_that_a_stray_packet_closed(lb, fibnet):
    """A client that aborts (RST) and at once connects again from its port
    meets the same server (Maglev). A packet of the old connection, still on
    its way from that server, reaches the new one; the client, not connected
    yet, answers it with a RST, which closes the new connection. The server's
    SYN-ACK opens it again: both ends are connected, and so is it here,
    established at the client's ACK, not closing in the half-open table (not
    counted open, ended after timeout_closing idle)."""
    ext, int_, sport = fibnet.ifindex["ext"], fibnet.ifindex["int"], 51360

    def client(flags):
        return lb.send(tcp_frame(CLIENT, MVIP, sport, 80, flags=flags), ext)

    bid = backend_of(client("S").data)
    lb.send(from_backend(bid, sport, "SA"), int_)
    client("A")
    client("RA")
    assert backend_of(client("S").data) == bid
    lb.send(from_backend(bid, sport, "PA", payload=b"old"), int_)
    client("R")
    lb.send(from_backend(bid, sport, "SA"), int_)
    table, fwd, rep = connection(lb.dp, sport, vip=MVIP)
    assert (table, fwd.state, fwd.timeout, rep.state, rep.timeout) == \
        ("flows_new", STATE["answered"], 60, STATE["answered"], 60)
    client("A")
    table, fwd, rep = connection(lb.dp, sport, vip=MVIP)
    assert (table, fwd.state, fwd.timeout, rep.state, rep.timeout) == \
        ("flows", STATE["established"], 900, STATE["established"], 900)


def test_a_datagram_its_server_never_answered_is_balanced_anew_once_it_takes_no_new_flows(
        lb, fibnet):
    """A UDP flow its server never answered (syslog's, one-way) is half-open,
    as a connection whose SYN is unanswered: once the server takes no new
    flows (drained, disabled, down), its next datagram goes where a new
    flow's would, counted as reopened, as a SYN's retry does. It stayed on
    the server while its client sent, a down one too. A flow the server
    answered stays (its pool's on_server_down decides)."""
    dp, ext, int_ = lb.dp, fibnet.ifindex["ext"], fibnet.ifindex["int"]

    def datagram(sport):
        return lb.send(udp_frame(CLIENT, VIP, sport, 80, payload=b"<13>log"), ext)

    first = backend_of(datagram(52010).data)
    answered = next(p for p in range(52011, 52015) if backend_of(datagram(p).data) == first)
    addr, port = BACKENDS[first]
    lb.send(udp_frame(addr, CLIENT, port, answered, payload=b"a", eth_src=BACKEND_MAC), int_)
    dp.set_backend(first, addr, port, closed=True)
    try:
        before = counters(dp)
        moved = backend_of(datagram(52010).data)
        lb.expect("forward_redirect", flow=("in", SVC_UDP, moved, True))
        assert moved != first and counters(dp)["reopened"] - before["reopened"] == 1
        table, fwd, _ = connection(dp, 52010, UDP_P)
        assert (table, fwd.backend_id, fwd.state) == ("flows_new", moved, STATE["new"])
        assert backend_of(datagram(answered).data) == first
        assert counters(dp)["reopened"] == before["reopened"] + 1
    finally:
        dp.set_backend(first, addr, port)


def test_udp_is_established_once_the_client_speaks_after_an_answer(lb, fibnet):
    ext, int_ = fibnet.ifindex["ext"], fibnet.ifindex["int"]
    res = lb.send(udp_frame(CLIENT, VIP, 52000, 80, payload=b"q1"), ext)
    bid = backend_of(res.data)
    lb.send(udp_frame(CLIENT, VIP, 52000, 80, payload=b"q2"), ext)   # no answer yet
    assert connection(lb.dp, 52000, UDP_P)[0] == "flows_new"
    be_addr, be_port = BACKENDS[bid]
    lb.send(udp_frame(be_addr, CLIENT, be_port, 52000, payload=b"a1", eth_src=BACKEND_MAC), int_)
    lb.send(udp_frame(CLIENT, VIP, 52000, 80, payload=b"q3"), ext)
    table, fwd, rep = connection(lb.dp, 52000, UDP_P)
    assert table == "flows" and (fwd.timeout, rep.timeout) == (300, 300)
    assert fwd.state == rep.state == STATE["established"]


def test_a_reply_entry_lost_after_the_answer_is_rebuilt_when_the_connection_moves(lb, fibnet):
    ext, int_ = fibnet.ifindex["ext"], fibnet.ifindex["int"]
    bid = backend_of(lb.send(syn(52100), ext).data)
    lb.send(from_backend(bid, 52100, "SA"), int_)
    be_addr, be_port = BACKENDS[bid]
    evict(lb.dp, "flows_new", (be_addr, CLIENT, be_port, 52100, TCP_P))
    lb.send(tcp_frame(CLIENT, VIP, 52100, 80, flags="A"), ext)
    table, fwd, rep = connection(lb.dp, 52100)
    assert table == "flows" and (fwd.state, rep.state) == (STATE["established"],) * 2
    res = lb.send(from_backend(bid, 52100, "PA", payload=b"200 OK"), int_)
    assert res.data == tcp_frame(VIP, CLIENT, 80, 52100, flags="PA", payload=b"200 OK", ttl=63,
                                 eth_src=fibnet.MACS["ext"], eth_dst=CLIENT_MAC)


# Idle timeouts ----------------------------------------------------------------------------

def age(dp, table: str, key, seconds: int) -> None:
    """Makes an entry look idle for `seconds` (its last packet that long ago)."""
    t = dp._maps[table]
    age_keys(t, [map_key(t, key)], seconds)


def age_keys(t, keys, seconds: int) -> None:
    """Moves the last packet of map t's entries at these keys `seconds` back."""
    for k in keys:
        value = t[k]
        # The clock starts at boot: a machine up for less (CI's, fresh) would
        # leave the entry younger than the test takes it to be.
        assert value.seen > seconds * SEC, f"cannot age an entry {seconds} s: shorten its timeouts"
        value.seen -= seconds * SEC
        t[k] = value


# syn, established, closing, udp: entries are aged by moving their last packet
# back in time, which cannot go before the machine booted.
SHORT_TIMEOUTS = (3, 5, 3, 3)


@pytest.fixture
def short_timeouts(lb):
    """Timeouts of a few seconds (SHORT_TIMEOUTS)."""
    lb.dp.set_timeouts(SVC_TCP, *SHORT_TIMEOUTS)
    yield
    lb.dp.set_timeouts(SVC_TCP, *TIMEOUTS.values())


def shorten_timeouts(balancer) -> None:
    """The balancer's services get SHORT_TIMEOUTS."""
    for svc in balancer.datapath._maps["services"].values():
        balancer.datapath.set_timeouts(svc.id, *SHORT_TIMEOUTS)


def test_an_idle_connection_is_a_new_flow_at_its_next_packet(lb, fibnet, short_timeouts):
    """Idle past its timeout both ways, a connection is dead at its next
    packet; one-way traffic keeps it, as it keeps it from the sweep."""
    dp = lb.dp
    bid = handshake(lb, fibnet, 53000)
    assert connection(dp, 53000)[1].timeout == 5
    fwd_key = (CLIENT, VIP, 53000, 80, TCP_P)
    reply_key = (BACKENDS[bid][0], CLIENT, 8080, 53000, TCP_P)
    age(dp, "flows", fwd_key, 4)
    res = lb.send(tcp_frame(CLIENT, VIP, 53000, 80, flags="PA", payload=b"x"), fibnet.ifindex["ext"])
    lb.expect("forward_redirect", flow=("in", SVC_TCP, bid, False))      # 4 s: alive
    assert backend_of(res.data) == bid

    age(dp, "flows", fwd_key, 6)        # the client silent 6 s, the backend not
    res = lb.send(tcp_frame(CLIENT, VIP, 53000, 80, flags="PA", payload=b"x"),
                  fibnet.ifindex["ext"])
    lb.expect("forward_redirect", flow=("in", SVC_TCP, bid, False))
    assert backend_of(res.data) == bid

    age(dp, "flows", fwd_key, 6)
    age(dp, "flows", reply_key, 6)      # both silent 6 s
    before = counters(dp)
    res = lb.send(tcp_frame(CLIENT, VIP, 53000, 80, flags="PA", payload=b"x"), fibnet.ifindex["ext"])
    new_bid = backend_of(res.data)
    lb.expect("forward_redirect", flow=("in", SVC_TCP, new_bid, True))  # 6 s: a new flow
    after = counters(dp)
    assert (after["expired"] - before["expired"], after["created"] - before["created"]) == (1, 1)
    assert connection(dp, 53000)[0] == "flows_new"
    assert (BACKENDS[bid][0], CLIENT, 8080, 53000, TCP_P) not in entries(dp, "flows")


def test_a_connection_whose_backend_alone_speaks_is_counted_open(lb, fibnet, short_timeouts):
    """`status`, `top` and the metrics count it as the data path keeps it:
    open while either entry is within its timeout (a server that pushes to a
    silent client), not once both are idle."""
    dp = lb.dp
    bid = handshake(lb, fibnet, 53020)
    fwd_key = (CLIENT, VIP, 53020, 80, TCP_P)
    reply_key = (BACKENDS[bid][0], CLIENT, 8080, 53020, TCP_P)
    open_before = dp.flow_census().open.get(bid, 0)
    age(dp, "flows", fwd_key, 6)        # the client silent 6 s, past its 5 s
    lb.send(from_backend(bid, 53020, "PA", payload=b"push"), fibnet.ifindex["int"])
    lb.expect("reply_redirect", flow=("out", SVC_TCP, bid, False))
    assert dp.flow_census().open.get(bid, 0) == open_before
    age(dp, "flows", reply_key, 6)      # both silent 6 s
    assert dp.flow_census().open.get(bid, 0) == open_before - 1
    # and, dead, swept: not left for the next tests' sweeps to find
    assert dp.sweep_flows()[0]["flows"] >= 1
    assert connection(dp, 53020) == (None, None, None)


def test_a_server_that_speaks_first_after_both_ways_idle_meets_a_dead_connection(
        lb, fibnet, short_timeouts):
    """Idle past its timeout both ways, a connection is dead at its next
    packet, a server's too: it passes as no connection's, as it would once
    the sweep had run. It brought the connection back before, until a sweep
    (every 3 to 4 minutes with a million connections) happened to come first."""
    dp = lb.dp
    bid = handshake(lb, fibnet, 53030)
    age(dp, "flows", (CLIENT, VIP, 53030, 80, TCP_P), 6)
    age(dp, "flows", (BACKENDS[bid][0], CLIENT, 8080, 53030, TCP_P), 6)
    before = counters(dp)
    push = from_backend(bid, 53030, "PA", payload=b"push")
    assert lb.send(push, fibnet.ifindex["int"]).data == push        # not rewritten
    lb.expect("pass_not_vip")
    assert counters(dp)["expired"] - before["expired"] == 1
    assert connection(dp, 53030) == (None, None, None)


def test_a_dead_half_open_connection_is_counted_out_of_the_half_open_table(
        lb, fibnet, short_timeouts):
    """Never answered, idle past its SYN timeout: at its next packet it goes
    from flows_new, counted there (new_removed), which is how a status tells
    removals from the LRU's evictions (Datapath.flow_ledger)."""
    dp = lb.dp
    sport = 53050
    bid = backend_of(lb.send(syn(sport), fibnet.ifindex["ext"]).data)
    lb.expect("forward_redirect", flow=("in", SVC_TCP, bid, True))
    assert connection(dp, sport)[0] == "flows_new"
    age(dp, "flows_new", (CLIENT, VIP, sport, 80, TCP_P), 4)
    age(dp, "flows_new", (BACKENDS[bid][0], CLIENT, 8080, sport, TCP_P), 4)
    before = counters(dp)
    new_bid = backend_of(lb.send(syn(sport), fibnet.ifindex["ext"]).data)
    lb.expect("forward_redirect", flow=("in", SVC_TCP, new_bid, True))
    after = counters(dp)
    assert {k: after[k] - before[k] for k in ("expired", "new_removed", "created")} == \
        {"expired": 1, "new_removed": 1, "created": 1}


def test_the_sweep_removes_connections_idle_on_both_sides(lb, fibnet, short_timeouts):
    """A connection goes when both its entries are idle past its timeout: one-way
    traffic (here the backend's) keeps it."""
    dp = lb.dp
    handshake(lb, fibnet, 53100)
    age(dp, "flows", (CLIENT, VIP, 53100, 80, TCP_P), 10)
    assert dp.sweep_flows()[0]["flows"] == 0
    assert connection(dp, 53100)[0] == "flows"

    handshake(lb, fibnet, 53101)
    expired, _ = dp.sweep_flows(dp.now() + 6 * SEC)
    assert expired["flows"] >= 2
    assert connection(dp, 53100) == connection(dp, 53101) == (None, None, None)


def test_the_sweep_puts_back_a_reply_entry_the_lru_evicted(lb, fibnet, short_timeouts):
    """The LRU evicted an established connection's reply entry alone: its
    backend's packets leave un-NATed until the sweep puts the entry back. An
    idle connection's lone forward entry goes instead."""
    dp = lb.dp
    bid = handshake(lb, fibnet, 53150)
    handshake(lb, fibnet, 53151)
    table, fwd, reply = connection(dp, 53150)
    assert table == "flows"
    for sport in (53150, 53151):
        addr, port = BACKENDS[connection(dp, sport)[1].backend_id]
        evict(dp, "flows", (addr, CLIENT, port, sport, TCP_P))
    age(dp, "flows", (CLIENT, VIP, 53151, 80, TCP_P), 10)
    answer = from_backend(bid, 53150, "PA", payload=b"late")
    res = lb.send(answer, fibnet.ifindex["int"])
    assert (res.action, res.data) == (XDP_PASS, answer)
    lb.expect("pass_not_vip")

    expired, restored = dp.sweep_flows()
    assert (expired["flows"], restored) == (1, 1)
    assert connection(dp, 53150) == (table, fwd, reply._replace(seen=fwd.seen))
    assert connection(dp, 53151) == (None, None, None)
    res = lb.send(answer, fibnet.ifindex["int"])
    assert ip_of(res.data, "src") == VIP
    lb.expect("reply_redirect", flow=("out", SVC_TCP, bid, False))
    assert dp.sweep_flows()[1] == 0


def test_the_sweep_removes_only_connections_still_as_it_read_them(lb, fibnet, short_timeouts,
                                                                  monkeypatch):
    """The sweep reads the tables, then removes the dead. A connection that the
    program opened again on the same key in between (its client's next SYN)
    stays, and one removed in between (by the program, or an apply's
    delete_flows, each counting it) is not counted again; what is left of
    one removed in part goes."""
    dp, ext = lb.dp, fibnet.ifindex["ext"]
    keys = {}
    for sport in (53170, 53171, 53172):
        addr, port = BACKENDS[backend_of(lb.send(syn(sport), ext).data)]
        keys[sport] = [(CLIENT, VIP, sport, 80, TCP_P), (addr, CLIENT, port, sport, TCP_P)]
        for key in keys[sport]:
            age(dp, "flows_new", key, 10)
    ours = {socket.htons(sport) for sport in keys}
    read = {name: [r for r in rows if ours & {r.sport, r.dport}]
            for name, rows in flow_rows(dp).items()}
    assert len(read["flows_new"]) == 6

    lb.send(syn(53170), ext)                    # dead, so opened anew on the same key
    anew = connection(dp, 53170)
    assert anew[1] != read["flows_new"][0] and anew[2] is not None
    for key in keys[53171] + keys[53172][:1]:
        evict(dp, "flows_new", key)
    with monkeypatch.context() as m:
        m.setattr(dp, "flow_dumps", lambda: {name: as_dumped(rows) for name, rows in read.items()})
        assert dp.sweep_flows()[0] == {"flows": 0, "flows_new": 0}
    assert connection(dp, 53170) == anew
    assert keys[53172][1] not in entries(dp, "flows_new")


def dump_of(dp, sports) -> dict[str, tuple[bytes, bytes]]:
    """Both flow tables' entries of the client's connections from these ports,
    as Datapath.flow_dumps reads them."""
    ports = {socket.htons(p) for p in sports}
    return {name: as_dumped([r for r in rows if ports & {r.sport, r.dport}])
            for name, rows in flow_rows(dp).items()}


@pytest.mark.parametrize("side", ["client", "server"])
def test_the_sweep_spares_a_connection_whose_last_packet_is_all_that_changed(
        lb, fibnet, monkeypatch, side):
    """Read as idle, then a packet either way (one-way traffic): only the time
    of its last packet differs from what the sweep read, and it stays."""
    dp, sport = lb.dp, 53190 + (side == "server")
    bid = handshake(lb, fibnet, sport)
    addr, port = BACKENDS[bid]
    age(dp, "flows", (CLIENT, VIP, sport, 80, TCP_P), 10)
    age(dp, "flows", (addr, CLIENT, port, sport, TCP_P), 10)
    read = dump_of(dp, [sport])
    if side == "client":
        lb.send(tcp_frame(CLIENT, VIP, sport, 80, flags="A"), fibnet.ifindex["ext"])
    else:
        lb.send(from_backend(bid, sport, "A"), fibnet.ifindex["int"])
    now = connection(dp, sport)
    written = now[1] if side == "client" else now[2]
    assert written[:-1] in [r[:-1] for r in flowtable.decode(*read["flows"])]
    with monkeypatch.context() as m:
        m.setattr(dp, "flow_dumps", lambda: read)
        assert dp.sweep_flows(dp.now() + 1000 * SEC)[0] == {"flows": 0, "flows_new": 0}
    assert connection(dp, sport) == now


WRITTEN = ("addr", "state", "backend_id", "timeout")     # in each word of a flow but seen


@pytest.mark.parametrize("field", WRITTEN)
def test_the_sweep_spares_a_connection_written_in_any_field_since_it_read_it(
        lb, fibnet, monkeypatch, field):
    """xlb_reap compares every word of an entry, not only the time of its
    last packet (which a write in the tick of the read leaves as read)."""
    dp, sport = lb.dp, 53192 + WRITTEN.index(field)
    bid = handshake(lb, fibnet, sport)
    addr, port = BACKENDS[bid]
    read = dump_of(dp, [sport])
    t = dp._maps["flows"]
    key = map_key(t, (CLIENT, VIP, sport, 80, TCP_P))
    value = t[key]
    setattr(value, field, getattr(value, field) + 1)
    t[key] = value
    with monkeypatch.context() as m:
        m.setattr(dp, "flow_dumps", lambda: read)
        assert dp.sweep_flows(dp.now() + 1000 * SEC)[0] == {"flows": 0, "flows_new": 0}
    assert len(flowtable.decode(*dump_of(dp, [sport])["flows"])) == 2
    for k in ((CLIENT, VIP, sport, 80, TCP_P), (addr, CLIENT, port, sport, TCP_P)):
        evict(dp, "flows", k)


def test_the_sweep_removes_more_connections_than_one_test_run_takes(lb, fibnet, monkeypatch):
    """xlb_reap takes REAP_CONNECTIONS a frame: one more goes by the next."""
    from xlb.datapath import REAP_CONNECTIONS

    dp = lb.dp
    sports = range(53600, 53600 + REAP_CONNECTIONS + 1)
    for sport in sports:
        handshake(lb, fibnet, sport)
    read = dump_of(dp, sports)
    with monkeypatch.context() as m:
        m.setattr(dp, "flow_dumps", lambda: read)
        assert dp.sweep_flows(dp.now() + 1000 * SEC)[0] == \
            {"flows": len(sports), "flows_new": 0}
    assert dump_of(dp, sports) == {"flows": (b"", b""), "flows_new": (b"", b"")}


def test_ending_a_servers_connections_spares_one_opened_again_elsewhere_meanwhile(
        lb, fibnet, monkeypatch):
    """delete_flows reads the tables, then deletes the connections of the
    servers taken out: a connection that the program opened again on the same
    key in between, on another server (a SYN, the first server closed to new
    flows), stays."""
    dp, ext = lb.dp, fibnet.ifindex["ext"]
    first = backend_of(lb.send(syn(53180), ext).data)
    addr, port = BACKENDS[first]
    read = dump_of(dp, [53180])
    dp.set_backend(first, addr, port, closed=True)
    try:
        again = lb.send(syn(53180), ext)
        while backend_of(again.data) == first:                 # whatever the cursor
            again = lb.send(syn(53180), ext)
        anew = connection(dp, 53180)
        assert anew[1].backend_id != first and anew[2] is not None
        with monkeypatch.context() as m:
            m.setattr(dp, "flow_dumps", lambda: read)
            assert dp.delete_flows({first}, set()) == {"flows": 0, "flows_new": 0}
        assert connection(dp, 53180) == anew
    finally:
        dp.set_backend(first, addr, port)


def test_ending_a_servers_connections_spares_one_opened_again_after_the_check(
        lb, fibnet, monkeypatch):
    """A connection of the server taken out, gone by the time delete_flows
    checks it (the LRU, the sweep), whose key the program opens again on
    another server before the delete: the new connection stays."""
    dp, ext = lb.dp, fibnet.ifindex["ext"]
    first = backend_of(lb.send(syn(53181), ext).data)
    addr, port = BACKENDS[first]
    read = dump_of(dp, [53181])
    for key in ((CLIENT, VIP, 53181, 80, TCP_P), (addr, CLIENT, port, 53181, TCP_P)):
        evict(dp, "flows_new", key)
    dp.set_backend(first, addr, port, closed=True)
    delete_batch = dp._delete_batch

    def reopened_first(name, rows):
        if name == "flows_new":
            while backend_of(lb.send(syn(53181), ext).data) == first:   # whatever the cursor
                pass
        return delete_batch(name, rows)

    try:
        with monkeypatch.context() as m:
            m.setattr(dp, "flow_dumps", lambda: read)
            m.setattr(dp, "_delete_batch", reopened_first)
            assert dp.delete_flows({first}, set()) == {"flows": 0, "flows_new": 0}
        anew = connection(dp, 53181)
        assert anew[0] == "flows_new" and anew[1].backend_id != first and anew[2] is not None
    finally:
        dp.set_backend(first, addr, port)


def test_a_change_that_ends_no_connection_reads_no_flow_table(lb, monkeypatch):
    """Every apply (each health change too) asks delete_flows to end what it
    ends, mostly nothing: then neither table is read (a full table of a
    million connections took most of a second)."""
    monkeypatch.setattr(lb.dp, "flow_dumps", lambda: pytest.fail("the flow tables were read"))
    assert lb.dp.delete_flows(set(), set()) == {"flows": 0, "flows_new": 0}


def test_the_sweep_puts_back_nothing_of_a_connection_gone_since_it_read_the_table(lb, fibnet):
    """The sweep reads the tables, then puts reply entries back: a connection
    ended in between (by an apply's delete_flows, which the put-back waits
    for, or expired by the program) stays gone."""
    dp = lb.dp
    bid = handshake(lb, fibnet, 53160)
    addr, port = BACKENDS[bid]
    evict(dp, "flows", (addr, CLIENT, port, 53160, TCP_P))
    orphans = [r for r in flowtable.sweep(*dp.flow_dumps()["flows"], dp.now(), set()).orphans
               if r.sport == socket.htons(53160)]
    assert len(orphans) == 1
    evict(dp, "flows", (CLIENT, VIP, 53160, 80, TCP_P))
    assert dp._put_back(orphans) == 0
    assert connection(dp, 53160) == (None, None, None)
    assert (addr, CLIENT, port, 53160, TCP_P) not in entries(dp, "flows")


@pytest.fixture
def second_vip(lb):
    """VIP2:80/udp on backend 1 alone, for one test: with VIP:80/udp, two VIPs
    that share a server (as `xlb up --vip A --vip B --backend X` does)."""
    dp = lb.dp
    dp.write_ring(6, [1])
    dp.set_service(VIP2, 80, UDP_P, SVC_UDP2, 6, 1)
    dp.set_timeouts(SVC_UDP2, *TIMEOUTS.values())
    dp.set_vip(VIP2)
    yield lb
    dp.del_service(VIP2, 80, UDP_P)
    dp.del_vip(VIP2)


def udp_established(lb, fibnet, sport: int, vip=VIP) -> int:
    """A UDP flow to vip:80 from sport: query, answer, query (established);
    returns its backend."""
    bid = backend_of(lb.send(udp_frame(CLIENT, vip, sport, 80, payload=b"q"), fibnet.ifindex["ext"]).data)
    lb.send(from_backend_udp(bid, sport), fibnet.ifindex["int"])
    lb.send(udp_frame(CLIENT, vip, sport, 80, payload=b"q"), fibnet.ifindex["ext"])
    return bid


def from_backend_udp(bid, sport):
    addr, port = BACKENDS[bid]
    return udp_frame(addr, CLIENT, port, sport, payload=b"a", eth_src=BACKEND_MAC)


def evict(dp, table: str, key) -> None:
    """Removes one entry, as the LRU does when the table is full."""
    t = dp._maps[table]
    del t[map_key(t, key)]


def test_the_sweep_leaves_a_reply_key_that_another_vips_connection_holds(second_vip, fibnet):
    """One client port to two VIPs that share a server: the server sees one
    peer, and the two connections one reply key. X (to VIP) is established
    and lost its reply entry; Y (to VIP2), opened since, holds that key in the
    half-open table, and answers leave from VIP2: the sweep leaves it to Y."""
    lb, dp = second_vip, second_vip.dp
    sport = next(p for p in range(53400, 53410) if udp_established(lb, fibnet, p) == 1)
    addr, port = BACKENDS[1]
    evict(dp, "flows", (addr, CLIENT, port, sport, UDP_P))
    lb.send(udp_frame(CLIENT, VIP2, sport, 80, payload=b"y"), fibnet.ifindex["ext"])
    answer = from_backend_udp(1, sport)
    assert ip_of(lb.send(answer, fibnet.ifindex["int"]).data, "src") == VIP2
    assert dp.sweep_flows()[1] == 0
    assert ip_of(lb.send(answer, fibnet.ifindex["int"]).data, "src") == VIP2


@pytest.mark.parametrize("owners", [[(VIP, 80), (VIP2, 80)], [(VIP2, 80), (VIP, 80)]])
def test_a_shared_servers_flow_through_any_of_its_frontends_gets_its_reply_entry_back(
        second_vip, fibnet, owners):
    """Backend 1 serves VIP:80/udp and VIP2:80/udp (owners: both, in the
    config's order): a flow through either that lost its reply entry alone
    gets it back at its server's datagram, which leaves from its own VIP. The
    second frontend's left from the server's own address until a sweep put
    the entry back (owners held the first alone)."""
    lb, dp = second_vip, second_vip.dp
    addr, port = BACKENDS[1]
    dp.set_owner(addr, port, UDP_P, owners)
    try:
        for vip, svc, ports in ((VIP, SVC_UDP, range(53700, 53710)),
                                (VIP2, SVC_UDP2, range(53710, 53720))):
            sport = next(p for p in ports if udp_established(lb, fibnet, p, vip=vip) == 1)
            evict(dp, "flows", (addr, CLIENT, port, sport, UDP_P))
            before = counters(dp)
            res = lb.send(from_backend_udp(1, sport), fibnet.ifindex["int"])
            assert (ip_of(res.data, "src"), ip_of(res.data, "dst")) == (vip, CLIENT)
            assert l4_segment(res.data)[:2] == (80).to_bytes(2, "big")     # the VIP's port
            lb.expect("reply_redirect", flow=("out", svc, 1, False))
            assert connection(dp, sport, UDP_P, vip=vip)[2].dir == layout.FLOW_REPLY
            assert counters(dp) == before           # nothing adopted, created or removed
    finally:
        dp.del_owner(addr, port, UDP_P)


def test_the_sweep_removes_the_old_reply_entry_of_a_flow_opened_again(lb, fibnet):
    """A UDP flow lost its forward entry (its server streaming, its client
    quiet): the client's next datagram opens it again in the half-open table,
    but the old reply entry, looked up first, would keep the new pair from
    ever being answered (and established). The sweep removes it, counting no
    connection; the flow is then established again."""
    dp = lb.dp
    sport = 53420
    bid = udp_established(lb, fibnet, sport)
    addr, port = BACKENDS[bid]
    evict(dp, "flows", (CLIENT, VIP, sport, 80, UDP_P))
    new_bid = backend_of(lb.send(udp_frame(CLIENT, VIP, sport, 80, payload=b"q"),
                                 fibnet.ifindex["ext"]).data)
    assert dp.sweep_flows()[0] == {"flows": 0, "flows_new": 0}
    assert (addr, CLIENT, port, sport, UDP_P) not in entries(dp, "flows")
    res = lb.send(from_backend_udp(new_bid, sport), fibnet.ifindex["int"])
    assert ip_of(res.data, "src") == VIP
    lb.send(udp_frame(CLIENT, VIP, sport, 80, payload=b"q"), fibnet.ifindex["ext"])
    table, fwd, reply = connection(dp, sport, UDP_P)
    assert (table, fwd.state, reply.state) == ("flows", STATE["established"], STATE["established"])


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_a_client_trying_again_unanswered_gets_its_reply_entry_written_again(lb, fibnet, proto):
    """The LRU took the reply entry of a connection not yet answered (in a
    flood of new flows it goes before the forward entry that the client's
    retries keep fresh): its server's answer leaves un-NATed. The client's
    next try, a SYN again or a datagram a second or more after the last,
    writes the entry again, and the answer to it gets through. A datagram
    sooner after the last writes nothing: a one-way UDP flow pays no write a
    packet."""
    dp, ext, int_ = lb.dp, fibnet.ifindex["ext"], fibnet.ifindex["int"]
    sport = 53430 + (proto == "udp")
    ask = syn(sport) if proto == "tcp" else udp_frame(CLIENT, VIP, sport, 80, payload=b"q")
    bid = backend_of(lb.send(ask, ext).data)
    addr, port = BACKENDS[bid]
    p = TCP_P if proto == "tcp" else UDP_P
    answer = from_backend(bid, sport, "SA") if proto == "tcp" else from_backend_udp(bid, sport)
    evict(dp, "flows_new", (addr, CLIENT, port, sport, p))
    res = lb.send(answer, int_)
    assert (res.action, res.data) == (XDP_PASS, answer)
    lb.expect("pass_not_vip")
    if proto == "udp":
        lb.send(ask, ext)
        assert connection(dp, sport, p)[2] is None
        age(dp, "flows_new", (CLIENT, VIP, sport, 80, p), 2)
    lb.send(ask, ext)
    res = lb.send(answer, int_)
    assert (res.action, ip_of(res.data, "src")) == (XDP_REDIRECT, VIP)
    assert connection(dp, sport, p)[0] == "flows_new"


def test_a_connection_whose_forward_entry_was_evicted_is_opened_anew_and_answered(lb, fibnet):
    """The LRU evicted a connection's forward entry, not its reply entry: the
    client's next packet opens it again (Maglev: on the same backend). The old
    reply entry, which takes the backend's packets first, goes at the client's
    next packet, so the new pair gets answered and established."""
    dp = lb.dp
    sport = 53200
    bid = maglev_backend(CLIENT, sport)
    lb.send(tcp_frame(CLIENT, MVIP, sport, 80, flags="S"), fibnet.ifindex["ext"])
    lb.send(from_backend(bid, sport, "SA"), fibnet.ifindex["int"])
    lb.send(tcp_frame(CLIENT, MVIP, sport, 80, flags="A"), fibnet.ifindex["ext"])
    assert connection(dp, sport, vip=MVIP)[0] == "flows"
    evict(dp, "flows", (CLIENT, MVIP, sport, 80, TCP_P))
    for _ in range(2):
        lb.send(tcp_frame(CLIENT, MVIP, sport, 80, flags="PA", payload=b"x"),
                fibnet.ifindex["ext"])
        lb.send(from_backend(bid, sport, "PA", payload=b"y"), fibnet.ifindex["int"])
    lb.send(tcp_frame(CLIENT, MVIP, sport, 80, flags="A"), fibnet.ifindex["ext"])
    table, fwd, reply = connection(dp, sport, vip=MVIP)
    assert (table, fwd.backend_id, fwd.state, reply.state) == (
        "flows", bid, STATE["established"], STATE["established"])


# Maglev ---------------------------------------------------------------------------------

@pytest.mark.parametrize("flags", ["S", "A", "PA"])
def test_maglev_picks_the_slot_of_the_flow_hash_even_mid_connection(lb, fibnet, flags):
    """A packet of a flow this node never saw (another node's, or one it lost)
    goes to table[flow_hash % size], the backend every node with the table picks."""
    for sport in range(54000, 54012):
        sport += {"S": 0, "A": 100, "PA": 200}[flags]
        res = lb.send(tcp_frame(CLIENT, MVIP, sport, 80, flags=flags), fibnet.ifindex["ext"])
        expected = MAGLEV_SLOTS[flow_hash(CLIENT, MVIP, sport, 80, TCP_P) % len(MAGLEV_SLOTS)]
        assert backend_of(res.data) == expected
        lb.expect("forward_redirect", flow=("in", SVC_MAGLEV, expected, True))


def maglev_backend(client, sport) -> int:
    """The backend every node's Maglev table picks for client:sport -> MVIP:80."""
    return MAGLEV_SLOTS[flow_hash(client, MVIP, sport, 80, TCP_P) % len(MAGLEV_SLOTS)]


@contextlib.contextmanager
def owned_by(dp, vip):
    """The backends' TCP endpoints are owned by vip:80's service (owners)."""
    for addr, port in BACKENDS.values():
        dp.set_owner(addr, port, TCP_P, [(vip, 80)])
    try:
        yield
    finally:
        for addr, port in BACKENDS.values():
            dp.del_owner(addr, port, TCP_P)


@pytest.fixture
def adopting(lb):
    """The Maglev service adopts its backends' replies (adopt_replies: its
    owners, SERVICE_ADOPT), for one test."""
    lb.dp.set_service(MVIP, 80, TCP_P, SVC_MAGLEV, MAGLEV_TABLE, len(MAGLEV_SLOTS),
                      layout.SERVICE_MAGLEV | layout.SERVICE_ADOPT)
    with owned_by(lb.dp, MVIP):
        yield lb
    lb.dp.set_service(MVIP, 80, TCP_P, SVC_MAGLEV, MAGLEV_TABLE, len(MAGLEV_SLOTS),
                      layout.SERVICE_MAGLEV)


def test_a_backends_packet_no_entry_knows_is_adopted_where_maglev_sends_its_client(
        adopting, fibnet):
    """After a failover the backend may speak first (a response being
    retransmitted to a silent client): its packet is the Maglev service's reply
    when Maglev sends the client to that backend, and the connection is this
    node's from then on; the other backend's packet for the same client passes."""
    lb, dp = adopting, adopting.dp
    ext, int_ = fibnet.ifindex["ext"], fibnet.ifindex["int"]
    for sport in range(56000, 56008):
        bid = maglev_backend(CLIENT, sport)
        other = 3 - bid
        before = counters(dp)["adopted"]
        res = lb.send(from_backend(other, sport, "PA", payload=b"late"), int_)
        assert (res.action, res.data) == (XDP_PASS, from_backend(other, sport, "PA",
                                                                 payload=b"late"))
        lb.expect("pass_not_vip")
        res = lb.send(from_backend(bid, sport, "PA", payload=b"late"), int_)
        assert res.action == XDP_REDIRECT
        assert res.data == tcp_frame(MVIP, CLIENT, 80, sport, flags="PA", payload=b"late",
                                     ttl=63, eth_src=fibnet.MACS["ext"], eth_dst=CLIENT_MAC)
        assert_checksums(res.data)
        lb.expect("reply_redirect", flow=("out", SVC_MAGLEV, bid, False))
        assert counters(dp)["adopted"] == before + 1
        table, fwd, reply = connection(dp, sport, vip=MVIP)
        assert (table, fwd.backend_id, fwd.state, reply.state) == (
            "flows_new", bid, STATE["answered"], STATE["answered"])
        # The client's next packet goes to that backend and completes the move.
        res = lb.send(tcp_frame(CLIENT, MVIP, sport, 80, flags="A"), ext)
        assert (res.action, backend_of(res.data)) == (XDP_REDIRECT, bid)
        assert connection(dp, sport, vip=MVIP)[0] == "flows"


@pytest.mark.parametrize("flag", ["F", "R"])
def test_a_connection_adopted_by_its_fin_or_rst_is_closing(adopting, fibnet, flag):
    """The backend's packet that has the connection adopted may be its last
    (a FIN or RST sent after the failover): the connection starts closing,
    as one this node balanced would, and is not kept as established."""
    lb = adopting
    sport = 56300 + (flag == "R")
    bid = maglev_backend(CLIENT, sport)
    res = lb.send(from_backend(bid, sport, flag + "A"), fibnet.ifindex["int"])
    assert (res.action, ip_of(res.data, "src")) == (XDP_REDIRECT, MVIP)
    table, fwd, reply = connection(lb.dp, sport, vip=MVIP)
    assert (table, fwd.backend_id) == ("flows_new", bid)
    assert (fwd.state, fwd.timeout, reply.state, reply.timeout) == \
        (STATE["closing"], 120, STATE["closing"], 120)


def test_an_adopted_first_fragment_leads_its_later_ones(adopting, fibnet):
    """A backend's segment over the MTU, fragmented, whose first fragment has
    the connection adopted: the later fragments follow it, their address
    rewritten to the VIP's."""
    lb = adopting
    sport = 56400
    bid = maglev_backend(CLIENT, sport)
    addr, port = BACKENDS[bid]
    sent = fragments(addr, CLIENT, port, sport, 0x7303, eth_src=BACKEND_MAC, proto="tcp")
    res = lb.send(sent[0], fibnet.ifindex["int"])
    want = fragments(MVIP, CLIENT, 80, sport, 0x7303, eth_src=fibnet.MACS["ext"],
                     eth_dst=CLIENT_MAC, ttl=63, proto="tcp")
    assert (res.action, res.data) == (XDP_REDIRECT, want[0])
    lb.expect("reply_redirect", flow=("out", SVC_MAGLEV, bid, False))
    for frag, out in zip(sent[1:], want[1:]):
        res = lb.send(frag, fibnet.ifindex["int"])
        assert (res.action, res.data) == (XDP_REDIRECT, out)
        lb.expect("reply_redirect", flow=("out", SVC_MAGLEV, bid, False))


def test_a_connection_of_this_node_whose_reply_entry_went_is_not_adopted(adopting, fibnet):
    """This node's own connection lost its reply entry (the LRU evicts
    entries), before the answer or after: the backend's next packet writes it
    again where the forward entry is, with no second copy of the connection
    and nothing counted adopted or created, and does what it would have done
    there: an answer marks the connection answered (the client's next packet
    moves it to the established table), a FIN closes it."""
    lb, dp = adopting, adopting.dp
    ext, int_ = fibnet.ifindex["ext"], fibnet.ifindex["int"]
    sport = 56500
    bid = maglev_backend(CLIENT, sport)
    addr, port = BACKENDS[bid]
    lb.send(tcp_frame(CLIENT, MVIP, sport, 80, flags="S"), ext)
    evict(dp, "flows_new", (addr, CLIENT, port, sport, TCP_P))
    lb.send(from_backend(bid, sport, "SA"), int_)
    lb.send(tcp_frame(CLIENT, MVIP, sport, 80, flags="A"), ext)
    table, fwd, reply = connection(dp, sport, vip=MVIP)
    assert table == "flows"
    evict(dp, "flows", (addr, CLIENT, port, sport, TCP_P))
    age(dp, "flows", (CLIENT, MVIP, sport, 80, TCP_P), 100)    # the client silent since
    before, sent = counters(dp), dp.now()
    res = lb.send(from_backend(bid, sport, "PA", payload=b"data"), int_)
    assert (res.action, ip_of(res.data, "src")) == (XDP_REDIRECT, MVIP)
    lb.expect("reply_redirect", flow=("out", SVC_MAGLEV, bid, False))
    assert counters(dp) == before
    assert (CLIENT, MVIP, sport, 80, TCP_P) not in entries(dp, "flows_new")
    written = connection(dp, sport, vip=MVIP)[2]
    # Seen at this packet, not when the client last spoke: the sweep judges by it.
    assert written._replace(seen=0) == reply._replace(seen=0) and written.seen >= sent
    evict(dp, "flows", (addr, CLIENT, port, sport, TCP_P))
    lb.send(from_backend(bid, sport, "FA"), int_)
    _, fwd, reply = connection(dp, sport, vip=MVIP)
    assert (fwd.state, reply.state) == (STATE["closing"], STATE["closing"])


def test_a_connection_of_this_node_on_another_server_than_maglevs_is_not_taken(adopting,
                                                                                 fibnet):
    """This node's live connection went to the other server (the table sent
    its client there then: Maglev's pick drained, say); a packet from the
    server Maglev picks now, on the same client port, is no other node's
    connection to adopt: it passes, and the connection stays where it is."""
    lb, dp = adopting, adopting.dp
    ext, int_ = fibnet.ifindex["ext"], fibnet.ifindex["int"]
    sport = 56700
    bid = maglev_backend(CLIENT, sport)
    other = 3 - bid
    dp.write_maglev(MAGLEV_TABLE, [other] * len(MAGLEV_SLOTS))
    try:
        res = lb.send(tcp_frame(CLIENT, MVIP, sport, 80, flags="S"), ext)
        assert backend_of(res.data) == other
    finally:
        dp.write_maglev(MAGLEV_TABLE, MAGLEV_SLOTS)
    lb.send(from_backend(other, sport, "SA"), int_)
    before = counters(dp)
    stray = from_backend(bid, sport, "PA", payload=b"stray")
    res = lb.send(stray, int_)
    assert (res.action, res.data) == (XDP_PASS, stray)
    lb.expect("pass_not_vip")
    assert counters(dp) == before
    assert connection(dp, sport, vip=MVIP)[1].backend_id == other


@pytest.mark.parametrize("server", ["maglevs", "another"])
def test_a_dead_connection_is_gone_at_the_packet_of_the_server_maglev_picks(adopting, fibnet,
                                                                            server):
    """This node's connection, idle past its timeout both ways (its reply
    entry evicted, or on another server than Maglev picks now), is dead at
    the packet of the server Maglev picks, as the sweep would have it: counted
    expired, and the packet adopted as another node's connection, as after a
    sweep. It brought the connection back before, or (another server's) left
    it in the established table beside the adopted one, until a sweep."""
    lb, dp = adopting, adopting.dp
    ext, int_ = fibnet.ifindex["ext"], fibnet.ifindex["int"]
    sport = 56800 + (server == "another")
    bid = maglev_backend(CLIENT, sport)
    went = bid if server == "maglevs" else 3 - bid
    dp.set_timeouts(SVC_MAGLEV, *SHORT_TIMEOUTS)
    dp.write_maglev(MAGLEV_TABLE, [went] * len(MAGLEV_SLOTS))
    try:
        lb.send(tcp_frame(CLIENT, MVIP, sport, 80, flags="S"), ext)
    finally:
        dp.write_maglev(MAGLEV_TABLE, MAGLEV_SLOTS)
    try:
        lb.send(from_backend(went, sport, "SA"), int_)
        lb.send(tcp_frame(CLIENT, MVIP, sport, 80, flags="A"), ext)
        assert connection(dp, sport, vip=MVIP)[0] == "flows"
        addr, port = BACKENDS[went]
        if server == "maglevs":
            evict(dp, "flows", (addr, CLIENT, port, sport, TCP_P))
        else:
            age(dp, "flows", (addr, CLIENT, port, sport, TCP_P), 6)
        age(dp, "flows", (CLIENT, MVIP, sport, 80, TCP_P), 6)
        before = counters(dp)
        res = lb.send(from_backend(bid, sport, "PA", payload=b"late"), int_)
    finally:
        dp.set_timeouts(SVC_MAGLEV, *TIMEOUTS.values())
    assert (res.action, ip_of(res.data, "src")) == (XDP_REDIRECT, MVIP)
    lb.expect("reply_redirect", flow=("out", SVC_MAGLEV, bid, False))
    after = counters(dp)
    assert {k: after[k] - before[k] for k in ("expired", "created", "adopted")} == \
        {"expired": 1, "created": 1, "adopted": 1}
    assert not [k for k in entries(dp, "flows") if sport in (k[2], k[3])]
    table, fwd, reply = connection(dp, sport, vip=MVIP)
    assert (table, fwd.backend_id, fwd.state, reply.state) == (
        "flows_new", bid, STATE["answered"], STATE["answered"])


def test_what_cannot_be_balanced_to_an_address_on_a_vips_filter_bit_passes(lb, fibnet):
    """The VIP filter takes such an address for a VIP's: what xlb cannot
    balance (another protocol, a later fragment no entry knows) is dropped
    only if the address is a VIP."""
    for frame in (raw(Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=str(CLIENT),
                                                              dst=str(ON_A_VIPS_BIT), proto=47)
                      / Raw(b"g" * 16)),
                  tcp_frame(CLIENT, ON_A_VIPS_BIT, 56600, 80, ip_flags=0, frag=185)):
        res = lb.send(frame, fibnet.ifindex["ext"])
        assert (res.action, res.data) == (XDP_PASS, frame)
        lb.expect("pass_not_vip")


def test_a_packet_from_another_port_of_the_chosen_servers_address_is_not_adopted(adopting,
                                                                                   fibnet):
    """Two servers of the pool on one host (8080, and here 9090): the packet of
    the one Maglev does not send the client to passes, though its address is
    the chosen server's."""
    lb, dp = adopting, adopting.dp
    sport = 56520
    addr, _ = BACKENDS[maglev_backend(CLIENT, sport)]
    dp.set_backend(9, addr, 9090)           # in no Maglev slot
    dp.set_owner(addr, 9090, TCP_P, [(MVIP, 80)])
    try:
        frame = tcp_frame(addr, CLIENT, 9090, sport, flags="A", eth_src=BACKEND_MAC)
        res = lb.send(frame, fibnet.ifindex["int"])
        assert (res.action, res.data) == (XDP_PASS, frame)
        lb.expect("pass_not_vip")
    finally:
        dp.del_owner(addr, 9090, TCP_P)


def test_a_client_on_a_vips_filter_bit_is_adopted_as_any(adopting, fibnet):
    """The VIP filter takes the client's address for a VIP's: the backend's
    packet is adopted all the same (no service has that address)."""
    lb, dp = adopting, adopting.dp
    client = ON_A_VIPS_BIT
    sport = 56200
    bid = MAGLEV_SLOTS[flow_hash(client, MVIP, sport, 80, TCP_P) % len(MAGLEV_SLOTS)]
    addr, port = BACKENDS[bid]
    fibnet.sh("ip", "route", "add", f"{client}/32", "via", "10.1.1.2")
    try:
        before = counters(dp)["adopted"]
        res = lb.send(tcp_frame(addr, client, port, sport, flags="PA", payload=b"late",
                                eth_src=BACKEND_MAC), fibnet.ifindex["int"])
    finally:
        fibnet.sh("ip", "route", "del", f"{client}/32")
    assert ip_of(res.data, "src") == MVIP
    lb.expect("fib_no_neigh", flow=("out", SVC_MAGLEV, bid, False))    # 10.1.1.2 unresolved
    assert counters(dp)["adopted"] == before + 1


def test_a_backends_packet_for_this_host_is_never_adopted(adopting, fibnet):
    """The balancer's own connections to a backend (its health checks) are not
    a service's, even where Maglev would send that address to the backend."""
    lb = adopting
    local = IPv4Address("10.1.11.1")              # fibnet's own address on int
    sport = next(p for p in range(40000, 41000) if maglev_backend(local, p) == 1)
    frame = tcp_frame(BACKENDS[1][0], local, BACKENDS[1][1], sport, flags="SA",
                      eth_src=BACKEND_MAC)
    res = lb.send(frame, fibnet.ifindex["int"])
    assert (res.action, res.data) == (XDP_PASS, frame)
    lb.expect("pass_not_vip")


@pytest.mark.parametrize("owned", [False, True])
def test_without_adopt_replies_a_backends_packet_no_entry_knows_passes(lb, fibnet, owned):
    """Without adopt_replies (no SERVICE_ADOPT), a Maglev service takes over
    no other node's connection, though its servers' endpoints are its own
    (owners: for the reply entries its own connections lose)."""
    sport = 56100
    frame = from_backend(maglev_backend(CLIENT, sport), sport, "PA", payload=b"late")
    with owned_by(lb.dp, MVIP) if owned else contextlib.nullcontext():
        res = lb.send(frame, fibnet.ifindex["int"])
    assert (res.action, res.data) == (XDP_PASS, frame)
    lb.expect("pass_not_vip")


def test_a_connection_whose_reply_entry_went_gets_it_back_at_its_servers_packet(
        lb, fibnet, short_timeouts):
    """A round-robin connection (no adopt_replies) whose reply entry the LRU
    evicted alone: its server's next packet writes it again and leaves from
    the VIP. It left from the server's own address until a sweep put the
    entry back, and the client's host answered it with a reset, which ended
    the connection at the server. Once the forward entry is idle past its
    timeout, the connection is dead: the server's packet is no one's."""
    dp, ext, int_ = lb.dp, fibnet.ifindex["ext"], fibnet.ifindex["int"]
    sport = 56150
    bid = handshake(lb, fibnet, sport)
    addr, port = BACKENDS[bid]
    reply_key = (addr, CLIENT, port, sport, TCP_P)
    with owned_by(dp, VIP):
        evict(dp, "flows", reply_key)
        before = counters(dp)
        res = lb.send(from_backend(bid, sport, "PA", payload=b"data"), int_)
        assert res.data == tcp_frame(VIP, CLIENT, 80, sport, flags="PA", payload=b"data",
                                     ttl=63, eth_src=fibnet.MACS["ext"], eth_dst=CLIENT_MAC)
        lb.expect("reply_redirect", flow=("out", SVC_TCP, bid, False))
        table, fwd, reply = connection(dp, sport)
        assert (table, reply.backend_id, reply.state) == ("flows", bid, STATE["established"])
        assert counters(dp) == before           # nothing adopted, created or removed
        evict(dp, "flows", reply_key)
        age(dp, "flows", (CLIENT, VIP, sport, 80, TCP_P), 6)     # past its 5 s
        stray = from_backend(bid, sport, "PA", payload=b"late")
        res = lb.send(stray, int_)
        assert (res.action, res.data) == (XDP_PASS, stray)
        lb.expect("pass_not_vip")


# What left the tables, counted -------------------------------------------------------------

def removed(b) -> dict[str, int]:
    flows = b.status()["flows"]
    return {**flows["removed"], "replies_restored": flows["replies_restored"]}


@pytest.mark.parametrize("remover, reason", [("sweep", "expired"), ("disable", "ended")])
def test_a_status_while_the_control_plane_removes_connections_counts_no_eviction(
        balancer, fibnet, monkeypatch, remover, reason):
    """A status (a scrape) that read the tables between the sweep's or an
    apply's deletion and its count would take what went for evicted, for good
    (the largest count stays): it waits for the count."""
    dp = balancer.datapath
    lb = Harness(dp)
    shorten_timeouts(balancer)
    for sport in range(53200, 53210):
        bid = handshake(lb, fibnet, sport)
        if remover == "sweep":
            age(dp, "flows", (CLIENT, VIP, sport, 80, TCP_P), 10)
            age(dp, "flows", (BACKENDS[bid][0], CLIENT, 8080, sport, TCP_P), 10)
    readers, seen = [], []
    deleter = "_reap_run" if remover == "sweep" else "_delete_batch"
    delete = getattr(dp, deleter)

    def deleting(*args):
        gone = delete(*args)
        readers.append(threading.Thread(target=lambda: seen.append(removed(balancer))))
        readers[-1].start()
        readers[-1].join(0.5)           # done by then, unless it waits for the count
        return gone

    monkeypatch.setattr(dp, deleter, deleting)
    if remover == "sweep":
        balancer.datapath.sweep_flows()
    else:
        balancer.set_admin("disable", "default", "backend1")
    for reader in readers:
        reader.join(10)
    assert seen and all((s["evicted"], s[reason]) == (0, 10) for s in seen), seen
    assert (removed(balancer)["evicted"], removed(balancer)[reason]) == (0, 10)


def test_connections_that_come_while_a_status_reads_the_tables_are_no_evictions(
        balancer, fibnet, monkeypatch):
    """A status reads the tables, then what left them: connections the program
    opened or established meanwhile, not in what it read, are not evicted."""
    dp, ext, int_ = balancer.datapath, fibnet.ifindex["ext"], fibnet.ifindex["int"]
    lb = Harness(dp)
    handshake(lb, fibnet, 53300)
    lb.send(syn(53301), ext)
    lb.send(from_backend(1, 53301, "SA"), int_)
    flow_dumps = dp.flow_dumps

    def reading():
        dumps = flow_dumps()
        lb.send(tcp_frame(CLIENT, VIP, 53301, 80, flags="A"), ext)     # established
        handshake(lb, fibnet, 53302)
        lb.send(syn(53303), ext)
        return dumps

    with monkeypatch.context() as m:
        m.setattr(dp, "flow_dumps", reading)
        assert balancer.status()["flows"]["removed"]["evicted"] == 0
    assert removed(balancer)["evicted"] == 0


def test_a_control_process_that_adopts_the_data_path_goes_on_counting(balancer, fibnet):
    """What the control plane counts stays with the maps: a new Balancer on a
    program built on them (a restart of `xlb up`) shows the same, and the
    LRU's evictions are not the previous process's removals."""
    from test_adopt import running_of
    from xlb.balancer import Balancer
    from xlb.datapath import Datapath

    dp = balancer.datapath
    lb = Harness(dp)
    shorten_timeouts(balancer)
    for sport in range(53400, 53404):
        handshake(lb, fibnet, sport)
    age(dp, "flows", (CLIENT, VIP, 53400, 80, TCP_P), 10)
    age(dp, "flows", (BACKENDS[1][0], CLIENT, 8080, 53400, TCP_P), 10)
    evict(dp, "flows", (BACKENDS[1][0], CLIENT, 8080, 53401, TCP_P))
    evict(dp, "flows", (CLIENT, VIP, 53402, 80, TCP_P))
    assert balancer.datapath.sweep_flows() == ({"flows": 1, "flows_new": 0}, 1)
    balancer.set_admin("disable", "default", "backend1")
    before = removed(balancer)
    assert before == {"expired": 1, "reopened": 0, "ended": 2, "evicted": 1,
                      "replies_restored": 1}

    again = Datapath(running=running_of(dp))
    try:
        adopted = Balancer(again)
        adopted.adopt(balancer.config, balancer.admin)
        assert removed(adopted) == before
    finally:
        again.close()


def test_a_sweep_that_fails_is_warned_of_and_the_sweeps_go_on(balancer, fibnet, monkeypatch,
                                                               capsys):
    """The kernel refuses the count of what a sweep removed (control_stats
    frozen; memory pressure can refuse a test-run so): a warning, and the next
    sweep comes. Any failure but DatapathError ended the sweeps for the life
    of `xlb up`, unsaid: no idle connection went again, and no evicted reply
    entry came back."""
    import asyncio

    from test_daemon import freeze
    from xlb import sweep

    class Stop(Exception):
        pass

    async def sleep(seconds):
        raise Stop

    dp = balancer.datapath
    shorten_timeouts(balancer)
    handshake(Harness(dp), fibnet, 53500)
    age(dp, "flows", (CLIENT, VIP, 53500, 80, TCP_P), 10)
    age(dp, "flows", (BACKENDS[1][0], CLIENT, 8080, 53500, TCP_P), 10)
    freeze(dp, "control_stats")
    monkeypatch.setattr(sweep.asyncio, "sleep", sleep)
    with pytest.raises(Stop):           # it waits for the next sweep
        asyncio.run(sweep.sweep_forever(balancer))
    [line] = [x for x in capsys.readouterr().err.splitlines() if "event=sweep" in x]
    assert "level=warning" in line and "Could not update table" in line


def test_flows_ended_are_the_open_connections_that_ended(balancer, fibnet):
    """`xlb server disable` (and apply) say how many open connections they
    ended, as ACTIVE counts them: a closing one goes too, but only the ledger
    counts it."""
    lb = Harness(balancer.datapath)
    handshake(lb, fibnet, 53500)
    handshake(lb, fibnet, 53501)
    lb.send(tcp_frame(CLIENT, VIP, 53501, 80, flags="FA"), fibnet.ifindex["ext"])
    assert balancer.status()["pools"][0]["servers"][0]["active_flows"] == 1

    assert balancer.set_admin("disable", "default", "backend1")["flows_ended"] == 1
    assert removed(balancer)["ended"] == 2
    assert entries(balancer.datapath, "flows") == {}


def test_a_slow_read_of_the_flow_tables_stands_for_a_while(balancer, fibnet, monkeypatch):
    """A status whose read of the flow tables was slow (a million connections)
    shows that read again for a while, not a connection opened since, until
    an apply; a quick read is read anew at each status."""
    from xlb import balancer as balancer_module

    lb = Harness(balancer.datapath)

    def active():
        return balancer.status()["pools"][0]["servers"][0]["active_flows"]

    assert active() == 0
    handshake(lb, fibnet, 53600)
    assert active() == 1                        # a quick read: anew
    monkeypatch.setattr(balancer_module, "LEDGER_SLOW", 0.0)
    monkeypatch.setattr(balancer_module, "LEDGER_REUSE", 1e6)
    assert active() == 1                        # read, and "slow": it stands
    handshake(lb, fibnet, 53601)
    assert active() == 1
    balancer.apply(balancer.config, relink=False)
    assert active() == 2
    handshake(lb, fibnet, 53602)
    assert active() == 2
    monkeypatch.setattr(balancer_module, "LEDGER_REUSE", 0)     # its time is up at once
    balancer.apply(balancer.config, relink=False)
    assert active() == 3
    handshake(lb, fibnet, 53603)
    assert active() == 4


def one_connection(balancer, fibnet, policy, sport):
    """The balancer's pool given `policy`, and one connection to its server
    10.1.11.101: (harness, config, pool, the server's backend id)."""
    lb = Harness(balancer.datapath)
    config = balancer.config
    pool = replace(config.pools[0], on_server_down=policy)
    balancer.apply(replace(config, pools=(pool,)), relink=False)
    assert handshake(lb, fibnet, sport) == 1
    return lb, config, pool, balancer.state.backends[("default", "backend1")].id


@pytest.mark.parametrize("policy", ["reset", "keep"])
def test_a_server_given_another_address_is_a_new_server(balancer, fibnet, policy):
    """An apply that moves a server (same name, another address) removes the
    server at its old address and adds one at the new: the connections to the
    old address follow the pool's on_server_down, as a removed server's do,
    and none of them is the server's at its new address."""
    dp, ext = balancer.datapath, fibnet.ifindex["ext"]
    lb, config, pool, old_id = one_connection(balancer, fibnet, policy, 53400)
    moved = replace(pool, servers=(replace(pool.servers[0], address=BACKENDS[2][0]),))
    ended = balancer.apply(replace(config, pools=(moved,)), relink=False)["flows_ended"]

    assert balancer.state.backends[("default", "backend1")].id != old_id
    server = balancer.status()["pools"][0]["servers"][0]
    assert (server["address"], server["active_flows"]) == (str(BACKENDS[2][0]), 0)
    keys = [(CLIENT, VIP, 53400, 80, TCP_P), (BACKENDS[1][0], CLIENT, 8080, 53400, TCP_P)]
    rows = {k: r for table in ("flows", "flows_new") for k, r in entries(dp, table).items()}
    if policy == "reset":
        assert ended == 1 and not rows.keys() & set(keys)
        assert removed(balancer)["ended"] == 1
    else:
        assert ended == 0 and [rows[k].backend_id for k in keys] == [old_id, old_id]
        res = lb.send(tcp_frame(CLIENT, VIP, 53400, 80, flags="PA", payload=b"GET /"), ext)
        assert res.action == XDP_REDIRECT and backend_of(res.data) == 1
        assert dp.flow_ledger().census.open.get(old_id) == 1
    assert backend_of(lb.send(syn(53401), ext).data) == 2       # new flows: the new address


@pytest.mark.parametrize("gone", ["down", "moved"])
def test_a_pool_switched_to_reset_ends_the_connections_keep_kept(balancer, fibnet, gone):
    """Under "keep", a server that is down (its checks failing) or moved to
    another address keeps its connections (to its old address); the apply
    that switches its pool to "reset" ends them, as the new policy would have
    when it went, and counts them; a connection to the moved server's new
    address goes on."""
    dp = balancer.datapath
    lb, config, pool, _ = one_connection(balancer, fibnet, "keep", 53430)
    if gone == "down":
        balancer.health = {("default", "backend1"): "down"}    # as the checks' states go
    else:
        pool = replace(pool, servers=(replace(pool.servers[0], address=BACKENDS[2][0]),))
    assert balancer.apply(replace(config, pools=(pool,)), relink=False)["flows_ended"] == 0
    keys = {(CLIENT, VIP, 53430, 80, TCP_P), (BACKENDS[1][0], CLIENT, 8080, 53430, TCP_P)}
    assert keys <= entries(dp, "flows").keys()
    if gone == "moved":
        assert handshake(lb, fibnet, 53431) == 2
    reset = replace(pool, on_server_down="reset")
    assert balancer.apply(replace(config, pools=(reset,)), relink=False)["flows_ended"] == 1
    left = entries(dp, "flows").keys()
    assert not keys & left and removed(balancer)["ended"] == 1
    assert ((CLIENT, VIP, 53431, 80, TCP_P) in left) == (gone == "moved")


@pytest.mark.parametrize("policy", ["reset", "keep"])
@pytest.mark.parametrize("rename", ["server", "pool"])
def test_a_renamed_server_keeps_its_connections(balancer, fibnet, policy, rename):
    """Renamed, or in a renamed pool for the same frontend, the server at the
    same address and port is the same server: its open connections go on
    (under "reset" too), still counted as its own, and so do its counters."""
    ext = fibnet.ifindex["ext"]
    lb, config, pool, old_id = one_connection(balancer, fibnet, policy, 53410)
    before = balancer.status()["pools"][0]["servers"][0]
    if rename == "server":
        pool = replace(pool, servers=(replace(pool.servers[0], name="was-1"),))
    else:
        pool = replace(pool, name="web")
        config = replace(config, frontends=tuple(replace(f, pool="web")
                                                 for f in config.frontends))
    assert balancer.apply(replace(config, pools=(pool,)), relink=False)["flows_ended"] == 0

    key = (pool.name, pool.servers[0].name)
    assert balancer.state.backends[key].id == old_id
    server = balancer.status()["pools"][0]["servers"][0]
    assert (server["name"], server["active_flows"]) == (key[1], 1)
    assert server["packets_in"] == before["packets_in"] > 0
    res = lb.send(tcp_frame(CLIENT, VIP, 53410, 80, flags="PA", payload=b"GET /"), ext)
    assert res.action == XDP_REDIRECT and backend_of(res.data) == 1
    assert removed(balancer)["ended"] == 0


def test_a_restart_with_the_server_renamed_keeps_its_connections(balancer, fibnet):
    """`xlb up` with a file that renames the server, adopting the data path
    that the old config filled (as it saved it): the same server still."""
    from test_adopt import running_of
    from xlb.balancer import Balancer
    from xlb.datapath import Datapath

    lb, config, pool, old_id = one_connection(balancer, fibnet, "reset", 53420)
    renamed = replace(pool, servers=(replace(pool.servers[0], name="was-1"),))
    again = Datapath(running=running_of(balancer.datapath))
    try:
        adopted = Balancer(again)
        adopted.adopt(balancer.config, balancer.admin)
        assert adopted.apply(replace(config, pools=(renamed,)), relink=False)[
            "flows_ended"] == 0
        assert adopted.state.backends[("default", "was-1")].id == old_id
        assert adopted.status()["pools"][0]["servers"][0]["active_flows"] == 1
    finally:
        again.close()


# A flood of new flows -------------------------------------------------------------------

def test_a_flood_of_new_flows_evicts_no_established_connection(root, fibnet, cpus):
    """32 established connections, then 20,000 SYNs from random sources into a
    half-open table of 4,096 entries: every established connection keeps its
    backend, and the half-open table is what overflows."""
    import os
    from xlb.datapath import Datapath, Limits

    dp = Datapath(Limits(max_flows=4096, max_new_flows=4096))
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        for bid, (addr, port) in BACKENDS.items():
            dp.set_backend(bid, addr, port)
        dp.write_ring(2, [1, 2])
        dp.set_service(VIP, 80, TCP_P, SVC_TCP, 2, 2)
        dp.set_timeouts(SVC_TCP, *TIMEOUTS.values())
        dp.set_vip(VIP)
        dp.set_forwarding(True)
        fibnet.as_native(dp)
        flood = Harness(dp, service_ids=(SVC_TCP,), backend_ids=BACKENDS)
        ext, int_ = fibnet.ifindex["ext"], fibnet.ifindex["int"]
        kept = {sport: handshake(flood, fibnet, sport) for sport in range(55000, 55032)}
        rng = random.Random(9)
        for n in range(20000):
            src = IPv4Address(rng.getrandbits(32) & 0x00ffffff | 0x0a000000)   # 10.x.y.z
            dp.test_run(tcp_frame(src, VIP, 1024 + n % 60000, 80, flags="S"), ext)
        census = dp.flow_census()
        assert census.established == 32
        assert dp.flow_counters().created - dp.flow_counters().established > 4096
        for sport, bid in kept.items():
            res = dp.test_run(tcp_frame(CLIENT, VIP, sport, 80, flags="PA", payload=b"x"), ext)
            assert (res.action, backend_of(res.data)) == (XDP_REDIRECT, bid)
            assert ip_of(dp.test_run(from_backend(bid, sport, "PA"), int_).data, "src") == VIP
    finally:
        os.sched_setaffinity(0, allowed)
        dp.close()


# Scale -------------------------------------------------------------------------------------

def test_a_million_connections(root, fibnet, cpus):
    """A table sized for 1,000,000 connections holds them all (written in
    batches as the program would), the control plane reads and counts them,
    and a packet of the last one still goes to its backend. The memory that
    `xlb up --flow-table` checks beforehand is what the kernel takes (but for
    the tables' fixed header)."""
    import os
    import tracemalloc
    from xlb.datapath import Limits

    n = 1_000_000
    limits = Limits.for_connections(n)
    dp = one_backend(limits, fibnet)
    memory = dp.map_memory()
    assert 0 <= memory["flows"] + memory["flows_new"] - limits.flow_table_bytes() < 4096
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        be_addr, be_port = BACKENDS[1]
        table = dp._maps["flows"]
        key, value = struct.Struct(layout.struct_format(layout.FlowKey)), \
            struct.Struct(layout.struct_format(layout.Flow))
        le = lambda a: int.from_bytes(IPv4Address(a).packed, "little")    # noqa: E731
        vip, be, seen = le(VIP), le(be_addr), dp.now()
        est = STATE["established"]
        keys, values = bytearray(), bytearray()
        for i in range(n):
            client = le(0x0b000000 + i)                       # 11.0.0.0 and up
            keys += key.pack(client, vip, socket.htons(40000), socket.htons(80), TCP_P)
            values += value.pack(be, socket.htons(be_port), layout.FLOW_FORWARD, est,
                                 SVC_TCP, 1, 900, seen)
            keys += key.pack(be, client, socket.htons(be_port), socket.htons(40000), TCP_P)
            values += value.pack(vip, socket.htons(80), layout.FLOW_REPLY, est,
                                 SVC_TCP, 1, 900, seen)
        for start in range(0, 2 * n, 200_000):
            k = (table.Key * 200_000).from_buffer_copy(keys, start * key.size)
            v = (table.Leaf * 200_000).from_buffer_copy(values, start * value.size)
            table.items_update_batch(k, v)
        tracemalloc.start()
        census = dp.flow_census()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert census.entries["flows"] == 2 * n and census.established == n
        # Read in bulk, not a Python object per entry (gigabytes at this size):
        # about the tables' bytes, held twice while the batches are joined.
        assert peak < 4 * 2 * n * (key.size + value.size)
        tracemalloc.start()
        assert dp.sweep_flows() == ({"flows": 0, "flows_new": 0}, 0)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        # Nothing idle, nothing to mend: the sweep decodes no entry.
        print(f"\nsweep of {n} live connections: {peak / 2**20:.0f} MiB of Python memory")
        assert peak < 8 * 2 * n * (key.size + value.size)
        tracemalloc.start()
        assert dp.delete_flows({2}, {SVC_UDP}) == {"flows": 0, "flows_new": 0}
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        # None is the ended server's or service's: no entry is decoded.
        print(f"\nending a server of none of {n} connections: {peak / 2**20:.0f} MiB of Python memory")
        assert peak < 4 * 2 * n * (key.size + value.size)
        assert census.open == {1: n}
        last = IPv4Address(0x0b000000 + n - 1)
        res = dp.test_run(tcp_frame(last, VIP, 40000, 80, flags="A"), fibnet.ifindex["ext"])
        assert (res.action, ip_of(res.data, "dst")) == (XDP_REDIRECT, be_addr)
        memory = sum(dp.map_memory().values())
        print(f"\nmaps for {n} connections: {memory / 2**20:.0f} MiB")
        # All of them expire at once: the sweep removes and counts each.
        cpu = time.thread_time()
        assert dp.sweep_flows(seen + 1000 * SEC) == ({"flows": n, "flows_new": 0}, 0)
        cpu = time.thread_time() - cpu
        print(f"sweep of {n} expired connections: {cpu:.1f} s of CPU")
        assert dp.flow_entries() == 0 and dp.control_counters().expired_flows == n
    finally:
        os.sched_setaffinity(0, allowed)
        dp.close()


# ICMP -------------------------------------------------------------------------------------

def icmp_frame(src, dst, icmp, payload=b"", eth_src=CLIENT_MAC, eth_dst=LB_MAC, **ip):
    return raw(Ether(src=eth_src, dst=eth_dst) / IP(src=str(src), dst=str(dst), **ip)
               / icmp / Raw(payload))


@pytest.mark.parametrize("ident, seq, payload", [(7, 3, b"ping" * 10), (0, 0, b""),
                                                   (0, 0, bytes(8))],
                         ids=["ping", "all-zero", "all-zero-payload"])
def test_a_ping_of_a_vip_is_answered(lb, fibnet, ident, seq, payload):
    """An echo of all zeros (id, sequence, data, as a crafted probe sends)
    sums to +0: its reply's checksum is 0xffff, as Linux computes it; 0x0000
    (-0's, where the incremental update leads) fails the sender's check."""
    frame = icmp_frame(CLIENT, VIP, ICMP(id=ident, seq=seq), payload, ttl=61, id=0x77)
    res = lb.send(frame, fibnet.ifindex["ext"])
    assert res.action == XDP_TX
    assert res.data == icmp_frame(VIP, CLIENT, ICMP(type=0, id=ident, seq=seq), payload,
                                  eth_src=LB_MAC, eth_dst=CLIENT_MAC, ttl=64, id=0x77)
    assert ones_sum(res.data[34:]) == 0xffff, "the ICMP checksum does not verify"
    lb.expect("icmp_echo_reply")


def test_a_ping_of_a_vip_with_df_is_answered_without(lb, fibnet):
    """iputils' ping sets DF on its requests; Linux answers without it (its
    ICMP socket's IP_PMTUDISC_DONT), and with an id of its own, so that a
    router before a narrower link on the way back fragments the reply. With
    DF, that router's "fragmentation needed" went to the VIP, about no flow,
    and was dropped: a large ping of the VIP went unanswered where a
    server's was answered."""
    ids = set()
    for seq in range(8):
        frame = icmp_frame(CLIENT, VIP, ICMP(id=7, seq=seq), b"ping" * 350, flags="DF", id=0)
        res = lb.send(frame, fibnet.ifindex["ext"])
        assert res.action == XDP_TX
        ident, = struct.unpack("!H", res.data[18:20])
        assert res.data == icmp_frame(VIP, CLIENT, ICMP(type=0, id=7, seq=seq), b"ping" * 350,
                                      eth_src=LB_MAC, eth_dst=CLIENT_MAC, ttl=64, id=ident)
        ids.add(ident)
        lb.expect("icmp_echo_reply")
    # An atomic request's id (0: as Linux sends from some sockets) would not
    # tell a fragmented reply from the next one.
    assert len(ids) > 1, "every reply has the request's id 0"


def quote(frame: bytes, size: int = 28) -> bytes:
    """What an ICMP error quotes of a frame: its IP header and `size` - 20 bytes."""
    return frame[14:14 + size]


# ICMP errors xlb translates, as Linux's NAT does.
ERRORS = {"too-big": ICMP(type=3, code=4, nexthopmtu=1200),
          "port-unreachable": ICMP(type=3, code=3),
          "parameter-problem": ICMP(type=12, code=0, ptr=8)}


@pytest.mark.parametrize("proto, size, udp_sum, error", [
    (UDP_P, 28, "computed", "too-big"), (UDP_P, 28, "none", "too-big"),
    (UDP_P, 28, "computes-to-zero", "too-big"), (TCP_P, 28, None, "too-big"),
    (TCP_P, 40, None, "too-big"), (TCP_P, 40, None, "parameter-problem"),
], ids=["udp", "udp-no-checksum", "udp-checksum-computes-to-zero", "tcp-8-bytes",
        "tcp-whole-header", "tcp-parameter-problem"])
def test_an_error_about_a_reply_goes_to_the_backend(lb, fibnet, proto, size, udp_sum, error):
    """A router on the client's side (10.1.1.2) cannot forward a reply of the
    VIP: its error, to the VIP, is made the backend's, about the packet as the
    backend sent it (outer destination, quoted source, every checksum). A
    quoted UDP checksum is the backend's: 0 (none) stays 0, and one that
    computes to 0 is 0xffff (RFC 768)."""
    sport = 56000 + size + proto + {"none": 100, "computes-to-zero": 200}.get(udp_sum, 0) \
        + 300 * (error == "parameter-problem")
    opener = udp_frame(CLIENT, VIP, sport, 80) if proto == UDP_P else syn(sport)
    bid = backend_of(lb.send(opener, fibnet.ifindex["ext"]).data)
    be_addr, be_port = BACKENDS[bid]
    payload, chksum = b"r" * 40, 0 if udp_sum == "none" else None
    if udp_sum == "computes-to-zero":
        payload += word_for_zero_checksum(udp_frame(be_addr, CLIENT, be_port, sport,
                                                    payload=payload + b"\0\0"))
    make = (lambda s, d, sp, dp: udp_frame(s, d, sp, dp, payload=payload, chksum=chksum)) \
        if proto == UDP_P else (lambda s, d, sp, dp: tcp_frame(s, d, sp, dp, flags="PA",
                                                               payload=payload))
    if udp_sum == "computes-to-zero":
        assert make(be_addr, CLIENT, be_port, sport)[40:42] == b"\xff\xff"
    frame = icmp_frame("10.1.1.2", VIP, ERRORS[error], quote(make(VIP, CLIENT, 80, sport), size))
    res = lb.send(frame, fibnet.ifindex["ext"])
    assert res.action == XDP_PASS
    assert res.data == icmp_frame("10.1.1.2", be_addr, ERRORS[error],
                                  quote(make(be_addr, CLIENT, be_port, sport), size))
    lb.expect("icmp_to_backend")


@pytest.mark.parametrize("vip", [MVIP, VIP], ids=["maglev", "roundrobin"])
def test_an_error_about_a_reply_no_entry_knows_goes_where_maglev_sends_its_client(
        lb, fibnet, vip):
    """In an ECMP group the router hashes a router's error by its own header,
    so it reaches a node that never saw the connection (so after a failover):
    of a Maglev service it goes to the server every node's table picks for the
    client, as one from the connection's own node would (path MTU discovery
    of large replies); of a ring's, nothing says where its flow went."""
    error = ICMP(type=3, code=4, nexthopmtu=1200)
    for sport in range(57000, 57008):
        reply = tcp_frame(vip, CLIENT, 80, sport, flags="PA", payload=b"r" * 40)
        frame = icmp_frame("10.1.1.2", vip, error, quote(reply))
        res = lb.send(frame, fibnet.ifindex["ext"])
        assert connection(lb.dp, sport, vip=vip) == (None, None, None)
        if vip == VIP:
            assert (res.action, res.data) == (XDP_DROP, frame)
            lb.expect("drop_no_service")
            continue
        be_addr, be_port = BACKENDS[maglev_backend(CLIENT, sport)]
        reply = tcp_frame(be_addr, CLIENT, be_port, sport, flags="PA", payload=b"r" * 40)
        assert (res.action, res.data) == (
            XDP_PASS, icmp_frame("10.1.1.2", be_addr, error, quote(reply)))
        lb.expect("icmp_to_backend")


# Source affinity (algorithm "source") -------------------------------------------------

SVIP = IPv4Address("10.1.1.104")          # the source-affinity services' VIP, tcp and udp
SVC_SOURCE, SVC_SOURCE_UDP = 5, 6
SOURCE_TABLE = 2                          # MAGLEV_TABLE's pair is 0 and 1
CLIENTS = [IPv4Address("10.1.1.20") + i for i in range(24)]


def source_backend(client) -> int:
    """The backend every node's table picks for every flow of client to SVIP."""
    return MAGLEV_SLOTS[source_hash(client) % len(MAGLEV_SLOTS)]


@pytest.fixture
def by_source(lb):
    """SVIP:80, tcp and udp, Maglev by the client's address over MAGLEV_SLOTS,
    for one test."""
    dp = lb.dp
    dp.write_maglev(SOURCE_TABLE, MAGLEV_SLOTS)
    for sid, proto in ((SVC_SOURCE, TCP_P), (SVC_SOURCE_UDP, UDP_P)):
        dp.set_timeouts(sid, *TIMEOUTS.values())
        dp.set_service(SVIP, 80, proto, sid, SOURCE_TABLE, len(MAGLEV_SLOTS),
                       layout.SERVICE_MAGLEV | layout.SERVICE_SOURCE)
    dp.set_vip(SVIP)
    yield Harness(dp, service_ids=(SVC_SOURCE, SVC_SOURCE_UDP), backend_ids=BACKENDS)
    for proto in (TCP_P, UDP_P):
        dp.del_service(SVIP, 80, proto)
    dp.del_vip(SVIP)


def test_source_sends_every_flow_of_a_client_to_one_backend(by_source, fibnet):
    """Two connections of a client (two source ports) and its datagram flow
    reach one backend, the table's at source_hash(client) as every node
    computes it; clients are spread over the backends by the table."""
    lb = by_source
    reached = set()
    for client in CLIENTS:
        bid = source_backend(client)
        for frame, sid in ((tcp_frame(client, SVIP, 40000, 80, flags="S"), SVC_SOURCE),
                           (tcp_frame(client, SVIP, 40001, 80, flags="S"), SVC_SOURCE),
                           (udp_frame(client, SVIP, 40002, 80, payload=b"q"), SVC_SOURCE_UDP)):
            res = lb.send(frame, fibnet.ifindex["ext"])
            assert (res.action, backend_of(res.data)) == (XDP_REDIRECT, bid)
            lb.expect("forward_redirect", flow=("in", sid, bid, True))
        reached.add(bid)
    assert reached == {1, 2}


@pytest.mark.parametrize("flags", ["A", "PA"])
def test_source_picks_by_the_client_even_mid_connection(by_source, fibnet, flags):
    """A packet of a connection this node never saw goes to the backend of its
    client's address, whichever its port: where the node that saw it sent it."""
    lb = by_source
    for client in CLIENTS:
        sport = 41000 + 100 * len(flags)
        res = lb.send(tcp_frame(client, SVIP, sport, 80, flags=flags), fibnet.ifindex["ext"])
        assert backend_of(res.data) == source_backend(client)
        lb.expect("forward_redirect", flow=("in", SVC_SOURCE, source_backend(client), True))


def test_a_backends_packet_is_adopted_where_source_sends_its_client(by_source, fibnet):
    """adopt_replies with a source pool: the backend of the client's address
    has its packet adopted, whatever the client's port; the other's passes."""
    lb, dp = by_source, by_source.dp
    bid = source_backend(CLIENT)
    for addr, port in BACKENDS.values():
        dp.set_owner(addr, port, TCP_P, [(SVIP, 80)])
    dp.set_service(SVIP, 80, TCP_P, SVC_SOURCE, SOURCE_TABLE, len(MAGLEV_SLOTS),
                   layout.SERVICE_MAGLEV | layout.SERVICE_SOURCE | layout.SERVICE_ADOPT)
    try:
        for sport in range(42000, 42008):
            other = from_backend(3 - bid, sport, "PA", payload=b"late")
            res = lb.send(other, fibnet.ifindex["int"])
            assert (res.action, res.data) == (XDP_PASS, other)
            res = lb.send(from_backend(bid, sport, "PA", payload=b"late"), fibnet.ifindex["int"])
            assert res.data == tcp_frame(SVIP, CLIENT, 80, sport, flags="PA", payload=b"late",
                                         ttl=63, eth_src=fibnet.MACS["ext"], eth_dst=CLIENT_MAC)
            lb.expect("reply_redirect", flow=("out", SVC_SOURCE, bid, False))
            assert connection(dp, sport, vip=SVIP)[1].backend_id == bid
    finally:
        for addr, port in BACKENDS.values():
            dp.del_owner(addr, port, TCP_P)


def test_an_error_about_a_reply_no_entry_knows_goes_where_source_sends_its_client(
        by_source, fibnet):
    """As with maglev (ECMP, a failover): to the backend of the client's address."""
    lb = by_source
    error = ICMP(type=3, code=4, nexthopmtu=1200)
    be_addr, be_port = BACKENDS[source_backend(CLIENT)]
    for sport in range(43000, 43008):
        reply = tcp_frame(SVIP, CLIENT, 80, sport, flags="PA", payload=b"r" * 40)
        res = lb.send(icmp_frame("10.1.1.2", SVIP, error, quote(reply)), fibnet.ifindex["ext"])
        reply = tcp_frame(be_addr, CLIENT, be_port, sport, flags="PA", payload=b"r" * 40)
        assert (res.action, res.data) == (
            XDP_PASS, icmp_frame("10.1.1.2", be_addr, error, quote(reply)))
        lb.expect("icmp_to_backend")


QUOTED_OPTIONS = [IPOption_NOP()] * 7 + [IPOption_EOL()]       # 8 bytes: IHL 7


@pytest.mark.parametrize("proto", [UDP_P, TCP_P], ids=["udp", "tcp"])
@pytest.mark.parametrize("about", ["reply", "forwarded"])
def test_an_error_quoting_a_packet_with_ip_options_is_translated(lb, fibnet, about, proto):
    """The quoted packet's ports follow its options, as Linux's NAT and IPVS
    read them: an error about a flow's packet that carried IP options is
    translated as any (a "too big" about a reply reaches its backend, a
    backend's "port unreachable" its client), every checksum kept right."""
    ext, int_ = fibnet.ifindex["ext"], fibnet.ifindex["int"]
    sport = 58400 + proto + 100 * (about == "reply")
    opener = udp_frame(CLIENT, VIP, sport, 80) if proto == UDP_P else syn(sport)
    bid = backend_of(lb.send(opener, ext).data)
    be_addr, be_port = BACKENDS[bid]

    def quoted(src, dst, sp, dp):       # the IP header with its options, the whole L4 header
        l4 = UDP(sport=sp, dport=dp) if proto == UDP_P else TCP(sport=sp, dport=dp, flags="PA")
        packet = raw(IP(src=str(src), dst=str(dst), flags="DF", options=QUOTED_OPTIONS)
                     / l4 / Raw(b"q" * 12))
        return packet[:28 + (8 if proto == UDP_P else 20)]
    if about == "reply":
        error = ICMP(type=3, code=4, nexthopmtu=1200)
        frame = icmp_frame("10.1.1.2", VIP, error, quoted(VIP, CLIENT, 80, sport))
        want = icmp_frame("10.1.1.2", be_addr, error, quoted(be_addr, CLIENT, be_port, sport))
        ifindex, reason = ext, "icmp_to_backend"
    else:
        error = ICMP(type=3, code=3)
        frame = icmp_frame(be_addr, CLIENT, error, quoted(CLIENT, be_addr, sport, be_port),
                           eth_src=BACKEND_MAC)
        want = icmp_frame(VIP, CLIENT, error, quoted(CLIENT, VIP, sport, 80),
                          eth_src=BACKEND_MAC)
        ifindex, reason = int_, "icmp_to_client"
    assert frame[14 + 20 + 8] == 0x47
    res = lb.send(frame, ifindex)
    assert (res.action, res.data) == (XDP_PASS, want)
    lb.expect(reason)


@pytest.mark.parametrize("first_byte", [0x65, 0x44], ids=["version-6", "ihl-4"])
def test_an_error_quoting_no_plain_ipv4_header_is_about_no_flow(lb, fibnet, first_byte):
    """The quote is read as an IPv4 header: another version, or a header
    shorter than 20 bytes, is no packet of a flow, even with a live flow's
    ports at byte 20."""
    sport = 56150 + first_byte % 16
    lb.send(syn(sport), fibnet.ifindex["ext"])
    quoted = bytes([first_byte]) + quote(tcp_frame(VIP, CLIENT, 80, sport, flags="PA"))[1:]
    frame = icmp_frame("10.1.1.2", VIP, ICMP(type=3, code=4, nexthopmtu=1200), quoted)
    res = lb.send(frame, fibnet.ifindex["ext"])
    assert (res.action, res.data) == (XDP_DROP, frame)
    lb.expect("drop_no_service")


@pytest.mark.parametrize("about", ["reply", "forwarded"])
def test_an_error_quoting_a_later_fragment_is_about_no_flow(lb, fibnet, about):
    """A fragment after the first carries no ports: the 4 bytes where a
    quote's ports would be are payload, even when they spell a live flow's
    ports. As Linux's conntrack (no tuple for such a quote), the error is
    not translated: dropped to the VIP, passed the other way, untouched."""
    sport = 56160 + len(about)
    bid = backend_of(lb.send(udp_frame(CLIENT, VIP, sport, 80), fibnet.ifindex["ext"]).data)
    be_addr, be_port = BACKENDS[bid]
    src, dst, ports = (VIP, CLIENT, (80, sport)) if about == "reply" else \
        (CLIENT, be_addr, (sport, be_port))
    quoted = raw(IP(src=str(src), dst=str(dst), proto=UDP_P, frag=185, id=0x5501)
                 / Raw(struct.pack("!HH", *ports) + b"data"))      # 28 bytes, as quote()'s
    if about == "reply":
        frame = icmp_frame("10.1.1.2", VIP, ICMP(type=11, code=0), quoted)
        ifindex, action, reason = fibnet.ifindex["ext"], XDP_DROP, "drop_no_service"
    else:
        frame = icmp_frame("10.1.11.1", CLIENT, ICMP(type=11, code=0), quoted,
                           eth_src=BACKEND_MAC)
        ifindex, action, reason = fibnet.ifindex["int"], XDP_PASS, "pass_not_vip"
    res = lb.send(frame, ifindex)
    assert (res.action, res.data) == (action, frame)
    lb.expect(reason)


@pytest.mark.parametrize("error", ["port-unreachable", "parameter-problem"])
@pytest.mark.parametrize("client", [CLIENT, ON_A_VIPS_BIT], ids=["client", "on-a-vips-bit"])
def test_an_error_of_the_backend_goes_to_the_client(lb, fibnet, client, error):
    """The backend has nothing on a UDP port: its port-unreachable reaches the
    client from the VIP, about the datagram the client sent to the VIP. Also
    for a client whose address the VIP filter takes for a VIP's, and for a
    parameter problem."""
    res = lb.send(udp_frame(client, VIP, 56100, 80, payload=b"q"), fibnet.ifindex["ext"])
    bid = backend_of(res.data)
    be_addr, be_port = BACKENDS[bid]
    frame = icmp_frame(be_addr, client, ERRORS[error],
                       quote(udp_frame(client, be_addr, 56100, be_port, payload=b"q")),
                       eth_src=BACKEND_MAC)
    res = lb.send(frame, fibnet.ifindex["int"])
    assert res.action == XDP_PASS
    assert res.data == icmp_frame(VIP, client, ERRORS[error],
                                  quote(udp_frame(client, VIP, 56100, 80, payload=b"q")),
                                  eth_src=BACKEND_MAC)
    lb.expect("icmp_to_client")


@pytest.mark.parametrize("about", ["reply", "forwarded"])
def test_an_error_about_a_dead_connection_is_about_no_flow(lb, fibnet, short_timeouts, about):
    """Once a connection is idle past its timeout both ways, its server may
    serve another client on that port: an error about it is not translated,
    as one about a flow no entry knows (dropped to the VIP, else passed)."""
    sport = 53900 + len(about)
    bid = handshake(lb, fibnet, sport)
    be_addr, be_port = BACKENDS[bid]
    if about == "reply":
        frame = icmp_frame("10.1.1.2", VIP, ICMP(type=3, code=4, nexthopmtu=1200),
                           quote(tcp_frame(VIP, CLIENT, 80, sport, flags="A")))
        ifindex, alive, dead = fibnet.ifindex["ext"], "icmp_to_backend", "drop_no_service"
    else:
        frame = icmp_frame(be_addr, CLIENT, ICMP(type=3, code=3),
                           quote(tcp_frame(CLIENT, be_addr, sport, be_port, flags="A")),
                           eth_src=BACKEND_MAC)
        ifindex, alive, dead = fibnet.ifindex["int"], "icmp_to_client", "pass_not_vip"
    lb.send(frame, ifindex)
    lb.expect(alive)                        # alive: translated
    age(lb.dp, "flows", (CLIENT, VIP, sport, 80, TCP_P), 6)
    age(lb.dp, "flows", (be_addr, CLIENT, be_port, sport, TCP_P), 6)
    res = lb.send(frame, ifindex)
    assert (res.action, res.data) == (XDP_DROP if about == "reply" else XDP_PASS, frame)
    lb.expect(dead)


def test_an_error_about_a_dead_maglev_connection_goes_where_maglev_sends_its_client(lb,
                                                                                   fibnet):
    """Dead (idle past its timeout both ways), a Maglev frontend's connection
    is as after the sweep: an error about its reply goes where one about a
    connection no entry knows goes, to the server Maglev picks for its
    client. It was dropped until a sweep happened to come first."""
    dp, ext, int_ = lb.dp, fibnet.ifindex["ext"], fibnet.ifindex["int"]
    sport = 57150
    bid = maglev_backend(CLIENT, sport)
    be_addr, be_port = BACKENDS[bid]
    error = ICMP(type=3, code=4, nexthopmtu=1200)
    frame = icmp_frame("10.1.1.2", MVIP, error, quote(tcp_frame(MVIP, CLIENT, 80, sport,
                                                                flags="A")))
    translated = icmp_frame("10.1.1.2", be_addr, error,
                            quote(tcp_frame(be_addr, CLIENT, be_port, sport, flags="A")))
    dp.set_timeouts(SVC_MAGLEV, *SHORT_TIMEOUTS)
    try:
        lb.send(tcp_frame(CLIENT, MVIP, sport, 80, flags="S"), ext)
        lb.send(from_backend(bid, sport, "SA"), int_)
        lb.send(tcp_frame(CLIENT, MVIP, sport, 80, flags="A"), ext)
        assert connection(dp, sport, vip=MVIP)[0] == "flows"
        age(dp, "flows", (CLIENT, MVIP, sport, 80, TCP_P), 6)
        age(dp, "flows", (be_addr, CLIENT, be_port, sport, TCP_P), 6)
        res = lb.send(frame, ext)
        assert (res.action, res.data) == (XDP_PASS, translated)
        lb.expect("icmp_to_backend")
    finally:
        dp.set_timeouts(SVC_MAGLEV, *TIMEOUTS.values())


# Fragments ---------------------------------------------------------------------------------

def fragments(src, dst, sport, dport, ip_id, eth_src=CLIENT_MAC, eth_dst=LB_MAC, ttl=64,
              proto="udp"):
    """A UDP datagram (or TCP segment) of 3,000 bytes cut into fragments of at
    most 1,500 bytes by scapy, its checksum over the whole datagram."""
    from scapy.all import fragment
    from scapy.layers.inet import TCP, UDP
    l4 = UDP(sport=sport, dport=dport) if proto == "udp" else \
        TCP(sport=sport, dport=dport, flags="PA")
    dgram = IP(src=str(src), dst=str(dst), id=ip_id, ttl=ttl) / l4 / Raw(bytes(range(256)) * 12)
    return [raw(Ether(src=eth_src, dst=eth_dst) / f) for f in fragment(dgram, fragsize=1480)]


@pytest.mark.parametrize("mode", ["fast", "kernel"])
def test_a_fragmented_datagram_goes_both_ways_as_its_flow(lb, fibnet, mode):
    """The first fragment (the ports, the checksum of the whole datagram) is
    balanced and rewritten as its flow's packets are; the later ones, no
    ports, go where it went, their address alone rewritten, and the same way:
    to the next hop with the fast path, else through the kernel (a kernel
    that reassembles what it forwards, as conntrack does, would hold later
    fragments for a first that never comes). So a large UDP query and its
    large answer (DNS with EDNS) get through, both ways."""
    ext, int_ = fibnet.ifindex["ext"], fibnet.ifindex["int"]
    sport, query_id, answer_id = 57000 + len(mode), 0x5101 + len(mode), 0x6202 + len(mode)
    fast = mode == "fast"
    action, way = (XDP_REDIRECT, "_redirect") if fast else (XDP_PASS, "")
    with forwarding(lb, mode):
        query = fragments(CLIENT, VIP, sport, 80, query_id)
        assert len(query) == 3
        out = [lb.send(query[0], ext)]
        bid = backend_of(out[0].data)
        lb.expect("forward" + way, flow=("in", SVC_UDP, bid, True))
        for frag in query[1:]:
            out.append(lb.send(frag, ext))
            lb.expect("forward" + way, flow=("in", SVC_UDP, bid, False))
        be_addr, be_port = BACKENDS[bid]
        hop = dict(eth_src=fibnet.MACS["int"], eth_dst=BACKEND_MAC, ttl=63) if fast else {}
        assert [(r.action, r.data) for r in out] == [
            (action, f) for f in fragments(CLIENT, be_addr, sport, be_port, query_id, **hop)]

        out = []
        for frag in fragments(be_addr, CLIENT, be_port, sport, answer_id, eth_src=BACKEND_MAC):
            out.append(lb.send(frag, int_))
            lb.expect("reply" + way, flow=("out", SVC_UDP, bid, False))
        hop = dict(eth_src=fibnet.MACS["ext"], eth_dst=CLIENT_MAC, ttl=63) if fast else \
            dict(eth_src=BACKEND_MAC)
        assert [(r.action, r.data) for r in out] == [
            (action, f) for f in fragments(VIP, CLIENT, 80, sport, answer_id, **hop)]


@pytest.mark.parametrize("mode", ["fast", "kernel"])
def test_a_fragment_over_its_next_hops_mtu_goes_to_the_kernel_to_fragment_again(lb, fibnet, mode):
    """A reply's fragments of 1,500 bytes to a client behind the link of MTU
    1280: each one over that MTU (no DF) goes to the kernel rewritten, to be
    fragmented again, the first as a balanced packet, a later one with its
    address alone; with the fast path the last, small enough, goes straight
    on to its next hop."""
    ext, int_ = fibnet.ifindex["ext"], fibnet.ifindex["int"]
    client, fast = IPv4Address("10.1.13.101"), mode == "fast"
    sport, ip_id = 57010 + len(mode), 0x5111 + len(mode)
    with forwarding(lb, mode):
        bid = backend_of(lb.send(udp_frame(client, VIP, sport, 80), ext).data)
        be_addr, be_port = BACKENDS[bid]
        answer = fragments(be_addr, client, be_port, sport, ip_id, eth_src=BACKEND_MAC)
        assert [len(f) for f in answer] == [1514, 1514, 154]
        out = []
        for frag, reason in zip(answer, ["fib_frag_needed"] * 2 + ["reply_redirect"] if fast
                                else ["reply"] * 3):
            out.append(lb.send(frag, int_))
            lb.expect(reason, flow=("out", SVC_UDP, bid, False))
    passed = fragments(VIP, client, 80, sport, ip_id, eth_src=BACKEND_MAC)
    if not fast:
        assert [(r.action, r.data) for r in out] == [(XDP_PASS, f) for f in passed]
        return
    sent = fragments(VIP, client, 80, sport, ip_id, eth_src=fibnet.MACS["small"],
                     eth_dst=BACKEND_MAC, ttl=63)
    assert [(r.action, r.data) for r in out] == [(XDP_PASS, passed[0]), (XDP_PASS, passed[1]),
                                                 (XDP_REDIRECT, sent[2])]


def test_a_later_fragment_of_a_reused_ip_id_is_not_the_earlier_datagrams(lb, fibnet):
    """A later fragment whose IP id's first fragment came longer ago than a
    reassembly may last (30 s) belongs to a later datagram, whose first this
    node did not see: dropped to the VIP, passed the other way."""
    ext, int_ = fibnet.ifindex["ext"], fibnet.ifindex["int"]
    sport = 57100
    query = fragments(CLIENT, VIP, sport, 80, 0x5301)
    bid = backend_of(lb.send(query[0], ext).data)
    be_addr, be_port = BACKENDS[bid]
    answer = fragments(be_addr, CLIENT, be_port, sport, 0x6302, eth_src=BACKEND_MAC)
    lb.send(answer[0], int_)
    frags = lb.dp._maps["frags"]
    mine = [k for k in frags.keys() if k.id in (socket.htons(0x5301), socket.htons(0x6302))]
    assert len(mine) == 2
    age_keys(frags, mine, 29)
    for sent, ifindex, reason, way in ((query[1], ext, "forward_redirect", "in"),
                                       (answer[1], int_, "reply_redirect", "out")):
        lb.send(sent, ifindex)
        lb.expect(reason, flow=(way, SVC_UDP, bid, False))      # 29 s: the same datagram
    age_keys(frags, mine, 2)            # 31 s
    res = lb.send(query[2], ext)
    assert (res.action, res.data) == (XDP_DROP, query[2])
    lb.expect("drop_fragment")
    res = lb.send(answer[2], int_)
    assert (res.action, res.data) == (XDP_PASS, answer[2])
    lb.expect("pass_not_vip")


def test_a_later_fragment_whose_ttl_runs_out_goes_to_the_kernel_as_it_came(lb, fibnet):
    """As a first fragment's (send): unrewritten, so that the kernel's "time
    exceeded" quotes what the sender sent, and counted for its flow."""
    ext = fibnet.ifindex["ext"]
    sport = 57200
    query = fragments(CLIENT, VIP, sport, 80, 0x5401)
    res = lb.send(query[0], ext)
    bid = backend_of(res.data)
    lb.expect("forward_redirect", flow=("in", SVC_UDP, bid, True))
    late = fragments(CLIENT, VIP, sport, 80, 0x5401, ttl=1)[1]
    res = lb.send(late, ext)
    assert (res.action, res.data) == (XDP_PASS, late)
    lb.expect("ttl_expired", flow=("in", SVC_UDP, bid, False))


MALFORMED_LATER = {"tot-len-beyond-frame": lambda f: f[:-1],
                   "ihl-4": lambda f: f[:14] + b"\x44" + f[15:],
                   "version-6": lambda f: f[:14] + b"\x65" + f[15:],
                   "tot-len-below-header": lambda f: f[:16] + (19).to_bytes(2, "big") + f[18:]}


@pytest.mark.parametrize("odd", MALFORMED_LATER)
@pytest.mark.parametrize("way", ["forward", "reply"])
def test_a_malformed_later_fragment_of_a_known_datagram_is_malformed(lb, fibnet, way, odd):
    """As any malformed packet (its header bad, or cut short of its total
    length): dropped to the VIP, passed from a backend, untouched either way;
    not rewritten for the kernel to drop."""
    ext, int_ = fibnet.ifindex["ext"], fibnet.ifindex["int"]
    n = list(MALFORMED_LATER).index(odd) + (10 if way == "reply" else 0)
    sport, ip_id = 57300 + n, 0x5600 + n
    query = fragments(CLIENT, VIP, sport, 80, ip_id)
    bid = backend_of(lb.send(query[0], ext).data)
    be_addr, be_port = BACKENDS[bid]
    if way == "forward":
        late, ifindex, action, reason = query[1], ext, XDP_DROP, "drop_malformed"
    else:
        answer = fragments(be_addr, CLIENT, be_port, sport, ip_id, eth_src=BACKEND_MAC)
        lb.send(answer[0], int_)
        late, ifindex, action, reason = answer[1], int_, XDP_PASS, "pass_short"
    late = MALFORMED_LATER[odd](late)
    res = lb.send(late, ifindex)
    assert (res.action, res.data) == (action, late)
    lb.expect(reason)


@pytest.mark.parametrize("frame, action, reason", [
    (icmp_frame("10.1.1.2", VIP, ICMP(type=3, code=4), quote(tcp_frame(VIP, CLIENT, 80, 56999))),
     XDP_DROP, "drop_no_service"),
    (icmp_frame(BACKENDS[1][0], CLIENT, ICMP(type=3, code=3),
                quote(udp_frame(CLIENT, BACKENDS[1][0], 56998, 8080)), eth_src=BACKEND_MAC),
     XDP_PASS, "pass_not_vip"),
], ids=["to-a-vip", "to-another-address"])
def test_errors_about_unknown_flows_are_dropped_if_to_a_vip_else_passed(lb, fibnet, frame,
                                                                          action, reason):
    res = lb.send(frame, fibnet.ifindex["ext"])
    assert (res.action, res.data) == (action, frame)
    lb.expect(reason)


@pytest.mark.parametrize("options", [0, 8, 40], ids=["plain", "ihl-7", "ihl-15"])
@pytest.mark.parametrize("mode, client, first", [
    ("fast", "10.1.13.51", None),           # its next hop unresolved: the FIB says "too big"
    ("kernel", "10.1.13.53", None),
    ("fast", "10.1.13.101", 100),           # resolved by a small reply first: the cache says it
    ("kernel", "10.1.13.101", 100),
])
def test_over_the_mtu_with_df_the_sender_learns_the_path_mtu(lb, fibnet, mode, client, first,
                                                             options):
    """A backend's 1300-byte reply to a client behind the link of MTU 1280:
    xlb answers the backend with "fragmentation needed" (MTU 1280) from the
    VIP, quoting the reply as the backend sent it (its IP header, options and
    all, and 8 bytes: the ports), in either forwarding mode (the kernel's own
    answer would quote the rewritten reply, which the backend cannot match to
    its connection)."""
    sport = 56200 + len(mode) + (first or 0) + options
    ip_options = [IPOption_NOP()] * (options - 1) + [IPOption_EOL()] if options else None
    with forwarding(lb, mode):
        bid = backend_of(lb.send(tcp_frame(client, VIP, sport, 80, flags="S"),
                                 fibnet.ifindex["ext"]).data)
        be_addr, be_port = BACKENDS[bid]
        if first:
            small = tcp_frame(be_addr, client, be_port, sport, flags="SA", eth_src=BACKEND_MAC)
            fast = mode == "fast"
            assert lb.send(small, fibnet.ifindex["int"]).action == (XDP_REDIRECT if fast else XDP_PASS)
            lb.expect("reply_redirect" if fast else "reply", flow=("out", SVC_TCP, bid, False))
        reply = tcp_frame(be_addr, client, be_port, sport, flags="A", payload=b"x" * 1300,
                          eth_src=BACKEND_MAC, ip_options=ip_options)
        res = lb.send(reply, fibnet.ifindex["int"])
    assert res.action == XDP_TX
    assert res.data == icmp_frame(VIP, be_addr, ICMP(type=3, code=4, nexthopmtu=1280),
                                  quote(reply, 28 + options),
                                  eth_src=LB_MAC, eth_dst=BACKEND_MAC,
                                  tos=0xc0, id=0, flags=0, ttl=64)
    lb.expect("icmp_too_big", flow=("out", SVC_TCP, bid, False))


@pytest.mark.parametrize("mode", ["fast", "kernel"])
def test_a_clients_packet_over_its_servers_mtu_with_df_is_answered_from_the_vip(lb, fibnet,
                                                                               mode):
    """The other way: a client's 1300-byte segment to VIP:81, whose server
    (10.1.13.101:5353) is behind the link of MTU 1280. xlb answers the client
    from the VIP, quoting the segment as the client sent it (to VIP:81, not
    to the server), in either forwarding mode."""
    dp, sid, bid, ring = lb.dp, 7, 3, 8
    dp.set_backend(bid, IPv4Address("10.1.13.101"), 5353)
    dp.write_ring(ring, [bid])
    dp.set_service(VIP, 81, TCP_P, sid, ring, 1)
    dp.set_timeouts(sid, *TIMEOUTS.values())
    counted = Harness(dp, service_ids=(sid,), backend_ids=(bid,))
    sport = 56300 + len(mode)
    big = tcp_frame(CLIENT, VIP, sport, 81, flags="A", payload=b"x" * 1300)
    try:
        with forwarding(lb, mode):
            counted.send(tcp_frame(CLIENT, VIP, sport, 81, flags="S"), fibnet.ifindex["ext"])
            res = counted.send(big, fibnet.ifindex["ext"])
    finally:
        dp.del_service(VIP, 81, TCP_P)
    assert res.action == XDP_TX
    assert res.data == icmp_frame(VIP, CLIENT, ICMP(type=3, code=4, nexthopmtu=1280), quote(big),
                                  eth_src=LB_MAC, eth_dst=CLIENT_MAC,
                                  tos=0xc0, id=0, flags=0, ttl=64)
    counted.expect("icmp_too_big", flow=("in", sid, bid, False))


def test_the_route_mtu_is_asked_with_the_packets_tos_not_its_routes_metric(lb, fibnet):
    """The route's MTU is asked for in a second lookup, after the first, whose
    answer wrote the route's metric over the query's TOS (a union in struct
    bpf_fib_lookup): with metric 8 the second query asked for TOS 0x08, and
    the MTU of a route of that TOS (1280, locked: forwarding takes the link's
    otherwise) was taken for every packet's. A 1400-byte reply with DF (TOS
    0x10) to a client whose route (metric 8) has its link's MTU, 1500, goes on."""
    client, sport = IPv4Address("10.1.15.10"), 56400
    routes = [("10.1.15.0/24", "dev", "ext", "metric", "8"),
              ("10.1.15.0/24", "tos", "0x08", "dev", "ext", "mtu", "lock", "1280")]
    fibnet.sh("ip", "neigh", "replace", str(client), "lladdr", CLIENT_MAC, "dev", "ext",
              "nud", "permanent")
    try:
        for route in routes:
            fibnet.sh("ip", "route", "add", *route)
        bid = backend_of(lb.send(tcp_frame(client, VIP, sport, 80, flags="S"),
                                 fibnet.ifindex["ext"]).data)
        be_addr, be_port = BACKENDS[bid]
        lb.send(tcp_frame(be_addr, client, be_port, sport, flags="SA", eth_src=BACKEND_MAC),
                fibnet.ifindex["int"])
        lb.expect("reply_redirect", flow=("out", SVC_TCP, bid, False))
        big = tcp_frame(be_addr, client, be_port, sport, flags="A", payload=b"x" * 1400,
                        eth_src=BACKEND_MAC)
        res = lb.send(big, fibnet.ifindex["int"])
    finally:
        for route in routes:
            fibnet.sh("ip", "route", "del", *route)
        fibnet.sh("ip", "neigh", "del", str(client), "dev", "ext")
    assert (res.action, res.data) == (
        XDP_REDIRECT, tcp_frame(VIP, client, 80, sport, flags="A", payload=b"x" * 1400, ttl=63,
                                eth_src=fibnet.MACS["ext"], eth_dst=CLIENT_MAC))
    lb.expect("reply_redirect", flow=("out", SVC_TCP, bid, False))


# Priority-tagged frames (802.1p: VLAN ID 0), balanced as untagged ones -----------------------
#
# What xlb sends out itself leaves untagged, as the kernel would send it (it
# clears the tag on receive): the fast path's packets, the answers. What it
# hands to the kernel keeps the tag, which the kernel clears.

@pytest.mark.parametrize("ifname, action, way", [("ext", XDP_REDIRECT, "_redirect"),
                                                 ("int", XDP_TX, "_tx")])
def test_the_fast_path_sends_priority_tagged_packets_on_untagged(lb, fibnet, ifname, action, way):
    """As a router does (Linux routes such a packet untagged): the same frames
    as the kernel forwarding mode would put on the wire, and no tag for a
    link whose hosts or switch may not take one."""
    sport = 58000 + (ifname == "int")
    res = lb.send(priority_tagged(syn(sport, ttl=9)), fibnet.ifindex[ifname])
    assert res.action == action
    bid = backend_of(res.data)
    be_addr, be_port = BACKENDS[bid]
    assert res.data == tcp_frame(CLIENT, be_addr, sport, be_port, flags="S", ttl=8,
                                 eth_src=fibnet.MACS["int"], eth_dst=BACKEND_MAC)
    assert_checksums(res.data)
    lb.expect("forward" + way, flow=("in", SVC_TCP, bid, True))

    res = lb.send(priority_tagged(from_backend(bid, sport, "SA"), prio=2), fibnet.ifindex["int"])
    assert res.action == XDP_REDIRECT
    assert res.data == tcp_frame(VIP, CLIENT, 80, sport, flags="SA", ttl=63,
                                 eth_src=fibnet.MACS["ext"], eth_dst=CLIENT_MAC)
    assert_checksums(res.data)
    lb.expect("reply_redirect", flow=("out", SVC_TCP, bid, False))


def test_kernel_forwarding_passes_priority_tagged_packets_rewritten_tag_and_all(lb, fibnet):
    sport = 58010
    with forwarding(lb, "kernel"):
        res = lb.send(priority_tagged(syn(sport)), fibnet.ifindex["ext"])
        assert res.action == XDP_PASS
        bid = backend_of(untagged(res.data))
        be_addr, be_port = BACKENDS[bid]
        assert res.data == priority_tagged(tcp_frame(CLIENT, be_addr, sport, be_port, flags="S"))
        lb.expect("forward", flow=("in", SVC_TCP, bid, True))
        res = lb.send(priority_tagged(from_backend(bid, sport, "SA")), fibnet.ifindex["int"])
    assert res.action == XDP_PASS
    assert res.data == priority_tagged(tcp_frame(VIP, CLIENT, 80, sport, flags="SA",
                                                 eth_src=BACKEND_MAC))
    assert_checksums(untagged(res.data))
    lb.expect("reply", flow=("out", SVC_TCP, bid, False))


@pytest.mark.parametrize("client, ifname, reason", [
    ("198.51.100.11", "ext", "fib_no_neigh"),
    ("203.0.113.11", "ext", "fib_no_route"),
    ("10.1.13.57", "ext", "fib_frag_needed"),   # a reply of 1,340 bytes, no DF, to MTU 1280
    ("10.1.1.10", "nofwd", "fib_fwd_disabled"),
])
def test_what_the_fast_path_leaves_to_the_kernel_keeps_its_priority_tag(lb, fibnet, client,
                                                                        ifname, reason):
    """The kernel gets it rewritten, tag and all, and clears the tag itself,
    as it does for every packet it routes."""
    sport = 58060
    if reason == "fib_fwd_disabled":
        res = lb.send(priority_tagged(tcp_frame(client, VIP, sport, 80, flags="S")),
                      fibnet.ifindex[ifname])
        bid = backend_of(untagged(res.data))
        be_addr, be_port = BACKENDS[bid]
        assert (res.action, res.data) == (XDP_PASS, priority_tagged(
            tcp_frame(client, be_addr, sport, be_port, flags="S")))
        lb.expect(reason, flow=("in", SVC_TCP, bid, True))
        return
    bid = backend_of(lb.send(tcp_frame(client, VIP, sport, 80, flags="S"),
                             fibnet.ifindex[ifname]).data)
    be_addr, be_port = BACKENDS[bid]
    big = dict(payload=b"x" * 1300, ip_flags=0) if reason == "fib_frag_needed" else {}
    reply = tcp_frame(be_addr, client, be_port, sport, flags="SA", eth_src=BACKEND_MAC, **big)
    res = lb.send(priority_tagged(reply), fibnet.ifindex["int"])
    assert (res.action, res.data) == (XDP_PASS, priority_tagged(
        tcp_frame(VIP, client, 80, sport, flags="SA", eth_src=BACKEND_MAC, **big)))
    lb.expect(reason, flow=("out", SVC_TCP, bid, False))


@pytest.mark.parametrize("mode", ["fast", "kernel"])
def test_a_priority_tagged_packet_whose_ttl_runs_out_goes_to_the_kernel_as_it_came(lb, fibnet,
                                                                                   mode):
    sport = 58020 + len(mode)
    frame = priority_tagged(syn(sport, ttl=1))
    with forwarding(lb, mode):
        res = lb.send(frame, fibnet.ifindex["ext"])
    assert (res.action, res.data) == (XDP_PASS, frame)
    _, fwd, _ = connection(lb.dp, sport)
    lb.expect("ttl_expired", flow=("in", SVC_TCP, fwd.backend_id, True))


def test_a_priority_tagged_ping_of_a_vip_is_answered_untagged(lb, fibnet):
    """As Linux answers one for its own address."""
    frame = icmp_frame(CLIENT, VIP, ICMP(id=7, seq=4), b"ping" * 10, ttl=61, id=0x78)
    res = lb.send(priority_tagged(frame), fibnet.ifindex["ext"])
    assert res.action == XDP_TX
    assert res.data == icmp_frame(VIP, CLIENT, ICMP(type=0, id=7, seq=4), b"ping" * 10,
                                  eth_src=LB_MAC, eth_dst=CLIENT_MAC, ttl=64, id=0x78)
    lb.expect("icmp_echo_reply")


@pytest.mark.parametrize("mode, client", [("fast", "10.1.13.54"), ("kernel", "10.1.13.55")])
def test_a_priority_tagged_packet_over_the_mtu_with_df_is_answered_untagged(lb, fibnet, mode,
                                                                            client):
    """xlb's "fragmentation needed" quotes the packet as the backend sent it,
    from its IP header (after the tag), and leaves untagged, as the kernel's
    answers do."""
    sport = 58030 + len(mode)
    with forwarding(lb, mode):
        bid = backend_of(lb.send(tcp_frame(client, VIP, sport, 80, flags="S"),
                                 fibnet.ifindex["ext"]).data)
        be_addr, be_port = BACKENDS[bid]
        reply = tcp_frame(be_addr, client, be_port, sport, flags="A", payload=b"x" * 1300,
                          eth_src=BACKEND_MAC)
        res = lb.send(priority_tagged(reply), fibnet.ifindex["int"])
    assert res.action == XDP_TX
    assert res.data == icmp_frame(VIP, be_addr, ICMP(type=3, code=4, nexthopmtu=1280),
                                  quote(reply), eth_src=LB_MAC, eth_dst=BACKEND_MAC,
                                  tos=0xc0, id=0, flags=0, ttl=64)
    lb.expect("icmp_too_big", flow=("out", SVC_TCP, bid, False))


def test_a_priority_tagged_fragmented_datagram_goes_on_untagged(lb, fibnet):
    """Its later fragments, which go where the first went, too."""
    sport, ip_id = 58040, 0x5801
    out = [lb.send(priority_tagged(f), fibnet.ifindex["ext"])
           for f in fragments(CLIENT, VIP, sport, 80, ip_id)]
    bid = backend_of(out[0].data)
    be_addr, be_port = BACKENDS[bid]
    assert [(r.action, r.data) for r in out] == [
        (XDP_REDIRECT, f) for f in fragments(CLIENT, be_addr, sport, be_port, ip_id,
                                             eth_src=fibnet.MACS["int"], eth_dst=BACKEND_MAC,
                                             ttl=63)]
    lb.expect("forward_redirect", flow=("in", SVC_UDP, bid, False))


def test_a_priority_tagged_error_about_a_reply_goes_to_the_backend_tag_and_all(lb, fibnet):
    sport = 58050
    bid = backend_of(lb.send(syn(sport), fibnet.ifindex["ext"]).data)
    be_addr, be_port = BACKENDS[bid]
    about = tcp_frame(VIP, CLIENT, 80, sport, flags="SA")
    frame = icmp_frame("10.1.1.2", VIP, ICMP(type=3, code=3), quote(about))
    res = lb.send(priority_tagged(frame), fibnet.ifindex["ext"])
    assert res.action == XDP_PASS
    assert res.data == priority_tagged(icmp_frame(
        "10.1.1.2", be_addr, ICMP(type=3, code=3),
        quote(tcp_frame(be_addr, CLIENT, be_port, sport, flags="SA"))))
    lb.expect("icmp_to_backend")


@pytest.mark.parametrize("tagged", [False, True], ids=["untagged", "priority-tagged"])
def test_a_routers_error_about_a_forwarded_packet_goes_to_the_client_from_the_router(
        lb, fibnet, tagged):
    """A router between the balancer and the server (10.1.11.254) lets a
    client's datagram expire: its "time exceeded" reaches the client about
    the datagram as the client sent it (to VIP:80), from the router, whose
    address is its own (only the server's own error comes from the VIP).
    The kernel routes it, a priority tag and all."""
    sport = 58070 + tagged
    bid = backend_of(lb.send(udp_frame(CLIENT, VIP, sport, 80, payload=b"q"),
                             fibnet.ifindex["ext"]).data)
    be_addr, be_port = BACKENDS[bid]
    error, router = ICMP(type=11, code=0), "10.1.11.254"
    frame = icmp_frame(router, CLIENT, error,
                       quote(udp_frame(CLIENT, be_addr, sport, be_port, payload=b"q")),
                       eth_src=BACKEND_MAC)
    want = icmp_frame(router, CLIENT, error, quote(udp_frame(CLIENT, VIP, sport, 80, payload=b"q")),
                      eth_src=BACKEND_MAC)
    tag = priority_tagged if tagged else bytes
    res = lb.send(tag(frame), fibnet.ifindex["int"])
    assert (res.action, res.data) == (XDP_PASS, tag(want))
    lb.expect("icmp_to_client")


@pytest.mark.parametrize("mode", ["fast", "kernel"])
def test_ethernet_padding_goes_on_as_it_came(lb, fibnet, mode):
    """Bytes past the IP total length (a short frame padded up to Ethernet's
    60, here not zeros) are no part of the packet: they go on as they came,
    in either forwarding mode."""
    sport, pad = 58080 + len(mode), b"\xa5" * 6
    with forwarding(lb, mode):
        res = lb.send(syn(sport) + pad, fibnet.ifindex["ext"])
    bid = backend_of(res.data)
    be_addr, be_port = BACKENDS[bid]
    hop = dict(ttl=63, eth_src=fibnet.MACS["int"], eth_dst=BACKEND_MAC) if mode == "fast" else {}
    assert (res.action, res.data) == (XDP_REDIRECT if mode == "fast" else XDP_PASS,
                                      tcp_frame(CLIENT, be_addr, sport, be_port, flags="S", **hop)
                                      + pad)
    lb.expect("forward_redirect" if mode == "fast" else "forward",
              flow=("in", SVC_TCP, bid, True))


def test_next_hops_that_share_a_cache_slot_are_each_resolved(root, fibnet):
    """The next-hop cache is direct-mapped: with a single slot, a connection's
    forward packets and its replies evict each other's next hop, and each
    still leaves by its own link with its own next hop's MACs."""
    from xlb.datapath import Limits

    dp = one_backend(Limits(max_hops=1), fibnet)
    try:
        be_addr, be_port = BACKENDS[1]
        ext, intf = fibnet.ifindex["ext"], fibnet.ifindex["int"]
        for flags in ("S", "A", "PA"):
            res = dp.test_run(tcp_frame(CLIENT, VIP, 57100, 80, flags=flags), ext)
            assert (res.action, res.data) == (XDP_REDIRECT, tcp_frame(
                CLIENT, be_addr, 57100, be_port, flags=flags, ttl=63,
                eth_src=fibnet.MACS["int"], eth_dst=BACKEND_MAC))
            res = dp.test_run(from_backend(1, 57100, "A"), intf)
            assert (res.action, res.data) == (XDP_REDIRECT, tcp_frame(
                VIP, CLIENT, 80, 57100, flags="A", ttl=63,
                eth_src=fibnet.MACS["ext"], eth_dst=CLIENT_MAC))
    finally:
        dp.close()


def test_a_next_hop_is_cached_for_the_link_its_packets_came_in_by(root, fibnet):
    """The FIB answers for a packet as it came in (forwarding may be off on
    that link): a next hop resolved for one link's packets is not another's,
    even in the same cache slot."""
    from xlb.datapath import Limits

    dp = one_backend(Limits(max_hops=1), fibnet)
    try:
        be_addr, be_port = BACKENDS[1]
        res = dp.test_run(tcp_frame(CLIENT, VIP, 57110, 80), fibnet.ifindex["ext"])
        assert res.action == XDP_REDIRECT
        res = dp.test_run(tcp_frame(CLIENT, VIP, 57111, 80), fibnet.ifindex["nofwd"])
        assert (res.action, res.data) == (XDP_PASS, tcp_frame(CLIENT, be_addr, 57111, be_port))
    finally:
        dp.close()


def test_out_of_a_link_xdp_cannot_send_into_the_kernel_forwards(root, fibnet):
    """A native program's XDP_REDIRECT into a link whose driver takes no XDP
    frames (a bridge, a VLAN, a tunnel) is lost (seen in the lab: a bridge on
    lb's servers' side, every connection timed out). Out of a link the program
    does not run on natively, a forward and a reply go to the kernel, rewritten
    as with kernel forwarding; out of the link they came in by, XDP_TX; from a
    link it runs on generically (an skb, which every link takes), XDP_REDIRECT
    to any."""
    from xlb.datapath import Limits

    dp = one_backend(Limits(), fibnet)
    try:
        lb = Harness(dp, service_ids=(SVC_TCP,), backend_ids={1: BACKENDS[1]})
        be_addr, be_port = BACKENDS[1]
        ext, intf = fibnet.ifindex["ext"], fibnet.ifindex["int"]
        dp.set_tx_link(intf, None)
        res = lb.send(syn(57120), ext)
        assert (res.action, res.data) == (XDP_PASS, tcp_frame(CLIENT, be_addr, 57120, be_port,
                                                              flags="S"))
        lb.expect("forward", flow=("in", SVC_TCP, 1, True))
        dp.set_tx_link(ext, None)
        res = lb.send(from_backend(1, 57120, "SA"), intf)
        assert (res.action, res.data) == (XDP_PASS, tcp_frame(VIP, CLIENT, 80, 57120, flags="SA",
                                                              eth_src=BACKEND_MAC))
        lb.expect("reply", flow=("out", SVC_TCP, 1, False))
        res = lb.send(syn(57121), intf)
        assert res.action == XDP_TX
        lb.expect("forward_tx", flow=("in", SVC_TCP, 1, True))
        dp.set_tx_link(ext, "generic")
        res = lb.send(syn(57122), ext)      # its cached hop was resolved for ext as native
        assert res.action == XDP_PASS
        lb.expect("forward", flow=("in", SVC_TCP, 1, True))
        dp._maps["hops"].clear()            # cached a second: not waited for here
        res = lb.send(syn(57123), ext)
        assert res.action == XDP_REDIRECT
        lb.expect("forward_redirect", flow=("in", SVC_TCP, 1, True))
    finally:
        dp.close()


def test_the_clock_is_monotonic_time_counted_in_ticks(lb, fibnet):
    """Flows are stamped with the program's clock (bpf/clock.h: jiffies as ns):
    it keeps CLOCK_MONOTONIC's pace within a tick, and a flow's `seen` is a
    reading of it."""
    from xlb.datapath import kernel_hz

    tick = 1_000_000_000 // kernel_hz()

    def reading():
        before = time.monotonic_ns()
        now = lb.dp.now()
        return before, now, time.monotonic_ns()

    a0, c0, b0 = reading()
    time.sleep(0.3)
    a1, c1, b1 = reading()
    assert (a1 - b0) - 2 * tick <= c1 - c0 <= (b1 - a0) + 2 * tick
    assert abs(c0 - a0) < SEC, "jiffies and CLOCK_MONOTONIC both start at boot"
    handshake(lb, fibnet, 57101)
    _, fwd, reply = connection(lb.dp, 57101)
    assert c1 <= fwd.seen <= lb.dp.now() and c1 <= reply.seen <= lb.dp.now()


def test_the_next_hops_sent_to_since_a_time_are_read_back(lb, fibnet):
    """Datapath.next_hops: the links and MACs that the fast path resolved
    since a time and sends to from XDP, whose stale neighbour entries
    `xlb up` has the kernel check (netif.renew_stale)."""
    lb.dp._maps["hops"].clear()
    since = lb.dp.now()
    assert lb.dp.next_hops(since) == set()
    handshake(lb, fibnet, 57010)
    macs = {name: bytes.fromhex(mac.replace(":", "")) for name, mac in
            (("int", BACKEND_MAC), ("ext", CLIENT_MAC))}
    assert lb.dp.next_hops(since) == {(fibnet.ifindex[name], mac) for name, mac in macs.items()}
    assert lb.dp.next_hops(lb.dp.now() + 1) == set()


def test_a_next_hop_is_resolved_again_after_a_second(lb, fibnet):
    """The fast path keeps each destination's next hop for a second: a
    neighbour whose MAC changed is followed once its entry is that old."""
    res = lb.send(syn(57000), fibnet.ifindex["ext"])
    bid = backend_of(res.data)
    be_addr = str(BACKENDS[bid][0])
    new_mac = "02:00:00:00:0b:0b"
    fibnet.sh("ip", "neigh", "replace", be_addr, "lladdr", new_mac, "dev", "int",
              "nud", "permanent")
    try:
        res = lb.send(tcp_frame(CLIENT, VIP, 57000, 80, flags="A"), fibnet.ifindex["ext"])
        assert res.data[:6] == bytes.fromhex(BACKEND_MAC.replace(":", ""))   # still cached
        hops, addr = lb.dp._maps["hops"], int.from_bytes(IPv4Address(be_addr).packed, "little")
        for slot, per_cpu in list(hops.items()):
            if any(hop.daddr == addr for hop in per_cpu):
                for hop in per_cpu:
                    hop.checked -= 2 * SEC
                hops[slot] = per_cpu
        res = lb.send(tcp_frame(CLIENT, VIP, 57000, 80, flags="A"), fibnet.ifindex["ext"])
        assert res.data[:6] == bytes.fromhex(new_mac.replace(":", ""))
    finally:
        fibnet.sh("ip", "neigh", "replace", be_addr, "lladdr", BACKEND_MAC, "dev", "int",
                  "nud", "permanent")
        lb.dp._maps["hops"].clear()
