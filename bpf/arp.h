/* ARP for VIPs: recognising a request and turning it into its reply in place.
 * The VIP is not a local address of the balancer (replies leaving with a
 * local source address would look martian), so the kernel never answers for
 * it; the program does, on the links the control plane chose. */
#ifndef XLB_ARP_H
#define XLB_ARP_H

#include "parse.h"

/* uapi/linux/if_arp.h would pull in the kernel's netdevice.h (for
 * MAX_ADDR_LEN): a second of every compile. */
#define ARPHRD_ETHER 1
#define ARPOP_REQUEST 1
#define ARPOP_REPLY 2

struct arphdr {
	__be16 ar_hrd;
	__be16 ar_pro;
	__u8 ar_hln;
	__u8 ar_pln;
	__be16 ar_op;
};

/* The Ethernet/IPv4 body that follows struct arphdr. */
struct arp_ipv4 {
	__u8 sha[ETH_ALEN];
	__be32 sip;
	__u8 tha[ETH_ALEN];
	__be32 tip;
} __attribute__((packed));

/* Returns the body of an Ethernet/IPv4 ARP request, or NULL. An announcement
 * (RFC 5227: the sender's own address asked, as a node taking a VIP over
 * sends it) asks nothing: NULL, as Linux answers none for its own address. */
static __always_inline struct arp_ipv4 *parse_arp_request(struct cursor *c)
{
	struct arphdr *ah = c->pos;
	struct arp_ipv4 *body = (void *)(ah + 1);

	if ((void *)(body + 1) > c->end)
		return NULL;
	if (ah->ar_hrd != bpf_htons(ARPHRD_ETHER) || ah->ar_pro != bpf_htons(ETH_P_IP) ||
	    ah->ar_hln != ETH_ALEN || ah->ar_pln != 4 || ah->ar_op != bpf_htons(ARPOP_REQUEST) ||
	    body->sip == body->tip)
		return NULL;
	return body;
}

/* Rewrites the request into "tip is at mac", addressed back to its sender's
 * hardware address (RFC 826; Linux too), which the frame's source may not be. */
static __always_inline void arp_make_reply(struct ethhdr *eth, struct arp_ipv4 *body,
					   const __u8 *mac)
{
	struct arphdr *ah = (struct arphdr *)body - 1;
	__be32 asked = body->tip;

	ah->ar_op = bpf_htons(ARPOP_REPLY);
	__builtin_memcpy(body->tha, body->sha, ETH_ALEN);
	body->tip = body->sip;
	__builtin_memcpy(body->sha, mac, ETH_ALEN);
	body->sip = asked;
	__builtin_memcpy(eth->h_dest, body->tha, ETH_ALEN);
	__builtin_memcpy(eth->h_source, mac, ETH_ALEN);
}

#endif
