"""The only code that touches the XDP program: compile and load it with bcc,
attach and detach it, write its maps and read its counters.

The rest of the control plane talks to a `Datapath` in plain Python values
(ipaddress objects, ints); byte order and ctypes stay in here.
"""

from __future__ import annotations

import ctypes as ct
import errno
import functools
import gzip
import os
import re
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Address
from pathlib import Path

from bcc import BPF
from bcc.libbcc import lib
from bcc.utils import get_possible_cpus

from . import bpfsys, flowtable, layout, model, netif
from .layout import BPF_DIR, MAPS


class DatapathError(Exception):
    """A problem loading, attaching or driving the XDP program, in one line."""


DEFAULT_CONNECTIONS = 131072
# A kernel hash map holds at most 2^27 entries (its array of 16-byte buckets,
# one a power of two above the entries, stays under 4 GiB); two a connection.
MAX_CONNECTIONS = 2**26
HTAB_ELEM = 48      # bytes the kernel adds to each hash map entry (struct htab_elem, 64-bit)
BPF_NOEXIST = 1     # bpf_map_update_elem: only a key that is not there (uapi/linux/bpf.h)
DELETE_CHUNK = 1024  # connections checked, then deleted, and counted (Datapath._end, _reap)
# Connections a test-run of xlb_reap takes (bpf/xlb.c): its frame, a head and
# two entries a connection (layout.ReapHead, ReapEntry), fits in the 3,520 bytes
# that BPF_PROG_TEST_RUN gives an XDP frame of one buffer (a page, less the
# headroom and struct skb_shared_info). 36 of today's 48-byte entries.
REAP_CONNECTIONS = (3520 - ct.sizeof(layout.ReapHead)) // (2 * ct.sizeof(layout.ReapEntry))


@dataclass(frozen=True)
class Limits:
    """Map sizes, passed to the C as -D flags: the one place they are set (the
    defaults a config is checked against are model's)."""
    max_services: int = model.MAX_FRONTENDS
    max_backends: int = model.MAX_BACKENDS
    ring_size: int = model.RING_SIZE
    max_flows: int = 2 * DEFAULT_CONNECTIONS    # established table: two entries a connection
    max_new_flows: int = 65536                  # half-open table, apart so floods evict only it
    max_arp: int = model.MAX_ARP
    max_maglev: int = model.MAX_MAGLEV_FRONTENDS    # two tables each
    maglev_size: int = model.MAGLEV_SIZE_MAX        # slots of a Maglev table, at most
    max_hops: int = 16384                       # next-hop cache slots per CPU (a power of 2)
    max_frags: int = 8192                       # fragmented datagrams in flight
    max_tx_links: int = model.MAX_LINKS

    @classmethod
    def for_connections(cls, connections: int) -> "Limits":
        """Limits whose established table holds `connections` connections; the
        half-open table gets a quarter of its entries (at least 1,024)."""
        if connections < 1:
            raise ValueError("the flow table needs room for at least one connection")
        if connections > MAX_CONNECTIONS:
            raise ValueError(f"{connections} connections: the kernel's hash maps hold at most "
                             f"{MAX_CONNECTIONS} (two entries each)")
        return cls(max_flows=2 * connections, max_new_flows=max(1024, connections // 2))

    def flow_table_bytes(self) -> int:
        """The kernel memory the two flow tables take, as it counts them
        (htab_map_mem_usage): an LRU hash allocates every entry up front, and a
        bucket of 16 bytes for each power of two above the entries."""
        entry = HTAB_ELEM + _round8(ct.sizeof(layout.FlowKey)) + _round8(ct.sizeof(layout.Flow))
        return sum(n * entry + 16 * (1 << (n - 1).bit_length())
                   for n in (self.max_flows, self.max_new_flows))

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
                f"-DXLB_MAX_HOPS={self.max_hops}",
                f"-DXLB_MAX_FRAGS={self.max_frags}",
                f"-DXLB_MAX_TX_LINKS={self.max_tx_links}"]


def _round8(n: int) -> int:
    return (n + 7) // 8 * 8


_PERCPU_TYPES = {5, 6, 10}    # BPF_MAP_TYPE_PERCPU_HASH, _PERCPU_ARRAY, _LRU_PERCPU_HASH

# bcc 0.26's Python bindings lack these (libbcc has them).
for _fn, _args, _ret in (("bpf_num_tables", [ct.c_void_p], ct.c_size_t),
                         ("bpf_table_name", [ct.c_void_p, ct.c_size_t], ct.c_char_p),
                         ("bpf_table_key_size_id", [ct.c_void_p, ct.c_size_t], ct.c_size_t),
                         ("bpf_table_leaf_size_id", [ct.c_void_p, ct.c_size_t], ct.c_size_t)):
    getattr(lib, _fn).argtypes, getattr(lib, _fn).restype = _args, _ret


@dataclass(frozen=True)
class Attachment:
    ifindex: int
    ifname: str
    mode: str       # "native" or "generic"
    note: str = ""  # why native was refused, when generic
    state: str = "up"   # netif.LINK_STATES


def _be32(addr: IPv4Address) -> int:
    """An IPv4 address as the u32 the C reads from the packet (network order)."""
    return int.from_bytes(addr.packed, "little")


def _addr(be32: int) -> IPv4Address:
    return IPv4Address(be32.to_bytes(4, "little"))


def _be16(port: int) -> int:
    return socket.htons(port)


def filter_slot(value: int) -> int:
    """bpf/hash.h xlb_filter_slot: the bit of a u32 in an address filter."""
    return ((value * 0x9e3779b1) & 0xffffffff) >> layout.FILTER_SHIFT


def _set_bit(words, value: int) -> None:
    slot = filter_slot(value)
    words[slot >> 6] |= 1 << (slot & 63)


def _set_endpoint_bit(words, be32: int, be16: int) -> None:
    """A server's bit (address and port as the packet has them) in backend_bits."""
    _set_bit(words, (be32 + (be16 << 16)) & 0xffffffff)


@functools.cache
def kernel_hz() -> int:
    """The running kernel's CONFIG_HZ (ticks a second), from its build config:
    read once a process, not at every compile."""
    release = os.uname().release
    for path in (f"/boot/config-{release}", "/proc/config.gz"):
        try:
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt") as f:
                for line in f:
                    if line.startswith("CONFIG_HZ="):
                        return int(line.split("=", 1)[1])
        except OSError:
            continue
    raise DatapathError(f"cannot tell the kernel's HZ: no CONFIG_HZ in /boot/config-{release} "
                        "or /proc/config.gz")


def defines(limits: Limits) -> list[str]:
    """Every -D flag the C needs (bpf/consts.h): the limits, bpf/clock.h's
    tick in ns and the kernel's INITIAL_JIFFIES (jiffies start 300 s before
    wrapping 32 bits, to catch wrap bugs early), xlb_reap's frame size, and
    the checks of the frames' layout."""
    hz = kernel_hz()
    return [*limits.cflags(), f"-DXLB_TICK_NS={1_000_000_000 // hz}ULL",
            f"-DXLB_INITIAL_JIFFIES={(1 << 32) - 300 * hz}ULL",
            f"-DXLB_REAP_MAX={REAP_CONNECTIONS}", f"-DXLB_FRAME_MIRRORS={layout.frame_asserts()}"]


def _layout(info: bpfsys.MapInfo) -> tuple[int, int, int, int]:
    return info.type, info.key_size, info.value_size, info.max_entries


def _tables(bpf: BPF) -> dict[str, tuple[int, int, int, int]]:
    """Every table of a compiled program: type, key and value size, max entries."""
    m = bpf.module
    return {lib.bpf_table_name(m, i).decode(): (lib.bpf_table_type_id(m, i),
                                                lib.bpf_table_key_size_id(m, i),
                                                lib.bpf_table_leaf_size_id(m, i),
                                                lib.bpf_table_max_entries_id(m, i))
            for i in range(lib.bpf_num_tables(m))}


def _value_bytes(info: bpfsys.MapInfo) -> int:
    """Bytes of one value as a lookup returns it: a per-CPU map's holds one
    8-byte-aligned copy per possible CPU."""
    if info.type in _PERCPU_TYPES:
        return (info.value_size + 7) // 8 * 8 * len(get_possible_cpus())
    return info.value_size


def _copy_map(src: int, info: bpfsys.MapInfo, dst: int, max_entries: int) -> None:
    """Copies a map's entries into another of the same key and value (and as
    many as fit): a table that changed only its size keeps its contents."""
    key, nxt = ct.create_string_buffer(info.key_size), ct.create_string_buffer(info.key_size)
    value = ct.create_string_buffer(_value_bytes(info))
    first, copied = True, 0
    while copied < max_entries and lib.bpf_get_next_key(src, None if first else key, nxt) == 0:
        first = False
        ct.memmove(key, nxt, info.key_size)
        if lib.bpf_lookup_elem(src, key, value) == 0 and lib.bpf_update_elem(dst, key, value, 0) == 0:
            copied += 1


def _batches(name: str, fd: int, ksize: int, vsize: int, max_entries: int):
    """Each batch of a hash map's keys and values, concatenated, as
    BPF_MAP_LOOKUP_BATCH reads them: up to 64k entries a call (the batch token
    of a hash map is a u32 bucket)."""
    chunk = min(max_entries, 65536)
    kbuf, vbuf = ct.create_string_buffer(ksize * chunk), ct.create_string_buffer(vsize * chunk)
    token_in, token_out = ct.c_uint32(0), ct.c_uint32(0)
    first = True
    while True:
        count = ct.c_uint32(chunk)
        rc = lib.bpf_lookup_batch(fd, None if first else ct.byref(token_in),
                                  ct.byref(token_out), kbuf, vbuf, ct.byref(count))
        err = ct.get_errno()
        # Only what was read: .raw copies the whole buffer, 2.5 MB a call.
        yield ct.string_at(kbuf, count.value * ksize), ct.string_at(vbuf, count.value * vsize)
        if rc != 0:
            if err == errno.ENOENT:
                return
            raise DatapathError(f"cannot read {name}: {os.strerror(err)}")
        token_in.value, first = token_out.value, False


def _dump(name: str, fd: int, ksize: int, vsize: int, max_entries: int) -> tuple[bytes, bytes]:
    """All keys and values of a hash map, concatenated."""
    keys, values = zip(*_batches(name, fd, ksize, vsize, max_entries))
    return b"".join(keys), b"".join(values)


@dataclass(frozen=True)
class FlowLedger:
    """Datapath.flow_ledger: the census of the flow tables, and the program's
    and the control plane's counters as they were when it ended, with the
    LRU's evictions (control.evicted_*: the largest count derived so far)."""
    census: flowtable.Census
    program: layout.FlowCounters
    control: layout.ControlCounters

    def control_total(self, counter: str) -> int:
        """A control_stats counter of both tables: expired, ended or evicted."""
        return sum(getattr(self.control, f"{counter}_{table}") for table in flowtable.TABLES)


def _evictions(came: layout.FlowCounters, left: layout.FlowCounters,
               control: layout.ControlCounters, census: flowtable.Census) -> dict[str, int]:
    """The LRU's evictions from each table: what went in (came), less what
    the program and the control plane removed (left, control) and what is
    there (census)."""
    new_left_in_dp = left.new_removed                  # established + expired/reopened there
    est_left_in_dp = left.expired + left.reopened - (left.new_removed - left.established)
    return {
        "flows_new": came.created - new_left_in_dp - control.expired_flows_new
        - control.ended_flows_new - census.forward["flows_new"],
        "flows": came.established - est_left_in_dp - control.expired_flows
        - control.ended_flows - census.forward["flows"],
    }


def _sum_percpu(values, ctype):
    total = ctype()
    for name, _ in ctype._fields_:
        setattr(total, name, sum(getattr(v, name) for v in values))
    return total


PROG_NAME = "xlb_xdp"     # the entry function: bcc names the program after it
CLOCK_PROG = "xlb_clock"  # reads the program's clock (bpf/clock.h)
REAP_PROG = "xlb_reap"    # removes the dead connections that the sweep found
_NAME_LEN = 15            # the kernel keeps this many characters of a map's name
# The C sources to compile. XLB_BPF_DIR is a test-only hook: the upgrade test
# builds a changed program from a copy of bpf/.
_SOURCES = Path(os.environ.get("XLB_BPF_DIR", BPF_DIR))
_REUSE_HEADER = "adopt.h"


@dataclass
class Running:
    """An xlb data path found in this network namespace through the kernel's
    own objects: the XDP programs on its interfaces, and their maps by id."""
    info: bpfsys.ProgInfo                       # the newest program
    attached: dict[int, tuple[int, Attachment]]  # ifindex -> (program fd, attachment)
    maps: dict[str, tuple[int, bpfsys.MapInfo]]  # by table name -> (fd, info)

    def close(self) -> None:
        for fd in {fd for fd, _ in self.attached.values()} | {fd for fd, _ in self.maps.values()}:
            os.close(fd)

    def flow_entries(self) -> int:
        """Entries in its flow tables (two per connection)."""
        return sum(_count_entries(*self.maps[name]) for name in flowtable.TABLES
                   if name in self.maps)

    def limits(self) -> Limits:
        """The default Limits but for its flow table's size, kept."""
        if "flows" not in self.maps:
            return Limits()
        return Limits.for_connections(max(1, self.maps["flows"][1].max_entries // 2))

    @property
    def identity(self) -> int | None:
        """Datapath.identity of the data path these maps are."""
        return self.maps["config"][1].id if "config" in self.maps else None

    def detach(self) -> None:
        """Removes the programs from every interface (the maps go with the last fd)."""
        for ifindex, (fd, att) in self.attached.items():
            _detach(ifindex, fd, att.mode)


def find_running() -> Running | None:
    """The xlb data path attached in this network namespace, or None.

    Found without any file: the XDP program id netlink reports for each
    interface, the program by id (named after xlb's entry function), the maps
    by the ids the program holds. After a crash in the middle of an upgrade
    interfaces may run different programs; the newest one's maps are taken
    (they are the ones a finished upgrade would have used)."""
    attached, newest = {}, None
    for link in netif.links():
        if not link.xdp_prog_id:
            continue
        try:
            fd = bpfsys.prog_fd_by_id(link.xdp_prog_id)
        except OSError:                     # detached meanwhile
            continue
        info = bpfsys.prog_info(fd)
        if info.name != PROG_NAME:
            os.close(fd)
            continue
        attached[link.index] = (fd, Attachment(link.index, link.name, link.xdp_mode,
                                               state=link.state))
        if newest is None or info.id > newest.id:
            newest = info
    if newest is None:
        return None
    return Running(newest, attached, maps_of(newest))


def maps_of(program: bpfsys.ProgInfo) -> dict[str, tuple[int, bpfsys.MapInfo]]:
    """The maps of a program, opened by id, by table name."""
    maps = {}
    for map_id in program.map_ids:
        try:
            fd = bpfsys.map_fd_by_id(map_id)
        except OSError:
            continue
        info = bpfsys.map_info(fd)
        maps[_table_name(info.name)] = (fd, info)
    return maps


def _table_name(kernel_name: str) -> str:
    """The table a map was declared as: the kernel cuts names to 15 characters."""
    if len(kernel_name) == _NAME_LEN:
        full = [name for name in MAPS if name[:_NAME_LEN] == kernel_name]
        if len(full) == 1:
            return full[0]
    return kernel_name


def _count_entries(fd: int, info: bpfsys.MapInfo) -> int:
    """Entries of a hash map, read in batches."""
    return sum(len(keys) // info.key_size for keys, _ in
               _batches(info.name, fd, info.key_size, _value_bytes(info), info.max_entries))


def _detach(ifindex: int, fd: int, mode: str) -> None:
    """Removes program fd from ifindex, unless the interface is gone or runs
    another program by now."""
    try:
        netif.xdp_set(ifindex, -1, mode, expected_fd=fd)
    except OSError as e:
        if e.errno not in (errno.ENODEV, errno.EEXIST):
            raise DatapathError(f"ifindex {ifindex}: cannot detach XDP: {e.strerror}") from None


class Datapath:
    """One loaded instance of bpf/xlb.c and its maps.

    With `running`, the new program is built on the running one's maps (its
    flows, counters and services stay), and `attach` swaps it in for the old
    program in one step on each interface."""

    def __init__(self, limits: Limits = Limits(), running: Running | None = None):
        self.limits = limits
        # delete_flows and the sweep's put-back, one at a time: a reply entry
        # put back is never one of a connection that delete_flows ended. And
        # each deletion with its count, apart from flow_ledger's reading of
        # the counters: none is seen gone and not counted.
        self._mending = threading.RLock()
        cflags = [f"-I{_SOURCES}", "-w", *defines(limits)]
        # ifindex -> (fd of the program attached there, attachment): ours, or
        # the running one's until it is replaced.
        self._attached: dict[int, tuple[int, Attachment]] = {}
        self._replaced: dict[int, tuple[int, Attachment]] = {}   # until settle()
        self._running = running
        self.fresh_maps: list[str] = []     # running maps that could not be kept
        # Flow tables copied (another size), caught up around the swaps, and
        # the keys that did not fit (left out of the catch-up too).
        self._copied: dict[str, set[bytes]] = {}
        # Running maps whose contents this one holds (kept, or copied), and
        # those it could not keep (another layout): they started empty.
        self._kept: set[str] = set(running.maps) if running else set()
        self._emptied: set[str] = set()
        # (map, id) -> the per-CPU counters a change cleared: put back if it fails.
        self._cleared: dict[tuple[str, int], ct.Array] = {}
        try:
            if running is None:
                self._bpf = self._compile(cflags)
            else:
                self._attached = dict(running.attached)
                with bpfsys.private_bpffs() as pins:
                    self._bpf = self._compile_onto(running, pins, cflags)
            self._prog = self._bpf.load_func(PROG_NAME.encode(), BPF.XDP)
            self._clock = self._bpf.load_func(CLOCK_PROG.encode(), BPF.XDP)
            self._reaper = self._bpf.load_func(REAP_PROG.encode(), BPF.XDP)
        except DatapathError:
            raise
        except Exception as e:  # bcc raises bare Exception; it has printed the details
            raise DatapathError(f"cannot load the XDP program: {e}") from None
        self._maps = {name: self._bpf[name.encode()] for name in MAPS}
        problems = [p for name, t in self._maps.items()
                    for p in layout.check_mirror(name, t.Key, getattr(t, "sLeaf", t.Leaf))]
        if problems:
            self.close()
            raise DatapathError("control/layout.py does not match bpf/xlb_shared.h: "
                                + "; ".join(problems))
        try:
            bpfsys.prog_bind_map(self._prog.fd, self._maps["control_stats"].map_fd)
        except OSError as e:
            self.close()
            raise DatapathError(f"cannot bind control_stats to the program: {e.strerror}") \
                from None
        if self.emptied("config"):
            self._refill_filters()

    @staticmethod
    def _compile(cflags: list[str]) -> BPF:
        # bcc 0.26 wants bytes for names and paths (str works, with a warning).
        return BPF(src_file=str(_SOURCES / "xlb.c").encode(), cflags=cflags)

    def _compile_onto(self, running: Running, pins: str, cflags: list[str]) -> BPF:
        """Compiles the program so that each of its maps is the running map of
        the same name and layout: bcc reuses a map pinned at the path a table
        names (adopt.h gives every table one in `pins`) and creates and pins
        the others. A map whose layout changed (key, value, type, size) cannot
        be reused: it is unpinned, the program compiled again, and what can be
        copied is copied (same key and value, another size); the rest starts
        empty, and says so."""
        for name, (fd, _) in running.maps.items():
            bpfsys.obj_pin(fd, f"{pins}/{name}")
        cflags = [*cflags, "-include", str(_SOURCES / _REUSE_HEADER),
                  f'-DXLB_PIN_DIR="{pins}"']
        bpf = self._compile(cflags)
        changed = {name: info for name, (fd, info) in running.maps.items()
                   if name in _tables(bpf) and _tables(bpf)[name] != _layout(info)}
        if not changed:
            return bpf
        bpf.cleanup()
        for name in changed:
            os.unlink(f"{pins}/{name}")
        bpf = self._compile(cflags)
        tables = _tables(bpf)
        for name, info in changed.items():
            new = tables[name]
            fd = running.maps[name][0]
            if (new[0], new[1], new[2]) == (info.type, info.key_size, info.value_size):
                copied = f"{name} (copied: {info.max_entries} -> {new[3]} entries"
                if name in flowtable.TABLES:
                    left = self._copy_flows(name, fd, info, bpf, new[3])
                    copied += f"; {left} connections did not fit" if left else ""
                else:
                    _copy_map(fd, info, lib.bpf_table_fd(bpf.module, name.encode()), new[3])
                self.fresh_maps.append(copied + ")")
            else:
                self._kept.discard(name)
                self._emptied.add(name)
                self.fresh_maps.append(f"{name} (emptied: its layout changed)")
        return bpf

    def _copy_flows(self, name: str, fd: int, info: bpfsys.MapInfo, bpf: BPF,
                    max_entries: int) -> int:
        """Copies a running flow table into this program's, of max_entries:
        the connections that fit (flowtable.fitting). Returns how many did
        not; they are left out of the catch-up too (_catch_up)."""
        keys, values = _dump(name, fd, info.key_size, info.value_size, info.max_entries)
        places, left = flowtable.fitting(keys, values, max_entries)
        new_fd = lib.bpf_table_fd(bpf.module, name.encode())
        ksize, vsize = info.key_size, info.value_size
        for i in places:
            lib.bpf_update_elem(new_fd, ct.create_string_buffer(keys[i * ksize:(i + 1) * ksize]),
                                ct.create_string_buffer(values[i * vsize:(i + 1) * vsize]), 0)
        chosen = set(places)
        self._copied[name] = {k for i, k in enumerate(flowtable.key_list(keys)) if i not in chosen}
        return left

    def _refill_filters(self) -> None:
        """Sets the address filters of a config map that started empty from
        the maps kept: their VIPs, their backends and the servers of their
        connections (a removed server's may go on). The control plane sets a
        bit as it writes a VIP or backend, and an adoption writes none that it
        finds there already: without them the program passed the VIPs'
        packets, and the servers' replies, as none of its own."""
        vips = [k.value for k in self._maps["vips"].keys()]
        servers = {(b.addr, b.port) for b in self._read_values(self._maps["backends"])
                   if b.addr or b.port}
        for keys, values in self.flow_dumps().values():
            servers |= flowtable.servers(keys, values)

        def fill(c):
            for addr in vips:
                _set_bit(c.vip_bits, addr)
            for addr, port in servers:
                _set_endpoint_bit(c.backend_bits, addr, port)
        self._update_config(fill)

    def kept(self, name: str) -> bool:
        """Whether map `name` holds what the adopted data path's held."""
        return name in self._kept

    def emptied(self, name: str) -> bool:
        """Whether map `name` started empty where the adopted data path's held
        what this build could not keep (another layout)."""
        return name in self._emptied

    @property
    def prog_fd(self) -> int:
        return self._prog.fd

    @property
    def identity(self) -> int:
        """The id of its config map: the same for every program that adopts the
        maps (kept across restarts and upgrades), another for a fresh start."""
        return bpfsys.map_info(self._maps["config"].map_fd).id

    def program(self) -> dict:
        """The loaded program's id and tag (a hash of its code: a new build, a new tag)."""
        info = bpfsys.prog_info(self._prog.fd)
        return {"id": info.id, "tag": info.tag}

    # Attachments --------------------------------------------------------------

    def attach(self, ifindex: int, ifname: str) -> Attachment:
        """Attaches through netlink, so that the program outlives this process.
        Where the running program is attached, swaps it for this one in one
        step (in its mode); elsewhere natively, or generically where the driver
        refuses native XDP."""
        held = self._attached.get(ifindex)
        if held is not None and held[0] == self._prog.fd:
            if netif.xdp_prog_id(ifindex) == self.program()["id"]:
                return held[1]
            held = None     # removed or replaced by hand since: attached as anew
        if held is not None:
            old_fd, old = held
            if not self._replaced:      # the first swap
                self._catch_up()
            try:
                netif.xdp_set(ifindex, self._prog.fd, old.mode, expected_fd=old_fd)
            except OSError as e:
                raise DatapathError(f"{ifname}: cannot replace the running XDP program: "
                                    f"{e.strerror}") from None
            att = Attachment(ifindex, ifname, old.mode)
            self._replaced[ifindex] = held
        else:
            try:
                netif.xdp_set(ifindex, self._prog.fd, "native")
                att = Attachment(ifindex, ifname, "native")
            except OSError as e:
                if e.errno in (errno.EBUSY, errno.EEXIST):
                    raise DatapathError(f"{ifname}: another XDP program is attached "
                                        f"already") from None
                try:
                    netif.xdp_set(ifindex, self._prog.fd, "generic")
                except OSError as e2:
                    raise DatapathError(f"{ifname}: cannot attach XDP: {e2.strerror}") from None
                att = Attachment(ifindex, ifname, "generic", e.strerror)
        self._attached[ifindex] = (self._prog.fd, att)
        self.set_tx_link(ifindex, att.mode)
        return att

    def set_tx_link(self, ifindex: int, mode: str | None) -> None:
        """How this program runs on ifindex ("native", "generic"; None: not
        there), which says where the fast path may send from XDP (bpf/xlb.c,
        xdp_can_send): into a link that takes no XDP frames (a bridge, a VLAN,
        a tunnel) a native program's would be lost."""
        if mode is not None:
            self._maps["tx_links"][ct.c_uint32(ifindex)] = ct.c_uint32(layout.LINK_MODES[mode])
        else:
            self._delete("tx_links", ct.c_uint32(ifindex))

    def restore_tx_link(self, ifindex: int) -> None:
        """Puts back ifindex's tx_links entry as its attachment has it."""
        self.set_tx_link(ifindex, self._attached[ifindex][1].mode)

    def swapped(self) -> None:
        """Called once this program is swapped in on every interface of an
        apply. Between two swaps the interfaces run programs on different
        flow tables (another size): a connection opened through one is
        answered through the other, which does not know it, and so it stays
        if the process dies there. So the swaps go one right after the other,
        and the copied tables catch up before the first (what the running
        program wrote since the copy) and here (what it wrote until the last)."""
        if self._replaced:
            self._catch_up()

    def _catch_up(self) -> None:
        """Copies again into each flow table copied at the compile what the
        running program wrote in its own since: it served on it until the swap,
        and this program would balance a connection opened meanwhile anew (a
        TCP reset). An entry is taken where the running one's was seen later
        than this table's: one this program wrote since the swaps is newer, and
        stays. One that did not fit at the copy stays out: it would evict one
        that did."""
        for name, left_out in self._copied.items():
            fd_old, info = self._running.maps[name]
            fd = self._maps[name].map_fd
            old = _dump(name, fd_old, info.key_size, info.value_size, info.max_entries)
            for key, value in flowtable.newer(old, self._dump(name)):
                if flowtable.key_list(key)[0] not in left_out:
                    lib.bpf_update_elem(fd, ct.create_string_buffer(key),
                                        ct.create_string_buffer(value), 0)

    def holds(self, link: netif.Link) -> bool:
        """Whether link runs this program, or the running one it adopts (as
        links() read it: not one removed or replaced by hand since it was attached)."""
        held = self._attached.get(link.index)
        return held is not None and link.xdp_prog_id == bpfsys.prog_info(held[0]).id

    def attachments(self) -> list[Attachment]:
        """Where this program was attached, as the kernel has it now: each link
        under the name it has now (a renamed link keeps its program), in its
        state (netif.LINK_STATES). A link deleted is listed gone, under the name it
        was last listed by, until the next apply
        (which attaches to one made again under its name)."""
        now = {link.index: link for link in netif.links()}
        ours = bpfsys.prog_info(self._prog.fd).id
        listed = []
        for ifindex, (fd, att) in self._attached.items():
            if fd != self._prog.fd:
                continue
            link = now.get(ifindex)
            if link is None:
                listed.append(replace(att, state="gone"))
                continue
            # Kept: once deleted, it is gone under the name it was last seen by.
            att = replace(att, ifname=link.name)
            self._attached[ifindex] = (fd, att)
            listed.append(replace(att, state=(
                "detached" if link.xdp_prog_id != ours else link.state)))
        return listed

    def detach(self, ifindex: int) -> None:
        """Detaches this program from ifindex; where it replaced the running one
        (an adoption not settled yet), that one comes back, in one step."""
        fd, att = self._attached.pop(ifindex)
        old = self._replaced.pop(ifindex, None)
        if old is None:
            _detach(ifindex, fd, att.mode)
            self.set_tx_link(ifindex, None)
            return
        try:
            netif.xdp_set(ifindex, old[0], att.mode, expected_fd=fd)
        except OSError as e:
            raise DatapathError(f"{att.ifname}: cannot restore the running XDP program: "
                                f"{e.strerror}") from None
        self._attached[ifindex] = old

    def settle(self) -> list[str]:
        """Ends an adoption: the running program leaves the interfaces this one
        did not take over (the config no longer names them) and is let go.
        Returns the names of those interfaces."""
        self._replaced.clear()
        let_go = []
        for ifindex, (fd, att) in list(self._attached.items()):
            if fd != self._prog.fd:
                self.detach(ifindex)
                let_go.append(att.ifname)
        if self._running is not None:
            self._running.close()
            self._running = None
        return let_go

    def detach_all(self) -> None:
        """Detaches every program this one knows of: its own, and the running one's."""
        self._replaced.clear()
        for ifindex in list(self._attached):
            self.detach(ifindex)

    def close(self) -> None:
        """Lets go of the program and its maps; what is attached stays attached."""
        self._bpf.cleanup()
        if self._running is not None:
            self._running.close()
            self._running = None

    # Map writes ---------------------------------------------------------------

    def set_backend(self, backend_id: int, addr: IPv4Address, port: int,
                    closed: bool = False) -> None:
        """closed: the backend takes no new flows (a SYN on one of its flows, or a
        datagram of one it never answered, is balanced anew).
        Its replies are recognised from then on: a backend's bit in the address
        filter is never cleared, since flows to it may outlive its removal."""
        self.set_backends([(backend_id, addr, port, closed)])

    def set_backends(self, backends: Sequence[tuple[int, IPv4Address, int, bool]]) -> None:
        """set_backend of each (id, address, port, closed), in this order: the
        filter bits of all in one write of config first (a set bit may be
        another address's: the exact maps decide), then the entries in one
        batch (_write_batch). None (an adoption of maps that hold no server):
        config is not even read."""
        if not backends:
            return
        entries = [(i, _be32(addr), _be16(port),
                    layout.BACKEND_NO_NEW_FLOWS if closed else 0)
                   for i, addr, port, closed in backends]

        def bits(c):
            for _, be32, be16, _ in entries:
                _set_endpoint_bit(c.backend_bits, be32, be16)
        self._update_config(bits)
        n = len(entries)
        self._write_batch("backends", (ct.c_int * n)(*(e[0] for e in entries)),
                          (layout.Backend * n)(*(layout.Backend(*e[1:]) for e in entries)))

    def clear_backend_counters(self, backend_id: int) -> None:
        """Zeroes a backend id's counters, every CPU's: the id is another server's now."""
        self._clear_counters("backend_stats", backend_id)

    def clear_service_counters(self, service_id: int) -> None:
        """Zeroes a service id's counters, every CPU's: the id is another frontend's now."""
        self._clear_counters("service_stats", service_id)

    def _clear_counters(self, name: str, key: int) -> None:
        # The first value kept: a rollback clears the id again, of the newcomer's.
        self._cleared.setdefault((name, key), self._maps[name][ct.c_int(key)])
        self._maps[name].clearitem(ct.c_int(key))

    def counters_cleared(self, undo: bool) -> None:
        """Ends a change's clearing of counters: undo (the change was rolled
        back) puts back those it cleared, where the server or frontend that
        had the id still has it."""
        cleared, self._cleared = self._cleared, {}
        for (name, key), values in cleared.items() if undo else ():
            self._maps[name][ct.c_int(key)] = values

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
        self._write_batch(name, (ct.c_int * n)(*range(base, base + n)),
                          (ct.c_uint32 * n)(*backend_ids))

    def _write_batch(self, name: str, keys: ct.Array, values: ct.Array) -> None:
        """Writes values[i] at keys[i] in map `name` (arrays of its key and value
        types, as long) in one BPF_MAP_UPDATE_BATCH: the kernel writes them one
        by one in this order, each seen by the program once written, as single
        updates would be, and stops at the first it refuses. Then this raises,
        those before it written, as single updates stopped there would have left
        them (an apply's undo writes them back: balancer.Balancer.apply)."""
        n = len(keys)
        if not n:
            return
        count = ct.c_uint32(n)
        if lib.bpf_update_batch(self._maps[name].map_fd, ct.byref(keys), ct.byref(values),
                                ct.byref(count)) != 0:
            raise DatapathError(f"cannot write {name}: {os.strerror(ct.get_errno())}")

    def set_service(self, vip: IPv4Address, port: int, proto: int, service_id: int,
                    ring: int, ring_len: int, flags: int = 0) -> None:
        """flags: layout.SERVICE_MAGLEV makes `ring` a Maglev table, picked by the
        client's address alone with layout.SERVICE_SOURCE too; with
        layout.SERVICE_ADOPT the service takes over another node's connections."""
        self._maps["services"][self._service_key(vip, port, proto)] = \
            layout.Service(service_id, ring, ring_len, flags)

    def set_timeouts(self, service_id: int, syn: int, established: int, closing: int,
                     udp: int) -> None:
        """Idle seconds of a service's flows by state (0: never)."""
        self._maps["timeouts"][ct.c_int(service_id)] = \
            layout.Timeouts(syn, established, closing, udp)

    def del_service(self, vip: IPv4Address, port: int, proto: int) -> None:
        self._delete("services", self._service_key(vip, port, proto))

    def set_vip(self, vip: IPv4Address) -> None:
        self._maps["vips"][ct.c_uint32(_be32(vip))] = ct.c_uint32(1)
        self._update_config(lambda c: _set_bit(c.vip_bits, _be32(vip)))

    def del_vip(self, vip: IPv4Address) -> None:
        self._delete("vips", ct.c_uint32(_be32(vip)))
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
        self._update_one("config", change)

    def _update_one(self, name: str, change):
        """Read, change, write back the one entry of an array of one (config,
        control_stats): it lives in the kernel, so a Datapath that adopted the
        maps sees what the last one wrote. Returns the entry as written."""
        c = self._maps[name][ct.c_int(0)]
        before = bytes(c)
        change(c)
        if bytes(c) != before:
            self._maps[name][ct.c_int(0)] = c
        return c

    def _count(self, counter: str, n: int) -> None:
        """Adds n to a control_stats counter (the caller holds self._mending)."""
        self._update_one("control_stats", lambda c: setattr(c, counter, getattr(c, counter) + n))

    def set_owner(self, addr: IPv4Address, port: int, proto: int,
                  services: Sequence[tuple[IPv4Address, int]]) -> None:
        """Packets from backend endpoint (addr, port, proto) that no flow entry
        knows may be replies of these services ((vip, vip_port) with proto; at
        most layout.OWNER_SLOTS: see owners in bpf/xlb_shared.h)."""
        self.set_owners([(addr, port, proto, services)])

    def set_owners(self, owners: Sequence[tuple[IPv4Address, int, int,
                                               Sequence[tuple[IPv4Address, int]]]]) -> None:
        """set_owner of each (addr, port, proto, services), in this order, in one
        batch (_write_batch)."""
        keys, values = [], []
        # The servers of a frontend share one value, made once (the array
        # copies it): one each took 60-100 ms of 10,000 servers' apply, 35 so.
        made: dict[tuple, layout.OwnerServices] = {}
        for addr, port, proto, services in owners:
            owned = made.get((proto, *services))
            if owned is None:
                owned = made[(proto, *services)] = layout.OwnerServices()
                for i, (vip, vip_port) in enumerate(services):
                    owned.services[i] = self._service_key(vip, vip_port, proto)
            keys.append(self._endpoint(addr, port, proto))
            values.append(owned)
        n = len(keys)
        self._write_batch("owners", (layout.Endpoint * n)(*keys),
                          (layout.OwnerServices * n)(*values))

    def del_owner(self, addr: IPv4Address, port: int, proto: int) -> None:
        self.del_owners([(addr, port, proto)])

    def del_owners(self, endpoints: Sequence[tuple[IPv4Address, int, int]]) -> None:
        """del_owner of each (addr, port, proto), in this order, in one batch
        (_delete_keys); at a refusal, those before it are deleted (an apply's
        undo writes them back)."""
        self._delete_keys("owners", b"".join(bytes(self._endpoint(*e)) for e in endpoints),
                          ct.sizeof(layout.Endpoint))

    def set_arp(self, ifindex: int, vip: IPv4Address, mac: bytes) -> None:
        self._maps["arp_vips"][layout.ArpKey(ifindex, _be32(vip))] = \
            layout.ArpMac((ct.c_uint8 * 6)(*mac), 0)

    def del_arp(self, ifindex: int, vip: IPv4Address) -> None:
        self._delete("arp_vips", layout.ArpKey(ifindex, _be32(vip)))

    def _delete(self, name: str, key) -> None:
        """Deletes key from hash map `name`; a key not there is deleted already:
        undoing a change that failed part way deletes what it had not written yet
        (balancer.Balancer.apply)."""
        if lib.bpf_delete_elem(self._maps[name].map_fd, ct.byref(key)) != 0 \
                and ct.get_errno() != errno.ENOENT:
            raise DatapathError(f"cannot delete from {name}: {os.strerror(ct.get_errno())}")

    @staticmethod
    def _service_key(vip: IPv4Address, port: int, proto: int) -> layout.ServiceKey:
        return layout.ServiceKey(_be32(vip), _be16(port), proto, 0)

    @staticmethod
    def _endpoint(addr: IPv4Address, port: int, proto: int) -> layout.Endpoint:
        return layout.Endpoint(_be32(addr), _be16(port), proto, 0)

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
        # [key][cpu][field], all u64
        words = memoryview(self._read_values(table)).cast("B").cast("Q").tolist()
        stride = nf * ncpu
        totals = []                                  # [field][key], summed over CPUs
        for f in range(nf):
            columns = [words[c * nf + f::stride] for c in range(ncpu)]
            totals.append(list(map(sum, zip(*columns))))
        return {i: {name: totals[f][i] for f, name in enumerate(fields)} for i in ids}

    def next_hops(self, since: int) -> set[tuple[int, bytes]]:
        """The next hops (link index, MAC) the fast path resolved since `since`
        (its clock, now()) and sends to from XDP, on any CPU: one read of its
        cache (bpf/xlb.c, next_hop), whose entries only those stamps decode."""
        raw = memoryview(self._read_values(self._maps["hops"])).cast("B")
        size, hop = ct.sizeof(layout.Hop), layout.Hop
        checked = raw.cast("Q")[hop.checked.offset // 8::size // 8]
        found = set()
        for i, stamp in enumerate(checked):
            at = i * size
            if stamp >= since and raw[at + hop.xmit.offset]:
                index = int.from_bytes(raw[at + hop.ifindex.offset:at + hop.ifindex.offset + 4],
                                       sys.byteorder)
                found.add((index, bytes(raw[at + hop.dmac.offset:at + hop.dmac.offset + 6])))
        return found

    @staticmethod
    def _read_values(table, start: int = 0, n: int | None = None):
        """n values of an array map from index start (all by default), in one
        BPF_MAP_LOOKUP_BATCH (an array's batch token is the index before the first)."""
        n = table.max_entries - start if n is None else n
        keys, values = (table.Key * n)(), (table.Leaf * n)()
        token, count, out_batch = ct.c_uint32(start - 1), ct.c_uint32(n), ct.c_uint32(0)
        if n and lib.bpf_lookup_batch(table.map_fd, ct.byref(token) if start else None,
                                      ct.byref(out_batch), keys, values, ct.byref(count)) != 0 \
                and ct.get_errno() != errno.ENOENT:
            raise DatapathError(f"cannot read a map: {os.strerror(ct.get_errno())}")
        return values

    def held(self):
        """What the maps hold, for a control plane that adopts them, as the
        planner describes it (a DataplaneState whose backends are not named
        yet), and the backend entries by id (entries never written are left
        out: all zero)."""
        from .planner import BackendState, DataplaneState, ServiceState
        services = {}
        for key, svc in self._maps["services"].items():
            maglev = bool(svc.flags & layout.SERVICE_MAGLEV)
            name, size = ("maglev", self.limits.maglev_size) if maglev \
                else ("rings", self.limits.ring_size)
            slots = tuple(self._read_values(self._maps[name], svc.ring * size, svc.ring_len))
            t = self._maps["timeouts"][ct.c_int(svc.id)]
            services[(_addr(key.vip), socket.ntohs(key.port), key.proto)] = ServiceState(
                svc.id, svc.ring, slots, maglev,
                (t.syn, t.established, t.closing, t.udp), bool(svc.flags & layout.SERVICE_SOURCE),
                bool(svc.flags & layout.SERVICE_ADOPT))
        if self.emptied("backends"):
            # The connections tell the ids they name, and their servers, which
            # the adoption writes back (balancer.Balancer.adopt).
            entries = [(i, addr, port, False) for dump in self.flow_dumps().values()
                       for i, (addr, port) in flowtable.backends(*dump).items()]
        else:
            entries = [(i, b.addr, b.port, bool(b.flags & layout.BACKEND_NO_NEW_FLOWS))
                       for i, b in enumerate(self._read_values(self._maps["backends"]))]
        backends = {i: BackendState(i, _addr(addr), socket.ntohs(port), closed)
                    for i, addr, port, closed in entries if addr or port}
        vips = frozenset(_addr(k.value) for k in self._maps["vips"].keys())
        arp = {(k.ifindex, _addr(k.addr)): bytes(v.mac) for k, v in self._maps["arp_vips"].items()}
        owners = {(_addr(k.addr), socket.ntohs(k.port), k.proto):
                  tuple((_addr(s.vip), socket.ntohs(s.port)) for s in v.services if s.port)
                  for k, v in self._maps["owners"].items()}
        # A removed frontend's timeouts stay (its id is retired, planner.DataplaneState).
        in_use = {svc.id for svc in services.values()}
        retired = frozenset(i for i, t in enumerate(self._read_values(self._maps["timeouts"]))
                            if i not in in_use and (t.syn or t.established or t.closing or t.udp))
        return DataplaneState(services, {}, vips, arp, owners, retired_services=retired), backends

    def reason_counters(self) -> dict[str, layout.Tally]:
        return {name: self._percpu_sum("reason_stats", i)
                for i, name in enumerate(layout.REASON_NAMES)}

    def flow_counters(self) -> layout.FlowCounters:
        """Connections the program moved in and out of the flow tables."""
        return self._percpu_sum("flow_stats", 0)

    def control_counters(self) -> layout.ControlCounters:
        """What the control planes that ran this data path removed and put back."""
        return self._maps["control_stats"][ct.c_int(0)]

    def flow_ledger(self) -> FlowLedger:
        """The census of the flow tables, and the connections that came and
        went. The LRU's evictions, what went in less what left and what is
        there, are read so as never to count more than there were: what went
        in before the census, what left after it, and that together with the
        control plane's removals, each of which is counted as it is deleted
        (self._mending): none is seen gone and not counted. The largest count
        so far is kept in control_stats."""
        came = self.flow_counters()
        census = self.flow_census()
        with self._mending:
            left = self.flow_counters()
            evicted = _evictions(came, left, self.control_counters(), census)

            def keep_largest(c):
                for table, n in evicted.items():
                    setattr(c, f"evicted_{table}", max(getattr(c, f"evicted_{table}"), n))
            return FlowLedger(census, left, self._update_one("control_stats", keep_largest))

    def flow_dumps(self) -> dict[str, tuple[bytes, bytes]]:
        """Both flow tables (flows, flows_new) as their keys and values, read in batches."""
        return {name: self._dump(name) for name in flowtable.TABLES}

    def flow_entries(self) -> int:
        """Entries in both flow tables (two per connection: forward and reply)."""
        return sum(len(keys) // ct.sizeof(layout.FlowKey) for keys, _ in self.flow_dumps().values())

    def flow_census(self) -> flowtable.Census:
        return flowtable.census(self.flow_dumps(), self.now())

    def delete_flows(self, backend_ids: set[int], service_ids: set[int],
                     crossed: tuple[set[int], set[int]] = (set(), set())) -> dict[str, int]:
        """Forgets the connections of these backends and services, and those of
        crossed's backends through crossed's services, both ways, so that
        their next packets are balanced anew. Returns how many of them were
        open (as `status` counts: not closing, not idle past their timeout
        both ways), per table."""
        if not backend_ids and not service_ids and not all(crossed):    # most applies
            return dict.fromkeys(flowtable.TABLES, 0)

        def ends(r: flowtable.Row) -> bool:
            return (r.backend_id in backend_ids or r.service_id in service_ids
                    or r.backend_id in crossed[0] and r.service_id in crossed[1])

        ended, now = {}, self.now()
        with self._mending:
            for name, dump in self.flow_dumps().items():
                read = flowtable.ending(*dump, backend_ids, service_ids, crossed)
                ended[name] = flowtable.open_count(self._end(name, read, ends), read, now)
        return ended

    def sweep_flows(self, now: int | None = None) -> tuple[dict[str, int], int]:
        """Removes the connections idle past their timeout, and mends the
        established table after the LRU's evictions (flowtable.sweep; the
        program writes a half-open connection's reply entry again when its
        client tries again). Returns how many connections expired per table,
        and how many reply entries came back."""
        now = self.now() if now is None else now
        dumps = self.flow_dumps()
        half_open = set(flowtable.key_list(dumps["flows_new"][0]))
        expired, restored = {}, 0
        for name, (keys, values) in dumps.items():
            known = half_open if name == "flows" else None
            swept = flowtable.sweep(keys, values, now, known)
            expired[name] = self._reap(name, keys, values, swept.dead)
            if name == "flows":
                restored = self._put_back(swept.orphans)
        return expired, restored

    def _dump(self, name: str) -> tuple[bytes, bytes]:
        table = self._maps[name]
        return _dump(name, table.map_fd, ct.sizeof(table.Key), ct.sizeof(table.Leaf),
                     table.max_entries)

    def _end(self, name: str, rows: list[flowtable.Row],
             ends: Callable[[flowtable.Row], bool]) -> list[flowtable.Row]:
        """Deletes those of these entries (read a moment ago) that are still
        there and what ends(as now) asks: the program may have written one
        since (a connection opened again on the same key, to another server),
        or may write the key of one gone since then before the delete.
        Checked and deleted a few at a time, so that the program has a few
        milliseconds, not the whole pass, to write in between. Returns the
        forward entries this deleted (as read), and counts them in
        control_stats (ended): a connection another remover took in between
        (the program, the sweep) was counted there."""
        fd, ksize = self._maps[name].map_fd, ct.sizeof(layout.FlowKey)
        key, value = ct.create_string_buffer(ksize), ct.create_string_buffer(ct.sizeof(layout.Flow))
        gone = []
        for at in range(0, len(rows), DELETE_CHUNK):
            doomed = []
            for r in rows[at:at + DELETE_CHUNK]:
                key.raw = r.key()
                if lib.bpf_lookup_elem(fd, key, value) == 0 and ends(r.as_now(value.raw)):
                    doomed.append(r)
            with self._mending:
                deleted = self._delete_batch(name, doomed)
                self._count(f"ended_{name}", len(deleted))
            gone += deleted
        return gone

    def _reap(self, name: str, keys: bytes, values: bytes, dead: list[tuple[int, ...]]) -> int:
        """Removes these connections of a dump of table name (flowtable.sweep)
        unless one of their entries is still there and no longer as read: the
        program may have written it since. Checked and removed by xlb_reap, in
        the kernel, a few at a time; each few counted in control_stats
        (expired) as they go, so that a status never sees them gone and not
        counted. Returns how many connections this removed: one another
        remover took in between (the program, an apply) was counted there."""
        ksize, vsize = ct.sizeof(layout.FlowKey), ct.sizeof(layout.Flow)
        head = bytes(layout.ReapHead(table=flowtable.TABLES.index(name)))
        none = bytes(layout.ReapEntry())

        def entry(i: int) -> bytes:
            return keys[i * ksize:(i + 1) * ksize] + values[i * vsize:(i + 1) * vsize]

        removed = 0
        for at in range(0, len(dead), DELETE_CHUNK):
            chunk = dead[at:at + DELETE_CHUNK]
            frames = [head + b"".join(entry(c[0]) + (entry(c[1]) if len(c) > 1 else none)
                                      for c in chunk[run:run + REAP_CONNECTIONS])
                      for run in range(0, len(chunk), REAP_CONNECTIONS)]
            with self._mending:
                n = sum(map(self._reap_run, frames))
                self._count(f"expired_{name}", n)
            removed += n
        return removed

    def _reap_run(self, frame: bytes) -> int:
        """One test-run of xlb_reap; the forward entries it removed."""
        data = bpfsys.prog_test_run(self._reaper.fd, frame).data
        return layout.ReapHead.from_buffer_copy(data).removed

    def _delete_batch(self, name: str, rows: list[flowtable.Row]) -> list[flowtable.Row]:
        """Deletes these entries (_delete_keys); returns the forward entries
        that went."""
        gone = []
        for first, n in self._delete_keys(name, b"".join(r.key() for r in rows),
                                          ct.sizeof(layout.FlowKey)):
            gone += [r for r in rows[first:first + n] if r.dir == layout.FLOW_FORWARD]
        return gone

    def _delete_keys(self, name: str, keys: bytes, size: int) -> list[tuple[int, int]]:
        """Deletes keys (of `size` bytes each, one after another) from hash
        map `name`, in their order, in one BPF_MAP_DELETE_BATCH, or more where
        one is not there: it stops the call, which goes on after it (deleted
        already, as _delete takes it). Returns the runs deleted, as (index of
        the first, how many). Raises at another refusal, those before it
        deleted."""
        fd, buf, runs = self._maps[name].map_fd, ct.create_string_buffer(keys), []
        start, n = 0, len(keys) // size
        while start < n:
            count = ct.c_uint32(n - start)
            rc = lib.bpf_delete_batch(fd, ct.byref(buf, start * size), ct.byref(count))
            err = ct.get_errno()
            runs.append((start, count.value))
            if rc == 0:
                break
            if err != errno.ENOENT:
                raise DatapathError(f"cannot delete from {name}: {os.strerror(err)}")
            start += count.value + 1
        return runs

    def _put_back(self, orphans: list[flowtable.Row]) -> int:
        """Writes the reply entries of these forward entries of the established
        table where the forward entry is still there and the reply entry is
        not (BPF_NOEXIST: one the program wrote meanwhile stays as it is);
        returns how many went in."""
        fd, done = self._maps["flows"].map_fd, 0
        value = ct.create_string_buffer(ct.sizeof(layout.Flow))
        with self._mending:
            for fwd in orphans:
                if lib.bpf_lookup_elem(fd, ct.create_string_buffer(fwd.key()), value) != 0:
                    continue                # gone since the dump: ended, expired
                key, reply = fwd.reply()
                done += lib.bpf_update_elem(fd, ct.create_string_buffer(key),
                                            ct.create_string_buffer(reply), BPF_NOEXIST) == 0
            self._count("replies_restored", done)
        return done

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

    def now(self) -> int:
        """The clock the program stamps flows and next hops with (bpf/clock.h), in ns."""
        return int.from_bytes(bpfsys.prog_test_run(self._clock.fd, bytes(64)).data[:8], "little")

    def test_run(self, frame: bytes, ingress_ifindex: int = 0) -> bpfsys.TestRunResult:
        return bpfsys.prog_test_run(self._prog.fd, frame, ingress_ifindex)
