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
	__u32 id;		/* index into service_stats, rr_cursor and timeouts */
	__u32 ring;		/* active ring (2*id or 2*id+1, so a new one is written beside
				 * it), or with SERVICE_MAGLEV the active Maglev table */
	__u32 ring_len;		/* used slots of the ring or table; 0: no backend takes new flows */
	__u32 flags;
};

/* service.flags. MAGLEV: new flows pick maglev[ring][flow_hash % ring_len], so
 * every node with the same table sends a flow to the same backend, even a flow
 * it meets in the middle (a non-SYN packet it has no entry for). SOURCE, only
 * with MAGLEV: source_hash (the client's address alone) instead of flow_hash,
 * so every flow of a client goes to one backend. ADOPT, only with MAGLEV
 * (adopt_replies): a backend's packet that no entry knows may be another
 * node's connection (owners). */
enum { SERVICE_MAGLEV = 1, SERVICE_SOURCE = 2, SERVICE_ADOPT = 4 };

/* timeouts: array indexed by service id. Idle seconds after which a flow in
 * that state is dead (as IPVS: a new connection's first packet is a new flow
 * again); 0 means never. */
struct timeouts {
	__u32 syn;		/* TCP, handshake not complete */
	__u32 established;
	__u32 closing;		/* TCP after a FIN or RST */
	__u32 udp;
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
 * connection and is balanced anew, and so is a datagram of a flow it never
 * answered (flow_fate in xlb.c). */
enum { BACKEND_NO_NEW_FLOWS = 1 };

/* owners: a backend endpoint (address, port, protocol) -> the services of the
 * first XLB_OWNER_SLOTS frontends it serves, in the config's order (the rest
 * empty: port 0). A packet from the endpoint that no reply entry knows is one
 * of those services' replies where its forward entry names the endpoint (the
 * LRU evicted the reply entry alone), or, with SERVICE_ADOPT, where Maglev
 * sends its client to the endpoint (a connection the other node of a pair
 * balanced before a failover; such a service is its endpoints' only one). */
enum { XLB_OWNER_SLOTS = 4 };

struct owner_services {
	struct service_key services[XLB_OWNER_SLOTS];
};

struct endpoint {
	__be32 addr;
	__be16 port;
	__u8 proto;
	__u8 pad;
};

/* Flow tables: LRU hashes keyed by the packet's own 5-tuple. A connection has
 * two entries: client->VIP (FLOW_FORWARD, NAT to the backend) and
 * backend->client (FLOW_REPLY, NAT back to the VIP). A new connection starts in
 * flows_new; once the client has spoken after the backend answered (TCP: the
 * handshake completed) both entries move to flows. So a flood of new flows
 * (random-source SYNs) evicts only other new flows, never an established one. */
struct flow_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

enum { FLOW_FORWARD = 1, FLOW_REPLY = 2 };

/* flow.state. ANSWERED: the backend has answered (both entries, set by the
 * reply entry's first packet). */
enum { FLOW_NEW = 1, FLOW_ANSWERED = 2, FLOW_ESTABLISHED = 3, FLOW_CLOSING = 4 };

struct flow {
	__be32 addr;		/* the address and port that replace ... */
	__be16 port;		/* ... the destination (FORWARD) or the source (REPLY) */
	__u8 dir;
	__u8 state;
	__u32 service_id;
	__u32 backend_id;
	__u32 timeout;		/* idle seconds of its state (struct timeouts); 0: never */
	__u32 pad;
	__u64 seen;		/* xlb_now() (clock.h) of its last packet */
};

/* xlb_reap's frame (BPF_PROG_TEST_RUN), which the control plane builds: a
 * head, then two entries a connection, each as read from the head's table. */
struct reap_head {
	__u32 table;		/* 0: flows, 1: flows_new */
	__u32 removed;		/* set: forward entries removed */
};

struct reap_entry {
	struct flow_key key;
	struct flow value;
};

/* frags: a fragmented datagram's later fragments carry no ports; its first
 * leaves the entry of its flow here, under its addresses, IP id and protocol,
 * for them. */
struct frag_key {
	__be32 saddr;
	__be32 daddr;
	__be16 id;
	__u8 proto;
	__u8 pad;
};

/* flow_stats: per-CPU, one entry. Connections (entry pairs) the program moved
 * in and out of the tables; the LRU's evictions are what is missing. */
struct flow_counters {
	__u64 created;		/* into flows_new */
	__u64 established;	/* flows_new -> flows */
	__u64 expired;		/* found idle past their timeout, removed */
	__u64 reopened;		/* a SYN on a closing flow, or a SYN or an unanswered
				 * flow's datagram on one whose backend takes no new
				 * flows: removed, balanced anew */
	__u64 new_removed;	/* of expired + reopened + established: those from flows_new */
	__u64 adopted;		/* of created: another node's, met at a backend's packet
				 * (owners) */
};

/* control_stats: one entry, that only the control plane writes (the program
 * never reads it). What the control plane removed from each table and put
 * back, and the largest count of LRU evictions it derived (never less: a
 * Prometheus counter). Kept with the maps, so that a control process that
 * adopts them goes on from there. */
struct control_counters {
	__u64 expired_flows;		/* idle, removed by the sweep */
	__u64 expired_flows_new;
	__u64 ended_flows;		/* a server's state, a removed frontend */
	__u64 ended_flows_new;
	__u64 evicted_flows;
	__u64 evicted_flows_new;
	__u64 replies_restored;		/* reply entries the sweep put back */
};

/* hops: next hops the fast path resolved with bpf_fib_lookup, so that a packet
 * costs an inlined array read instead of a FIB lookup. A per-CPU array used as
 * a direct-mapped cache: slot xlb_hop_slot(daddr, in_ifindex) (hash.h), the
 * destination and ingress link kept in the entry; a slot that holds another
 * destination, or was resolved over a second ago, is resolved again. Per CPU,
 * so no CPU reads a slot while another writes it. */
struct hop {
	__be32 daddr;		/* the destination ... */
	__u32 in_ifindex;	/* ... and the link it came in on (routing may depend on it) */
	__u32 ifindex;		/* where it goes out */
	__u16 mtu;		/* of the route: bigger packets are "too big" */
	__u8 dmac[6];
	__u8 smac[6];
	__u8 xmit;		/* XDP can send out of ifindex (xdp_can_send in xlb.c) */
	__u8 pad[5];
	__u64 checked;		/* xlb_now() of the lookup; 0: empty */
};

/* config: array of one. Runtime settings, and two bit sets that let traffic
 * which is neither to a VIP nor from a backend's service port leave after one
 * inlined array lookup: bit filter_slot(daddr) of vip_bits, bit
 * filter_slot(saddr + (sport << 16)) of backend_bits (saddr and sport as read
 * from the packet, little-endian). A set bit may be another address's: the
 * exact maps decide. */
enum { XLB_FILTER_SHIFT = 20 };		/* 4,096 bits a set: 512 bytes stay in cache */
enum { XLB_FILTER_WORDS = 64 };		/* (1 << (32 - XLB_FILTER_SHIFT)) / 64 */
enum { CONFIG_FAST_PATH = 1 };

/* tx_links (xlb.c): how the program runs on a link, where it does. */
enum { LINK_NATIVE = 1, LINK_GENERIC = 2 };

struct xlb_config {
	__u32 flags;		/* CONFIG_FAST_PATH: forward with bpf_fib_lookup + TX/REDIRECT */
	__u32 pad;
	__u64 vip_bits[XLB_FILTER_WORDS];
	__u64 backend_bits[XLB_FILTER_WORDS];
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
#define XLB_REASONS(X)                                                          \
	X(PASS_NOT_IP, XDP_PASS)      /* not IPv4 nor ARP: IPv6, a VLAN's tag, ... */ \
	X(PASS_ARP, XDP_PASS)         /* ARP that is not a request for a VIP here */ \
	X(PASS_SHORT, XDP_PASS)       /* a header cut short, or bad and not to a VIP: \
				       * the kernel judges */                      \
	X(PASS_NOT_VIP, XDP_PASS)     /* IPv4 neither to a service nor a reply */   \
	X(FORWARD, XDP_PASS)          /* to a service: DNAT, the kernel routes it */ \
	X(REPLY, XDP_PASS)            /* from a backend: reverse NAT, kernel routes */ \
	X(ARP_REPLY, XDP_TX)          /* ARP request for a VIP: answered here */    \
	X(DROP_MALFORMED, XDP_DROP)   /* to a VIP, headers cut short or bad */      \
	X(DROP_FRAGMENT, XDP_DROP)    /* to a VIP, a later fragment whose first xlb \
				       * did not see, or an ICMP fragment */       \
	X(DROP_NO_BACKEND, XDP_DROP)  /* new flow to a service with no backend up */ \
	X(FORWARD_TX, XDP_TX)         /* fast path: DNAT, out the port it came in */ \
	X(FORWARD_REDIRECT, XDP_REDIRECT) /* fast path: DNAT, out another port */   \
	X(REPLY_TX, XDP_TX)           /* fast path: reverse NAT, out the same port */ \
	X(REPLY_REDIRECT, XDP_REDIRECT) /* fast path: reverse NAT, out another port */ \
	X(FIB_NO_NEIGH, XDP_PASS)     /* NATed; next hop's MAC unknown: kernel ARPs */ \
	X(FIB_NO_ROUTE, XDP_PASS)     /* NATed; no route (or blackhole, prohibit) */ \
	X(FIB_FRAG_NEEDED, XDP_PASS)  /* NATed; over the egress MTU: kernel fragments */ \
	X(FIB_FWD_DISABLED, XDP_PASS) /* NATed; ip_forward off on the ingress link */ \
	X(TTL_EXPIRED, XDP_PASS)      /* TTL <= 1: as it came; the kernel answers */  \
	X(ICMP_ECHO_REPLY, XDP_TX)    /* ping of a VIP: answered here */            \
	X(ICMP_TOO_BIG, XDP_TX)   /* over the next hop's MTU with DF: xlb tells the \
				       * sender, about the packet as it sent it */ \
	X(ICMP_TO_BACKEND, XDP_PASS)  /* an error about a reply, made the backend's */ \
	X(ICMP_TO_CLIENT, XDP_PASS)   /* an error about a forwarded packet, made the \
				       * client's */                               \
	X(DROP_NO_SERVICE, XDP_DROP)  /* to a VIP, for no service of it (new ones \
				       * go last: an upgrade keeps the counts) */ \
	X(PASS_NOT_UNICAST, XDP_PASS) /* to a broadcast or multicast MAC: every \
				       * node on the link has it */

#define XLB_REASON_ENUM(name, action) XLB_##name,
enum xlb_reason { XLB_REASONS(XLB_REASON_ENUM) XLB_REASON_MAX };
#undef XLB_REASON_ENUM

#endif
