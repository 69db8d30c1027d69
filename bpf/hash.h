/* Hashes the control plane computes too (control/maglev.py, control/datapath.py):
 * change one side and the drift tests fail. */
#ifndef XLB_HASH_H
#define XLB_HASH_H

#include "xlb_shared.h"

/* murmur3's finalizer: every input bit reaches every output bit. */
static __always_inline __u32 xlb_mix(__u32 h)
{
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

/* The Maglev hash of a flow: the 5-tuple as it lies in the packet, so that
 * every node computes the same value for the same packet. */
static __always_inline __u32 xlb_flow_hash(__be32 saddr, __be32 daddr, __be16 sport,
					   __be16 dport, __u8 proto)
{
	__u32 ports = (__u32)sport | ((__u32)dport << 16);

	return xlb_mix(saddr ^ xlb_mix(daddr ^ xlb_mix(ports ^ xlb_mix(proto ^ 0x9e3779b9))));
}

/* The Maglev hash of a SERVICE_SOURCE flow: its client's address alone, so
 * that every flow of one client has one slot. */
static __always_inline __u32 xlb_source_hash(__be32 saddr)
{
	return xlb_mix(saddr ^ 0x9e3779b9);
}

/* The slot of a next hop in the hops cache (struct hop): the program's alone. */
static __always_inline __u32 xlb_hop_slot(__be32 daddr, __u32 in_ifindex)
{
	return xlb_mix(daddr ^ (in_ifindex * 0x9e3779b9u)) & (XLB_MAX_HOPS - 1);
}

/* The bit of a value in the config's address filters (struct xlb_config). */
static __always_inline __u32 xlb_filter_slot(__u32 value)
{
	return (value * 0x9e3779b1u) >> XLB_FILTER_SHIFT;
}

static __always_inline int xlb_filter_has(const __u64 *bits, __u32 value)
{
	__u32 slot = xlb_filter_slot(value);

	return (bits[(slot >> 6) & (XLB_FILTER_WORDS - 1)] >> (slot & 63)) & 1;
}

/* Whether addr:port may be a backend's (a set bit may be another's). */
static __always_inline int xlb_may_be_backend(const struct xlb_config *cfg, __be32 addr,
					      __be16 port)
{
	return xlb_filter_has(cfg->backend_bits, addr + ((__u32)port << 16));
}

#endif
