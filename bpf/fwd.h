/* The fast path: send a rewritten packet out without the kernel stack, as a
 * router would (samples/bpf/xdp_fwd_kern.c): ask the kernel's FIB for the next
 * hop, decrement the TTL, set the MACs. What the FIB cannot resolve is left
 * to the kernel, with the reason. The next hop's MTU serves both forwarding
 * modes. */
#ifndef XLB_FWD_H
#define XLB_FWD_H

#include <uapi/linux/if_ether.h>
#include "csum.h"
#include "parse.h"
#include "xlb_shared.h"

#ifndef AF_INET
#define AF_INET 2
#endif

/* A router forwards no packet whose TTL runs out at it: the kernel gets it as
 * it came and answers "time exceeded" from its own address, about what the
 * sender sent. */
static __always_inline int ttl_runs_out(const struct iphdr *ip)
{
	return ip->ttl <= 1;
}

/* TTL - 1, as a router does (the caller saw it above 1); the checksum word
 * holds TTL (its first byte) and protocol. The new word is computed, not read
 * back: a load of the word just after a store to its TTL byte waits for the
 * store (perf put a tenth of an established packet's samples there). */
static __always_inline void ip_decrease_ttl(struct iphdr *ip)
{
	__be16 *word = (__be16 *)&ip->ttl;
	__be16 old = *word;
	__be16 new = old - bpf_htons(0x0100);

	*word = new;
	xlb_csum_apply(&ip->check, xlb_csum_diff16(old, new));
}

/* The FIB query for an IPv4 packet that arrived on ctx's link, as routing
 * sees it (no ports: those only matter to multipath hashing). */
static __always_inline void fib_query(struct bpf_fib_lookup *fib, struct xdp_md *ctx,
				      const struct iphdr *ip)
{
	fib->family = AF_INET;
	fib->tos = ip->tos;
	fib->l4_protocol = ip->protocol;
	fib->tot_len = bpf_ntohs(ip->tot_len);
	fib->ipv4_src = ip->saddr;
	fib->ipv4_dst = ip->daddr;
	fib->ifindex = ctx->ingress_ifindex;
}

/* Resolves the next hop of pkt (already rewritten) arriving on ifindex with
 * bpf_fib_lookup into *hop. Returns a BPF_FIB_LKUP_RET_* code; *mtu is the
 * route's MTU on success and on BPF_FIB_LKUP_RET_FRAG_NEEDED. */
static __always_inline int fib_resolve(struct xdp_md *ctx, struct packet *pkt, struct hop *hop,
				       __u16 *mtu)
{
	struct bpf_fib_lookup fib = {};
	struct iphdr *ip = pkt->ip;
	int rc;

	fib_query(&fib, ctx, ip);
	fib.sport = pkt->ports->source;
	fib.dport = pkt->ports->dest;
	rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		*mtu = fib.mtu_result;
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return rc;
	hop->ifindex = fib.ifindex;
	__builtin_memcpy(hop->dmac, fib.dmac, ETH_ALEN);
	__builtin_memcpy(hop->smac, fib.smac, ETH_ALEN);
	/* The MTU comes only with "too big" (checked before the neighbour): ask
	 * again for the largest packet, with the query as it was: the answer
	 * wrote over it (the link out, a gateway, and the route's metric, which
	 * shares a union with the TOS). */
	fib_query(&fib, ctx, ip);
	fib.tot_len = 0xffff;
	*mtu = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0) ==
	       BPF_FIB_LKUP_RET_FRAG_NEEDED ? fib.mtu_result : 0xffff;
	return rc;
}

static __always_inline void hop_apply(struct ethhdr *eth, const struct hop *hop)
{
	__builtin_memcpy(eth->h_dest, hop->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, hop->smac, ETH_ALEN);
}

#endif
