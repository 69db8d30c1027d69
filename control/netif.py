"""The interfaces of this network namespace, read over netlink (pyroute2)."""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
import struct
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

from pyroute2 import IPRoute, NetlinkError
from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR
from pyroute2.netlink.rtnl import (RTM_DELADDR, RTM_DELLINK, RTM_DELROUTE, RTM_GETNEIGH,
                                   RTM_GETROUTE, RTM_NEWADDR, RTM_NEWLINK, RTM_NEWNEIGH,
                                   RTM_NEWROUTE)
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

IFF_UP = 0x1
IFF_LOOPBACK = 0x8
IFF_LOWER_UP = 0x10000      # the link has carrier (a cable in, the veth's peer up)
ARPHRD_ETHER = 1            # a link's type: Ethernet frames (NICs, veth, bridges, VLANs, bonds)
NUD_STALE, NTF_USE = 0x04, 0x01     # linux/neighbour.h
# IFLA_XDP_ATTACHED as pyroute2 names it, and the XDP_FLAGS_* that ask for each mode.
XDP_MODES = {"xdp": "native", "xdpgeneric": "generic", "xdpoffload": "offload"}
_XDP_MODE_FLAGS = {"generic": 1 << 1, "native": 1 << 2, "offload": 1 << 3}
XDP_FLAGS_UPDATE_IF_NOEXIST, XDP_FLAGS_REPLACE = 1 << 0, 1 << 4
# A link xlb attached to, as the kernel has it now (Datapath.attachments):
# up; down (it keeps the program, and serves again once up); gone (deleted:
# the program went with it); detached (its program removed or replaced by hand).
LINK_STATES = ("up", "down", "gone", "detached")


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    mac: bytes
    up: bool
    loopback: bool
    addresses: tuple[IPv4Interface, ...]
    xdp_prog_id: int = 0    # the XDP program attached, if any
    xdp_mode: str = ""      # its mode: native, generic, offload
    carrier: bool = True    # up with carrier: frames can come and go
    ethernet: bool = True   # carries Ethernet frames, which the program parses (not tun, ipip)

    @property
    def state(self) -> str:
        """As LINK_STATES has a link that runs a program: up, or down (set down,
        or without carrier: a cable pulled, the veth's peer down)."""
        return "up" if self.carrier else "down"

    @property
    def networks(self) -> tuple[IPv4Network, ...]:
        return tuple(a.network for a in self.addresses)

    def holds(self, addr: IPv4Address) -> bool:
        """True if addr is on one of this link's IPv4 subnets (so ARP for it arrives here)."""
        return any(addr in net for net in self.networks)

    def reread(self, now: Link) -> Link:
        """This link as attached, with what an apply takes from `now` (the
        same link read again): its name, which frontends name, and its MAC
        and addresses, which the ARP answers go by. A rename keeps the program."""
        return dataclasses.replace(self, name=now.name, mac=now.mac, addresses=now.addresses)


def _mac(text: str) -> bytes:
    """A MAC as netlink attributes give it ("02:00:00:00:0a:01"), as bytes."""
    return bytes.fromhex(text.replace(":", ""))


def links() -> list[Link]:
    with IPRoute() as ipr:
        addrs: dict[int, list[IPv4Interface]] = {}
        for msg in ipr.get_addr(family=2):
            iface = IPv4Interface(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}")
            addrs.setdefault(msg["index"], []).append(iface)
        result = []
        for msg in ipr.get_links():
            mac = msg.get_attr("IFLA_ADDRESS") or "00:00:00:00:00:00"
            prog_id, mode = _xdp(msg)
            result.append(Link(
                index=msg["index"],
                name=msg.get_attr("IFLA_IFNAME"),
                mac=_mac(mac),
                up=bool(msg["flags"] & IFF_UP),
                loopback=bool(msg["flags"] & IFF_LOOPBACK),
                addresses=tuple(addrs.get(msg["index"], ())),
                xdp_prog_id=prog_id,
                xdp_mode=mode,
                carrier=msg["flags"] & (IFF_UP | IFF_LOWER_UP) == IFF_UP | IFF_LOWER_UP,
                ethernet=msg["ifi_type"] == ARPHRD_ETHER,
            ))
        return result


def _xdp(msg) -> tuple[int, str]:
    """The XDP program a link's message says is attached (0 for none), and its mode."""
    xdp = msg.get_attr("IFLA_XDP")
    mode = xdp.get_attr("IFLA_XDP_ATTACHED") if xdp else None
    return ((xdp.get_attr("IFLA_XDP_PROG_ID") or 0) if mode else 0), XDP_MODES.get(mode, "")


def xdp_prog_id(index: int) -> int:
    """The id of the XDP program attached to a link, 0 for none or a link gone."""
    with IPRoute() as ipr:
        try:
            (msg,) = ipr.get_links(index)
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return 0
            raise
    return _xdp(msg)[0]


def select(names: list[str] | tuple[str, ...]) -> list[Link]:
    """The named links. Raises LookupError naming an interface that does not
    exist here."""
    by_name = {link.name: link for link in links()}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise LookupError(f"no interface {unknown[0]!r} in this network namespace")
    return [by_name[n] for n in dict.fromkeys(names)]


def local_addresses(found: Iterable[Link]) -> dict[IPv4Address, str]:
    """Every local IPv4 address of these links (links()), and the link that has it."""
    return {a.ip: link.name for link in found for a in link.addresses}


RT_TABLE_LOCAL = 255
_LOCAL_KINDS = {2: "local", 3: "broadcast"}    # RTN_LOCAL, RTN_BROADCAST


def local_routes(found: list[Link]) -> list[tuple[IPv4Network, str, str]]:
    """The kernel's own destinations beyond the links' addresses: the local
    table's local routes (a prefix routed to the host itself, `ip route add
    local 10.9.0.0/16 dev lo`) and broadcast ones (each subnet's broadcast
    address), as (prefix, "local" or "broadcast", name of the link, of `found`)."""
    names = {link.index: link.name for link in found}
    return [(r.dst, _LOCAL_KINDS[r.type], names.get(r.oif, "?"))
            for r in table_routes(RT_TABLE_LOCAL) if r.type in _LOCAL_KINDS]


@dataclass(frozen=True)
class Route:
    """An IPv4 route of a table, as far as xlb reads one."""
    dst: IPv4Network
    type: int           # RTN_*: unicast, local, broadcast, blackhole, ...
    protocol: int       # RTPROT_*: who added it
    oif: int            # the link it leaves by, 0 for none


def table_routes(table: int) -> list[Route]:
    """The IPv4 routes of routing table `table`; none if there is no such
    table. The kernel is asked for that table alone (strict checking, as `ip
    route show table N` asks): pyroute2's get_routes(table=) reads every
    table and picks in Python, which took 6.7 s for the local table's two
    routes beside 50,000 in main (a BGP speaker's host may hold a full
    table), this 1 ms."""
    request = _TABLE_DUMP.pack(_TABLE_DUMP.size, RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, 1, 0,
                               socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0,
                               _RTA.size + 4, _RTA_TABLE, table)
    routes = []
    try:
        for kind, data, body, end in _dump(request):
            if kind != RTM_NEWROUTE:
                continue
            _, dst_len, _, _, _, protocol, _, rtype = struct.unpack_from("=8B", data, body)
            attrs = _attributes(data, body + _RTMSG_LEN, end)
            dst = data[slice(*attrs[RTA_DST])] if RTA_DST in attrs else bytes(4)
            routes.append(Route(IPv4Network((dst, dst_len)), rtype, protocol,
                                _u32(data, attrs.get(RTA_OIF))))
    except OSError as e:
        if e.errno == errno.ENOENT:     # no such table (yet): no routes
            return []
        raise OSError(e.errno, f"routing table {table}: {e.strerror}") from None
    return routes


def _dump(request: bytes) -> Iterator[tuple[int, bytes, int, int]]:
    """The messages of the netlink dump `request` asks for (its nlmsghdr and
    body, read with strict checking: the kernel applies the request's
    filters), each as (type, buffer, offset of its body, offset of its end).
    Raises OSError with the kernel's error."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       socket.NETLINK_ROUTE) as sock:
        sock.setsockopt(_SOL_NETLINK, _NETLINK_GET_STRICT_CHK, 1)
        sock.bind((0, 0))
        sock.send(request)
        while True:
            data = sock.recv(65536)
            at = 0
            while at + _NLMSGHDR.size <= len(data):
                length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, at)
                if length < _NLMSGHDR.size:
                    break
                body = at + _NLMSGHDR.size
                if kind in (NLMSG_DONE, NLMSG_ERROR):
                    if code := -struct.unpack_from("=i", data, body)[0]:
                        raise OSError(code, os.strerror(code))
                    if kind == NLMSG_DONE:
                        return
                else:
                    yield kind, data, body, at + length
                at += (length + 3) & ~3


def strict_rp_filter(name: str) -> bool:
    """Strict reverse-path filtering (1) on a link: the kernel uses the larger of
    `all` and the link's own setting."""
    conf = Path("/proc/sys/net/ipv4/conf")
    values = [int((conf / n / "rp_filter").read_text()) for n in ("all", name)
              if (conf / n / "rp_filter").exists()]
    return max(values, default=0) == 1


def veth_peer_without_xdp(index: int, joins: bool) -> str | None:
    """For a veth whose peer runs no XDP program, the peer's name: frames sent
    into such a veth with XDP_TX or XDP_REDIRECT are lost (seen on 6.18; the
    peer's XDP program, even one that passes everything, makes them arrive).
    None for other links, a peer with a program, or a peer that cannot be seen;
    with joins (xlb attaches every link that comes up), also for a peer in this
    namespace that is down: it runs xlb's program once up, as nothing reaches
    it before."""
    with IPRoute() as ipr:
        (link,) = ipr.get_links(index)
        info = link.get_attr("IFLA_LINKINFO")
        if info is None or info.get_attr("IFLA_INFO_KIND") != "veth":
            return None
        peer, nsid = link.get_attr("IFLA_LINK"), link.get_attr("IFLA_LINK_NETNSID")
        try:
            (other,) = ipr.link("get", index=peer, **({} if nsid is None else
                                                        {"if_netnsid": nsid}))
        except Exception:          # NetlinkError, or the peer's namespace is gone
            return None
        xdp = other.get_attr("IFLA_XDP")
        if xdp is not None and xdp.get_attr("IFLA_XDP_PROG_ID"):
            return None
        if joins and nsid is None and not other["flags"] & IFF_UP:
            return None
        return other.get_attr("IFLA_IFNAME")


def xdp_set(ifindex: int, fd: int, mode: str, expected_fd: int | None = None) -> None:
    """Attaches the XDP program fd to ifindex through netlink, so that it outlives
    this process; fd -1 detaches. With expected_fd, the kernel swaps programs in
    one step, and only if expected_fd is the one attached (XDP_FLAGS_REPLACE);
    without, it refuses where a program is attached already. Raises OSError."""
    flags = _XDP_MODE_FLAGS[mode]
    attrs = [("IFLA_XDP_FD", fd)]
    if expected_fd is None:
        flags |= XDP_FLAGS_UPDATE_IF_NOEXIST
    else:
        flags |= XDP_FLAGS_REPLACE
        attrs.append(("IFLA_XDP_EXPECTED_FD", expected_fd))
    attrs.append(("IFLA_XDP_FLAGS", flags))
    with IPRoute() as ipr:
        try:
            ipr.link("set", index=ifindex, xdp={"attrs": attrs})
        except NetlinkError as e:
            raise OSError(e.code, os.strerror(e.code)) from None


def renew_stale(hops: set[tuple[int, bytes]]) -> None:
    """Has the kernel check each stale neighbour entry that is one of these
    next hops (link index, MAC) as a packet it sent there would (NTF_USE):
    a probe after delay_first_probe_time, and, unanswered (the neighbour's
    MAC changed: its NIC or VM replaced), the entry fails and is resolved
    anew. The fast path sends past the kernel, which so never saw an entry
    in use: stale, it was used for good. Not logged: on a busy balancer,
    every reachable time (~30 s) would tell the same next hops again. The
    neighbours are read raw: pyroute2 took 0.18 ms an entry to parse, 0.18 s
    of the path's CPU each round beside 1,000 of them."""
    request = _NEIGH_DUMP.pack(_NEIGH_DUMP.size, RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP, 1, 0,
                               socket.AF_INET, 0, 0, 0, 0, 0, 0)
    stale = []
    for kind, data, body, end in _dump(request):
        _, _, _, ifindex, state, _, _ = _NDMSG.unpack_from(data, body)
        if kind != RTM_NEWNEIGH or state != NUD_STALE:
            continue
        attrs = _attributes(data, body + _NDMSG.size, end)
        if _NDA_DST in attrs and _NDA_LLADDR in attrs and \
                (ifindex, data[slice(*attrs[_NDA_LLADDR])]) in hops:
            stale.append((ifindex, str(IPv4Address(data[slice(*attrs[_NDA_DST])]))))
    if not stale:
        return
    with IPRoute() as ipr:
        for ifindex, address in stale:
            try:
                ipr.neigh("change", dst=address, ifindex=ifindex, flags=NTF_USE,
                          family=socket.AF_INET)
            except NetlinkError as e:
                if e.code != errno.ENOENT:      # gone since the dump
                    raise


# A route lookup as `ip route get ADDR` asks it: nlmsghdr, rtmsg (IPv4, dst_len
# 32, the rest 0) and RTA_DST; and the headers of the answers.
_ROUTE_GET = struct.Struct("=IHHII8BIHH4s")
_NLMSGHDR, _RTA = struct.Struct("=IHHII"), struct.Struct("=HH")
_RTMSG_LEN, RTA_DST, RTA_OIF, _RTA_TABLE = 12, 1, 4, 15
# A dump of one table's routes: nlmsghdr, rtmsg (IPv4, the rest 0) and RTA_TABLE.
_TABLE_DUMP = struct.Struct("=IHHII8BIHHI")
_SOL_NETLINK, _NETLINK_GET_STRICT_CHK = 270, 12     # linux/netlink.h, since Linux 4.20
# A dump of the neighbours: nlmsghdr and ndmsg (IPv4, the rest 0); ndmsg and
# the attributes of its answers (linux/neighbour.h).
_NDMSG = struct.Struct("=BBHiHBB")
_NEIGH_DUMP = struct.Struct("=IHHII" + _NDMSG.format[1:])
_NDA_DST, _NDA_LLADDR = 1, 2
_LOOKUPS_IN_FLIGHT = 64     # their answers, ~1 KiB each, wait in the socket's buffer


def route_links(addresses: Iterable[IPv4Address]) -> dict[IPv4Address, int]:
    """The link the kernel routes each address through now, as `ip route get`
    has it (rules, the longest prefix, one path of a multipath route), by its
    index; an address it has no route for is left out. The lookups go out
    in batches on one socket, and of each answer only its link is read:
    pyroute2's route("get") took 190 us an address (10,000 servers, 1.9 s of
    CPU a round of the link watch), this 2 us, whatever the routing table's
    size (a dump of it costs 0.2 ms a route)."""
    addresses = list(addresses)
    found: dict[IPv4Address, int] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       socket.NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        for first in range(0, len(addresses), _LOOKUPS_IN_FLIGHT):
            waiting = set(range(first, min(first + _LOOKUPS_IN_FLIGHT, len(addresses))))
            while waiting:
                # The kernel answers within send(): what recv does not find
                # then was lost to a full buffer (ENOBUFS), and is asked again.
                sock.send(b"".join(
                    _ROUTE_GET.pack(_ROUTE_GET.size, RTM_GETROUTE, NLM_F_REQUEST, i + 1, 0,
                                    socket.AF_INET, 32, 0, 0, 0, 0, 0, 0, 0,
                                    _RTA.size + 4, RTA_DST, addresses[i].packed)
                    for i in sorted(waiting)))
                answered = 0
                for seq, oif in _route_answers(sock):
                    if seq - 1 in waiting:
                        waiting.discard(seq - 1)
                        answered += 1
                        if oif:
                            found[addresses[seq - 1]] = oif
                if not answered:
                    raise OSError(errno.ENOBUFS, "route lookups unanswered")
    return found


def _route_answers(sock: socket.socket) -> Iterator[tuple[int, int]]:
    """(sequence number, link index or 0) of each answer waiting on sock: a
    route's RTA_OIF, 0 for an error (no route, unreachable, prohibit)."""
    while True:
        try:
            data = sock.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno == errno.ENOBUFS:    # some answers dropped: the rest are read
                continue
            raise
        at = 0
        while at + _NLMSGHDR.size <= len(data):
            length, kind, _, seq, _ = _NLMSGHDR.unpack_from(data, at)
            if length < _NLMSGHDR.size:
                break
            if kind == NLMSG_ERROR:
                yield seq, 0
            elif kind == RTM_NEWROUTE:
                yield seq, _u32(data, _attributes(data, at + _NLMSGHDR.size + _RTMSG_LEN,
                                                  at + length).get(RTA_OIF))
            at += (length + 3) & ~3


def _attributes(data: bytes, at: int, end: int) -> dict[int, tuple[int, int]]:
    """Where the value of each attribute (route's, neighbour's) at data[at:end]
    starts and ends, by type."""
    found = {}
    while at + _RTA.size <= end:
        length, kind = _RTA.unpack_from(data, at)
        if length < _RTA.size:
            break
        found[kind] = (at + _RTA.size, at + length)
        at += (length + 3) & ~3
    return found


def _u32(data: bytes, value: tuple[int, int] | None) -> int:
    """A 32-bit attribute's value (_attributes), 0 for none."""
    return struct.unpack_from("=I", data, value[0])[0] if value and value[1] - value[0] >= 4 else 0


# rtnetlink's multicast groups (RTMGRP_*, linux/rtnetlink.h).
_RTMGRP_LINK, _RTMGRP_IPV4_IFADDR, _RTMGRP_IPV4_ROUTE = 0x1, 0x10, 0x40


@dataclass(frozen=True)
class LinkLoss:
    """A link that can carry no more frames: how (lost its carrier, was set
    down, was deleted)."""
    index: int
    name: str
    how: str


class LinkEvents:
    """Link, IPv4 address and IPv4 route changes as the kernel announces them
    (rtnetlink's multicast groups), read without blocking from `fileno()`
    when it is readable: a socket of its own, which an event loop can watch
    (pyroute2's IPRoute runs a loop of its own), its messages parsed by
    pyroute2."""

    def __init__(self):
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                                   socket.NETLINK_ROUTE)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._sock.bind((0, _RTMGRP_LINK | _RTMGRP_IPV4_IFADDR | _RTMGRP_IPV4_ROUTE))
        # Links with carrier, by index, with their names: a loss is a change
        # from that, not every message about a link down (its statistics, an
        # address, XDP attached). None: not known (at the start, after an
        # overrun) until carrier().
        self._carrier: dict[int, str] | None = None
        # Those known before an overrun, and the losses and the carriers
        # regained that carrier() found since.
        self._before: dict[int, str] | None = None
        self._missed: list[LinkLoss] = []
        self._found: list[int] = []
        # Link messages read, or lost, while the carriers are not known: each
        # may be news the links' dump in progress missed.
        self._unheeded = 0
        self._reading = threading.Lock()     # never held while the links are dumped
        self._marshal = MarshalRtnl()

    def carrier(self) -> None:
        """Reads which links have carrier now, if not known. Those that had
        it before an overrun and have none now are the next read()'s losses,
        and those that have it now and had not its carriers regained: their
        events may be among those lost. Where a link message was read (or
        lost) while the links were dumped, news the dump may have missed,
        they stay unknown, for another call to read them again from there."""
        with self._reading:
            if self._carrier is not None:
                return
            unheeded = self._unheeded
        now = {link.index: link for link in links()}
        with self._reading:             # one thread tells the losses
            if self._carrier is not None:
                return
            carrier = {index: link.name for index, link in now.items() if link.carrier}
            if self._before is not None:
                self._missed += [LinkLoss(index, name,
                                          "was deleted" if index not in now else
                                          "was set down" if not now[index].up else
                                          "lost its carrier")
                                 for index, name in self._before.items() if index not in carrier]
                self._found += [index for index in carrier if index not in self._before]
            if self._unheeded == unheeded:
                self._carrier, self._before = carrier, None
            else:
                self._before = carrier

    @property
    def overrun(self) -> bool:
        """Whether events were lost and carrier() is still to be called."""
        return self._carrier is None

    def lacks_carrier(self, index: int) -> bool:
        """Whether the link is known to have no carrier (not known after an
        overrun, until carrier())."""
        return self._carrier is not None and index not in self._carrier

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def read(self, ignore_table: int | None = None, known: Mapping[int, Link] = {}
             ) -> tuple[list[LinkLoss], list[int], bool, set[int]]:
        """The links lost since the last read, the indexes of those that
        regained their carrier, whether routing may have changed
        meanwhile (a route changed, other than in ignore_table, or a link
        came up), and the indexes of the links whose IPv4 addresses changed
        or, of those in `known` (by index, as read before), whose MAC or
        name is another now. An overrun socket (ENOBUFS: events were lost)
        counts as a change, and as a change of the addresses of every link
        in `known`; no loss is told until carrier() is called (not in an
        event loop's thread: pyroute2 runs one of its own), and the read
        after it tells those the lost events held."""
        with self._reading:             # not while carrier() tells them
            return self._read(ignore_table, known)

    def _read(self, ignore_table: int | None, known: Mapping[int, Link]
              ) -> tuple[list[LinkLoss], list[int], bool, set[int]]:
        lost, self._missed = self._missed, []
        regained, self._found = self._found, []
        changed, readdressed = False, set()
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                return lost, regained, changed, readdressed
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                if self._carrier is not None:
                    self._before = self._carrier
                self._carrier, changed = None, True
                self._unheeded += 1
                readdressed.update(known)
                continue
            for msg in self._marshal.parse(data):
                kind = msg["header"]["type"]
                if kind in (RTM_NEWADDR, RTM_DELADDR):
                    readdressed.add(msg["index"])
                elif kind == RTM_NEWLINK and msg["family"] != socket.AF_BRIDGE and (
                        (link := known.get(msg["index"])) is not None
                        and ((mac := msg.get_attr("IFLA_ADDRESS")) and _mac(mac) != link.mac
                             or msg.get_attr("IFLA_IFNAME") != link.name)):
                    readdressed.add(msg["index"])
                if kind in (RTM_NEWLINK, RTM_DELLINK) and self._carrier is None:
                    self._unheeded += 1
                # A bridge tells its ports' joining and leaving (RTM_DELLINK
                # for a port still there) as link messages of its own family.
                elif kind in (RTM_NEWLINK, RTM_DELLINK) and msg["family"] != socket.AF_BRIDGE:
                    index, flags = msg["index"], msg["flags"]
                    up = kind == RTM_NEWLINK and flags & (IFF_UP | IFF_LOWER_UP) == \
                        IFF_UP | IFF_LOWER_UP
                    name = msg.get_attr("IFLA_IFNAME") or ""
                    if up and index not in self._carrier:
                        self._carrier[index] = name
                        regained.append(index)
                        changed = True
                    elif up:
                        self._carrier[index] = name     # renamed, maybe
                    elif index in self._carrier:
                        del self._carrier[index]
                        lost.append(LinkLoss(index, name,
                                             "was deleted" if kind == RTM_DELLINK else
                                             "was set down" if not flags & IFF_UP else
                                             "lost its carrier"))
                    elif kind == RTM_DELLINK:
                        # The kernel sets a link down (and tells it) before it deletes it.
                        lost = [dataclasses.replace(loss, how="was deleted")
                                if loss.index == index else loss for loss in lost]
                elif kind in (RTM_NEWROUTE, RTM_DELROUTE):
                    table = msg.get_attr("RTA_TABLE") or msg["table"]
                    changed |= table != ignore_table
