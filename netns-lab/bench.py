#!/usr/bin/env python3
"""`make bench`: figures measured side by side in one run, printed as ratios.

1. The XDP program alone (BPF_PROG_TEST_RUN, no network), ns per packet for:
   a new flow to the VIP, a packet of an established flow, a backend's reply,
   and non-VIP traffic, against an empty XDP_PASS program loaded beside it.
   Each packet is one test-run of a fresh copy: with repeat > 1 the kernel
   reuses one buffer, and after a rewrite the later runs would measure another
   path. The kernel's own per-run duration is used, so syscall cost is excluded.
2. The lab: HTTP requests/s with wrk through the VIP and directly to WAS1 (the
   client reaches WAS1 routed through the balancer's kernel), same duration,
   same connections. The Python web servers bound this figure, not xlb.

Every load is bounded in time and stops by itself.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
from ipaddress import IPv4Address
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from labctl import SEED_ARGS, VIP, WAS, Lab  # noqa: E402

RUNS = 20000
WRK_SECONDS = 5


def ns_per_packet(run, frames) -> float:
    return statistics.median(run(f).duration_ns for f in frames)


def bench_test_run() -> None:
    from bcc import BPF
    from scapy.all import IP, TCP, Ether, raw

    from xlb import bpfsys
    from xlb.datapath import Datapath

    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    dp = Datapath()
    empty = BPF(text="int xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }")
    empty_fd = empty.load_func("xdp_pass", BPF.XDP).fd
    vip, was1 = IPv4Address(VIP), IPv4Address(WAS["WAS1"])
    dp.set_backend(0, was1, 8080)
    dp.set_backend(1, IPv4Address(WAS["WAS2"]), 8080)
    dp.write_ring(0, [0, 1])
    dp.set_vip(vip)
    dp.set_service(vip, 80, 6, 0, 0, 2)

    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")

    def syn(port, dst=VIP, dport=80):
        return raw(eth / IP(src="10.1.1.10", dst=dst) / TCP(sport=port, dport=dport, flags="S"))

    new_flows = [syn(1024 + i) for i in range(RUNS)]
    run = dp.test_run
    t_new = ns_per_packet(run, new_flows)
    # The same connections again: every packet now hits its flow entry.
    t_est = ns_per_packet(run, new_flows)
    replies = []
    for f in new_flows[:RUNS // 4]:
        out = IP(run(f).data[14:])
        replies.append(raw(eth / IP(src=out.dst, dst="10.1.1.10") /
                           TCP(sport=8080, dport=out[TCP].sport, flags="SA")))
    t_reply = ns_per_packet(run, replies)
    other = syn(40000, dst="10.1.1.50")
    t_other = ns_per_packet(run, [other] * RUNS)
    t_empty = ns_per_packet(lambda f: bpfsys.prog_test_run(empty_fd, f), [other] * RUNS)
    dp.close()
    empty.cleanup()

    print(f"XDP program, median ns/packet over {RUNS} test-runs (one CPU):")
    print(f"  {'empty XDP_PASS program':<34} {t_empty:7.0f} ns   1.00x")
    for name, t in (("non-VIP packet (passed)", t_other), ("new flow (pick, 2 inserts, DNAT)", t_new),
                    ("established flow (DNAT)", t_est), ("backend reply (reverse NAT)", t_reply)):
        print(f"  {name:<34} {t:7.0f} ns  {t / t_empty:5.2f}x")


def wrk(lab: Lab, url: str) -> float:
    out = lab.run("client", "wrk", "-t2", "-c32", f"-d{WRK_SECONDS}s", url,
                  timeout=WRK_SECONDS + 30, check=True).stdout
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def bench_lab() -> None:
    lab = Lab("xlbb")
    lab.down()
    try:
        lab.up()
        with lab.xlb(*SEED_ARGS):
            direct = wrk(lab, f"http://{WAS['WAS1']}:8080/")
            vip = wrk(lab, f"http://{VIP}/")
    finally:
        lab.down()
    print(f"HTTP through the lab, wrk -t2 -c32 -d{WRK_SECONDS}s (keep-alive), requests/s:")
    print(f"  {'directly to WAS1 (routed by lb)':<34} {direct:9.0f}   1.00x")
    print(f"  {'through the VIP (XDP, 2 backends)':<34} {vip:9.0f}  {vip / direct:5.2f}x")


if __name__ == "__main__":
    bench_test_run()
    print()
    bench_lab()
