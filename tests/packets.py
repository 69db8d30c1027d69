"""Shared helpers for the data-plane tests: frames built with scapy, checksum
checks that do not rely on scapy, and a harness that runs a frame through the
loaded program and reports exactly which counters it moved."""

from __future__ import annotations

import struct
from collections import Counter
from ipaddress import IPv4Address

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw, raw

from flood import ones_sum      # netns-lab, on sys.path (conftest)
from xlb import layout

XDP_DROP = layout.XDP_ACTIONS["XDP_DROP"]
XDP_PASS = layout.XDP_ACTIONS["XDP_PASS"]
XDP_TX = layout.XDP_ACTIONS["XDP_TX"]

CLIENT_MAC = "02:00:00:00:00:0a"
LB_MAC = "02:00:00:00:00:01"
BACKEND_MAC = "02:00:00:00:00:b1"
VIP_MAC = "02:00:00:00:00:99"  # what the program answers ARP with

SYN_OPTIONS = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (12345, 0)), ("NOP", None),
               ("WScale", 7)]


# Frames ----------------------------------------------------------------------

def tcp_frame(src, dst, sport, dport, *, flags="S", seq=1000, ack=0, options=(), payload=b"",
              ip_flags="DF", ip_options=None, eth_src=CLIENT_MAC, eth_dst=LB_MAC,
              **ip_fields) -> bytes:
    """An Ethernet/IPv4/TCP frame; every field not given is fixed, so two calls
    that differ only in addresses and ports differ only there (and in checksums).
    ip_fields override other IPv4 header fields (len, ihl, frag, version, ...)."""
    ip = IP(src=str(src), dst=str(dst), **{"id": 0x1234, "ttl": 64, "flags": ip_flags, "tos": 0x10,
                                           **ip_fields})
    if ip_options is not None:
        ip.options = ip_options
    pkt = (Ether(src=eth_src, dst=eth_dst) / ip
           / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, window=64240,
                 options=list(options)))
    if payload:
        pkt = pkt / Raw(payload)
    return raw(pkt)


def udp_frame(src, dst, sport, dport, *, payload=b"hello", chksum=None,
              eth_src=CLIENT_MAC, eth_dst=LB_MAC) -> bytes:
    """An Ethernet/IPv4/UDP frame; chksum None: computed by scapy, else that value."""
    udp = UDP(sport=sport, dport=dport)
    if chksum is not None:
        udp.chksum = chksum
    return raw(Ether(src=eth_src, dst=eth_dst)
               / IP(src=str(src), dst=str(dst), id=0x4321, ttl=61, flags="DF") / udp / Raw(payload))


def priority_tagged(frame: bytes, prio: int = 5, vid: int = 0, tpid: int = 0x8100) -> bytes:
    """The Ethernet frame with a tag after its MACs: by default a priority tag
    (802.1p: 802.1Q's TPID, VLAN ID 0, priority `prio`), as a host or switch
    that priority-tags adds it to the link's untagged frames."""
    return frame[:12] + struct.pack("!HH", tpid, prio << 13 | vid) + frame[12:]


def untagged(frame: bytes) -> bytes:
    """The frame of `priority_tagged` without its tag."""
    assert frame[12:14] == b"\x81\x00", "no 802.1Q tag"
    return frame[:12] + frame[16:]


# Checksums, computed here and not by scapy ----------------------------------

def ip_header(frame: bytes) -> bytes:
    ihl = (frame[14] & 0x0f) * 4
    return frame[14:14 + ihl]


def l4_segment(frame: bytes) -> bytes:
    """The TCP or UDP segment: the IP payload as far as the IP total length says."""
    ihl = (frame[14] & 0x0f) * 4
    tot_len = struct.unpack("!H", frame[16:18])[0]
    return frame[14 + ihl:14 + tot_len]


def pseudo_header(frame: bytes) -> bytes:
    hdr = ip_header(frame)
    return hdr[12:20] + bytes([0, hdr[9]]) + struct.pack("!H", len(l4_segment(frame)))


def ip_checksum_ok(frame: bytes) -> bool:
    return ones_sum(ip_header(frame)) == 0xffff


def l4_checksum_ok(frame: bytes) -> bool:
    return ones_sum(pseudo_header(frame) + l4_segment(frame)) == 0xffff


def scapy_recomputed(frame: bytes) -> bytes:
    """The frame with scapy recomputing the IP and L4 checksums from scratch."""
    pkt = Ether(frame)
    del pkt[IP].chksum
    l4 = pkt[TCP] if TCP in pkt else pkt[UDP]
    del l4.chksum
    return raw(pkt)


def assert_checksums(frame: bytes) -> None:
    """IP and TCP/UDP checksums verify, by our own sums and by scapy's rebuild."""
    assert ip_checksum_ok(frame), "IP header checksum does not verify"
    assert l4_checksum_ok(frame), "L4 checksum does not verify"
    assert scapy_recomputed(frame) == frame, "scapy computes other checksums"


def word_for_zero_checksum(frame_without_word: bytes) -> bytes:
    """Two payload bytes that, appended to the TCP or UDP payload of the frame
    (whose lengths must already count them, as zeros), make the correct L4
    checksum 0: the sum over pseudo-header and segment becomes 0xffff."""
    pkt = Ether(frame_without_word)
    (pkt[TCP] if TCP in pkt else pkt[UDP]).chksum = 0
    frame = raw(pkt)
    assert len(l4_segment(frame)) % 2 == 0, "the last two bytes must be a 16-bit word"
    partial = ones_sum(pseudo_header(frame) + l4_segment(frame))
    return struct.pack("!H", 0xffff - partial)


def ip_id_for_zero_checksum(frame: bytes) -> int:
    """The IP id that makes the correct IP header checksum of the frame 0."""
    pkt = Ether(frame)
    pkt[IP].id = 0
    pkt[IP].chksum = 0
    return 0xffff - ones_sum(ip_header(raw(pkt)))


# Running frames and counting ----------------------------------------------------

def _counter_fields(ctype_value, prefix: str) -> dict[str, int]:
    return {f"{prefix}.{name}": getattr(ctype_value, name) for name, _ in ctype_value._fields_}


class Harness:
    """Runs frames through a Datapath and checks the counters each one moves.

    `send` runs one frame and keeps the change of every counter of interest
    (all reasons, and the services and backends given); `expect` then compares
    that change with what the frame should have counted, exactly.
    """

    def __init__(self, dp, service_ids=(), backend_ids=()):
        self.dp = dp
        self.service_ids = tuple(service_ids)
        self.backend_ids = tuple(backend_ids)
        self.last_len = None
        self.last_delta: Counter = Counter()

    def snapshot(self) -> Counter:
        values: dict[str, int] = {}
        for name, tally in self.dp.reason_counters().items():
            values[f"reason.{name}.packets"] = tally.packets
            values[f"reason.{name}.bytes"] = tally.bytes
        for sid in self.service_ids:
            values.update(_counter_fields(self.dp.service_counters(sid), f"service{sid}"))
        for bid in self.backend_ids:
            values.update(_counter_fields(self.dp.backend_counters(bid), f"backend{bid}"))
        return Counter(values)

    def send(self, frame: bytes, ifindex: int = 0):
        before = self.snapshot()
        self.last_len = len(frame)
        try:
            return self.dp.test_run(frame, ingress_ifindex=ifindex)
        finally:
            after = self.snapshot()
            self.last_delta = Counter({k: after[k] - before[k] for k in after
                                       if after[k] != before[k]})

    @staticmethod
    def counts(reason: str, length: int, flow=None) -> Counter:
        """What one frame of `length` bytes ending in `reason` counts; flow is
        (direction "in" or "out", service id, backend id, new flow?) for balanced ones."""
        assert reason in layout.REASON_NAMES, reason
        expected = Counter({f"reason.{reason}.packets": 1, f"reason.{reason}.bytes": length})
        if flow is not None:
            direction, sid, bid, new = flow
            for who in (f"service{sid}", f"backend{bid}"):
                expected[f"{who}.packets_{direction}"] += 1
                expected[f"{who}.bytes_{direction}"] += length
                if new:
                    expected[f"{who}.new_flows"] += 1
        return expected

    def expect(self, reason: str, flow=None) -> Counter:
        """Asserts the last frame counted exactly this; returns what it counted."""
        expected = self.counts(reason, self.last_len, flow)
        assert dict(self.last_delta) == dict(expected), \
            f"counters moved {dict(self.last_delta)}, expected {dict(expected)}"
        return expected


def ip_of(frame: bytes, which: str) -> IPv4Address:
    """The source ("src") or destination ("dst") address of an IPv4 frame."""
    off = 14 + (12 if which == "src" else 16)
    return IPv4Address(frame[off:off + 4])
