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
3. `xlb apply` of a config with 10,000 servers in 100 pools (100 frontends) to
   a running instance: validation and apply time (target: under 1 s), then a
   one-weight change of the same config, and the BPF maps' memory.
4. A Prometheus scrape of /metrics with those 10,000 servers configured
   (target: under 200 ms), against a scrape with the seed's 2 servers.

Every load is bounded in time and stops by itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from ipaddress import IPv4Address
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from labctl import HERE, SEED_ARGS, VIP, WAS, Lab  # noqa: E402

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


def big_config(pools: int = 100, per_pool: int = 100, heavy: int = 1) -> str:
    out = []
    for p in range(pools):
        names = [f"s{p}-{i}" for i in range(per_pool)]
        for i, name in enumerate(names):
            weight = heavy if (p, i) == (0, 0) else 1
            out.append(f'[servers.{name}]\naddress = "10.2.{p}.{i + 1}"\nport = 8080\n'
                       f"weight = {weight}\n")
        out.append(f'[pools.p{p}]\nservers = {json.dumps(names)}\nalgorithm = "weighted"\n')
        out.append(f'[frontends.f{p}]\nvip = "10.3.{p}.1"\nport = 80\npool = "p{p}"\n')
    return "\n".join(out)


def timed_apply(lab: Lab, path: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = lab.xlb_cmd("apply", str(path), check=True, timeout=120).stdout.strip()
    return time.perf_counter() - t0, out


def scrape_seconds(lab: Lab, runs: int = 5) -> tuple[float, int]:
    """Median time of a whole /metrics scrape (curl in lb), and the series it returned."""
    times, lines = [], 0
    for _ in range(runs):
        out = lab.run("lb", "curl", "-s", "-o", "/dev/null", "-w", "%{time_total} %{size_download}",
                      "http://127.0.0.1:9717/metrics", check=True).stdout.split()
        times.append(float(out[0]))
    body = lab.run("lb", "curl", "-s", "http://127.0.0.1:9717/metrics", check=True).stdout
    lines = sum(1 for line in body.splitlines() if line and not line.startswith("#"))
    return statistics.median(times), lines


def bench_lab() -> None:
    lab = Lab("xlbb")
    lab.down()
    tmp = Path(tempfile.mkdtemp(prefix="xlb-bench-"))
    try:
        lab.up()
        with lab.xlb(*SEED_ARGS):
            direct = wrk(lab, f"http://{WAS['WAS1']}:8080/")
            vip = wrk(lab, f"http://{VIP}/")
        seed = tmp / "xlb.toml"
        shutil.copy(HERE / "seed.toml", seed)
        with lab.xlb("--config", str(seed)):
            before = lab.status()["map_memory_bytes"]
            scrape_small = scrape_seconds(lab)
            (tmp / "big.toml").write_text(big_config())
            (tmp / "big2.toml").write_text(big_config(heavy=3))
            t_big, out_big = timed_apply(lab, tmp / "big.toml")
            t_change, out_change = timed_apply(lab, tmp / "big2.toml")
            status = lab.status()
            scrape_big = scrape_seconds(lab)
    finally:
        lab.down()
        shutil.rmtree(tmp)
    print(f"HTTP through the lab, wrk -t2 -c32 -d{WRK_SECONDS}s (keep-alive), requests/s:")
    print(f"  {'directly to WAS1 (routed by lb)':<34} {direct:9.0f}   1.00x")
    print(f"  {'through the VIP (XDP, 2 backends)':<34} {vip:9.0f}  {vip / direct:5.2f}x")
    print()
    servers = sum(len(p["servers"]) for p in status["pools"])
    print(f"xlb apply, 100 frontends, 100 pools, {servers} servers (target: under 1 s):")
    for name, t, out in (("first apply (from the seed)", t_big, out_big),
                         ("one weight changed", t_change, out_change)):
        inside = float(re.search(r" in ([\d.]+)s:", out).group(1))
        print(f"  {name:<30} {inside:6.3f} s validate+apply in xlb, "
              f"{t:6.3f} s for the whole `xlb apply` command")
    after = status["map_memory_bytes"]
    print(f"  BPF maps: {before / 2**20:.1f} MiB with the seed, {after / 2**20:.1f} MiB with "
          f"{servers} servers (preallocated: sized by the limits, not the config)")
    print()
    print("Prometheus scrape of /metrics, median of 5 (target: under 200 ms with 10,000 servers):")
    print(f"  {'seed, 2 servers':<30} {scrape_small[0] * 1000:7.1f} ms  {scrape_small[1]:6d} series")
    print(f"  {f'{servers} servers':<30} {scrape_big[0] * 1000:7.1f} ms  {scrape_big[1]:6d} series"
          f"  {scrape_big[0] / scrape_small[0]:6.1f}x")


if __name__ == "__main__":
    bench_test_run()
    print()
    bench_lab()
