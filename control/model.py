"""The operator's model: servers, pools and frontends, as plain frozen objects.

Everything here is validation and data: no I/O, no kernel. Errors carry the
key path of what is wrong (`--vip`, `--backend[2]`, later `pools.web.servers`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import AddressValueError, IPv4Address

PROTOCOLS = {"tcp": 6, "udp": 17}
ALGORITHMS = ("roundrobin", "weighted")


class ConfigError(ValueError):
    """Invalid configuration. `problems` lists (key path, reason) pairs."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{path}: {reason}" for path, reason in problems))


@dataclass(frozen=True)
class Server:
    name: str
    address: IPv4Address
    port: int
    weight: int = 1


@dataclass(frozen=True)
class Pool:
    name: str
    servers: tuple[Server, ...]
    algorithm: str = "roundrobin"


@dataclass(frozen=True)
class Frontend:
    name: str
    vip: IPv4Address
    port: int
    protocol: str
    pool: str

    @property
    def proto_number(self) -> int:
        return PROTOCOLS[self.protocol]

    @property
    def endpoint(self) -> str:
        return f"{self.vip}:{self.port}/{self.protocol}"


@dataclass(frozen=True)
class Config:
    pools: tuple[Pool, ...]
    frontends: tuple[Frontend, ...]
    interfaces: tuple[str, ...] = field(default=())

    def pool(self, name: str) -> Pool:
        return next(p for p in self.pools if p.name == name)


def parse_port(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"port {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 1-65535")
    return port


def parse_address(text: str) -> IPv4Address:
    try:
        return IPv4Address(text)
    except AddressValueError:
        raise ValueError(f"{text!r} is not an IPv4 address") from None


def parse_endpoint(text: str) -> tuple[IPv4Address, int]:
    """IP:PORT."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not IP:PORT")
    return parse_address(host), parse_port(port)


def parse_vip(text: str) -> tuple[IPv4Address, int, str]:
    """IP:PORT[/tcp|/udp], tcp by default."""
    endpoint, sep, proto = text.partition("/")
    proto = proto.lower() if sep else "tcp"
    if proto not in PROTOCOLS:
        raise ValueError(f"protocol {proto!r} is not tcp or udp")
    addr, port = parse_endpoint(endpoint)
    return addr, port, proto


def from_flags(vips: list[str], backends: list[str], interfaces: list[str] = ()) -> Config:
    """The one-line form: every --vip served by one pool of all --backend servers."""
    problems: list[tuple[str, str]] = []
    if not vips:
        problems.append(("--vip", "at least one VIP is required"))
    if not backends:
        problems.append(("--backend", "at least one backend is required"))

    servers: list[Server] = []
    for i, text in enumerate(backends):
        try:
            addr, port = parse_endpoint(text)
        except ValueError as e:
            problems.append((f"--backend {text}", str(e)))
            continue
        name = f"{addr}:{port}"
        if any(s.name == name for s in servers):
            problems.append((f"--backend {text}", "given twice"))
            continue
        servers.append(Server(name=name, address=addr, port=port))

    frontends: list[Frontend] = []
    for text in vips:
        try:
            addr, port, proto = parse_vip(text)
        except ValueError as e:
            problems.append((f"--vip {text}", str(e)))
            continue
        fe = Frontend(name=f"{addr}:{port}/{proto}", vip=addr, port=port, protocol=proto,
                      pool="default")
        if any(f.name == fe.name for f in frontends):
            problems.append((f"--vip {text}", "given twice"))
            continue
        frontends.append(fe)

    vip_set = {f.vip for f in frontends}
    for s in servers:
        if s.address in vip_set:
            problems.append((f"--backend {s.name}", "a backend cannot be a VIP"))

    if problems:
        raise ConfigError(problems)
    return Config(pools=(Pool("default", tuple(servers)),), frontends=tuple(frontends),
                  interfaces=tuple(dict.fromkeys(interfaces)))
