"""A private network namespace with known routes and neighbours, for running
the XDP program under BPF_PROG_TEST_RUN: bpf_fib_lookup then sees these, not
the host's. Used by the data-plane tests (tests/conftest.py) and the
benchmark (netns-lab/bench_xdp.py). It adds nothing to any other namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess

CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


class FibNet:
    """The namespace, which the calling thread enters with `entered`. Links (veth pairs, both ends here):
    ext 10.1.1.1/24 (clients), int 10.1.11.1/24 (backends), small 10.1.13.1/24
    with MTU 1280, nofwd 10.1.14.1/24 with forwarding off; 198.51.100.0/24 via
    10.1.1.2, which has no neighbour entry; 203.0.113.0/24 is a blackhole,
    192.0.2.128/26 unreachable, 192.0.2.192/26 prohibited, and the rest of
    192.0.2.0/24 has no route."""

    MACS = {"ext": "02:00:00:00:01:01", "int": "02:00:00:00:01:02",
            "small": "02:00:00:00:01:03", "nofwd": "02:00:00:00:01:04"}

    def __init__(self, name: str):
        self.name = name
        self.ifindex: dict[str, int] = {}

    def sh(self, *cmd: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.name, *cmd], check=True,
                       capture_output=True, text=True)

    def build(self, neighbours: dict[str, tuple[str, str]]) -> None:
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.sh("sysctl", "-qw", "net.ipv4.conf.all.forwarding=1")
        addrs = {"ext": "10.1.1.1/24", "int": "10.1.11.1/24", "small": "10.1.13.1/24",
                 "nofwd": "10.1.14.1/24"}
        for dev, addr in addrs.items():
            self.ifindex[dev] = self.add_veth(dev, self.MACS[dev])
            self.sh("ip", "addr", "add", addr, "dev", dev)
        self.sh("ip", "link", "set", "small", "mtu", "1280")
        self.sh("sysctl", "-qw", "net.ipv4.conf.nofwd.forwarding=0")
        self.sh("ip", "route", "add", "198.51.100.0/24", "via", "10.1.1.2")
        self.sh("ip", "route", "add", "blackhole", "203.0.113.0/24")
        self.sh("ip", "route", "add", "unreachable", "192.0.2.128/26")
        self.sh("ip", "route", "add", "prohibit", "192.0.2.192/26")
        for addr, (mac, dev) in neighbours.items():
            self.sh("ip", "neigh", "replace", addr, "lladdr", mac, "dev", dev, "nud", "permanent")

    def add_veth(self, name: str, mac: str | None = None) -> int:
        """A new veth pair, name and name-peer, both up and without addresses
        (name with this MAC, if given): name's ifindex."""
        self.sh("ip", "link", "add", name, *(("address", mac) if mac else ()), "type", "veth",
                "peer", "name", f"{name}-peer")
        self.sh("ip", "link", "set", f"{name}-peer", "up")
        self.sh("ip", "link", "set", name, "up")
        out = subprocess.run(["ip", "-n", self.name, "-j", "link", "show", name], check=True,
                             capture_output=True, text=True).stdout
        return json.loads(out)[0]["ifindex"]

    def as_native(self, datapath) -> None:
        """Lets datapath's fast path send out of every link here (Datapath.set_tx_link)
        as out of the links it runs on natively: its test-runs attach it to none."""
        for index in self.ifindex.values():
            datapath.set_tx_link(index, "native")

    def remove(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    @contextlib.contextmanager
    def entered(self, neighbours: dict[str, tuple[str, str]]):
        """Built, with this thread inside it; left and removed afterwards."""
        self.remove()
        home = os.open("/proc/self/ns/net", os.O_RDONLY)
        try:
            self.build(neighbours)
            target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
            try:
                _setns(target)
            finally:
                os.close(target)
            yield self
        finally:
            _setns(home)
            os.close(home)
            self.remove()
