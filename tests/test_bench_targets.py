"""The bench's table of issue 9's targets (netns-lab/bench.py): each ratio
judged against its target, under each lab target the same ratio for routing
in XDP with no balancing, what forwarding alone reaches on the veths, and under
the non-VIP target the floor programs' ratios; and the line naming the
machine a run measured."""

from __future__ import annotations

import os

from bench import machine, print_targets

TEST_RUN = {"non-vip/empty": 1.10, "syn/before": 1.20, "established/before": 0.95,
            "reads/empty": 1.12, "counts/empty": 1.18}
LAB = {"xlb": "xlb, fast path", "udp/nft": 1.60, "close/direct": 0.90, "close/haproxy": 2.00,
       "xdp alone": {"udp/nft": 1.70, "close/direct": 0.80, "close/haproxy": 1.80}}


def rows(capsys) -> list[tuple[str, str | None]]:
    """(verdict, the line printed under it or None) per target."""
    print_targets(TEST_RUN, LAB)
    lines = capsys.readouterr().out.splitlines()[1:]
    out = []
    for line in lines:
        if line.startswith("    "):
            out[-1] = (out[-1][0], line.strip())
        else:
            out.append(("not met" if line.endswith("not met") else "met", None))
    return out


def test_each_target_judged_by_its_direction(capsys):
    assert [verdict for verdict, _ in rows(capsys)] == [
        "met", "not met", "met",            # UDP >= 1.5, close/direct >= 1.0, close/HAProxy >= 1.9
        "met", "not met", "met"]            # non-VIP <= 1.15, new flow <= 1.0, established <= 1.0


def test_routing_alone_under_each_lab_target_and_the_floor_under_non_vip(capsys):
    routed = "lb routing in XDP, no balancing at all: {}x (forwarding alone on this lab's veths)"
    assert [under for _, under in rows(capsys)] == [
        routed.format("1.70"), routed.format("0.80"), routed.format("1.80"),
        "a program that only reads Ethernet and IPv4: 1.12x, "
        "one that only counts the packet: 1.18x", None, None]


def test_a_run_without_the_old_build_leaves_its_targets_out(capsys):
    print_targets({k: TEST_RUN[k] for k in ("non-vip/empty", "reads/empty", "counts/empty")}, LAB)
    out = capsys.readouterr().out
    assert "before the fast path" not in out and "non-VIP" in out


CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 207
model name\t: Intel(R) Xeon(R) Processor
cpu MHz\t\t: 2100.000

processor\t: 1
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 207
model name\t: Intel(R) Xeon(R) Processor
cpu MHz\t\t: 2100.000
"""


def test_the_machine_is_named_by_its_cpu_s_model_numbers_count_and_kernel():
    """A VM's CPU name can be the same on two hosts: family and model tell them apart."""
    assert machine(CPUINFO) == (f"Machine: Intel(R) Xeon(R) Processor (family 6, model 207, "
                                f"2100 MHz), 2 CPUs, kernel {os.uname().release}")
