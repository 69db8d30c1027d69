/* ICMP for VIPs: echo replies, xlb's own "fragmentation needed", and the
 * rewrite that makes an ICMP error about a balanced flow match the connection
 * its receiver knows (outer and inner headers, every checksum kept right). */
#ifndef XLB_ICMP_H
#define XLB_ICMP_H

#include <uapi/linux/icmp.h>
#include "csum.h"
#include "parse.h"

#define XLB_ICMP_QUOTE 8	/* bytes of the offending packet's payload xlb's errors quote */

/* An ICMP error (destination unreachable, time exceeded, parameter problem,
 * as Linux's NAT translates them; not the obsolete source quench, nor a
 * redirect, which is for the hosts of a router's own link) and the TCP or UDP
 * packet it quotes: the inner IP header (options and all, no later fragment)
 * and its ports. */
struct icmp_error {
	struct icmphdr *icmp;
	struct iphdr *inner;
	struct l4ports *ports;
	__sum16 *inner_l4_csum;	/* NULL when the quote does not reach it */
};

/* The ICMP header of an IPv4 packet that lies whole in the frame, or NULL.
 * A fragment's is not all of the message: the caller turns fragments away. */
static __always_inline struct icmphdr *parse_icmp(struct cursor *c, struct iphdr *ip)
{
	int hlen = ip_header_len(c, ip);
	struct icmphdr *icmp;

	if (hlen < 0 || bpf_ntohs(ip->tot_len) < hlen + sizeof(*icmp))
		return NULL;
	icmp = (void *)ip + hlen;
	if ((void *)(icmp + 1) > c->end)
		return NULL;
	c->pos = icmp + 1;
	return icmp;
}

/* Fills *err for an error that quotes a TCP or UDP packet, at least its
 * ports, inside the outer datagram. The quoted L4 checksum is rewritten only
 * where the quote holds it: bytes past the outer total length are no part of
 * the message. Returns 0 or -1. */
static __always_inline int parse_icmp_error(struct cursor *c, struct iphdr *outer,
					    struct icmphdr *icmp, struct icmp_error *err)
{
	struct iphdr *inner = (void *)(icmp + 1);
	struct l4ports *ports;
	__u32 quoted;	/* bytes from the outer IP header to the quoted ports */
	__u32 room;	/* bytes of the quoted L4 header inside the outer datagram */

	if (icmp->type != ICMP_DEST_UNREACH && icmp->type != ICMP_TIME_EXCEEDED &&
	    icmp->type != ICMP_PARAMETERPROB)
		return -1;
	if ((void *)(inner + 1) > c->end || inner->version != 4 || inner->ihl < 5)
		return -1;
	/* The quoted packet's options, if any, come before its ports (as Linux's
	 * NAT and IPVS read them): they are a 4-byte multiple, so the ports and
	 * the checksums stay on the 16-bit words the ICMP checksum sums. */
	ports = (void *)inner + inner->ihl * 4;
	quoted = sizeof(*icmp) + inner->ihl * 4 + outer->ihl * 4;
	if ((void *)(ports + 1) > c->end || bpf_ntohs(outer->tot_len) < quoted + sizeof(*ports))
		return -1;
	/* A later fragment's first bytes are payload, not ports: no flow's
	 * (as Linux's conntrack finds no tuple in such a quote). */
	if (ip_is_later_fragment(inner) ||
	    (inner->protocol != IPPROTO_TCP && inner->protocol != IPPROTO_UDP))
		return -1;
	room = bpf_ntohs(outer->tot_len) - quoted;
	err->icmp = icmp;
	err->inner = inner;
	err->ports = ports;
	err->inner_l4_csum = NULL;
	if (inner->protocol == IPPROTO_UDP) {
		struct udphdr *uh = (void *)ports;

		if ((void *)(uh + 1) <= c->end && room >= sizeof(*uh))
			err->inner_l4_csum = &uh->check;
	} else {
		struct tcphdr *th = (void *)ports;
		__u32 end_of_check = offsetof(struct tcphdr, check) + sizeof(th->check);

		if ((void *)th + end_of_check <= c->end && room >= end_of_check)
			err->inner_l4_csum = &th->check;
	}
	return 0;
}

/* Replaces one endpoint of the quoted packet (*addr and *port inside it) and
 * keeps its IP and L4 checksums and the ICMP checksum over all of it right. */
static __always_inline void icmp_nat_inner(struct icmp_error *err, __be32 *addr, __be16 *port,
					   __be32 new_addr, __be16 new_port)
{
	__u32 addr_diff = xlb_csum_diff32(*addr, new_addr);
	__u32 port_diff = xlb_csum_diff16(*port, new_port);
	__sum16 old = err->inner->check;
	__u32 icmp_diff = addr_diff + port_diff;

	xlb_csum_apply(&err->inner->check, addr_diff);
	icmp_diff += xlb_csum_diff16(old, err->inner->check);
	if (err->inner_l4_csum) {
		old = *err->inner_l4_csum;
		xlb_l4_csum_apply(err->inner_l4_csum, err->inner->protocol, addr_diff + port_diff);
		icmp_diff += xlb_csum_diff16(old, *err->inner_l4_csum);
	}
	*addr = new_addr;
	*port = new_port;
	xlb_csum_apply(&err->icmp->checksum, icmp_diff);
}

static __always_inline void swap_macs(struct ethhdr *eth)
{
	__u8 tmp[ETH_ALEN];

	__builtin_memcpy(tmp, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, tmp, ETH_ALEN);
}

/* Turns an echo request in place into its reply, back where it came from.
 * Without DF, as Linux answers (its ICMP socket's IP_PMTUDISC_DONT): a router
 * before a narrower link on the way back fragments it, where its "too big"
 * about a reply with DF would reach the VIP, about no flow (iputils' ping
 * sets DF on its requests). A request with DF is atomic, and its id need not
 * be unique (RFC 6864; Linux sends 0 from some sockets): the reply, which may
 * be fragmented, gets its own. */
static __always_inline void icmp_echo_reply(struct ethhdr *eth, struct iphdr *ip,
					    struct icmphdr *icmp)
{
	__be32 addr = ip->saddr;
	__be16 *word = (__be16 *)icmp, old = *word;
	__be16 *ttl = (__be16 *)&ip->ttl, old_ttl = *ttl;
	__be16 old_frag = ip->frag_off, old_id = ip->id;

	swap_macs(eth);
	ip->saddr = ip->daddr;		/* a swap leaves the IP checksum as it is */
	ip->daddr = addr;
	ip->ttl = 64;
	if (ip->frag_off & bpf_htons(XLB_IP_DF)) {
		ip->frag_off &= ~bpf_htons(XLB_IP_DF);
		ip->id = bpf_get_prandom_u32();
	}
	xlb_csum_apply(&ip->check, xlb_csum_diff16(old_ttl, *ttl) +
				   xlb_csum_diff16(old_frag, ip->frag_off) +
				   xlb_csum_diff16(old_id, ip->id));
	icmp->type = ICMP_ECHOREPLY;
	xlb_csum_apply(&icmp->checksum, xlb_csum_diff16(old, *word));
	/* A reply of all zeros (id, sequence, data) sums to +0, which the update
	 * takes for -0: its 0x0000 fails the sender's check. 0xffff (Linux's for
	 * it) verifies for either zero. */
	if (!icmp->checksum)
		icmp->checksum = (__sum16)0xffff;
}

static __always_inline __sum16 csum_of(void *start, __u32 size)
{
	return xlb_csum_fold(bpf_csum_diff(NULL, 0, start, size, 0));
}

#define XLB_QUOTE_MAX (60 + XLB_ICMP_QUOTE)	/* the longest IP header, and 8 bytes */
/* The bytes from the IP header on that the error needs, and the frame's. */
#define XLB_FRAG_NEEDED_IP_MAX (sizeof(struct iphdr) + sizeof(struct icmphdr) + XLB_QUOTE_MAX)
#define XLB_FRAG_NEEDED_MAX (sizeof(struct ethhdr) + XLB_FRAG_NEEDED_IP_MAX)

/* Turns the frame (an untagged IPv4 packet as its sender sent it, of at least
 * XLB_FRAG_NEEDED_MAX bytes) into ICMP "fragmentation needed" with next-hop
 * MTU mtu, from `from` back to the sender, quoting its IP header, options and
 * all (RFC 792: the sender finds its connection by the ports after them), and
 * first 8 bytes. Returns 0, or -1 with the frame as it was if it cannot be
 * done. */
static __always_inline int icmp_frag_needed(struct xdp_md *ctx, __be32 from, __u16 mtu)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	__u32 quote[XLB_QUOTE_MAX / 4], *to;
	struct icmphdr *icmp;
	struct ethhdr *eth;
	struct iphdr *ip;
	__u32 len, sum;

	if (data + XLB_FRAG_NEEDED_MAX > end)
		return -1;
	ip = data + sizeof(*eth);
	len = ip->ihl * 4 + XLB_ICMP_QUOTE;
	if (len < sizeof(*ip) + XLB_ICMP_QUOTE)
		return -1;
	__builtin_memcpy(quote, ip, sizeof(quote));
	/* Zeros past the quote: the checksum can sum the whole buffer. */
#pragma unroll
	for (int i = (sizeof(*ip) + XLB_ICMP_QUOTE) / 4; i < XLB_QUOTE_MAX / 4; i++)
		if (i * 4 >= len)
			quote[i] = 0;
	/* Shrink first: what the error needs lies in the frame's first bytes. */
	if (bpf_xdp_adjust_tail(ctx, (int)(sizeof(*eth) + sizeof(*ip) + sizeof(*icmp) + len) -
				     (int)(end - data)))
		return -1;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	eth = data;
	ip = (void *)(eth + 1);
	icmp = (void *)(ip + 1);
	to = (void *)(icmp + 1);
	if ((void *)to + sizeof(*ip) + XLB_ICMP_QUOTE > end)
		return -1;
	/* The frame ends with the quote: copied up to its end. */
#pragma unroll
	for (int i = 0; i < XLB_QUOTE_MAX / 4; i++) {
		if ((void *)(to + i + 1) > end)
			break;
		to[i] = quote[i];
	}
	swap_macs(eth);
	*(__u8 *)ip = 0x45;			/* version 4, no options */
	ip->daddr = ip->saddr;
	ip->saddr = from;
	ip->tos = 0xc0;				/* internetwork control, as the kernel sends it */
	ip->tot_len = bpf_htons(sizeof(*ip) + sizeof(*icmp) + len);
	ip->id = 0;
	ip->frag_off = 0;
	ip->ttl = 64;
	ip->protocol = IPPROTO_ICMP;
	ip->check = 0;
	ip->check = csum_of(ip, sizeof(*ip));
	icmp->type = ICMP_DEST_UNREACH;
	icmp->code = ICMP_FRAG_NEEDED;
	icmp->checksum = 0;
	icmp->un.frag.__unused = 0;
	icmp->un.frag.mtu = bpf_htons(mtu);
	sum = bpf_csum_diff(NULL, 0, quote, sizeof(quote), 0);
	icmp->checksum = xlb_csum_fold(bpf_csum_diff(NULL, 0, (void *)icmp, sizeof(*icmp), sum));
	return 0;
}

#endif
