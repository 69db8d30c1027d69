/* The fast path: send a rewritten packet out without the kernel stack, as a
 * router would (samples/bpf/xdp_fwd_kern.c): ask the kernel's FIB for the next
 * hop, decrement the TTL, set the MACs. What the FIB cannot resolve is left
 * to the kernel, with the reason. */
#ifndef XLB_FWD_H
#define XLB_FWD_H

#include <linux/if_ether.h>
#include "csum.h"
#include "parse.h"

#ifndef AF_INET
#define AF_INET 2
#endif

/* TTL - 1, as a router does; the checksum word holds TTL and protocol. */
static __always_inline void ip_decrease_ttl(struct iphdr *ip)
{
	__be16 *word = (__be16 *)&ip->ttl;
	__be16 old = *word;

	ip->ttl -= 1;
	xlb_csum_apply(&ip->check, xlb_csum_diff16(old, *word));
}

/* Looks up the next hop of pkt (already rewritten) arriving on ifindex. Returns
 * a BPF_FIB_LKUP_RET_* code; on success fills *out_ifindex and the MACs, on
 * BPF_FIB_LKUP_RET_FRAG_NEEDED *out_mtu. */
static __always_inline int fib_next_hop(struct xdp_md *ctx, struct packet *pkt,
					__u32 *out_ifindex, __u16 *out_mtu)
{
	struct bpf_fib_lookup fib = {};
	struct iphdr *ip = pkt->ip;
	int rc;

	fib.family = AF_INET;
	fib.tos = ip->tos;
	fib.l4_protocol = ip->protocol;
	fib.sport = pkt->ports->source;
	fib.dport = pkt->ports->dest;
	fib.tot_len = bpf_ntohs(ip->tot_len);
	fib.ipv4_src = ip->saddr;
	fib.ipv4_dst = ip->daddr;
	fib.ifindex = ctx->ingress_ifindex;
	rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		*out_mtu = fib.mtu_result;
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return rc;
	__builtin_memcpy(pkt->eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(pkt->eth->h_source, fib.smac, ETH_ALEN);
	*out_ifindex = fib.ifindex;
	return rc;
}

#endif
