"""The interfaces of this network namespace, read over netlink (pyroute2)."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

from pyroute2 import IPRoute

IFF_UP = 0x1
IFF_LOOPBACK = 0x8


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    mac: bytes
    up: bool
    loopback: bool
    addresses: tuple[IPv4Interface, ...]

    @property
    def networks(self) -> tuple[IPv4Network, ...]:
        return tuple(a.network for a in self.addresses)

    def holds(self, addr: IPv4Address) -> bool:
        """True if addr is on one of this link's IPv4 subnets (so ARP for it arrives here)."""
        return any(addr in net for net in self.networks)


def links() -> list[Link]:
    with IPRoute() as ipr:
        addrs: dict[int, list[IPv4Interface]] = {}
        for msg in ipr.get_addr(family=2):
            iface = IPv4Interface(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}")
            addrs.setdefault(msg["index"], []).append(iface)
        result = []
        for msg in ipr.get_links():
            mac = msg.get_attr("IFLA_ADDRESS") or "00:00:00:00:00:00"
            result.append(Link(
                index=msg["index"],
                name=msg.get_attr("IFLA_IFNAME"),
                mac=bytes.fromhex(mac.replace(":", "")),
                up=bool(msg["flags"] & IFF_UP),
                loopback=bool(msg["flags"] & IFF_LOOPBACK),
                addresses=tuple(addrs.get(msg["index"], ())),
            ))
        return result


def select(names: list[str] | tuple[str, ...]) -> list[Link]:
    """The named links, or every up, non-loopback link when none is named.
    Raises LookupError naming an interface that does not exist here."""
    present = links()
    if not names:
        return [link for link in present if link.up and not link.loopback]
    by_name = {link.name: link for link in present}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise LookupError(f"no interface {unknown[0]!r} in this network namespace")
    return [by_name[n] for n in dict.fromkeys(names)]


def local_addresses() -> dict[IPv4Address, str]:
    """Every local IPv4 address of this namespace, and the link that has it."""
    return {a.ip: link.name for link in links() for a in link.addresses}


def strict_rp_filter(name: str) -> bool:
    """Strict reverse-path filtering (1) on a link: the kernel uses the larger of
    `all` and the link's own setting."""
    conf = Path("/proc/sys/net/ipv4/conf")
    values = [int((conf / n / "rp_filter").read_text()) for n in ("all", name)
              if (conf / n / "rp_filter").exists()]
    return max(values, default=0) == 1


def veth_peer_without_xdp(index: int) -> str | None:
    """For a veth whose peer runs no XDP program, the peer's name: frames sent
    into such a veth with XDP_TX or XDP_REDIRECT are lost (seen on 6.18; the
    peer's XDP program, even one that passes everything, makes them arrive).
    None for other links, a peer with a program, or a peer that cannot be seen."""
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
        return other.get_attr("IFLA_IFNAME")
