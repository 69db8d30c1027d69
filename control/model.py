"""The operator's model: servers, pools and frontends, as plain frozen objects.

Everything here is validation and data: no I/O, no kernel. Errors carry the
key path of what is wrong (`--vip`, `--backend[2]`, later `pools.web.servers`).
"""

from __future__ import annotations

import itertools
import math
import re
import socket
import string
import unicodedata
import urllib.parse
from dataclasses import dataclass, field
from ipaddress import AddressValueError, IPv4Address

from . import maglev
from .units import clipped, quoted

PROTOCOLS = {"tcp": 6, "udp": 17}
ALGORITHMS = ("roundrobin", "weighted", "maglev", "source")
# The algorithms of a Maglev table: maglev hashes a flow's 5-tuple, source its
# client's address alone (every flow of a client goes to one server).
MAGLEV_ALGORITHMS = ("maglev", "source")
MAGLEV_SIZE_MAX = maglev.DEFAULT_SIZE   # the data plane's table (datapath.Limits.maglev_size)
MAGLEV_SLOTS_PER_SERVER = 100           # the paper's advice: M >= 100 N keeps shares within 1%
MAGLEV_SERVERS_MAX = MAGLEV_SIZE_MAX // MAGLEV_SLOTS_PER_SERVER
TIMEOUT_RANGE = (1, 7 * 86400)          # idle timeouts of flows, seconds
# The idle timeouts a protocol's flows take (bpf/xlb.c state_timeout), Frontend's fields.
PROTOCOL_TIMEOUTS = {"tcp": ("timeout_syn", "timeout_established", "timeout_closing"),
                     "udp": ("timeout_udp",)}
MONITOR_TYPES = ("tcp", "http", "https", "udp", "none")
HTTP_TYPES = ("http", "https")          # monitors that GET a path (https: over TLS)
ON_SERVER_DOWN = ("keep", "reset")   # what happens to a gone server's established flows
WEIGHT_RANGE = (1, 256)
# What the data plane's maps hold (datapath.Limits' defaults), checked with the config.
MAX_FRONTENDS = 256
MAX_MAGLEV_FRONTENDS = 16
MAX_BACKENDS = 16384                    # servers of all pools together
RING_SIZE = 1024                        # servers of a round-robin or weighted pool, at most
MAX_ARP = 256                           # ARP answers: VIPs times the links on their subnets
MAX_LINKS = 1024                        # links xlb runs on (tx_links: where the fast path sends)
# What a refusal of the links a config names none of (every up Ethernet one) adds.
UNNAMED_LINKS = ("no interface is named, so xlb runs on every up Ethernet link: name those it "
                 "serves on (--iface, a frontend's interfaces)")
IFNAMSIZ = 16                           # the kernel's limit, with the terminating NUL
CHECK_SECONDS_MAX = 86400               # a monitor's interval and timeout: a day at most
CHECK_SECONDS_MIN = 0.01                # and 10 ms at least: shorter would check in a busy loop
CHECK_COUNT_MAX = 1000                  # a monitor's rise and fall
BODY_LIMIT = 64 * 1024                  # http: the most body a check reads for expect_body
DATAGRAM_MAX = 65507                    # udp: the most an IPv4 datagram carries (65535 - 20 - 8)


class ConfigError(ValueError):
    """Invalid configuration. `problems` lists (key path, reason) pairs."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{path}: {reason}" for path, reason in problems))


@dataclass(frozen=True)
class Monitor:
    """A health check. `port` None checks each server on its own port."""
    name: str
    type: str = "tcp"
    port: int | None = None
    path: str = "/"                 # http and https: the GET path
    # http and https: the status that means healthy; None: any 2xx or 3xx, as
    # HAProxy's `option httpchk` takes it (a health URL may well redirect).
    expect_status: int | None = None
    expect_body: str | None = None  # http and https: a substring the body must contain
    # http and https: the Host header (default: the address), and https's SNI when a name
    host: str | None = None
    # udp: the datagram sent, and the bytes the reply must begin with (None:
    # any reply), as check_hex writes them.
    send_hex: str | None = None
    expect_hex: str | None = None
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3


def default_timeout(interval: float) -> float:
    """A monitor's timeout when none is given: 1 s, or its interval if shorter
    (as HAProxy's check takes its `inter`)."""
    return min(Monitor.timeout, interval)


@dataclass(frozen=True)
class Server:
    name: str
    address: IPv4Address
    port: int
    weight: int = 1
    monitor: str | None = None      # overrides the pool's monitor
    backup: bool = False            # serves only while no primary server is up
    enabled: bool = True


@dataclass(frozen=True)
class Pool:
    name: str
    servers: tuple[Server, ...]
    algorithm: str = "roundrobin"
    monitor: str | None = None      # None: the servers are not checked
    on_server_down: str = "keep"
    maglev_size: int = maglev.DEFAULT_SIZE  # slots of the Maglev table (MAGLEV_ALGORITHMS)


@dataclass(frozen=True)
class Frontend:
    name: str
    vip: IPv4Address
    port: int
    protocol: str
    pool: str
    interfaces: tuple[str, ...] = ()
    # Idle timeouts of its flows, in seconds, by state (IPVS's defaults).
    timeout_syn: int = 60
    timeout_established: int = 900
    timeout_closing: int = 120
    timeout_udp: int = 300
    # A packet from one of its servers that no flow entry knows is taken for
    # its reply when Maglev sends the client there (another node's connection,
    # after a failover); only for servers that clients reach through the VIP alone.
    adopt_replies: bool = False

    @property
    def proto_number(self) -> int:
        return PROTOCOLS[self.protocol]

    @property
    def timeouts(self) -> tuple[int, int, int, int]:
        """(syn, established, closing, udp), as `Datapath.set_timeouts` takes them."""
        return (self.timeout_syn, self.timeout_established, self.timeout_closing,
                self.timeout_udp)

    @property
    def endpoint(self) -> str:
        return f"{self.vip}:{self.port}/{self.protocol}"


@dataclass(frozen=True)
class Config:
    frontends: tuple[Frontend, ...]
    pools: tuple[Pool, ...]
    monitors: tuple[Monitor, ...] = ()
    # What would not act as written, as (key path, what that means): what the
    # file defines and nothing uses (a pool's monitor that each of its servers
    # replaces too), weights a ring cannot honour, a monitor over the protocol
    # its pool's frontends do not serve, a frontend's timeouts of the other
    # protocol: said, not refused. Not part of the config (a server in no pool
    # is not even kept, see config.dump).
    warnings: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    def pool(self, name: str) -> Pool:
        return next(p for p in self.pools if p.name == name)

    def monitor_for(self, pool: Pool, server: Server) -> Monitor | None:
        """The server's own monitor, else its pool's; None when it is not checked
        (no monitor, or one of type `none`)."""
        name = server.monitor or pool.monitor
        m = next((m for m in self.monitors if m.name == name), None)
        return m if m is not None and m.type != "none" else None

    def server_count(self) -> int:
        """Servers as `check`, `apply` and the start say them: each address and
        port once, in however many pools (the data plane's capacity counts a
        server once in each of its pools: config.check_capacity)."""
        return len({(s.address, s.port) for p in self.pools for s in p.servers})

    def attach_names(self) -> tuple[str, ...]:
        """Interfaces named anywhere; empty means every up Ethernet one."""
        return tuple(dict.fromkeys(i for f in self.frontends for i in f.interfaces))


def check_port(port: int) -> int:
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 1-65535")
    return port


def check_seconds(value: float) -> float:
    """A monitor's interval or timeout."""
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"must be a positive number of seconds, got {value}")
    if value < CHECK_SECONDS_MIN:
        raise ValueError(f"must be at least {CHECK_SECONDS_MIN} seconds, got {value}")
    if value > CHECK_SECONDS_MAX:
        raise ValueError(f"must be at most {CHECK_SECONDS_MAX} seconds (a day), got {value}")
    return float(value)


def check_count(n: int) -> int:
    """A monitor's rise or fall: checks in a row."""
    if n < 1:
        raise ValueError(f"must be at least 1, got {n}")
    if n > CHECK_COUNT_MAX:
        raise ValueError(f"must be at most {CHECK_COUNT_MAX}, got {n}")
    return n


def has_space(text: str) -> bool:
    return any(c.isspace() or not c.isprintable() for c in text)


def unprintable(text: str) -> str | None:
    """The first character of text that is neither whitespace nor printable
    (has_space counts both), named for a message: "a control character
    ('\\x01')", a byte that is not UTF-8, or one that does not print (a format
    character such as a bidirectional override, one unassigned); None where
    there is none. Python's whitespace takes in some controls (\\x1c-\\x1f,
    NEL): named controls here."""
    for c in text:
        if unicodedata.category(c) == "Cc" and c not in "\t\n\v\f\r":
            return f"a control character ({quoted(c)})"
        if 0xdc80 <= ord(c) <= 0xdcff:      # a byte that was not UTF-8 (not_utf8)
            return f"a byte that is not UTF-8 ({quoted(c)})"
        if not (c.isspace() or c.isprintable()):
            return f"a character that does not print ({quoted(c)})"
    return None


def not_utf8(text: str) -> bool:
    """Whether text holds bytes that are not UTF-8: a flag's value comes with
    them as lone surrogates, which has_space counts too (not printable)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_interface(name: str) -> str:
    """A network interface's name, as the kernel allows it (dev_valid_name)."""
    if not name:
        raise ValueError("an interface name cannot be empty")
    # The kernel counts bytes: "é" takes two (a name from the command line that
    # is not UTF-8 comes as surrogates, its bytes given back).
    if len(name.encode("utf-8", "surrogateescape")) >= IFNAMSIZ:
        raise ValueError(f"{quoted(name)} is longer than {IFNAMSIZ - 1} bytes")
    # The kernel takes any bytes but '/', ':' and whitespace; pyroute2 gives a
    # name that is not UTF-8 as bytes, which no str names.
    if not_utf8(name):
        raise ValueError(f"{quoted(name)} is not UTF-8: xlb takes interface names in UTF-8 only")
    # The kernel takes these, but such a name reads as another, or as none, where
    # it is shown (`ip link`, a log line): refused as what it is, not as whitespace.
    if odd := unprintable(name):
        raise ValueError(f"{quoted(name)} contains {odd}: xlb takes none in an interface name")
    # '%' is no link's: the kernel takes a name with one for a template (eth%d)
    if name in (".", "..") or any(c in name for c in "/:%") or has_space(name):
        raise ValueError(f"{quoted(name)} is not an interface name (not . or .., no '/', ':', '%' "
                         f"or whitespace)")
    return name


HTTP_PATH_MAX = 4096     # bytes: servers refuse longer request lines (Apache's limit is 8190)
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


def check_http_path(path: str) -> str:
    """The path an HTTP check asks for, sent as it is on the request line: one
    that a server answers with 400 or 414 would keep the server down."""
    if not path.startswith("/"):
        raise ValueError(f"must start with '/', got {quoted(path)}")
    # ASCII first: a byte that is not UTF-8 (a lone surrogate) is no whitespace.
    if not path.isascii():
        raise ValueError(f"{quoted(path)} is not ASCII: percent-encode it")
    if has_space(path):
        raise ValueError(f"{quoted(path)} contains whitespace or control characters")
    if len(path) > HTTP_PATH_MAX:
        raise ValueError(f"{len(path)} bytes: at most {HTTP_PATH_MAX}")
    if "#" in path:
        raise ValueError(f"{quoted(path)} has a fragment ('#'), which a request does not carry")
    if _BAD_PERCENT.search(path):
        raise ValueError(f"{quoted(path)} has a '%' not followed by two hex digits: "
                         "write '%' as %25")
    # What servers decode before they map the path (nginx, Apache: 400); the
    # query is not decoded.
    target = path.split("?", 1)[0]
    if "%00" in target:
        raise ValueError(f"{quoted(path)} has a NUL (%00) before its query, which servers refuse")
    depth = 0
    for segment in urllib.parse.unquote(target).split("/"):
        if segment == "..":
            depth -= 1
            if depth < 0:
                raise ValueError(f"{quoted(path)} climbs above the root ('..'), "
                                 "which servers refuse")
        elif segment not in ("", "."):
            depth += 1
    return path


def check_hex(text: str) -> str:
    """Bytes as hex digits, either case, whitespace anywhere ignored ("1b 00 00"),
    written back as lowercase digits alone."""
    digits = "".join(text.split())
    bad = next((c for c in digits if c not in string.hexdigits), None)
    if bad is not None:
        raise ValueError(f"{bad!r} is not a hex digit (0-9, a-f; whitespace is ignored)")
    if not digits:
        raise ValueError("no bytes: give them as hex digits, such as 1b00")
    if len(digits) % 2:
        raise ValueError(f"{len(digits)} hex digit{'s' * (len(digits) > 1)}, an odd number: "
                         "two make a byte")
    if len(digits) // 2 > DATAGRAM_MAX:
        raise ValueError(f"{len(digits) // 2} bytes: a UDP datagram carries at most "
                         f"{DATAGRAM_MAX}")
    return digits.lower()


def check_maglev_size(size: int) -> int:
    if size > MAGLEV_SIZE_MAX:
        raise ValueError(f"{size} is larger than the data plane's tables ({MAGLEV_SIZE_MAX})")
    if size < 2:
        raise ValueError(f"must be a prime, got {size}")
    if not maglev.is_prime(size):
        below = next(n for n in range(size - 1, 1, -1) if maglev.is_prime(n))
        above = next(n for n in itertools.count(size + 1) if maglev.is_prime(n))
        raise ValueError(f"must be a prime, got {size} ({below} and {above} are)")
    return size


def check_maglev_servers(size: int, servers: int) -> None:
    """At least MAGLEV_SLOTS_PER_SERVER slots per server: with fewer, a server's
    share of new flows strays from its weight by more than 1%."""
    need = MAGLEV_SLOTS_PER_SERVER * servers
    if need > size:
        fit = next(n for n in itertools.count(need) if maglev.is_prime(n))
        raise ValueError(f"{size} slots are too few for {servers} "
                         f"server{'s' if servers > 1 else ''}: "
                         f"{MAGLEV_SLOTS_PER_SERVER} per server needs a prime of at least "
                         f"{need}, such as {fit}")


def has_leading_zero(digits: str) -> bool:
    """Whether a number's digits start with a zero that is not the number: a
    likely typo ("080" for 8080), and octal to some readers (iproute2)."""
    return len(digits) > 1 and digits.startswith("0")


def parse_port(text: str) -> int:
    """A port as a flag gives it: decimal digits, no leading zero (TOML's
    `port = 080` is no number either, and "080" may be a mistyped 8080)."""
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"port {quoted(text)} is not a number")
    if has_leading_zero(text):
        raise ValueError(f"port {quoted(text)} has a leading zero")
    if len(text) > 5:       # before int(), which reads no more than 4300 digits
        raise ValueError(f"port {clipped(text)} is out of range 1-65535")
    return check_port(int(text))


# A dotted quad as IPv4Address takes one: four numbers 0-255 of ASCII digits,
# none with a leading zero. Such a text is read by inet_aton (10,000 servers in
# 11 ms, where IPv4Address took 33); any other is IPv4Address's to take or refuse.
_DOTTED_QUAD = re.compile(r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
                          r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])")


def parse_address(text: str) -> IPv4Address:
    if _DOTTED_QUAD.fullmatch(text):
        return IPv4Address(int.from_bytes(socket.inet_aton(text), "big"))
    try:
        return IPv4Address(text)
    except AddressValueError:
        raise ValueError(f"{quoted(text)} is not an IPv4 address") from None


BROADCAST = IPv4Address("255.255.255.255")     # made once: 10,000 servers parsed it 10,000 times


def no_host_kind(addr: IPv4Address) -> str | None:
    """What kind of address addr is ("a loopback", ...) if it is none a host can
    be reached at: 0.0.0.0, loopback, multicast, broadcast or the reserved
    240.0.0.0/4. None for a host's."""
    return ("an unspecified" if addr.is_unspecified else "a loopback" if addr.is_loopback
            else "a multicast" if addr.is_multicast
            else "a broadcast" if addr == BROADCAST
            else "a reserved" if addr.is_reserved else None)


def parse_host(text: str) -> IPv4Address:
    """An IPv4 address a host can be reached at: a VIP, a server, a peer; not
    one that no packet could be balanced to or from (no_host_kind)."""
    addr = parse_address(text)
    kind = no_host_kind(addr)
    if kind:
        raise ValueError(f"{quoted(text)} is {kind} address, not a host's")
    return addr


def parse_endpoint(text: str) -> tuple[IPv4Address, int]:
    """IP:PORT."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{quoted(text)} is not IP:PORT")
    return parse_host(host), parse_port(port)


def parse_protocol(text: str) -> str:
    """tcp or udp, in either case (keepalived's configs write TCP), as PROTOCOLS
    names it."""
    if text.lower() not in PROTOCOLS:
        raise ValueError(f"protocol {quoted(text)} is not tcp or udp")
    return text.lower()


def parse_vip(text: str) -> tuple[IPv4Address, int, str]:
    """IP:PORT[/tcp|/udp], tcp by default."""
    endpoint, sep, proto = text.partition("/")
    proto = parse_protocol(proto) if sep else "tcp"
    addr, port = parse_endpoint(endpoint)
    return addr, port, proto


def monitor_from_flags(kind: str, port: str | None, interval: float, rise: int,
                     fall: int) -> Monitor | None:
    """The health monitor of the one-line form, or None for --check none (whose
    other flags are checked all the same: a wrong one is a mistake either way).
    port: --check-port as given, read as --vip's port."""
    problems, checks, parsed = [], [], {}
    mtype, path = "tcp", "/"
    scheme, _, rest = kind.partition(":")
    if scheme in HTTP_TYPES and rest.startswith("/"):
        mtype, path = scheme, rest
        checks.append(("--check", check_http_path, path))
    elif kind.startswith("udp:"):
        mtype = "udp"
        checks.append(("--check", check_hex, kind[len("udp:"):]))
    elif kind not in ("tcp", "none"):
        problems.append(("--check", f"{quoted(kind)} is not tcp, http:/PATH, https:/PATH, udp:HEX "
                                    "or none"))
    if port is not None:
        checks.append(("--check-port", parse_port, port))
    checks += [("--interval", check_seconds, interval), ("--rise", check_count, rise),
               ("--fall", check_count, fall)]
    for name, check, value in checks:
        try:
            parsed[name] = check(value)
        except ValueError as e:
            problems.append((name, str(e)))
    if problems:
        raise ConfigError(problems)
    if kind == "none":
        return None
    return Monitor(name="default", type=mtype, port=parsed.get("--check-port"), path=path,
                   send_hex=parsed.get("--check") if mtype == "udp" else None,
                   interval=interval, timeout=default_timeout(interval), rise=rise, fall=fall)


def from_flags(vips: list[str], backends: list[str], interfaces: list[str] = (),
               monitor: Monitor | None = None, algorithm: str = "roundrobin") -> Config:
    """The one-line form: every --vip served by one pool, "default", of all --backend
    servers (named backend1, backend2, ...; the frontends vip1, vip2, ...), each
    frontend on the --iface interfaces."""
    problems: list[tuple[str, str]] = []
    if not vips:
        problems.append(("--vip", "at least one VIP is required"))
    if not backends:
        problems.append(("--backend", "at least one backend is required"))
    if algorithm in MAGLEV_ALGORITHMS and len(backends) > MAGLEV_SERVERS_MAX:
        problems.append(("--backend", f"{len(backends)} backends are too many for {algorithm}: "
                                      f"at most {MAGLEV_SERVERS_MAX}"))

    # Sets, not a scan of the list each time: thousands of flags (refused
    # below) must not take minutes to be refused.
    servers: list[Server] = []
    endpoints: set[tuple[IPv4Address, int]] = set()
    for text in backends:
        try:
            addr, port = parse_endpoint(text)
        except ValueError as e:
            problems.append((f"--backend {clipped(text)}", str(e)))
            continue
        if (addr, port) in endpoints:
            problems.append((f"--backend {clipped(text)}", "given twice"))
            continue
        endpoints.add((addr, port))
        servers.append(Server(name=f"backend{len(servers) + 1}", address=addr, port=port))

    seen_interfaces: set[str] = set()
    for name in interfaces:
        try:
            check_interface(name)
        except ValueError as e:
            problems.append(("--iface", str(e)))
            continue
        if name in seen_interfaces:
            problems.append((f"--iface {name}", "given twice"))
        seen_interfaces.add(name)

    frontends: list[Frontend] = []
    services: set[tuple[IPv4Address, int, str]] = set()
    for text in vips:
        try:
            addr, port, proto = parse_vip(text)
        except ValueError as e:
            problems.append((f"--vip {clipped(text)}", str(e)))
            continue
        if (addr, port, proto) in services:
            problems.append((f"--vip {clipped(text)}", "given twice"))
            continue
        services.add((addr, port, proto))
        frontends.append(Frontend(name=f"vip{len(frontends) + 1}", vip=addr, port=port,
                                  protocol=proto, pool="default",
                                  interfaces=tuple(interfaces)))

    # What the data plane's maps hold, as a config file's check_capacity says it.
    hashed = algorithm in MAGLEV_ALGORITHMS
    most = MAX_MAGLEV_FRONTENDS if hashed else MAX_FRONTENDS
    if len(frontends) > most:
        problems.append(("--vip", f"{len(frontends)} VIPs"
                                  f"{f' with --algorithm {algorithm}' if hashed else ''}:"
                                  f" the data plane holds {most}"))
    if len(seen_interfaces) > MAX_LINKS:
        problems.append(("--iface", f"{len(seen_interfaces)} interfaces: the data plane "
                                    f"holds {MAX_LINKS}"))
    if not hashed and len(servers) > RING_SIZE:
        problems.append(("--backend", f"{len(servers)} backends do not fit a ring of "
                                      f"{RING_SIZE}"))

    vip_set = {f.vip for f in frontends}
    for s in servers:
        if s.address in vip_set:
            problems.append((f"--backend {s.address}:{s.port}", "a backend cannot be a VIP"))

    if problems:
        raise ConfigError(problems)
    return Config(frontends=tuple(frontends),
                  pools=(Pool("default", tuple(servers), algorithm,
                              monitor=monitor and monitor.name),),
                  monitors=(monitor,) if monitor else ())
