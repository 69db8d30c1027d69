"""The bench lab's UDP arrangement (netns-lab/bench_balancers.py): the path
after the client's sender runs in a NAPI thread on a CPU of its own
(sender_apart), the switch sends each frame to its destination's port alone
(switch_learned), and nothing of either is left after; the path's own CPU
is told from other work on its CPU; lb's program's own time on the path is
read. And the health bench's veth
(netns-lab/bench_health.py): each side receives on its own CPU."""

from __future__ import annotations

import os
import subprocess

import pytest

from bench_balancers import (FIRST_PORT, PATH_CPU, UDP_SINK, XDP_ALONE, Figures, Scenario,
                             napi_threads, nft, program_time, run_seconds, sender_apart, stop,
                             switch_learned, trafgen_conf, udp, xdp_forwarding)
from bench_health import veth_between
from labctl import running_lab

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def lab():
    with running_lab("xlbn") as lab:
        yield lab


def port_state(lab) -> tuple[bool, str]:
    """Whether the switch port the client sends into runs XDP, and its threaded setting."""
    link = lab.run("sw", "ip", "-o", "link", "show", FIRST_PORT, check=True).stdout
    threaded = lab.run("sw", "cat", f"/sys/class/net/{FIRST_PORT}/threaded", check=True).stdout
    return "prog/xdp" in link, threaded.strip()


def test_the_client_s_frames_cross_a_thread_bound_to_the_path_cpu(lab):
    before = napi_threads()
    with sender_apart(lab) as pid:
        assert napi_threads() - before == {pid}
        assert os.sched_getaffinity(pid) == {PATH_CPU}
        assert port_state(lab) == (True, "1")
        ran = run_seconds([pid])
        lab.run("client", "ping", "-q", "-c", "20", "-i", "0.01", "10.1.1.1", check=True)
        assert run_seconds([pid]) > ran
    assert port_state(lab) == (False, "0")
    assert pid not in napi_threads()


@pytest.fixture
def sinks(lab, tmp_path):
    """The bench's UDP sink (count and drop :8080) in each server, removed after."""
    for node in ("was1", "was2"):
        nft(lab, node, tmp_path, UDP_SINK)
    yield
    for node in ("was1", "was2"):
        lab.run(node, "nft", "delete", "table", "ip", "xlbbench", check=True)


def rx_packets(lab, node: str) -> int:
    return int(lab.run(node, "cat", "/sys/class/net/eth0/statistics/rx_packets",
                       check=True).stdout)


def test_one_way_udp_is_not_flooded_by_a_switch_that_forgot_the_path(lab, sinks, tmp_path):
    # lb and the servers answer no UDP in the bench (its sink drops it): a bridge whose
    # entries for them aged out sends every frame to every port of the segment (fwex,
    # the other server), and UDP run alone measured that, not the path (2026-12-05: a
    # third fewer packets/s).
    conf = tmp_path / "udp.trafgen"
    conf.write_text(trafgen_conf(lab, Scenario("direct", direct=True)))
    sent = 1000
    with switch_learned(lab):
        for bridge in ("br-ext", "br-int"):
            lab.run("sw", "ip", "link", "set", bridge, "type", "bridge", "fdb_flush",
                    check=True)
        before = {node: rx_packets(lab, node) for node in ("fwex", "was1", "was2")}
        lab.run("client", "trafgen", "--dev", "eth0", "--conf", str(conf), "--cpus", "1",
                "--num", str(sent), "--gap", "100", "--no-sock-mem", "--notouch-irq",
                check=True)
        got = {node: rx_packets(lab, node) - n for node, n in before.items()}
    assert got["was1"] + got["was2"] >= sent, got
    assert got["fwex"] < sent // 100, got
    assert " static" not in lab.run("sw", "bridge", "fdb", "show", check=True).stdout


def test_the_path_s_own_cpu_leaves_out_other_work_on_its_cpu(lab, sinks, tmp_path):
    # The machine is shared: a CPU hog on the path's CPU takes about half of it, which
    # its busy share counts as the path's. A packet costs the path its own threads' time.
    hog = lab.spawn("client", "taskset", "-c", str(PATH_CPU), "timeout", "20", "sh", "-c",
                    "while :; do :; done")
    fig = Figures()
    try:
        udp(lab, Scenario("direct", direct=True), tmp_path, fig)
    finally:
        stop([hog])
    (busy,), (own,) = fig.path_busy, fig.path_own
    assert busy > 0.9 and own < busy - 0.2, (busy, own)


def test_the_program_s_time_is_read_for_each_packet_of_the_live_path(lab, sinks, tmp_path):
    # lb forwarding in XDP: each datagram counted at the servers ran lb's program
    # once, on the link it came in by; the timing was on meanwhile, and only then.
    fig = Figures()
    program_time(lab, Scenario(XDP_ALONE, xdp_forwarding, direct=True), tmp_path, fig)
    assert 0.95 < fig.prog_runs < 1.05 and fig.prog_ns > 0, (fig.prog_runs, fig.prog_ns)
    assert fig.prog_path_us > 0 and not fig.pps
    assert lab.xdp_attached("lb") == []


def test_each_side_of_the_health_bench_receives_on_its_own_cpu():
    # Without RPS a veth receives on the CPU that sent: the answers to the checker were
    # processed on the listeners' CPU and charged to them, a third of the checker's cost.
    chk, srv = f"xlbn-chk-{os.getpid()}", f"xlbn-srv-{os.getpid()}"
    try:
        for ns in (chk, srv):
            subprocess.run(["ip", "netns", "add", ns], check=True)
        veth_between(chk, srv, 0, 1)
        masks = {dev: subprocess.run(
            ["ip", "netns", "exec", ns, "cat", f"/sys/class/net/{dev}/queues/rx-0/rps_cpus"],
            check=True, capture_output=True, text=True).stdout.strip()
            for ns, dev in ((chk, "xlbh0"), (srv, "xlbh1"))}
    finally:
        for ns in (chk, srv):
            subprocess.run(["ip", "netns", "del", ns])
    assert {dev: int(mask, 16) for dev, mask in masks.items()} == {"xlbh0": 1, "xlbh1": 2}
