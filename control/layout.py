"""Python's view of bpf/xlb_shared.h, the one definition of what C and Python share.

The structs are mirrored as ctypes classes; `check_mirror` compares them with the
types bcc derives from the C itself (every load does, and so does a test), and
the compiler checks those of frames (`frame_asserts`), so a change on one side
only fails loudly. The reasons and the enums' values (flow directions and
states, flags, the address filters' size) are read from the header text, so
they cannot drift at all.
"""

from __future__ import annotations

import ctypes as ct
import re
from pathlib import Path

# control/bpf links to the repository's bpf/, so an installed (non-editable) xlb
# carries the C as package data and finds it the same way.
BPF_DIR = Path(__file__).resolve().parent / "bpf"
SHARED_HEADER = BPF_DIR / "xlb_shared.h"

u8, u16, u32, u64 = ct.c_uint8, ct.c_uint16, ct.c_uint32, ct.c_uint64


class ServiceKey(ct.Structure):
    _fields_ = [("vip", u32), ("port", u16), ("proto", u8), ("pad", u8)]


class Service(ct.Structure):
    _fields_ = [("id", u32), ("ring", u32), ("ring_len", u32), ("flags", u32)]


class Backend(ct.Structure):
    _fields_ = [("addr", u32), ("port", u16), ("flags", u16)]


class FlowKey(ct.Structure):
    _fields_ = [("saddr", u32), ("daddr", u32), ("sport", u16), ("dport", u16),
                ("proto", u8), ("pad", u8 * 3)]


class Flow(ct.Structure):
    _fields_ = [("addr", u32), ("port", u16), ("dir", u8), ("state", u8),
                ("service_id", u32), ("backend_id", u32), ("timeout", u32), ("pad", u32),
                ("seen", u64)]


class FragKey(ct.Structure):
    _fields_ = [("saddr", u32), ("daddr", u32), ("id", u16), ("proto", u8), ("pad", u8)]


class Hop(ct.Structure):
    _fields_ = [("daddr", u32), ("in_ifindex", u32), ("ifindex", u32), ("mtu", u16),
                ("dmac", u8 * 6), ("smac", u8 * 6), ("xmit", u8), ("pad", u8 * 5),
                ("checked", u64)]


class Timeouts(ct.Structure):
    _fields_ = [("syn", u32), ("established", u32), ("closing", u32), ("udp", u32)]


class FlowCounters(ct.Structure):
    _fields_ = [("created", u64), ("established", u64), ("expired", u64), ("reopened", u64),
                ("new_removed", u64), ("adopted", u64)]


class ControlCounters(ct.Structure):
    _fields_ = [("expired_flows", u64), ("expired_flows_new", u64), ("ended_flows", u64),
                ("ended_flows_new", u64), ("evicted_flows", u64), ("evicted_flows_new", u64),
                ("replies_restored", u64)]


class Endpoint(ct.Structure):
    _fields_ = [("addr", u32), ("port", u16), ("proto", u8), ("pad", u8)]


class ArpKey(ct.Structure):
    _fields_ = [("ifindex", u32), ("addr", u32)]


class ArpMac(ct.Structure):
    _fields_ = [("mac", u8 * 6), ("pad", u16)]


class Counters(ct.Structure):
    _fields_ = [("packets_in", u64), ("bytes_in", u64), ("packets_out", u64),
                ("bytes_out", u64), ("new_flows", u64)]


class Tally(ct.Structure):
    _fields_ = [("packets", u64), ("bytes", u64)]


def read_enum(prefix: str) -> dict[str, int]:
    """The NAME = value pairs of xlb_shared.h's anonymous enums whose names start with prefix."""
    found = {}
    for body in re.findall(rf"enum\s*\{{\s*({prefix}[^}}]*)\}}", SHARED_HEADER.read_text()):
        found.update({k: int(v) for k, v in re.findall(rf"({prefix}\w+)\s*=\s*(\d+)", body)})
    return found


FILTER_WORDS = read_enum("XLB_FILTER_")["XLB_FILTER_WORDS"]
FILTER_SHIFT = read_enum("XLB_FILTER_")["XLB_FILTER_SHIFT"]
assert FILTER_WORDS * 64 == 1 << (32 - FILTER_SHIFT), "xlb_shared.h: filter size and shift disagree"
OWNER_SLOTS = read_enum("XLB_OWNER_")["XLB_OWNER_SLOTS"]


class OwnerServices(ct.Structure):
    _fields_ = [("services", ServiceKey * OWNER_SLOTS)]


class ReapHead(ct.Structure):
    _fields_ = [("table", u32), ("removed", u32)]


class ReapEntry(ct.Structure):
    _fields_ = [("key", FlowKey), ("value", Flow)]


# The structs of frames the control plane builds for a program (BPF_PROG_TEST_RUN):
# in no map, so bcc derives no type of theirs; the compiler checks them instead.
FRAMES: dict[str, type] = {"reap_head": ReapHead, "reap_entry": ReapEntry}


def frame_asserts() -> str:
    """C that fails to compile unless each struct of FRAMES has its mirror's
    size, and each field its mirror's offset and size."""
    checks = []
    for name, ctype in FRAMES.items():
        checks.append(f"sizeof(struct {name}) == {ct.sizeof(ctype)}")
        for field, _ in ctype._fields_:
            at = getattr(ctype, field)
            checks += [f"__builtin_offsetof(struct {name}, {field}) == {at.offset}",
                       f"sizeof(((struct {name} *)0)->{field}) == {at.size}"]
    return f'_Static_assert({" && ".join(checks)}, "a frame\'s struct differs from layout.py\'s");'


class Config(ct.Structure):
    _fields_ = [("flags", u32), ("pad", u32), ("vip_bits", u64 * FILTER_WORDS),
                ("backend_bits", u64 * FILTER_WORDS)]


# map name -> (key mirror or None for array indexes, value mirror)
MAPS: dict[str, tuple[type | None, type]] = {
    "services": (ServiceKey, Service),
    "backends": (None, Backend),
    "rings": (None, u32),
    "maglev": (None, u32),
    "timeouts": (None, Timeouts),
    "vips": (None, u32),
    "arp_vips": (ArpKey, ArpMac),
    "owners": (Endpoint, OwnerServices),
    "config": (None, Config),
    "flows": (FlowKey, Flow),
    "flows_new": (FlowKey, Flow),
    "frags": (FragKey, Flow),
    "hops": (None, Hop),
    "tx_links": (None, u32),
    "rr_cursor": (None, u32),
    "service_stats": (None, Counters),
    "backend_stats": (None, Counters),
    "reason_stats": (None, Tally),
    "flow_stats": (None, FlowCounters),
    "control_stats": (None, ControlCounters),
}

XDP_ACTIONS = {"XDP_ABORTED": 0, "XDP_DROP": 1, "XDP_PASS": 2, "XDP_TX": 3, "XDP_REDIRECT": 4}


def read_reasons(header: Path = SHARED_HEADER) -> tuple[tuple[str, str], ...]:
    """The XLB_REASONS list, in enum order: (name, action) pairs."""
    text = header.read_text()
    start = text.index("#define XLB_REASONS(X)")
    body = text[start:text.index("#define XLB_REASON_ENUM")]
    return tuple(re.findall(r"\bX\((\w+),\s*(XDP_\w+)\)", body))


REASONS = read_reasons()
REASON_NAMES = tuple(name.lower() for name, _ in REASONS)
REASON_ACTIONS = tuple(action for _, action in REASONS)
_FLOW = read_enum("FLOW_")
FLOW_FORWARD = _FLOW["FLOW_FORWARD"]
FLOW_REPLY = _FLOW["FLOW_REPLY"]
FLOW_STATES = {k[5:].lower(): _FLOW[k]
               for k in ("FLOW_NEW", "FLOW_ANSWERED", "FLOW_ESTABLISHED", "FLOW_CLOSING")}
BACKEND_NO_NEW_FLOWS = read_enum("BACKEND_")["BACKEND_NO_NEW_FLOWS"]
_SERVICE = read_enum("SERVICE_")
SERVICE_MAGLEV = _SERVICE["SERVICE_MAGLEV"]
SERVICE_SOURCE = _SERVICE["SERVICE_SOURCE"]
SERVICE_ADOPT = _SERVICE["SERVICE_ADOPT"]
CONFIG_FAST_PATH = read_enum("CONFIG_")["CONFIG_FAST_PATH"]
LINK_MODES = {k[5:].lower(): v for k, v in read_enum("LINK_").items()}   # tx_links' values


def describe(ctype) -> object:
    """A comparable description of a ctypes type: size, and fields with offsets."""
    if isinstance(ctype, type) and issubclass(ctype, ct.Array):
        return ("array", describe(ctype._type_), ctype._length_)
    fields = getattr(ctype, "_fields_", None)
    if not fields:
        return ("scalar", ct.sizeof(ctype))
    return ("struct", ct.sizeof(ctype),
            tuple((f[0], getattr(ctype, f[0]).offset, describe(f[1])) for f in fields))


def check_mirror(name: str, bcc_key, bcc_leaf) -> list[str]:
    """Differences between MAPS[name] and the key/leaf types bcc derived from the C."""
    key, leaf = MAPS[name]
    problems = []
    if key is not None and describe(key) != describe(bcc_key):
        problems.append(f"{name} key: python {describe(key)} != C {describe(bcc_key)}")
    if describe(leaf) != describe(bcc_leaf):
        problems.append(f"{name} value: python {describe(leaf)} != C {describe(bcc_leaf)}")
    return problems


# `struct` (and memoryview) format codes of unsigned integers, by size in bytes.
UNSIGNED_FORMATS = {1: "B", 2: "H", 4: "I", 8: "Q"}


def struct_format(ctype) -> str:
    """A `struct` format for a mirror made of unsigned integers, arrays of them
    and padding (fields named "pad"), little-endian as the maps hold them: for
    reading map dumps in bulk."""
    fmt = "<"
    for name, ftype in ctype._fields_:
        if name == "pad":
            fmt += f"{ct.sizeof(ftype)}x"
        elif issubclass(ftype, ct.Array):
            fmt += f"{ftype._length_}{UNSIGNED_FORMATS[ct.sizeof(ftype._type_)]}"
        else:
            fmt += UNSIGNED_FORMATS[ct.sizeof(ftype)]
    return fmt
