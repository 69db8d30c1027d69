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
import time
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from bcc import BPF
from bcc.libbcc import lib

from . import bpfsys, flowtable, layout
from .layout import BPF_DIR, MAPS


class DatapathError(Exception):
    """A problem loading, attaching or driving the XDP program, in one line."""


DEFAULT_CONNECTIONS = 131072


@dataclass(frozen=True)
class Limits:
    """Map sizes, passed to the C as -D flags: the one place they are set."""
    max_services: int = 256
    max_backends: int = 16384
    ring_size: int = 1024
    max_flows: int = 2 * DEFAULT_CONNECTIONS    # established table: two entries a connection
    max_new_flows: int = 65536                  # half-open table, apart so floods evict only it
    max_arp: int = 256
    max_maglev: int = 16                        # Maglev frontends (two tables each)
    maglev_size: int = 65537                    # slots of a Maglev table, at most
    max_hops: int = 65536                       # next hops the fast path keeps resolved

    @classmethod
    def for_connections(cls, connections: int) -> "Limits":
        """Limits whose established table holds `connections` connections; the
        half-open table gets a quarter of its entries (at least 1,024)."""
        if connections < 1:
            raise ValueError("the flow table needs room for at least one connection")
        return cls(max_flows=2 * connections, max_new_flows=max(1024, connections // 2))

    @property
    def connections(self) -> int:
        return self.max_flows // 2

    def cflags(self) -> list[str]:
        return [f"-DXLB_MAX_SERVICES={self.max_services}",
                f"-DXLB_MAX_BACKENDS={self.max_backends}",
                f"-DXLB_RING_SIZE={self.ring_size}",
                f"-DXLB_MAX_FLOWS={self.max_flows}",
                f"-DXLB_MAX_NEW_FLOWS={self.max_new_flows}",
                f"-DXLB_MAX_ARP={self.max_arp}",
                f"-DXLB_MAX_MAGLEV={self.max_maglev}",
                f"-DXLB_MAGLEV_SIZE={self.maglev_size}",
                f"-DXLB_MAX_HOPS={self.max_hops}"]


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


def filter_slot(value: int) -> int:
    """bpf/hash.h xlb_filter_slot: the bit of a u32 in an address filter."""
    return ((value * 0x9e3779b1) & 0xffffffff) >> layout.FILTER_SHIFT


def _set_bit(words, value: int) -> None:
    slot = filter_slot(value)
    words[slot >> 6] |= 1 << (slot & 63)


def now_ns() -> int:
    """The clock of the program's bpf_ktime_get_coarse_ns (CLOCK_MONOTONIC)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


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
        """closed: the backend takes no new flows (a SYN on one of its flows is rebalanced).
        Its replies are recognised from then on: a backend's bit in the address
        filter is never cleared, since flows to it may outlive its removal."""
        flags = layout.BACKEND_NO_NEW_FLOWS if closed else 0
        self._update_config(lambda c: _set_bit(c.backend_bits,
                                               (_be32(addr) + (_be16(port) << 16)) & 0xffffffff))
        self._maps["backends"][ct.c_int(backend_id)] = \
            layout.Backend(_be32(addr), _be16(port), flags)

    def write_ring(self, ring: int, backend_ids: list[int]) -> None:
        if len(backend_ids) > self.limits.ring_size:
            raise DatapathError(f"ring of {len(backend_ids)} slots exceeds {self.limits.ring_size}")
        self._write_slots("rings", ring * self.limits.ring_size, backend_ids)

    def write_maglev(self, table: int, backend_ids: list[int]) -> None:
        """Fills Maglev table `table` (0 <= table < 2 * max_maglev) with a pool's table."""
        lim = self.limits
        if not 0 <= table < 2 * lim.max_maglev:
            raise DatapathError(f"Maglev table {table} out of range (0-{2 * lim.max_maglev - 1})")
        if len(backend_ids) > lim.maglev_size:
            raise DatapathError(f"Maglev table of {len(backend_ids)} slots exceeds "
                                f"{lim.maglev_size}")
        self._write_slots("maglev", table * lim.maglev_size, backend_ids)

    def _write_slots(self, name: str, base: int, backend_ids: list[int]) -> None:
        n = len(backend_ids)
        if n:
            keys = (ct.c_int * n)(*range(base, base + n))
            self._maps[name].items_update_batch(keys, (ct.c_uint32 * n)(*backend_ids))

    def set_service(self, vip: IPv4Address, port: int, proto: int, service_id: int,
                    ring: int, ring_len: int, flags: int = 0) -> None:
        """flags: layout.SERVICE_MAGLEV makes `ring` a Maglev table."""
        self._maps["services"][self._service_key(vip, port, proto)] = \
            layout.Service(service_id, ring, ring_len, flags)

    def set_timeouts(self, service_id: int, syn: int, established: int, closing: int,
                     udp: int) -> None:
        """Idle seconds of a service's flows by state (0: never)."""
        self._maps["timeouts"][ct.c_int(service_id)] = \
            layout.Timeouts(syn, established, closing, udp)

    def del_service(self, vip: IPv4Address, port: int, proto: int) -> None:
        del self._maps["services"][self._service_key(vip, port, proto)]

    def set_vip(self, vip: IPv4Address) -> None:
        self._maps["vips"][ct.c_uint32(_be32(vip))] = ct.c_uint32(1)
        self._update_config(lambda c: _set_bit(c.vip_bits, _be32(vip)))

    def del_vip(self, vip: IPv4Address) -> None:
        del self._maps["vips"][ct.c_uint32(_be32(vip))]
        remaining = [k.value for k in self._maps["vips"].keys()]

        def rebuild(c):
            ct.memset(c.vip_bits, 0, ct.sizeof(c.vip_bits))
            for addr in remaining:
                _set_bit(c.vip_bits, addr)
        self._update_config(rebuild)

    def set_forwarding(self, fast: bool) -> None:
        """fast: rewritten packets go out by bpf_fib_lookup and XDP_TX/REDIRECT;
        otherwise the kernel routes them (XDP_PASS)."""
        def flag(c):
            c.flags = (c.flags | layout.CONFIG_FAST_PATH) if fast \
                else (c.flags & ~layout.CONFIG_FAST_PATH)
        self._update_config(flag)

    @property
    def fast_path(self) -> bool:
        return bool(self._config().flags & layout.CONFIG_FAST_PATH)

    def _config(self) -> layout.Config:
        return self._maps["config"][ct.c_int(0)]

    def _update_config(self, change) -> None:
        """Read, change, write back the one config entry: it lives in the kernel,
        so a Datapath that adopted the maps sees what the last one wrote."""
        c = self._config()
        before = bytes(c)
        change(c)
        if bytes(c) != before:
            self._maps["config"][ct.c_int(0)] = c

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

    def flow_counters(self) -> layout.FlowCounters:
        """Connections the program moved in and out of the flow tables."""
        return self._percpu_sum("flow_stats", 0)

    def flow_rows(self) -> dict[str, list[flowtable.Row]]:
        """Every entry of both flow tables (flows, flows_new), read in batches."""
        return {name: flowtable.decode(*self._dump(name)) for name in flowtable.TABLES}

    def flow_entries(self) -> int:
        """Entries in both flow tables (two per connection: forward and reply)."""
        return sum(len(rows) for rows in self.flow_rows().values())

    def flow_census(self, now: int | None = None) -> flowtable.Census:
        return flowtable.census(self.flow_rows(), now_ns() if now is None else now)

    def delete_flows(self, backend_ids: set[int], service_ids: set[int]) -> dict[str, int]:
        """Forgets the connections of these backends and services, both ways, so
        that their next packets are balanced anew. Returns how many, per table."""
        ended = {}
        for name, rows in self.flow_rows().items():
            doomed = [r for r in rows
                      if r.backend_id in backend_ids or r.service_id in service_ids]
            self._delete(name, [r.key() for r in doomed])
            ended[name] = sum(r.dir == layout.FLOW_FORWARD for r in doomed)
        return ended

    def expire_flows(self, now: int | None = None) -> dict[str, int]:
        """Removes the connections idle past their timeout; returns how many, per table."""
        now = now_ns() if now is None else now
        expired = {}
        for name, rows in self.flow_rows().items():
            keys, expired[name] = flowtable.dead(rows, now)
            self._delete(name, keys)
        return expired

    def _dump(self, name: str) -> tuple[bytes, bytes]:
        """All keys and values of a hash map, concatenated, in BPF_MAP_LOOKUP_BATCH
        calls of up to 64k entries (the batch token of a hash map is a u32 bucket)."""
        table = self._maps[name]
        ksize, vsize = ct.sizeof(table.Key), ct.sizeof(table.Leaf)
        chunk = min(table.max_entries, 65536)
        kbuf, vbuf = ct.create_string_buffer(ksize * chunk), ct.create_string_buffer(vsize * chunk)
        token_in, token_out = ct.c_uint32(0), ct.c_uint32(0)
        keys, values, first = [], [], True
        while True:
            count = ct.c_uint32(chunk)
            rc = lib.bpf_lookup_batch(table.map_fd, None if first else ct.byref(token_in),
                                      ct.byref(token_out), kbuf, vbuf, ct.byref(count))
            err = ct.get_errno()
            keys.append(kbuf.raw[:count.value * ksize])
            values.append(vbuf.raw[:count.value * vsize])
            if rc != 0:
                if err == errno.ENOENT:
                    return b"".join(keys), b"".join(values)
                raise DatapathError(f"cannot read {name}: {os.strerror(err)}")
            token_in.value, first = token_out.value, False

    def _delete(self, name: str, keys: list[bytes]) -> None:
        if keys:
            table = self._maps[name]
            batch = (table.Key * len(keys)).from_buffer_copy(b"".join(keys))
            try:
                table.items_delete_batch(batch)
            except Exception:  # an entry the LRU evicted meanwhile: delete one by one
                for key in batch:
                    table.pop(key, None)

    def map_memory(self) -> dict[str, int]:
        """Bytes of locked kernel memory each map holds, as the kernel reports them."""
        sizes = {}
        for name, table in self._maps.items():
            info = Path(f"/proc/self/fdinfo/{table.map_fd}").read_text()
            sizes[name] = int(re.search(r"^memlock:\s+(\d+)", info, re.M).group(1))
        return sizes

    def _percpu_sum(self, name: str, index: int):
        table = self._maps[name]
        return _sum_percpu(table[ct.c_int(index)], table.sLeaf)

    # Testing without a network ------------------------------------------------

    def test_run(self, frame: bytes, ingress_ifindex: int = 0) -> bpfsys.TestRunResult:
        return bpfsys.prog_test_run(self._prog.fd, frame, ingress_ifindex)
