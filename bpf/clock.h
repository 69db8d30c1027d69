/* xlb's clock for flows and next hops: nanoseconds since boot, by jiffies.
 * bpf_jiffies64() is inlined by the verifier; bpf_ktime_get_coarse_ns() is a
 * helper call that cost as much as a flow-table lookup (make bench). A tick
 * (1 to 10 ms) is resolution enough for timeouts of seconds. The control
 * plane passes the kernel's tick and the jiffies at boot (INITIAL_JIFFIES)
 * and reads the same clock through xlb_clock (xlb.c). */
#ifndef XLB_CLOCK_H
#define XLB_CLOCK_H

#define NSEC_PER_SEC 1000000000ULL

static __always_inline __u64 xlb_now(void)
{
	return (bpf_jiffies64() - XLB_INITIAL_JIFFIES) * XLB_TICK_NS;
}

/* Whether `then` lies more than `seconds` before now. `then` may be a moment
 * ahead of now when another CPU just wrote it. */
static __always_inline int xlb_older_than(__u64 then, __u64 now, __u64 seconds)
{
	return now > then && now - then > seconds * NSEC_PER_SEC;
}

#endif
