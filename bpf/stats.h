/* Which XDP action each reason (xlb_shared.h) stands for. */
#ifndef XLB_STATS_H
#define XLB_STATS_H

#include "xlb_shared.h"

/* Three bits a reason, 21 reasons a 64-bit constant: a switch here would
 * become a lookup table in .rodata, which bcc cannot load. */
#define XLB_LOW(name, action) | ((__u64)(XLB_##name < 21 ? (action) : 0) << (3 * (XLB_##name % 21)))
#define XLB_HIGH(name, action) | ((__u64)(XLB_##name >= 21 ? (action) : 0) << (3 * (XLB_##name % 21)))
#define XLB_REASON_ACTIONS_LOW (0 XLB_REASONS(XLB_LOW))
#define XLB_REASON_ACTIONS_HIGH (0 XLB_REASONS(XLB_HIGH))
_Static_assert(XLB_REASON_MAX <= 42, "two 64-bit constants hold 42 reasons");

/* No `% 21`: the JIT makes it a division, the costliest instruction on a
 * packet's path. */
static __always_inline int reason_action(enum xlb_reason reason)
{
	if (reason < 21)
		return (XLB_REASON_ACTIONS_LOW >> (3 * reason)) & 7;
	return (XLB_REASON_ACTIONS_HIGH >> (3 * (reason - 21))) & 7;
}

#endif
