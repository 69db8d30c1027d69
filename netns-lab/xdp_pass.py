#!/usr/bin/python3
"""Attaches a pass-through XDP program to the given devices of this namespace.

On kernel 6.18 a veth delivers the XDP_TX frames of its peer only when it runs
an XDP program of its own (GRO alone, which also turns NAPI on, was seen not
to do it). xlb answers ARP for the VIP with XDP_TX, so the switch ports facing
the balancer get this program. Physical NICs need nothing of the kind.

The attachment is made over netlink, so it outlives this process and goes with
the namespace. Run with Debian's /usr/bin/python3, which has bcc.
"""
import sys

from bcc import BPF

bpf = BPF(text="int xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }")
fn = bpf.load_func("xdp_pass", BPF.XDP)
for dev in sys.argv[1:]:
    BPF.attach_xdp(dev, fn, BPF.XDP_FLAGS_DRV_MODE)
