"""control/layout.py against bpf/: the ctypes mirrors, the reasons and their actions.

The mirrors are compared with the types bcc derives from the C: for the real
program (all must match), and for a copy of bpf/ with a changed header (the
change must be reported), so the check is known to be able to fail.
"""

import ctypes as ct
import re
import shutil
import socket
from ipaddress import IPv4Address

import pytest
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw, raw

from packets import BACKEND_MAC, CLIENT_MAC, LB_MAC, VIP_MAC, Harness, tcp_frame
from xlb import layout
from xlb.layout import BPF_DIR, MAPS, REASON_ACTIONS, REASON_NAMES, REASONS, XDP_ACTIONS

pytestmark = pytest.mark.kernel


def bcc_types(table):
    """The key and the (per-CPU: one CPU's) value type bcc derived, as Datapath reads them."""
    return table.Key, getattr(table, "sLeaf", table.Leaf)


def declared_maps(source: str) -> set[str]:
    """Names of the maps that bpf/xlb.c declares with bcc's macros."""
    names = set(re.findall(r"^BPF_(?!TABLE)\w+\((\w+),", source, re.M))
    names |= set(re.findall(r'^BPF_TABLE\("\w+",[^,]+,[^,]+,\s*(\w+),', source, re.M))
    return names


def test_the_program_includes_no_kernel_internal_header():
    """bcc compiles against the kernel's build tree, where <linux/ip.h> is the
    kernel's own header and pulls in sk_buff and the net device: 1.3 s of a
    3.1 s compile, paid by every `xlb up`, adoption and test. The program
    needs only the UAPI (<uapi/linux/...>)."""
    included = {path.name: re.findall(r"^#include <([^>]+)>", path.read_text(), re.M)
                for path in sorted(BPF_DIR.glob("*.[ch]"))}
    assert included["xlb.c"]            # the check reads what the files include
    assert {name: [h for h in headers if not h.startswith("uapi/")]
            for name, headers in included.items()} == {name: [] for name in included}


# Mirrors ---------------------------------------------------------------------------

def test_every_map_has_a_mirror():
    assert declared_maps((BPF_DIR / "xlb.c").read_text()) == set(MAPS)


@pytest.mark.parametrize("name", list(MAPS))
def test_mirror_matches_loaded_program(datapath, name):
    table = datapath._bpf[name]  # the bcc object this Datapath loaded
    assert layout.check_mirror(name, *bcc_types(table)) == []


def test_drift_in_the_c_is_reported(root, tmp_path):
    """A copy of bpf/ whose header gains a field in struct flow and one in
    struct backend, compiled the way Datapath compiles bpf/."""
    from bcc import BPF
    from xlb.datapath import Limits, defines

    src = tmp_path / "bpf"
    shutil.copytree(BPF_DIR, src)
    header = src / "xlb_shared.h"
    text = header.read_text()
    flow_mid = "\t__u32 service_id;\n\t__u32 backend_id;\n"
    backend_end = "\t__be16 port;\n\t__u16 flags;\n};"
    assert text.count(flow_mid) == 1 and text.count(backend_end) == 1
    text = text.replace(flow_mid, flow_mid + "\t__u32 extra;\n")
    text = text.replace(backend_end, "\t__be16 port;\n\t__u16 flags;\n\t__u16 weight;\n};")
    header.write_text(text)

    # struct flow is in a frame's struct too, whose check would stop the compile.
    cflags = [f for f in defines(Limits()) if not f.startswith("-DXLB_FRAME_MIRRORS=")]
    bpf = BPF(src_file=str(src / "xlb.c"),
              cflags=[f"-I{src}", "-w", *cflags, "-DXLB_FRAME_MIRRORS="])
    try:
        problems = {name: layout.check_mirror(name, *bcc_types(bpf[name])) for name in MAPS}
    finally:
        bpf.cleanup()
    assert {name for name, p in problems.items() if p} == {"flows", "flows_new", "frags",
                                                           "backends"}
    for table in ("flows", "flows_new", "frags"):
        (flows,) = problems[table]
        assert flows.startswith(f"{table} value:") and "'extra'" in flows
    (backends,) = problems["backends"]
    assert backends.startswith("backends value:") and "'weight'" in backends


class FlowPortWidened(ct.Structure):
    _fields_ = [("addr", ct.c_uint32), ("port", ct.c_uint32), ("dir", ct.c_uint8),
                ("state", ct.c_uint8), ("service_id", ct.c_uint32), ("backend_id", ct.c_uint32),
                ("timeout", ct.c_uint32), ("seen", ct.c_uint64)]


class FlowKeyPortsSwapped(ct.Structure):
    _fields_ = [("saddr", ct.c_uint32), ("daddr", ct.c_uint32), ("dport", ct.c_uint16),
                ("sport", ct.c_uint16), ("proto", ct.c_uint8), ("pad", ct.c_uint8 * 3)]


def test_drift_in_the_python_is_reported(datapath, monkeypatch):
    key, leaf = bcc_types(datapath._bpf["flows"])
    monkeypatch.setitem(MAPS, "flows", (layout.FlowKey, FlowPortWidened))
    (problem,) = layout.check_mirror("flows", key, leaf)
    assert problem.startswith("flows value:")
    # Same sizes and offsets, other names: still a difference.
    monkeypatch.setitem(MAPS, "flows", (FlowKeyPortsSwapped, layout.Flow))
    (problem,) = layout.check_mirror("flows", key, leaf)
    assert problem.startswith("flows key:")


def test_datapath_refuses_to_load_with_a_drifted_mirror(root, monkeypatch):
    from xlb.datapath import Datapath, DatapathError

    monkeypatch.setitem(MAPS, "flows", (layout.FlowKey, FlowPortWidened))
    with pytest.raises(DatapathError, match="flows value"):
        Datapath()


# Reasons ---------------------------------------------------------------------------

class ReapHeadSwapped(ct.Structure):
    _fields_ = [("removed", ct.c_uint32), ("table", ct.c_uint32)]


class ReapEntryValueFirst(ct.Structure):
    _fields_ = [("value", layout.Flow), ("key", layout.FlowKey)]


@pytest.mark.parametrize("name, drifted", [("reap_head", ReapHeadSwapped),
                                           ("reap_entry", ReapEntryValueFirst)])
def test_a_frame_mirror_that_drifts_fails_the_compile(root, monkeypatch, capfd, name, drifted):
    """The frames' structs are in no map, so bcc derives no type to compare:
    the compiler checks them against layout.FRAMES (two fields of one size
    swapped here, which sizes alone would not show)."""
    from bcc import BPF
    from xlb.datapath import Limits, defines

    assert "table" in layout.frame_asserts() and "value" in layout.frame_asserts()
    monkeypatch.setitem(layout.FRAMES, name, drifted)
    with pytest.raises(Exception, match="Failed to compile BPF module"):
        BPF(src_file=str(BPF_DIR / "xlb.c"), cflags=[f"-I{BPF_DIR}", "-w", *defines(Limits())])
    assert "a frame's struct differs from layout.py's" in capfd.readouterr().err


def test_read_reasons_reads_the_whole_list():
    text = layout.SHARED_HEADER.read_text()
    block = text[text.index("#define XLB_REASONS(X)"):text.index("#define XLB_REASON_ENUM")]
    assert len(REASONS) == block.count("X(") > 0
    assert len(set(REASON_NAMES)) == len(REASON_NAMES)
    assert set(REASON_ACTIONS) <= set(XDP_ACTIONS)
    assert len(REASONS) <= 42  # stats.h: three bits a reason, in two 64-bit constants
    assert REASON_NAMES == tuple(name.lower() for name, _ in REASONS)


def test_read_reasons_parses_a_header(tmp_path):
    header = tmp_path / "h.h"
    header.write_text("#define XLB_REASONS(X) \\\n"
                      "\tX(ONE, XDP_PASS) /* a comment */ \\\n"
                      "\tX(TWO,XDP_DROP) \\\n"
                      "\tX(THREE,  XDP_TX)\n"
                      "#define XLB_REASON_ENUM(name, action) XLB_##name,\n")
    assert layout.read_reasons(header) == (("ONE", "XDP_PASS"), ("TWO", "XDP_DROP"),
                                           ("THREE", "XDP_TX"))


def test_reason_max_is_the_number_of_reasons(datapath):
    # reason_stats has XLB_REASON_MAX entries: the enum's last value.
    assert datapath._bpf["reason_stats"].max_entries == len(REASONS)
    assert tuple(datapath.reason_counters()) == REASON_NAMES


VIP = IPv4Address("10.1.1.101")
CLIENT = IPv4Address("10.1.1.10")
BACKEND = (IPv4Address("10.1.11.101"), 8080)


def _arp_request(pdst):
    return raw(Ether(dst="ff:ff:ff:ff:ff:ff", src=CLIENT_MAC)
               / ARP(op=1, hwsrc=CLIENT_MAC, psrc=str(CLIENT), pdst=str(pdst)))


def _syn(src, sport, **kw):
    return tcp_frame(src, VIP, sport, 80, **kw)


def _synack(dst, dport, payload=b"", **kw):
    return tcp_frame(BACKEND[0], dst, BACKEND[1], dport, flags="SA", eth_src=BACKEND_MAC,
                     payload=payload, **kw)


def _icmp_error(src, dst, quoted: bytes) -> bytes:
    """Port unreachable from src to dst, quoting the IP packet of a frame."""
    return raw(Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=str(src), dst=str(dst))
               / ICMP(type=3, code=3) / Raw(quoted[14:14 + 28]))


FAR_CLIENT = "198.51.100.10"    # FibNet: via 10.1.1.2, whose MAC is unknown
LOST_CLIENT = "203.0.113.10"    # FibNet: blackholed
SMALL_CLIENT = "10.1.13.50"     # FibNet: on the link with MTU 1280

# reason -> (frames to send first, the frame, ingress ifindex or FibNet link, fast path)
TRIGGERS = {
    "pass_not_ip": ((), raw(Ether(src=CLIENT_MAC, dst=LB_MAC) / IPv6() / TCP(dport=80)), 0, False),
    "pass_arp": ((), _arp_request("10.1.1.200"), 1, False),
    "pass_short": ((), tcp_frame(CLIENT, VIP, 30000, 80)[:14 + 19], 0, False),
    "pass_not_vip": ((), tcp_frame(CLIENT, "10.1.1.200", 30001, 80), 0, False),
    "forward": ((), _syn(CLIENT, 30002), 0, False),
    "reply": ((_syn(CLIENT, 30003),), _synack(CLIENT, 30003), 0, False),
    "arp_reply": ((), _arp_request(VIP), 1, False),
    "drop_malformed": ((), tcp_frame(CLIENT, VIP, 30004, 80)[:14 + 30], 0, False),
    "drop_fragment": ((), tcp_frame(CLIENT, VIP, 30005, 80, ip_flags=0, frag=185), 0, False),
    "drop_no_backend": ((), tcp_frame(CLIENT, VIP, 30006, 443), 0, False),
    "forward_tx": ((), _syn(CLIENT, 30007), "int", True),
    "forward_redirect": ((), _syn(CLIENT, 30008), "ext", True),
    "reply_tx": ((_syn(CLIENT, 30009),), _synack(CLIENT, 30009), "ext", True),
    "reply_redirect": ((_syn(CLIENT, 30010),), _synack(CLIENT, 30010), "int", True),
    "fib_no_neigh": ((_syn(FAR_CLIENT, 30011),), _synack(FAR_CLIENT, 30011), "int", True),
    "fib_no_route": ((_syn(LOST_CLIENT, 30012),), _synack(LOST_CLIENT, 30012), "int", True),
    "fib_frag_needed": ((_syn(SMALL_CLIENT, 30013),),
                        _synack(SMALL_CLIENT, 30013, payload=b"x" * 1300, ip_flags=0), "int", True),
    "icmp_too_big": ((_syn(SMALL_CLIENT, 30016),),
                     _synack(SMALL_CLIENT, 30016, payload=b"x" * 1300), "int", True),
    "icmp_echo_reply": ((), raw(Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=str(CLIENT), dst=str(VIP))
                                / ICMP(id=7, seq=1) / Raw(b"ping")), 0, False),
    "icmp_to_backend": ((_syn(CLIENT, 30017),),
                        _icmp_error(CLIENT, VIP, tcp_frame(VIP, CLIENT, 80, 30017)), 0, False),
    "icmp_to_client": ((_syn(CLIENT, 30018),),
                       _icmp_error(BACKEND[0], CLIENT, tcp_frame(CLIENT, BACKEND[0], 30018,
                                                                 BACKEND[1])), 0, False),
    "fib_fwd_disabled": ((), _syn(CLIENT, 30014), "nofwd", True),
    "ttl_expired": ((), _syn(CLIENT, 30015, ttl=1), "ext", True),
    "drop_no_service": ((), tcp_frame(CLIENT, VIP, 30019, 22), 0, False),
    "pass_not_unicast": ((), tcp_frame(CLIENT, VIP, 30020, 80, eth_dst="ff:ff:ff:ff:ff:ff"), 0,
                         False),
}


@pytest.fixture(scope="module")
def lb(datapath, fibnet):
    datapath.set_backend(1, *BACKEND)
    datapath.write_ring(2, [1])
    datapath.set_service(VIP, 80, socket.IPPROTO_TCP, 1, 2, 1)
    datapath.set_service(VIP, 443, socket.IPPROTO_TCP, 2, 4, 0)
    datapath.set_vip(VIP)
    datapath.set_arp(1, VIP, bytes.fromhex(VIP_MAC.replace(":", "")))
    fibnet.as_native(datapath)
    return Harness(datapath, service_ids=(1, 2), backend_ids=(1,))


def test_every_reason_has_a_trigger():
    assert set(TRIGGERS) == set(REASON_NAMES)


@pytest.mark.parametrize("reason", REASON_NAMES)
def test_reason_action_agrees_with_the_program(lb, fibnet, reason):
    """The C's action for each reason (stats.h reason_action) is the one
    layout.REASON_ACTIONS reads from the header, and the frame is counted under it."""
    if reason not in TRIGGERS:
        pytest.fail(f"no frame in TRIGGERS makes the program end in {reason}")
    setup, frame, ifindex, fast = TRIGGERS[reason]
    if isinstance(ifindex, str):
        ifindex = fibnet.ifindex[ifindex]
    lb.dp.set_forwarding(fast)
    for earlier in setup:
        assert lb.send(earlier, ifindex).action != XDP_ACTIONS["XDP_ABORTED"]
    res = lb.send(frame, ifindex)
    assert res.action == XDP_ACTIONS[REASON_ACTIONS[REASON_NAMES.index(reason)]]
    reasons_moved = {k: v for k, v in lb.last_delta.items() if k.startswith("reason.")}
    assert reasons_moved == {f"reason.{reason}.packets": 1, f"reason.{reason}.bytes": len(frame)}


# The reasons as released, in order: reason_stats is indexed by position and
# kept across an upgrade (an adoption takes over the running maps), so a
# reason inserted before one of these would count under another's name.
RELEASED_REASONS = (
    "pass_not_ip", "pass_arp", "pass_short", "pass_not_vip", "forward", "reply",
    "arp_reply", "drop_malformed", "drop_fragment", "drop_no_backend", "forward_tx",
    "forward_redirect", "reply_tx", "reply_redirect", "fib_no_neigh", "fib_no_route",
    "fib_frag_needed", "fib_fwd_disabled", "ttl_expired", "icmp_echo_reply",
    "icmp_too_big", "icmp_to_backend", "icmp_to_client", "drop_no_service")


def test_new_reasons_go_after_the_released_ones():
    assert REASON_NAMES[:len(RELEASED_REASONS)] == RELEASED_REASONS
