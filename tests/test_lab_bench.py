"""The bench lab's UDP arrangement (netns-lab/bench_balancers.py sender_apart):
the path after the client's sender runs in a NAPI thread on a CPU of its own,
and nothing of it is left after."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench_balancers import FIRST_PORT, PATH_CPU, napi_threads, sender_apart
from labctl import running_lab

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def lab():
    with running_lab("xlbn") as lab:
        yield lab


def run_ns(pid: int) -> int:
    """Nanoseconds the thread has run (the first field of /proc/PID/schedstat)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def port_state(lab) -> tuple[bool, str]:
    """Whether the switch port the client sends into runs XDP, and its threaded setting."""
    link = lab.run("sw", "ip", "-o", "link", "show", FIRST_PORT, check=True).stdout
    threaded = lab.run("sw", "cat", f"/sys/class/net/{FIRST_PORT}/threaded", check=True).stdout
    return "prog/xdp" in link, threaded.strip()


def test_the_client_s_frames_cross_a_thread_bound_to_the_path_cpu(lab):
    before = napi_threads()
    with sender_apart(lab):
        (pid,) = napi_threads() - before
        assert os.sched_getaffinity(pid) == {PATH_CPU}
        assert port_state(lab) == (True, "1")
        ran = run_ns(pid)
        lab.run("client", "ping", "-q", "-c", "20", "-i", "0.01", "10.1.1.1", check=True)
        assert run_ns(pid) > ran
    assert port_state(lab) == (False, "0")
    assert pid not in napi_threads()
