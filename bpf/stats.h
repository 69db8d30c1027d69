/* Which XDP action each reason (xlb_shared.h) stands for. */
#ifndef XLB_STATS_H
#define XLB_STATS_H

#include "xlb_shared.h"

/* Three bits a reason in one constant: a switch here would become a lookup
 * table in .rodata, which bcc cannot load. */
#define XLB_REASON_ACTION_BITS(name, action) | ((__u64)(action) << (3 * XLB_##name))
#define XLB_REASON_ACTIONS (0 XLB_REASONS(XLB_REASON_ACTION_BITS))
_Static_assert(XLB_REASON_MAX <= 21, "three bits per reason must fit in 64");

static __always_inline int reason_action(enum xlb_reason reason)
{
	return (XLB_REASON_ACTIONS >> (3 * reason)) & 7;
}

#endif
