"""The test-run benchmark (netns-lab/bench_xdp.py): its estimator, finer than
the kernel's clock steps and deaf to interrupts, the order in which the
programs take turns, the same for all, and the order in which each meets its
connections."""

from __future__ import annotations

import collections
import os

import pytest

from bench_balancers import RUNS, Scenario, rounds
from bench_xdp import EMPTY, REFERENCES, middle_mean, on_one_cpu, turns, visit_order


def test_middle_mean_resolves_between_clock_steps():
    # A cost of about 125 ns read by a clock that counts in 10 ns steps: the
    # median says 120 or 130, the middle half's mean where in between.
    times = [130] * 60 + [120] * 40
    assert middle_mean(times) == 127.0


def test_middle_mean_ignores_the_outer_quarters():
    times = [5] * 10 + [100] * 20 + [1_000_000] * 10    # runs an interrupt hit, runs it did not
    assert middle_mean(times) == 100.0


def test_middle_mean_of_any_order():
    assert middle_mean([3, 1, 2, 4]) == 2.5


@pytest.mark.parametrize("n", [3, 4])
def test_no_program_runs_two_blocks_in_a_row_and_each_takes_every_place(n):
    names = [f"p{i}" for i in range(n)]
    order = turns(names, runs=1000, block=10)
    assert sorted(order) == sorted((name, start) for name in names for start in range(0, 1000, 10))
    assert all(a[0] != b[0] for a, b in zip(order, order[1:]))
    places = collections.Counter((name, i % n) for i, (name, _) in enumerate(order))
    assert set(places.values()) == {100 // n} | ({100 // n + 1} if 100 % n else set())


def test_two_programs_run_two_blocks_in_a_row_alike():
    order = [name for name, _ in turns(["a", "b"], runs=40, block=10)]
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]


def test_the_lab_s_rounds_run_every_available_scenario_each_in_a_turned_order():
    plan = [Scenario(name, None) for name in "abcd"]
    plan[2].unavailable = "not installed"
    order = [sc.name for sc in rounds(plan)]
    assert RUNS == 3 and order == ["a", "b", "d", "b", "d", "a", "d", "a", "b"]


def test_connections_are_met_shuffled_and_alike_every_run():
    # In the order they were opened, a program walks its flow entries in the
    # order they lie in memory, and its figure hung on their size.
    ports = range(20000, 21000)
    order = visit_order(ports)
    assert sorted(order) == list(ports)
    assert sum(b == a + 1 for a, b in zip(order, order[1:])) < 10
    assert order == visit_order(ports)


def test_one_cpu_while_the_programs_run_and_every_cpu_back_after(cpus):
    # make bench starts the lab's processes after the test-runs: pinned, they would all
    # share one CPU (wrk, nginx, the balancers: every lab figure from 2026-11-30 to
    # 2026-12-05).
    if len(cpus) < 2:
        pytest.skip("one CPU: nothing to pin")
    found = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        with on_one_cpu():
            assert os.sched_getaffinity(0) == {min(cpus)}
        assert os.sched_getaffinity(0) == cpus
    finally:
        os.sched_setaffinity(0, found)


@pytest.mark.kernel
def test_run_stats_count_a_program_s_runs_and_their_time_while_on(root):
    """What `make bench` reads of the program on the live path: the kernel
    counts a program's runs and times them while run_stats holds, not after."""
    from bcc import BPF

    from xlb import bpfsys

    bpf = BPF(text=REFERENCES[EMPTY])
    try:
        fd = bpf.load_func(b"xdp_ref", BPF.XDP).fd
        prog = bpfsys.prog_info(fd).id
        with bpfsys.run_stats():
            t0, n0 = bpfsys.prog_run_totals(prog)
            for _ in range(5):
                bpfsys.prog_test_run(fd, bytes(64))
            t1, n1 = bpfsys.prog_run_totals(prog)
        bpfsys.prog_test_run(fd, bytes(64))
        t2, n2 = bpfsys.prog_run_totals(prog)
    finally:
        bpf.cleanup()
    assert (n0, n1, n2) == (0, 5, 5)
    assert 0 == t0 < t1 == t2
