"""The balancers side by side in the bench lab: what `make bench` measures with load.

Scenarios, in turn in the same lab (client -> lb -> WAS1/WAS2):
  direct    no balancer: wrk's two threads each talk to one backend, trafgen sends
            to both; lb's kernel only routes (the path without a balancer)
  direct, lb routing in XDP
            the same, with lb forwarding in XDP (netns-lab/xdp_fwd.py: the fast
            path's forwarding alone, no balancing): what XDP is worth on these
            veths, which an XDP balancer with a table to keep can approach but
            not pass by more than a FIB lookup a packet (xdp_fwd.py asks the
            FIB for each, xlb keeps its answer a second) and the runs' noise
  nftables  DNAT `numgen inc mod 2` (conntrack) in lb, the VIP an address of lb
  haproxy   HAProxy `mode tcp`, `balance roundrobin`, default threads (one per
            CPU), in lb, bound to the VIP (an address of lb); TCP only
  xlb       `xlb up` in lb, the seed's VIP for tcp and udp, with kernel
            forwarding (XDP_PASS) and with the fast path (XDP_TX/XDP_REDIRECT):
            the two differ only by `--forwarding`.

The backends are nginx (one worker process each: two backends for two vCPUs),
answering every GET with a small static body, access log off. UDP needs no
answer: an nftables rule in each WAS counts and drops what arrives for :8080.

Three rounds over every scenario (each: wrk keep-alive, wrk `Connection: close`,
trafgen UDP), the order turned each round (rounds), medians printed. Every load
is bounded in time. For UDP the sender has a CPU of its own and the path
(switch, lb, servers) the other, so that packets/s is set by the path's cost,
not the sender's (sender_apart), and the switch sends each frame to its node's
port alone (switch_learned).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench_xdp import turns
from labctl import HERE, PY, VIP, WAS, XLB, Lab
from xlb import bpfsys

RUNS = 3
XDP_ALONE = "direct, lb routing in XDP"
WRK_SECONDS = 4
WRK_ARGS = ("-t2", "-c32", f"-d{WRK_SECONDS}s", "--timeout", "2s", "--latency")
UDP_WARMUP, UDP_SECONDS = 1.0, 3.0
UDP_FLOWS = 1024            # source ports 1024.. per destination: steady flows, no churn
PORT = 8080
SENDER_CPU, PATH_CPU = 0, 1  # UDP: trafgen on one, the switch, lb and servers on the other
FIRST_PORT = "client-eth0"  # the switch port the client sends into
SWITCHED = (("client", "eth0"), ("lb", "eth0"), ("lb", "eth1"), ("was1", "eth0"),
            ("was2", "eth0"))     # the nodes of the path, each on switch port NODE-DEV
CLOCK_TICK = 100            # USER_HZ: the unit of /proc/<pid>/stat times


@dataclass
class Scenario:
    name: str
    setup: object = None          # a context manager factory (lab, run_dir); None: direct
    direct: bool = False          # to the backends themselves rather than the VIP
    udp: bool = True
    xlb: bool = False             # read xlb's packets by reason after each round
    unavailable: str = ""         # why there is no row

    @property
    def client_ports(self) -> str:
        """The client's source ports. A backend keeps TIME_WAIT for 60 s after it closes,
        and takes a SYN on that 4-tuple only if its TCP timestamp is newer; Linux offsets
        timestamps per (source, destination) address, so a connection to the VIP that
        reuses a port of a recent direct one is refused by half of all chances (PAWS) and
        retries after 1 s. Disjoint ranges keep one scenario from slowing the next."""
        return "1024 32767" if self.direct else "32768 65535"


@dataclass
class Figures:
    rps: dict[str, list[float]] = field(default_factory=dict)       # per wrk mode, per run
    p50: dict[str, list[float]] = field(default_factory=dict)
    p99: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, list[int]] = field(default_factory=dict)
    cpu_us: dict[str, list[float]] = field(default_factory=dict)
    pps: list[float] = field(default_factory=list)                  # counted at the backends
    sent_pps: list[float] = field(default_factory=list)             # sent by the client
    path_busy: list[float] = field(default_factory=list)            # PATH_CPU's busy share
    path_own: list[float] = field(default_factory=list)             # the path's threads' share
    path_us: list[float] = field(default_factory=list)              # their CPU µs a packet
    sender_busy: list[float] = field(default_factory=list)          # SENDER_CPU's
    other_load: list[float] = field(default_factory=list)           # others' share of the CPUs
    reasons: dict[str, int] = field(default_factory=dict)          # xlb's, summed over rounds
    prog_ns: float | None = None        # lb's XDP program a run, in a run of its own
    prog_runs: float | None = None      # its runs a packet counted
    prog_path_us: float | None = None   # the path's µs a packet in that run


# --- backends -------------------------------------------------------------------------

NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {run}/{node}.nginx.pid;
error_log {run}/{node}.nginx.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {run}/{node}.body;
    proxy_temp_path {run}/{node}.proxy;
    fastcgi_temp_path {run}/{node}.fastcgi;
    uwsgi_temp_path {run}/{node}.uwsgi;
    scgi_temp_path {run}/{node}.scgi;
    server {{
        listen {port} backlog=4096;
        default_type text/plain;
        location / {{ return 200 "{name}\\n"; }}
    }}
}}
"""

# Counts and drops UDP for the service port before anything else looks at it.
UDP_SINK = f"""\
table ip xlbbench {{
    chain pre {{
        type filter hook prerouting priority raw; policy accept;
        udp dport {PORT} counter drop
    }}
}}
"""


def start_backends(lab: Lab, run: Path) -> list[subprocess.Popen]:
    procs = []
    for name, _ in WAS.items():
        node = name.lower()
        lab.server("stop", node)      # the lab's Python server holds :8080
        conf = run / f"{node}.nginx.conf"
        conf.write_text(NGINX_CONF.format(run=run, node=node, port=PORT, name=name))
        procs.append(lab.spawn(node, "nginx", "-e", str(run / f"{node}.nginx.log"),
                               "-c", str(conf)))
        nft(lab, node, run, UDP_SINK)
    for name, proc in zip(WAS, procs):
        wait_listening(lab, name.lower(), "127.0.0.1", PORT, proc)
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_listening(lab: Lab, node: str, addr: str, port: int, proc: subprocess.Popen,
                   seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while lab.run(node, "bash", "-c", f"exec 3<>/dev/tcp/{addr}/{port}").returncode:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop([proc])
            raise RuntimeError(f"{proc.args[4]} does not listen on {addr}:{port} in {node}: "
                               f"{proc.stderr.read().strip()[-500:]}")
        time.sleep(0.1)


def nft(lab: Lab, node: str, run: Path, ruleset: str) -> None:
    path = run / f"{node}.nft"
    path.write_text(ruleset)
    lab.run(node, "nft", "-f", str(path), check=True)


def udp_sent(lab: Lab) -> int:
    return int(lab.run("client", "cat", "/sys/class/net/eth0/statistics/tx_packets",
                       check=True).stdout)


def udp_counted(lab: Lab) -> int:
    total = 0
    for name in WAS:
        out = json.loads(lab.run(name.lower(), "nft", "-j", "list", "table", "ip", "xlbbench",
                                 check=True).stdout)
        total += sum(x["counter"]["packets"] for e in out["nftables"] if "rule" in e
                     for x in e["rule"]["expr"] if "counter" in x)
    return total


# --- balancers ------------------------------------------------------------------------

@contextlib.contextmanager
def vip_on_lb(lab: Lab):
    """The VIP as an address of lb (nftables and HAProxy need one; xlb must not have it)."""
    lab.run("lb", "ip", "addr", "add", f"{VIP}/32", "dev", "eth0", check=True)
    try:
        yield
    finally:
        lab.run("lb", "ip", "addr", "del", f"{VIP}/32", "dev", "eth0")


@contextlib.contextmanager
def nftables_dnat(lab: Lab, run: Path):
    backends = ", ".join(f"{i} : {a}" for i, a in enumerate(WAS.values()))
    with vip_on_lb(lab):
        nft(lab, "lb", run, f"""\
table ip xlbbench {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr {VIP} meta l4proto {{ tcp, udp }} th dport 80 \\
            dnat to numgen inc mod {len(WAS)} map {{ {backends} }} : {PORT}
    }}
}}
""")
        try:
            yield
        finally:
            lab.run("lb", "nft", "delete", "table", "ip", "xlbbench")


@contextlib.contextmanager
def haproxy(lab: Lab, run: Path):
    servers = "\n".join(f"    server {n.lower()} {a}:{PORT}" for n, a in WAS.items())
    conf = run / "haproxy.cfg"
    conf.write_text(f"""\
global
    maxconn 8000
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend vip
    bind {VIP}:80
    default_backend was
backend was
    balance roundrobin
{servers}
""")
    with vip_on_lb(lab):
        proc = lab.spawn("lb", "haproxy", "-db", "-f", str(conf))
        try:
            wait_listening(lab, "lb", VIP, 80, proc)
            yield
        finally:
            stop([proc])


@contextlib.contextmanager
def xdp_forwarding(lab: Lab, run: Path):
    """lb routes in XDP (xdp_fwd.py: the fast path's forwarding alone) on both links."""
    lab.run("lb", PY, str(HERE / "xdp_fwd.py"), "eth0", "eth1", check=True)
    try:
        yield
    finally:
        for dev in ("eth0", "eth1"):
            lab.run("lb", "ip", "link", "set", "dev", dev, "xdp", "off")


def xlb_has(flag: str) -> bool:
    """Whether this build's `xlb up` takes `flag` (some come with later work)."""
    out = subprocess.run([str(XLB), "up", "--help"], capture_output=True, text=True).stdout
    return flag in out


def xlb_scenario(mode: str | None):
    """xlb in lb with the seed's service for tcp and udp; `mode` is the --forwarding value,
    None for a build without the flag (it forwards through the kernel)."""
    args = ["--vip", f"{VIP}:80", "--vip", f"{VIP}:80/udp",
            *[a for b in WAS.values() for a in ("--backend", f"{b}:{PORT}")]]
    if mode is not None:
        args += ["--forwarding", mode]

    @contextlib.contextmanager
    def setup(lab: Lab, run: Path):
        with lab.xlb(*args):
            yield
    return setup


def rounds(plan: list[Scenario]) -> list[Scenario]:
    """The available scenarios in the order they run: round after round over
    every one, so that a change in the machine's other load (it is shared)
    falls on all alike, the order turned by one each round (bench_xdp.turns),
    so that no scenario always runs first, after the lab's setup, or always
    after the same neighbour."""
    available = {sc.name: sc for sc in plan if not sc.unavailable}
    return [available[name] for name, _ in turns(list(available), runs=RUNS, block=1)]


def scenarios() -> list[Scenario]:
    flag = xlb_has("--forwarding")
    out = [Scenario("direct to the backends", direct=True),
           Scenario(XDP_ALONE, xdp_forwarding, direct=True),
           Scenario("nftables DNAT (numgen, conntrack)", nftables_dnat),
           Scenario("HAProxy mode tcp roundrobin", haproxy, udp=False),
           Scenario("xlb, kernel forwarding", xlb_scenario("kernel" if flag else None),
                    xlb=True)]
    if flag:
        out.append(Scenario("xlb, fast path", xlb_scenario("fast"), xlb=True))
    else:
        out.append(Scenario("xlb, fast path", unavailable="n/a (this build has no --forwarding)"))
    return out


# --- load and CPU ---------------------------------------------------------------------

def lab_pids(lab: Lab) -> list[int]:
    """Every process in the lab's namespaces, and the kernel's softirq threads."""
    pids = []
    for node in ("client", "lb", "was1", "was2", "sw"):
        out = subprocess.run(["ip", "netns", "pids", lab.ns(node)], capture_output=True,
                             text=True).stdout
        pids += [int(p) for p in out.split()]
    return pids + sorted(named("ksoftirqd/"))


def named(prefix: str) -> set[int]:
    """The machine's processes (kernel threads, say) whose name begins with prefix."""
    out = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if (proc / "comm").read_text().startswith(prefix):
                    out.add(int(proc.name))
    return out


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICK   # utime, stime
    return out


def run_seconds(pids: list[int]) -> float:
    """Seconds the threads have run (schedstat: nanoseconds, not ticks)."""
    return sum(int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) for pid in pids) / 1e9


def cpu_ticks() -> dict[str, tuple[int, int]]:
    """Per CPU line of /proc/stat ("cpu" all of them, "cpu0", ...): ticks spent on anything
    but idle and iowait, and ticks in all."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu"):
            name, *f = line.split()
            f = [int(x) for x in f[:8]]
            out[name] = (sum(f) - f[3] - f[4], sum(f))
    return out


def machine_busy() -> float:
    """Seconds all CPUs spent on anything but idle and iowait."""
    return cpu_ticks()["cpu"][0] / CLOCK_TICK


def busy_share(t0: dict[str, tuple[int, int]], t1: dict[str, tuple[int, int]], cpu: int) -> float:
    """The share of the span between two cpu_ticks() that the CPU was busy."""
    (b0, a0), (b1, a1) = t0[f"cpu{cpu}"], t1[f"cpu{cpu}"]
    return (b1 - b0) / max(a1 - a0, 1)


class CpuMeter:
    """CPU of the bench (the lab's processes, the load generator, ksoftirqd) over a span,
    and of everything else on the machine over the same span."""

    def __init__(self, lab: Lab):
        self.pids = lab_pids(lab)

    def __enter__(self):
        self.t0 = time.monotonic()
        self.busy0 = machine_busy()
        self.cpu0 = cpu_seconds(self.pids)
        self.children0 = _children_cpu()
        return self

    def __exit__(self, *exc):
        cpu1 = cpu_seconds(self.pids)
        self.seconds = time.monotonic() - self.t0
        self.bench = (sum(cpu1[p] - self.cpu0[p] for p in cpu1 if p in self.cpu0)
                      + _children_cpu() - self.children0)
        self.others = max(0.0, machine_busy() - self.busy0 - self.bench)


def _children_cpu() -> float:
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


DIRECT_LUA = """\
-- One backend per thread: the direct scenario spreads the load as a balancer would.
local addrs = {%s}
local n = 0
function setup(thread)
    n = n + 1
    thread.addr = wrk.lookup(addrs[(n - 1) %% #addrs + 1], "%d")[1]
end
"""


def wrk(lab: Lab, sc: Scenario, run: Path, close: bool, fig: Figures, mode: str) -> None:
    if sc.direct:
        script = run / "direct.lua"
        script.write_text(DIRECT_LUA % (", ".join(f'"{a}"' for a in WAS.values()), PORT))
        target = ["-s", str(script), f"http://{WAS['WAS1']}:{PORT}/"]
    else:
        target = [f"http://{VIP}/"]
    header = ["-H", "Connection: close"] if close else []
    lab.run("client", "sysctl", "-q", "-w", f"net.ipv4.ip_local_port_range={sc.client_ports}",
            check=True)
    with CpuMeter(lab) as meter:
        out = lab.run("client", "wrk", *WRK_ARGS, *header, *target,
                      timeout=WRK_SECONDS + 30, check=True).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    fig.rps.setdefault(mode, []).append(float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)))
    fig.p50.setdefault(mode, []).append(_latency(out, "50%"))
    fig.p99.setdefault(mode, []).append(_latency(out, "99%"))
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    fig.errors.setdefault(mode, []).append(errors + (int(m.group(1)) if m else 0))
    fig.cpu_us.setdefault(mode, []).append(meter.bench / max(requests, 1) * 1e6)
    fig.other_load.append(meter.others / meter.seconds / os.cpu_count())


def _latency(out: str, pct: str) -> float:
    """wrk's percentile in milliseconds."""
    value, unit = re.search(rf"^\s+{pct}\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def trafgen_conf(lab: Lab, sc: Scenario) -> str:
    lb_mac, src_mac = lab.mac("lb", "eth0"), lab.mac("client", "eth0")
    dests = [(a, PORT) for a in WAS.values()] if sc.direct else [(VIP, 80)]
    # One packet per destination, cycled; the source port walks UDP_FLOWS values.
    return "\n".join(
        f"{{ eth(da={lb_mac}, sa={src_mac}), "
        f"ipv4(sa=10.1.1.10, da={dst}, ttl=64), "
        f"udp(sp=dinc(1024, {1023 + UDP_FLOWS}), dp={dport}), fill(0x41, 18) }}"
        for dst, dport in dests)


def ksoftirqd(cpu: int) -> int:
    (pid,) = (p for p in named("ksoftirqd/")
              if Path(f"/proc/{p}/comm").read_text().strip() == f"ksoftirqd/{cpu}")
    return pid


def napi_threads() -> set[int]:
    """The kernel's threaded-NAPI threads (named napi/DEV-ID, in no namespace's view)."""
    return named("napi/")


@contextlib.contextmanager
def sender_apart(lab: Lab):
    """The whole path after the sender (switch, lb, servers) on PATH_CPU, as if the client
    were a machine of its own. A veth delivers in its sender's softirq: left alone, the
    trafgen process's CPU would carry the path too, and its own cost would dilute every
    ratio. The switch port the client sends into runs a pass-through XDP program, which
    makes it take frames through its NAPI, and that NAPI runs as a thread on PATH_CPU;
    the rest of the path follows in that thread's softirq. Yields the thread's pid."""
    before = napi_threads()
    lab.run("sw", PY, str(HERE / "xdp_pass.py"), FIRST_PORT, check=True)
    try:
        lab.run("sw", "sh", "-c", f"echo 1 > /sys/class/net/{FIRST_PORT}/threaded", check=True)
        ours = napi_threads() - before
        if len(ours) != 1:
            raise RuntimeError(f"expected one new NAPI thread for {FIRST_PORT}, found {len(ours)}")
        (thread,) = ours
        os.sched_setaffinity(thread, {PATH_CPU})
        yield thread
    finally:
        lab.run("sw", "sh", "-c", f"echo 0 > /sys/class/net/{FIRST_PORT}/threaded")
        lab.run("sw", "ip", "link", "set", "dev", FIRST_PORT, "xdp", "off")


@contextlib.contextmanager
def switch_learned(lab: Lab):
    """The switch sends each frame out of its destination's port alone, as one that has
    learned where every node of the path is. UDP to the servers is one way: lb and the
    servers send nothing back, and a bridge that has seen no frame from a MAC for its
    ageing time (300 s) floods every frame for it to every port of the segment (fwex,
    the other server). Only the HTTP load before UDP in each scenario taught it: the UDP
    part run alone got 246,000-302,000 packets/s direct, flooding, against 420,000-435,000
    (2026-12-05)."""
    ports = [(lab.mac(node, dev), f"{node}-{dev}") for node, dev in SWITCHED]
    for mac, port in ports:
        lab.run("sw", "bridge", "fdb", "replace", mac, "dev", port, "master", "static",
                check=True)
    try:
        yield
    finally:
        for mac, port in ports:
            lab.run("sw", "bridge", "fdb", "del", mac, "dev", port, "master")


def udp(lab: Lab, sc: Scenario, run: Path, fig: Figures, programs: list[int] = ()) -> None:
    """One UDP run's figures into fig; with programs (ids, while bpfsys.run_stats),
    their runs and run time a packet counted, read at the same moments."""
    conf = run / "udp.trafgen"
    conf.write_text(trafgen_conf(lab, sc))
    # One sender process on SENDER_CPU, leaving the machine's socket memory and IRQ
    # settings alone. It sends with sendto(2), which blocks while the socket's packets
    # wait for the path (its TX ring mode gives up). `timeout` bounds it if we fail to
    # stop it.
    with switch_learned(lab), sender_apart(lab) as napi:
        # The path's own CPU: the NAPI thread and, for softirq work it defers, PATH_CPU's
        # ksoftirqd. The CPU's busy share also holds whatever else the machine ran there.
        path = [napi, ksoftirqd(PATH_CPU)]
        proc = lab.spawn("client", "taskset", "-c", str(SENDER_CPU), "timeout", "-s", "INT",
                         str(int(UDP_WARMUP + UDP_SECONDS + 10)), "trafgen", "--dev", "eth0",
                         "--conf", str(conf), "--cpus", "1", "--gap", "0", "--no-sock-mem",
                         "--notouch-irq")
        try:
            time.sleep(UDP_WARMUP)
            s0, c0, t0, k0, r0 = (udp_sent(lab), udp_counted(lab), time.monotonic(),
                                  cpu_ticks(), run_seconds(path))
            p0 = [bpfsys.prog_run_totals(p) for p in programs]
            time.sleep(UDP_SECONDS)
            s1, c1, t1, k1, r1 = (udp_sent(lab), udp_counted(lab), time.monotonic(),
                                  cpu_ticks(), run_seconds(path))
            p1 = [bpfsys.prog_run_totals(p) for p in programs]
        finally:
            proc.send_signal(signal.SIGINT)
            stop([proc])
    if proc.returncode not in (0, 130, -signal.SIGINT):
        raise RuntimeError(f"trafgen failed: {proc.stderr.read()}")
    fig.pps.append((c1 - c0) / (t1 - t0))
    fig.sent_pps.append((s1 - s0) / (t1 - t0))
    fig.path_busy.append(busy_share(k0, k1, PATH_CPU))
    fig.path_own.append((r1 - r0) / (t1 - t0))
    fig.path_us.append((r1 - r0) / max(c1 - c0, 1) * 1e6)
    fig.sender_busy.append(busy_share(k0, k1, SENDER_CPU))
    if programs:
        ns, runs = (sum(b[i] - a[i] for a, b in zip(p0, p1)) for i in (0, 1))
        fig.prog_ns, fig.prog_runs = ns / max(runs, 1), runs / max(c1 - c0, 1)


def lb_programs(lab: Lab) -> list[int]:
    """The ids of the XDP programs on lb's links, each once."""
    links = json.loads(lab.run("lb", "ip", "-j", "-d", "link", "show", check=True).stdout)
    return sorted({link["xdp"]["prog"]["id"] for link in links
                   if link.get("xdp", {}).get("prog", {}).get("id")})


def program_time(lab: Lab, sc: Scenario, run: Path, fig: Figures) -> None:
    """One more UDP run with the kernel timing every program run: lb's XDP
    program's own time a packet on the live path, beside the path's. Apart from
    the rounds, whose figures the timing (two clock reads a run) would take
    from the XDP scenarios alone."""
    probe = Figures()
    with sc.setup(lab, run), bpfsys.run_stats():
        udp(lab, sc, run, probe, lb_programs(lab))
    fig.prog_ns, fig.prog_runs, fig.prog_path_us = probe.prog_ns, probe.prog_runs, probe.path_us[0]


def check_cpus() -> None:
    if not {SENDER_CPU, PATH_CPU} <= os.sched_getaffinity(0):
        raise SystemExit(f"bench: the UDP runs put the sender on CPU {SENDER_CPU} and the path "
                         f"on CPU {PATH_CPU}; this process may run on CPUs "
                         f"{sorted(os.sched_getaffinity(0))} only")


def measure(lab: Lab, run: Path) -> list[tuple[Scenario, Figures | None]]:
    check_cpus()
    # Connection: close opens tens of thousands of connections in a few seconds: HAProxy
    # in lb may reuse its source ports while they are in TIME_WAIT.
    lab.run("lb", "sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=1024 65535",
            "net.ipv4.tcp_tw_reuse=1", check=True)
    # The client closes first through HAProxy and keeps its side in TIME_WAIT for 60 s:
    # half its ports for the VIP. Unless it may reuse them, every connect() of the next
    # scenario scans for a free port in the kernel (wrk at 190% CPU, 92% of it system,
    # xlb's `Connection: close` at 0.07x direct in a run of 2026-12-01).
    lab.run("client", "sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1", check=True)
    backends = start_backends(lab, run)
    plan = scenarios()
    figures = {sc.name: Figures() for sc in plan if not sc.unavailable}
    try:
        for sc in rounds(plan):
            fig = figures[sc.name]
            lab.run("client", "ip", "neigh", "flush", "all")
            with sc.setup(lab, run) if sc.setup else contextlib.nullcontext():
                wrk(lab, sc, run, False, fig, "keep-alive")
                wrk(lab, sc, run, True, fig, "close")
                if sc.udp:
                    udp(lab, sc, run, fig)
                if sc.xlb:
                    for name, t in lab.status()["reasons"].items():
                        fig.reasons[name] = fig.reasons.get(name, 0) + t["packets"]
        for sc in plan:
            if sc.name in figures and sc.udp and (sc.xlb or sc.name == XDP_ALONE):
                program_time(lab, sc, run, figures[sc.name])
    finally:
        stop(backends)
        for name in WAS:
            lab.server("start", name.lower())   # the lab as it was, for what follows
    results = [(sc, figures.get(sc.name)) for sc in plan]
    return results


# --- report ---------------------------------------------------------------------------

med = statistics.median


def ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:5.2f}x" if value and base else "    - "


def report(results: list[tuple[Scenario, Figures | None]]) -> dict:
    """Prints the tables; returns the ratios the targets are judged on, xlb's and,
    under "xdp alone", the same for lb routing in XDP with no balancing."""
    by_name = {sc.name: fig for sc, fig in results}
    direct = by_name["direct to the backends"]
    nft = by_name["nftables DNAT (numgen, conntrack)"]
    print(f"Balancers side by side: client -> lb -> nginx on WAS1 and WAS2 (one worker each), "
          f"{RUNS} rounds over every scenario, medians (errors: the rounds' sum)")
    for mode, title in (("keep-alive", "keep-alive"), ("close", "Connection: close")):
        print(f"\nHTTP {title}: wrk {' '.join(WRK_ARGS)}"
              f"{' -H ' + repr('Connection: close') if mode == 'close' else ''}")
        print(f"  {'':<36}{'req/s':>9} {'/direct':>7} {'/nft':>6} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'errors':>7} {'CPU µs/req':>11}")
        for sc, fig in results:
            if fig is None:
                print(f"  {sc.name:<36}{sc.unavailable}")
                continue
            rps = med(fig.rps[mode])
            print(f"  {sc.name:<36}{rps:9.0f} {ratio(rps, med(direct.rps[mode])):>7} "
                  f"{ratio(rps, med(nft.rps[mode])):>6} {med(fig.p50[mode]):8.2f} "
                  f"{med(fig.p99[mode]):8.2f} {sum(fig.errors[mode]):7d} "
                  f"{med(fig.cpu_us[mode]):11.1f}")
    print(f"\nUDP through the VIP: trafgen, 64-byte frames, {UDP_FLOWS} flows per destination, "
          f"one sender process on CPU {SENDER_CPU};\n  counted at the backends over "
          f"{UDP_SECONDS:.0f} s. The switch, lb and the servers on CPU {PATH_CPU}, whose cost "
          "per packet sets\n  packets/s: sent/s = what left the client, busy = each CPU's "
          "share of the count's time, own = the\n  path's threads' share of it (the rest of "
          "busy path is other work of the machine), µs/packet =\n  their CPU time per packet "
          "counted: the path's cost, which sets packets/s where its CPU is its own")
    print(f"  {'':<36}{'packets/s':>10} {'/direct':>7} {'/nft':>6} {'sent/s':>10} "
          f"{'busy path':>9} {'sender':>6} {'own':>5} {'µs/packet':>9}")
    for sc, fig in results:
        if fig is None or not sc.udp:
            print(f"  {sc.name:<36}{sc.unavailable or 'n/a (TCP only)'}")
            continue
        pps = med(fig.pps)
        print(f"  {sc.name:<36}{pps:10.0f} {ratio(pps, med(direct.pps)):>7} "
              f"{ratio(pps, med(nft.pps)):>6} {med(fig.sent_pps):10.0f} "
              f"{med(fig.path_busy):9.0%} {med(fig.sender_busy):6.0%} {med(fig.path_own):5.0%} "
              f"{med(fig.path_us):9.2f}")
    print("\n  lb's XDP program on this path: one more UDP run each, the kernel timing every "
          "run of it (its\n  BPF run-time stats, which add two clock reads a run); "
          "ns a run, runs a packet counted, and\n  their share of the path's µs a packet "
          "in that run:")
    for sc, fig in results:
        if fig is not None and fig.prog_ns is not None:
            us = fig.prog_ns * fig.prog_runs / 1000
            print(f"  {sc.name:<36}{fig.prog_ns:6.0f} ns {fig.prog_runs:5.2f} runs "
                  f"{us:5.2f} µs of {fig.prog_path_us:.2f} ({us / fig.prog_path_us:.0%})")
    for sc, fig in results:
        if fig is not None and fig.reasons:
            counts = sorted(((n, c) for n, c in fig.reasons.items() if c), key=lambda x: -x[1])
            print(f"\n  {sc.name}, packets by reason (all rounds): "
                  + ", ".join(f"{n} {c}" for n, c in counts))
    others = [x for _, fig in results if fig for x in fig.other_load]
    print("\n  CPU µs/req: CPU time of every process in the lab (wrk, nginx, HAProxy, xlb) and of "
          "the\n  kernel's ksoftirqd threads over the run, per request. Client, balancer and "
          "servers share\n  the 2 vCPUs, and the kernel charges packet processing (softirq) to "
          "the task it interrupts,\n  on this path almost always one of these: so this is the "
          "cost of the whole path, and a\n  balancer's own cost is its difference from direct. "
          "Other tenants of the machine are left\n  out: they used a median "
          f"{med(others) * 100:.0f}% of the CPUs during these runs.")
    xlb_name = "xlb, fast path" if by_name["xlb, fast path"] else "xlb, kernel forwarding"
    haproxy_fig = by_name["HAProxy mode tcp roundrobin"]

    def ratios(fig: Figures) -> dict[str, float]:
        return {"udp/nft": med(fig.pps) / med(nft.pps),
                "close/direct": med(fig.rps["close"]) / med(direct.rps["close"]),
                "close/haproxy": med(fig.rps["close"]) / med(haproxy_fig.rps["close"])}
    return {"xlb": xlb_name, **ratios(by_name[xlb_name]), "xdp alone": ratios(by_name[XDP_ALONE])}
