/* Sizes come from the control plane (control/datapath.py, Limits) as -D flags,
 * so the maps and the code that fills them agree, and so do the checks of the
 * frames' layout (layout.py); a build without them fails. */
#ifndef XLB_CONSTS_H
#define XLB_CONSTS_H

#if !defined(XLB_MAX_SERVICES) || !defined(XLB_MAX_BACKENDS) || \
    !defined(XLB_RING_SIZE) || !defined(XLB_MAX_FLOWS) || !defined(XLB_MAX_NEW_FLOWS) || \
    !defined(XLB_MAX_ARP) || !defined(XLB_MAX_MAGLEV) || !defined(XLB_MAGLEV_SIZE) || \
    !defined(XLB_MAX_HOPS) || !defined(XLB_MAX_FRAGS) || !defined(XLB_MAX_TX_LINKS) || \
    !defined(XLB_TICK_NS) || !defined(XLB_INITIAL_JIFFIES) || !defined(XLB_REAP_MAX) || \
    !defined(XLB_FRAME_MIRRORS)
#error "build with -DXLB_MAX_SERVICES, _MAX_BACKENDS, _RING_SIZE, _MAX_FLOWS, _MAX_NEW_FLOWS, _MAX_ARP, _MAX_MAGLEV, _MAGLEV_SIZE, _MAX_HOPS, _MAX_FRAGS, _MAX_TX_LINKS, _TICK_NS, _INITIAL_JIFFIES, _REAP_MAX, _FRAME_MIRRORS"
#endif

_Static_assert((XLB_MAX_HOPS & (XLB_MAX_HOPS - 1)) == 0, "XLB_MAX_HOPS: a power of 2");

#define XLB_MAX_RINGS (2 * XLB_MAX_SERVICES)
#define XLB_MAX_MAGLEV_TABLES (2 * XLB_MAX_MAGLEV)

#endif
