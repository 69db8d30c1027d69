/* Sizes come from the control plane (control/datapath.py, Limits) as -D flags,
 * so the maps and the code that fills them agree; a build without them fails. */
#ifndef XLB_CONSTS_H
#define XLB_CONSTS_H

#if !defined(XLB_MAX_SERVICES) || !defined(XLB_MAX_BACKENDS) || \
    !defined(XLB_RING_SIZE) || !defined(XLB_MAX_FLOWS) || !defined(XLB_MAX_ARP)
#error "build with -DXLB_MAX_SERVICES, _MAX_BACKENDS, _RING_SIZE, _MAX_FLOWS, _MAX_ARP"
#endif

#define XLB_MAX_RINGS (2 * XLB_MAX_SERVICES)

#endif
