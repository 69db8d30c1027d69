"""High availability with existing engines, never a protocol of xlb's own.

- An active/backup pair: keepalived (VRRP) elects the active node and tells
  xlb its role. The active node answers ARP for the VIPs (and sends a
  gratuitous ARP for each when it becomes active); a backup stays silent but
  keeps checking health, and its XDP program still balances whatever reaches
  it. keepalived moves only the backends' gateway address: a VIP is never a
  local address of a balancer.
- N active nodes behind a router's ECMP: each node's BIRD announces the VIPs
  over BGP. xlb keeps a /32 route for each VIP it serves (some server of the
  VIP's pools up, role active) in a dedicated kernel routing table; BIRD's
  kernel protocol learns that table and exports it to BGP, so a VIP is
  withdrawn as soon as xlb stops serving it, stops, or the node fails (BFD).

`keepalived_conf` and `bird_conf` write those engines' configs for a config
file's VIPs; they are pure functions of their arguments.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import textwrap
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from typing import Iterable, Mapping

from .model import (Config, check_interface, has_leading_zero, has_space, not_utf8,
                    parse_address, parse_host, unprintable)
from .units import quoted

ROLES = ("active", "backup")
# keepalived's FIFO lines name a state; MASTER makes xlb active, every other
# state that means "not master" (BACKUP, FAULT, STOP) makes it silent.
KEEPALIVED_STATES = {"MASTER": "active", "BACKUP": "backup", "FAULT": "backup",
                     "STOP": "backup"}
# The vrrp_instance `xlb ha keepalived` writes, which `xlb ha follow` follows by default.
KEEPALIVED_INSTANCE = "xlb"
BFD_INTERVAL_MS = 100      # BFD between router and nodes: 100 ms x 3, a failure seen in 0.3 s
BFD_MULTIPLIER = 3
RTPROT_STATIC = 4          # the announce table's routes are the operator's (static), not BIRD's
RTN_BLACKHOLE = 6
ETH_P_ARP = 0x0806


# --- gratuitous ARP ----------------------------------------------------------------

def garp_frame(mac: bytes, vip: IPv4Address) -> bytes:
    """A broadcast ARP request for vip from vip at mac (RFC 5227's announcement):
    every host on the link that knows vip points it at mac; Linux takes it even
    within its neighbour lock time."""
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, vip.packed,
                      b"\0" * 6, vip.packed)
    return b"\xff" * 6 + mac + struct.pack("!H", ETH_P_ARP) + arp


def send_garp(arp: Mapping[tuple[int, IPv4Address], bytes]) -> tuple[int, list[str]]:
    """Sends a gratuitous ARP for each (ifindex, VIP) -> link MAC, as the planner's
    ARP entries list them. Returns how many were sent, and why the others were
    not ("VIP on LINK: reason"): a link that is down, or gone, takes none, and
    the other links still get theirs. Never raises: an apply calls it once
    the maps are written."""
    sent, unsent = 0, []
    try:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    except OSError as e:    # no CAP_NET_RAW (a unit that drops it), say
        return 0, [f"{vip} on ifindex {ifindex}: {e.strerror}" for ifindex, vip in arp]
    with s:
        for (ifindex, vip), mac in arp.items():
            name = f"ifindex {ifindex}"
            try:
                name = socket.if_indextoname(ifindex)
                s.sendto(garp_frame(mac, vip), (name, ETH_P_ARP))
                sent += 1
            except OSError as e:
                unsent.append(f"{vip} on {name}: {e.strerror}")
    return sent, unsent


# --- the routes BIRD announces -------------------------------------------------------

def served_vips(config: Config, taking: Mapping[str, int]) -> frozenset[IPv4Address]:
    """VIPs with at least one frontend whose pool has a server taking flows
    (`taking`: frontend name -> servers taking new flows)."""
    return frozenset(f.vip for f in config.frontends if taking.get(f.name, 0) > 0)


def check_table(table: int) -> int:
    """A routing table xlb may own: not 0 nor the kernel's default, main, local."""
    if not 0 < table < 2**32 or table in (253, 254, 255):
        raise ValueError(f"table {table}: give a routing table of xlb's own, 1 to 2^32-1 "
                         f"except the kernel's 253-255 (default, main, local)")
    return table


def parse_router_id(text: str) -> IPv4Address:
    """A BGP identifier (RFC 6286): any 32-bit value but 0, which BIRD would
    silently replace with one of its own choosing."""
    rid = parse_address(text)
    if rid == IPv4Address(0):
        raise ValueError("0.0.0.0 is no router id (BGP needs one other than 0); leave "
                         "--router-id out for BIRD to pick one")
    return rid


class Announcer:
    """/32 blackhole routes for the VIPs to announce, in kernel routing table
    `table`, which xlb owns. No lookup uses the table (no rule points at it):
    it only tells BIRD what to announce."""

    def __init__(self, table: int):
        self.table = table
        self.announced: frozenset[IPv4Address] = frozenset()
        self.refused: str | None = None     # what the last sync's OSError said

    def _held(self) -> set[IPv4Address]:
        """The VIPs of the routes xlb writes (/32, blackhole, proto static): a
        route the operator put in the table is not xlb's to remove."""
        from . import netif
        return {r.dst.network_address for r in netif.table_routes(self.table)
                if r.dst.prefixlen == 32 and r.type == RTN_BLACKHOLE
                and r.protocol == RTPROT_STATIC}

    def sync(self, vips: Iterable[IPv4Address]) -> None:
        """Makes xlb's routes in the table exactly vips/32. Each route is tried
        on its own: one the kernel refuses (the operator's route to the same
        VIP, say) keeps no other from being announced or withdrawn;
        `announced` is then what the table holds (what BIRD announces), and
        an OSError names each route refused (`refused` says it until a
        sync succeeds)."""
        try:
            self._sync(vips)
        except OSError as e:
            self.refused = str(e)
            raise
        self.refused = None

    def _sync(self, vips: Iterable[IPv4Address]) -> None:
        from pyroute2 import IPRoute, NetlinkError
        want = set(vips)
        refused = []

        def route(ipr, op: str, vip: IPv4Address) -> bool:
            try:
                ipr.route(op, dst=f"{vip}/32", table=self.table, type="blackhole",
                          proto=RTPROT_STATIC)
                return True
            except NetlinkError as e:
                refused.append(f"{op} {vip}/32: {os.strerror(e.code)}")
                return False

        held = self._held()         # raises with nothing written if the table is not read
        with IPRoute() as ipr:
            for vip in sorted(want - held):
                if route(ipr, "add", vip):
                    held.add(vip)
            for vip in sorted(held - want):
                if route(ipr, "del", vip):
                    held.discard(vip)
        self.announced = frozenset(held)
        if refused:
            raise OSError(f"routing table {self.table}: {'; '.join(refused)}")


# --- keepalived ----------------------------------------------------------------------

@dataclass(frozen=True)
class Gateway:
    """An address keepalived moves with the active node (the backends' default
    gateway), on `interface` (None: the VRRP interface)."""
    address: IPv4Interface
    interface: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Gateway":
        """IP/PREFIX[@DEV]; raises ValueError naming the problem."""
        addr, at, dev = text.partition("@")
        if "/" not in addr:
            raise ValueError(f"{quoted(text)}: give the address with its prefix, IP/PREFIX[@DEV]")
        # IPv4Interface takes /024 for /24; `ip addr add` reads it as octal, /20.
        prefix = addr.partition("/")[2]
        if prefix.isdigit() and has_leading_zero(prefix):
            raise ValueError(f"{quoted(text)}: prefix {quoted(prefix)} has a leading zero")
        try:
            iface = IPv4Interface(addr)
        except ValueError:
            raise ValueError(f"{quoted(text)} is not IP/PREFIX[@DEV]") from None
        parse_host(str(iface.ip))
        net = iface.network
        if net.prefixlen == 0 or (net.prefixlen < 31 and iface.ip in (net.network_address,
                                                                      net.broadcast_address)):
            raise ValueError(f"{quoted(text)}: not a host's address on {net}, which the backends "
                             f"could route through")
        return cls(iface, check_keepalived_word(dev) if at else None)


def link_problems(links: Iterable, interface: str, peer: IPv4Address,
                  gateways: Iterable[Gateway]) -> list[str]:
    """What would not work if the keepalived config were for this host, whose
    links (netif.links()) are given: a link it names that is not here
    (keepalived refuses the config: "Non-existent interface"), a peer or a
    gateway on a subnet that another link of this host holds, and not the
    one it is given (keepalived sends and hears VRRP on --interface only:
    neither node hears the other and both become MASTER; a gateway on the
    wrong link is out of the backends' reach), and a gateway that is an
    address of this host already, not as keepalived's on the active node
    (held here while the other node is active too, both answer ARP for it)."""
    # Imported here, not at the top: netif imports pyroute2, which took a quarter
    # of a second of every command (all import ha, through state).
    from .netif import local_addresses
    by_name = {link.name: link for link in links}
    here = local_addresses(by_name.values())

    def holder(addr: IPv4Address) -> str | None:
        return next((name for name, link in by_name.items() if link.holds(addr)), None)

    said = []
    if interface not in by_name:
        said.append(f"--interface {interface}: no such link here; keepalived here would refuse "
                    f"the config (Non-existent interface)")
    elif not by_name[interface].holds(peer) and (other := holder(peer)):
        said.append(f"--peer {peer}: on a subnet of {other} here, not of --interface "
                    f"{interface}, on which keepalived sends and hears VRRP: neither node would "
                    f"hear the other and both would become MASTER; give --interface {other}")
    for g in gateways:
        dev = g.interface or interface
        if owner := here.get(g.address.ip):
            # keepalived's own, on the active node, looks the same.
            said.append(f"--gateway {g.address}: an address of this host already (on "
                        f"{owner}); unless keepalived added it (this node active), remove "
                        f"it: held here while the other node is active, both would answer "
                        f"ARP for the backends' gateway")
        if dev not in by_name:
            if g.interface:
                said.append(f"--gateway {g.address}@{dev}: no link {dev} here; keepalived here "
                            f"would refuse the config (Non-existent interface)")
        elif not by_name[dev].holds(g.address.ip) and (other := holder(g.address.ip)):
            said.append(f"--gateway {g.address}: would be on {dev}, but {g.address.network} is "
                        f"on {other} here: the backends would not reach it; give "
                        f"{g.address}@{other}")
    return said


# What keepalived's config parser reads as more than a character: comments,
# blocks, quotes and escapes (keepalived -t refuses or splits a word with them).
KEEPALIVED_SPECIAL = "#!{}\"'\\"
# keepalived reads its config a line at a time into a buffer of this many bytes
# (MAXBUF): the rest of a longer line is read as a line of its own.
KEEPALIVED_LINE = 1024
# Two paths share a line of the config xlb writes (the FAULT notify: the track
# file's and the xlb's), with some 100 bytes of other words.
KEEPALIVED_PATH_MAX = 400


def check_keepalived_word(name: str) -> str:
    """An interface name as keepalived reads it: one the kernel allows, with no
    character that keepalived's config parser reads specially."""
    check_interface(name)
    if any(c in name for c in KEEPALIVED_SPECIAL):
        raise ValueError(f"{quoted(name)}: keepalived reads # ! {{ }} quotes and backslashes "
                         f"specially")
    return name


def check_instance(name: str) -> str:
    """A vrrp_instance's name, as keepalived's config holds it (`xlb ha follow
    --instance`): one word of a line."""
    if not name:
        raise ValueError("a vrrp_instance name cannot be empty")
    if odd := unprintable(name):
        raise ValueError(f"{quoted(name)} contains {odd}: no vrrp_instance name does")
    if has_space(name):
        raise ValueError(f"{quoted(name)} is not a vrrp_instance name")
    if len(name.encode("utf-8", "surrogateescape")) >= KEEPALIVED_LINE:
        raise ValueError(f"{quoted(name)} is longer than a line of keepalived's config "
                         f"({KEEPALIVED_LINE} bytes): no vrrp_instance has that name")
    return name


def check_keepalived_path(path: str) -> str:
    """A path written into keepalived's config, which keepalived reads as one
    word, from a working directory of its own."""
    if not path:
        raise ValueError("a path cannot be empty")
    if not path.startswith("/"):
        raise ValueError(f"{quoted(path)} is not absolute (keepalived runs from a directory of "
                         f"its own)")
    if len(path.encode("utf-8", "surrogateescape")) > KEEPALIVED_PATH_MAX:
        raise ValueError(f"{quoted(path)} is longer than {KEEPALIVED_PATH_MAX} bytes: keepalived "
                         f"reads a line of its config into {KEEPALIVED_LINE}")
    if not_utf8(path):      # else said to hold whitespace (has_space)
        raise ValueError(f"{quoted(path)} is not UTF-8, as the keepalived config xlb writes is")
    if odd := unprintable(path):
        raise ValueError(f"{quoted(path)} contains {odd}, which the keepalived config xlb "
                         f"writes cannot hold")
    if has_space(path) or any(c in path for c in KEEPALIVED_SPECIAL):
        raise ValueError(f"{quoted(path)} contains whitespace, # ! {{ }}, a quote or a backslash, "
                         f"which keepalived would misread")
    return path


def check_keepalived_file(path: str) -> str:
    """A file keepalived makes (its notify FIFO, the track file): a path as
    check_keepalived_path takes it, that names no directory (keepalived
    would make neither, and `xlb ha follow` would never run or never be
    heard: the node in FAULT for ever)."""
    check_keepalived_path(path)
    if path.endswith("/") or os.path.isdir(path):
        raise ValueError(f"{quoted(path)} is a directory, not a file keepalived can make")
    return path


def check_keepalived_program(path: str) -> str:
    """The xlb that keepalived runs (--xlb): a path as check_keepalived_path
    takes it that, if it is here, is an executable file: keepalived disables
    a notify script it cannot execute, and `xlb ha follow` would never run
    (the node in FAULT for ever)."""
    check_keepalived_path(path)
    if os.path.exists(path) and not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise ValueError(f"{quoted(path)} is no executable file: keepalived would not run it")
    return path


# A comment's tail past KEEPALIVED_LINE would be read as keywords (`keepalived
# -t` fails). A comment naming 256 VIPs is 3.5 kB.
COMMENT_WIDTH = 100


def _comment(text: str) -> list[str]:
    """text as comment lines of at most COMMENT_WIDTH characters, broken
    between words only (a VIP is never cut)."""
    return textwrap.wrap(text, COMMENT_WIDTH, initial_indent="# ", subsequent_indent="#   ",
                         break_long_words=False, break_on_hyphens=False)


def script_unsafe(path: str) -> str | None:
    """Why keepalived, with enable_script_security, would refuse to run the
    script at path ("Unsafe permissions found for script ... - disabling"),
    or None. As keepalived checks it: `/` and each step of the path as
    given (stat follows symbolic links), the file last, must be root's and
    writable by no other user (a group's write but root's group's, an
    other's write but on a sticky directory). A path not here (a config
    written for another machine) is not judged."""
    steps = [part for part in path.split("/") if part]
    for i in range(len(steps) + 1):
        step = "/" + "/".join(steps[:i])
        try:
            st = os.stat(step)
        except OSError:
            return None
        sticky_dir = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
        writable = (st.st_gid and st.st_mode & stat.S_IWGRP) or st.st_mode & stat.S_IWOTH
        if st.st_uid or (writable and not sticky_dir):
            return (f"{step} is owned by uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}: "
                    f"keepalived runs a script (enable_script_security) only if root owns "
                    f"it and every directory above it, and no other user may write them")
    return None


def keepalived_role(line: str, instance: str) -> str | None:
    """The xlb role a keepalived FIFO line asks for, or None when the line is
    about something else: `INSTANCE "xlb" MASTER 250`."""
    if keepalived_instance(line) == instance:
        return KEEPALIVED_STATES.get(line.split()[2])
    return None


def keepalived_instance(line: str) -> str | None:
    """The vrrp_instance a keepalived FIFO line tells the state of, or None."""
    parts = line.split()
    if len(parts) >= 3 and parts[0] == "INSTANCE" and len(parts[1]) >= 2 \
            and parts[1][0] == parts[1][-1] == '"':
        return parts[1][1:-1]
    return None


# The check that a follow runs is a lock it holds, tried by flock(1) every second.
# Not keepalived's vrrp_track_process: the kernel's process connector it listens
# to answers only in the first network namespace (ECONNREFUSED in any other, where
# keepalived may run, as in the lab), and keepalived 2.2's code counts a process
# twice when it is exec'd while keepalived reads /proc (at a start or a reload):
# killed, it would leave a count of one behind.
FLOCK = "/usr/bin/flock"     # util-linux's
FALSE = "/bin/false"


def _unless_followed(track_file: str) -> str:
    """The start of a keepalived command that runs what follows it only while no
    `xlb ha follow` holds its lock on track_file, and succeeds otherwise. It
    holds a shared lock for the command (--no-fork): a follow starting
    meanwhile waits for it, while the check, shared too, still finds no follow
    there (the FAULT notify's `xlb ha role backup` taking a second would
    otherwise pass for one, and the node would leave FAULT)."""
    return f"{FLOCK} --shared --nonblock --conflict-exit-code 0 --no-fork {track_file}"


def keepalived_conf(config: Config, *, xlb: str, peer: IPv4Address, interface: str,
                    priority: int, advert_int: float, vrid: int, fifo: str, track_file: str,
                    gateways: Iterable[Gateway]) -> str:
    """A keepalived config for one node of a pair: VRRPv3 (fractional
    advert_int), unicast to the peer, both nodes starting as BACKUP without
    preemption (a node that comes back does not take over again); the
    gateways move with the active node; the VIPs are NOT virtual addresses
    (xlb answers their ARP). State changes reach xlb through keepalived's
    notify FIFO, read by `xlb ha follow` for keepalived's whole lifetime: a
    notify script would start a new process per change, which costs
    0.1-0.15 s of a 0.4 s failover (README). The same `follow` keeps track_file at
    0 while an xlb data path runs on the node and 1 while none does (xlb
    stopped, not started yet, or failed to start) or no link a VIP's ARP
    arrives on is up: keepalived holds the node in FAULT then, so that the
    peer takes over the VIPs rather than leave them to a node that cannot
    answer for them. A check script would
    start a process per check; keepalived reads the file when it changes.
    Killed alone (kill -9, the OOM killer), follow can write nothing more: it
    holds a lock on track_file for its whole life (`xlb ha follow`), and a
    check every second that finds the lock free (flock(1), no more than a
    process of util-linux's) holds the node in FAULT; in FAULT with no follow
    there, keepalived itself tells xlb backup, which no follow would."""
    vips = sorted({str(f.vip) for f in config.frontends}, key=IPv4Address)
    lines = [
        *_comment(f"keepalived for xlb: VRRP elects the node that answers ARP for "
                  f"{', '.join(vips) or 'no VIP'}."),
        "# Written by `xlb ha keepalived`. The VIPs are deliberately not virtual_ipaddress:",
        "# xlb answers their ARP itself on the active node (`xlb ha role`).",
        "global_defs {",
        "    vrrp_version 3",
        "    script_user root",
        "    enable_script_security",
        f"    vrrp_notify_fifo {fifo}",
        f'    vrrp_notify_fifo_script "{xlb} ha follow --instance {KEEPALIVED_INSTANCE} '
        f'--track-file {track_file}"',
        "}",
        "",
        "# 0 while xlb serves on this node, 1 (FAULT) while it does not: `xlb ha follow`",
        "# writes it; 1 from keepalived's start until follow has seen xlb serve.",
        "track_file xlb_serves {",
        f'    file "{track_file}"',
        "    weight 0",
        "    init_file 1 overwrite",
        "}",
        "",
        "# `xlb ha follow` holds a lock on the track file while it runs: killed alone (kill -9,",
        "# the OOM killer), it leaves the lock free and writes nothing more. Three checks in",
        "# a row that find it free (2 to 3 s) hold the node in FAULT; a reload's new follow",
        "# takes the lock once the old one has ended, well within that. The check and the",
        "# FAULT notify share the lock: the notify running is no follow.",
        "vrrp_script xlb_follows {",
        f'    script "{_unless_followed(track_file)} {FALSE}"',
        "    interval 1",
        "    fall 3",
        "    rise 1",
        "}",
        "",
        f"vrrp_instance {KEEPALIVED_INSTANCE} {{",
        "    state BACKUP",
        "    nopreempt",
        f"    interface {interface}",
        f"    virtual_router_id {vrid}",
        f"    priority {priority}",
        f"    advert_int {advert_int:g}",
        "    unicast_peer {",
        f"        {peer}",
        "    }",
    ]
    lines.append("    virtual_ipaddress {")
    lines += [f"        {g.address} dev {g.interface or interface}" for g in gateways]
    lines += ["    }", "    track_file {", "        xlb_serves", "    }",
              "    track_script {", "        xlb_follows", "    }",
              "    # No follow here to tell xlb this FAULT: keepalived does.",
              f'    notify_fault "{_unless_followed(track_file)} {xlb} ha role backup"',
              "}"]
    return "\n".join(lines) + "\n"


# --- BIRD ----------------------------------------------------------------------------

def bird_conf(config: Config, *, router: IPv4Address, local_as: int, peer_as: int,
              table: int, router_id: IPv4Address | None = None) -> str:
    """A BIRD 2 config for one scale-out node: learn the /32 routes that `xlb up
    --announce-table TABLE` keeps in kernel table TABLE and announce them over
    eBGP to the router, with BFD so that a silent failure is seen in 0.3 s."""
    vips = sorted({str(f.vip) for f in config.frontends}, key=IPv4Address)
    ms = BFD_INTERVAL_MS
    lines = [
        f"# BIRD for xlb: announces {', '.join(vips) or 'no VIP'} as /32 to the router "
        f"{router} while xlb serves them.",
        f"# Written by `xlb ha bird`. Run xlb with `xlb up --announce-table {table}`.",
    ]
    if router_id is not None:
        lines.append(f"router id {router_id};")
    lines += [
        "",
        "protocol device {",
        "}",
        "",
        "# The VIPs xlb serves: its own table, learned (xlb's routes are not BIRD's), never written.",
        "protocol kernel xlb_vips {",
        "    ipv4 {",
        "        import all;",
        "        export none;",
        "    };",
        f"    kernel table {table};",
        "    learn;",
        "}",
        "",
        "protocol bfd {",
        '    interface "*" {',
        f"        min rx interval {ms} ms;",
        f"        min tx interval {ms} ms;",
        f"        multiplier {BFD_MULTIPLIER};",
        "    };",
        "}",
        "",
        "protocol bgp uplink {",
        f"    local as {local_as};",
        f"    neighbor {router} as {peer_as};",
        "    bfd on;",
        "    ipv4 {",
        "        import none;",
        '        export where proto = "xlb_vips" && net.len = 32;',
        "        next hop self;",
        "    };",
        "}",
    ]
    return "\n".join(lines) + "\n"
