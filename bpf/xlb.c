/* xlb: the XDP program.
 *
 * Pure packet helpers live in headers by concern: parse.h (headers), csum.h
 * and nat.h (rewrites), arp.h (ARP for VIPs), stats.h (reason -> action).
 * This file declares the maps and holds every function that touches them:
 * bcc rewrites map calls (.lookup, .update) in the main file only.
 *
 * Every packet ends in exactly one reason (xlb_shared.h), counted at the one
 * exit, which decides the action. Traffic that is neither for a service nor a
 * reply of one passes untouched.
 */
#include <uapi/linux/bpf.h>

#include "consts.h"
#include "xlb_shared.h"
#include "parse.h"
#include "nat.h"
#include "arp.h"
#include "stats.h"

BPF_HASH(services, struct service_key, struct service, XLB_MAX_SERVICES);
BPF_ARRAY(backends, struct backend, XLB_MAX_BACKENDS);
/* Backend ids, XLB_RING_SIZE slots a ring, two rings a service. */
BPF_ARRAY(rings, __u32, XLB_MAX_RINGS * XLB_RING_SIZE);
/* Addresses that are the VIP of some service: fragments and malformed
 * packets to them are dropped, not passed to a kernel that does not own them. */
BPF_HASH(vips, __be32, __u32, XLB_MAX_SERVICES);
BPF_HASH(arp_vips, struct arp_key, struct arp_mac, XLB_MAX_ARP);
BPF_TABLE("lru_hash", struct flow_key, struct flow, flows, XLB_MAX_FLOWS);

/* Round-robin position per service and CPU: no shared atomics on the fast path. */
BPF_PERCPU_ARRAY(rr_cursor, __u32, XLB_MAX_SERVICES);
BPF_PERCPU_ARRAY(service_stats, struct counters, XLB_MAX_SERVICES);
BPF_PERCPU_ARRAY(backend_stats, struct counters, XLB_MAX_BACKENDS);
BPF_PERCPU_ARRAY(reason_stats, struct tally, XLB_REASON_MAX);

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
	return XLB_ARP_REPLY;
}

/* The next slot of the service's active ring, per CPU; the CPU number offsets
 * the start so that CPUs do not all begin with the ring's first backend. */
static __always_inline struct backend *pick_backend(struct service *svc, __u32 *backend_id)
{
	__u32 len = svc->ring_len;
	__u32 *cursor, *id, slot, idx;

	if (len == 0 || len > XLB_RING_SIZE)
		return NULL;
	cursor = rr_cursor.lookup(&svc->id);
	if (!cursor)
		return NULL;
	slot = (*cursor + bpf_get_smp_processor_id()) % len;
	*cursor += 1;
	idx = svc->ring * XLB_RING_SIZE + slot;
	id = rings.lookup(&idx);
	if (!id)
		return NULL;
	*backend_id = *id;
	return backends.lookup(id);
}

/* Picks a backend for the new connection `key` (client -> VIP), stores the
 * forward entry and the reply entry (backend -> client), and fills *fwd with
 * the forward one. Returns 0, or -1 when the service has no backend. */
static __always_inline int flow_create(struct flow_key *key, struct service *svc, struct flow *fwd)
{
	struct flow_key reply_key = {};
	struct flow reply = {};
	struct backend *be;
	__u32 backend_id = 0;

	be = pick_backend(svc, &backend_id);
	if (!be)
		return -1;

	fwd->addr = be->addr;
	fwd->port = be->port;
	fwd->dir = FLOW_FORWARD;
	fwd->service_id = svc->id;
	fwd->backend_id = backend_id;

	reply_key.saddr = be->addr;
	reply_key.daddr = key->saddr;
	reply_key.sport = be->port;
	reply_key.dport = key->sport;
	reply_key.proto = key->proto;
	reply.addr = key->daddr;
	reply.port = key->dport;
	reply.dir = FLOW_REPLY;
	reply.service_id = svc->id;
	reply.backend_id = backend_id;

	flows.update(key, fwd);
	flows.update(&reply_key, &reply);
	return 0;
}

/* The flow's backend takes no new flows (see BACKEND_NO_NEW_FLOWS). */
static __always_inline int backend_closed(struct flow *f)
{
	struct backend *be = backends.lookup(&f->backend_id);

	return !be || (be->flags & BACKEND_NO_NEW_FLOWS);
}

static __always_inline enum xlb_reason balance(struct packet *pkt, __u32 bytes)
{
	struct flow_key key = {
		.saddr = pkt->ip->saddr,
		.daddr = pkt->ip->daddr,
		.sport = pkt->ports->source,
		.dport = pkt->ports->dest,
		.proto = pkt->proto,
	};
	struct service_key skey = {};
	struct flow fresh = {};
	struct service *svc;
	struct flow *f;

	f = flows.lookup(&key);
	if (f && !(f->dir == FLOW_FORWARD && packet_opens(pkt) && backend_closed(f))) {
		count_flow(f, bytes, 0);
		if (f->dir == FLOW_REPLY) {
			nat_source(pkt, f->addr, f->port);
			return XLB_REPLY;
		}
		nat_dest(pkt, f->addr, f->port);
		return XLB_FORWARD;
	}

	skey.vip = key.daddr;
	skey.port = key.dport;
	skey.proto = key.proto;
	svc = services.lookup(&skey);
	if (!svc)
		return XLB_PASS_NOT_VIP;
	if (flow_create(&key, svc, &fresh) < 0)
		return XLB_DROP_NO_BACKEND;
	count_flow(&fresh, bytes, 1);
	nat_dest(pkt, fresh.addr, fresh.port);
	return XLB_FORWARD;
}

/* For packets that cannot be balanced: dropped if addressed to a VIP (the
 * kernel does not own the VIP, so passing them would only loop them). */
static __always_inline enum xlb_reason vip_or_pass(struct iphdr *ip, enum xlb_reason if_vip,
						   enum xlb_reason otherwise)
{
	return vips.lookup(&ip->daddr) ? if_vip : otherwise;
}

static __always_inline enum xlb_reason classify(struct xdp_md *ctx, __u32 frame_len)
{
	void *data = (void *)(long)ctx->data;
	struct cursor c = { .pos = data, .end = (void *)(long)ctx->data_end };
	struct packet pkt = {};
	struct ethhdr *eth;
	struct iphdr *ip;
	int proto;

	proto = parse_ethhdr(&c, &eth);
	if (proto < 0)
		return XLB_PASS_SHORT;
	if (proto == bpf_htons(ETH_P_ARP))
		return answer_arp(ctx, &c, eth);
	if (proto != bpf_htons(ETH_P_IP))
		return XLB_PASS_NOT_IP;
	if (parse_iphdr_fixed(&c, &ip) < 0)
		return XLB_PASS_SHORT;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return XLB_PASS_NOT_VIP;
	if (ip_is_fragment(ip))
		return vip_or_pass(ip, XLB_DROP_FRAGMENT, XLB_PASS_NOT_VIP);
	if (parse_l4(&c, ip, frame_len, &pkt) < 0)
		return vip_or_pass(ip, XLB_DROP_MALFORMED, XLB_PASS_SHORT);
	pkt.eth = eth;
	return balance(&pkt, frame_len);
}

int xlb_xdp(struct xdp_md *ctx)
{
	__u32 frame_len = ctx->data_end - ctx->data;

	return count_exit(classify(ctx, frame_len), frame_len);
}
