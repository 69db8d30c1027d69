/* Layouts and names shared by the XDP program and the control plane.
 *
 * This header is the one definition. control/layout.py mirrors the structs as
 * ctypes and reads the reason list below from this file; tests/test_layout.py
 * (and every program load) fails if the two disagree.
 */
#ifndef XLB_SHARED_H
#define XLB_SHARED_H

/* services: (VIP, port, protocol) -> service. All in network byte order. */
struct service_key {
	__be32 vip;
	__be16 port;
	__u8 proto;		/* IPPROTO_TCP or IPPROTO_UDP */
	__u8 pad;
};

struct service {
	__u32 id;		/* index into service_stats and rr_cursor */
	__u32 ring;		/* active ring: 2*id or 2*id+1, so a new one is written beside it */
	__u32 ring_len;		/* used slots of the ring; 0: no backend takes new flows */
	__u32 flags;
};

/* backends: array indexed by backend id. */
struct backend {
	__be32 addr;
	__be16 port;
	__u16 flags;
};

/* backend.flags. NO_NEW_FLOWS: the backend is not up (down, drained, disabled
 * or removed). Its established flows follow the pool's policy, but a TCP SYN
 * that hits one of its flow entries (a client reusing a port) is a new
 * connection and is balanced anew. */
enum { BACKEND_NO_NEW_FLOWS = 1 };

/* flows: LRU hash keyed by the packet's own 5-tuple. A new connection adds two
 * entries: client->VIP (FLOW_FORWARD, NAT to the backend) and backend->client
 * (FLOW_REPLY, NAT back to the VIP). */
struct flow_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

enum { FLOW_FORWARD = 1, FLOW_REPLY = 2 };

struct flow {
	__be32 addr;		/* the address and port that replace ... */
	__be16 port;		/* ... the destination (FORWARD) or the source (REPLY) */
	__u8 dir;
	__u8 pad;
	__u32 service_id;
	__u32 backend_id;
};

/* arp_vips: (ingress ifindex, VIP) -> the MAC that answers ARP for it there. */
struct arp_key {
	__u32 ifindex;
	__be32 addr;
};

struct arp_mac {
	__u8 mac[6];
	__u16 pad;
};

/* Per-CPU counters: "in" is client to backend, "out" is the replies. */
struct counters {
	__u64 packets_in;
	__u64 bytes_in;
	__u64 packets_out;
	__u64 bytes_out;
	__u64 new_flows;
};

/* reason_stats: one per reason below. */
struct tally {
	__u64 packets;
	__u64 bytes;
};

/* Why the program returned what it did: one counter each, recorded at the one
 * exit. Each reason has exactly one action, so per-action counts are sums. */
#define XLB_REASONS(X)                                                         \
	X(PASS_NOT_IP, XDP_PASS)     /* not IPv4 nor ARP: IPv6, VLAN, ... */       \
	X(PASS_ARP, XDP_PASS)        /* ARP that is not a request for a VIP here */ \
	X(PASS_SHORT, XDP_PASS)      /* IPv4 header cut short: the kernel judges */ \
	X(PASS_NOT_VIP, XDP_PASS)    /* IPv4 neither to a service nor a reply */   \
	X(FORWARD, XDP_PASS)         /* to a service: DNAT to its backend */       \
	X(REPLY, XDP_PASS)           /* from a backend: reverse NAT to the VIP */  \
	X(ARP_REPLY, XDP_TX)         /* ARP request for a VIP: answered here */    \
	X(DROP_MALFORMED, XDP_DROP)  /* to a VIP, headers cut short or bad */      \
	X(DROP_FRAGMENT, XDP_DROP)   /* to a VIP, an IP fragment: no ports to NAT */ \
	X(DROP_NO_BACKEND, XDP_DROP) /* new flow to a service with no backend up */

#define XLB_REASON_ENUM(name, action) XLB_##name,
enum xlb_reason { XLB_REASONS(XLB_REASON_ENUM) XLB_REASON_MAX };
#undef XLB_REASON_ENUM

#endif
