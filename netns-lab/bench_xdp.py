"""The XDP program's cost per packet under BPF_PROG_TEST_RUN, side by side in
one run: an empty program, the build from before the fast path (compiled from
git history), and this build with kernel and with fast forwarding.

Runs in a FibNet (netns-lab/fibnet.py), so the fast path resolves real next
hops. Each packet is one test-run of a fresh frame (with repeat > 1 the kernel
reuses one buffer, which a rewrite changes), each of another connection;
the programs take turns in blocks; the figure is the median.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
from ipaddress import IPv4Address
from pathlib import Path

from fibnet import FibNet

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "8aea04d"        # the last build whose fast path was the kernel's (XDP_PASS)
RUNS = 10000
BLOCK = 250                 # packets a program runs before the next one takes its turn
EMPTY = "empty program"
CLIENT, VIP, OTHER = "10.1.1.10", "10.1.1.101", "10.1.1.50"
BACKENDS = ("10.1.11.101", "10.1.11.102")
CLIENT_MAC, LB_MAC, BACKEND_MAC = "02:00:00:00:00:0a", "02:00:00:00:00:01", "02:00:00:00:00:b1"


def frame(src, dst, sport, dport, flags, payload=b"", eth_src=CLIENT_MAC):
    from scapy.all import IP, TCP, Ether, Raw, raw
    pkt = Ether(src=eth_src, dst=LB_MAC) / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport,
                                                                     flags=flags)
    return raw(pkt / Raw(payload)) if payload else raw(pkt)


def costs(runs: dict, ext: int, intf: int) -> dict[str, dict[str, float]]:
    """Median ns, per program, of: a new flow (SYN), an established one (data
    after the handshake), a backend's reply, and a packet for no VIP. The
    programs take turns in blocks of BLOCK packets (the order reversed every
    other block), so that a change in the machine's load falls on all alike."""
    ports = range(20000, 20000 + RUNS)
    out: dict[str, dict[str, float]] = {name: {} for name in runs}

    def measure(column, frames, ifindex):
        times = {name: [] for name in frames}
        order = list(frames)
        for start in range(0, RUNS, BLOCK):
            for name in order:
                run = runs[name]
                times[name] += [run(f, ifindex).duration_ns for f in frames[name][start:start + BLOCK]]
            order.reverse()
        for name, t in times.items():
            out[name][column] = statistics.median(t)

    balancers = [name for name in runs if name != EMPTY]
    measure("syn", {n: [frame(CLIENT, VIP, p, 80, "S") for p in ports] for n in balancers}, ext)
    backends = {n: [str(IPv4Address(runs[n](frame(CLIENT, VIP, p, 80, "A"), ext).data[30:34]))
                    for p in ports] for n in balancers}
    for n in balancers:
        for p, be in zip(ports, backends[n]):
            runs[n](frame(be, CLIENT, 8080, p, "SA", eth_src=BACKEND_MAC), intf)
            runs[n](frame(CLIENT, VIP, p, 80, "A"), ext)
    measure("established", {n: [frame(CLIENT, VIP, p, 80, "PA", b"x" * 64) for p in ports]
                            for n in balancers}, ext)
    measure("reply", {n: [frame(be, CLIENT, 8080, p, "PA", b"y" * 64, BACKEND_MAC)
                          for p, be in zip(ports, backends[n])] for n in balancers}, intf)
    measure("non-VIP", {n: [frame(CLIENT, OTHER, 40000, 80, "S")] * RUNS for n in runs}, ext)
    return out


def baseline_program(directory: Path):
    """The C of BASELINE, loaded with bcc and filled through its own tables, or
    None where git history is not at hand."""
    from bcc import BPF
    from xlb.datapath import Limits
    from xlb.datapath import _be16, _be32

    listing = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", BASELINE, "bpf/"],
                             capture_output=True, text=True)
    if listing.returncode != 0:
        return None
    for name in listing.stdout.split():
        (directory / Path(name).name).write_bytes(subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{BASELINE}:{name}"], capture_output=True,
            check=True).stdout)
    bpf = BPF(src_file=str(directory / "xlb.c").encode(),
              cflags=[f"-I{directory}", "-w", *Limits().cflags()])
    fn = bpf.load_func(b"xlb_xdp", BPF.XDP)
    backends, rings, services, vips = (bpf[n] for n in (b"backends", b"rings", b"services",
                                                        b"vips"))
    for i, addr in enumerate(BACKENDS):
        backends[backends.Key(i)] = backends.Leaf(_be32(IPv4Address(addr)), _be16(8080), 0)
        rings[rings.Key(i)] = rings.Leaf(i)
    services[services.Key(_be32(IPv4Address(VIP)), _be16(80), 6, 0)] = services.Leaf(0, 0, 2, 0)
    vips[vips.Key(_be32(IPv4Address(VIP)))] = vips.Leaf(1)
    return bpf, fn.fd


def bench() -> dict[str, float]:
    """Prints the table; returns the ratios issue 9 sets targets on."""
    from bcc import BPF
    from xlb import bpfsys
    from xlb.datapath import Datapath

    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    neighbours = {CLIENT: (CLIENT_MAC, "ext"), **{b: (BACKEND_MAC, "int") for b in BACKENDS}}
    runs, keep = {}, []
    with FibNet(f"xlbx-bench-{os.getpid()}").entered(neighbours) as net, \
            tempfile.TemporaryDirectory() as tmp:
        ext, intf = net.ifindex["ext"], net.ifindex["int"]
        empty = BPF(text="int xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }")
        empty_fd = empty.load_func("xdp_pass", BPF.XDP).fd
        runs[EMPTY] = lambda f, i: bpfsys.prog_test_run(empty_fd, f, i)
        old = baseline_program(Path(tmp))
        if old is not None:
            runs[f"before the fast path ({BASELINE})"] = \
                lambda f, i, fd=old[1]: bpfsys.prog_test_run(fd, f, i)
        for mode in ("kernel", "fast"):
            dp = Datapath()
            for i, addr in enumerate(BACKENDS):
                dp.set_backend(i, IPv4Address(addr), 8080)
            dp.write_ring(0, [0, 1])
            dp.set_vip(IPv4Address(VIP))
            dp.set_service(IPv4Address(VIP), 80, 6, 0, 0, 2)
            dp.set_timeouts(0, 60, 900, 120, 300)
            dp.set_forwarding(mode == "fast")
            keep.append(dp)
            runs[f"this build, {mode} forwarding"] = dp.test_run
        try:
            rows = costs(runs, ext, intf)
        finally:
            for dp in keep:
                dp.close()
            if old is not None:
                old[0].cleanup()
            empty.cleanup()

    empty_ns = rows[EMPTY]["non-VIP"]
    cols = ("syn", "established", "reply", "non-VIP")
    print(f"XDP program, median ns/packet over {RUNS} test-runs, the programs taking turns every "
          f"{BLOCK} (one CPU; ratio to the empty program's {empty_ns:.0f} ns):")
    print(f"  {'':<36}" + "".join(f"{c:>17}" for c in cols))
    for name, r in rows.items():
        print(f"  {name:<36}" + "".join(
            f"{r[c]:8.0f} ns {r[c] / empty_ns:5.2f}x" if c in r else f"{'':>17}" for c in cols))
    fast = rows["this build, fast forwarding"]
    ratios = {"non-vip/empty": fast["non-VIP"] / empty_ns}
    base = rows.get(f"before the fast path ({BASELINE})")
    if base is not None:
        ratios["syn/before"] = fast["syn"] / base["syn"]
        ratios["established/before"] = fast["established"] / base["established"]
    return ratios
