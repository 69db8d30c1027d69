/* Incremental Internet checksum updates (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
 * Sums are over 16-bit words as they lie in the packet; byte order does not
 * matter to a ones' complement sum as long as it is the same throughout. */
#ifndef XLB_CSUM_H
#define XLB_CSUM_H

static __always_inline __u32 xlb_csum_diff32(__be32 from, __be32 to)
{
	__u32 nf = ~from;

	return (nf & 0xffff) + (nf >> 16) + (to & 0xffff) + (to >> 16);
}

static __always_inline __u32 xlb_csum_diff16(__be16 from, __be16 to)
{
	return (__u16)~from + (__u16)to;
}

static __always_inline __sum16 xlb_csum_fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__sum16)~sum;
}

static __always_inline void xlb_csum_apply(__sum16 *csum, __u32 diff)
{
	*csum = xlb_csum_fold((__u16)~*csum + diff);
}

/* UDP over IPv4: 0 means "no checksum" and stays so; a computed 0 is sent as
 * 0xffff (RFC 768). TCP has no such case. */
static __always_inline void xlb_l4_csum_apply(__sum16 *csum, __u8 proto, __u32 diff)
{
	if (proto == IPPROTO_UDP) {
		if (*csum == 0)
			return;
		xlb_csum_apply(csum, diff);
		if (*csum == 0)
			*csum = (__sum16)0xffff;
		return;
	}
	xlb_csum_apply(csum, diff);
}

#endif
