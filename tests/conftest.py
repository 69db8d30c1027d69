import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import traceback
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "netns-lab"))
from fibnet import FibNet  # noqa: E402

# `make test` (and so CI) sets XLB_REQUIRE_ALL=1: there every test must run, and a
# test that would be skipped (not root, promtool, prometheus or the dashboard SDK
# missing) fails instead, so a run that tested less cannot pass. `make unit`, as a
# normal user, keeps the skips.
REQUIRE_ALL = os.environ.get("XLB_REQUIRE_ALL") == "1"


def _skip_fails(report) -> None:
    if REQUIRE_ALL and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"XLB_REQUIRE_ALL=1 (make test): every test must run; skipped: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _skip_fails(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _skip_fails(outcome.get_result())


# A test that hangs fails, with every thread's stack, rather than hold the run
# (and CI) for ever: SIGALRM raises in the main thread wherever it waits. Each
# phase (setup, call, teardown) has its bound: a test that needs no kernel
# takes a second or two; a kernel, netns or lab test's setup may compile the
# program or start a lab. Once over, it raises again every AGAIN seconds, in
# case what the first interrupted hangs too as it unwinds.
UNIT_BOUND, ROOT_BOUND, AGAIN = 120, 1800, 10


@contextlib.contextmanager
def _bounded(item):
    root = any(item.get_closest_marker(m) for m in ("kernel", "netns", "lab"))
    seconds = ROOT_BOUND if root else UNIT_BOUND

    def hung(signum, frame):
        names = {t.ident: t.name for t in threading.enumerate()}
        # the main thread's where the signal found it, not in this handler
        frames = {**sys._current_frames(), threading.main_thread().ident: frame}
        stacks = "".join(f"\nthread {names.get(ident, ident)}:\n"
                         + "".join(traceback.format_stack(f)) for ident, f in frames.items())
        pytest.fail(f"still running after {seconds} s: hung?{stacks}")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, seconds, AGAIN)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    with _bounded(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with _bounded(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    with _bounded(item):
        yield


@pytest.fixture(scope="session", autouse=True)
def state_root(tmp_path_factory):
    """xlb's state directory root for this run (not /var/lib/xlb): every `xlb`
    the tests start inherits it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XLB_STATE_DIR", str(tmp_path_factory.mktemp("xlb-state")))
        yield


@pytest.fixture(scope="session")
def root():
    if os.geteuid() != 0:
        pytest.skip("needs root: loads the XDP program with bcc and runs BPF_PROG_TEST_RUN")


@pytest.fixture(scope="session")
def tls_pem(tmp_path_factory) -> Path:
    """A self-signed certificate and its key, in one PEM file (as HAProxy's
    `crt` and servers.py's --tls take them), for the https checks' servers."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command (make setup installs it)")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                    "/CN=xlb-test", "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
                   check=True, capture_output=True)
    pem = d / "server.pem"
    pem.write_text((d / "key.pem").read_text() + (d / "cert.pem").read_text())
    return pem


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


@pytest.fixture(scope="module")
def fibnet(root):
    """Runs the module's test-runs inside a FibNet; the neighbours are the
    test frames' client and backends (tests/packets.py MACs)."""
    from packets import BACKEND_MAC, CLIENT_MAC

    with FibNet(f"xlbx-fib-{os.getpid()}").entered(
            {"10.1.1.10": (CLIENT_MAC, "ext"), "10.1.11.101": (BACKEND_MAC, "int"),
             "10.1.11.102": (BACKEND_MAC, "int"), "10.1.13.101": (BACKEND_MAC, "small"),
             "10.1.14.101": (BACKEND_MAC, "nofwd")}) as net:
        yield net


@pytest.fixture
def balancer(root, fibnet):
    """A Balancer serving 10.1.1.101:80 by 10.1.11.101:8080 alone (as `xlb up`
    does, without links) on a Datapath of its own: nothing was ever evicted
    from its tables."""
    from xlb.balancer import Balancer
    from xlb.datapath import Datapath
    from xlb.model import from_flags

    dp = Datapath()
    try:
        dp.set_forwarding(True)
        fibnet.as_native(dp)
        b = Balancer(dp)
        b.apply(from_flags(["10.1.1.101:80"], ["10.1.11.101:8080"]), relink=False)
        yield b
    finally:
        dp.detach_all()         # a relinking apply attaches it to the FibNet's links
        dp.close()
