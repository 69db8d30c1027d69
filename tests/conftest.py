import os

import pytest


@pytest.fixture(scope="session")
def root():
    if os.geteuid() != 0:
        pytest.skip("needs root: loads the XDP program with bcc and runs BPF_PROG_TEST_RUN")


@pytest.fixture(scope="session")
def cpus():
    """The CPUs the tests may run on, as found before any fixture pinned them."""
    return frozenset(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def datapath(root, cpus):
    """One loaded XDP program (bpf/xlb.c) for the whole test module.

    The process is pinned to one CPU while it lives: BPF_PROG_TEST_RUN runs the
    program on the calling CPU, and round-robin keeps one cursor per CPU
    (offset by the CPU number), so the choice of backend is only repeatable
    when every test-run happens on the same CPU.
    """
    from xlb.datapath import Datapath

    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    dp = Datapath()
    try:
        yield dp
    finally:
        dp.close()
        os.sched_setaffinity(0, allowed)
