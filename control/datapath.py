"""The only code that touches the XDP program: compile and load it with bcc,
attach and detach it, write its maps and read its counters.

The rest of the control plane talks to a `Datapath` in plain Python values
(ipaddress objects, ints); byte order and ctypes stay in here.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import re
import socket
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from bcc import BPF
from bcc.libbcc import lib

from . import bpfsys, layout
from .layout import BPF_DIR, MAPS


class DatapathError(Exception):
    """A problem loading, attaching or driving the XDP program, in one line."""


@dataclass(frozen=True)
class Limits:
    """Map sizes, passed to the C as -D flags: the one place they are set."""
    max_services: int = 256
    max_backends: int = 16384
    ring_size: int = 1024
    max_flows: int = 262144
    max_arp: int = 256

    def cflags(self) -> list[str]:
        return [f"-DXLB_MAX_SERVICES={self.max_services}",
                f"-DXLB_MAX_BACKENDS={self.max_backends}",
                f"-DXLB_RING_SIZE={self.ring_size}",
                f"-DXLB_MAX_FLOWS={self.max_flows}",
                f"-DXLB_MAX_ARP={self.max_arp}"]


@dataclass(frozen=True)
class Attachment:
    ifindex: int
    ifname: str
    mode: str       # "native" or "generic"
    note: str = ""  # why native was refused, when generic


def _be32(addr: IPv4Address) -> int:
    """An IPv4 address as the u32 the C reads from the packet (network order)."""
    return int.from_bytes(addr.packed, "little")


def _be16(port: int) -> int:
    return socket.htons(port)


def _sum_percpu(values, ctype):
    total = ctype()
    for name, _ in ctype._fields_:
        setattr(total, name, sum(getattr(v, name) for v in values))
    return total


class Datapath:
    """One loaded instance of bpf/xlb.c and its maps."""

    def __init__(self, limits: Limits = Limits()):
        self.limits = limits
        self._links: dict[int, tuple[int, Attachment]] = {}
        try:
            # bcc 0.26 wants bytes for names and paths (str works, with a warning).
            self._bpf = BPF(src_file=str(BPF_DIR / "xlb.c").encode(),
                            cflags=[f"-I{BPF_DIR}", "-w", *limits.cflags()])
            self._prog = self._bpf.load_func(b"xlb_xdp", BPF.XDP)
        except Exception as e:  # bcc raises bare Exception; it has printed the details
            raise DatapathError(f"cannot load the XDP program: {e}") from None
        self._maps = {name: self._bpf[name.encode()] for name in MAPS}
        problems = [p for name, t in self._maps.items()
                    for p in layout.check_mirror(name, t.Key, getattr(t, "sLeaf", t.Leaf))]
        if problems:
            self.close()
            raise DatapathError("control/layout.py does not match bpf/xlb_shared.h: "
                                + "; ".join(problems))

    @property
    def prog_fd(self) -> int:
        return self._prog.fd

    # Attachments --------------------------------------------------------------

    def attach(self, ifindex: int, ifname: str) -> Attachment:
        """Attaches natively, or generically where the driver refuses native XDP.
        Through a BPF link: it detaches when this process ends, however it ends."""
        try:
            fd, att = bpfsys.xdp_link_create(self._prog.fd, ifindex, generic=False), None
        except OSError as e:
            if e.errno in (errno.EBUSY, errno.EEXIST):
                raise DatapathError(f"{ifname}: another XDP program is attached already") from None
            try:
                fd = bpfsys.xdp_link_create(self._prog.fd, ifindex, generic=True)
            except OSError as e2:
                raise DatapathError(f"{ifname}: cannot attach XDP: {e2.strerror}") from None
            att = Attachment(ifindex, ifname, "generic", e.strerror)
        att = att or Attachment(ifindex, ifname, "native")
        self._links[ifindex] = (fd, att)
        return att

    def attachments(self) -> list[Attachment]:
        return [att for _, att in self._links.values()]

    def detach(self, ifindex: int) -> None:
        fd, _ = self._links.pop(ifindex)
        os.close(fd)

    def detach_all(self) -> None:
        for fd, _ in self._links.values():
            os.close(fd)
        self._links.clear()

    def close(self) -> None:
        self.detach_all()
        self._bpf.cleanup()

    # Map writes ---------------------------------------------------------------

    def set_backend(self, backend_id: int, addr: IPv4Address, port: int,
                    closed: bool = False) -> None:
        """closed: the backend takes no new flows (a SYN on one of its flows is rebalanced)."""
        flags = layout.BACKEND_NO_NEW_FLOWS if closed else 0
        self._maps["backends"][ct.c_int(backend_id)] = \
            layout.Backend(_be32(addr), _be16(port), flags)

    def write_ring(self, ring: int, backend_ids: list[int]) -> None:
        if len(backend_ids) > self.limits.ring_size:
            raise DatapathError(f"ring of {len(backend_ids)} slots exceeds {self.limits.ring_size}")
        if not backend_ids:
            return
        base = ring * self.limits.ring_size
        n = len(backend_ids)
        keys = (ct.c_int * n)(*range(base, base + n))
        self._maps["rings"].items_update_batch(keys, (ct.c_uint32 * n)(*backend_ids))

    def set_service(self, vip: IPv4Address, port: int, proto: int,
                    service_id: int, ring: int, ring_len: int) -> None:
        self._maps["services"][self._service_key(vip, port, proto)] = \
            layout.Service(service_id, ring, ring_len, 0)

    def del_service(self, vip: IPv4Address, port: int, proto: int) -> None:
        del self._maps["services"][self._service_key(vip, port, proto)]

    def set_vip(self, vip: IPv4Address) -> None:
        self._maps["vips"][ct.c_uint32(_be32(vip))] = ct.c_uint32(1)

    def del_vip(self, vip: IPv4Address) -> None:
        del self._maps["vips"][ct.c_uint32(_be32(vip))]

    def set_arp(self, ifindex: int, vip: IPv4Address, mac: bytes) -> None:
        self._maps["arp_vips"][layout.ArpKey(ifindex, _be32(vip))] = \
            layout.ArpMac((ct.c_uint8 * 6)(*mac), 0)

    def del_arp(self, ifindex: int, vip: IPv4Address) -> None:
        del self._maps["arp_vips"][layout.ArpKey(ifindex, _be32(vip))]

    @staticmethod
    def _service_key(vip: IPv4Address, port: int, proto: int) -> layout.ServiceKey:
        return layout.ServiceKey(_be32(vip), _be16(port), proto, 0)

    # Reads --------------------------------------------------------------------

    def service_counters(self, service_id: int) -> layout.Counters:
        return self._percpu_sum("service_stats", service_id)

    def backend_counters(self, backend_id: int) -> layout.Counters:
        return self._percpu_sum("backend_stats", backend_id)

    def backend_counters_many(self, ids: set[int]) -> dict[int, dict[str, int]]:
        """The counters of these backends, from one batched read of the whole map."""
        table = self._maps["backend_stats"]
        fields = [name for name, _ in layout.Counters._fields_]
        nf, ncpu = len(fields), table.total_cpu
        words = self._read_array(table)             # [key][cpu][field], all u64
        stride = nf * ncpu
        totals = []                                  # [field][key], summed over CPUs
        for f in range(nf):
            columns = [words[c * nf + f::stride] for c in range(ncpu)]
            totals.append(list(map(sum, zip(*columns))))
        return {i: {name: totals[f][i] for f, name in enumerate(fields)} for i in ids}

    @staticmethod
    def _read_array(table) -> list[int]:
        """Every value of an array map, as its u64 words, in one BPF_MAP_LOOKUP_BATCH."""
        n = table.max_entries
        keys, values = (table.Key * n)(), (table.Leaf * n)()
        count, out_batch = ct.c_uint32(n), ct.c_uint32(0)
        if lib.bpf_lookup_batch(table.map_fd, None, ct.byref(out_batch), keys, values,
                                ct.byref(count)) != 0 and ct.get_errno() != errno.ENOENT:
            raise DatapathError(f"cannot read the counters: {os.strerror(ct.get_errno())}")
        return memoryview(values).cast("B").cast("Q").tolist()

    def reason_counters(self) -> dict[str, layout.Tally]:
        return {name: self._percpu_sum("reason_stats", i)
                for i, name in enumerate(layout.REASON_NAMES)}

    def flow_entries(self) -> int:
        """Entries in the flow table (two per connection: forward and reply)."""
        return self.flow_table()[0]

    def flow_table(self) -> tuple[int, dict[int, int]]:
        """Entries in the flow table, and connections by backend id."""
        entries, per_backend = 0, {}
        for _, flow in self._flow_items():
            entries += 1
            if flow.dir == layout.FLOW_FORWARD:
                per_backend[flow.backend_id] = per_backend.get(flow.backend_id, 0) + 1
        return entries, per_backend

    def delete_flows(self, backend_ids: set[int], service_ids: set[int]) -> int:
        """Forgets the connections of these backends and services, both ways, so
        that their next packets are balanced anew. Returns how many."""
        doomed = [key for key, flow in self._flow_items()
                  if flow.backend_id in backend_ids or flow.service_id in service_ids]
        if doomed:
            keys = (self._maps["flows"].Key * len(doomed))(*doomed)
            self._maps["flows"].items_delete_batch(keys)
        return len(doomed) // 2

    def map_memory(self) -> dict[str, int]:
        """Bytes of locked kernel memory each map holds, as the kernel reports them."""
        sizes = {}
        for name, table in self._maps.items():
            info = Path(f"/proc/self/fdinfo/{table.map_fd}").read_text()
            sizes[name] = int(re.search(r"^memlock:\s+(\d+)", info, re.M).group(1))
        return sizes

    def _flow_items(self):
        # One syscall per batch instead of two per entry; an empty map yields nothing.
        try:
            yield from self._maps["flows"].items_lookup_batch()
        except Exception as e:  # bcc raises bare Exception for a failed batch
            raise DatapathError(f"cannot read the flow table: {e}") from None

    def _percpu_sum(self, name: str, index: int):
        table = self._maps[name]
        return _sum_percpu(table[ct.c_int(index)], table.sLeaf)

    # Testing without a network ------------------------------------------------

    def test_run(self, frame: bytes, ingress_ifindex: int = 0) -> bpfsys.TestRunResult:
        return bpfsys.prog_test_run(self._prog.fd, frame, ingress_ifindex)
