"""The XDP program (bpf/xlb.c) run on crafted frames with BPF_PROG_TEST_RUN.

No network: every case is a frame built with scapy, run once through the loaded
program; the expected output is built separately with scapy and compared byte
for byte, and every counter the frame moved is compared with what it should
have counted (tests/packets.py, Harness).

One Datapath serves the module. Flow state (the LRU map `flows`) persists
between cases, so every case that reaches the flow table uses its own client
port; counters are checked as the change each frame makes.
"""

import errno
import os
import socket
import struct
from collections import Counter
from ipaddress import IPv4Address

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_EOL, IPOption_NOP, IPOption_RR
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw, raw

from fibnet import FibNet
from packets import (BACKEND_MAC, CLIENT_MAC, LB_MAC, SYN_OPTIONS, VIP_MAC, XDP_DROP, XDP_PASS,
                     XDP_TX, Harness, assert_checksums, ip_checksum_ok, ip_of, l4_checksum_ok,
                     ones_sum, priority_tagged, pseudo_header, l4_segment, tcp_frame, udp_frame,
                     untagged, word_for_zero_checksum)

pytestmark = pytest.mark.kernel

TCP_P, UDP_P = socket.IPPROTO_TCP, socket.IPPROTO_UDP

VIP = IPv4Address("10.1.1.101")
VIP2 = IPv4Address("10.1.1.102")     # ARP answered on another ifindex only
VIP3 = IPv4Address("10.1.1.103")     # the counting scenario's own service
CLIENT = IPv4Address("10.1.1.10")
OTHER = IPv4Address("10.1.1.200")    # not a VIP
BACKENDS = {1: (IPv4Address("10.1.11.101"), 8080),
            2: (IPv4Address("10.1.11.102"), 8080),
            3: (IPv4Address("10.1.11.103"), 8080),
            5: (IPv4Address("10.1.12.1"), 5353),
            6: (IPv4Address("10.1.12.2"), 5353)}
BACKEND_BY_ADDR = {addr: bid for bid, (addr, _) in BACKENDS.items()}

# service id: (vip, port, proto, ring, backend ids in the ring)
SERVICES = {1: (VIP, 80, TCP_P, 2, [1, 2]),
            2: (VIP, 80, UDP_P, 4, [1, 2]),
            3: (VIP, 443, TCP_P, 6, []),          # no backend: ring_len 0
            4: (VIP, 8000, TCP_P, 8, [1, 2, 3]),  # round-robin start by CPU
            5: (VIP3, 53, UDP_P, 10, [5, 6])}     # counting scenario
SVC_TCP, SVC_UDP, SVC_EMPTY, SVC_RR3, SVC_COUNT = 1, 2, 3, 4, 5

OTHER_ARP_IFINDEX = 4242  # an arp_vips key on an ifindex where no test frame arrives


@pytest.fixture(scope="module")
def lb(datapath):
    dp = datapath
    for bid, (addr, port) in BACKENDS.items():
        dp.set_backend(bid, addr, port)
    for sid, (vip, port, proto, ring, ids) in SERVICES.items():
        dp.write_ring(ring, ids)
        dp.set_service(vip, port, proto, sid, ring, len(ids))
    for vip in (VIP, VIP3):
        dp.set_vip(vip)
    dp.set_arp(1, VIP, bytes.fromhex(VIP_MAC.replace(":", "")))
    dp.set_arp(OTHER_ARP_IFINDEX, VIP2, bytes.fromhex(VIP_MAC.replace(":", "")))
    return Harness(dp, service_ids=SERVICES, backend_ids=BACKENDS)


def chosen_backend(frame: bytes, service_id: int, ring=None) -> int:
    """The backend a forwarded frame was sent to; it must be one of the service's ring."""
    bid = BACKEND_BY_ADDR.get(ip_of(frame, "dst"))
    assert bid in (ring or SERVICES[service_id][4]), f"forwarded to {ip_of(frame, 'dst')}"
    return bid


def changed_offsets(a: bytes, b: bytes) -> set[int]:
    assert len(a) == len(b)
    return {i for i in range(len(a)) if a[i] != b[i]}


def field(start, size):
    return set(range(start, start + size))


# Plain Eth(14) + IPv4(20) + TCP/UDP offsets of what NAT may change.
IP_CSUM, IP_SRC, IP_DST = field(24, 2), field(26, 4), field(30, 4)
L4_SPORT, L4_DPORT, TCP_CSUM, UDP_CSUM = field(34, 2), field(36, 2), field(50, 2), field(40, 2)


# 1, 2: a TCP connection, both ways ------------------------------------------------------

def test_tcp_connection_forward_and_reply(lb):
    dp = lb.dp
    flows_before = dp.flow_entries()

    def syn(sport, dst=VIP, dport=80):
        return tcp_frame(CLIENT, dst, sport, dport, flags="S", seq=1000, options=SYN_OPTIONS)

    # SYN: destination rewritten to a backend of the ring, nothing else.
    frame = syn(40000)
    res = lb.send(frame)
    assert res.action == XDP_PASS
    first = chosen_backend(res.data, SVC_TCP)
    be_addr, be_port = BACKENDS[first]
    assert res.data == syn(40000, be_addr, be_port)
    assert changed_offsets(frame, res.data) <= IP_CSUM | IP_DST | L4_DPORT | TCP_CSUM
    assert_checksums(res.data)
    lb.expect("forward", flow=("in", SVC_TCP, first, True))

    # The next new connection goes to the other backend.
    res2 = lb.send(syn(40001))
    assert res2.action == XDP_PASS
    second = chosen_backend(res2.data, SVC_TCP)
    assert second != first
    assert res2.data == syn(40001, *BACKENDS[second])
    assert_checksums(res2.data)
    lb.expect("forward", flow=("in", SVC_TCP, second, True))
    assert dp.flow_entries() == flows_before + 4  # forward and reply entry each

    # More of the first connection: same backend, not a new flow.
    def data(dst, dport):
        return tcp_frame(CLIENT, dst, 40000, dport, flags="PA", seq=1001, ack=5001,
                         payload=b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    res = lb.send(data(VIP, 80))
    assert res.action == XDP_PASS
    assert res.data == data(be_addr, be_port)
    assert_checksums(res.data)
    lb.expect("forward", flow=("in", SVC_TCP, first, False))

    # 2. The backend's SYN-ACK: source rewritten back to the VIP.
    def synack(src, sport, dport=40000):
        return tcp_frame(src, CLIENT, sport, dport, flags="SA", seq=5000, ack=1001,
                         options=SYN_OPTIONS, eth_src=BACKEND_MAC, eth_dst=LB_MAC)
    frame = synack(be_addr, be_port)
    res = lb.send(frame)
    assert res.action == XDP_PASS
    assert res.data == synack(VIP, 80)
    assert changed_offsets(frame, res.data) <= IP_CSUM | IP_SRC | L4_SPORT | TCP_CSUM
    assert_checksums(res.data)
    lb.expect("reply", flow=("out", SVC_TCP, first, False))

    res = lb.send(synack(*BACKENDS[second], dport=40001))
    assert res.action == XDP_PASS
    assert res.data == synack(VIP, 80, dport=40001)
    lb.expect("reply", flow=("out", SVC_TCP, second, False))

    # The other backend answering on the first connection's port has no flow.
    frame = synack(*BACKENDS[second])
    res = lb.send(frame)
    assert (res.action, res.data) == (XDP_PASS, frame)
    lb.expect("pass_not_vip")
    assert dp.flow_entries() == flows_before + 4


def test_a_priority_tagged_connection_is_balanced_as_an_untagged_one(lb):
    """A priority tag (802.1p: VLAN ID 0) marks the link's own untagged
    traffic with a priority alone, and Linux clears it on receive: xlb
    balances such frames, both ways, as untagged ones of the same connection.
    The kernel routes them here (no fast path): it gets them rewritten, tag
    and all, and clears the tag itself."""
    def syn(dst, dport, flags="S", **kw):
        return tcp_frame(CLIENT, dst, 43100, dport, flags=flags, seq=1000, options=SYN_OPTIONS,
                         **kw)

    frame = priority_tagged(syn(VIP, 80))
    res = lb.send(frame)
    assert res.action == XDP_PASS
    bid = chosen_backend(untagged(res.data), SVC_TCP)
    be_addr, be_port = BACKENDS[bid]
    assert res.data == priority_tagged(syn(be_addr, be_port))
    assert changed_offsets(untagged(frame), untagged(res.data)) <= \
        IP_CSUM | IP_DST | L4_DPORT | TCP_CSUM
    assert_checksums(untagged(res.data))
    lb.expect("forward", flow=("in", SVC_TCP, bid, True))

    def synack(src, sport):
        return tcp_frame(src, CLIENT, sport, 43100, flags="SA", seq=5000, ack=1001,
                         options=SYN_OPTIONS, eth_src=BACKEND_MAC)
    res = lb.send(priority_tagged(synack(be_addr, be_port), prio=3))
    assert (res.action, res.data) == (XDP_PASS, priority_tagged(synack(VIP, 80), prio=3))
    assert_checksums(untagged(res.data))
    lb.expect("reply", flow=("out", SVC_TCP, bid, False))

    # Untagged, the client's next packet is the same connection's.
    res = lb.send(syn(VIP, 80, ack=5001, flags="A"))
    assert (res.action, res.data) == (XDP_PASS, syn(be_addr, be_port, ack=5001, flags="A"))
    lb.expect("forward", flow=("in", SVC_TCP, bid, False))


def test_round_robin_starts_at_the_cpu_number(lb, cpus):
    """pick_backend: slot = (this CPU's cursor + CPU number) % ring_len. Each
    CPU has its own cursor, fresh here (nothing else uses this service), so on
    CPU c the n-th new flow goes to ring[(n + c) % 3]; tried on one CPU of each
    offset c % 3 there is. The offset is visible only on a CPU whose number is
    not a multiple of 3: without one the test fails rather than claim it."""
    ring = SERVICES[SVC_RR3][4]
    by_offset = {}
    for cpu in sorted(cpus):
        by_offset.setdefault(cpu % len(ring), cpu)
    if set(by_offset) == {0}:
        pytest.fail(f"the allowed CPUs {sorted(cpus)} are all multiples of {len(ring)}: "
                    "the CPU offset of round-robin cannot be seen; run with a CPU whose "
                    f"number is not a multiple of {len(ring)} allowed")
    (home,) = os.sched_getaffinity(0)  # the fixture pinned the process to one CPU
    sport = 45000
    try:
        for cpu in sorted(by_offset.values()):
            os.sched_setaffinity(0, {cpu})
            for n in range(4):
                res = lb.send(tcp_frame(CLIENT, VIP, sport, 8000))
                sport += 1
                assert res.action == XDP_PASS
                expected = ring[(n + cpu) % len(ring)]
                assert chosen_backend(res.data, SVC_RR3) == expected, f"CPU {cpu}, flow {n}"
                lb.expect("forward", flow=("in", SVC_RR3, expected, True))
    finally:
        os.sched_setaffinity(0, {home})


# 3. UDP checksums --------------------------------------------------------------------

def test_udp_with_checksum(lb):
    frame = udp_frame(CLIENT, VIP, 41000, 80, payload=b"query 1")
    assert frame[40:42] != b"\0\0"
    res = lb.send(frame)
    assert res.action == XDP_PASS
    bid = chosen_backend(res.data, SVC_UDP)
    assert res.data == udp_frame(CLIENT, BACKENDS[bid][0], 41000, 8080, payload=b"query 1")
    assert changed_offsets(frame, res.data) <= IP_CSUM | IP_DST | L4_DPORT | UDP_CSUM
    assert_checksums(res.data)
    lb.expect("forward", flow=("in", SVC_UDP, bid, True))

    # and the reply
    reply = udp_frame(BACKENDS[bid][0], CLIENT, 8080, 41000, payload=b"answer",
                      eth_src=BACKEND_MAC)
    res = lb.send(reply)
    assert res.action == XDP_PASS
    assert res.data == udp_frame(VIP, CLIENT, 80, 41000, payload=b"answer", eth_src=BACKEND_MAC)
    assert_checksums(res.data)
    lb.expect("reply", flow=("out", SVC_UDP, bid, False))


def test_udp_without_checksum_stays_without(lb):
    frame = udp_frame(CLIENT, VIP, 41001, 80, payload=b"no checksum", chksum=0)
    res = lb.send(frame)
    assert res.action == XDP_PASS
    bid = chosen_backend(res.data, SVC_UDP)
    assert res.data == udp_frame(CLIENT, BACKENDS[bid][0], 41001, 8080, payload=b"no checksum",
                                 chksum=0)
    assert res.data[40:42] == b"\0\0"
    assert ip_checksum_ok(res.data)
    lb.expect("forward", flow=("in", SVC_UDP, bid, True))

    reply = udp_frame(BACKENDS[bid][0], CLIENT, 8080, 41001, payload=b"r", chksum=0)
    res = lb.send(reply)
    assert res.action == XDP_PASS
    assert res.data == udp_frame(VIP, CLIENT, 80, 41001, payload=b"r", chksum=0)
    lb.expect("reply", flow=("out", SVC_UDP, bid, False))


def test_udp_checksum_that_computes_to_zero_is_sent_as_ffff(lb):
    # A first datagram fixes the backend of the flow; the second is crafted so
    # that its checksum after the rewrite computes to 0, which RFC 768 sends as 0xffff.
    first = lb.send(udp_frame(CLIENT, VIP, 41002, 80, payload=b"first"))
    bid = chosen_backend(first.data, SVC_UDP)
    lb.expect("forward", flow=("in", SVC_UDP, bid, True))
    be_addr, be_port = BACKENDS[bid]

    base = b"crafted!"  # even length: the word must sit on a 16-bit boundary
    word = word_for_zero_checksum(udp_frame(CLIENT, be_addr, 41002, be_port,
                                                payload=base + b"\0\0"))
    payload = base + word
    rewritten = udp_frame(CLIENT, be_addr, 41002, be_port, payload=payload, chksum=0)
    assert ones_sum(pseudo_header(rewritten) + l4_segment(rewritten)) == 0xffff  # computes to 0
    expected = udp_frame(CLIENT, be_addr, 41002, be_port, payload=payload)
    assert expected[40:42] == b"\xff\xff"  # scapy agrees: sent as 0xffff

    frame = udp_frame(CLIENT, VIP, 41002, 80, payload=payload)
    assert frame[40:42] not in (b"\0\0", b"\xff\xff")
    res = lb.send(frame)
    assert res.action == XDP_PASS
    assert res.data[40:42] == b"\xff\xff"
    assert res.data == expected
    assert ip_checksum_ok(res.data) and l4_checksum_ok(res.data)
    lb.expect("forward", flow=("in", SVC_UDP, bid, False))


def test_a_checksum_update_whose_sum_carries_twice(lb):
    """The incremental update ~HC + diff (csum.h) can carry out of 16 bits
    again after its first fold. The second datagram's checksum is chosen so
    that its update does: the sum as the program adds it, over 16-bit words as
    a little-endian CPU loads them."""
    first = lb.send(udp_frame(CLIENT, VIP, 41003, 80, payload=b"first"))
    bid = chosen_backend(first.data, SVC_UDP)
    lb.expect("forward", flow=("in", SVC_UDP, bid, True))
    be_addr, be_port = BACKENDS[bid]

    def words(b):
        return [int.from_bytes(b[i:i + 2], "little") for i in range(0, len(b), 2)]
    # Destination address and port, VIP:80 -> backend (nat.h's diff).
    diff = (sum(0xffff - w for w in words(VIP.packed + (80).to_bytes(2, "big")))
            + sum(words(be_addr.packed + be_port.to_bytes(2, "big"))))
    carrying = (0xffff - diff) & 0xffff                 # ~HC with (~HC + diff) & 0xffff == 0xffff
    assert diff >> 16 >= 1                              # so the first fold carries
    check = (0xffff - carrying).to_bytes(2, "little")   # HC, as the packet holds it

    base = b"crafted!"
    frame = udp_frame(CLIENT, VIP, 41003, 80, payload=base + b"\0\0", chksum=0)
    partial = ones_sum(pseudo_header(frame) + l4_segment(frame))
    want = 0xffff - int.from_bytes(check, "big")       # the sum the checksum must make
    payload = base + struct.pack("!H", (want - partial) % 0xffff)
    frame = udp_frame(CLIENT, VIP, 41003, 80, payload=payload)
    assert frame[40:42] == check

    res = lb.send(frame)
    assert res.action == XDP_PASS
    assert res.data == udp_frame(CLIENT, be_addr, 41003, be_port, payload=payload)
    assert_checksums(res.data)
    lb.expect("forward", flow=("in", SVC_UDP, bid, False))


# 4. IP options -------------------------------------------------------------------

@pytest.mark.parametrize("sport, options, ihl", [
    (42100, [IPOption_NOP(), IPOption_NOP(), IPOption_NOP(), IPOption_EOL()], 6),
    (42101, [IPOption_RR(routers=["192.0.2.%d" % i for i in range(1, 10)]), IPOption_EOL()], 15),
], ids=["ihl6", "ihl15"])
def test_tcp_with_ip_options(lb, sport, options, ihl):
    frame = tcp_frame(CLIENT, VIP, sport, 80, ip_options=options, payload=b"x" * 7)
    assert frame[14] & 0x0f == ihl
    res = lb.send(frame)
    assert res.action == XDP_PASS
    bid = chosen_backend(res.data, SVC_TCP)
    assert res.data == tcp_frame(CLIENT, BACKENDS[bid][0], sport, 8080, ip_options=options,
                                 payload=b"x" * 7)
    assert res.data[34:14 + ihl * 4] == frame[34:14 + ihl * 4]  # options untouched
    assert_checksums(res.data)
    lb.expect("forward", flow=("in", SVC_TCP, bid, True))


def test_a_flows_packets_to_a_group_mac_pass_and_leave_it_as_it_was(lb):
    """A flooding switch, or a frame to a broadcast or multicast MAC, shows
    another node's traffic to this one too: a flow this node balances is not
    forwarded twice by its packets, and they do not touch its entry."""
    syn = tcp_frame(CLIENT, VIP, 43120, 80)
    first = chosen_backend(lb.send(syn).data, SVC_TCP)
    lb.expect("forward", flow=("in", SVC_TCP, first, True))
    addr, port = BACKENDS[first]
    flows = lb.dp.flow_entries()
    for frame in (tcp_frame(CLIENT, VIP, 43120, 80, flags="PA", payload=b"x",
                            eth_dst="ff:ff:ff:ff:ff:ff"),
                  tcp_frame(addr, CLIENT, port, 43120, flags="SA",
                            eth_src=BACKEND_MAC, eth_dst="01:00:5e:00:00:01")):
        res = lb.send(frame)
        assert (res.action, res.data) == (XDP_PASS, frame)
        lb.expect("pass_not_unicast")
    assert lb.dp.flow_entries() == flows
    # To the balancer's own MAC, the connection goes on where it went.
    reply = tcp_frame(addr, CLIENT, port, 43120, flags="SA", eth_src=BACKEND_MAC)
    res = lb.send(reply)
    assert res.data == tcp_frame(VIP, CLIENT, 80, 43120, flags="SA", eth_src=BACKEND_MAC)
    lb.expect("reply", flow=("out", SVC_TCP, first, False))


@pytest.mark.parametrize("mac", ["02:00:00:00:00:77", "00:16:3e:12:34:56"],
                         ids=["locally-administered", "globally-administered"])
def test_a_frame_to_another_hosts_unicast_mac_is_balanced_as_the_links_own(lb, mac):
    """xlb does not look at the destination MAC but for its group bit: a
    frame that a switch floods, or that a link in promiscuous mode lets in,
    is balanced (README), its MACs left to the kernel."""
    sport = 43122 + mac.startswith("00")
    res = lb.send(tcp_frame(CLIENT, VIP, sport, 80, eth_dst=mac))
    bid = chosen_backend(res.data, SVC_TCP)
    assert (res.action, res.data) == (XDP_PASS, tcp_frame(CLIENT, BACKENDS[bid][0], sport, 8080,
                                                          eth_dst=mac))
    lb.expect("forward", flow=("in", SVC_TCP, bid, True))


@pytest.mark.parametrize("source", ["0.0.0.1", "127.0.0.1", "224.0.0.5"])
def test_a_martian_source_is_balanced(lb, source):
    """What the fast path leaves out of a router's work (README): it does not
    drop martian sources (0/8, 127/8, multicast), as the kernel would."""
    res = lb.send(tcp_frame(source, VIP, 43124, 80))
    bid = chosen_backend(res.data, SVC_TCP)
    assert (res.action, res.data) == (XDP_PASS, tcp_frame(source, BACKENDS[bid][0], 43124, 8080))
    lb.expect("forward", flow=("in", SVC_TCP, bid, True))


def test_a_locally_administered_unicast_mac_is_balanced(lb):
    """The group bit is the first octet's lowest: 02:... is a unicast MAC
    (a VM's, a veth's), the balancer's own."""
    mac = "02:00:00:00:00:01"
    res = lb.send(tcp_frame(CLIENT, VIP, 43121, 80, eth_dst=mac))
    bid = chosen_backend(res.data, SVC_TCP)
    assert res.data == tcp_frame(CLIENT, BACKENDS[bid][0], 43121, 8080, eth_dst=mac)
    lb.expect("forward", flow=("in", SVC_TCP, bid, True))


# 5. What is not for a service: passed untouched, or dropped at a VIP -----------------

def arp_frame(op, psrc, pdst, hwsrc=CLIENT_MAC, hwdst="00:00:00:00:00:00",
              eth_dst="ff:ff:ff:ff:ff:ff", eth_src=CLIENT_MAC, pad=0):
    pkt = Ether(dst=eth_dst, src=eth_src) / ARP(op=op, hwsrc=hwsrc, psrc=str(psrc),
                                                 hwdst=hwdst, pdst=str(pdst))
    return raw(pkt) + bytes(pad)


PASS_THROUGH = [
    ("tcp-to-other-address", tcp_frame(CLIENT, OTHER, 43000, 80), 0, "pass_not_vip"),
    ("icmp-echo-to-other-address", raw(Ether(src=CLIENT_MAC, dst=LB_MAC)
                                       / IP(src=str(CLIENT), dst=str(OTHER))
                                       / ICMP(id=7, seq=1) / Raw(b"ping")), 0, "pass_not_vip"),
    ("ipv6-tcp-port-80", raw(Ether(src=CLIENT_MAC, dst=LB_MAC, type=0x86dd)
                             / IPv6(src="fd00::10", dst="fd00::101")
                             / TCP(sport=43003, dport=80, flags="S")), 0, "pass_not_ip"),
    ("vlan-tagged-tcp-to-vip", raw(Ether(src=CLIENT_MAC, dst=LB_MAC) / Dot1Q(vlan=10)
                                   / IP(src=str(CLIENT), dst=str(VIP))
                                   / TCP(sport=43004, dport=80, flags="S")), 0, "pass_not_ip"),
    # No priority tag (VLAN ID 0 under 802.1Q's TPID, treated as untagged):
    # a VLAN's, 802.1ad's with VLAN ID 0, a VLAN's under a priority tag.
    ("vlan-tagged-arp-request-for-vip", priority_tagged(arp_frame(1, CLIENT, VIP), vid=10), 1,
     "pass_not_ip"),
    ("802.1ad-vlan-0-tcp-to-vip", priority_tagged(tcp_frame(CLIENT, VIP, 43007, 80),
                                                  tpid=0x88a8), 0, "pass_not_ip"),
    ("802.1ad-vlan-0-arp-request-for-vip", priority_tagged(arp_frame(1, CLIENT, VIP),
                                                           tpid=0x88a8), 1, "pass_not_ip"),
    ("vlan-tagged-under-a-priority-tag-tcp-to-vip",
     priority_tagged(priority_tagged(tcp_frame(CLIENT, VIP, 43008, 80), vid=10)), 0,
     "pass_not_ip"),
    # Priority-tagged, as untagged: what is not xlb's passes as it came, tag and all.
    ("priority-tagged-tcp-to-other-address",
     priority_tagged(tcp_frame(CLIENT, OTHER, 43009, 80)), 0, "pass_not_vip"),
    ("priority-tagged-arp-request-other-address", priority_tagged(arp_frame(1, CLIENT, OTHER)),
     1, "pass_arp"),
    ("priority-tagged-ipv6", priority_tagged(raw(Ether(src=CLIENT_MAC, dst=LB_MAC, type=0x86dd)
                                                 / IPv6(src="fd00::10", dst="fd00::101")
                                                 / TCP(sport=43010, dport=80, flags="S"))),
     0, "pass_not_ip"),
    ("priority-tag-cut-short", raw(Ether(src=CLIENT_MAC, dst=LB_MAC, type=0x8100)) + b"\0", 0,
     "pass_short"),
    ("arp-request-other-address", arp_frame(1, CLIENT, OTHER), 1, "pass_arp"),
    ("arp-reply-about-vip", arp_frame(2, VIP, CLIENT, hwsrc=VIP_MAC, hwdst=CLIENT_MAC,
                                      eth_src=VIP_MAC, eth_dst=CLIENT_MAC), 1, "pass_arp"),
    ("arp-reply-gratuitous", arp_frame(2, CLIENT, CLIENT, hwdst="ff:ff:ff:ff:ff:ff"), 1,
     "pass_arp"),
    # Another node announcing the VIP (a pair's failover): a reply, not asked of us.
    ("arp-reply-gratuitous-for-vip", arp_frame(2, VIP, VIP, hwdst="ff:ff:ff:ff:ff:ff"), 1,
     "pass_arp"),
    # Another node announcing the VIP as a request (RFC 5227's announcement,
    # as `xlb ha role active` sends it): it asks nothing, and Linux does not
    # answer one for its own address.
    ("arp-announcement-of-vip", arp_frame(1, VIP, VIP), 1, "pass_arp"),
    ("arp-request-for-vip-cut-short", arp_frame(1, CLIENT, VIP)[:14 + 8 + 10], 1, "pass_arp"),
    ("backend-reply-without-flow", tcp_frame(BACKENDS[1][0], CLIENT, 8080, 49999, flags="SA",
                                             eth_src=BACKEND_MAC), 0, "pass_not_vip"),
    ("udp-to-other-address", udp_frame(CLIENT, OTHER, 43005, 80), 0, "pass_not_vip"),
    # A group MAC reaches every node on the link: none balances it.
    ("broadcast-syn-to-vip", tcp_frame(CLIENT, VIP, 43006, 80, eth_dst="ff:ff:ff:ff:ff:ff"), 0,
     "pass_not_unicast"),
    ("multicast-udp-to-vip", udp_frame(CLIENT, VIP, 43007, 80, eth_dst="01:00:5e:01:01:65"), 0,
     "pass_not_unicast"),
    ("broadcast-ping-of-vip", raw(Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff")
                                  / IP(src=str(CLIENT), dst=str(VIP))
                                  / ICMP(id=7, seq=1) / Raw(b"ping")), 0, "pass_not_unicast"),
    ("multicast-backend-reply", tcp_frame(BACKENDS[1][0], CLIENT, 8080, 49998, flags="SA",
                                          eth_src=BACKEND_MAC, eth_dst="33:33:00:00:00:01"), 0,
     "pass_not_unicast"),
    ("broadcast-other-protocol-to-vip", raw(Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff")
                                            / IP(src=str(CLIENT), dst=str(VIP), proto=47)
                                            / Raw(b"g" * 16)), 0, "pass_not_unicast"),
    # Any ICMP to a group MAC may be an error about a balanced flow.
    ("broadcast-ping-of-other-address", raw(Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff")
                                            / IP(src=str(CLIENT), dst="10.1.1.255")
                                            / ICMP(id=7, seq=1) / Raw(b"ping")), 0,
     "pass_not_unicast"),
    # The link's multicast protocols are not xlb's, as to a unicast MAC.
    ("multicast-igmp-query", raw(Ether(src=CLIENT_MAC, dst="01:00:5e:00:00:01")
                                 / IP(src=str(CLIENT), dst="224.0.0.1", proto=2, ttl=1)
                                 / Raw(bytes.fromhex("11640000") + bytes(4))), 0, "pass_not_vip"),
    ("multicast-vrrp-advert", raw(Ether(src="00:00:5e:00:01:33", dst="01:00:5e:00:00:12")
                                  / IP(src=str(CLIENT), dst="224.0.0.18", proto=112, ttl=255)
                                  / Raw(bytes.fromhex("3133640100640000") + VIP.packed)), 0,
     "pass_not_vip"),
]


@pytest.mark.parametrize("frame, ifindex, reason", [c[1:] for c in PASS_THROUGH],
                         ids=[c[0] for c in PASS_THROUGH])
def test_passes_unchanged(lb, frame, ifindex, reason):
    flows = lb.dp.flow_entries()
    res = lb.send(frame, ifindex)
    assert res.action == XDP_PASS
    assert res.data == frame
    lb.expect(reason)
    assert lb.dp.flow_entries() == flows


# 6. ARP for the VIP ----------------------------------------------------------------

def arp_reply_for_vip(pad, to=CLIENT):
    return (raw(Ether(dst=CLIENT_MAC, src=VIP_MAC)
                / ARP(op=2, hwsrc=VIP_MAC, psrc=str(VIP), hwdst=CLIENT_MAC, pdst=str(to)))
            + bytes(pad))


# A probe (RFC 5227: sender address 0) is answered too, as Linux answers one
# for its own address: to 0.0.0.0 at the prober's MAC. The reply goes to the
# sender's hardware address (RFC 826, and Linux), whatever the frame's source.
@pytest.mark.parametrize("pad, sender, eth_src", [
    (0, CLIENT, CLIENT_MAC), (18, CLIENT, CLIENT_MAC), (18, "0.0.0.0", CLIENT_MAC),
    (0, CLIENT, "02:00:00:00:00:0b"),
], ids=["42-bytes", "padded-to-60", "probe", "framed-by-another-mac"])
def test_arp_request_for_vip_is_answered(lb, pad, sender, eth_src):
    frame = arp_frame(1, sender, VIP, pad=pad, eth_src=eth_src)
    res = lb.send(frame, ifindex=1)
    assert res.action == XDP_TX
    assert res.data == arp_reply_for_vip(pad, to=sender)
    lb.expect("arp_reply")


@pytest.mark.parametrize("pad", [0, 14], ids=["46-bytes", "padded-to-60"])
def test_a_priority_tagged_arp_request_for_vip_is_answered_untagged(lb, pad):
    """As Linux answers a priority-tagged request for its own address (it
    clears the tag on receive, and its reply has none): the tag only gave
    the request a priority on the asker's link."""
    res = lb.send(priority_tagged(arp_frame(1, CLIENT, VIP, pad=pad)), ifindex=1)
    assert (res.action, res.data) == (XDP_TX, arp_reply_for_vip(pad))
    lb.expect("arp_reply")


def test_arp_request_for_vip_on_another_ifindex_passes(lb):
    # Test-run needs an ifindex that exists, and only lo (1) is sure to:
    # VIP2 has its ARP entry on another ifindex, so a request for it on 1 is not ours.
    frame = arp_frame(1, CLIENT, VIP2)
    res = lb.send(frame, ifindex=1)
    assert (res.action, res.data) == (XDP_PASS, frame)
    lb.expect("pass_arp")

    # A request for VIP (answered on 1) arriving on another link passes: the link
    # is a veth of a namespace of its own (test-run finds the ifindex in the
    # caller's namespace), entered for this request only.
    with FibNet(f"xlbx-arp-{os.getpid()}").entered({}) as net:
        other = net.ifindex["ext"]
        assert other not in (1, OTHER_ARP_IFINDEX)
        frame = arp_frame(1, CLIENT, VIP)
        res = lb.send(frame, ifindex=other)
    assert (res.action, res.data) == (XDP_PASS, frame)
    lb.expect("pass_arp")


def test_test_run_without_ifindex_is_loopback(lb):
    """Kernel behaviour, documented: test-run with ingress_ifindex 0 gives the
    program the loopback device's rx queue, so ctx->ingress_ifindex reads 1."""
    res = lb.send(arp_frame(1, CLIENT, VIP), ifindex=0)
    assert (res.action, res.data) == (XDP_TX, arp_reply_for_vip(0))
    lb.expect("arp_reply")


NOT_SERVED = [
    ("vip-other-tcp-port", tcp_frame(CLIENT, VIP, 43001, 22)),
    ("vip-udp-port-of-a-tcp-service", udp_frame(CLIENT, VIP, 43002, 443)),
    ("vip-other-protocol", raw(Ether(src=CLIENT_MAC, dst=LB_MAC)
                               / IP(src=str(CLIENT), dst=str(VIP), proto=47) / Raw(b"g" * 16))),
    ("icmp-timestamp-to-vip", raw(Ether(src=CLIENT_MAC, dst=LB_MAC)
                                  / IP(src=str(CLIENT), dst=str(VIP))
                                  / ICMP(type=13) / Raw(b"t" * 12))),
    ("icmp-echo-code-1-to-vip", raw(Ether(src=CLIENT_MAC, dst=LB_MAC)
                                    / IP(src=str(CLIENT), dst=str(VIP))
                                    / ICMP(type=8, code=1) / Raw(b"ping"))),
    ("icmp-error-to-vip-about-no-flow", raw(Ether(src=CLIENT_MAC, dst=LB_MAC)
                                            / IP(src=str(CLIENT), dst=str(VIP))
                                            / ICMP(type=3, code=3)
                                            / Raw(tcp_frame(VIP, CLIENT, 80, 43006)[14:42]))),
    ("priority-tagged-vip-other-tcp-port", priority_tagged(tcp_frame(CLIENT, VIP, 43012, 22))),
]


@pytest.mark.parametrize("frame", [c[1] for c in NOT_SERVED], ids=[c[0] for c in NOT_SERVED])
def test_a_vips_packets_for_nothing_it_serves_are_dropped(lb, frame):
    """The kernel does not own a VIP: passed, such a packet would make it ARP
    for the VIP, or go back where it came from."""
    flows = lb.dp.flow_entries()
    res = lb.send(frame)
    assert (res.action, res.data) == (XDP_DROP, frame)
    lb.expect("drop_no_service")
    assert lb.dp.flow_entries() == flows


UNSERVED = {
    "tcp-other-port": lambda ttl: tcp_frame(CLIENT, VIP, 43011, 22, ttl=ttl),
    "udp-traceroute-port": lambda ttl: raw(Ether(src=CLIENT_MAC, dst=LB_MAC)
                                           / IP(src=str(CLIENT), dst=str(VIP), ttl=ttl)
                                           / UDP(sport=43012, dport=33434) / Raw(b"@" * 32)),
    "other-protocol": lambda ttl: raw(Ether(src=CLIENT_MAC, dst=LB_MAC)
                                      / IP(src=str(CLIENT), dst=str(VIP), proto=47, ttl=ttl)
                                      / Raw(b"g" * 16)),
    "service-without-backend": lambda ttl: tcp_frame(CLIENT, VIP, 43013, 443, ttl=ttl),
}


@pytest.mark.parametrize("ttl", [1, 0])
@pytest.mark.parametrize("make", UNSERVED.values(), ids=UNSERVED.keys())
def test_a_vips_unserved_packet_whose_ttl_runs_out_goes_to_the_kernel_as_it_came(lb, make, ttl):
    """As a balanced packet's (test_xdp_flows.py): the kernel answers "time
    exceeded", so that traceroute to a VIP (UDP, to ports no frontend has)
    shows the balancer's hop, as traceroute -T does; it was dropped, and no
    hop answered."""
    flows, frame = lb.dp.flow_entries(), make(ttl)
    res = lb.send(frame)
    assert (res.action, res.data) == (XDP_PASS, frame)
    lb.expect("ttl_expired")
    assert lb.dp.flow_entries() == flows


UNSERVED_ICMP = {
    "icmp-timestamp": lambda ttl: raw(Ether(src=CLIENT_MAC, dst=LB_MAC)
                                      / IP(src=str(CLIENT), dst=str(VIP), ttl=ttl)
                                      / ICMP(type=13) / Raw(b"t" * 12)),
    "icmp-error-about-no-flow": lambda ttl: raw(Ether(src=CLIENT_MAC, dst=LB_MAC)
                                                / IP(src=str(CLIENT), dst=str(VIP), ttl=ttl)
                                                / ICMP(type=3, code=3)
                                                / Raw(tcp_frame(VIP, CLIENT, 80, 43014)[14:42])),
}


@pytest.mark.parametrize("ttl", [1, 0])
@pytest.mark.parametrize("make", UNSERVED_ICMP.values(), ids=UNSERVED_ICMP.keys())
def test_a_vips_unserved_icmp_is_dropped_whatever_its_ttl(lb, make, ttl):
    """ICMP to a VIP is for the VIP itself, where its TTL ends: one that xlb
    does not answer nor translate is dropped as with any TTL, not passed for
    the kernel to answer "time exceeded" as a router on the way would."""
    flows, frame = lb.dp.flow_entries(), make(ttl)
    res = lb.send(frame)
    assert (res.action, res.data) == (XDP_DROP, frame)
    lb.expect("drop_no_service")
    assert lb.dp.flow_entries() == flows


# 7. Fragments ----------------------------------------------------------------------

# A first fragment (offset 0) carries the ports and is balanced as its flow's
# packets are (test_xdp_flows.py); a later one goes where its first went. Here
# the later fragments whose first this node never saw (an IP id of their own):
FRAGMENTS = [
    ("vip-tcp-offset", tcp_frame(CLIENT, VIP, 44001, 80, ip_flags=0, frag=185, id=0x7001),
     XDP_DROP, "drop_fragment"),
    ("vip-tcp-mf-and-offset", tcp_frame(CLIENT, VIP, 44002, 80, ip_flags="MF", frag=1,
                                        id=0x7002), XDP_DROP, "drop_fragment"),
    ("other-address-tcp-more-fragments", tcp_frame(CLIENT, OTHER, 44004, 80, ip_flags="MF"),
     XDP_PASS, "pass_not_vip"),
    ("other-address-tcp-offset", tcp_frame(CLIENT, OTHER, 44005, 80, ip_flags=0, frag=185),
     XDP_PASS, "pass_not_vip"),
    ("backend-udp-offset", raw(Ether(src=BACKEND_MAC, dst=LB_MAC)
                               / IP(src=str(BACKENDS[1][0]), dst=str(CLIENT), id=0x7003,
                                    proto=17, frag=185) / Raw(b"c" * 16)),
     XDP_PASS, "pass_not_vip"),
    # ICMP too: the VIP is no host's, nothing would reassemble them.
    ("vip-icmp-more-fragments", raw(Ether(src=CLIENT_MAC, dst=LB_MAC)
                                    / IP(src=str(CLIENT), dst=str(VIP), flags="MF")
                                    / ICMP() / Raw(b"b" * 16)), XDP_DROP, "drop_fragment"),
    # The last fragment (an offset, no MF), here one that looks like a ping.
    ("vip-icmp-last-fragment", raw(Ether(src=CLIENT_MAC, dst=LB_MAC)
                                   / IP(src=str(CLIENT), dst=str(VIP), frag=185, proto=1)
                                   / Raw(raw(ICMP()) + b"b" * 16)), XDP_DROP, "drop_fragment"),
    ("other-address-icmp-more-fragments", raw(Ether(src=CLIENT_MAC, dst=LB_MAC)
                                              / IP(src=str(CLIENT), dst=str(OTHER), flags="MF")
                                              / ICMP() / Raw(b"b" * 16)), XDP_PASS,
     "pass_not_vip"),
]


@pytest.mark.parametrize("frame, action, reason", [c[1:] for c in FRAGMENTS],
                         ids=[c[0] for c in FRAGMENTS])
def test_fragments(lb, frame, action, reason):
    flows = lb.dp.flow_entries()
    res = lb.send(frame)
    assert res.action == action
    assert res.data == frame
    lb.expect(reason)
    assert lb.dp.flow_entries() == flows


# 8. Truncated and malformed -----------------------------------------------------------

# Who sends the cut or malformed frame: a client to a VIP, a client to another
# address, a backend from its service port (what a reply would be):
# (src, dst, sport, dport).
SENDERS = {"vip": (CLIENT, VIP, 46000, 80), "other": (CLIENT, OTHER, 46000, 80),
           "backend": (BACKENDS[1][0], CLIENT, BACKENDS[1][1], 46000)}


def judged(sender, ports):
    """What the program does with a bad frame whose fixed IPv4 header is whole,
    by where its ports are (where the IP header length puts them): "inside" the
    frame, "past" it, or inside but "misplaced" (not the sender's). One to a
    VIP is dropped; a backend's is passed for the kernel to judge (pass_short);
    any other leaves as not xlb's before it is validated (pass_not_vip),
    unless even its ports are past the frame."""
    if sender == "vip":
        return XDP_DROP, "drop_malformed"
    if ports == "past" or (sender == "backend" and ports == "inside"):
        return XDP_PASS, "pass_short"
    return XDP_PASS, "pass_not_vip"


@pytest.mark.parametrize("sender", SENDERS)
@pytest.mark.parametrize("length", range(54))
def test_truncated_syn(lb, sender, length):
    """The 54-byte SYN (Eth 14 + IPv4 20 + TCP 20) cut at every shorter length.

    Kernel behaviour, documented: BPF_PROG_TEST_RUN refuses XDP input shorter
    than ETH_HLEN (14) with EINVAL before the program runs (net/bpf/test_run.c,
    bpf_test_init), so the program's own check for a short Ethernet header
    cannot be reached from here. From 14 bytes on, the program runs: without
    the fixed IPv4 header it passes the frame to the kernel (pass_short); with
    it, as `judged` says (the ports end at byte 38).
    """
    full = tcp_frame(*SENDERS[sender])
    assert len(full) == 54
    frame = full[:length]
    flows = lb.dp.flow_entries()
    if length < 14:
        with pytest.raises(OSError) as err:
            lb.send(frame)
        assert err.value.errno == errno.EINVAL
        assert not lb.last_delta
        return
    res = lb.send(frame)
    assert res.data == frame
    action, reason = (XDP_PASS, "pass_short") if length < 14 + 20 else judged(
        sender, "inside" if length >= 38 else "past")
    assert res.action == action
    lb.expect(reason)
    assert lb.dp.flow_entries() == flows


def malformed_cases(src, dst, sport, dport):
    """name, frame, where its ports are (see `judged`)."""
    return [
        ("tot-len-beyond-frame", tcp_frame(src, dst, sport, dport, len=41), "inside"),
        ("tcp-header-cut-within-tot-len", tcp_frame(src, dst, sport, dport, len=30)[:14 + 30],
         "inside"),
        ("udp-header-cut-within-tot-len",
         raw(Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=str(src), dst=str(dst), len=24)
             / UDP(sport=sport, dport=dport))[:14 + 24], "inside"),
        ("ihl-below-5", tcp_frame(src, dst, sport, dport, ihl=4), "misplaced"),
        ("ihl-beyond-frame", tcp_frame(src, dst, sport, dport, ihl=15), "past"),
        ("version-6-in-ipv4-ethertype", tcp_frame(src, dst, sport, dport, version=6), "inside"),
    ]


@pytest.mark.parametrize("sender", SENDERS)
@pytest.mark.parametrize("case", range(len(malformed_cases(*SENDERS["vip"]))),
                         ids=[c[0] for c in malformed_cases(*SENDERS["vip"])])
def test_malformed(lb, case, sender):
    _, frame, ports = malformed_cases(*SENDERS[sender])[case]
    action, reason = judged(sender, ports)
    flows = lb.dp.flow_entries()
    res = lb.send(frame)
    assert (res.action, res.data) == (action, frame)
    lb.expect(reason)
    assert lb.dp.flow_entries() == flows


# The frame holds tot_len bytes, but tot_len does not cover the headers: the bytes
# after it are padding, not ports.
@pytest.mark.parametrize("frame", [
    tcp_frame(CLIENT, VIP, 46200, 80, len=20),   # IP header only; a TCP header follows outside it
    tcp_frame(CLIENT, VIP, 46201, 80, len=19),   # shorter than its own header (ihl 5)
    tcp_frame(CLIENT, VIP, 46202, 80, len=39),   # TCP header cut by one byte
    raw(Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=str(CLIENT), dst=str(VIP), len=27)
        / UDP(sport=46203, dport=80) / Raw(b"payload")),  # UDP header cut by one byte
], ids=["tot-len-20", "tot-len-19", "tot-len-39-tcp", "tot-len-27-udp"])
def test_tot_len_shorter_than_headers_to_vip_is_malformed(lb, frame):
    flows = lb.dp.flow_entries()
    res = lb.send(frame)
    assert (res.action, res.data) == (XDP_DROP, frame)
    lb.expect("drop_malformed")
    assert lb.dp.flow_entries() == flows


def icmp_echo(dst, **ip_fields):
    return raw(Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=str(CLIENT), dst=str(dst), **ip_fields)
               / ICMP(id=9, seq=1) / Raw(b"ping"))


# A ping that is no sound IPv4 packet: to a VIP it is dropped, as malformed; to
# another address it is the kernel's to judge.
ICMP_MALFORMED = [
    ("tot-len-beyond-frame", dict(len=20 + 8 + 4 + 1)),
    ("tot-len-cuts-icmp-header", dict(len=20 + 7)),
    ("ihl-below-5", dict(ihl=4)),
    ("version-6-in-ipv4-ethertype", dict(version=6)),
]


@pytest.mark.parametrize("dst, action, reason", [(VIP, XDP_DROP, "drop_malformed"),
                                                 (OTHER, XDP_PASS, "pass_short")],
                         ids=["vip", "other"])
@pytest.mark.parametrize("ip_fields", [c[1] for c in ICMP_MALFORMED],
                         ids=[c[0] for c in ICMP_MALFORMED])
def test_malformed_icmp(lb, ip_fields, dst, action, reason):
    frame = icmp_echo(dst, **ip_fields)
    res = lb.send(frame)
    assert (res.action, res.data) == (action, frame)
    lb.expect(reason)


@pytest.mark.parametrize("dst, action, reason", [(VIP, XDP_DROP, "drop_malformed"),
                                                 (OTHER, XDP_PASS, "pass_not_vip")],
                         ids=["vip", "other"])
@pytest.mark.parametrize("ip_fields", [dict(len=20 + 12 + 1), dict(len=19), dict(ihl=4),
                                       dict(version=6)],
                         ids=["tot-len-beyond-frame", "tot-len-below-header", "ihl-below-5",
                              "version-6-in-ipv4-ethertype"])
def test_malformed_packet_of_another_protocol(lb, ip_fields, dst, action, reason):
    """GRE (12 bytes) in no sound IPv4 packet: to a VIP, malformed (it counted
    as for no service); to another address, not xlb's, passed before it is
    looked at."""
    frame = raw(Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=str(CLIENT), dst=str(dst), proto=47,
                                                       **ip_fields) / Raw(b"g" * 12))
    res = lb.send(frame)
    assert (res.action, res.data) == (action, frame)
    lb.expect(reason)


@pytest.mark.parametrize("frame", [
    priority_tagged(tcp_frame(CLIENT, VIP, 46300, 80, payload=b"x" * 10))[:-2],
    priority_tagged(icmp_echo(VIP))[:-2],
], ids=["tcp", "icmp-echo"])
def test_a_priority_tagged_frame_cut_short_of_its_ip_total_length_is_malformed(lb, frame):
    """The datagram starts after the tag: a tagged frame two bytes short of
    its IP total length is cut, though its length is more than an untagged
    frame's Ethernet header and total length."""
    res = lb.send(frame)
    assert (res.action, res.data) == (XDP_DROP, frame)
    lb.expect("drop_malformed")


# 9. A service without backends ----------------------------------------------------------

def test_service_without_backend_drops_new_flows(lb):
    dp = lb.dp
    vip, port, proto, ring, _ = SERVICES[SVC_EMPTY]
    flows = dp.flow_entries()
    syn = tcp_frame(CLIENT, VIP, 47000, 443)
    res = lb.send(syn)
    assert (res.action, res.data) == (XDP_DROP, syn)
    lb.expect("drop_no_backend")
    assert dp.flow_entries() == flows

    # Backends arrive: the same client port is simply a new flow (nothing remembered the drop).
    dp.write_ring(ring, [1, 2])
    dp.set_service(vip, port, proto, SVC_EMPTY, ring, 2)
    try:
        res = lb.send(syn)
        assert res.action == XDP_PASS
        bid = chosen_backend(res.data, SVC_EMPTY, ring=[1, 2])
        assert res.data == tcp_frame(CLIENT, BACKENDS[bid][0], 47000, 8080)
        lb.expect("forward", flow=("in", SVC_EMPTY, bid, True))

        # Gone again: the established flow keeps its backend, a new one is dropped.
        dp.set_service(vip, port, proto, SVC_EMPTY, ring, 0)
        ack = tcp_frame(CLIENT, VIP, 47000, 443, flags="A", seq=1001, ack=1)
        res = lb.send(ack)
        assert (res.action, res.data) == (XDP_PASS, tcp_frame(CLIENT, BACKENDS[bid][0], 47000,
                                                              8080, flags="A", seq=1001, ack=1))
        lb.expect("forward", flow=("in", SVC_EMPTY, bid, False))
        syn2 = tcp_frame(CLIENT, VIP, 47001, 443)
        res = lb.send(syn2)
        assert (res.action, res.data) == (XDP_DROP, syn2)
        lb.expect("drop_no_backend")
    finally:
        dp.set_service(vip, port, proto, SVC_EMPTY, ring, 0)


# 10. Counters over a whole exchange ----------------------------------------------------

def test_counters_match_what_was_sent(lb):
    """A service and backends used by this test only: their counters must be
    exactly the sums of what was sent; the reasons moved by exactly these frames."""
    dp = lb.dp
    ring = SERVICES[SVC_COUNT][4]
    start = lb.snapshot()
    moved = Counter()
    backend_of, sent_in, sent_out = {}, [], []   # sent_*: (backend, frame length, new?)

    for sport, payload in ((53001, b"a" * 10), (53002, b"b" * 100), (53003, b"c")):
        frame = udp_frame(CLIENT, VIP3, sport, 53, payload=payload)
        res = lb.send(frame)
        assert res.action == XDP_PASS
        backend_of[sport] = bid = chosen_backend(res.data, SVC_COUNT)
        moved += lb.expect("forward", flow=("in", SVC_COUNT, bid, True))
        sent_in.append((bid, len(frame), True))
    assert backend_of[53001] != backend_of[53002]  # round-robin alternates
    assert backend_of[53003] == backend_of[53001]

    for payload in (b"d" * 20, b"e" * 300):
        frame = udp_frame(CLIENT, VIP3, 53001, 53, payload=payload)
        res = lb.send(frame)
        assert ip_of(res.data, "dst") == BACKENDS[backend_of[53001]][0]
        moved += lb.expect("forward", flow=("in", SVC_COUNT, backend_of[53001], False))
        sent_in.append((backend_of[53001], len(frame), False))

    for sport, payload in ((53001, b"r" * 50), (53001, b"s" * 5), (53002, b"t" * 1000)):
        addr, bport = BACKENDS[backend_of[sport]]
        frame = udp_frame(addr, CLIENT, bport, sport, payload=payload, eth_src=BACKEND_MAC)
        res = lb.send(frame)
        assert res.action == XDP_PASS
        assert res.data == udp_frame(VIP3, CLIENT, 53, sport, payload=payload,
                                     eth_src=BACKEND_MAC)
        moved += lb.expect("reply", flow=("out", SVC_COUNT, backend_of[sport], False))
        sent_out.append((backend_of[sport], len(frame)))

    frame = udp_frame(CLIENT, VIP3, 53004, 54)  # the VIP, no service on that port
    res = lb.send(frame)
    assert (res.action, res.data) == (XDP_DROP, frame)
    moved += lb.expect("drop_no_service")

    end = lb.snapshot()
    assert {k: end[k] - start[k] for k in end if end[k] != start[k]} == dict(moved)

    def totals(who=None):
        ins = [(n, new) for bid, n, new in sent_in if who in (None, bid)]
        outs = [n for bid, n in sent_out if who in (None, bid)]
        return (len(ins), sum(n for n, _ in ins), len(outs), sum(outs),
                sum(1 for _, new in ins if new))

    def read(c):
        return (c.packets_in, c.bytes_in, c.packets_out, c.bytes_out, c.new_flows)

    assert read(dp.service_counters(SVC_COUNT)) == totals() == (5, 5 * 42 + 10 + 100 + 1 + 320,
                                                                3, 3 * 42 + 1055, 3)
    for bid in ring:
        assert read(dp.backend_counters(bid)) == totals(bid)
    assert end["reason.forward.packets"] - start["reason.forward.packets"] == 5
    assert end["reason.reply.packets"] - start["reason.reply.packets"] == 3


def test_syn_on_a_closed_backends_flow_is_balanced_anew(lb):
    """A client that reuses a port opens a new connection: when the remembered
    backend takes no new flows, the SYN goes to a backend that does, while
    the other packets of the old flow keep their backend."""
    dp = lb.dp
    syn = tcp_frame(CLIENT, VIP, 47100, 80)
    res = lb.send(syn)
    first = chosen_backend(res.data, SVC_TCP)
    other = 2 if first == 1 else 1
    addr, port = BACKENDS[first]
    dp.set_backend(first, addr, port, closed=True)
    try:
        ack = tcp_frame(CLIENT, VIP, 47100, 80, flags="A", seq=1001, ack=1)
        res = lb.send(ack)                               # established: kept
        assert res.data == tcp_frame(CLIENT, addr, 47100, 8080, flags="A", seq=1001, ack=1)
        lb.expect("forward", flow=("in", SVC_TCP, first, False))
        synack = tcp_frame(CLIENT, VIP, 47100, 80, flags="SA", seq=1001, ack=1)
        res = lb.send(synack)                            # not a SYN alone: kept too
        assert res.data == tcp_frame(CLIENT, addr, 47100, 8080, flags="SA", seq=1001, ack=1)
        lb.expect("forward", flow=("in", SVC_TCP, first, False))
        for _ in range(2):                               # whatever the round-robin cursor
            res = lb.send(syn)
            if chosen_backend(res.data, SVC_TCP) == other:
                break
        assert res.data == tcp_frame(CLIENT, BACKENDS[other][0], 47100, 8080)
        lb.expect("forward", flow=("in", SVC_TCP, other, True))
        res = lb.send(ack)                               # the new flow's packets follow it
        assert res.data == tcp_frame(CLIENT, BACKENDS[other][0], 47100, 8080, flags="A",
                                     seq=1001, ack=1)
    finally:
        dp.set_backend(first, addr, port)


def test_repeated_syn_on_a_flow_whose_backend_is_up_keeps_it(lb):
    """A SYN sent again (a retransmission, or a port reused while the server is
    up) stays with the flow's backend, whatever the round-robin cursor says,
    and is no new flow."""
    syn = tcp_frame(CLIENT, VIP, 47200, 80, flags="S", seq=1000, options=SYN_OPTIONS)
    first = chosen_backend(lb.send(syn).data, SVC_TCP)
    lb.expect("forward", flow=("in", SVC_TCP, first, True))
    addr, _ = BACKENDS[first]
    for _ in range(2):               # the cursor now points at the other backend, then back
        res = lb.send(syn)
        assert res.data == tcp_frame(CLIENT, addr, 47200, 8080, flags="S", seq=1000,
                                     options=SYN_OPTIONS)
        lb.expect("forward", flow=("in", SVC_TCP, first, False))
