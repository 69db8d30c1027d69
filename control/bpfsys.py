"""The bpf(2) commands that bcc 0.26's Python API lacks.

- Finding a running data path again from the kernel's own objects: a program
  by id (the id netlink reports for an interface's XDP program), its info
  (name, map ids), its maps by id and their info; pinning a map (into xlb's
  private bpffs, so that a new program is built on the running one's maps);
  binding a map the program does not use to it, so that it is among them.
- BPF_PROG_TEST_RUN: runs the program on a crafted packet, without a network.
- BPF_ENABLE_STATS: the kernel's count of a program's runs and their time,
  which the benchmark reads on a live path.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import os
from dataclasses import dataclass

_libc = ct.CDLL(None, use_errno=True)
_SYS_BPF = 321  # x86_64

BPF_OBJ_PIN = 6
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_BIND_MAP = 35
BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0
_ATTR_SIZE = 128  # larger than any used command's part of union bpf_attr; the rest is zero
_OBJ_NAME_LEN = 16


class _TestRun(ct.Structure):
    _fields_ = [("prog_fd", ct.c_uint32), ("retval", ct.c_uint32),
                ("data_size_in", ct.c_uint32), ("data_size_out", ct.c_uint32),
                ("data_in", ct.c_uint64), ("data_out", ct.c_uint64),
                ("repeat", ct.c_uint32), ("duration", ct.c_uint32),
                ("ctx_size_in", ct.c_uint32), ("ctx_size_out", ct.c_uint32),
                ("ctx_in", ct.c_uint64), ("ctx_out", ct.c_uint64),
                ("flags", ct.c_uint32), ("cpu", ct.c_uint32), ("batch_size", ct.c_uint32)]


class _GetFdById(ct.Structure):
    _fields_ = [("id", ct.c_uint32), ("next_id", ct.c_uint32), ("open_flags", ct.c_uint32)]


class _InfoByFd(ct.Structure):
    _fields_ = [("bpf_fd", ct.c_uint32), ("info_len", ct.c_uint32), ("info", ct.c_uint64)]


class _ObjPin(ct.Structure):
    _fields_ = [("pathname", ct.c_uint64), ("bpf_fd", ct.c_uint32), ("file_flags", ct.c_uint32)]


class _ProgBindMap(ct.Structure):
    _fields_ = [("prog_fd", ct.c_uint32), ("map_fd", ct.c_uint32), ("flags", ct.c_uint32)]


class _EnableStats(ct.Structure):
    _fields_ = [("type", ct.c_uint32)]


class _ProgInfo(ct.Structure):
    """The head of struct bpf_prog_info (the kernel fills as much as we ask for)."""
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("tag", ct.c_uint8 * 8),
                ("jited_prog_len", ct.c_uint32), ("xlated_prog_len", ct.c_uint32),
                ("jited_prog_insns", ct.c_uint64), ("xlated_prog_insns", ct.c_uint64),
                ("load_time", ct.c_uint64), ("created_by_uid", ct.c_uint32),
                ("nr_map_ids", ct.c_uint32), ("map_ids", ct.c_uint64),
                ("name", ct.c_char * _OBJ_NAME_LEN)]


class _MapInfo(ct.Structure):
    """The head of struct bpf_map_info."""
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32),
                ("map_flags", ct.c_uint32), ("name", ct.c_char * _OBJ_NAME_LEN)]


class XdpMd(ct.Structure):
    _fields_ = [("data", ct.c_uint32), ("data_end", ct.c_uint32), ("data_meta", ct.c_uint32),
                ("ingress_ifindex", ct.c_uint32), ("rx_queue_index", ct.c_uint32),
                ("egress_ifindex", ct.c_uint32)]


def _bpf(cmd: int, attr: ct.Structure) -> int:
    buf = ct.create_string_buffer(_ATTR_SIZE)
    ct.memmove(buf, ct.byref(attr), ct.sizeof(attr))
    ret = _libc.syscall(_SYS_BPF, cmd, buf, _ATTR_SIZE)
    if ret < 0:
        err = ct.get_errno()
        raise OSError(err, os.strerror(err))
    ct.memmove(ct.byref(attr), buf, ct.sizeof(attr))
    return ret


def prog_fd_by_id(prog_id: int) -> int:
    """A new fd of the program with this id (close it); OSError ENOENT if it is gone."""
    return _bpf(BPF_PROG_GET_FD_BY_ID, _GetFdById(id=prog_id))


def map_fd_by_id(map_id: int) -> int:
    return _bpf(BPF_MAP_GET_FD_BY_ID, _GetFdById(id=map_id))


@dataclass(frozen=True)
class ProgInfo:
    id: int
    name: str           # the kernel keeps 15 characters of it
    tag: str            # hash of the instructions: a changed program has another tag
    load_time_ns: int   # since boot
    map_ids: tuple[int, ...]


@dataclass(frozen=True)
class MapInfo:
    id: int
    name: str           # 15 characters at most, as the kernel keeps it
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int


def _info(fd: int, info: ct.Structure) -> None:
    _bpf(BPF_OBJ_GET_INFO_BY_FD,
         _InfoByFd(bpf_fd=fd, info_len=ct.sizeof(info), info=ct.addressof(info)))


def prog_info(fd: int) -> ProgInfo:
    info = _ProgInfo()
    _info(fd, info)
    ids = (ct.c_uint32 * info.nr_map_ids)()
    info = _ProgInfo(nr_map_ids=len(ids), map_ids=ct.addressof(ids))
    _info(fd, info)
    return ProgInfo(info.id, info.name.decode(), bytes(info.tag).hex(), info.load_time,
                    tuple(ids[:min(len(ids), info.nr_map_ids)]))


def map_info(fd: int) -> MapInfo:
    info = _MapInfo()
    _info(fd, info)
    return MapInfo(info.id, info.name.decode(), info.type, info.key_size, info.value_size,
                   info.max_entries, info.map_flags)


def obj_pin(fd: int, path: str) -> None:
    """Pins a map or program at path, which must be in a bpffs."""
    name = ct.create_string_buffer(path.encode())
    _bpf(BPF_OBJ_PIN, _ObjPin(pathname=ct.addressof(name), bpf_fd=fd))


def prog_bind_map(prog_fd: int, map_fd: int) -> None:
    """Makes a map one of the program's (its map ids, its lifetime) without
    the program's code using it."""
    _bpf(BPF_PROG_BIND_MAP, _ProgBindMap(prog_fd=prog_fd, map_fd=map_fd))


@contextlib.contextmanager
def run_stats():
    """Every program's runs counted and timed while the block runs (the kernel
    stops when the last holder's fd closes): two clock reads a run, so never
    while a figure that holds programs is measured."""
    fd = _bpf(BPF_ENABLE_STATS, _EnableStats(type=BPF_STATS_RUN_TIME))
    try:
        yield
    finally:
        os.close(fd)


def prog_run_totals(prog_id: int) -> tuple[int, int]:
    """The program's nanoseconds run and runs counted so far (while run_stats)."""
    fd = prog_fd_by_id(prog_id)
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            info = dict(line.split(":", 1) for line in f.read().splitlines())
    finally:
        os.close(fd)
    return int(info["run_time_ns"]), int(info["run_cnt"])


@dataclass(frozen=True)
class TestRunResult:
    action: int
    data: bytes
    duration_ns: int


def prog_test_run(prog_fd: int, data: bytes, ingress_ifindex: int = 0,
                  repeat: int = 1) -> TestRunResult:
    """Runs an XDP program once (or `repeat` times on one buffer) over data."""
    out = ct.create_string_buffer(len(data) + 512)
    data_in = ct.create_string_buffer(data, len(data))
    ctx = XdpMd(data=0, data_end=len(data), ingress_ifindex=ingress_ifindex)
    attr = _TestRun(prog_fd=prog_fd, data_size_in=len(data), data_size_out=len(out),
                    data_in=ct.addressof(data_in), data_out=ct.addressof(out), repeat=repeat,
                    ctx_size_in=ct.sizeof(ctx), ctx_in=ct.addressof(ctx))
    _bpf(BPF_PROG_TEST_RUN, attr)
    return TestRunResult(attr.retval, out.raw[:attr.data_size_out], attr.duration)


_CLONE_NEWNS = 0x00020000
_MS_REC, _MS_PRIVATE = 0x4000, 1 << 18


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ct.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


# Where private_bpffs mounts: a directory every sysfs has, hidden only in the
# block's own mount namespace. A directory made for it would be left behind by
# a process killed in the block.
PRIVATE_BPFFS = "/sys/fs/bpf"


@contextlib.contextmanager
def private_bpffs():
    """A bpffs of this process's own, at PRIVATE_BPFFS, while the block runs.

    The process enters a mount namespace of its own for the block (no one else
    sees the mount, and it goes with the block, even on a crash) and returns to
    its original one after. Needs a single-threaded process: a thread shares
    the mount namespace, so the kernel refuses to unshare it.
    """
    original = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.unshare(_CLONE_NEWNS), "unshare the mount namespace")
        try:
            _check(_libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None),
                   "make mounts private")
            _check(_libc.mount(b"bpf", PRIVATE_BPFFS.encode(), b"bpf", 0, None),
                   "mount a bpffs")
            try:
                yield PRIVATE_BPFFS
            finally:
                _libc.umount2(PRIVATE_BPFFS.encode(), 0)
        finally:
            _check(_libc.setns(original, _CLONE_NEWNS), "return to the mount namespace")
    finally:
        os.close(original)
