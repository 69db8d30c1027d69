/* Bounds-checked header parsing with a cursor, as in xdp-tutorial's
 * parsing_helpers.h. Each parser checks `hdr + 1 > end` before any read. The
 * priority tag that parse_ethhdr steps over is removed here too. */
#ifndef XLB_PARSE_H
#define XLB_PARSE_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

/* From the kernel's net/ip.h, which is not UAPI. */
#define XLB_IP_DF 0x4000
#define XLB_IP_MF 0x2000
#define XLB_IP_OFFSET 0x1fff

struct cursor {
	void *pos;
	void *end;
};

/* TCP and UDP headers both start with the two ports. */
struct l4ports {
	__be16 source;
	__be16 dest;
};

/* An IPv4 TCP or UDP packet whose headers are all inside the frame. */
struct packet {
	struct ethhdr *eth;
	struct iphdr *ip;
	struct l4ports *ports;
	__sum16 *l4_csum;
	struct tcphdr *tcp;	/* NULL for UDP */
	__u8 proto;
	__u8 first_fragment;	/* of a fragmented datagram: see frags */
};

/* An 802.1Q tag, after the MACs (linux/if_vlan.h is not UAPI). */
struct vlan_hdr {
	__be16 h_vlan_TCI;
	__be16 h_vlan_encapsulated_proto;
};

#define XLB_VLAN_VID_MASK 0x0fff

/* Returns the EtherType (network order) or -1 if the header is cut short.
 * A priority tag (802.1p: 802.1Q's TPID, VLAN ID 0) marks the link's own
 * untagged traffic with a priority alone, and Linux clears it on receive: it
 * is stepped over, the cursor moves past it and the EtherType is the one
 * under it. Any other tag (a VLAN's, 802.1ad's, a second one) is the
 * EtherType returned: not xlb's. An untagged frame pays one compare for it. */
static __always_inline int parse_ethhdr(struct cursor *c, struct ethhdr **eth)
{
	struct ethhdr *h = c->pos;
	struct vlan_hdr *tag;

	if ((void *)(h + 1) > c->end)
		return -1;
	c->pos = h + 1;
	*eth = h;
	if (h->h_proto != bpf_htons(ETH_P_8021Q))
		return h->h_proto;
	tag = c->pos;
	if ((void *)(tag + 1) > c->end)
		return -1;
	if (tag->h_vlan_TCI & bpf_htons(XLB_VLAN_VID_MASK))
		return h->h_proto;
	c->pos = tag + 1;
	return tag->h_vlan_encapsulated_proto;
}

/* Removes the priority tag that parse_ethhdr stepped over, if the frame
 * starting at eth has one (the caller parsed past it: the frame holds it):
 * the MACs move up over it. What xlb sends out itself (the fast path's
 * packets, its answers) leaves untagged, as the kernel sends what it routes
 * or answers (it cleared the tag on receive): the same frames in both
 * forwarding modes, and no tag for a link whose hosts or switch may drop one
 * (a priority-tagging host takes untagged frames, the link's own). Every
 * pointer into the frame is stale after. */
static __always_inline void priority_tag_pop(struct xdp_md *ctx, struct ethhdr *eth)
{
	__u8 macs[2 * ETH_ALEN];

	if (eth->h_proto != bpf_htons(ETH_P_8021Q))
		return;
	__builtin_memcpy(macs, eth, sizeof(macs));
	__builtin_memcpy((void *)eth + sizeof(struct vlan_hdr), macs, sizeof(macs));
	/* Cannot fail: the frame keeps more than an Ethernet header. */
	bpf_xdp_adjust_head(ctx, sizeof(struct vlan_hdr));
}

/* Addressed to a broadcast or multicast MAC: the I/G bit. */
static __always_inline int eth_is_group(const struct ethhdr *eth)
{
	return eth->h_dest[0] & 1;
}

/* The fixed 20 bytes only: enough to know the addresses and protocol. */
static __always_inline int parse_iphdr_fixed(struct cursor *c, struct iphdr **ip)
{
	struct iphdr *h = c->pos;

	if ((void *)(h + 1) > c->end)
		return -1;
	*ip = h;
	return h->protocol;
}

/* Where a TCP or UDP packet's ports are if its IP header length is right,
 * checked only to lie inside the frame: enough to tell a backend's reply from
 * traffic that is not xlb's, which leaves unvalidated (the kernel validates
 * it). NULL past the frame. */
static __always_inline struct l4ports *peek_ports(const struct cursor *c, struct iphdr *ip)
{
	struct l4ports *p = (void *)ip + ip->ihl * 4;

	if ((void *)(p + 1) > c->end)
		return NULL;
	return p;
}

/* A TCP SYN without ACK: the first packet of a new connection. */
static __always_inline int packet_opens(const struct packet *pkt)
{
	return pkt->tcp && pkt->tcp->syn && !pkt->tcp->ack;
}

/* A TCP SYN-ACK: the server accepts the connection. */
static __always_inline int packet_accepts(const struct packet *pkt)
{
	return pkt->tcp && pkt->tcp->syn && pkt->tcp->ack && !pkt->tcp->fin && !pkt->tcp->rst;
}

/* A TCP FIN or RST: the connection is closing. */
static __always_inline int packet_closes(const struct packet *pkt)
{
	return pkt->tcp && (pkt->tcp->fin || pkt->tcp->rst);
}

static __always_inline int ip_is_fragment(const struct iphdr *ip)
{
	return (ip->frag_off & bpf_htons(XLB_IP_MF | XLB_IP_OFFSET)) != 0;
}

/* A fragment but the first: no L4 header. */
static __always_inline int ip_is_later_fragment(const struct iphdr *ip)
{
	return (ip->frag_off & bpf_htons(XLB_IP_OFFSET)) != 0;
}

/* The IP header's length, or -1 unless it is IPv4's, at least 20 bytes, and
 * the frame holds the whole datagram (its total length from ip, wherever the
 * link's header put it, to c's end). */
static __always_inline int ip_header_len(const struct cursor *c, const struct iphdr *ip)
{
	__u32 hlen = ip->ihl * 4;
	__u32 room = c->end - (void *)ip;

	if (ip->version != 4 || hlen < sizeof(*ip))
		return -1;
	if (room < bpf_ntohs(ip->tot_len))
		return -1;
	return hlen;
}

/* Whether ip is IPv4 whose datagram lies whole in the frame and holds its
 * own header: all there is to check of a packet without an L4 header to
 * parse (a later fragment, another protocol). */
static __always_inline int ip_datagram_ok(const struct cursor *c, const struct iphdr *ip)
{
	int hlen = ip_header_len(c, ip);

	return hlen >= 0 && bpf_ntohs(ip->tot_len) >= hlen;
}

/* Moves past the IPv4 header and its options to the TCP or UDP header and
 * fills pkt. Returns 0, or -1 for a header that is bad or cut short, a frame
 * shorter than the IP total length, or a total length too short for the
 * headers. */
static __always_inline int parse_l4(struct cursor *c, struct iphdr *ip, struct packet *pkt)
{
	int hlen = ip_header_len(c, ip);
	void *l4;

	if (hlen < 0)
		return -1;
	l4 = (void *)ip + hlen;
	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *th = l4;

		/* The datagram, not just the frame, must hold the header: bytes
		 * past tot_len are padding, not ports. */
		if ((void *)(th + 1) > c->end || bpf_ntohs(ip->tot_len) < hlen + sizeof(*th))
			return -1;
		pkt->l4_csum = &th->check;
		pkt->tcp = th;
		c->pos = th + 1;
	} else {
		struct udphdr *uh = l4;

		if ((void *)(uh + 1) > c->end || bpf_ntohs(ip->tot_len) < hlen + sizeof(*uh))
			return -1;
		pkt->l4_csum = &uh->check;
		c->pos = uh + 1;
	}
	pkt->ip = ip;
	pkt->ports = l4;
	pkt->proto = ip->protocol;
	return 0;
}

#endif
