"""The two bpf(2) commands that bcc 0.26's Python API lacks.

- BPF_LINK_CREATE for XDP: the attachment lives as long as its file descriptor,
  so a control plane that dies, even by SIGKILL, leaves no program attached.
- BPF_PROG_TEST_RUN: runs the program on a crafted packet, without a network.
"""

from __future__ import annotations

import ctypes as ct
import os
from dataclasses import dataclass

_libc = ct.CDLL(None, use_errno=True)
_SYS_BPF = 321  # x86_64

BPF_PROG_TEST_RUN = 10
BPF_LINK_CREATE = 28
BPF_XDP = 37
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
_ATTR_SIZE = 128  # larger than either command's part of union bpf_attr; the rest is zero


class _TestRun(ct.Structure):
    _fields_ = [("prog_fd", ct.c_uint32), ("retval", ct.c_uint32),
                ("data_size_in", ct.c_uint32), ("data_size_out", ct.c_uint32),
                ("data_in", ct.c_uint64), ("data_out", ct.c_uint64),
                ("repeat", ct.c_uint32), ("duration", ct.c_uint32),
                ("ctx_size_in", ct.c_uint32), ("ctx_size_out", ct.c_uint32),
                ("ctx_in", ct.c_uint64), ("ctx_out", ct.c_uint64),
                ("flags", ct.c_uint32), ("cpu", ct.c_uint32), ("batch_size", ct.c_uint32)]


class _LinkCreate(ct.Structure):
    _fields_ = [("prog_fd", ct.c_uint32), ("target_ifindex", ct.c_uint32),
                ("attach_type", ct.c_uint32), ("flags", ct.c_uint32)]


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


def xdp_link_create(prog_fd: int, ifindex: int, generic: bool) -> int:
    """Attaches an XDP program to ifindex; returns the link's fd (close it to detach)."""
    attr = _LinkCreate(prog_fd=prog_fd, target_ifindex=ifindex, attach_type=BPF_XDP,
                       flags=XDP_FLAGS_SKB_MODE if generic else XDP_FLAGS_DRV_MODE)
    return _bpf(BPF_LINK_CREATE, attr)


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
