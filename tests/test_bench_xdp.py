"""The test-run benchmark's estimator (netns-lab/bench_xdp.py): finer than the
kernel's clock steps, deaf to interrupts."""

from __future__ import annotations

from bench_xdp import middle_mean


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
