"""The operator's config file: TOML in, a validated `Config` out, and back.

    [monitors.NAME]   health checks          (optional)
    [servers.NAME]    real servers
    [pools.NAME]      backend pools of servers
    [frontends.NAME]  virtual services (VIP:port/protocol) served by a pool

`load` checks everything and raises one `ConfigError` listing every problem it
found, each as (key path, reason): `servers.was1.port`, `pools.web.servers[1]`.
`dump` writes the effective config back, every default spelled out, so that
`load(dump(c)) == c`. No I/O except `read` (and `load_file`), no kernel.
"""

from __future__ import annotations

import datetime
import functools
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import tomli

from . import scheduler
from .model import (ALGORITHMS, BODY_LIMIT, HTTP_TYPES, MAGLEV_ALGORITHMS, MAGLEV_SERVERS_MAX,
                    MAGLEV_SIZE_MAX, MAGLEV_SLOTS_PER_SERVER, MAX_BACKENDS, MAX_FRONTENDS,
                    MAX_LINKS, MAX_MAGLEV_FRONTENDS, MONITOR_TYPES, ON_SERVER_DOWN,
                    PROTOCOL_TIMEOUTS, RING_SIZE, TIMEOUT_RANGE, WEIGHT_RANGE, Config,
                    ConfigError, Frontend, Monitor, Pool, Server, check_count, check_hex,
                    check_http_path, check_interface, check_maglev_servers, check_maglev_size,
                    check_port, check_seconds, default_timeout, has_space, parse_host,
                    parse_protocol)
from .units import clipped, quoted

SECTIONS = ("monitors", "servers", "pools", "frontends")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
BAD_NAME = "bad name: use letters, digits, '_', '.' and '-', starting with a letter or digit"
HTTP_ONLY = ("path", "expect_status", "expect_body", "host")     # of HTTP_TYPES
UDP_ONLY = ("send_hex", "expect_hex")
CHECKING = ("port", "interval", "timeout", "rise", "fall")     # of a monitor that checks
_OTHER = {"tcp": "udp", "udp": "tcp"}     # a check's protocol, and the one it is not
TIMEOUTS = tuple(key for keys in PROTOCOL_TIMEOUTS.values() for key in keys)
MAX_FILE = 8 << 20                  # 512 bytes for each of 16,384 servers; the control socket's
                                    # limit (ctl.MAX_REQUEST) holds it JSON-escaped, for `apply`


# --- load -------------------------------------------------------------------

_TOML_KEY = re.compile(r"\('[^'\\]*'(?:, '[^'\\]*')*,?\)")


def load(text: str, *, dumped: bool = False) -> Config:
    """The Config the TOML `text` describes; ConfigError lists every problem.

    dumped: `text` is `dump`'s, kept in xlb's state, maybe by an earlier
    build, which wrote a `none` monitor's CHECKING settings and the weight of
    a server only in roundrobin pools (refused now), and every frontend's four
    timeouts (the other protocol's warned of now): they acted on nothing and
    are dropped, so that an upgrade takes over its config, and silently."""
    try:
        # tomli, not the standard library's tomllib (the same parser): its wheels are
        # compiled, and read 10,000 servers in less than half the time.
        doc = tomli.loads(text)
    except tomli.TOMLDecodeError as e:
        # tomli names a table as a Python tuple: "Cannot declare ('frontends', 'f') twice"
        keys = lambda m: ".".join(clipped(k, _toml_key)  # noqa: E731
                                  for k in re.findall(r"'([^'\\]*)'", m[0]))
        message = _TOML_KEY.sub(keys, str(e))
        raise ConfigError([("toml", message)]) from None
    except RecursionError:
        raise ConfigError([("toml", "arrays or tables nested too deeply")]) from None
    except ValueError:      # not TOMLDecodeError: the int() that tomli calls refuses it
        most = sys.get_int_max_str_digits()
        where = re.search(r"[=\[,{]\s*[+-]?(?:\d_?){%d}" % (most + 1), text)
        line = f" (at line {text.count(chr(10), 0, where.end()) + 1})" if where else ""
        raise ConfigError([("toml", f"an integer of more than {most} digits{line}")]) from None
    monitors = doc.get("monitors") if dumped else None
    for monitor in monitors.values() if isinstance(monitors, dict) else ():
        if isinstance(monitor, dict) and monitor.get("type") == "none":
            for key in CHECKING:
                monitor.pop(key, None)
    frontends = doc.get("frontends") if dumped else None
    for frontend in frontends.values() if isinstance(frontends, dict) else ():
        if isinstance(frontend, dict):
            for key in _other_timeouts(frontend.get("protocol", "tcp")):
                frontend.pop(key, None)
    if dumped:
        _drop_ignored_weights(doc)
    return _Loader(doc).config()


def _drop_ignored_weights(doc: dict) -> None:
    """Drops the weight of each server of a dump that is in roundrobin pools
    alone (_Loader.check_weights refuses one other than 1)."""
    pools, servers = doc.get("pools"), doc.get("servers")
    if not isinstance(pools, dict) or not isinstance(servers, dict):
        return
    roundrobin, honouring = set(), set()
    for pool in pools.values():
        if isinstance(pool, dict) and isinstance(pool.get("servers"), list):
            names = {name for name in pool["servers"] if isinstance(name, str)}
            if pool.get("algorithm", "roundrobin") == "roundrobin":
                roundrobin |= names
            else:
                honouring |= names
    for name in roundrobin - honouring:
        if isinstance(servers.get(name), dict):
            servers[name].pop("weight", None)


def _other_timeouts(protocol: Any) -> dict[str, str]:
    """The timeouts that act on no flow of a frontend of this protocol, each
    with the protocol it is for (none when the protocol is wrong, which is
    reported as such)."""
    try:
        protocol = parse_protocol(protocol)
    except (AttributeError, ValueError):
        return {}
    return {key: other for other, keys in PROTOCOL_TIMEOUTS.items() if other != protocol
            for key in keys}


def read(path: str | Path) -> str:
    """The text of a config file: a regular file (a FIFO or a device is not
    opened: that can act, as a tape rewinds or a watchdog starts) of at most
    MAX_FILE bytes of UTF-8. A file that cannot be read is one problem named
    by its path."""
    try:
        _regular(path, os.stat(path).st_mode)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise ConfigError([(clipped(path), e.strerror or str(e))]) from None
    try:
        _regular(path, os.fstat(fd).st_mode)     # replaced since
        with open(fd, "rb", closefd=False) as f:
            data = f.read(MAX_FILE + 1)
    except OSError as e:            # a disk's or a network file system's error
        raise ConfigError([(clipped(path), e.strerror or str(e))]) from None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE:
        raise ConfigError([(clipped(path), f"larger than {MAX_FILE} bytes")])
    try:
        # Without the byte-order mark some editors write, which TOML does not take.
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise ConfigError([(clipped(path), f"not UTF-8 text ({e.reason} at byte {e.start})")]) \
            from None


def _regular(path: str | Path, mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise ConfigError([(clipped(path), "Is a directory" if stat.S_ISDIR(mode)
                            else "not a regular file")])


def load_file(path: str | Path) -> Config:
    """`load` of a file (`read`)."""
    return load(read(path))


class _Invalid(Exception):
    """A value is wrong: (path suffix, reason) pairs, suffix "" for the value itself."""

    def __init__(self, *problems: tuple[str, str]):
        self.problems = problems


def _bad(reason: str) -> _Invalid:
    return _Invalid(("", reason))


_KINDS = [(bool, "boolean"), (int, "integer"), (float, "float"), (str, "string"),
          (list, "array"), (dict, "table"), (datetime.datetime, "datetime"),
          (datetime.date, "date"), (datetime.time, "time")]


def _kind(value: Any) -> str:
    """The TOML type of a value tomli produced."""
    return next((name for t, name in _KINDS if isinstance(value, t)), type(value).__name__)


def _expected(what: str, value: Any) -> _Invalid:
    return _bad(f"expected {what}, got {_kind(value)}")


def _choices(allowed) -> str:
    allowed = list(allowed)
    return allowed[0] if len(allowed) == 1 else f"{', '.join(allowed[:-1])} or {allowed[-1]}"


# Checks take the raw TOML value and return the model's value or raise _Invalid.

def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _expected("a string", value)
    return value


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _expected("an integer", value)
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _expected("a boolean", value)
    return value


def _number(value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _expected("a number", value)
    return value


def _model(check: Callable[[Any], Any], kind: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """model's `check` (which raises ValueError) of a value of TOML type `kind`."""
    def value_check(value: Any) -> Any:
        try:
            return check(kind(value))
        except ValueError as e:
            raise _bad(str(e)) from None
    return value_check


_seconds = _model(check_seconds, _number)
_port = _model(check_port, _integer)
_maglev_size = _model(check_maglev_size, _integer)
_count = _model(check_count, _integer)
_address = _model(parse_host, _string)
_http_path = _model(check_http_path, _string)
_hex = _model(check_hex, _string)
_interface = _model(check_interface, _string)
_protocol = _model(parse_protocol, _string)


def _in_range(what: str, bounds: tuple[int, int], unit: str = "") -> Callable[[Any], int]:
    def check(value: Any) -> int:
        n, (low, high) = _integer(value), bounds
        if not low <= n <= high:
            raise _bad(f"{what} {n} is out of range {low}-{high}{unit}")
        return n
    return check


_weight = _in_range("weight", WEIGHT_RANGE)
_timeout = _in_range("timeout", TIMEOUT_RANGE, " seconds")


def _status(value: Any) -> int:
    status = _integer(value)
    if not 100 <= status <= 599:
        raise _bad(f"status {status} is out of range 100-599")
    return status


def _one_of(allowed) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if _string(value) not in allowed:
            raise _bad(f"expected {_choices(allowed)}, got {quoted(value)}")
        return value
    return check


def _nonempty(value: Any) -> str:
    text = _string(value)
    if not text:
        raise _bad("must not be empty (leave the key out instead)")
    return text


def _body(value: Any) -> str:
    body = _nonempty(value)
    if len(body.encode()) > BODY_LIMIT:
        raise _bad(f"{len(body.encode())} bytes: a check reads {BODY_LIMIT} bytes of the body, "
                   f"so it would never find it")
    return body


# RFC 3986's host (a name, IPv4, or [IPv6]) and an optional port, as a Host header has them
_HOST = re.compile(r"(?:([A-Za-z0-9._~!$&'()*+,;=%-]{1,253})|\[[0-9A-Fa-f:.]{2,45}\])"
                   r"(?::([0-9]{1,5}))?")


def _host(value: Any) -> str:
    host = _nonempty(value)
    if has_space(host):
        raise _bad(f"{quoted(host)} contains whitespace or control characters")
    if not host.isascii():
        raise _bad(f"{quoted(host)} is not ASCII: give an internationalized name in its xn-- form")
    match = _HOST.fullmatch(host)
    if not match or not 1 <= int(match[2] or 80) <= 65535:
        raise _bad(f"{quoted(host)} is not a host name, IPv4 address or [IPv6] address, "
                   "with an optional :port (1-65535)")
    name = match[1] or ""
    if ".." in name or name == ".":
        # nginx and Apache answer such a Host with 400: every server would stay down.
        raise _bad(f"{quoted(host)} is not a host name: it has an empty label (two dots in a row, "
                   f"or a lone dot), which servers refuse")
    return host


def _only(what: str) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        raise _bad(f"only for {what}")
    return check


def _items(check: Callable[[Any], Any], value: Any) -> list:
    """An array whose items pass `check` and are not repeated; every bad item is reported."""
    if not isinstance(value, list):
        raise _expected("an array", value)
    items, problems = [], []
    seen = set()        # not `in items`: a list of 30,000 names took seconds to refuse
    for i, item in enumerate(value):
        try:
            item = check(item)
        except _Invalid as e:
            problems += [(f"[{i}]{suffix}", reason) for suffix, reason in e.problems]
            continue
        if item in seen:
            problems.append((f"[{i}]", f"{quoted(item)} is listed twice"))
        seen.add(item)
        items.append(item)
    if problems:
        raise _Invalid(*problems)
    return items


class _Loader:
    def __init__(self, doc: dict[str, Any]):
        self.doc = doc
        self.problems: list[tuple[str, str]] = []
        # The names each section defines (valid or not, so that one bad object
        # is not also reported as missing wherever it is used); None when the
        # section itself is not a table and nothing can be said about names.
        self.names: dict[str, set[str] | None] = {}
        # What is known of the objects, valid or not, for the checks across them.
        self.addresses: dict[str, IPv4Address] = {}                 # server -> address
        self.services: list[tuple[str, IPv4Address, int, str]] = []  # frontend, vip, port, proto
        self.notes: list[tuple[str, str]] = []      # warnings found while reading the objects
        self.untyped: set[str] = set()              # monitors of no `type` (tcp by default)

    def problem(self, path: str, reason: str) -> None:
        self.problems.append((path, reason))

    def config(self) -> Config:
        for key in self.doc:
            if key not in SECTIONS:
                self.problem(clipped(key), "unknown section")
        # Each section refers only to those before it: its names are known.
        monitors = [self.monitor(*t) for t in self.section("monitors")]
        servers = {t[1]: self.server(*t) for t in self.section("servers")}
        pools = [self.pool(*t, servers) for t in self.section("pools")]
        frontends = [self.frontend(*t) for t in self.section("frontends")]
        if not self.doc.get("frontends") and self.names["frontends"] is not None:
            self.problem("frontends", "at least one frontend is required")
        self.check_services()
        self.check_capacity([f for f in frontends if f], {p.name: p for p in pools if p})
        self.check_weights([p for p in pools if p])
        self.check_adopt([f for f in frontends if f], {p.name: p for p in pools if p})

        if self.problems:
            raise ConfigError(self.problems)
        return Config(frontends=tuple(frontends), pools=tuple(pools), monitors=tuple(monitors),
                      warnings=(*self.notes, *self.unused(frontends, pools, servers, monitors),
                                *self.overridden(pools), *self.strayed(pools),
                                *self.crossed(frontends, pools, monitors)))

    @staticmethod
    def unused(frontends: list[Frontend], pools: list[Pool], servers: dict[str, Server],
               monitors: list[Monitor]) -> tuple[tuple[str, str], ...]:
        """Servers in no pool, pools of no frontend or of disabled servers only,
        monitors of no pool or server (all valid here)."""
        pooled = {s.name for p in pools for s in p.servers}
        served = {f.pool for f in frontends}
        watching = {p.monitor for p in pools} | {s.monitor for s in servers.values()}
        return (*((key_path("servers", name), "in no pool: it serves nothing, and `xlb show` "
                                               "leaves it out")
                  for name in servers if name not in pooled),
                *((key_path("pools", p.name), "no frontend uses it: it serves nothing")
                  for p in pools if p.name not in served),
                # maint whatever `xlb server enable` says: its frontends drop every new flow
                *((key_path("pools", p.name), "every server of it is enabled = false: it serves "
                                              "nothing")
                  for p in pools if p.name in served and not any(s.enabled for s in p.servers)),
                *((key_path("monitors", m.name), "no pool or server uses it")
                  for m in monitors if m.name not in watching))

    @staticmethod
    def overridden(pools: list[Pool]) -> tuple[tuple[str, str], ...]:
        """Pools' monitors that every server of theirs replaces with another:
        they check nothing, where the operator may believe both check."""
        return tuple((f"{key_path('pools', p.name)}.monitor",
                      f"every server of it names its own monitor: "
                      f"{key_path('monitors', p.monitor)} checks none of them")
                     for p in pools
                     if p.monitor and all(s.monitor not in (None, p.monitor) for s in p.servers))

    def crossed(self, frontends: list[Frontend], pools: list[Pool],
                monitors: list[Monitor]) -> tuple[tuple[str, str], ...]:
        """Monitors that check servers on their own port (no `port`) over the
        protocol that no frontend of their pool serves (all valid here): udp
        ones of TCP frontends alone, and those of no `type` (tcp by default,
        which the operator may not have chosen, as the one-line form's
        default check) of UDP frontends alone. A server of the one protocol
        alone fails the other's check, and every one goes down. Said, not
        refused: a server may serve its port over both (DNS)."""
        over = {m.name: "udp" for m in monitors if m.type == "udp" and m.port is None}
        over.update({m.name: "tcp" for m in monitors if m.name in self.untyped and m.port is None})
        found = {}
        for pool in pools:
            protocols = {f.protocol for f in frontends if f.pool == pool.name}
            for s in pool.servers:
                name = s.monitor or pool.monitor
                checks = over.get(name)
                if checks is None or protocols != {_OTHER[checks]}:
                    continue
                tcp = checks == "tcp"
                serves = _OTHER[checks].upper()
                found.setdefault((name, pool.name), (
                    key_path("monitors", name),
                    f"{'no type: by default it' if tcp else 'it'} checks the servers of "
                    f"{key_path('pools', pool.name)} over {checks.upper()} on their own port, "
                    f"and every frontend of that pool is {serves}: a server of {serves} alone "
                    f"there {'refuses the connect' if tcp else 'answers port unreachable'} and "
                    f"goes down (give the monitor its port{', or its type' if tcp else ''})"))
        return tuple(found.values())

    @staticmethod
    def strayed(pools: list[Pool]) -> tuple[tuple[str, str], ...]:
        """Weighted pools whose weights the ring cannot honour within 1% of new
        flows (scheduler.slots scales them down), with all their servers up."""
        found = []
        for pool in pools:
            if pool.algorithm != "weighted":
                continue
            weights = [(i, s.weight) for i, s in enumerate(pool.servers)]
            slots = dict(scheduler.slots(weights, RING_SIZE))
            ring, total = sum(slots.values()), sum(w for _, w in weights)
            astray = sum(abs(slots[i] / ring - w / total) for i, w in weights) / 2
            if astray > 0.01:
                found.append((key_path("pools", pool.name),
                              f"its weights need more than a weighted ring's {RING_SIZE:,} "
                              f"slots: scaled down to fit, they send {astray:.0%} of new flows "
                              f"to other servers than they ask for "
                              f'(algorithm = "maglev", up to {MAGLEV_SERVERS_MAX} servers, honours '
                              f"them within 1%)"))
        return tuple(found)

    def section(self, section: str) -> Iterator[tuple[str, str, dict]]:
        """(path, name, table) of the section's objects, in file order."""
        raw = self.doc.get(section, {})
        if not isinstance(raw, dict):
            self.problem(section, f"expected a table, got {_kind(raw)}")
            self.names[section] = None
            return
        self.names[section] = set(raw)
        for name, obj in raw.items():
            path = key_path(section, name)
            if not NAME_RE.fullmatch(name):
                self.problem(path, BAD_NAME)
            if not isinstance(obj, dict):
                self.problem(path, f"expected a table, got {_kind(obj)}")
                continue
            yield path, name, obj

    def ref(self, section: str, what: str) -> Callable[[Any], str]:
        """A check that the value names an object of `section`."""
        def check(value: Any) -> str:
            name = _string(value)
            known = self.names[section]
            if known is not None and name not in known:
                raise _bad(f"no {what} {quoted(name)}")
            return name
        return check

    def ignored(self, path: str, check: Callable[[Any], Any], reason: str) -> Callable:
        """A check of a value that is then ignored: a valid one is warned of."""
        def warn(value: Any) -> None:
            check(value)
            self.notes.append((path, reason))
        return warn

    def fields(self, path: str, obj: dict, checks: dict[str, Callable],
               defaults: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
        """The object's values by key, defaults filled in; a key whose value is
        wrong (or missing, if required) is reported and left out."""
        values = {key: value for key, value in defaults.items() if key not in obj}
        for key, raw in obj.items():
            check = checks.get(key)
            if check is None:
                self.problem(f"{path}.{clipped(key)}", "unknown key")
                continue
            try:
                values[key] = check(raw)
            except _Invalid as e:
                for suffix, reason in e.problems:
                    self.problem(f"{path}.{key}{suffix}", reason)
        for key in required:
            if key not in obj:
                self.problem(f"{path}.{key}", "required")
        return values

    def monitor(self, path: str, name: str, obj: dict) -> Monitor | None:
        before = len(self.problems)
        mtype = obj.get("type", "tcp")
        if "type" not in obj:
            self.untyped.add(name)
        checks = {"type": _one_of(MONITOR_TYPES), "port": _port,
                  "path": _http_path, "expect_status": _status,
                  "expect_body": _body, "host": _host,
                  "send_hex": _hex, "expect_hex": _hex,
                  "interval": _seconds, "timeout": _seconds,
                  "rise": _count, "fall": _count}
        if mtype in MONITOR_TYPES and mtype not in HTTP_TYPES:
            checks.update(dict.fromkeys(HTTP_ONLY, _only('type "http" or "https"')))
        if mtype in MONITOR_TYPES and mtype != "udp":
            checks.update(dict.fromkeys(UDP_ONLY, _only('type "udp"')))
        if mtype == "none":
            # Ignored, they would make the operator believe the servers checked.
            checks.update(dict.fromkeys(CHECKING, _only('type "tcp", "http", "https" or "udp" '
                                                         '(type "none" never checks)')))
        # A udp check needs a request: most services ignore an empty datagram.
        values = self.fields(path, obj, checks, defaults={"interval": Monitor.interval},
                             required=("send_hex",) if mtype == "udp" else ())
        timeout, interval = values.get("timeout"), values.get("interval")
        if "timeout" not in obj and interval is not None:
            values["timeout"] = default_timeout(interval)
        elif timeout is not None and interval is not None and timeout > interval:
            self.problem(f"{path}.timeout", f"{timeout} is longer than the interval {interval}")
        if len(self.problems) > before or not NAME_RE.fullmatch(name):
            return None
        return Monitor(name=name, **values)

    @functools.cached_property
    def server_checks(self) -> dict[str, Callable]:
        """A server's checks by key: made once for the 10,000 servers of a file."""
        return {"address": _address, "port": _port, "weight": _weight,
                "monitor": self.ref("monitors", "monitor"),
                "backup": _boolean, "enabled": _boolean}

    def server(self, path: str, name: str, obj: dict) -> Server | None:
        before = len(self.problems)
        values = self.fields(path, obj, self.server_checks, defaults={},
                             required=("address", "port"))
        if "address" in values:
            self.addresses[name] = values["address"]
        if len(self.problems) > before or not NAME_RE.fullmatch(name):
            return None
        return Server(name=name, **values)

    def pool(self, path: str, name: str, obj: dict,
             servers: dict[str, Server | None]) -> Pool | None:
        def members(value: Any) -> list[str]:
            names = _items(self.ref("servers", "server"), value)
            if not names:
                raise _bad("a pool needs at least one server")
            return names

        before = len(self.problems)
        algorithm = obj.get("algorithm", "roundrobin")
        checks = {"servers": members, "algorithm": _one_of(ALGORITHMS),
                  "monitor": self.ref("monitors", "monitor"),
                  "on_server_down": _one_of(ON_SERVER_DOWN), "maglev_size": _maglev_size}
        if algorithm in ALGORITHMS and algorithm not in MAGLEV_ALGORITHMS:
            checks["maglev_size"] = _only('algorithm "maglev" or "source"')
        values = self.fields(path, obj, checks, defaults={}, required=("servers",))
        if algorithm in MAGLEV_ALGORITHMS and "servers" in values:
            self.check_maglev(path, len(values["servers"]), values.get("maglev_size"))
        if len(self.problems) > before or not NAME_RE.fullmatch(name):
            return None
        members = tuple(servers.get(s) for s in values.pop("servers"))
        if None in members:
            return None                 # a server named is itself wrong, and reported
        first: dict[tuple[IPv4Address, int], str] = {}
        for i, s in enumerate(members):
            other = first.setdefault((s.address, s.port), s.name)
            if other != s.name:
                self.problem(f"{path}.servers[{i}]", f"{quoted(s.name)} is {s.address}:{s.port}, "
                                                     f"as {quoted(other)}: one server twice")
        return Pool(name=name, servers=members, **values)

    def check_weights(self, pools: list[Pool]) -> None:
        """A weight that no pool of its server honours: roundrobin gives every
        server the same share, where HAProxy's roundrobin, which a config may be
        copied from, honours weights."""
        honoured, ignored = set(), {}
        for pool in pools:
            for s in pool.servers:
                if pool.algorithm == "roundrobin":
                    ignored.setdefault(s.name, (s.weight, pool.name))
                else:
                    honoured.add(s.name)
        for name, (weight, pool) in ignored.items():
            if weight != 1 and name not in honoured:
                self.problem(f"{key_path('servers', name)}.weight",
                             f"{weight}, but its pools are roundrobin "
                             f"({key_path('pools', pool)}), which "
                             f'gives every server the same share: algorithm = "weighted" '
                             f"honours weights")

    def check_capacity(self, frontends: list[Frontend], pools: dict[str, Pool]) -> None:
        """No more than the data plane's maps hold, as `xlb up` and `apply` would
        find (planner.CapacityError)."""
        maglev = [f for f in frontends
                  if f.pool in pools and pools[f.pool].algorithm in MAGLEV_ALGORITHMS]
        for what, n, limit in (
                ("frontends", len(frontends), MAX_FRONTENDS),
                ("frontends with a Maglev pool", len(maglev), MAX_MAGLEV_FRONTENDS)):
            if n > limit:
                self.problem("frontends", f"{n} {what}: the data plane holds {limit}")
        for pool in pools.values():
            if pool.algorithm not in MAGLEV_ALGORITHMS and len(pool.servers) > RING_SIZE:
                self.problem(f"{key_path('pools', pool.name)}.servers",
                             f"{len(pool.servers)} servers do not fit a ring of {RING_SIZE}")
        named = len({i for f in frontends for i in f.interfaces})
        if named > MAX_LINKS:
            self.problem("frontends", f"{named} interfaces: the data plane holds {MAX_LINKS}")
        total = sum(len(p.servers) for p in pools.values())
        if total > MAX_BACKENDS:
            self.problem("pools", f"{total} servers in pools (one counts once in each of "
                                  f"its pools): the data plane holds {MAX_BACKENDS}")

    def check_maglev(self, path: str, servers: int, size: int | None) -> None:
        """Enough slots for the pool's servers; `size` None: the default, or wrong."""
        if servers > MAGLEV_SERVERS_MAX:
            self.problem(f"{path}.servers",
                         f"{servers} servers are too many for a Maglev pool: at most "
                         f"{MAGLEV_SERVERS_MAX} ({MAGLEV_SLOTS_PER_SERVER} slots each in "
                         f"{MAGLEV_SIZE_MAX})")
        elif size is not None:
            try:
                check_maglev_servers(size, servers)
            except ValueError as e:
                self.problem(f"{path}.maglev_size", str(e))

    def frontend(self, path: str, name: str, obj: dict) -> Frontend | None:
        before = len(self.problems)
        checks = {"vip": _address, "port": _port, "protocol": _protocol,
                  "pool": self.ref("pools", "pool"),
                  "interfaces": lambda value: tuple(_items(_interface, value)),
                  **dict.fromkeys(TIMEOUTS, _timeout), "adopt_replies": _boolean}
        # They act on no flow of this frontend, where the operator may believe its
        # flows expire after them: warned of and dropped, not refused, since an
        # earlier build's `xlb show` wrote all four, and a file made of it must
        # still start the next build.
        protocol = obj.get("protocol", "tcp")
        others = _other_timeouts(protocol)
        for key, other in others.items():
            checks[key] = self.ignored(f"{path}.{key}", _timeout,
                                       f'only for protocol "{other}" ({protocol.upper()} flows '
                                       f'take {_choices(PROTOCOL_TIMEOUTS[protocol.lower()])}): '
                                       f'ignored')
        values = self.fields(path, obj, checks, defaults={"protocol": "tcp"},
                             required=("vip", "port", "pool"))
        for key in others:
            values.pop(key, None)
        if all(key in values for key in ("vip", "port", "protocol")):
            self.services.append((name, values["vip"], values["port"], values["protocol"]))
        if len(self.problems) > before or not NAME_RE.fullmatch(name):
            return None
        return Frontend(name=name, **values)

    def check_services(self) -> None:
        """No service twice; no server at a VIP."""
        first: dict[tuple[IPv4Address, int, str], str] = {}
        vips: dict[IPv4Address, str] = {}
        for name, vip, port, protocol in self.services:
            seen = first.setdefault((vip, port, protocol), name)
            if seen != name:
                self.problem(key_path("frontends", name),
                             f"duplicate of {key_path('frontends', seen)} "
                             f"({vip}:{port}/{protocol})")
            vips.setdefault(vip, name)
        for name, address in self.addresses.items():
            if address in vips:
                self.problem(f"{key_path('servers', name)}.address",
                             f"{address} is the VIP of {key_path('frontends', vips[address])}")

    def check_adopt(self, frontends: list[Frontend], pools: dict[str, Pool]) -> None:
        """A frontend that adopts replies has a Maglev pool whose servers serve
        no other frontend: a server's packet that no flow entry knows must be
        this frontend's, and Maglev is what sends its client to that server on
        every node."""
        if not any(fe.adopt_replies for fe in frontends):
            return      # most configs: no look at every server (10,000 took 50 ms)
        # The frontends of each pool and protocol, for a look at each pool's
        # servers once, not once per frontend (thousands of frontends on one
        # pool took seconds); of those that serve a server, the first two in
        # the file are enough to name one other than a given frontend.
        groups: dict[tuple[str, str], list[tuple[int, str]]] = {}
        for i, fe in enumerate(frontends):
            if fe.pool in pools:
                groups.setdefault((fe.pool, fe.protocol), []).append((i, fe.name))
        serving: dict[tuple, list[tuple[int, str]]] = {}
        for (pool, protocol), names in groups.items():
            for s in pools[pool].servers:
                key = (s.address, s.port, protocol)
                serving[key] = sorted({*serving.get(key, ()), *names[:2]})[:2]
        shared: dict[tuple[str, str], list[Server]] = {}
        for fe in frontends:
            pool = pools.get(fe.pool)
            if not fe.adopt_replies or pool is None:
                continue
            path = f"{key_path('frontends', fe.name)}.adopt_replies"
            if pool.algorithm not in MAGLEV_ALGORITHMS:
                self.problem(path, f'needs a pool with algorithm "maglev" or "source" '
                                   f'({key_path("pools", pool.name)} '
                                   f'is "{pool.algorithm}"): every node must send a client to '
                                   'the same server')
            # One line a frontend (a line a server and frontend made millions).
            # A server is shared when two frontends serve it, whichever asks:
            # the servers of a pool and protocol are looked at once.
            group = (pool.name, fe.protocol)
            if group not in shared:
                shared[group] = [s for s in pool.servers
                                 if len(serving[(s.address, s.port, fe.protocol)]) > 1]
            if shared[group]:
                s, more = shared[group][0], len(shared[group]) - 1
                other = next(n for _, n in serving[(s.address, s.port, fe.protocol)]
                             if n != fe.name)
                self.problem(path, f"{key_path('servers', s.name)} "
                                   f"({s.address}:{s.port}/{fe.protocol}) also serves "
                                   f"{key_path('frontends', other)}: its packets could be "
                                   "either's replies" +
                                   (f"; {more} more of {key_path('pools', pool.name)}'s servers "
                                    f"serve{'s' if more == 1 else ''} another frontend too"
                                    if more else ""))


# --- dump -------------------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n",
            "\f": "\\f", "\r": "\\r"}


# What a TOML basic string must escape. Found by one regex, not looked at a
# character at a time: a dump of 10,000 servers took 50 ms so.
_TO_ESCAPE = re.compile(r'["\\\x00-\x1f\x7f]')


def _toml_string(text: str) -> str:
    def escape(m: re.Match) -> str:
        c = m.group()
        return _ESCAPES.get(c) or f"\\u{ord(c):04X}"
    return '"' + _TO_ESCAPE.sub(escape, text) + '"'


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def key_path(section: str, name: str) -> str:
    """An object's key as the file must spell it: `servers."was1.example.com"`,
    not `servers.was1.example.com`, which names a table in a table."""
    return f"{section}.{clipped(name, _toml_key)}"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)              # always has a '.', an 'e', or is inf/nan: a TOML float
    if isinstance(value, (str, IPv4Address)):
        return _toml_string(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_toml_value, value)) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def dump(config: Config) -> str:
    """The config as canonical TOML, defaults written out: `load(dump(c)) == c`.

    Keys with no value (a monitor's port, a server's monitor, ...) are left out,
    and so are a frontend's timeouts of the other protocol, which act on
    nothing; servers are those of the pools, each once, in order of first
    appearance.
    """
    servers: dict[str, Server] = {}
    for pool in config.pools:
        for server in pool.servers:
            if servers.setdefault(server.name, server) != server:
                raise ValueError(f"two different servers are named {server.name!r}")

    lines: list[str] = []

    def table(section: str, name: str, items: list[tuple[str, Any]]) -> None:
        lines.append(f"[{section}.{_toml_key(name)}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in items if value is not None)
        lines.append("")

    for m in config.monitors:
        http = [("path", m.path), ("expect_status", m.expect_status),
                ("expect_body", m.expect_body), ("host", m.host)] if m.type in HTTP_TYPES else []
        udp = [("send_hex", m.send_hex), ("expect_hex", m.expect_hex)] if m.type == "udp" else []
        checking = [("port", m.port), *http, *udp, ("interval", float(m.interval)),
                    ("timeout", float(m.timeout)), ("rise", m.rise), ("fall", m.fall)]
        table("monitors", m.name, [("type", m.type), *(checking if m.type != "none" else ())])
    for s in servers.values():
        table("servers", s.name, [("address", s.address), ("port", s.port), ("weight", s.weight),
                                  ("monitor", s.monitor), ("backup", s.backup),
                                  ("enabled", s.enabled)])
    for p in config.pools:
        table("pools", p.name, [("servers", [s.name for s in p.servers]),
                                ("algorithm", p.algorithm), ("monitor", p.monitor),
                                ("on_server_down", p.on_server_down),
                                ("maglev_size",
                                 p.maglev_size if p.algorithm in MAGLEV_ALGORITHMS else None)])
    for f in config.frontends:
        table("frontends", f.name, [("vip", f.vip), ("port", f.port), ("protocol", f.protocol),
                                    ("pool", f.pool), ("interfaces", list(f.interfaces)),
                                    *((key, getattr(f, key))
                                      for key in PROTOCOL_TIMEOUTS[f.protocol]),
                                    ("adopt_replies", f.adopt_replies)])
    return "\n".join(lines)
