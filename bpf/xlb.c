/* xlb: the XDP program.
 *
 * Pure packet helpers live in headers by concern: parse.h (headers, priority
 * tags), csum.h and nat.h (rewrites), fwd.h (next hop, TTL), hash.h (flow
 * hash, address filters), icmp.h (echo, errors), arp.h (ARP for VIPs),
 * stats.h (reason -> action), clock.h (time); consts.h and xlb_shared.h hold
 * the sizes and the layouts shared with the control plane. This file declares
 * the maps and holds every function that touches them: bcc rewrites map calls
 * (.lookup, .update) in the main file only.
 *
 * Every packet ends in exactly one reason (xlb_shared.h), counted on its way
 * out (count_exit), which decides the action. Traffic that is neither for a
 * service nor a reply of one passes untouched, after one inlined array lookup.
 */
#include <uapi/linux/bpf.h>

#include "consts.h"
#include "clock.h"
#include "xlb_shared.h"
#include "parse.h"
#include "nat.h"
#include "hash.h"
#include "fwd.h"
#include "icmp.h"
#include "arp.h"
#include "stats.h"

/* The frames' structs match layout.py's mirrors: bcc derives no type of
 * theirs to check, as it does for the maps'. */
XLB_FRAME_MIRRORS

BPF_HASH(services, struct service_key, struct service, XLB_MAX_SERVICES);
BPF_ARRAY(backends, struct backend, XLB_MAX_BACKENDS);
/* Backend ids, XLB_RING_SIZE slots a ring, two rings a service. */
BPF_ARRAY(rings, __u32, XLB_MAX_RINGS * XLB_RING_SIZE);
/* Backend ids, XLB_MAGLEV_SIZE slots a table, two tables a Maglev service. */
BPF_ARRAY(maglev, __u32, XLB_MAX_MAGLEV_TABLES * XLB_MAGLEV_SIZE);
BPF_ARRAY(timeouts, struct timeouts, XLB_MAX_SERVICES);
/* Addresses that are the VIP of some service: fragments and malformed
 * packets to them are dropped, not passed to a kernel that does not own them. */
BPF_HASH(vips, __be32, __u32, XLB_MAX_SERVICES);
BPF_HASH(arp_vips, struct arp_key, struct arp_mac, XLB_MAX_ARP);
/* An endpoint a protocol: a pool's servers may serve a TCP and a UDP frontend. */
BPF_HASH(owners, struct endpoint, struct owner_services, 2 * XLB_MAX_BACKENDS);
BPF_ARRAY(config, struct xlb_config, 1);
BPF_TABLE("lru_hash", struct flow_key, struct flow, flows, XLB_MAX_FLOWS);
BPF_TABLE("lru_hash", struct flow_key, struct flow, flows_new, XLB_MAX_NEW_FLOWS);
BPF_TABLE("lru_hash", struct frag_key, struct flow, frags, XLB_MAX_FRAGS);

/* Round-robin position per service and CPU: no shared atomics on the fast path. */
BPF_PERCPU_ARRAY(rr_cursor, __u32, XLB_MAX_SERVICES);
BPF_PERCPU_ARRAY(service_stats, struct counters, XLB_MAX_SERVICES);
BPF_PERCPU_ARRAY(backend_stats, struct counters, XLB_MAX_BACKENDS);
BPF_PERCPU_ARRAY(reason_stats, struct tally, XLB_REASON_MAX);
BPF_PERCPU_ARRAY(flow_stats, struct flow_counters, 1);
BPF_PERCPU_ARRAY(hops, struct hop, XLB_MAX_HOPS);
/* The links xlb runs on (ifindex -> LINK_NATIVE or LINK_GENERIC), which say
 * where the fast path may send (xdp_can_send; control/datapath.py keeps it). */
BPF_HASH(tx_links, __u32, __u32, XLB_MAX_TX_LINKS);
/* The program does not use it: control/datapath.py binds it to the program
 * (BPF_PROG_BIND_MAP), so that it is among the maps an adoption finds. */
BPF_ARRAY(control_stats, struct control_counters, 1);

static __always_inline int count_exit(enum xlb_reason reason, __u32 bytes)
{
	__u32 key = reason;
	struct tally *t = reason_stats.lookup(&key);

	if (t) {
		t->packets += 1;
		t->bytes += bytes;
	}
	return reason_action(reason);
}

static __always_inline void counters_add(struct counters *c, __u8 dir, __u32 bytes, __u32 is_new)
{
	if (!c)
		return;
	if (dir == FLOW_FORWARD) {
		c->packets_in += 1;
		c->bytes_in += bytes;
		c->new_flows += is_new;
	} else {
		c->packets_out += 1;
		c->bytes_out += bytes;
	}
}

/* Counts a packet of flow f for its service and its backend. */
static __always_inline void count_flow(struct flow *f, __u32 bytes, __u32 is_new)
{
	counters_add(service_stats.lookup(&f->service_id), f->dir, bytes, is_new);
	counters_add(backend_stats.lookup(&f->backend_id), f->dir, bytes, is_new);
}

static __always_inline struct flow_counters *flow_counters(void)
{
	__u32 zero = 0;

	return flow_stats.lookup(&zero);
}

static __always_inline enum xlb_reason answer_arp(struct xdp_md *ctx, struct cursor *c,
						  struct ethhdr *eth)
{
	struct arp_ipv4 *req = parse_arp_request(c);
	struct arp_key key = {};
	struct arp_mac *mac;

	if (!req)
		return XLB_PASS_ARP;
	key.ifindex = ctx->ingress_ifindex;
	key.addr = req->tip;
	mac = arp_vips.lookup(&key);
	if (!mac)
		return XLB_PASS_ARP;
	arp_make_reply(eth, req, mac->mac);
	priority_tag_pop(ctx, eth);	/* untagged, as Linux answers a tagged request */
	return XLB_ARP_REPLY;
}

/* Round-robin: the next slot of the service's active ring, per CPU; the CPU
 * number offsets the start so that CPUs do not all begin with the ring's first
 * backend. Maglev: the slot of the flow's hash in the active table (with
 * SERVICE_SOURCE, of its client's address). */
static __always_inline struct backend *pick_backend(struct service *svc, struct flow_key *key,
						     __u32 *backend_id)
{
	__u32 len = svc->ring_len;
	__u32 *cursor, *id, slot, idx, hash;

	if (svc->flags & SERVICE_MAGLEV) {
		if (len == 0 || len > XLB_MAGLEV_SIZE || svc->ring >= XLB_MAX_MAGLEV_TABLES)
			return NULL;
		hash = svc->flags & SERVICE_SOURCE ? xlb_source_hash(key->saddr) :
			xlb_flow_hash(key->saddr, key->daddr, key->sport, key->dport, key->proto);
		slot = hash % len;
		idx = svc->ring * XLB_MAGLEV_SIZE + slot;
		id = maglev.lookup(&idx);
	} else {
		if (len == 0 || len > XLB_RING_SIZE)
			return NULL;
		cursor = rr_cursor.lookup(&svc->id);
		if (!cursor)
			return NULL;
		slot = (*cursor + bpf_get_smp_processor_id()) % len;
		*cursor += 1;
		idx = svc->ring * XLB_RING_SIZE + slot;
		id = rings.lookup(&idx);
	}
	if (!id)
		return NULL;
	*backend_id = *id;
	return backends.lookup(id);
}

/* The idle timeout of a flow of this service in this state; 0: never. */
static __always_inline __u32 state_timeout(__u32 service_id, __u8 proto, __u8 state)
{
	struct timeouts *t = timeouts.lookup(&service_id);

	if (!t)
		return 0;
	if (proto == IPPROTO_UDP)
		return t->udp;
	if (state == FLOW_ESTABLISHED)
		return t->established;
	if (state == FLOW_CLOSING)
		return t->closing;
	return t->syn;
}

static __always_inline void flow_set_state(struct flow *f, __u8 proto, __u8 state)
{
	f->state = state;
	f->timeout = state_timeout(f->service_id, proto, state);
}

/* The key of the other entry of f's connection (f is key's entry). */
static __always_inline void partner_key(const struct flow_key *key, const struct flow *f,
					struct flow_key *out)
{
	if (f->dir == FLOW_FORWARD) {
		out->saddr = f->addr;
		out->daddr = key->saddr;
		out->sport = f->port;
		out->dport = key->sport;
	} else {
		out->saddr = key->daddr;
		out->daddr = f->addr;
		out->sport = key->dport;
		out->dport = f->port;
	}
	out->proto = key->proto;
}

/* The reply entry (backend -> client), and its key, of the forward entry f
 * of key: as the connection was opened. */
static __always_inline void reply_of(const struct flow_key *key, const struct flow *f,
				     struct flow_key *reply_key, struct flow *reply)
{
	*reply = *f;
	reply->addr = key->daddr;
	reply->port = key->dport;
	reply->dir = FLOW_REPLY;
	partner_key(key, f, reply_key);
}

/* The entry of key in the half-open table if in_new, else in the established one. */
static __always_inline struct flow *flow_lookup(struct flow_key *key, int in_new)
{
	return in_new ? flows_new.lookup(key) : flows.lookup(key);
}

static __always_inline int flow_delete(struct flow_key *key, int in_new)
{
	return in_new ? flows_new.delete(key) : flows.delete(key);
}

/* The entry of key: in the established table, else in the half-open one. */
static __always_inline struct flow *flow_find(struct flow_key *key, int *in_new)
{
	struct flow *f = flows.lookup(key);

	*in_new = 0;
	if (f)
		return f;
	*in_new = 1;
	return flows_new.lookup(key);
}

/* Opens the connection `key` (client -> VIP) to backend be of svc, in state
 * `state`: stores the forward entry, filled into *fwd, and the reply entry
 * (backend -> client) in flows_new, and counts it created. Returns the flow
 * counters, for the caller's own. */
static __always_inline struct flow_counters *flow_open(struct flow_key *key, struct service *svc,
						       struct backend *be, __u32 backend_id,
						       __u8 state, struct flow *fwd, __u64 now)
{
	struct flow_key reply_key = {};
	struct flow_counters *fc;
	struct flow reply;

	fwd->addr = be->addr;
	fwd->port = be->port;
	fwd->dir = FLOW_FORWARD;
	fwd->service_id = svc->id;
	fwd->backend_id = backend_id;
	fwd->seen = now;
	flow_set_state(fwd, key->proto, state);
	reply_of(key, fwd, &reply_key, &reply);

	flows_new.update(key, fwd);
	flows_new.update(&reply_key, &reply);
	fc = flow_counters();
	if (fc)
		fc->created += 1;
	return fc;
}

/* Picks a backend for the new connection `key` (client -> VIP) and opens it,
 * filling *fwd with the forward entry. Returns 0, or -1 when the service has
 * no backend. A FIN or RST that no entry knows (a connection this node lost,
 * or never saw) goes where the pick sends it, and its connection is closing
 * already: not half-open, with the SYN timeout. */
static __always_inline int flow_create(struct flow_key *key, struct service *svc,
				       struct packet *pkt, struct flow *fwd, __u64 now)
{
	struct backend *be;
	__u32 backend_id = 0;

	be = pick_backend(svc, key, &backend_id);
	if (!be)
		return -1;
	flow_open(key, svc, be, backend_id, packet_closes(pkt) ? FLOW_CLOSING : FLOW_NEW, fwd, now);
	return 0;
}

/* The flow's backend takes no new flows (see BACKEND_NO_NEW_FLOWS). */
static __always_inline int backend_closed(struct flow *f)
{
	struct backend *be = backends.lookup(&f->backend_id);

	return !be || (be->flags & BACKEND_NO_NEW_FLOWS);
}

enum { FLOW_ALIVE, FLOW_EXPIRED, FLOW_REOPENED };

/* Whether an entry last seen at `seen` is idle past the connection's
 * timeout (0: never). */
static __always_inline int flow_idle(struct flow *f, __u64 seen, __u64 now)
{
	return f->timeout && xlb_older_than(seen, now, f->timeout);
}

/* Whether the connection of entry f (of key, in flows_new if in_new) is
 * alive: not idle past its timeout both ways. One-way traffic keeps it, as
 * the sweep counts it: the other entry is looked at only when f is idle. */
static __always_inline int flow_alive(struct flow_key *key, struct flow *f, int in_new, __u64 now)
{
	struct flow_key other = {};
	struct flow *o;

	if (!flow_idle(f, f->seen, now))
		return 1;
	partner_key(key, f, &other);
	o = flow_lookup(&other, in_new);
	return o && !flow_idle(f, o->seen, now);
}

/* Whether the entry f (of key, in flows_new if in_new) still carries this
 * packet. A SYN on a closing flow, or on one whose backend takes no new
 * flows, opens a new connection (a client reusing its port); so does a UDP
 * datagram of a flow its backend never answered, as a SYN's retry does: a
 * one-way flow (syslog) would else stay on a down server while its client
 * sends. A dead connection (flow_alive) is gone at its next packet either
 * way, as the sweep would have it: a server's, revived here, would have met
 * no entry after it. */
static __always_inline int flow_fate(struct flow_key *key, struct packet *pkt, struct flow *f,
				     int in_new, __u64 now)
{
	int opens = packet_opens(pkt);

	if (f->dir == FLOW_FORWARD) {
		if (opens && f->state == FLOW_CLOSING)
			return FLOW_REOPENED;
		if ((opens || (!pkt->tcp && f->state == FLOW_NEW)) && backend_closed(f))
			return FLOW_REOPENED;
	}
	return flow_alive(key, f, in_new, now) ? FLOW_ALIVE : FLOW_EXPIRED;
}

/* Removes a dead connection (both entries) from its table and counts why. */
static __always_inline void flow_forget(struct flow_key *key, struct flow *f, int in_new, int fate)
{
	struct flow_key other = {};
	struct flow_counters *fc = flow_counters();

	/* Counted before it goes, as in flow_progress. */
	if (fc) {
		if (fate == FLOW_EXPIRED)
			fc->expired += 1;
		else
			fc->reopened += 1;
		fc->new_removed += in_new;
	}
	partner_key(key, f, &other);
	flow_delete(key, in_new);
	flow_delete(&other, in_new);
}

/* A FIN or RST, either way, closes the connection: both entries get the
 * closing timeout. */
static __always_inline void flow_track_close(struct flow_key *key, struct flow *f,
					     struct packet *pkt, int in_new)
{
	struct flow_key other = {};
	struct flow *o;

	if (!packet_closes(pkt) || f->state == FLOW_CLOSING)
		return;
	flow_set_state(f, key->proto, FLOW_CLOSING);
	partner_key(key, f, &other);
	o = flow_lookup(&other, in_new);
	if (o)
		flow_set_state(o, key->proto, FLOW_CLOSING);
}

/* A connection in flows_new moves to flows once the client speaks (not a SYN)
 * after its backend answered: a random-source flood never does. The reply
 * entry's first packet marks both entries answered, so that the client's
 * packets before it (all of a one-way UDP flow's) need no look at the reply
 * entry. A reply entry lost after the answer is rebuilt at the move; one
 * lost before is written again when the client tries again (below). f->seen
 * is this packet's time, `last` the one before. */
static __always_inline void flow_progress(struct flow_key *key, struct flow *f, struct packet *pkt,
					  __u64 last)
{
	struct flow_key other = {};
	struct flow fwd, reply;
	struct flow_counters *fc;
	struct flow *r;

	if (f->dir == FLOW_REPLY) {
		if (f->state == FLOW_CLOSING && packet_accepts(pkt)) {
			/* The server accepts a connection closed before it was
			 * established: by the client's RST of a stray packet that
			 * reached it (one of its port's earlier connection, to the
			 * same server). Both ends go on, and so does it. */
			flow_set_state(f, key->proto, FLOW_ANSWERED);
			partner_key(key, f, &other);
			r = flows_new.lookup(&other);
			if (r)
				flow_set_state(r, key->proto, FLOW_ANSWERED);
			return;
		}
		if (f->state != FLOW_NEW)
			return;
		f->state = FLOW_ANSWERED;
		partner_key(key, f, &other);
		r = flows_new.lookup(&other);
		if (r && r->state == FLOW_NEW)
			r->state = FLOW_ANSWERED;
		return;
	}
	if (f->state == FLOW_NEW) {
		if (pkt->tcp && !packet_opens(pkt)) {
			/* The client speaks before its backend answered: a connection
			 * taken up mid-way. Its backend's packets may meet the reply
			 * entry of its earlier self in flows (the LRU evicted the
			 * forward one), which would keep this one from being
			 * answered: that entry goes. Here, not at the open, where the
			 * lookup would cost every new flow a cache miss. */
			partner_key(key, f, &other);
			if (flows.lookup(&other))
				flows.delete(&other);
		} else if (pkt->tcp || (f->seen > last && f->seen - last >= NSEC_PER_SEC)) {
			/* The client tries again, unanswered (a SYN again, or a
			 * datagram a second or more after the last): its reply entry
			 * may be gone. The LRU evicts entries, and in a flood of new
			 * flows it takes an unanswered reply entry before the forward
			 * one that the retries keep fresh: no answer would ever be
			 * NATed. It is written again. */
			reply_of(key, f, &other, &reply);
			flows_new.update(&other, &reply);
		}
		return;
	}
	if (packet_opens(pkt) || f->state != FLOW_ANSWERED)
		return;
	fwd = *f;
	flow_set_state(&fwd, key->proto, FLOW_ESTABLISHED);
	reply_of(key, &fwd, &other, &reply);
	r = flows_new.lookup(&other);
	if (r)
		reply.seen = r->seen;
	flows.update(key, &fwd);
	flows.update(&other, &reply);
	/* Counted after it is in flows and before it leaves flows_new: a status
	 * that reads the counters around its census of the tables can then only
	 * undercount the LRU's evictions it derives (Datapath.flow_ledger). */
	fc = flow_counters();
	if (fc) {
		fc->established += 1;
		fc->new_removed += 1;
	}
	flows_new.delete(key);
	flows_new.delete(&other);
}

/* pkt (rewritten from `key`) is over its next hop's MTU. With DF set, xlb
 * answers the sender as a router would, about the packet as the sender sent
 * it, so that path MTU discovery works through the NAT (the kernel's answer
 * would quote the rewritten packet, which the sender cannot match to its
 * connection); without, the kernel fragments it, for reason `fragment`, as it
 * cuts an aggregate (below). */
static __always_inline enum xlb_reason too_big(struct xdp_md *ctx, struct packet *pkt,
					       struct flow_key *key, int reply, __u16 mtu,
					       enum xlb_reason fragment)
{
	__be32 vip = reply ? pkt->ip->saddr : key->daddr;
	__be32 addr = reply ? pkt->ip->saddr : pkt->ip->daddr;		/* as rewritten */
	__be16 port = reply ? pkt->ports->source : pkt->ports->dest;
	__be32 sent_addr = reply ? key->saddr : key->daddr;		/* as it came */
	__be16 sent_port = reply ? key->sport : key->dport;
	__u32 len = bpf_ntohs(pkt->ip->tot_len);

	/* Over the MTU of the link it came in by, it never was one frame: an
	 * aggregate of the kernel's (GRO, or a local sender's GSO), which generic
	 * XDP sees whole and the kernel cuts into segments that fit. No sender
	 * sent it: it gets no answer. Its L4 checksum is partial: rewritten
	 * again as such. */
	if (bpf_check_mtu(ctx, 0, &len, 0, 0) == BPF_MTU_CHK_RET_FRAG_NEEDED) {
		nat_flow(pkt, reply, sent_addr, sent_port);
		nat_flow_partial(pkt, reply, addr, port);
		return fragment;
	}
	if (!(pkt->ip->frag_off & bpf_htons(XLB_IP_DF)) ||
	    (void *)pkt->ip + XLB_FRAG_NEEDED_IP_MAX > (void *)(long)ctx->data_end)
		return fragment;
	nat_flow(pkt, reply, sent_addr, sent_port);
	priority_tag_pop(ctx, pkt->eth);	/* the answer is untagged, as the kernel's */
	if (icmp_frag_needed(ctx, vip, mtu) < 0)
		return fragment;	/* cannot be: the frame was checked above */
	return XLB_ICMP_TOO_BIG;
}

/* Whether a packet that came in by ctx's link can leave by link out from XDP.
 * Generic XDP sends an skb, which every link takes; a native program's
 * XDP_REDIRECT reaches only a driver that takes XDP frames (into a bridge, a
 * VLAN or a tunnel the frame is lost), and those are the links it runs on
 * natively. Out of any other, the packet goes to the kernel. */
static __always_inline int xdp_can_send(struct xdp_md *ctx, __u32 out)
{
	__u32 in = ctx->ingress_ifindex;
	__u32 *mode;

	if (out == in)
		return 1;
	mode = tx_links.lookup(&in);
	if (mode && *mode == LINK_GENERIC)
		return 1;
	mode = tx_links.lookup(&out);
	return mode && *mode == LINK_NATIVE;
}

/* The next hop of pkt (rewritten), from this CPU's cache, which resolves a
 * destination at most once a second. NULL, as bpf_fib_lookup answers, where
 * the FIB cannot resolve it or pkt is over the route's MTU: *rc says why
 * (with BPF_FIB_LKUP_RET_FRAG_NEEDED, *mtu the MTU). */
static __always_inline struct hop *next_hop(struct xdp_md *ctx, struct packet *pkt, __u64 now,
					    int *rc, __u16 *mtu)
{
	__be32 daddr = pkt->ip->daddr;
	__u32 slot = xlb_hop_slot(daddr, ctx->ingress_ifindex);
	struct hop *hop = hops.lookup(&slot);

	*rc = BPF_FIB_LKUP_RET_NOT_FWDED;
	if (!hop)
		return NULL;	/* cannot be: the slot is in range */
	if (hop->daddr != daddr || hop->in_ifindex != ctx->ingress_ifindex || !hop->checked ||
	    now - hop->checked > NSEC_PER_SEC) {
		*rc = fib_resolve(ctx, pkt, hop, mtu);
		if (*rc != BPF_FIB_LKUP_RET_SUCCESS)
			return NULL;
		hop->xmit = xdp_can_send(ctx, hop->ifindex);
		hop->daddr = daddr;
		hop->in_ifindex = ctx->ingress_ifindex;
		hop->mtu = *mtu;
		hop->checked = now;
	}
	if (bpf_ntohs(pkt->ip->tot_len) > hop->mtu) {
		*rc = BPF_FIB_LKUP_RET_FRAG_NEEDED;
		*mtu = hop->mtu;
		return NULL;
	}
	return hop;
}

/* Kernel forwarding: the kernel routes the packet, as `forward` or `reply`,
 * but one over its next hop's MTU is xlb's to answer (too_big) as in the
 * fast path. */
static __always_inline enum xlb_reason to_kernel(struct xdp_md *ctx, struct packet *pkt,
						 struct flow_key *key, int reply, __u64 now)
{
	enum xlb_reason passed = reply ? XLB_REPLY : XLB_FORWARD;
	__u16 mtu = 0;
	int rc;

	if (!next_hop(ctx, pkt, now, &rc, &mtu) && rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		return too_big(ctx, pkt, key, reply, mtu, passed);
	return passed;
}

/* Why the kernel gets a rewritten packet the fast path has no next hop for
 * (next_hop's rc), but one too big with DF (too_big). */
static __always_inline enum xlb_reason unresolved(int rc)
{
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return XLB_FIB_NO_NEIGH;
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		return XLB_FIB_FRAG_NEEDED;
	if (rc == BPF_FIB_LKUP_RET_FWD_DISABLED)
		return XLB_FIB_FWD_DISABLED;
	return XLB_FIB_NO_ROUTE;
}

/* The fast path's end for pkt (rewritten): TTL - 1, the next hop's MACs, no
 * priority tag (as the kernel routes it: priority_tag_pop), out its link; to
 * the kernel, as with kernel forwarding, where XDP cannot send out of it. */
static __always_inline enum xlb_reason transmit(struct xdp_md *ctx, struct packet *pkt,
						const struct hop *hop, int reply)
{
	if (!hop->xmit)
		return reply ? XLB_REPLY : XLB_FORWARD;
	ip_decrease_ttl(pkt->ip);
	hop_apply(pkt->eth, hop);
	priority_tag_pop(ctx, pkt->eth);
	if (hop->ifindex == ctx->ingress_ifindex)
		return reply ? XLB_REPLY_TX : XLB_FORWARD_TX;
	bpf_redirect(hop->ifindex, 0);
	return reply ? XLB_REPLY_REDIRECT : XLB_FORWARD_REDIRECT;
}

/* Rewrites the packet of flow `key` (nat_flow) and sends it on: to the kernel
 * (to_kernel), or (fast path) straight to its next hop. With TTL <= 1 it goes
 * nowhere: a router answers "time exceeded" about the packet as its sender
 * sent it (about the rewritten one, the sender could not match the answer to
 * its connection, and traceroute would lose this hop), so the kernel gets it
 * as it came, and answers from its own address. */
static __always_inline enum xlb_reason send(struct xdp_md *ctx, struct packet *pkt,
					    struct xlb_config *cfg, struct flow_key *key, int reply,
					    __be32 addr, __be16 port, __u64 now)
{
	struct hop *hop;
	__u16 mtu = 0;
	int rc;

	if (ttl_runs_out(pkt->ip))
		return XLB_TTL_EXPIRED;
	nat_flow(pkt, reply, addr, port);
	if (!(cfg->flags & CONFIG_FAST_PATH))
		return to_kernel(ctx, pkt, key, reply, now);
	hop = next_hop(ctx, pkt, now, &rc, &mtu);
	if (!hop) {
		if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
			return too_big(ctx, pkt, key, reply, mtu, XLB_FIB_FRAG_NEEDED);
		return unresolved(rc);
	}
	return transmit(ctx, pkt, hop, reply);
}

static __always_inline struct frag_key frag_key_of(const struct iphdr *ip)
{
	struct frag_key fk = { .saddr = ip->saddr, .daddr = ip->daddr, .id = ip->id,
			       .proto = ip->protocol };

	return fk;
}

/* The first fragment of a datagram leaves its flow's entry for the others. */
static __always_inline void remember_fragment(struct packet *pkt, struct flow *f)
{
	struct frag_key fk;

	if (__builtin_expect(!pkt->first_fragment, 1))
		return;
	fk = frag_key_of(pkt->ip);
	frags.update(&fk, f);
}

/* A packet of a known, live flow: state, counters, then on its way. */
static __always_inline enum xlb_reason flow_continue(struct xdp_md *ctx, struct packet *pkt,
						     struct xlb_config *cfg, struct flow_key *key,
						     struct flow *f, int in_new, __u32 bytes,
						     __u64 now)
{
	int reply = f->dir == FLOW_REPLY;
	__be32 addr = f->addr;
	__be16 port = f->port;
	__u64 last = f->seen;

	f->seen = now;
	flow_track_close(key, f, pkt, in_new);
	count_flow(f, bytes, 0);
	remember_fragment(pkt, f);
	if (in_new)
		flow_progress(key, f, pkt, last);	/* may move f: not used after this */
	return send(ctx, pkt, cfg, key, reply, addr, port, now);
}

/* Whether the kernel would forward ip (not deliver it here, nor drop it): a
 * route of another host, next hop resolved or not. */
static __always_inline int routed_elsewhere(struct xdp_md *ctx, const struct iphdr *ip)
{
	struct bpf_fib_lookup fib = {};
	int rc;

	fib_query(&fib, ctx, ip);
	rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
	return rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH ||
	       rc == BPF_FIB_LKUP_RET_FRAG_NEEDED;
}

/* A backend's packet that no flow entry knows, from an endpoint of frontends
 * (owners). A connection whose forward entry this node has, through one of
 * them, alive and naming this endpoint, is its own: the LRU evicted its reply
 * entry alone, which is written again. With SERVICE_ADOPT (adopt_replies),
 * another is the reply of a connection another node balanced (the pair's old
 * active node, before a failover), if Maglev sends the client to this
 * backend, as it did there: such a connection gets both entries, as
 * answered, and this packet its reverse NAT. The rest passes: a client that
 * reaches the backend directly (and, with SERVICE_ADOPT, that Maglev sends
 * elsewhere), and what is for this host (its own connections, the health
 * checks); a packet of another server on its client's port too. */
static __always_inline enum xlb_reason flow_adopt(struct xdp_md *ctx, struct packet *pkt,
						  struct xlb_config *cfg, struct flow_key *key,
						  __u32 bytes, __u64 now)
{
	struct endpoint ep = { .addr = key->saddr, .port = key->sport, .proto = key->proto };
	struct flow_key fkey = { .saddr = key->daddr, .sport = key->dport, .proto = key->proto };
	struct flow_key reply_key;
	struct owner_services *owned;
	struct flow_counters *fc;
	struct service_key *skey = NULL;
	struct service *svc;
	struct backend *be;
	struct flow fwd = {}, reply, *f = NULL;
	__u32 backend_id = 0, i;
	int in_new = 0, own = 0;

	owned = owners.lookup(&ep);
	if (!owned)
		return XLB_PASS_NOT_VIP;
	for (i = 0; i < XLB_OWNER_SLOTS; i++) {
		if (!owned->services[i].port)
			break;
		skey = &owned->services[i];
		fkey.daddr = skey->vip;
		fkey.dport = skey->port;
		f = flow_find(&fkey, &in_new);
		/* Dead, it is gone at this packet, as the sweep would have it
		 * (flow_fate), and the packet is taken as after a sweep. */
		if (f && f->dir == FLOW_FORWARD && !flow_alive(&fkey, f, in_new, now)) {
			flow_forget(&fkey, f, in_new, FLOW_EXPIRED);
			f = NULL;
		}
		own = f && f->dir == FLOW_FORWARD && f->addr == key->saddr &&
		      f->port == key->sport;
		if (own)
			break;
	}
	if (!skey)
		return XLB_PASS_NOT_VIP;
	if (own) {
		/* This node's own connection, whose reply entry the LRU evicted
		 * alone: written again, not adopted, with what this packet, its
		 * first, tells (flow_progress, flow_track_close). */
		if (in_new && f->state == FLOW_NEW)
			f->state = FLOW_ANSWERED;
		if (packet_closes(pkt))
			flow_set_state(f, key->proto, FLOW_CLOSING);
		reply_of(&fkey, f, &reply_key, &reply);
		reply.seen = now;
		if (in_new)
			flows_new.update(key, &reply);
		else
			flows.update(key, &reply);
	} else {
		/* Another node's, only with SERVICE_ADOPT (the last service
		 * looked at: such a service is its endpoints' only one); not this
		 * node's own live connection on another server than Maglev picks
		 * now (its pick was drained then). */
		svc = services.lookup(skey);
		if (!svc || !(svc->flags & SERVICE_ADOPT) || (f && f->dir == FLOW_FORWARD))
			return XLB_PASS_NOT_VIP;
		be = pick_backend(svc, &fkey, &backend_id);
		if (!be || be->addr != key->saddr || be->port != key->sport ||
		    !routed_elsewhere(ctx, pkt->ip))
			return XLB_PASS_NOT_VIP;
		/* Adopted by its FIN or RST, it is closing already (flow_track_close). */
		fc = flow_open(&fkey, svc, be, backend_id,
			       packet_closes(pkt) ? FLOW_CLOSING : FLOW_ANSWERED, &fwd, now);
		if (fc)
			fc->adopted += 1;
		reply_of(&fkey, &fwd, &reply_key, &reply);
	}
	/* This packet is the reply entry's: counted, remembered if a first
	 * fragment, and rewritten as such. */
	count_flow(&reply, bytes, 0);
	remember_fragment(pkt, &reply);
	return send(ctx, pkt, cfg, key, 1, reply.addr, reply.port, now);
}

/* Whether ip is to a VIP: is_vip, from the config's filter, may be wrong. */
static __always_inline int to_a_vip(struct iphdr *ip, int is_vip)
{
	return is_vip && vips.lookup(&ip->daddr);
}

/* For packets that cannot be balanced: dropped if addressed to a VIP. The
 * kernel does not own a VIP: passed, they would make it ARP for the VIP, or
 * route them back where they came from (an ICMP redirect, or a loop with the
 * router that sent them). */
static __always_inline enum xlb_reason vip_or_pass(struct iphdr *ip, int is_vip,
						   enum xlb_reason if_vip, enum xlb_reason otherwise)
{
	return to_a_vip(ip, is_vip) ? if_vip : otherwise;
}

/* The service of a connection key (client -> VIP), or NULL. */
static __always_inline struct service *service_of(const struct flow_key *key)
{
	struct service_key skey = { .vip = key->daddr, .port = key->dport, .proto = key->proto };

	return services.lookup(&skey);
}

/* Why a VIP's packet that nothing serves (no frontend, no backend) goes no
 * further: `drop`, but where its TTL runs out it is a balanced packet's
 * (send), so that traceroute to a VIP (UDP, to ports no frontend has) shows
 * this hop, as traceroute -T does. */
static __always_inline enum xlb_reason unserved(const struct iphdr *ip, enum xlb_reason drop)
{
	return ttl_runs_out(ip) ? XLB_TTL_EXPIRED : drop;
}

static __always_inline enum xlb_reason balance(struct xdp_md *ctx, struct packet *pkt,
					       struct xlb_config *cfg, int is_vip, __u32 bytes)
{
	struct flow_key key = {
		.saddr = pkt->ip->saddr,
		.daddr = pkt->ip->daddr,
		.sport = pkt->ports->source,
		.dport = pkt->ports->dest,
		.proto = pkt->proto,
	};
	__u64 now = xlb_now();
	struct flow fresh = {};
	struct service *svc;
	struct flow *f;
	int in_new = 0, fate;

	f = flow_find(&key, &in_new);
	if (f) {
		fate = flow_fate(&key, pkt, f, in_new, now);
		if (fate != FLOW_ALIVE) {
			flow_forget(&key, f, in_new, fate);
			f = NULL;
		}
	}
	if (f)
		return flow_continue(ctx, pkt, cfg, &key, f, in_new, bytes, now);

	/* Rare (a backend's packet that no entry knows): marked so, for the
	 * compiler to place its code after the hot blocks rather than between.
	 * One call of flow_adopt, for the filter's misses too: each call is a
	 * copy of it, inlined (2,100 instructions). */
	svc = __builtin_expect(!is_vip, 0) ? NULL : service_of(&key);
	if (!svc) {
		if (is_vip && vips.lookup(&key.daddr))
			return unserved(pkt->ip, XLB_DROP_NO_SERVICE);
		return flow_adopt(ctx, pkt, cfg, &key, bytes, now);
	}
	if (flow_create(&key, svc, pkt, &fresh, now) < 0)
		return unserved(pkt->ip, XLB_DROP_NO_BACKEND);
	/* A FIN or RST that no entry knew ends a connection: it opens none. */
	count_flow(&fresh, bytes, !packet_closes(pkt));
	remember_fragment(pkt, &fresh);
	return send(ctx, pkt, cfg, &key, 0, fresh.addr, fresh.port, now);
}

/* The server of a Maglev service's connection key (client -> VIP) that this
 * node has no entry for: another node's (ECMP: the router hashes an error by
 * its own header, not by the connection's), or one from before a failover.
 * NULL for another service: nothing says where its flow went. */
static __always_inline struct backend *maglev_backend(struct flow_key *key)
{
	struct service *svc = service_of(key);
	__u32 backend_id;

	if (!svc || !(svc->flags & SERVICE_MAGLEV))
		return NULL;
	return pick_backend(svc, key, &backend_id);
}

/* An error about a reply (VIP -> client), made about what the backend at
 * addr:port sent, and sent to it. */
static __always_inline enum xlb_reason icmp_to_backend(struct icmp_error *err, struct iphdr *ip,
						       __be32 addr, __be16 port)
{
	icmp_nat_inner(err, &err->inner->saddr, &err->ports->source, addr, port);
	nat_ip_address(ip, &ip->daddr, addr);
	return XLB_ICMP_TO_BACKEND;
}

/* ICMP: pings of a VIP are answered; an error about a balanced flow is made
 * to match the connection its receiver knows (the backend's for an error
 * about a reply, the client's for one about a forwarded packet) and handed
 * to the kernel to route. Found by the quoted packet, reversed: that is the
 * key of the flow entry that rewrote it. */
static __always_inline enum xlb_reason handle_icmp(struct xdp_md *ctx, struct cursor *c,
						   struct ethhdr *eth, struct iphdr *ip,
						   struct xlb_config *cfg, int is_vip)
{
	struct icmphdr *icmp;
	struct icmp_error err;
	struct flow_key key = {};
	struct backend *be;
	struct flow *f;
	int in_new;

	/* Which way an error goes hangs on it: the filter's word is not enough. */
	is_vip = to_a_vip(ip, is_vip);
	if (ip_is_fragment(ip))
		return is_vip ? XLB_DROP_FRAGMENT : XLB_PASS_NOT_VIP;
	icmp = parse_icmp(c, ip);
	if (!icmp)
		return is_vip ? XLB_DROP_MALFORMED : XLB_PASS_SHORT;
	if (is_vip && icmp->type == ICMP_ECHO && icmp->code == 0) {
		icmp_echo_reply(eth, ip, icmp);
		priority_tag_pop(ctx, eth);	/* untagged, as Linux answers */
		return XLB_ICMP_ECHO_REPLY;
	}
	if (parse_icmp_error(c, ip, icmp, &err) < 0)
		return is_vip ? XLB_DROP_NO_SERVICE : XLB_PASS_NOT_VIP;
	if (!is_vip && !xlb_may_be_backend(cfg, err.inner->daddr, err.ports->dest))
		return XLB_PASS_NOT_VIP;
	key.saddr = err.inner->daddr;
	key.daddr = err.inner->saddr;
	key.sport = err.ports->dest;
	key.dport = err.ports->source;
	key.proto = err.inner->protocol;
	f = flow_find(&key, &in_new);
	/* A dead connection is none, as after the sweep: its server may serve
	 * another client on that port by now, and the error is not about it. */
	if (f && !flow_alive(&key, f, in_new, xlb_now()))
		f = NULL;
	/* About a reply of a connection this node never saw (or no longer
	 * has): to the server every node's Maglev table sends its client (path
	 * MTU discovery in an ECMP group). */
	if (!f && is_vip && (be = maglev_backend(&key)))
		return icmp_to_backend(&err, ip, be->addr, be->port);
	if (!f || f->dir != (is_vip ? FLOW_FORWARD : FLOW_REPLY))
		return is_vip ? XLB_DROP_NO_SERVICE : XLB_PASS_NOT_VIP;
	if (is_vip)	/* about a reply, VIP -> client: the backend sent it */
		return icmp_to_backend(&err, ip, f->addr, f->port);
	/* About a forwarded packet, client -> backend: the client sent it to the VIP. */
	if (ip->saddr == err.inner->daddr)
		nat_ip_address(ip, &ip->saddr, f->addr);	/* the backend's own error */
	icmp_nat_inner(&err, &err.inner->daddr, &err.ports->dest, f->addr, f->port);
	return XLB_ICMP_TO_CLIENT;
}

/* How long a datagram's fragments may take to arrive: the kernel's default
 * ipfrag_time, after which a receiver drops what it could not reassemble. */
#define XLB_FRAG_SECONDS 30

/* A fragment but the first: no ports, so it goes where its first fragment
 * went, found by addresses and IP id (remember_fragment), with its address
 * alone rewritten, and on the way the first went: to the kernel, or with the
 * fast path to the next hop (a kernel that reassembles what it forwards, as
 * conntrack does, would hold them for a first fragment it never gets). One
 * whose first fragment this node did not see is dropped if to a VIP, and
 * passed if not (a gateway's traffic). */
static __always_inline enum xlb_reason later_fragment(struct xdp_md *ctx, struct cursor *c,
						      struct ethhdr *eth, struct iphdr *ip,
						      struct xlb_config *cfg, int is_vip,
						      __u32 frame_len)
{
	struct frag_key fk = frag_key_of(ip);
	struct flow *f = frags.lookup(&fk);
	struct l4ports no_ports = {};	/* for the FIB: Linux hashes a fragment by addresses */
	struct packet pkt = { .eth = eth, .ip = ip, .ports = &no_ports };
	int reply, rc;
	struct hop *hop;
	__u16 mtu = 0;
	__u64 now;

	/* An entry older than a reassembly may last is an earlier datagram's,
	 * whose IP id this one reuses. */
	if (!f || xlb_older_than(f->seen, now = xlb_now(), XLB_FRAG_SECONDS))
		return vip_or_pass(ip, is_vip, XLB_DROP_FRAGMENT, XLB_PASS_NOT_VIP);
	/* Checked only for a known datagram's: the fragments of traffic not
	 * xlb's pay nothing for it. */
	if (!ip_datagram_ok(c, ip))
		return vip_or_pass(ip, is_vip, XLB_DROP_MALFORMED, XLB_PASS_SHORT);
	count_flow(f, frame_len, 0);
	if (ttl_runs_out(ip))
		return XLB_TTL_EXPIRED;		/* counted, as send()'s */
	reply = f->dir == FLOW_REPLY;
	nat_ip_address(ip, reply ? &ip->saddr : &ip->daddr, f->addr);
	if (!(cfg->flags & CONFIG_FAST_PATH))
		return reply ? XLB_REPLY : XLB_FORWARD;
	hop = next_hop(ctx, &pkt, now, &rc, &mtu);
	if (!hop)
		return unresolved(rc);	/* over the MTU, the kernel fragments it again */
	return transmit(ctx, &pkt, hop, reply);
}

/* A packet of a protocol xlb does not balance (not TCP, UDP or ICMP): passed
 * if not to a VIP, and as for a VIP's, dropped, a bad IP header told apart
 * (checked only then: traffic not xlb's pays nothing for it). */
static __always_inline enum xlb_reason other_protocol(struct cursor *c, struct iphdr *ip,
						      int is_vip)
{
	if (!to_a_vip(ip, is_vip))
		return XLB_PASS_NOT_VIP;
	if (!ip_datagram_ok(c, ip))
		return XLB_DROP_MALFORMED;
	return unserved(ip, XLB_DROP_NO_SERVICE);
}

/* An IPv4 packet that may be for xlb: to a VIP (is_vip), or TCP or UDP from
 * where a backend may be (xlb_xdp found its ports inside the frame), or ICMP
 * or another protocol. */
static __always_inline enum xlb_reason classify(struct xdp_md *ctx, struct cursor *c,
						struct ethhdr *eth, struct iphdr *ip,
						struct xlb_config *cfg, int is_vip, __u32 frame_len)
{
	struct packet pkt = {};

	if (ip->protocol == IPPROTO_ICMP)
		return handle_icmp(ctx, c, eth, ip, cfg, is_vip);
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return other_protocol(c, ip, is_vip);
	if (ip_is_later_fragment(ip))
		return later_fragment(ctx, c, eth, ip, cfg, is_vip, frame_len);
	if (parse_l4(c, ip, &pkt) < 0)
		return vip_or_pass(ip, is_vip, XLB_DROP_MALFORMED, XLB_PASS_SHORT);
	pkt.eth = eth;
	pkt.first_fragment = ip_is_fragment(ip);
	return balance(ctx, &pkt, cfg, is_vip, frame_len);
}

/* A frame that is not IPv4: ARP for a VIP is answered, the rest passes. */
static __always_inline enum xlb_reason not_ipv4(struct xdp_md *ctx, struct cursor *c,
						struct ethhdr *eth, int proto)
{
	if (proto < 0)
		return XLB_PASS_SHORT;
	if (proto == bpf_htons(ETH_P_ARP))
		return answer_arp(ctx, c, eth);
	return XLB_PASS_NOT_IP;
}

/* Why an IPv4 frame to a group MAC passes untouched: pass_not_unicast if xlb
 * would act on it to a unicast MAC (to a VIP; TCP or UDP that the filter took
 * for a backend's; ICMP, which may be an error about a balanced flow), else
 * pass_not_vip, as to a unicast MAC: the link's multicast protocols (IGMP,
 * OSPF, VRRP) are not VIP traffic that every node receives. */
static __always_inline enum xlb_reason to_group(struct iphdr *ip, int is_vip)
{
	if (ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP ||
	    ip->protocol == IPPROTO_ICMP)
		return XLB_PASS_NOT_UNICAST;
	return vip_or_pass(ip, is_vip, XLB_PASS_NOT_UNICAST, XLB_PASS_NOT_VIP);
}

int xlb_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	struct cursor c = { .pos = data, .end = (void *)(long)ctx->data_end };
	__u32 frame_len = c.end - c.pos;
	struct xlb_config *cfg;
	struct l4ports *ports;
	struct ethhdr *eth;
	struct iphdr *ip;
	__u32 zero = 0;
	int proto, is_vip;

	proto = parse_ethhdr(&c, &eth);
	if (proto != bpf_htons(ETH_P_IP))
		return count_exit(not_ipv4(ctx, &c, eth, proto), frame_len);
	if (parse_iphdr_fixed(&c, &ip) < 0)
		return count_exit(XLB_PASS_SHORT, frame_len);
	cfg = config.lookup(&zero);
	if (!cfg)
		return count_exit(XLB_PASS_NOT_VIP, frame_len);
	is_vip = xlb_filter_has(cfg->vip_bits, ip->daddr);
	/* TCP or UDP not to a VIP, from an address and port that are no backend's
	 * (ports read where the header length puts them, unvalidated): the traffic
	 * a gateway forwards, which must not pay for the balancer. Exits of their
	 * own with constant reasons, whose actions fold away. A later fragment has
	 * no ports: frags decides. */
	if (!is_vip && (ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP) &&
	    !ip_is_later_fragment(ip)) {
		ports = peek_ports(&c, ip);
		if (!ports)
			return count_exit(XLB_PASS_SHORT, frame_len);
		if (!xlb_may_be_backend(cfg, ip->saddr, ports->source))
			return count_exit(XLB_PASS_NOT_VIP, frame_len);
	}
	/* A frame to a group MAC reaches every node on the link, each of which
	 * would balance it: a router forwards none (RFC 1812 5.3.4), and the
	 * kernel drops it so. */
	if (eth_is_group(eth))
		return count_exit(to_group(ip, is_vip), frame_len);
	return count_exit(classify(ctx, &c, eth, ip, cfg, is_vip, frame_len), frame_len);
}

/* The program's clock for the control plane (BPF_PROG_TEST_RUN): xlb_now()
 * in the first 8 bytes of the frame. */
int xlb_clock(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	__u64 *now = data;

	if ((void *)(now + 1) > (void *)(long)ctx->data_end)
		return XDP_ABORTED;
	*now = xlb_now();
	return XDP_PASS;
}

/* The sweep's removals, for the control plane (BPF_PROG_TEST_RUN): a frame of
 * a struct reap_head and XLB_REAP_MAX connections at most (xlb_shared.h; the
 * second entry's value.dir 0: none). A connection goes unless one of its
 * entries is there and no longer as read (the program wrote it since: opened
 * again, one-way traffic); the head gets the forward entries removed.
 * Checked and removed here, a lookup and a delete in the kernel: two bpf(2)
 * calls an entry cost the sweep 4 us on their own, and left milliseconds
 * between the two. */
_Static_assert(sizeof(struct flow) % sizeof(__u64) == 0, "still_as_read: whole words a flow");

static __always_inline int still_as_read(__u32 table, struct reap_entry *e)
{
	__u64 *now, *read = (__u64 *)&e->value;
	struct flow *f;

	if (!e->value.dir)
		return 1;
	f = flow_lookup(&e->key, table);
	if (!f)
		return 1;
	now = (__u64 *)f;
#pragma unroll
	for (int i = 0; i < sizeof(struct flow) / sizeof(__u64); i++)
		if (now[i] != read[i])
			return 0;
	return 1;
}

static __always_inline __u32 reap_entry(__u32 table, struct reap_entry *e)
{
	int rc;

	if (!e->value.dir)
		return 0;
	rc = flow_delete(&e->key, table);
	return rc == 0 && e->value.dir == FLOW_FORWARD;
}

int xlb_reap(struct xdp_md *ctx)
{
	void *end = (void *)(long)ctx->data_end;
	struct reap_head *head = (void *)(long)ctx->data;
	struct reap_entry *e = (void *)(head + 1);
	__u32 table, removed = 0;

	if ((void *)(head + 1) > end)
		return XDP_ABORTED;
	table = head->table;
	for (int i = 0; i < XLB_REAP_MAX; i++, e += 2) {
		if ((void *)(e + 2) > end)
			break;
		if (still_as_read(table, e) && still_as_read(table, e + 1))
			removed += reap_entry(table, e) + reap_entry(table, e + 1);
	}
	head->removed = removed;
	return XDP_PASS;
}
