/* Address and port rewriting with the IP and L4 checksums kept correct. */
#ifndef XLB_NAT_H
#define XLB_NAT_H

#include "csum.h"
#include "parse.h"

/* Replaces one endpoint of the packet: *addr and *port (both inside pkt) by
 * new_addr and new_port. The address is in the IP header and the L4
 * pseudo-header; the port only in the L4 header. */
static __always_inline void nat_rewrite(struct packet *pkt, __be32 *addr, __be16 *port,
					__be32 new_addr, __be16 new_port)
{
	__u32 addr_diff = xlb_csum_diff32(*addr, new_addr);

	xlb_csum_apply(&pkt->ip->check, addr_diff);
	xlb_l4_csum_apply(pkt->l4_csum, pkt->proto, addr_diff + xlb_csum_diff16(*port, new_port));
	*addr = new_addr;
	*port = new_port;
}

/* Replaces an address of the IP header alone, for what has no L4 checksum
 * over it: ICMP (no pseudo-header), a fragment after the first. */
static __always_inline void nat_ip_address(struct iphdr *ip, __be32 *addr, __be32 new_addr)
{
	xlb_csum_apply(&ip->check, xlb_csum_diff32(*addr, new_addr));
	*addr = new_addr;
}

/* nat_rewrite for a GRO or GSO aggregate (which generic XDP sees whole): its
 * L4 checksum is partial (CHECKSUM_PARTIAL), the pseudo-header's sum, not
 * inverted, that the kernel completes over each segment it cuts. The sum
 * takes the addresses' change as it is (a checksum takes its complement);
 * the ports are summed with the segments. */
static __always_inline void nat_rewrite_partial(struct packet *pkt, __be32 *addr, __be16 *port,
						__be32 new_addr, __be16 new_port)
{
	*pkt->l4_csum = ~xlb_csum_fold((__u16)*pkt->l4_csum + xlb_csum_diff32(*addr, new_addr));
	nat_ip_address(pkt->ip, addr, new_addr);
	*port = new_port;
}

static __always_inline void nat_dest(struct packet *pkt, __be32 addr, __be16 port)
{
	nat_rewrite(pkt, &pkt->ip->daddr, &pkt->ports->dest, addr, port);
}

static __always_inline void nat_source(struct packet *pkt, __be32 addr, __be16 port)
{
	nat_rewrite(pkt, &pkt->ip->saddr, &pkt->ports->source, addr, port);
}

/* A balanced packet's rewrite: a reply's source becomes its service's, a
 * forwarded packet's destination its backend's. */
static __always_inline void nat_flow(struct packet *pkt, int reply, __be32 addr, __be16 port)
{
	if (reply)
		nat_source(pkt, addr, port);
	else
		nat_dest(pkt, addr, port);
}

/* nat_flow for an aggregate (nat_rewrite_partial). */
static __always_inline void nat_flow_partial(struct packet *pkt, int reply, __be32 addr,
					     __be16 port)
{
	if (reply)
		nat_rewrite_partial(pkt, &pkt->ip->saddr, &pkt->ports->source, addr, port);
	else
		nat_rewrite_partial(pkt, &pkt->ip->daddr, &pkt->ports->dest, addr, port);
}

#endif
