"""Hostile traffic: hypothesis feeds the XDP program over 100,000 generated frames
through BPF_PROG_TEST_RUN and checks what it may do with each.

The maps are filled through the control plane's own steps (a TOML config with
a Maglev pool loaded by xlb.config, planner.desired/plan/execute, the
Datapath API), with the links given by hand rather than read by netif:
test_planner.FakeLink for FibNet's ext and int, by ifindex, with VIP_MAC and
subnets of the test's choosing (int's holds VIP_ELSEWHERE). Nothing is
attached. Then flows are opened through the program itself, so that a good
share of the frames hit services, backends' replies on known flows and ARP
for the VIPs; the rest is odd or random: IPv4 options, bad version, IHL and
total length, fragments, every TCP flag and option, UDP checksum 0, wrong IP
and L4 checksums, ICMP echo and errors quoting flows, frames over a backend
link's MTU, IPv6, VLAN, ARP of every shape, broadcast and multicast MACs,
truncation at any length, random bytes; a tenth of every kind priority-tagged
(802.1Q, VLAN ID 0).

Per frame (`check`):
- the action is a known one and never XDP_ABORTED; XDP_TX and XDP_REDIRECT
  never send a frame back unchanged;
- an ARP request for a VIP on the link that answers for it gets exactly the
  reply (TX); any other ARP frame is untouched;
- IPv4 to a broadcast or multicast MAC passes untouched;
- a ping of a VIP gets exactly its echo reply (TX); a frame that changes
  length is exactly xlb's "fragmentation needed" (TX) about a DF packet over
  its backend link's MTU;
- any other change is to an IPv4 frame with a sound header, of the same
  length, and only in what NAT and forwarding may change: addresses and ports
  only of a TCP/UDP datagram (or first fragment) whose headers it holds, the
  address alone of a later fragment, the checksums,
  and, exactly when the program sends the frame itself (TX, REDIRECT), the
  MACs (a link's as source, a next hop's as destination) and TTL - 1 (never
  to 0). NAT is to a backend of the service the frame was
  addressed to, or back from a backend to its service. An ICMP error about a
  flow changes only the quoted packet's end (between a service and its
  backend, with its checksums), the outer address that goes with it, and the
  ICMP and IP checksums.
- A priority-tagged frame is checked as the untagged frame it is to the
  program: what it passes or drops keeps the tag, what it sends (TX,
  REDIRECT) leaves without it.
- What "the checksums verify" means, including for inputs whose checksum was
  wrong: a checksum is right when the ones' complement sum of what it covers
  (IP header; pseudo-header and whole TCP/UDP segment; ICMP message) is 0
  modulo 0xffff (0x0000 and 0xffff are the same number, ones' complement
  zero). The program
  updates checksums incrementally (RFC 1624), which keeps that sum: the check
  is that it is *the same* before and after, so a right checksum stays right
  and a wrong one stays exactly as wrong (a receiver drops it as it would have
  without xlb; a full recomputation would launder corrupt data). UDP checksum
  0 (none) stays 0, and a nonzero one never becomes 0.
Per batch of frames: the reason counters moved by exactly one packet and its
length per frame, in reasons whose action is the one each frame returned;
`test_counters_per_packet` checks that frame by frame on a smaller run.

The module runs in conftest's FibNet (a private network namespace, no
traffic), so that in fast-path mode bpf_fib_lookup gives every answer: next
hop (TX, REDIRECT), no neighbour, no route, blackhole, forwarding off. Half
the frames run with the fast path, half with the kernel routing.

Hypothesis draws the seed of each batch (see "What to send"), derandomized and
without a database: every run tries the same frames, and a failure names the
seed, the frame's index and its recipe, with the bytes in and out. There is no
shrinking: the failing frame is named already. The program's state (flows,
round-robin cursors) persists across the module, as it would on a link.
"""

from __future__ import annotations

import random
import socket
import struct
from collections import Counter
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import packets
from packets import ones_sum
from test_planner import FakeLink
from xlb import config, layout, planner

pytestmark = pytest.mark.kernel

XDP = layout.XDP_ACTIONS
ABORTED, DROP, PASS, TX, REDIRECT = (XDP[a] for a in ("XDP_ABORTED", "XDP_DROP", "XDP_PASS",
                                                      "XDP_TX", "XDP_REDIRECT"))
REASON_ACTION = {name: XDP[a] for name, a in zip(layout.REASON_NAMES, layout.REASON_ACTIONS)}

TCP, UDP, ICMP = socket.IPPROTO_TCP, socket.IPPROTO_UDP, socket.IPPROTO_ICMP
ETH_IP, ETH_ARP, ETH_IPV6, ETH_VLAN, ETH_QINQ = 0x0800, 0x0806, 0x86dd, 0x8100, 0x88a8


def mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


# CLIENT_MAC and BACKEND_MAC are the MACs of FibNet's neighbours.
VIP_MAC, LB_MAC, CLIENT_MAC, BACKEND_MAC = (mac(m) for m in (packets.VIP_MAC, packets.LB_MAC,
                                                             packets.CLIENT_MAC,
                                                             packets.BACKEND_MAC))

VIP = IPv4Address("10.1.1.101")
VIP2 = IPv4Address("10.1.1.102")
VIP_ELSEWHERE = IPv4Address("10.1.2.103")     # its ARP is answered on the link "int" only
# The backends and clients are where conftest.FibNet's routes and neighbours
# make every answer of bpf_fib_lookup happen: web1, web2, dns1 (a link with MTU
# 1280), dns2 (a link with forwarding off) and the client 10.1.1.10 have next
# hops; web3 and 10.1.1.11 no neighbour entry; 192.0.2.7 no route; dead a
# blackhole route; 198.51.100.7 a gateway without neighbour entry.
CONFIG = f"""
[servers.web1]
address = "10.1.11.101"
port = 8080
[servers.web2]
address = "10.1.11.102"
port = 8080
weight = 2
[servers.web3]
address = "10.1.11.103"
port = 8080
[servers.dns1]
address = "10.1.13.101"
port = 5353
[servers.dns2]
address = "10.1.14.101"
port = 53
[servers.dead]
address = "203.0.113.1"
port = 443

[pools.web]
servers = ["web1", "web2", "web3"]
algorithm = "weighted"
[pools.dns]
servers = ["dns1", "dns2"]
algorithm = "maglev"
maglev_size = 211
[pools.dead]
servers = ["dead"]

[frontends.www]
vip = "{VIP}"
port = 80
protocol = "tcp"
pool = "web"
[frontends.dns]
vip = "{VIP}"
port = 53
protocol = "udp"
pool = "dns"
[frontends.tls]
vip = "{VIP}"
port = 443
protocol = "tcp"
pool = "dead"
[frontends.alt]
vip = "{VIP2}"
port = 8080
protocol = "tcp"
pool = "web"
[frontends.alt-udp]
vip = "{VIP2}"
port = 8080
protocol = "udp"
pool = "dns"
[frontends.elsewhere]
vip = "{VIP_ELSEWHERE}"
port = 80
protocol = "tcp"
pool = "web"
"""
# After the seed flows are open: web3 drained (its flows stay, a SYN on one is
# balanced anew) and the only server of "dead" down (its service has no backend).
LATER_STATES = {("web", "web3"): "drain", ("dead", "dead"): "down"}

CLIENTS = [IPv4Address("10.1.1.10"), IPv4Address("10.1.1.11"), IPv4Address("192.0.2.7"),
           IPv4Address("198.51.100.7")]
CLIENT_PORTS = [40000, 40001, 50000, 65535]
OTHERS = [IPv4Address("10.1.1.200"), IPv4Address("10.1.11.1"), IPv4Address("0.0.0.0"),
          IPv4Address("255.255.255.255"), IPv4Address("224.0.0.1")]


@dataclass(frozen=True)
class SeedFlow:
    """A connection opened before fuzzing: what the client sent to, where it went."""
    proto: int
    client: tuple[bytes, int]
    service: tuple[bytes, int]
    backend: tuple[bytes, int]


@dataclass
class World:
    """What the maps hold, in packet terms (addresses as 4 bytes)."""
    services: dict          # (vip, port, proto) -> {(backend address, port)} of its pool
    arp: dict               # (ifindex, address) -> MAC
    links: dict             # FibNet's links: name -> ifindex
    link_macs: set          # their MACs: the source of a frame the program sends
    next_hops: set          # the neighbours' MACs: its destination
    seeds: dict             # proto -> [SeedFlow]
    vips: list
    addresses: list         # every address worth aiming at
    ports: list

    @property
    def service_keys(self) -> dict:
        return {proto: [k for k in self.services if k[2] == proto] for proto in (TCP, UDP)}


def _apply(dp, cfg, links, previous, states):
    lim = dp.limits
    target = planner.desired(cfg, links, previous, max_services=lim.max_services,
                             max_backends=lim.max_backends, ring_size=lim.ring_size,
                             max_maglev=lim.max_maglev, states=states)
    planner.execute(dp, planner.plan(previous, target))
    return target


@pytest.fixture(scope="module")
def world(datapath, fibnet):
    """The maps filled by the planner and the Datapath as `xlb up` fills them,
    in a FibNet, its links described by FakeLink (not read by netif): ARP for
    VIP and VIP2 on the link ext, for VIP_ELSEWHERE on int."""
    cfg = config.load(CONFIG)
    ifindex = fibnet.ifindex
    fibnet.as_native(datapath)
    links = [FakeLink(ifindex["ext"], "ext", VIP_MAC, IPv4Network("10.1.1.0/24")),
             FakeLink(ifindex["int"], "int", VIP_MAC, IPv4Network("10.1.2.0/24"))]
    state = _apply(datapath, cfg, links, planner.DataplaneState(), {})
    services = {}
    for fe in cfg.frontends:
        pool = cfg.pool(fe.pool)
        services[(fe.vip.packed, fe.port, fe.proto_number)] = {
            (s.address.packed, s.port) for s in pool.servers}

    seeds = {TCP: [], UDP: []}
    for (vip, port, proto) in services:
        for client in CLIENTS:
            for cport in CLIENT_PORTS:
                seeds[proto].append(_open_flow(datapath, ifindex, proto,
                                               (client.packed, cport), (vip, port)))
    state = _apply(datapath, cfg, links, state, LATER_STATES)

    vips = sorted({v for v, _, _ in services})
    backend_addrs = sorted({a for ends in services.values() for a, _ in ends})
    ports = sorted({p for _, p, _ in services} | {p for ends in services.values() for _, p in ends}
                   | set(CLIENT_PORTS) | {0})
    arp = {(ifindex, vip.packed): mac for (ifindex, vip), mac in state.arp.items()}
    link_macs = {mac(m) for m in fibnet.MACS.values()}
    return World(services, arp, dict(ifindex), link_macs, {CLIENT_MAC, BACKEND_MAC}, seeds, vips,
                 vips + backend_addrs + [a.packed for a in CLIENTS + OTHERS], ports)


def _open_flow(dp, ifindex, proto, client, service) -> SeedFlow:
    """Opens a connection through the program (for TCP the whole handshake, so
    that it is established whatever states the program keeps)."""
    ext, int_ = ifindex["ext"], ifindex["int"]
    if proto == TCP:
        out = _run_ok(dp, frame_ip(*client, *service, TCP, tcp(flags=0x02)), ext)
        backend = out[30:34], struct.unpack("!H", out[36:38])[0]
        _run_ok(dp, frame_ip(*backend, *client, TCP, tcp(flags=0x12, seq=5000, ack=1001)), int_)
        _run_ok(dp, frame_ip(*client, *service, TCP, tcp(flags=0x10, seq=1001, ack=5001)), ext)
    else:
        out = _run_ok(dp, frame_ip(*client, *service, UDP, udp(b"hello")), ext)
        backend = out[30:34], struct.unpack("!H", out[36:38])[0]
    return SeedFlow(proto, client, service, backend)


def _run_ok(dp, frame, ifindex):
    res = dp.test_run(frame, ifindex)
    assert res.action != DROP and res.data != frame, "a seed flow was not balanced"
    return res.data


# Frames, built with struct: scapy takes ~2 ms a frame, minutes for this module.
# tests/test_fuzz.py::test_builders_agree_with_scapy checks them against scapy.

def csum(data: bytes) -> int:
    """The Internet checksum that makes data (with zeros in its place) sum to 0xffff."""
    return ~ones_sum(data) & 0xffff


def tcp(*, flags=0x02, seq=1000, ack=0, window=64240, urg=0, options=b"", payload=b"",
        doff=None) -> "L4":
    """flags: the 12 bits after the data offset (4 reserved/NS, then CWR ... FIN)."""
    options += b"\x00" * (-len(options) % 4)
    doff = (20 + len(options)) // 4 if doff is None else doff
    head = struct.pack("!HHIIHHHH", 0, 0, seq, ack, (doff << 12) | flags, window, 0, urg)
    return L4(head + options + payload, 16)


def udp(payload=b"", length=None) -> "L4":
    length = 8 + len(payload) if length is None else length
    return L4(struct.pack("!HHHH", 0, 0, length, 0) + payload, 6)


@dataclass
class L4:
    """A TCP or UDP segment with its ports and checksum still 0, and where its checksum is."""
    data: bytes
    csum_at: int

    def with_ports(self, sport, dport) -> bytes:
        return struct.pack("!HH", sport, dport) + self.data[4:]


def put16(data: bytes, at: int, value: int) -> bytes:
    return data[:at] + struct.pack("!H", value) + data[at + 2:]


def ipv4(src: bytes, dst: bytes, proto: int, payload: bytes, *, ttl=64, ident=0x1234,
         frag=0x4000, tos=0, options=b"", version=4, ihl=None, tot_len_change=0,
         csum_error=0) -> bytes:
    """An IPv4 packet; frag is the whole flags/offset word (0x4000: DF).
    tot_len_change: added to the right total length (mod 2**16);
    csum_error: added (ones' complement) to the right header checksum."""
    options += b"\x00" * (-len(options) % 4)
    hl = 20 + len(options)
    ihl = hl // 4 if ihl is None else ihl
    tot_len = (hl + len(payload) + tot_len_change) & 0xffff
    head = struct.pack("!BBHHHBBH4s4s", version << 4 | ihl, tos, tot_len, ident, frag, ttl,
                       proto, 0, src, dst) + options
    return put16(head, 10, add16(csum(head), csum_error)) + payload


def add16(a: int, b: int) -> int:
    """Ones' complement addition of 16-bit words."""
    s = a + b
    return (s & 0xffff) + (s >> 16)


def l4_checksummed(src, dst, proto, segment: bytes, csum_at: int, error=0) -> bytes:
    pseudo = src + dst + struct.pack("!BBH", 0, proto, len(segment))
    value = add16(csum(pseudo + segment), error)
    if proto == UDP and value == 0:
        value = 0xffff          # RFC 768: a computed 0 is sent as all ones
    return put16(segment, csum_at, value)


def ether(body: bytes, ethertype=ETH_IP, dst=LB_MAC, src=CLIENT_MAC) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + body


def frame_ip(src, sport, dst, dport, proto, seg: L4) -> bytes:
    """The plain case: Ethernet, IPv4 without options, a right checksum everywhere."""
    segment = l4_checksummed(src, dst, proto, seg.with_ports(sport, dport), seg.csum_at)
    return ether(ipv4(src, dst, proto, segment))


def arp(op=1, sha=CLIENT_MAC, spa=b"\x0a\x01\x01\x0a", tha=b"\0" * 6, tpa=VIP.packed,
        hrd=1, pro=ETH_IP, hln=6, pln=4) -> bytes:
    return struct.pack("!HHBBH", hrd, pro, hln, pln, op) + sha + spa + tha + tpa


# What to send -----------------------------------------------------------------
# Hypothesis draws one number an example: the seed of a batch of frames. Each
# frame takes a recipe (the kind of frame and what is odd about it), in the
# shares below, and its values from that seed. Drawing each field instead
# costs ~40 us a draw here (minutes for this module), and hypothesis's
# integers lean so hard towards a few values (0, the bounds, constants of the
# code) that nine drawn numbers in ten repeat an earlier one. Values lean
# towards what the maps know and towards the edges (0, all ones).

IP_OPTIONS = [
    b"\x01\x01\x01\x01",                                     # NOPs
    b"\x00\x00\x00\x00",                                     # end of options
    b"\x07\x07\x04" + b"\0" * 4,                             # record route, room for 1
    b"\x07\x27\x04" + b"\0" * 36,                            # record route, full 40 bytes
    b"\x44\x0c\x05\x00" + b"\0" * 8,                         # timestamp
    b"\x94\x04\x00\x00",                                     # router alert
    b"\x83\x07\x04\x0a\x01\x01\x01",                         # loose source route
    b"\x07\x00\x04",                                         # length 0: bad
    b"\x07\xff\x04",                                         # length beyond the header: bad
]
TCP_OPTIONS = [
    b"\x02\x04\x05\xb4", b"\x03\x03\x07", b"\x04\x02", b"\x01", b"\x00",
    b"\x08\x0a" + bytes(range(8)), b"\x05\x0a" + bytes(8), b"\x05\x12" + bytes(16),
    b"\x02\x00", b"\x08\xff", b"\x1e\x06\x00\x00\x00\x00",     # bad lengths, MPTCP
]
TCP_FLAGS = [0x002, 0x012, 0x010, 0x018, 0x011, 0x004, 0x014, 0x001, 0x0c2, 0x029, 0x000,
             0x0ff, 0x003, 0x006, 0x100, 0xe00]     # the last: NS, the reserved bits
FRAG = [0x2000, 0x0001, 0x2001, 0x00b9, 0x8000, 0x1fff, 0x6000, 0x3fff]
ICMP_ERRORS = [(3, c) for c in range(16)] + [(11, 0), (11, 1), (12, 0), (4, 0), (5, 1)]


class Values:
    """The values of one frame, from its seed."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def pick(self, seq):
        return self.rng.choice(seq)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def bits(self, n: int) -> int:
        edge = self.rng.random()
        return 0 if edge < 0.1 else (1 << n) - 1 if edge < 0.2 else self.rng.getrandbits(n)

    def bytes(self, least: int, most: int) -> bytes:
        return self.rng.randbytes(self.rng.randint(least, most))

    def addr(self, known) -> bytes:
        return self.pick(known) if self.chance(0.8) else self.rng.randbytes(4)

    def port(self, known) -> int:
        return self.pick(known) if self.chance(0.7) else self.bits(16)


def endpoints(world: World, v: Values, proto: int, mode: str):
    """(src, sport, dst, dport): a known flow either way, a new one to a
    service, or anything."""
    if mode in ("seed", "reply"):
        s = v.pick(world.seeds[proto])
        return (*s.client, *s.service) if mode == "seed" else (*s.backend, *s.client)
    if mode == "new":
        vip, port, _ = v.pick(world.service_keys[proto])
        return v.addr([c.packed for c in CLIENTS]), v.bits(16), vip, port
    addrs, ports = world.addresses, world.ports
    return v.addr(addrs), v.port(ports), v.addr(addrs), v.port(ports)


def ip_fields(v: Values, odd: str | None, checks: str) -> dict:
    """Keyword arguments of ipv4(): the one odd field, if any, and the rest plain."""
    kw = {"ident": v.bits(16), "frag": v.pick([0x4000, 0])}
    if odd == "options":
        kw["options"] = v.pick(IP_OPTIONS) if v.chance(0.7) else v.bytes(1, 40)
    elif odd == "frag":
        kw["frag"] = v.pick(FRAG) if v.chance(0.7) else v.bits(16)
    elif odd in ("version", "ihl"):
        kw[odd] = v.rng.randint(0, 15)
    elif odd == "tot_len":
        kw["tot_len_change"] = v.rng.randint(-40, 40) if v.chance(0.7) else v.bits(16)
    elif odd == "ttl":
        kw["ttl"] = v.pick([0, 1, 2, 255])
    elif odd == "tos":
        kw["tos"] = v.bits(8)
    if checks == "ip-wrong":
        kw["csum_error"] = v.rng.randint(1, 0xfffe)
    return kw


def l4_frame(world: World, v: Values, proto: int, mode: str, odd: str | None,
             checks: str, big=False) -> bytes:
    """big: over the MTU (1280) of the link "small", where dns1 is, and within
    the 1500 of the link it comes in by, options and all (over that, it could
    only be an aggregate of the kernel's, whose checksum is partial)."""
    src, sport, dst, dport = endpoints(world, v, proto, mode)
    payload = v.bytes(1240, 1380) if big else v.bytes(0, 48)
    if proto == TCP:
        options = b"".join(v.pick(TCP_OPTIONS) if v.chance(0.8) else v.bytes(1, 12)
                           for _ in range(v.rng.randint(0, 5)))[:40]
        seg = tcp(flags=v.pick(TCP_FLAGS) if v.chance(0.5) else v.bits(12), seq=v.bits(32),
                  ack=v.bits(32), window=v.bits(16), urg=v.bits(16), options=options,
                  payload=payload, doff=v.rng.randint(0, 15) if odd == "l4len" else None)
    else:
        seg = udp(payload, length=v.bits(16) if odd == "l4len" else None)
    segment = seg.with_ports(sport, dport)
    if checks == "zero-after-nat" and mode == "seed" and proto == UDP and odd != "l4len":
        segment = zero_after_nat(world, src, sport, dst, dport, segment + b"\0\0")
    elif checks == "l4-wrong":
        segment = l4_checksummed(src, dst, proto, segment, seg.csum_at, v.rng.randint(1, 0xfffe))
    elif checks == "l4-ffff":
        segment = put16(segment, seg.csum_at, 0xffff)
    elif checks != "l4-zero":       # l4-zero: UDP without a checksum; for TCP a wrong one
        segment = l4_checksummed(src, dst, proto, segment, seg.csum_at)
    return ether(ipv4(src, dst, proto, segment, **ip_fields(v, odd, checks)))


def zero_after_nat(world, src, sport, dst, dport, segment):
    """The UDP datagram of a seed flow, its last word chosen so that the
    checksum of the datagram rewritten to the flow's backend computes to 0,
    which must then be sent as 0xffff; the checksum itself right for `dst`."""
    seed = next(s for s in world.seeds[UDP]
                if (s.client, s.service) == ((src, sport), (dst, dport)))
    segment = put16(segment, 4, len(segment))
    addr, port = seed.backend
    rewritten = put16(segment, 2, port)
    partial = ones_sum(src + addr + struct.pack("!BBH", 0, UDP, len(segment)) + rewritten)
    segment = put16(segment, len(segment) - 2, 0xffff - partial)
    return l4_checksummed(src, dst, UDP, segment, 6)


def icmp_frame(world: World, v: Values, kind: str, odd: str | None, checks: str) -> bytes:
    """An echo, or an error quoting a packet of a known flow (either way, as
    sent or as rewritten; now and then with IP options), cut after 8 bytes of
    its L4 header or later."""
    if kind == "echo":
        body = struct.pack("!BBHHH", v.pick([8, 0, 13]), 0, 0, v.bits(16), v.bits(16))
        body += v.bytes(0, 48)
    else:
        kind, code = v.pick(ICMP_ERRORS)
        s = v.pick(world.seeds[TCP] + world.seeds[UDP])
        (src, sport), (dst, dport) = v.pick([(s.client, s.service), (s.client, s.backend),
                                             (s.backend, s.client), (s.service, s.client)])
        seg = tcp(flags=0x18, payload=b"x" * 20) if s.proto == TCP else udp(b"y" * 20)
        options = b"\x01" * 4 * v.rng.randint(1, 10) if v.chance(0.2) else b""
        quoted = ipv4(src, dst, s.proto, l4_checksummed(src, dst, s.proto,
                                                        seg.with_ports(sport, dport), seg.csum_at),
                      options=options)
        mtu = 1400 if (kind, code) == (3, 4) else 0
        body = struct.pack("!BBHHH", kind, code, 0, 0, mtu)
        body += quoted[:v.rng.randint(28 + len(options), len(quoted))]
    error = 0 if checks == "right" else v.rng.randint(1, 0xfffe)
    body = put16(body, 2, add16(csum(body), error))
    return ether(ipv4(v.addr(world.addresses), v.addr(world.addresses), ICMP, body,
                      **ip_fields(v, odd, checks)))


def arp_frame(world: World, v: Values, odd: str | None) -> bytes:
    macs = [LB_MAC, b"\xff" * 6, CLIENT_MAC, VIP_MAC]
    sha = v.pick(macs) if v.chance(0.7) else v.rng.randbytes(6)
    kw = dict(op=v.pick([1, 1, 1, 2]) if v.chance(0.9) else v.bits(16), sha=sha,
              spa=v.addr([c.packed for c in CLIENTS]),
              tpa=v.pick(world.vips) if v.chance(0.5) else v.addr(world.addresses),
              tha=v.pick([b"\0" * 6, b"\xff" * 6]) if v.chance(0.8) else v.rng.randbytes(6))
    if odd is not None:     # one field of the fixed header wrong
        kw[odd] = v.bits(8 if odd in ("hln", "pln") else 16)
    pad = v.pick([b"", bytes(18)]) if v.chance(0.7) else v.bytes(1, 24)
    return ether(arp(**kw) + pad, ETH_ARP, dst=v.pick(macs), src=sha)


def other_frame(world: World, v: Values, kind: str) -> bytes:
    """IPv6, VLAN-tagged IPv4 to a service, other EtherTypes, random IPv4 headers."""
    if kind == "ipv6":
        payload = struct.pack("!HH", v.bits(16), 80) + v.bytes(0, 48)
        return ether(struct.pack("!IHBB", 6 << 28, len(payload), v.pick([TCP, UDP, 58, 0, 44]), 64)
                     + bytes.fromhex("fd00000000000000000000000000000a")
                     + bytes.fromhex("fd000000000000000000000000000101") + payload, ETH_IPV6)
    if kind in ("vlan", "qinq"):
        inner = l4_frame(world, v, v.pick([TCP, UDP]), v.pick(MODES), None, "right")
        tags = struct.pack("!HH", ETH_VLAN, v.bits(12))
        if kind == "qinq":
            tags = struct.pack("!HH", ETH_QINQ, 5) + tags
        return inner[:12] + tags + inner[12:]
    if kind == "ethertype":
        ethertype = v.pick([0x88cc, 0x8847, 0x0842, 0x88e5, 0x0000, 0x05dc]) if v.chance(0.5) \
            else v.bits(16)
        return ether(v.bytes(0, 80), ethertype)
    head = v.bytes(20, 80)      # "ipv4-bytes"; half of them version 4, IHL 5, to a VIP
    if v.chance(0.5):
        head = b"\x45" + head[1:16] + v.pick(world.vips) + head[20:]
    return ether(head)


MODES = ["seed", "seed", "reply", "reply", "new", "new", "any"]
ODD_IP = [None] * 8 + ["options", "frag", "version", "ihl", "tot_len", "ttl", "tos", "l4len"]
CHECKS = ["right"] * 4 + ["ip-wrong", "l4-wrong", "l4-zero", "l4-ffff", "zero-after-nat"]
EDGES = [None] * 6 + ["cut", "pad", "group"]
# Broadcast, IPv4 multicast, IPv6 multicast, a group address of no protocol.
GROUP_MACS = [mac(m) for m in ("ff:ff:ff:ff:ff:ff", "01:00:5e:01:01:65", "33:33:00:00:00:01",
                               "03:00:00:00:00:00")]
TAGS = [None] * 9 + ["priority"]


# family: (share in percent, its recipes: (family, variant, odd field, checksums))
RECIPES = {
    "l4": (55, [("l4", (proto, mode), odd, checks) for proto in (TCP, UDP)
                for mode in MODES for odd in ODD_IP for checks in CHECKS]),
    "icmp": (10, [("icmp", kind, odd, checks) for kind in ("echo", "error")
                  for odd in ODD_IP[:-1] for checks in ("right", "right", "ip-wrong", "wrong")]),
    "arp": (15, [("arp", None, odd, "right") for odd in [None] * 4 + ["hrd", "pro", "hln", "pln"]]),
    "other": (15, [("other", kind, None, "right")
                   for kind in ("ipv6", "vlan", "qinq", "ethertype", "ipv4-bytes")]),
    "random": (5, [("random", None, None, "right")]),
    "big": (3, [("big", proto, None, checks) for proto in (TCP, UDP)
                for checks in ("right", "right", "ip-wrong", "l4-wrong")]),
}


def recipe(v: Values) -> tuple:
    (share, recipes), = v.rng.choices(list(RECIPES.values()),
                                      [share for share, _ in RECIPES.values()])
    return (*v.pick(recipes), v.pick(EDGES), v.pick(TAGS))


def build(world: World, v: Values, recipe: tuple) -> bytes:
    family, variant, odd, checks, edge, tag = recipe
    if family == "l4":
        frame = l4_frame(world, v, *variant, odd, checks)
    elif family == "icmp":
        frame = icmp_frame(world, v, variant, odd, checks)
    elif family == "arp":
        frame = arp_frame(world, v, odd)
    elif family == "other":
        frame = other_frame(world, v, variant)
    elif family == "big":
        frame = l4_frame(world, v, variant, v.pick(["seed", "reply"]), None, checks, big=True)
    else:
        frame = v.bytes(14, 120)
    if tag == "priority":       # any priority and DEI, VLAN ID 0
        frame = frame[:12] + struct.pack("!HH", ETH_VLAN, v.bits(4) << 12) + frame[12:]
    if edge == "cut" and len(frame) > 14:
        frame = frame[:v.rng.randint(14, len(frame) - 1)]
    elif edge == "pad":
        frame += v.bytes(1, 24)
    elif edge == "group":
        frame = v.pick(GROUP_MACS) + frame[6:]
    return frame


INGRESS = ["ext"] * 3 + ["int"] * 2 + ["small", "nofwd"]


def batch(world: World, seed: int, n: int) -> list[tuple[bytes, int, tuple]]:
    """n frames from one seed, each with the link it arrives on and what names
    it: (seed, index, recipe, link)."""
    v = Values(seed)
    out = []
    for i in range(n):
        r, link = recipe(v), v.pick(INGRESS)
        if r[0] == "big" and link == "small":
            link = "ext"        # no frame over its MTU comes in by a link (but an aggregate)
        out.append((build(world, v, r), world.links[link], (seed, i, r, link)))
    return out


# Invariants --------------------------------------------------------------------

def residual(data: bytes) -> int:
    """The ones' complement sum modulo 0xffff: 0 when a checksum in data verifies."""
    return ones_sum(data) % 0xffff


def arp_reply_to(frame: bytes, mac: bytes) -> bytes:
    """What the answer to the ARP request `frame` must be, byte for byte."""
    sha, spa, tpa = frame[22:28], frame[28:32], frame[38:42]
    return (sha + mac + frame[12:20] + b"\x00\x02" + mac + tpa + sha + spa
            + frame[42:])


def is_arp_request(frame: bytes) -> bool:
    """A request that asks: not an announcement (sender address = target address)."""
    return (len(frame) >= 42 and frame[12:14] == b"\x08\x06"
            and frame[14:22] == b"\x00\x01\x08\x00\x06\x04\x00\x01"
            and frame[28:32] != frame[38:42])


def priority_tag(frame: bytes) -> bytes | None:
    """The frame's tag after its MACs if it is a priority tag (802.1Q, VLAN ID 0)."""
    tag = frame[12:16]
    if len(tag) == 4 and tag[:2] == b"\x81\x00" and not struct.unpack("!H", tag[2:])[0] & 0x0fff:
        return tag
    return None


def check(world: World, frame: bytes, ifindex: int, action: int, out: bytes) -> str:
    """Asserts the invariants of one run; returns what the program did."""
    assert action != ABORTED, "XDP_ABORTED"
    assert action in (DROP, PASS, TX, REDIRECT), f"unknown action {action}"
    tag = priority_tag(frame)
    if tag is not None:         # as the untagged frame it is to the program
        frame = packets.untagged(frame)
        if action in (DROP, PASS):
            assert out[12:16] == tag, "passed or dropped without its priority tag"
            out = packets.untagged(out)
        else:
            assert out[12:14] != b"\x81\x00", "sent out with its priority tag"
    mac = world.arp.get((ifindex, frame[38:42])) if is_arp_request(frame) else None
    if mac is not None:
        assert (action, out) == (TX, arp_reply_to(frame, mac)), "ARP request for a VIP not answered"
        return "arp_reply"
    if frame[0] & 1 and frame[12:14] == b"\x08\x00":
        assert (action, out) == (PASS, frame), "acted on IPv4 to a broadcast or multicast MAC"
        return "pass"
    if out == frame:
        assert action in (DROP, PASS), "sent back or redirected unchanged"
        return "drop" if action == DROP else "pass"
    if len(out) != len(frame):
        return check_too_big(world, frame, action, out)
    assert frame[12:14] == b"\x08\x00", \
        "rewrote a frame that is neither IPv4 nor an ARP request for a VIP"
    return check_ipv4_rewrite(world, frame, action, out)


def check_ipv4_rewrite(world: World, frame: bytes, action: int, out: bytes) -> str:
    version, hl = frame[14] >> 4, (frame[14] & 0x0f) * 4
    assert version == 4 and hl >= 20 and 14 + hl <= len(frame), \
        "rewrote a frame whose IPv4 header is bad or cut short"
    tot_len, = struct.unpack("!H", frame[16:18])
    proto, l4 = frame[23], 14 + hl
    offset = struct.unpack("!H", frame[20:22])[0] & 0x1fff
    l4_len = {TCP: 20, UDP: 8}.get(proto)
    l4_ok = (l4_len is not None and not offset and tot_len >= hl + l4_len
             and 14 + tot_len <= len(frame))
    sends = action in (TX, REDIRECT)
    if proto == ICMP:
        return check_icmp_rewrite(world, frame, action, out)

    allowed = {24, 25}                                    # IP header checksum
    if sends:
        allowed |= set(range(12)) | {22}                  # MACs, TTL
    addrs, ports = set(range(26, 34)), set(range(l4, l4 + 4))
    l4_csum = set(range(l4 + (16 if proto == TCP else 6), l4 + (18 if proto == TCP else 8)))
    later_fragment = l4_len is not None and offset
    if l4_ok:
        allowed |= addrs | ports | l4_csum
    elif later_fragment:
        allowed |= addrs
    changed = {i for i in range(len(frame)) if frame[i] != out[i]}
    assert changed <= allowed, (f"changed bytes {sorted(changed - allowed)} that "
                                f"{'forwarding' if sends else 'NAT (passed to the kernel)'} "
                                "may not change")
    if sends:
        assert out[6:12] in world.link_macs and out[0:6] in world.next_hops, \
            "sent from a MAC not of a link, or to one not of a next hop"
        assert out[22] == frame[22] - 1 >= 1, "sent without TTL - 1, or with TTL 0"
    else:
        assert out[22] == frame[22], "TTL changed in a frame passed to the kernel"
    assert residual(out[14:l4]) == residual(frame[14:l4]), \
        "the IP header checksum is not as right (or as wrong) as before"
    if later_fragment:
        return check_later_fragment(world, frame, out, proto)
    if not changed & (addrs | ports | l4_csum):
        return "forwarded"

    def l4_sum(f):
        segment = f[l4:14 + tot_len]
        return residual(f[26:34] + struct.pack("!BBH", 0, proto, len(segment)) + segment)
    if proto == UDP and frame[l4 + 6:l4 + 8] == b"\0\0":
        assert out[l4 + 6:l4 + 8] == b"\0\0", "UDP checksum 0 (none) not kept"
    else:
        assert l4_sum(out) == l4_sum(frame), \
            "the TCP/UDP checksum is not as right (or as wrong) as before"
        assert proto == TCP or out[l4 + 6:l4 + 8] != b"\0\0", "a UDP checksum made 0 (none)"

    def ends(f):
        return (f[26:30], struct.unpack("!H", f[l4:l4 + 2])[0],
                f[30:34], struct.unpack("!H", f[l4 + 2:l4 + 4])[0])
    src, sport, dst, dport = ends(frame)
    nsrc, nsport, ndst, ndport = ends(out)
    if (ndst, ndport) != (dst, dport):
        assert (nsrc, nsport) == (src, sport), "both source and destination rewritten"
        assert (ndst, ndport) in world.services.get((dst, dport, proto), ()), \
            "destination rewritten to what is not a backend of the service addressed"
        return "forward"
    assert (nsrc, nsport) != (src, sport), "a checksum changed without a NAT"
    assert (src, sport) in world.services.get((nsrc, nsport, proto), ()), \
        "source rewritten to a service the sender is no backend of"
    return "reply"


def check_later_fragment(world: World, frame: bytes, out: bytes, proto: int) -> str:
    """A fragment after the first (its other bytes checked by the caller):
    one address at most, to a backend of the service addressed or back from
    a backend to its service."""
    src, dst, nsrc, ndst = frame[26:30], frame[30:34], out[26:30], out[30:34]
    if (nsrc, ndst) == (src, dst):
        return "forwarded"
    if ndst != dst:
        assert nsrc == src, "both source and destination of a fragment rewritten"
        assert any(ndst == b for b, _ in set().union(*(
            bes for (vip, _, p), bes in world.services.items() if (vip, p) == (dst, proto)))), \
            "a fragment's destination rewritten to no backend of a service of its address"
        return "forward"
    assert any(src == b for b, _ in set().union(*(
        bes for (vip, _, p), bes in world.services.items() if (vip, p) == (nsrc, proto)))), \
        "a fragment's source rewritten to a service the sender is no backend of"
    return "reply"


def check_icmp_rewrite(world: World, frame: bytes, action: int, out: bytes) -> str:
    """An echo request to a VIP answered in place, or an ICMP error about a
    balanced flow made to match the connection its receiver knows."""
    hl = (frame[14] & 0x0f) * 4
    l4 = 14 + hl
    tot_len, = struct.unpack("!H", frame[16:18])
    assert not struct.unpack("!H", frame[20:22])[0] & 0x3fff and 14 + tot_len <= len(frame), \
        "rewrote an ICMP fragment, or one cut short"
    icmp = slice(l4, 14 + tot_len)
    assert residual(out[14:l4]) == residual(frame[14:l4]), \
        "the IP header checksum is not as right (or as wrong) as before"
    icmp_sum_kept = residual(out[icmp]) == residual(frame[icmp])
    if frame[l4:l4 + 2] == b"\x08\x00":
        assert icmp_sum_kept, "the ICMP checksum is not as right (or as wrong) as before"
        reply = bytearray(frame[6:12] + frame[0:6] + frame[12:26] + frame[30:34] + frame[26:30]
                          + frame[34:])
        if reply[20] & 0x40:    # no DF, as Linux answers, and an id of its own
            reply[20] &= ~0x40
            reply[18:20] = out[18:20]
        reply[22], reply[l4] = 64, 0
        for at in (24, 25, l4 + 2, l4 + 3):     # the checksums, checked above
            reply[at] = out[at]
        assert (action, out) == (TX, bytes(reply)) and frame[30:34] in world.vips, \
            "not the echo reply to a ping of a VIP"
        return "echo_reply"

    sends = action in (TX, REDIRECT)
    inner = l4 + 8
    inner_hl = (frame[inner] & 0x0f) * 4        # its ports follow its options
    assert frame[l4] in (3, 11, 12) and frame[inner] >> 4 == 4 and inner_hl >= 20 \
        and frame[inner + 9] in (TCP, UDP), \
        "rewrote an ICMP message that is no error about a TCP or UDP packet"
    proto = frame[inner + 9]
    inner_csum = inner + inner_hl + (16 if proto == TCP else 6)
    has_csum = inner_csum + 2 <= 14 + tot_len
    assert icmp_sum_kept, "the ICMP checksum is not as right (or as wrong) as before"
    allowed = {24, 25, l4 + 2, l4 + 3} | set(range(26, 34)) | {inner + 10, inner + 11}
    allowed |= set(range(inner + 12, inner + 20)) | set(range(inner + inner_hl,
                                                              inner + inner_hl + 4))
    if has_csum:
        allowed |= {inner_csum, inner_csum + 1}
    if sends:
        allowed |= set(range(12)) | {22}
    changed = {i for i in range(len(frame)) if frame[i] != out[i]}
    assert changed <= allowed, f"changed bytes {sorted(changed - allowed)} of an ICMP error"
    assert residual(out[inner:inner + inner_hl]) == residual(frame[inner:inner + inner_hl]), \
        "the quoted IP header's checksum is not as right (or as wrong) as before"
    if has_csum:
        if proto == UDP and frame[inner_csum:inner_csum + 2] == b"\0\0":
            assert out[inner_csum:inner_csum + 2] == b"\0\0", "quoted UDP checksum 0 not kept"
        else:
            assert quoted_sum(out, inner) == quoted_sum(frame, inner), \
                "the quoted TCP/UDP checksum is not as right (or as wrong) as before"

    def ends(f):            # the quoted packet's (address, port) of source and destination
        sport, dport = struct.unpack("!HH", f[inner + inner_hl:inner + inner_hl + 4])
        return (f[inner + 12:inner + 16], sport), (f[inner + 16:inner + 20], dport)
    (old_src, old_dst), (new_src, new_dst) = ends(frame), ends(out)
    assert (old_src == new_src) != (old_dst == new_dst), \
        "not exactly one end of the quoted packet rewritten"
    old, new = (old_src, new_src) if old_src != new_src else (old_dst, new_dst)
    assert (new in world.services.get((*old, proto), ())
            or old in world.services.get((*new, proto), ())), \
        "the quoted packet rewritten between other than a service and a backend of it"
    for at in (26, 30):     # an outer address changes only to the new quoted one
        assert out[at:at + 4] in (frame[at:at + 4], new[0]), \
            "an outer address rewritten to another than the quoted packet's new one"
    return "icmp_error"


def quoted_sum(f: bytes, inner: int) -> int:
    """What NAT of a quoted TCP/UDP packet (its IP header at `inner`) changes of
    the sum its L4 checksum covers: addresses, ports, the checksum itself."""
    ports = inner + (f[inner] & 0x0f) * 4
    csum_at = ports + (16 if f[inner + 9] == TCP else 6)
    return residual(f[inner + 12:inner + 20] + f[ports:ports + 4] + f[csum_at:csum_at + 2])


def check_too_big(world: World, frame: bytes, action: int, out: bytes) -> str:
    """xlb's own "fragmentation needed", back to the sender of a DF packet
    that its rewrite would send over a smaller MTU (1280 on the link "small",
    else 1500), from the VIP, quoting the packet as it was sent (its IP header,
    options and all, and 8 bytes)."""
    hl = (frame[14] & 0x0f) * 4
    assert frame[12:14] == b"\x08\x00" and frame[14] >> 4 == 4 and hl >= 20 and frame[20] & 0x40, \
        "the frame changed length, and was no IPv4 packet with DF"
    sender = frame[26:30], struct.unpack("!H", frame[34:36])[0]
    backends = set().union(*world.services.values())
    assert frame[30:34] in world.vips or sender in backends, \
        "answered 'fragmentation needed' for a packet neither to a VIP nor from a backend"
    src, mtu = out[26:30], struct.unpack("!H", out[40:42])[0]
    message = struct.pack("!BBHHH", 3, 4, 0, 0, mtu) + frame[14:14 + hl + 8]
    message = put16(message, 2, csum(message))
    expected = ether(ipv4(src, frame[26:30], ICMP, message, ttl=64, ident=0, frag=0, tos=0xc0),
                     ETH_IP, dst=frame[6:12], src=frame[0:6])
    assert (action, out) == (TX, expected) and src in world.vips, \
        "not 'fragmentation needed' from a VIP, quoting the packet as sent"
    assert mtu in (1280, 1500) and len(frame) - 14 > mtu, f"MTU {mtu} for a {len(frame)}-byte frame"
    return "too_big"


# Running -----------------------------------------------------------------------

RAN = Counter()             # outcomes of every frame run in this module
DONE = set()                # the fuzz tests that ran to the end


def run_batch(dp, world, batch, per_packet=False):
    """Runs the frames; checks each, and the reason counters (per frame or for the batch)."""
    before = dp.reason_counters()
    acted = Counter()
    for frame, ifindex, label in batch:
        res = dp.test_run(frame, ifindex)
        try:
            outcome = check(world, frame, ifindex, res.action, res.data)
        except AssertionError as e:
            raise AssertionError(f"{label}: {e}\n in:  {frame.hex()}\n out: {res.data.hex()}"
                                 f"\n action {res.action}") from None
        RAN[outcome] += 1
        RAN[outcome, res.action] += 1
        if priority_tag(frame):
            RAN["priority-tagged", outcome] += 1
        acted[res.action, "packets"] += 1
        acted[res.action, "bytes"] += len(frame)
        if per_packet:
            after = dp.reason_counters()
            assert_counted(before, after, Counter({(res.action, "packets"): 1,
                                                   (res.action, "bytes"): len(frame)}), label)
            before = after
    if not per_packet:
        assert_counted(before, dp.reason_counters(), acted, f"the batch of seed {batch[0][2][0]}")


def assert_counted(before, after, acted: Counter, label):
    """The reasons' counters moved by what the frames did, summed by action."""
    moved = Counter()
    for name, tally in after.items():
        moved[REASON_ACTION[name], "packets"] += tally.packets - before[name].packets
        moved[REASON_ACTION[name], "bytes"] += tally.bytes - before[name].bytes
    moved = {k: n for k, n in moved.items() if n}
    assert moved == dict(acted), f"{label}: reason counters moved {moved}, frames did {dict(acted)}"


FUZZ = settings(derandomize=True, database=None, deadline=None,
                phases=[Phase.explicit, Phase.generate])
BATCH = 25
EXAMPLES = 2100             # x BATCH x 2 tests: 105,000 frames
PACKETS_REQUIRED = 100_000
SEEDS = st.integers(0, 2 ** 64 - 1)


@settings(FUZZ, max_examples=EXAMPLES)
@given(seed=SEEDS)
def test_fuzz_kernel_routes(datapath, world, seed):
    """Rewritten frames are passed to the kernel (xlb up --forwarding kernel)."""
    datapath.set_forwarding(False)
    run_batch(datapath, world, batch(world, seed, BATCH))
    DONE.add("kernel")


@settings(FUZZ, max_examples=EXAMPLES)
@given(seed=SEEDS)
def test_fuzz_fast_path(datapath, world, seed):
    """Rewritten frames go out by bpf_fib_lookup and XDP_TX/REDIRECT where the
    FibNet has a next hop, else to the kernel (xlb up --forwarding fast)."""
    datapath.set_forwarding(True)
    run_batch(datapath, world, batch(world, seed, BATCH))
    DONE.add("fast")


@settings(FUZZ, max_examples=200)
@given(seed=SEEDS)
def test_counters_per_packet(datapath, world, seed):
    datapath.set_forwarding(seed % 2 == 0)
    run_batch(datapath, world, batch(world, seed, 10), per_packet=True)
    DONE.add("per packet")


def test_the_fuzzing_ran_and_reached_every_path():
    """At least 100,000 frames ran, and each of them sometimes did everything
    a frame can make the program do, priority-tagged frames too: a fuzzer
    that only ever reaches `pass` proves nothing."""
    if DONE != {"kernel", "fast", "per packet"}:
        pytest.skip("the fuzz tests of this module did not all run")
    ran = sum(n for key, n in RAN.items() if isinstance(key, str))
    assert ran >= PACKETS_REQUIRED, dict(RAN)
    for outcome, least in (("forward", 10_000), ("reply", 4_000), ("arp_reply", 500),
                           ("echo_reply", 50), ("icmp_error", 150), ("too_big", 20),
                           ("drop", 5_000), ("pass", 30_000), (("forward", TX), 500),
                           (("forward", REDIRECT), 3_000), (("reply", TX), 150),
                           (("reply", REDIRECT), 150),
                           *((("priority-tagged", outcome), least) for outcome, least in (
                               ("forward", 1_000), ("reply", 400), ("arp_reply", 50),
                               ("echo_reply", 5), ("icmp_error", 20), ("too_big", 5),
                               ("drop", 500)))):
        assert RAN[outcome] >= least, dict(RAN)


def test_icmp_error_quoting_a_tcp_checksum_but_not_the_whole_header(datapath, world):
    """Time exceeded from a router on the backends' side to a client, quoting
    the client's packet as the backend got it, cut 19 bytes into its TCP
    header: the quote is rewritten to the VIP, its TCP checksum must follow."""
    datapath.set_forwarding(False)
    # A connection of its own: the fuzzing may have closed or timed out the seeds'.
    s0 = world.seeds[TCP][0]
    s = _open_flow(datapath, world.links, TCP, (s0.client[0], 61001), s0.service)
    (client, cport), (backend, bport) = s.client, s.backend
    seg = tcp(flags=0x18, payload=b"x" * 20).with_ports(cport, bport)
    quote = ipv4(client, backend, TCP, l4_checksummed(client, backend, TCP, seg, 16))[:20 + 19]
    body = struct.pack("!BBHHH", 11, 0, 0, 0, 0) + quote
    frame = ether(ipv4(IPv4Address("10.1.11.1").packed, client, ICMP, put16(body, 2, csum(body))))
    res = datapath.test_run(frame, world.links["int"])
    inner = 14 + 20 + 8
    assert res.data[inner + 16:inner + 20] in world.vips        # rewritten to a VIP
    assert quoted_sum(res.data, inner) == quoted_sum(frame, inner)


def test_icmp_error_with_bytes_past_its_total_length(datapath, world):
    """Port unreachable from a backend's side to a client, quoting the UDP
    packet as the backend got it; the IP total length ends after the quoted
    ports, the frame holds the rest of the UDP header as trailing bytes."""
    datapath.set_forwarding(False)
    s0 = world.seeds[UDP][0]
    s = _open_flow(datapath, world.links, UDP, (s0.client[0], 61002), s0.service)
    (client, cport), (backend, bport) = s.client, s.backend
    seg = udp(b"hello").with_ports(cport, bport)
    quote = ipv4(client, backend, UDP, l4_checksummed(client, backend, UDP, seg, 6))[:28]
    body = struct.pack("!BBHHH", 3, 3, 0, 0, 0) + quote[:24]
    body = put16(body, 2, csum(body))
    frame = ether(ipv4(IPv4Address("10.1.11.1").packed, client, ICMP, body)) + quote[24:]
    res = datapath.test_run(frame, world.links["int"])
    icmp = slice(14 + 20, 14 + 20 + len(body))
    assert res.data[14 + 20 + 8 + 16:14 + 20 + 8 + 20] in world.vips    # rewritten to a VIP
    assert res.data[icmp.stop:] == frame[icmp.stop:]
    assert residual(res.data[icmp]) == residual(frame[icmp]) == 0


def test_builders_agree_with_scapy():
    """The struct builders above make what scapy makes, checksums included."""
    from scapy.layers.inet import ICMP as SICMP, IP, TCP as STCP, UDP as SUDP
    from scapy.layers.l2 import ARP, Ether
    from scapy.packet import Raw, raw

    src, dst = IPv4Address("10.1.1.10"), VIP
    eth = Ether(dst=LB_MAC, src=CLIENT_MAC)
    ip = IP(src=str(src), dst=str(dst), id=0x1234, flags="DF", ttl=64)
    syn = tcp(flags=0x0c2, seq=7, ack=9, options=b"\x02\x04\x05\xb4\x01\x03\x03\x07",
              payload=b"abc")
    assert frame_ip(src.packed, 40000, dst.packed, 80, TCP, syn) == raw(
        eth / ip / STCP(sport=40000, dport=80, flags="SEC", seq=7, ack=9, window=64240,
                        options=[("MSS", 1460), ("NOP", None), ("WScale", 7)]) / Raw(b"abc"))
    assert frame_ip(src.packed, 5, dst.packed, 53, UDP, udp(b"hello")) == raw(
        eth / ip / SUDP(sport=5, dport=53) / Raw(b"hello"))
    echo = struct.pack("!BBHHH", 8, 0, 0, 1, 2) + b"ping"
    assert ether(ipv4(src.packed, dst.packed, ICMP, put16(echo, 2, csum(echo)),
                      options=b"\x94\x04\x00\x00")) == raw(
        eth / IP(src=str(src), dst=str(dst), id=0x1234, flags="DF", ttl=64,
                 options=b"\x94\x04\x00\x00") / SICMP(type=8, id=1, seq=2) / Raw(b"ping"))
    assert ether(arp(), ETH_ARP) == raw(
        Ether(dst=LB_MAC, src=CLIENT_MAC) / ARP(op=1, hwsrc=CLIENT_MAC, psrc="10.1.1.10",
                                                 hwdst="00:00:00:00:00:00", pdst=str(VIP)))
    bad = ether(ipv4(src.packed, dst.packed, UDP, udp(b"x").data, csum_error=1))
    assert residual(bad[14:34]) == 1
