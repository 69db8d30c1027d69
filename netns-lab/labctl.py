"""Driving the lab from Python: the integration tests, the demo and the benchmark.

    lab = Lab("xlbt"); lab.up()
    with lab.xlb("--vip", "10.1.1.101:80", "--backend", ...) as x:
        lab.client("client", "http", "10.1.1.101", "80", "--count", "10")
    lab.down()
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
XLB = ROOT / ".venv" / "bin" / "xlb"
PY = "/usr/bin/python3"
VIP = "10.1.1.101"
WAS = {"WAS1": "10.1.11.101", "WAS2": "10.1.11.102"}
SEED_ARGS = ("--vip", f"{VIP}:80", "--backend", f"{WAS['WAS1']}:8080",
             "--backend", f"{WAS['WAS2']}:8080")


@contextlib.contextmanager
def running_lab(prefix: str, script: str = "lab.sh"):
    """A fresh lab for a test module: torn down before (a leftover of a killed
    run) and after, also when the tests fail."""
    lab = Lab(prefix, script)
    lab.down()
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


def even_split(counts: dict[str, int], names: set[str], total: int) -> bool:
    """True if `total` new flows went to exactly `names`, evenly as round-robin
    from one cursor gives it: no two counts more than one apart. The lab's
    http and udp clients send from one CPU (clients.py), so on any host their
    flows meet one of the per-CPU cursors."""
    if set(counts) != names or sum(counts.values()) != total:
        return False
    return max(counts.values()) - min(counts.values()) <= 1


def wait_for(predicate, seconds: float, what: str):
    """predicate()'s first true result, polled every 0.1 s; AssertionError naming
    what did not happen within the time."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"not within {seconds}s: {what}")


def xlb_ok(lab, *args: str) -> str:
    """The output of `xlb ARGS` in lb, which must succeed."""
    r = lab.xlb_cmd(*args, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def pair_config(directory: Path) -> Path:
    """A copy in directory of the pair's config (ha-examples/xlb.toml): the
    seed's service with Maglev and adopt_replies, so that every node of a pair
    or an ECMP group takes over the connections of another."""
    config = directory / "xlb.toml"
    config.write_text((HERE / "ha-examples" / "xlb.toml").read_text())
    return config


class Lab:
    """The seed lab (lab.sh), or another topology built by a script with the same
    commands (ha-pair.sh, ha-ecmp.sh)."""

    def __init__(self, prefix: str, script: str = "lab.sh"):
        self.prefix = prefix
        self.script = HERE / script
        self.env = {**os.environ, "XLB_LAB": prefix}

    def ns(self, node: str) -> str:
        return f"{self.prefix}-{node}"

    def _lab(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(self.script), *args], env=self.env,
                              check=check, capture_output=True, text=True, timeout=120)

    def up(self) -> None:
        self._lab("up")

    def down(self) -> None:
        self._lab("down", check=False)

    def server(self, action: str, node: str) -> None:
        self._lab("server", action, node)

    def _in(self, node: str, user: str | None) -> list[str]:
        """The command prefix that runs in node, as user (a uid) if given."""
        prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user else []
        return ["ip", "netns", "exec", self.ns(node), *prefix]

    def run(self, node: str, *cmd: str, check: bool = False, timeout: float = 60,
            user: str | None = None) -> subprocess.CompletedProcess:
        r = subprocess.run([*self._in(node, user), *cmd],
                           capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            # The command's own words, which CalledProcessError alone leaves out.
            raise AssertionError(f"{' '.join(cmd)} in {node}: exit {r.returncode}: "
                                 f"{r.stderr.strip()[-2000:]}")
        return r

    def mac(self, node: str, dev: str) -> str:
        """The MAC address of node's link dev."""
        out = self.run(node, "ip", "-j", "link", "show", dev, check=True).stdout
        return json.loads(out)[0]["address"]

    def spawn(self, node: str, *cmd: str, user: str | None = None,
              stdin: int | None = None) -> subprocess.Popen:
        """A background command in node; the caller ends it (lab.sh down also does)."""
        return subprocess.Popen([*self._in(node, user), *cmd], stdin=stdin,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def web_server(self, node: str, name: str, port: int, *args: str,
                   kind: str = "web") -> subprocess.Popen:
        """One more lab server (servers.py KIND), listening when this returns."""
        return self.listening(node, port, PY, str(HERE / "servers.py"), kind, "--name", name,
                              "--port", str(port), *args)

    def listening(self, node: str, port: int, *cmd: str) -> subprocess.Popen:
        """spawn(node, *cmd), returned once something listens on node's TCP `port`."""
        proc = self.spawn(node, *cmd)
        for _ in range(100):
            probe = self.run(node, "bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}")
            if probe.returncode == 0:
                return proc
            time.sleep(0.05)
        proc.kill()
        raise RuntimeError(f"{cmd} did not listen on {node}:{port}")

    def hold(self, *args: str) -> tuple[subprocess.Popen, str]:
        """A keep-alive connection from client to the VIP making requests in the
        background (clients.py hold ARGS), once its first answer is in: the
        process (its stdout: a JSON line a request; its stdin a pipe, which
        --step reads) and that first answer."""
        proc = self.spawn("client", PY, str(HERE / "clients.py"), "hold", VIP, "80", *args,
                          stdin=subprocess.PIPE)
        return proc, json.loads(proc.stdout.readline())["name"]

    def client(self, node: str, *args: str, timeout: float = 120) -> dict:
        out = self.run(node, PY, str(HERE / "clients.py"), *args, check=True, timeout=timeout)
        return json.loads(out.stdout)

    def xlb_cmd(self, *args: str, node: str = "lb", **kw) -> subprocess.CompletedProcess:
        return self.run(node, str(XLB), *args, **kw)

    def status(self, node: str = "lb") -> dict:
        return json.loads(self.xlb_cmd("status", "--json", node=node, check=True).stdout)

    def xdp_attached(self, node: str) -> list[str]:
        """Names of the links in node's namespace that have an XDP program."""
        out = subprocess.run(["ip", "-n", self.ns(node), "-o", "link", "show"],
                             capture_output=True, text=True, check=True).stdout
        return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()
                if " xdp" in line or "prog/xdp" in line]

    def xlb(self, *args: str, node: str = "lb", env: dict[str, str] | None = None) -> "Xlb":
        return Xlb(self, node, args, env or {})

    def xlb_seed(self, directory: Path) -> "Xlb":
        """`xlb up --config` a copy of seed.toml in directory (a test may edit it)."""
        config = directory / "xlb.toml"
        shutil.copy(HERE / "seed.toml", config)
        return self.xlb("--config", str(config))


class Xlb:
    """`xlb up` running in the background of a lab node, as a context manager:
    started on enter (returns once it prints its serving line), SIGTERM on exit."""

    START_TIMEOUT = 60  # compiling the program takes a few seconds

    def __init__(self, lab: Lab, node: str, args: tuple[str, ...], env: dict[str, str]):
        self.lab, self.node, self.args = lab, node, args
        self.env = [f"{k}={v}" for k, v in env.items()]
        self.proc: subprocess.Popen | None = None
        self.serving_line = ""
        self.stderr = ""
        self.stdout_rest = ""

    def __enter__(self) -> "Xlb":
        # The log goes to a file: a pipe read only at the stop fills (64 KiB,
        # some 500 applies' lines) and blocks xlb up in write(2).
        self._log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.lab.ns(self.node), "env", *self.env, str(XLB), "up",
             *self.args],
            stdout=subprocess.PIPE, stderr=self._log, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], self.START_TIMEOUT)
        line = self.proc.stdout.readline() if ready else ""
        if "serving" not in line:
            self.stop()
            raise RuntimeError(f"xlb up did not serve: {line}{self.stderr}")
        self.serving_line = line.strip()
        return self

    def logged(self) -> str:
        """What xlb up has logged so far: read where it is, not moving the
        offset it writes at."""
        fd = self._log.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if not self._log.closed:          # the first stop reads what it said
            self._log.seek(0)
            self.stderr = self._log.read()
            self._log.close()
            self.stdout_rest = self.proc.stdout.read()
        return self.proc.returncode

    def __exit__(self, exc_type, *exc) -> None:
        running = self.proc is not None and self.proc.poll() is None
        code = self.stop()
        # The stop this exit asks for must be clean: one that failed (a
        # traceback, XDP left attached) showed only in the next test, if any.
        if running and exc_type is None and (code != 0 or "Traceback" in self.stderr):
            raise AssertionError(f"xlb up did not stop cleanly on SIGTERM (exit {code}): "
                                 f"{self.stdout_rest}{self.stderr[-3000:]}")
