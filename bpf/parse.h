/* Bounds-checked header parsing with a cursor, as in xdp-tutorial's
 * parsing_helpers.h. Each parser checks `hdr + 1 > end` before any read. */
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

/* Returns the EtherType (network order) or -1 if the header is cut short. */
static __always_inline int parse_ethhdr(struct cursor *c, struct ethhdr **eth)
{
	struct ethhdr *h = c->pos;

	if ((void *)(h + 1) > c->end)
		return -1;
	c->pos = h + 1;
	*eth = h;
	return h->h_proto;
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
 * the frame holds the whole datagram (its total length; frame_len is
 * data_end - data). */
static __always_inline int ip_header_len(const struct iphdr *ip, __u32 frame_len)
{
	__u32 hlen = ip->ihl * 4;

	if (ip->version != 4 || hlen < sizeof(*ip))
		return -1;
	if (frame_len < sizeof(struct ethhdr) + bpf_ntohs(ip->tot_len))
		return -1;
	return hlen;
}

/* Moves past the IPv4 header and its options to the TCP or UDP header and
 * fills pkt. Returns 0, or -1 for a header that is bad or cut short, a frame
 * shorter than the IP total length, or a total length too short for the
 * headers. frame_len is data_end - data. */
static __always_inline int parse_l4(struct cursor *c, struct iphdr *ip,
				    __u32 frame_len, struct packet *pkt)
{
	int hlen = ip_header_len(ip, frame_len);
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
