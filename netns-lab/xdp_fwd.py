#!/usr/bin/python3
"""Attaches an XDP router to the given devices of this namespace: the fast
path's forwarding alone (bpf/fwd.h's TTL and MACs, one bpf_fib_lookup a
packet, XDP_TX/XDP_REDIRECT), with no balancing, no table and no counters.

`make bench` runs it in lb for traffic addressed to the backends themselves:
what forwarding in XDP is worth on this lab's veths. It asks the FIB for
every packet, where xlb's fast path keeps the answer a second (its `hops`
cache): an XDP balancer can pass it by that lookup's cost, not by more. What
the FIB does not resolve (ARP, a missing neighbour, a packet over the MTU)
goes to the kernel.

The attachment is made over netlink, so it outlives this process; `ip link
set DEV xdp off` removes it. Run with Debian's /usr/bin/python3, which has bcc.
"""
import sys
from pathlib import Path

from bcc import BPF

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
SOURCE = r"""
#include <uapi/linux/bpf.h>
#include "parse.h"
#include "fwd.h"

int xdp_fwd(struct xdp_md *ctx)
{
	struct cursor c = { .pos = (void *)(long)ctx->data, .end = (void *)(long)ctx->data_end };
	struct bpf_fib_lookup fib = {};
	struct ethhdr *eth;
	struct iphdr *ip;

	if (parse_ethhdr(&c, &eth) != bpf_htons(ETH_P_IP) || parse_iphdr_fixed(&c, &ip) < 0 ||
	    ip->ttl <= 1)
		return XDP_PASS;
	fib_query(&fib, ctx, ip);
	if (bpf_fib_lookup(ctx, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS)
		return XDP_PASS;
	ip_decrease_ttl(ip);
	__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
	if (fib.ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	return bpf_redirect(fib.ifindex, 0);
}
"""

bpf = BPF(text=SOURCE, cflags=[f"-I{BPF_DIR}", "-w"])
fn = bpf.load_func("xdp_fwd", BPF.XDP)
for dev in sys.argv[1:]:
    BPF.attach_xdp(dev, fn, BPF.XDP_FLAGS_DRV_MODE)
