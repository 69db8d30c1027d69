"""The XDP program's cost per packet under BPF_PROG_TEST_RUN, side by side in
one run: an empty program, two that do no more than one thing every balancer
must with a packet (read its headers, count it: the floor under a non-VIP
packet's figure), the build from before the fast path (compiled from git
history), and this build with kernel and with fast forwarding.

Runs in a FibNet (netns-lab/fibnet.py), so the fast path resolves real next
hops. Each packet is one test-run of a fresh frame (with repeat > 1 the kernel
reuses one buffer, which a rewrite changes), each of another connection, in
a shuffled order (see `visit_order`);
the programs take turns in blocks (see `turns`); the figure is the mean of the middle half
(see `middle_mean`). Each program is attached to a veth of its own, as one at
work is (see `dispatched`), after an unmeasured stand-in of this build took
the place of the first balancer loaded, which runs slower (see `bench`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import statistics
import subprocess
import tempfile
from ipaddress import IPv4Address
from pathlib import Path

from fibnet import FibNet
from xlb.bpfsys import prog_test_run as run

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "8aea04d"        # the last build whose fast path was the kernel's (XDP_PASS)
RUNS = 10000
BLOCK = 250                 # packets a program runs before the next one takes its turn
WARM_CALLS, WARM_REPEAT, WARM_PORT = 300, 200, 30000   # 200 repeats: a TTL of 255 stays above 1
EMPTY = "empty program"
# The floor under the non-VIP target: what a packet costs a program that does
# only one of the things any balancer must do with it.
READS, COUNTS = "reads Ethernet+IPv4, no more", "counts it, no more"
REFERENCES = {
    EMPTY: "int xdp_ref(struct xdp_md *ctx) { return XDP_PASS; }",
    # The addresses read, as any test of them must.
    READS: """
int xdp_ref(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);

	if ((void *)(ip + 1) > end || eth->h_proto != htons(ETH_P_IP))
		return XDP_PASS;
	return ip->saddr == ip->daddr ? XDP_DROP : XDP_PASS;
}""",
    # One per-CPU counter of packets and bytes, as xlb keeps per reason.
    COUNTS: """
struct tally { u64 packets, bytes; };
BPF_PERCPU_ARRAY(tally, struct tally, 1);

int xdp_ref(struct xdp_md *ctx)
{
	int zero = 0;
	struct tally *t = tally.lookup(&zero);

	if (t) {
		t->packets += 1;
		t->bytes += ctx->data_end - ctx->data;
	}
	return XDP_PASS;
}""",
}
CLIENT, VIP, OTHER = "10.1.1.10", "10.1.1.101", "10.1.1.50"
BACKENDS = ("10.1.11.101", "10.1.11.102")
WARM_VIP = "10.1.1.102"
# What every measured program serves, on port 80: the VIP over the backends, and,
# for `warm_costs`, a second VIP whose one backend is itself.
SERVICES = ((VIP, tuple((b, 8080) for b in BACKENDS)), (WARM_VIP, ((WARM_VIP, 80),)))
CLIENT_MAC, LB_MAC, BACKEND_MAC = "02:00:00:00:00:0a", "02:00:00:00:00:01", "02:00:00:00:00:b1"


def frame(src, dst, sport, dport, flags, payload=b"", eth_src=CLIENT_MAC, ttl=64):
    from scapy.all import IP, TCP, Ether, Raw, raw
    pkt = Ether(src=eth_src, dst=LB_MAC) / IP(src=src, dst=dst, ttl=ttl) / TCP(
        sport=sport, dport=dport, flags=flags)
    return raw(pkt / Raw(payload)) if payload else raw(pkt)


def middle_mean(times: list[int]) -> float:
    """The mean of the middle half: as robust to interrupts as the median, but
    finer than the clock, whose steps of about 10 ns the median keeps (a test-
    run of one packet reads the clock twice)."""
    times = sorted(times)
    quarter = len(times) // 4
    return statistics.fmean(times[quarter:len(times) - quarter])


def turns(names: list[str], runs: int = RUNS, block: int = BLOCK) -> list[tuple[str, int]]:
    """(program, first packet) of each block, in the order they run: every
    program a block of packets in turn, so that a change in the machine's load
    falls on all alike, the order turned by one each time. So each program
    takes every place in the order as often; reversed instead, the programs at
    its ends would run two blocks in a row, the second with warm caches, and
    the one between never."""
    order, out = list(names), []
    for start in range(0, runs, block):
        out += [(name, start) for name in order]
        order = order[1:] + order[:1]
    return out


def visit_order(ports: range) -> list[int]:
    """The connections (by client port) in the order their established and
    reply packets come: shuffled, the same for every program and run. In the
    order they were opened, a program meets its flow entries in the order
    they lie in memory, and its figure hung on their size and on the run
    (README, Benchmarks); traffic meets its connections in no such order."""
    order = list(ports)
    random.Random(0).shuffle(order)
    return order


def costs(progs: dict[str, int], ext: int, intf: int) -> dict[str, dict[str, float]]:
    """ns (see `middle_mean`), per program, of: a new flow (SYN), an
    established one (data after the handshake), a backend's reply (both in
    `visit_order`), and a packet for no VIP, the programs taking turns (see
    `turns`)."""
    ports = range(20000, 20000 + RUNS)
    out: dict[str, dict[str, float]] = {name: {} for name in progs}

    def measure(column, frames, ifindex):
        times = {name: [] for name in frames}
        for name, start in turns(list(frames)):
            times[name] += [run(progs[name], f, ifindex).duration_ns
                            for f in frames[name][start:start + BLOCK]]
        for name, t in times.items():
            out[name][column] = middle_mean(t)

    balancers = [name for name in progs if name not in REFERENCES]
    measure("syn", {n: [frame(CLIENT, VIP, p, 80, "S") for p in ports] for n in balancers}, ext)
    backends = {n: {p: str(IPv4Address(run(progs[n], frame(CLIENT, VIP, p, 80, "A"), ext).data[30:34]))
                    for p in ports} for n in balancers}
    for n in balancers:
        for p, be in backends[n].items():
            run(progs[n], frame(be, CLIENT, 8080, p, "SA", eth_src=BACKEND_MAC), intf)
            run(progs[n], frame(CLIENT, VIP, p, 80, "A"), ext)
    visits = visit_order(ports)
    measure("established", {n: [frame(CLIENT, VIP, p, 80, "PA", b"x" * 64) for p in visits]
                            for n in balancers}, ext)
    measure("reply", {n: [frame(backends[n][p], CLIENT, 8080, p, "PA", b"y" * 64, BACKEND_MAC)
                          for p in visits] for n in balancers}, intf)
    measure("non-VIP", {n: [frame(CLIENT, OTHER, 40000, 80, "S")] * RUNS for n in progs}, ext)
    return out


def service_layout() -> list[tuple[int, int, str, list[tuple[int, str, int]]]]:
    """(service id, ring, VIP, [(backend id, address, port)]) for each of
    SERVICES: the ring twice the id (two a service), the backend ids counted
    across them."""
    ids = itertools.count()
    return [(sid, 2 * sid, vip, [(next(ids), addr, port) for addr, port in backends])
            for sid, (vip, backends) in enumerate(SERVICES)]


def baseline_program(directory: Path):
    """The C of BASELINE, loaded with bcc and filled through its own tables
    (SERVICES), or None where git history is not at hand."""
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
    table, rings, services, vips = (bpf[n] for n in (b"backends", b"rings", b"services",
                                                     b"vips"))
    ring_size = Limits().ring_size
    for sid, ring, vip, backends in service_layout():
        for slot, (bid, addr, port) in enumerate(backends):
            table[table.Key(bid)] = table.Leaf(_be32(IPv4Address(addr)), _be16(port), 0)
            rings[rings.Key(ring * ring_size + slot)] = rings.Leaf(bid)
        services[services.Key(_be32(IPv4Address(vip)), _be16(80), 6, 0)] = services.Leaf(
            sid, ring, len(backends), 0)
        vips[vips.Key(_be32(IPv4Address(vip)))] = vips.Leaf(1)
    return bpf, fn.fd


def this_build(fast: bool, keep: list, net: FibNet) -> int:
    """This build serving SERVICES, sending out of net's links: its program fd.
    Its cleanup goes into keep."""
    from xlb.datapath import Datapath

    dp = Datapath()
    keep.append(dp.close)
    for sid, ring, vip, backends in service_layout():
        for bid, addr, port in backends:
            dp.set_backend(bid, IPv4Address(addr), port)
        dp.write_ring(ring, [bid for bid, _, _ in backends])
        dp.set_vip(IPv4Address(vip))
        dp.set_service(IPv4Address(vip), 80, 6, sid, ring, len(backends))
        dp.set_timeouts(sid, 60, 900, 120, 300)
    dp.set_forwarding(fast)
    net.as_native(dp)
    return dp.prog_fd


def programs(tmp: Path, keep: list, net: FibNet) -> dict[str, int]:
    """The build before the fast path and this one with kernel and with fast
    forwarding (out of net's links), each serving SERVICES: name -> program fd.
    Their cleanups go into keep."""
    progs = {}
    old = baseline_program(tmp)
    if old is not None:
        keep.append(old[0].cleanup)
        progs[f"before the fast path ({BASELINE})"] = old[1]
    for mode in ("kernel", "fast"):
        progs[f"this build, {mode} forwarding"] = this_build(mode == "fast", keep, net)
    return progs


def dispatched(net: FibNet, fds: list[int]) -> None:
    """Attaches each program to a veth of its own in net, natively, so that the
    kernel's XDP dispatcher holds it, as it does a program at work. A test-run
    of a program it does not hold patches the dispatcher's code and waits for
    an RCU grace period first: the CPU idles, and the run then finds its caches
    as the wait left them, more so the more memory a program touches."""
    from xlb import netif

    for n, fd in enumerate(fds):
        netif.xdp_set(net.add_veth(f"bench{n}"), fd, "native")


def warm_costs(progs: dict[str, int], ext: int) -> dict[str, float]:
    """ns per packet of one established flow to WARM_VIP, whose backend is
    itself, so that the NAT leaves the packet as it was and BPF_PROG_TEST_RUN can
    repeat it WARM_REPEAT times on one buffer (only the TTL moves): the
    program's own cost, every cache warm. Median of WARM_CALLS calls each. The
    empty program's figure is the machine's pace meanwhile: it moves by half
    within a minute on this shared machine (8 to 12 ns, 2026-12-01), and every
    program's figure with it."""
    out = {}
    for fd in progs.values():
        run(fd, frame(CLIENT, WARM_VIP, WARM_PORT, 80, "S"), ext)
        run(fd, frame(WARM_VIP, CLIENT, 80, WARM_PORT, "SA", eth_src=BACKEND_MAC), ext)
        run(fd, frame(CLIENT, WARM_VIP, WARM_PORT, 80, "A"), ext)
    data = frame(CLIENT, WARM_VIP, WARM_PORT, 80, "PA", b"x" * 64, ttl=255)
    times = {name: [] for name in progs}
    for _ in range(WARM_CALLS):
        for name, fd in progs.items():
            times[name].append(run(fd, data, ext, WARM_REPEAT).duration_ns)
    for name, t in times.items():
        out[name] = statistics.median(t)
    return out


@contextlib.contextmanager
def on_one_cpu():
    """This process on one of its CPUs while inside (the programs take turns on it), on
    its CPUs as they were after: what it starts later (the lab's processes, in make
    bench) inherits them."""
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, cpus)


def bench() -> dict[str, float]:
    """Prints the tables; returns the ratios issue 9 sets targets on."""
    from bcc import BPF

    # WARM_VIP is a neighbour on ext for the warm flow, whose backend it is.
    neighbours = {CLIENT: (CLIENT_MAC, "ext"), WARM_VIP: (BACKEND_MAC, "ext"),
                  **{b: (BACKEND_MAC, "int") for b in BACKENDS}}
    keep = []
    with on_one_cpu(), FibNet(f"xlbx-bench-{os.getpid()}").entered(neighbours) as net:
        ext, intf = net.ifindex["ext"], net.ifindex["int"]
        try:
            progs = {}
            for name, text in REFERENCES.items():
                ref = BPF(text=f"#include <linux/if_ether.h>\n#include <linux/ip.h>\n{text}")
                keep.append(ref.cleanup)
                progs[name] = ref.load_func("xdp_ref", BPF.XDP).fd
            # The first balancer loaded in a process with full-size maps runs a cold packet
            # 40-80 ns slower than the same build loaded after it, whichever is attached
            # first (2026-12-01: three copies of one build; a stand-in with small maps put
            # first left it on the first of them, one with full-size maps took it and left
            # them equal). It goes with the memory the first large map gets on this CPU:
            # a bare map of 262,144 entries created first takes most of it too (LRU, two
            # runs; hash, one), and so does one that another process pinned to this CPU
            # holds, but not one held on the other CPU, nor one created and freed again.
            # A stand-in takes that place, unmeasured: it fell on the build before the fast
            # path, and flattered this one by about 10%.
            this_build(True, keep, net)
            with tempfile.TemporaryDirectory() as tmp:
                progs.update(programs(Path(tmp), keep, net))
            dispatched(net, list(progs.values()))
            rows = costs(progs, ext, intf)
            warm = warm_costs({n: fd for n, fd in progs.items() if n not in (READS, COUNTS)}, ext)
        finally:
            for cleanup in keep:
                cleanup()

    empty_ns = rows[EMPTY]["non-VIP"]
    cols = ("syn", "established", "reply", "non-VIP")
    print(f"XDP program, ns/packet over {RUNS} test-runs (mean of the middle half), the programs "
          f"taking turns every {BLOCK} (one CPU; ratio to the empty program's {empty_ns:.0f} ns):")
    print(f"  {'':<36}" + "".join(f"{c:>17}" for c in cols))
    for name, r in rows.items():
        print(f"  {name:<36}" + "".join(
            f"{r[c]:8.0f} ns {r[c] / empty_ns:5.2f}x" if c in r else f"{'':>17}" for c in cols))
    print(f"\n  warm, one established flow (to a VIP whose backend is itself), median of {WARM_CALLS} calls of "
          f"{WARM_REPEAT} repeats:")
    for name, ns in warm.items():
        print(f"  {name:<36}{ns:8.0f} ns")
    fast = rows["this build, fast forwarding"]
    ratios = {"non-vip/empty": fast["non-VIP"] / empty_ns,
              "reads/empty": rows[READS]["non-VIP"] / empty_ns,
              "counts/empty": rows[COUNTS]["non-VIP"] / empty_ns}
    base = rows.get(f"before the fast path ({BASELINE})")
    if base is not None:
        ratios["syn/before"] = fast["syn"] / base["syn"]
        ratios["established/before"] = fast["established"] / base["established"]
    return ratios
