"""The `xlb` command line. Thin: parse, call, format; every error is one line
on stderr and a non-zero exit (2 for bad input, 1 for every other failure;
the other statuses, which are no errors, are in README's command table)."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import re
import select
import signal
import stat
import sys
import syslog
import time
from pathlib import Path
from typing import NoReturn

import click

from . import __version__, config as configfile, ctl, log
from .ha import KEEPALIVED_INSTANCE
from .model import (ConfigError, Monitor, from_flags, has_leading_zero, monitor_from_flags,
                    not_utf8, parse_host)
from .units import (LONG, clipped, count, full, interfaces, last_check, quoted, shown,
                    si, unapplied)


class Failure(click.ClickException):
    exit_code = 1


class BadInput(click.ClickException):
    exit_code = 2


class _FileName(click.Path):
    """A file's name, never empty: Path("") would be ".", a directory the
    operator did not name."""

    def convert(self, value, param, ctx):
        if value == "":
            self.fail("a file name cannot be empty", param, ctx)
        return super().convert(value, param, ctx)


class _Spelt:
    """A number option's value as a shell user types it (`spelling`), before
    click reads it: Python's int() and float() would also take ' 2 ', '1_0',
    '+2' and another script's digits ('٣'), and float() '1e3', 'nan' and
    'inf'. A '-' is let through for the option's range check to name (`--rise
    -1`: must be at least 1). One longer than any number an option takes is
    refused as such: int() reads no more than 4300 digits, and a message would
    echo it whole. A leading zero is refused, as a port's is (and a TOML
    file's number's, the config's `interval = 01.5` too): `--priority 0100`
    may be a mistyped 100 or 1000, and `ip route show table 0100` reads table
    64 (octal) where `--announce-table 0100` would be 100; a bare 0, and
    0.5, are fine."""

    spelling: re.Pattern
    said: str

    def convert(self, value, param, ctx):
        if isinstance(value, str):      # not a default, which is a number
            if len(value) > LONG:
                self.fail(f"{quoted(value)} is too long for a number.", param, ctx)
            if not self.spelling.fullmatch(value):
                self.fail(f"{quoted(value)} is not {self.said}.", param, ctx)
            if has_leading_zero(value.lstrip("-").partition(".")[0]):
                self.fail(f"{quoted(value)} has a leading zero.", param, ctx)
        return super().convert(value, param, ctx)


class _Int(_Spelt, click.types.IntParamType):
    """Of an option whose range its own check says (click's help would show an
    IntRange of no bounds as "x<=None")."""
    spelling, said = re.compile(r"-?[0-9]+"), "a whole number in digits 0-9"


class _Float(_Spelt, click.types.FloatParamType):
    """As _Int: a number of seconds."""
    spelling = re.compile(r"-?([0-9]+\.?[0-9]*|\.[0-9]+)")
    said = "a number in digits 0-9, with a '.' fraction (no exponent)"


class _IntRange(_Int, click.IntRange):
    """An _Int in click's range, which --help shows."""


class _FloatRange(_Float, click.FloatRange):
    """A _Float in click's range, which --help shows."""


# A config file's name (or keepalived's FIFO's). What the file is (a
# directory, unreadable, not there) is config.read's to say, as one of the
# file's problems: `xlb check` lists it and exits 1.
CONFIG_FILE = _FileName(readable=False, path_type=Path)


def _show_help(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        _out(ctx.get_help())    # click's own echo exits 1 when the reader has gone
        ctx.exit()


def _show_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        _out(f"xlb, version {__version__}")
        ctx.exit()


class _Command(click.Command):
    """A command whose --help is written as every answer is (_out)."""

    def get_help_option(self, ctx: click.Context) -> click.Option | None:
        option = super().get_help_option(ctx)
        if option is not None:
            option.callback = _show_help
        return option

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Bad input when an option of one value is given twice: click keeps
        the last without a word (`--role active --role backup` serves as
        backup). Checked after click's own parse, so that --help still wins."""
        given = list(args)      # click's parse consumes the list
        rest = super().parse_args(ctx, args)
        _, _, order = self.make_parser(ctx).parse_args(args=given)
        seen = set()
        for param in order:
            if isinstance(param, click.Option) and not (param.multiple or param.is_flag
                                                        or param.count):
                if param in seen:
                    raise click.BadOptionUsage(param.name, f"{param.opts[0]}: given twice "
                                                           f"(it takes one value)", ctx)
                seen.add(param)
        return rest


class _Group(_Command, click.Group):
    command_class = _Command
    group_class = type          # its groups are of its class


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True,
              callback=_show_version, help="Show the version and exit.")
def cli() -> None:
    """xlb: a kernel-accelerated L4 load balancer.

    An XDP program matches traffic for each VIP:port/protocol, picks a backend
    for every new flow, keeps the flow on it and rewrites addresses both ways.
    It answers ARP and pings for VIPs, and drops what comes to a VIP for
    nothing it serves (a VIP is no host's address); traffic neither to a VIP
    nor of a balanced flow passes untouched. One instance runs per network
    namespace.
    """


@cli.command()
@click.option("--vip", "vips", multiple=True, metavar="IP:PORT[/tcp|/udp]",
              help="A virtual service to balance (tcp if no protocol; either case). "
                   "Repeatable; all VIPs share the backends.")
@click.option("--backend", "backends", multiple=True, metavar="IP:PORT",
              help="A real server. Repeatable.")
@click.option("--algorithm", type=click.Choice(["roundrobin", "maglev", "source"]),
              default="roundrobin", show_default=True,
              help="How new flows are spread over the backends: round-robin, maglev "
                   "(a consistent hash of the flow: every balancer picks the same backend), "
                   "or source (maglev of the client's address alone: all of a client's "
                   "connections go to one backend; clients behind one NAT address too).")
@click.option("--iface", "ifaces", multiple=True, metavar="DEV",
              help="Attach to DEV. Repeatable. Default: every up Ethernet interface, "
                   "also one that comes up later (not the loopback, nor tun, tunnel or "
                   "wireguard links).")
@click.option("--check", "check_kind", default="tcp", show_default=True,
              metavar="tcp|http:/PATH|https:/PATH|udp:HEX|none",
              help="Health check of the --backend servers: a TCP connect, an HTTP GET "
                   "of PATH expecting a 2xx or 3xx status, that GET over TLS (the "
                   "certificate not verified), a UDP datagram of the bytes HEX "
                   "expecting any datagram back, or none.")
@click.option("--check-port", metavar="N",
              help="Port to check. Default: each backend's own port.")
@click.option("--interval", type=_Float(), default=Monitor.interval, show_default=True,
              metavar="SECONDS",
              help="Seconds between checks (the timeout is 1 s, or the interval if shorter).")
@click.option("--rise", type=_Int(), default=Monitor.rise, show_default=True, metavar="N",
              help="Passed checks in a row that bring a down server back.")
@click.option("--fall", type=_Int(), default=Monitor.fall, show_default=True, metavar="N",
              help="Failed checks in a row that take a server out.")
@click.option("--metrics", "metrics_at", default="127.0.0.1:9717", show_default=True,
              metavar="ADDR:PORT|off",
              help="Serve Prometheus metrics at http://ADDR:PORT/metrics, or not.")
@click.option("--forwarding", type=click.Choice(["fast", "kernel"]),
              help="fast: send rewritten packets to their next hop from XDP (bpf_fib_lookup, "
                   "XDP_TX/XDP_REDIRECT), leaving to the kernel only what it must resolve, "
                   "and what a native program cannot send out of its link (one xlb does not "
                   "run on natively: a bridge, a VLAN, a tunnel); "
                   "kernel: hand them to the kernel's IP stack (XDP_PASS). Either way xlb "
                   "itself tells the sender of a packet too big for its next hop. Default: "
                   "as the running data path, which `xlb up` adopts, forwards, else fast.")
@click.option("--flow-table", "flow_table", type=_IntRange(min=1), metavar="CONNECTIONS",
              help="Established connections the flow table holds (two entries each; "
                   "default: the size of the running data path's, which `xlb up` adopts, "
                   "else 131072); half-open ones have a table of their own.")
@click.option("--config", "config_path", metavar="FILE",
              type=CONFIG_FILE,
              help="Serve the config file FILE instead of --vip/--backend "
                   "(xlb reads it, never writes it; `xlb apply` reads it again).")
@click.option("--role", type=click.Choice(["active", "backup"]),
              help="backup: answer no ARP for the VIPs (and announce none) until "
                   "`xlb ha role active`, as keepalived's backup node. Default: active. "
                   "A restart that adopts the running data path keeps its role.")
@click.option("--announce-table", type=_Int(), metavar="TABLE",
              help="Keep a /32 route for each VIP served (some server of its pools up, role "
                   "active) in kernel routing table TABLE, for BIRD to announce (`xlb ha bird`).")
def up(vips, backends, algorithm, ifaces, check_kind, check_port, interval, rise, fall,
       metrics_at, forwarding, flow_table, config_path, role, announce_table) -> None:
    """Load the XDP program and serve in the foreground until SIGINT or SIGTERM.

    Either the one-line form (--vip, --backend, --algorithm, --iface, and the
    health check options) or --config FILE. Servers count as up until their
    first check, which decides at once; after that --fall failures take a
    server out and --rise passes bring it back. Attaches natively (generic XDP,
    with a warning, where the driver refuses), prints one line when it serves,
    and on SIGINT or SIGTERM detaches everything. A VIP must not be an address
    of this host: xlb answers ARP for it on the links whose subnet holds it.

    The data path outlives this process: if it dies any other way, the program
    keeps forwarding, and the next `xlb up` adopts it (its flows and counters)
    and applies its own config; with neither --config nor a one-line option it
    takes over the config the last instance ran. SIGHUP (a terminal that hangs
    up) is such a way while it serves: no stop, nor a reload (`xlb apply`); a
    stop under way runs to its end. Exits 75 after `xlb down --keep-datapath`.
    """
    _check_state_dir()
    ctx = click.get_current_context()
    flags = [p for p in ("vips", "backends", "algorithm", "ifaces", "check_kind", "check_port",
                         "interval", "rise", "fall")
             if ctx.get_parameter_source(p) == click.core.ParameterSource.COMMANDLINE]
    if config_path is not None:
        if flags:
            raise BadInput("--config FILE replaces the one-line options "
                           "(--vip, --backend, --algorithm, --iface and the health check options)")
        config = _load(config_path)
        _echo_warnings(config_path, config.warnings)
    elif not flags:
        _need_root()        # the config to take over is in root's state directory
        config, config_path = saved_config()
    else:
        try:
            monitor = monitor_from_flags(check_kind, check_port, interval, rise, fall)
            config = from_flags(list(vips), list(backends), list(ifaces), monitor, algorithm)
        except ConfigError as e:
            raise BadInput(str(e)) from None
        unchecked = [f"--{p.replace('_', '-')}" for p in ("check_port", "interval", "rise", "fall")
                     if p in flags]
        if monitor is None and unchecked:   # accepted, as ever: a warning, as unused keys are
            _error(f"xlb: warning: {', '.join(unchecked)}: not used with --check none "
                   f"(no server is checked)")
        if ("check_kind" not in flags and monitor.port is None
                and all(f.protocol == "udp" for f in config.frontends)):
            # A server of UDP alone (syslog, NTP) refuses the connect: all would go down.
            _error("xlb: warning: every --vip is UDP, but the default check connects over "
                   "TCP to the backends' ports: a server of UDP alone goes down; give "
                   "--check udp:HEX (a request they answer), --check none, --check-port N "
                   "or --check tcp")
        if (monitor is not None and monitor.type == "udp" and monitor.port is None
                and all(f.protocol == "tcp" for f in config.frontends)):
            _error("xlb: warning: every --vip is TCP, but --check udp sends to the backends' "
                   "ports over UDP: a server of TCP alone answers port unreachable and goes "
                   "down; give --check-port N or --check tcp")
    from . import metrics              # prometheus-client: only `up` needs it
    try:
        metrics_address = metrics.parse_address(metrics_at)
    except ValueError as e:
        raise BadInput(f"--metrics: {e}") from None
    if announce_table is not None:
        from .ha import check_table
        _valid("--announce-table", check_table, announce_table)
    from .datapath import DatapathError     # imports bcc only when it is needed
    limits = None if flow_table is None else _flow_table(flow_table)
    fast_path = None if forwarding is None else forwarding == "fast"
    _need_root()
    from . import daemon
    from .planner import CapacityError
    try:
        code = daemon.up(config, config_path.absolute() if config_path else None,
                         metrics_address, limits, fast_path, role, announce_table)
    except (ctl.AlreadyRunning, ctl.ControlError) as e:
        raise Failure(str(e)) from None
    except (LookupError, CapacityError) as e:
        raise BadInput(str(e.args[0])) from None
    except DatapathError as e:
        raise Failure(str(e)) from None
    if code:
        raise click.exceptions.Exit(code)


def _need_root() -> None:
    if os.geteuid() != 0:
        raise Failure("xlb up needs root, to load and attach XDP programs")


NAME_MAX, PATH_MAX = 255, 4096      # Linux's: bytes of a file's name, of a path with its NUL


def _check_state_dir() -> None:
    """$XLB_STATE_DIR, if set, is absolute: a relative one (or an empty one,
    which is no directory) would put xlb's state wherever the command runs.
    Nothing on the way to this namespace's state directory is other than a
    directory (what is not there yet, the first save makes): a file there
    left the state unread and unsaved, with a warning, after the compile
    (`up`), or said that no instance left any (`down`)."""
    from . import state
    root = os.environ.get("XLB_STATE_DIR")
    if root is not None and not os.path.isabs(root):
        raise BadInput(f"XLB_STATE_DIR: {quoted(root)} is not an absolute path")
    target = state.directory()
    what = "XLB_STATE_DIR" if root is not None else "state directory"
    # A name of over 255 bytes, or a path of 4096, no save can make; told by its
    # length, as the walk below stops at the first directory not there yet.
    if (len(os.fsencode(target / state.FILE)) >= PATH_MAX
            or any(len(os.fsencode(part)) > NAME_MAX for part in target.parts)):
        raise BadInput(f"{what}: {quoted(str(target.parent))}: "
                       f"{os.strerror(errno.ENAMETOOLONG)}")
    for path in (*reversed(target.parents), target):
        try:
            if not stat.S_ISDIR(os.stat(path).st_mode):
                raise BadInput(f"{what}: {quoted(str(path))} is not a directory" +
                               ("" if path in (target, target.parent)
                                else f" (on the way to {quoted(str(target.parent))})"))
        except OSError:     # not there yet, or not this user's to see: as before
            return


def _flow_table(connections: int):
    """The map sizes of --flow-table CONNECTIONS, refused where the kernel would
    not create the tables, or where they would not fit in the memory the
    machine has available (the kernel allocates them whole, at once). The
    running data path's tables of that size are kept, not made again: the
    memory they take is no reason to refuse its restart."""
    from .datapath import Limits
    limits = _valid("--flow-table", Limits.for_connections, connections)
    need, available = limits.flow_table_bytes(), mem_available()
    if need <= available / 2 or _running_tables_are(limits):
        return limits
    taken = f"--flow-table: {connections} connections take {need / 2**30:.1f} GiB of kernel memory"
    if need > available:
        raise BadInput(f"{taken}; this machine has {available / 2**30:.1f} GiB available")
    # It fits, and the kernel takes it whole at the start, from what else runs here.
    _error(f"xlb: warning: {taken}, more than half of the {available / 2**30:.1f} GiB this "
           f"machine has available")
    return limits


def _running_tables_are(limits) -> bool:
    """Whether the data path running here has flow tables of these sizes (as
    only root can tell)."""
    from .datapath import find_running
    running = find_running()
    if running is None:
        return False
    try:
        return running.limits() == limits
    finally:
        running.close()


def mem_available() -> int:
    """Bytes of memory the machine can give without swapping (MemAvailable)."""
    meminfo = Path("/proc/meminfo").read_text()
    return int(re.search(r"^MemAvailable:\s+(\d+) kB", meminfo, re.M).group(1)) * 1024


def saved_config():
    """With neither --config nor a one-line option: the config that the last
    instance of this network namespace ran, and the file it served, from xlb's
    own state (so a bare `xlb up` takes over after a crash or an upgrade)."""
    from . import state
    saved = state.load()
    if saved is None and (state.directory() / state.FILE).exists():
        raise BadInput("nothing to serve: give --config FILE or --vip/--backend (the state "
                       "file left here cannot be taken, as said above; `xlb down` forgets it)")
    if saved is None:
        raise BadInput("nothing to serve: give --config FILE or --vip/--backend (no earlier "
                       "instance of this network namespace left a config to take over)")
    try:
        config = configfile.load(saved.config_text, dumped=True)
    except ConfigError as e:
        raise BadInput(f"the config saved by the earlier instance is invalid: {e} (give "
                       f"--config FILE, or `xlb down` to forget it)") from None
    return config, Path(saved.config_path) if saved.config_path else None


def _error(message: str) -> None:
    try:
        click.echo(shown(message), err=True)
    except OSError:
        # stderr a full disk, or a pipe whose reader is gone: the line is
        # lost, not what the command goes on to do (its answer on stdout, its
        # exit status), as log.event loses its own.
        pass
    if _to_syslog:
        syslog.syslog(syslog.LOG_ERR, shown(message))


# keepalived runs `xlb ha follow` with its stderr on /dev/null: what follow
# has to say goes to syslog (the journal) as well.
_to_syslog = False


def _out(text: str, nl: bool = True) -> None:
    """The command's answer on stdout. A reader that went away (`xlb status |
    head -1`, `| grep -q`) loses the rest of it, not the command's exit status,
    which says what was done or found (click alone would exit 1: "no instance
    runs", for status)."""
    try:
        click.echo(text, nl=nl)
    except BrokenPipeError:
        log.silence(sys.stdout)


def _say(message: str) -> None:
    """A line on stdout that names what the operator gave (a file)."""
    _out(shown(message))


def _done(message: str) -> None:
    """The answer (_say) of a command that changed something. One that cannot
    be written (stdout a file on a full disk) fails the command, as any answer
    lost does, with a line that says the change was made, and what it was: a
    bare "No space left on device" read as nothing done."""
    try:
        _say(message)
    except OSError as e:
        raise Failure(f"done, but its answer could not be written ({e.strerror or e}): "
                      f"{message.removeprefix('xlb: ')}") from None


def _echo_problems(file: Path, problems) -> None:
    """One line a problem, as `xlb check` and `xlb apply` report a config file."""
    name = clipped(file)
    for path, reason in problems:
        # a file that cannot be read is its own key path (config.read): named once
        _error(f"{name}: {reason}" if path == name else f"{name}: {path}: {reason}")


def _echo_warnings(file: Path, warnings) -> None:
    """One line a warning of the file's (Config.warnings)."""
    for path, reason in warnings:
        _error(f"xlb: warning: {clipped(file)}: {path}: {reason}")


def _load(path: Path):
    try:
        return configfile.load_file(path)
    except ConfigError as e:
        raise BadInput(str(e) if [p for p, _ in e.problems] == [clipped(path)]
                       else f"{clipped(path)}: {e}") from None


@cli.command()
@click.argument("file", type=CONFIG_FILE)
def check(file: Path) -> None:
    """Validate a config file, like `haproxy -c`.

    Lists every problem with its key path and exits 1, or says what the file
    holds (and warns of what would not act as written: what nothing uses, a
    weighted ring that strays from its weights, ...) and exits 0. Needs no
    root and no running instance.
    """
    try:
        cfg = configfile.load_file(file)
    except ConfigError as e:
        _echo_problems(file, e.problems)
        raise click.exceptions.Exit(1) from None
    _say(f"{file}: ok: {len(cfg.frontends)} frontends, {len(cfg.pools)} pools, "
         f"{cfg.server_count()} servers, {len(cfg.monitors)} monitors")
    _echo_warnings(file, cfg.warnings)


@cli.command()
@click.argument("file", required=False, type=CONFIG_FILE)
def apply(file: Path | None) -> None:
    """Apply a config file to the running instance; the flows it keeps go on.

    Without FILE, the file the instance serves is read again (edit it, then
    `xlb apply`, as with `systemctl reload`). With FILE, FILE is applied and
    from then on the instance serves FILE. xlb never writes the file.

    The file is validated first (as `xlb check`); an invalid file changes
    nothing. The instance computes the difference and applies it: a service
    switches to its new backend set in one step, established flows to servers
    that remain are untouched, flows of removed servers follow their pool's
    on_server_down; a server renamed (or its pool) at the same address and port
    is the same server, whose flows go on. Drain and maint set with `xlb server`
    stay with each server the file keeps in that pool, a renamed one too; one
    it forgets (the server gone from the pool, its name taken by another) is
    warned of. The
    links it attaches to (up since) and detaches from (gone, or no longer
    named) are named in its answer.
    """
    if file is None:
        served = _request("show")["config"]
        if served is None:
            raise BadInput("this instance serves no file (it was started from flags): "
                           "name one, `xlb apply FILE`")
        file = Path(served)
    try:
        text = configfile.read(file)
    except ConfigError as e:
        raise BadInput(str(e)) from None
    try:
        r = ctl.request("apply", text=text, path=str(file.absolute()), timeout=60)
    except ctl.ControlError as e:           # the instance validates
        _echo_problems(file, e.problems)
        raise (BadInput if e.bad_input else Failure)(str(e)) from None
    except ctl.NotRunning as e:
        raise _not_running(e) from None
    _warn(r)
    # The links that came up since, and those gone or named no more (not told by an
    # earlier build's instance).
    links = "".join(f"; {verb} {', '.join(r[key])}" for key, verb in
                    (("attached", "attached to"), ("detached", "detached from")) if r.get(key))
    _done(f"xlb: applied {file} in {r['validate_seconds'] + r['apply_seconds']:.3f}s: "
          f"{r['frontends']} frontends, {r['pools']} pools, {r['servers']} servers; "
          f"{r['flows_ended']} flows ended; serving {r['config']}{links}")
    _echo_warnings(file, r.get("warnings", r.get("unused", ())))  # "unused": an older instance's
    # (neither told by an earlier build's instance)
    for warning in [*r.get("unserved", ()), *r.get("attach_warnings", ())]:
        _error(f"xlb: warning: {warning}")
    for forgotten in r["admin_forgotten"]:
        # Its server left the pool: gone, moved, or its name taken by another server.
        _error(f"xlb: warning: forgot {forgotten}: its server is no longer in that pool")


def _warn(reply: dict) -> None:
    """The instance's warning (it can name the state directory), as _error shows it."""
    if reply.get("warning"):
        _error(f"xlb: warning: {reply['warning']}")


@cli.command()
def show() -> None:
    """Print the effective config of the running instance, as TOML."""
    r = _request("show")
    _out(r["text"], nl=False)


@cli.command()
@click.argument("action", type=click.Choice(["disable", "enable", "drain"]))
@click.argument("pool")
@click.argument("server")
def server(action: str, pool: str, server: str) -> None:
    """Take a server out of service, or back, at run time.

    drain: no new flows, established ones continue (while its health checks
    pass: failing them, it is down, and they follow on_server_down).
    disable: no new flows, and established ones end (their next packets are
    balanced anew). enable: back to normal. A server that the config disables
    (enabled = false) stays maint, and the answer says so. The state survives
    `xlb apply` (of a file that keeps the server in that pool) and restarts of
    `xlb up` (xlb keeps it in its state directory); `xlb down` forgets it.
    """
    r = _request("server", action=action, pool=pool, server=server)
    _warn(r)
    if r["state"] == "maint" and action != "disable":
        # No run-time state is left to make it maint: the file's is, which this
        # cannot override. Said before the answer, which may fail to be written.
        _error(f"xlb: warning: {pool}/{server} stays maint: the config disables it "
               f"(enabled = false); enable it there, then `xlb apply`")
    _done(f"xlb: {pool}/{server} is {r['state']}; {r['flows_ended']} flows ended")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(as_json: bool) -> None:
    """Describe the instance running in this network namespace.

    Exits 1 when none runs, and 3 when its data path runs without its control
    process (after a crash): it forwards with its last state, `xlb up` adopts
    it, `xlb down` removes it. Only root can see such a data path.
    """
    try:
        result = ctl.request("status")
    except ctl.NotRunning as e:
        _no_control_process(e, as_json)
    except ctl.ControlError as e:
        raise Failure(str(e)) from None
    if as_json:
        _out(json.dumps(result, indent=2))
    else:
        _out(format_status(result))


def _no_control_process(e: Exception, as_json: bool = False) -> NoReturn:
    """Exits 3 describing the data path that runs here without its control
    process, or 1 (Failure) when none runs."""
    orphan = _orphan()
    if orphan is None:
        raise Failure(str(e)) from None
    _out(json.dumps(orphan, indent=2) if as_json else format_orphan(orphan))
    raise click.exceptions.Exit(3) from None


@cli.command()
@click.option("--interval", type=_FloatRange(0.1, 3600), default=1.0, show_default=True,
              metavar="SECONDS", help="Seconds between samples.")
@click.option("--once", is_flag=True,
              help="Print one frame (rates over two samples --interval apart) and exit.")
def top(interval: float, once: bool) -> None:
    """A live view of the instance running in this network namespace.

    Redraws every --interval seconds: per frontend new connections, packets and
    bytes per second; per server new connections and packets per second,
    states and last checks (as many servers as the terminal has lines;
    --once lists all, and so does each frame on a stdout that is no terminal,
    or a terminal that cannot redraw (TERM=dumb), printed after the last); each
    flow table's fill, drops by reason, and health
    changes the data path lacks (their apply failed). q or Ctrl-C quits the
    live view (exit 0), SIGTERM too (exit 143), and so does a reader of its
    output that goes away (`xlb top | head`: exit 0, quietly); Ctrl-C
    interrupts --once as any command (exit 130). Exits 1 when none runs, or when the
    instance stops while top runs; 3, as status, when its data path runs
    without its control process (also when the control process is killed, or
    stopped by `xlb down --keep-datapath`, while top runs).
    """
    from . import top as view           # imports rich only when it is needed
    try:
        code = view.run(interval, once)
    except (ctl.NotRunning, view.Stopped) as e:
        # Gone while top ran: killed (a crash, OOM, `xlb down --keep-datapath`)
        # it leaves its data path forwarding, which is told as status tells it.
        _no_control_process(e)
    except ctl.ControlError as e:
        raise Failure(str(e)) from None
    if code:
        raise click.exceptions.Exit(code)


@cli.command()
@click.option("--keep-datapath", is_flag=True,
              help="Stop only the control process: the data path keeps forwarding with "
                   "its state, and the next `xlb up` (a new version, say) adopts it.")
def down(keep_datapath: bool) -> None:
    """Stop the instance running in this network namespace and wait until it
    has detached, and forget xlb's state here. A data path that runs without
    its control process (after a crash) is removed too, with the VIP routes it
    announced (--announce-table), and the state that an instance stopped by a
    signal left is forgotten, as is a state file xlb cannot take (damaged).
    An instance stopping already (a signal, another `xlb down`) is waited for
    the same way (exit 0); with --keep-datapath, exit 1 if that stop detached
    the data path. So is another `xlb down` removing what a dead instance
    left (exit 0). With nothing to stop or remove, exit 1."""
    _check_state_dir()
    stopping, pid = False, None
    try:
        answer = ctl.request("down", keep_datapath=keep_datapath)
        # The instance that stops: an `xlb up` may start as soon as it lets go,
        # whose answers are no sign that this one runs. (An earlier build's
        # instance does not say.)
        pid = answer.get("pid") if isinstance(answer, dict) else None
    except (ctl.Stopping, ctl.Ended) as e:
        # Stopping already (a signal, another `xlb down`): that stop is waited
        # for as this one's would be: a stop is asked twice by those who cannot
        # know of each other (`systemctl stop` beside an operator's `xlb down`).
        stopping, pid = True, getattr(e, "pid", None)
    except ctl.NotRunning as e:
        if keep_datapath:
            raise _not_running(e) from None
        _done(_remove_the_dead(e))
        return
    except ctl.ControlError as e:
        raise Failure(str(e)) from None
    deadline = time.monotonic() + STOP_WAIT
    while time.monotonic() < deadline:
        if not ctl.running(pid):
            # An instance listens until it has detached; one killed in between
            # (OOM, a supervisor's SIGKILL) stops listening with its program
            # still attached, which is removed here as a crash's would be, with
            # the instance lock (held still: it detached itself, or an `xlb up`
            # started meanwhile adopts it).
            left = None
            if not keep_datapath:
                with contextlib.suppress(ctl.AlreadyRunning), ctl.exclusive():
                    left = _orphan(detach=True)
                    if left is None and stopping:
                        _forget_state()     # what a stop by a signal keeps
            elif stopping and _orphan() is None:
                raise Failure("xlb was stopping already (a signal, or `xlb down`), and "
                              "detached its data path: not kept")
            if left is not None:
                _done(f"xlb: the instance stopped before it detached; removed the data "
                      f"path it left ({_program_on(left)})")
                return
            _done("xlb: stopped; the data path keeps running" if keep_datapath
                  else "xlb: stopped")
            return
        time.sleep(0.1)
    raise Failure(f"the instance did not stop within {STOP_WAIT} s")


STOP_WAIT = 15      # seconds `xlb down` waits for a stop, or for another down's removal


@cli.group()
def ha() -> None:
    """High availability with keepalived (an active/backup pair) or BIRD (N nodes
    announcing the VIPs over BGP to a router that spreads flows with ECMP).

    The active node answers ARP for the VIPs; a backup is silent but keeps
    checking health. The VIPs are never local addresses: keepalived elects,
    and moves only the backends' gateway address.
    """


@ha.command()
@click.argument("role", type=click.Choice(["active", "backup"]))
def role(role: str) -> None:
    """Make the running instance active or backup.

    active: answer ARP for the VIPs, send a gratuitous ARP for each on
    becoming active, and announce them (--announce-table). backup: none of
    that; health checks go on and the XDP program still balances whatever
    reaches it. The role is kept across a restart of `xlb up` that adopts the
    running data path.
    """
    r = _request("role", role=role)
    _warn(r)
    unsent = r["gratuitous_arps_unsent"]
    _done(f"xlb: {r['previous']} -> {r['role']}; {r['gratuitous_arps']} gratuitous ARPs sent"
          + (f", not sent: {'; '.join(unsent)}" if unsent else ""))


@ha.command()
@click.option("--instance", default=KEEPALIVED_INSTANCE, show_default=True, metavar="NAME",
              help="The vrrp_instance whose state xlb follows.")
@click.option("--track-file", type=_FileName(dir_okay=False, path_type=Path), metavar="PATH",
              help="keepalived's track file: kept at 0 while xlb serves on this node, "
                   "1 (keepalived's FAULT) while no data path runs here or no link is up "
                   "on which a VIP's ARP requests arrive. Refused where another user may "
                   "write it, its directory (/tmp too) or a directory on its way.")
@click.argument("fifo", type=CONFIG_FILE)
def follow(instance: str, track_file: Path | None, fifo: Path) -> None:
    """Follow keepalived's notify FIFO: MASTER makes xlb active; BACKUP, FAULT
    and STOP make it backup, and so does keepalived stopping.

    keepalived starts this as its vrrp_notify_fifo_script (see `xlb ha
    keepalived`) and it runs as long as keepalived: one process for all
    changes, where a notify script would start one per change. keepalived
    says a role once: a role that cannot be delivered (xlb not running) is
    retried every second, and an instance started anew (after `xlb down`, a
    restart) is told the role again; so is xlb by the follow that a reload of
    keepalived starts, which keepalived tells nothing. A FIFO that another user may write is
    refused: it would tell the role. With --track-file, it also tells
    keepalived, every second, whether xlb serves on this node: a node
    whose data path is gone (xlb stopped or not started), or that has no
    link up on which a VIP's ARP requests arrive, cannot answer for the
    VIPs, and keepalived hands them to the peer. A control process killed
    with its data path still serving counts as serving. It holds a lock on
    the track file while it runs, which keepalived checks: killed alone
    (kill -9), it leaves the node in FAULT; one started while another holds
    it (a reload's) waits for that one to end. Messages go to stderr and to
    syslog (keepalived runs this with stderr on /dev/null).
    """
    global _to_syslog
    from . import state
    from .ha import check_instance, check_keepalived_file, keepalived_instance, keepalived_role
    syslog.openlog("xlb", syslog.LOG_PID, syslog.LOG_DAEMON)
    _to_syslog = not isinstance(sys.stderr, log.Syslog)     # not twice
    _check_state_dir()      # where it keeps the role keepalived last said
    _valid("--instance", check_instance, instance)
    if track_file is not None:
        # The path keepalived's config names (`xlb ha keepalived` checks it so):
        # one it cannot hold (relative, a control character) is no track file of its.
        _valid("--track-file", check_keepalived_file, str(track_file))
        _check_track_file(track_file)
    # What the path is, said as the system says it (click's check would call a
    # FIFO behind a directory it may not enter, or a symlink loop, missing).
    try:
        if not stat.S_ISFIFO(fifo.stat().st_mode):     # not opened: a device may act on it
            raise BadInput(f"{clipped(fifo)}: {_NOT_FIFO}")
        fd = os.open(fifo, os.O_RDWR | os.O_CLOEXEC)   # a reader that is also a writer
    except OSError as e:                               # never sees EOF
        raise BadInput(f"{clipped(fifo)}: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISFIFO(st.st_mode):     # replaced since
        raise BadInput(f"{clipped(fifo)}: {_NOT_FIFO}")
    _check_fifo_writers(st, clipped(fifo))
    # A stopping keepalived gives up the gateway and ends this with SIGTERM,
    # writing no line that says so.
    signal.signal(signal.SIGTERM, _keepalived_stops)
    keepalived = _keepalived_process(instance)
    wanted, told, failing, buf, lock = None, None, False, b"", None
    cut_off: list[str] = []
    strangers = False       # lines about another vrrp_instance: said once
    poll = 0.0      # that role, and the track file, at once; then every FOLLOW_POLL
    try:
        if track_file:
            lock = _lock(track_file)
        # A reloading keepalived ends its follow (which makes xlb backup, as at a
        # stop) and starts this one without a word: the role it said before holds,
        # once the old follow has ended (the lock).
        wanted = state.followed(keepalived)
        if wanted and lock is not None:
            _save_followed(keepalived, wanted, running=True)
        while True:
            ready, _, _ = select.select([fd], [], [], poll if wanted or track_file else None)
            poll = FOLLOW_POLL
            if ready:
                buf += os.read(fd, 4096)
                *lines, buf = buf.split(b"\n")
                buf = buf[-FIFO_LINE_MAX:]     # keepalived's lines are short: garbage goes
                for line in lines:
                    text = line.decode(errors="replace")
                    role = keepalived_role(text, instance)
                    if role:
                        wanted, told = role, None
                        _save_followed(keepalived, role, running=lock is not None)
                    elif (other := keepalived_instance(text)) not in (None, instance) \
                            and not strangers:
                        # A vrrp_instance renamed by hand: follow would wait for
                        # ever, and say nothing.
                        strangers = True
                        _error(f"xlb ha follow: keepalived tells the state of vrrp_instance "
                               f"{quoted(other)}, not of {quoted(instance)} (--instance), which "
                               f"this follows")
            if not (wanted or track_file):
                continue
            answered, was_cut_off, cut_off = False, cut_off, []
            try:
                reply = ctl.request("ping", timeout=2.0)
                # An instance of an earlier build says no cut_off: it serves.
                pid, cut_off, answered = reply["pid"], reply.get("cut_off", []), True
                if wanted and pid != told:
                    ctl.request("role", role=wanted, timeout=2.0)
                    told, failing = pid, False
            except (ctl.NotRunning, ctl.ControlError, OSError) as e:
                if wanted and not failing:
                    _error(f"xlb ha follow: role {wanted} not delivered yet, retried "
                           f"every {FOLLOW_POLL:g} s: {e}")
                    failing = True
            if track_file:
                if cut_off and cut_off != was_cut_off:
                    _error(f"xlb ha follow: no link up for {'; '.join(cut_off)}: this node "
                           f"cannot answer for them, keepalived is told (FAULT)")
                _track(track_file, not cut_off if answered else _datapath_runs())
    except _KeepalivedStops:
        if wanted and lock is not None:
            _save_followed(keepalived, wanted)      # ended, not killed: the next may trust it
        try:
            # keepalived kills follow a second after its SIGTERM: an instance
            # slower than that (a long apply under way) makes itself backup
            # all the same once it gets to the request (stands).
            ctl.request("role", role="backup", timeout=2.0, stands=True)
        except ctl.NotRunning as e:
            # Its data path may serve on, active, without it: the `xlb up` that
            # adopts it keeps the role saved, and no follow runs any more to
            # tell it backup. Saved as backup, it starts as keepalived left it.
            _error(f"xlb ha follow: keepalived stops; role backup not delivered: {e}"
                   + _saved_as_backup())
        except (ctl.ControlError, OSError) as e:
            _error(f"xlb ha follow: keepalived stops; role backup not delivered: {e}")
    except Exception as e:
        # keepalived starts follow once, never again: ended, it would leave the
        # node MASTER with nobody to tell xlb its role, nor keepalived whether
        # xlb serves. FAULT hands the VIPs to the peer instead.
        _error(f"xlb ha follow: ended by {type(e).__name__}: {e}"
               + ("; keepalived is told this node cannot serve (FAULT) until it starts "
                  "follow again (a restart or reload)" if track_file else ""))
        if track_file:
            _track(track_file, False)
        raise
    finally:
        if lock is not None:
            os.close(lock)


def _saved_as_backup() -> str:
    """The role in xlb's saved state made backup (what an instance that adopts
    the running data path starts as); what was done, said."""
    from . import state
    try:
        kept = state.load()
        if kept is None or kept.role == "backup":
            return ""
        state.save(dataclasses.replace(kept, role="backup"))
    except OSError as e:
        return f"; its saved role not made backup: {e.strerror or e}"
    return "; the next `xlb up` that adopts its data path starts as backup"


def _keepalived_process(instance: str) -> str:
    """The keepalived process that started this follow (its parent), and the
    instance followed: its pid and start time, as a pid reused by another
    process is not the same keepalived."""
    ppid = os.getppid()
    try:
        start = Path(f"/proc/{ppid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        start = "?"
    return f"{ppid} {start} {instance}"


def _save_followed(keepalived: str, role: str, running: bool = False) -> None:
    from . import state
    try:
        state.save_followed(keepalived, role, running)
    except OSError as e:
        _error(f"xlb ha follow: role {role} not recorded for keepalived's reload: "
               f"{e.strerror or e}")


def _lock(track_file: Path) -> int:
    """The track file, opened and locked for as long as this follow runs:
    keepalived checks that the lock is held (`xlb ha keepalived`), which tells
    it that a follow runs even when one is killed alone (kill -9, the OOM
    killer) and can write nothing more. Waits for a follow that holds it still
    (the one a reload ends) and for keepalived's command that runs while none
    does (a check, the FAULT notify)."""
    if not track_file.exists():
        _track(track_file, False)     # keepalived reads an empty file as 0: serving
    fd = os.open(track_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:             # keepalived's SIGTERM among them
        os.close(fd)
        raise
    return fd


def _check_fifo_writers(st: os.stat_result, what: str) -> None:
    """Bad input when another user may write the FIFO of st: keepalived takes
    one that exists as it is, and one that another user made (in /tmp, say)
    would let that user switch this node's role."""
    from . import state
    if not state.alone(st, state.WRITABLE):
        raise BadInput(f"{what}: another user may write it (owner uid {st.st_uid}, mode "
                       f"{stat.S_IMODE(st.st_mode):o}): it would tell this node's role")


def _check_track_file(path: Path) -> None:
    """Bad input unless `_track` can keep the file: a track file (keepalived's
    number, or nothing) or none yet in a directory that is there. It reads
    the file before each write: a FIFO would hold it for ever, a device may
    have no end; and it writes over anything else (the config's path, given
    by mistake)."""
    try:
        if unsafe := _others_may_place(path):
            raise BadInput(f"--track-file {clipped(path)}: {unsafe}: another user could put "
                           f"a file of their choosing at that path, for follow to write or "
                           f"keepalived to read; give a path only root may change (in /run)")
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            os.stat(path.parent)      # follow makes the file there
            return
        if stat.S_ISLNK(st.st_mode):
            raise BadInput(f"--track-file {clipped(path)}: a symbolic link, which follow does not "
                           f"write through: give the file itself")
        if not stat.S_ISREG(st.st_mode):
            raise BadInput(f"--track-file {clipped(path)}: not a regular file (keepalived's "
                           f"track_file)")
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
            raise BadInput(f"--track-file {clipped(path)}: another user may write it (owner "
                           f"uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}): they would "
                           f"tell keepalived whether this node serves")
        if st.st_size > TRACK_FILE_MAX or not re.fullmatch(rb"\s*-?\d*\s*", path.read_bytes()):
            raise BadInput(f"--track-file {clipped(path)}: holds more than a track file's number: "
                           f"not overwritten")
    except OSError as e:
        raise BadInput(f"--track-file {clipped(path)}: {e.strerror}") from None


def _others_may_place(path: Path) -> str | None:
    """The directory where another user could put another file at path (as
    OpenSSH checks its files' directories), described; None where none can.
    follow writes the file as root, through the path's directories, again
    and again: one that another user owns, or may write and is not sticky,
    lets them swap what comes next for a link (O_NOFOLLOW guards the file's
    own name alone) to a file of root's, which follow then writes over; one that
    is sticky (/tmp) lets them swap no entry of root's, but make the file
    first in it. Symbolic links on the way are followed as the kernel does,
    each checked in its own directory."""
    trusted = (0, os.geteuid())
    todo = list(Path(os.getcwd(), path).parts)      # ".." kept: a link's parent is not lexical
    here, st, links = Path(todo.pop(0)), os.stat("/"), 0
    while True:
        name = todo.pop(0)
        if st.st_uid not in trusted:
            return f"directory {clipped(here)} is owned by uid {st.st_uid}"
        if st.st_mode & 0o022 and (not todo or not st.st_mode & stat.S_ISVTX
                                   or os.lstat(here / name).st_uid not in trusted):
            return f"directory {clipped(here)} may be written by others (mode " \
                   f"{stat.S_IMODE(st.st_mode):o})"
        if not todo:
            return None
        if name == "..":
            here = here.parent
            st = os.stat(here)
            continue
        entry = here / name
        est = os.lstat(entry)
        if stat.S_ISLNK(est.st_mode):
            links += 1
            if links > 40:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
            target = Path(os.readlink(entry))
            todo = [*target.parts[1:], *todo] if target.is_absolute() else [*target.parts, *todo]
            if target.is_absolute():
                here, st = Path("/"), os.stat("/")
            continue
        here, st = entry, est


def _datapath_runs() -> bool:
    """Whether an xlb data path is attached here (bcc is imported only when
    the control process does not answer)."""
    from .datapath import find_running
    running = find_running()
    if running is None:
        return False
    running.close()
    return True


def _track(path: Path, serving: bool) -> None:
    """Writes keepalived's track file, 0 (serving) or 1 (FAULT), when it holds
    the other value: keepalived reads it at each write, and writes 1 in it
    itself when it starts (init_file)."""
    value = b"0\n" if serving else b"1\n"
    try:
        with contextlib.suppress(FileNotFoundError):
            if path.read_bytes() == value:
                return
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.write(fd, value)
        finally:
            os.close(fd)
    except OSError as e:
        _error(f"xlb ha follow: {clipped(path)}: {e.strerror}")


# A file or device would be read to its end over and over, at once.
_NOT_FIFO = "not a FIFO (keepalived's vrrp_notify_fifo)"
# Seconds between looks at the instance, once keepalived has said a role (or with a track file).
FOLLOW_POLL = 1.0
FIFO_LINE_MAX = 4096
TRACK_FILE_MAX = 64      # bytes: keepalived's track file holds a number


class _KeepalivedStops(Exception):
    pass


def _keepalived_stops(signum, frame):
    # The stop comes as more than one SIGTERM (systemd signals every process of
    # keepalived's unit, keepalived its scripts' group; a killed keepalived's
    # VRRP process, then follow's parent dying): another, raised while follow
    # tells xlb backup, would end it with xlb still active.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _KeepalivedStops


def _valid(option: str, check, value):
    """check(value), or bad input naming the option."""
    try:
        return check(value)
    except ValueError as e:
        raise BadInput(f"{option}: {e}") from None


def _ha_config(path: Path):
    cfg = _load(path)
    if not cfg.frontends:
        raise BadInput(f"{clipped(path)}: no frontend, so no VIP to make highly available")
    return cfg


def _config_addresses(cfg) -> dict:
    """What each of CONFIG's addresses is, as an error names it: its VIPs and
    its servers', none of which can be a balancer node's or the router's."""
    owners = {s.address: f"the address of {configfile.key_path('servers', s.name)}"
              for p in cfg.pools for s in p.servers}
    return owners | {f.vip: "a VIP" for f in cfg.frontends}


@ha.command()
@click.option("--peer", required=True, metavar="IP", help="The other node's address on DEV.")
@click.option("--interface", required=True, metavar="DEV", help="The link VRRP runs on.")
@click.option("--priority", type=_IntRange(1, 254), default=100, show_default=True,
              metavar="N", help="The higher one is elected; the lower one waits about "
                   "(256 - N)/256 of an advert interval longer before it takes over.")
@click.option("--advert-int", type=_FloatRange(0.01, 40.95), default=1.0,
              show_default=True, metavar="SECONDS",
              help="Seconds between adverts; a failure is seen after 3 missed ones.")
@click.option("--vrid", type=_IntRange(1, 255), default=51, show_default=True,
              metavar="N", help="virtual_router_id: the same on both nodes, unique on the link.")
@click.option("--gateway", "gateways", multiple=True, metavar="IP/PREFIX[@DEV]",
              help="An address that moves with the active node: the backends' default "
                   "gateway (on DEV; default: --interface). At least one (keepalived's "
                   "VRRPv3 needs an address to move); repeatable.")
@click.option("--fifo", default="/run/xlb-keepalived.fifo", show_default=True,
              metavar="PATH", help="keepalived's notify FIFO, read by `xlb ha follow`.")
@click.option("--track-file", default="/run/xlb-keepalived.serving", show_default=True,
              metavar="PATH", help="A file keepalived tracks, which `xlb ha follow` keeps at "
                                   "0 while xlb serves on this node and 1 (FAULT: the peer "
                                   "takes over) while it does not.")
@click.option("--xlb", "xlb_path", metavar="PATH",
              help="The xlb that keepalived runs (default: this one).")
@click.argument("config", type=CONFIG_FILE)
def keepalived(peer, interface, priority, advert_int, vrid, gateways, fifo, track_file,
               xlb_path, config) -> None:
    """Print a keepalived config for one node of an active/backup pair serving
    CONFIG's VIPs (CONFIG is read, never written).

    Run both nodes with the same xlb config and `xlb up --role backup`, then
    keepalived with this config (each node with its own --peer and
    --priority). VRRPv3, unicast to the peer, no preemption; keepalived's
    state reaches xlb through `xlb ha follow`, which keepalived checks is
    running (a node where it is not goes FAULT).
    """
    from . import ha as hamod, netif
    # Said once the config is sure to be printed: bad input is one line.
    warnings = []
    peer_ip = _valid("--peer", parse_host, peer)
    _valid("--interface", hamod.check_keepalived_word, interface)
    if interface == "lo":
        raise BadInput("--interface lo: the loopback reaches no other node")
    if abs(advert_int * 100 - round(advert_int * 100)) > 1e-6:
        raise BadInput(f"--advert-int: {advert_int:g} is not a whole number of "
                       f"hundredths of a second (keepalived's unit)")
    _valid("--fifo", hamod.check_keepalived_file, fifo)
    _valid("--track-file", hamod.check_keepalived_file, track_file)
    if os.path.normpath(track_file) == os.path.normpath(fifo):
        raise BadInput("--track-file: the same path as --fifo")
    # keepalived writes both when it starts, whatever is there (the xlb
    # config's path given by mistake): its states into the FIFO's path, 1 over
    # the track file (init_file ... overwrite). Paths not here are its to make.
    if os.path.exists(fifo):
        st = os.stat(fifo)
        if not stat.S_ISFIFO(st.st_mode):
            raise BadInput(f"--fifo {clipped(fifo)}: not a FIFO, which keepalived would write its "
                           f"states into")
        _check_fifo_writers(st, f"--fifo {clipped(fifo)}")
    if os.path.lexists(track_file) or os.path.isdir(os.path.dirname(track_file)):
        _check_track_file(Path(track_file))
    for option, path in (("--fifo", fifo), ("--track-file", track_file)):
        # keepalived makes the file, not its directory: without it, follow never
        # runs (no FIFO) or is never heard (no track file). Written for another
        # host, the directory may be there only: a warning.
        if not os.path.isdir(os.path.dirname(path)):
            warnings.append(f"{option} {clipped(path)}: no directory "
                            f"{clipped(os.path.dirname(path))} here; keepalived does not make "
                            f"it, and would hold the node in FAULT")
    if not os.access(hamod.FLOCK, os.X_OK):
        # keepalived disables a check whose program is not there, and says so only
        # in its log: a follow killed alone would go unnoticed again.
        warnings.append(f"no {hamod.FLOCK} here (util-linux): keepalived would not check "
                        f"that `xlb ha follow` runs")
    if xlb_path is None:
        try:
            xlb_path = hamod.check_keepalived_path(os.path.abspath(sys.argv[0]))
        except ValueError as e:
            raise BadInput(f"--xlb not given, and this xlb's own path: {e}; give --xlb") \
                from None
    else:
        _valid("--xlb", hamod.check_keepalived_program, xlb_path)
    if unsafe := hamod.script_unsafe(xlb_path):
        raise BadInput(f"--xlb {clipped(xlb_path)}: keepalived would not run it: {unsafe}")
    if not gateways:
        raise BadInput("--gateway: at least one is needed (keepalived's VRRPv3 refuses an "
                       "instance with no address to move)")
    gws = [_valid("--gateway", hamod.Gateway.parse, g) for g in gateways]
    if len({g.address.ip for g in gws}) < len(gws):
        raise BadInput("--gateway: an address given twice")
    # A VIP or a server's address on a node makes the node's `xlb up` refuse it
    # (a local address).
    cfg = _ha_config(config)
    owners = _config_addresses(cfg)
    if what := owners.get(peer_ip):
        raise BadInput(f"--peer {peer_ip}: {what}, not the other node's address")
    for g in gws:
        if what := owners.get(g.address.ip):
            raise BadInput(f"--gateway {g.address}: {what}, which keepalived would make "
                           f"an address of the active node")
        if g.address.ip == peer_ip:
            raise BadInput(f"--gateway {g.address}: the peer's own address, which cannot "
                           f"move between the nodes")
        if g.interface == "lo":
            raise BadInput(f"--gateway {g.address}@lo: the loopback reaches no backend")
    # Written on the node (as README has it): its own address as --peer (the
    # other node's command copied as it is) has keepalived send its adverts to
    # itself; neither node hears the other, both are MASTER.
    # Warnings, not refusals: the peer's config may be written from this node.
    links = _links()
    here = netif.local_addresses(links)
    if peer_ip in here:
        warnings.append(f"--peer {peer_ip}: an address of this host (on {here[peer_ip]}): "
                        f"keepalived here would send its adverts to itself and both nodes "
                        f"would become MASTER; give the other node's address")
    elif links:     # a config for this host, whose links tell what would not work
        warnings += hamod.link_problems(links, interface, peer_ip, gws)
    for warning in warnings:
        _error(f"xlb: warning: {warning}")
    _out(hamod.keepalived_conf(cfg, xlb=xlb_path,
                               peer=peer_ip,
                               interface=interface, priority=priority,
                               advert_int=advert_int, vrid=vrid, fifo=fifo,
                               track_file=track_file, gateways=gws), nl=False)


def _links() -> list:
    """This host's links (this network namespace's), with their IPv4
    addresses; none when they cannot be listed."""
    from . import netif
    try:
        return netif.links()
    except (OSError, netif.NetlinkError):     # netlink refused: nothing to warn of
        return []


@ha.command()
@click.option("--router", required=True, metavar="IP", help="The router's address (BGP peer).")
@click.option("--as", "local_as", required=True, type=_IntRange(1, 2**32 - 1),
              metavar="N", help="This node's AS number.")
@click.option("--peer-as", required=True, type=_IntRange(1, 2**32 - 1), metavar="N",
              help="The router's AS number.")
@click.option("--table", type=_Int(), default=100, show_default=True, metavar="N",
              help="The routing table of `xlb up --announce-table`.")
@click.option("--router-id", metavar="IP", help="BIRD's router id (default: BIRD picks one).")
@click.argument("config", type=CONFIG_FILE)
def bird(router, local_as, peer_as, table, router_id, config) -> None:
    """Print a BIRD 2 config for one of N nodes announcing CONFIG's VIPs as /32
    to a router that spreads them with ECMP (CONFIG is read, never written).

    A VIP is announced while `xlb up --announce-table TABLE` serves it (some
    server of its pools up, role active) and withdrawn when it stops serving
    it, on `xlb down` (not with --keep-datapath), or, through BFD (100 ms x 3),
    when the node fails.
    """
    from . import ha as hamod
    router_ip = _valid("--router", parse_host, router)
    rid = None if router_id is None else _valid("--router-id", hamod.parse_router_id, router_id)
    _valid("--table", hamod.check_table, table)
    if local_as == peer_as:
        raise BadInput(f"--peer-as {peer_as}: the same as --as; the config is for eBGP, "
                       f"the router in an AS of its own")
    cfg = _ha_config(config)
    if what := _config_addresses(cfg).get(router_ip):
        raise BadInput(f"--router {router_ip}: {what}, not the router's address")
    # Written on the node (as README has it): BIRD's eBGP, single-hop, waits
    # for ever (Idle, not a word in its log) for a router on no link of the
    # node's (its loopback address, say). A warning: the config may be for
    # another host.
    if (links := _links()) and not any(link.holds(router_ip) for link in links):
        _error(f"xlb: warning: --router {router_ip}: on no subnet of this host's links: "
               f"BIRD's eBGP session (not multihop) would never come up; give the router's "
               f"address on a link it shares with this node")
    _out(hamod.bird_conf(cfg, router=router_ip, local_as=local_as, peer_as=peer_as,
                         table=table, router_id=rid), nl=False)


def _request(cmd: str, **args):
    try:
        return ctl.request(cmd, **args)
    except ctl.ControlError as e:
        raise (BadInput if e.bad_input else Failure)(str(e)) from None
    except ctl.NotRunning as e:
        raise _not_running(e) from None


def _remove_the_dead(e: ctl.NotRunning) -> str:
    """What a dead instance left, removed (_forget_the_dead) with the instance
    lock: an `xlb up` starting now could adopt the data path and take the
    state that this removes. Another `xlb down` removing it already (two at
    once: an operator's and a script's) is waited for, and its work is done
    (Failure: nothing was left to remove)."""
    deadline, held, unmarked = time.monotonic() + STOP_WAIT, False, None
    while True:
        try:
            with ctl.exclusive():
                said = _forget_the_dead()
            break
        except ctl.AlreadyRunning:
            now = time.monotonic()
            # A down holds the lock a moment before it says so, and after.
            unmarked = None if ctl.removing() else unmarked or now
            if unmarked is not None and now - unmarked > UNMARKED_GRACE:
                raise Failure("an xlb up started here meanwhile: `xlb down` again stops it") \
                    from None
            if now > deadline:
                raise Failure(f"another `xlb down` has been removing what the instance "
                              f"left for {STOP_WAIT} s, and has not finished") from None
            held = True
            time.sleep(0.1)
    if said is None and held:
        return "xlb: another `xlb down` removed what the instance left meanwhile"
    if said is None:
        raise Failure(str(e))
    return said


UNMARKED_GRACE = 1.0    # seconds the lock is held unsaid before it is taken for an `xlb up`'s


def _forget_the_dead() -> str | None:
    """Removes what no control process runs: a data path and its VIP routes,
    or else the state an instance left; what was done, said (None: none)."""
    orphan = _orphan(detach=True)
    if orphan is not None:
        return (f"xlb: removed the data path that ran without its control process "
                f"({_program_on(orphan)})")
    return _forget_state()


def _forget_state() -> str | None:
    """Forgets the state that an instance left, said (None: it left none)."""
    from . import state
    kept = state.load()
    if kept is None:
        # A state file that is no state of this namespace's (damaged, or
        # another's: load says why) would be warned of at every start.
        if state.clear():
            return (f"xlb: no instance runs; forgot the state file it could not take "
                    f"({state.directory() / state.FILE})")
        return None
    # Left by an instance stopped with a signal, which keeps it (and withdrew
    # its routes), or by a killed one whose data path went since.
    _withdraw(kept)
    state.clear()
    return ("xlb: no instance runs; forgot the state it left (served file, drain and "
            "maint, announce table)")


def _not_running(e: ctl.NotRunning) -> Failure:
    """The failure of a command that needs the control process: "none runs",
    or, where its data path runs without it (only root can see), that."""
    orphan = _orphan() if os.geteuid() == 0 else None
    if orphan is None:
        return Failure(str(e))
    return Failure(f"no xlb control process runs in this network namespace; its data path "
                   f"runs without it ({_program_on(orphan)}): `xlb up` adopts it")


def _orphan(detach: bool = False) -> dict | None:
    """The data path of this namespace when no control process runs (found
    through the kernel's objects), described; detached first if asked. Only
    root can see those objects: anyone else is told so, not that none runs."""
    if os.geteuid() != 0:
        raise Failure("no xlb control process runs in this network namespace; whether its "
                      "data path runs without it, only root can see")
    from .datapath import find_running     # imports bcc only when it is needed
    running = find_running()
    if running is None:
        return None
    try:
        info = running.info
        described = {"control_process": None,
                     "program": {"id": info.id, "name": info.name, "tag": info.tag,
                                 "loaded_seconds_ago": round(
                                     time.clock_gettime(time.CLOCK_BOOTTIME)
                                     - info.load_time_ns / 1e9)},
                     "interfaces": [{"name": a.ifname, "ifindex": a.ifindex, "mode": a.mode,
                                     "state": a.state} for _, a in running.attached.values()],
                     "flows": {"entries": running.flow_entries()}}
        if detach:
            from . import state
            _withdraw(state.load())     # first, as a stopping instance does
            running.detach()
            state.clear()       # as `xlb down` of a running instance: the next `up` starts afresh
        return described
    finally:
        running.close()


def _withdraw(kept) -> None:
    """Withdraws the VIP routes that the instance which saved `kept` (a
    state.State or None) keeps in its announce table: its control process is
    gone, and BIRD would go on announcing them. On failure nothing else is
    removed (the data path, the state), so that `xlb down` can be run again."""
    if kept is None or kept.announce_table is None:
        return
    from .ha import Announcer
    try:
        Announcer(kept.announce_table).sync(())
    except OSError as e:
        raise Failure(f"the VIP routes were not withdrawn ({e}); nothing else was "
                      f"removed") from None


def _program_on(o: dict) -> str:
    """The program of a data path described by _orphan, and its interfaces."""
    return f"program {o['program']['id']} on {', '.join(i['name'] for i in o['interfaces'])}"


def format_orphan(o: dict) -> str:
    p = o["program"]
    return (f"xlb: the data path runs without its control process: program {p['id']} "
            f"(tag {p['tag']}, loaded {p['loaded_seconds_ago']}s ago) on "
            f"{interfaces(o['interfaces'])}; "
            f"{count(o['flows']['entries'])} flow entries. It forwards with its last state; "
            f"`xlb up` adopts it, `xlb down` removes it.")


def _ha_line(h: dict) -> str:
    line = f"role {h['role']}" + (" (answers ARP for the VIPs)" if h["role"] == "active"
                                  else " (silent: answers no ARP, announces nothing)")
    if h["announce_table"] is not None:
        line += (f"; announcing {', '.join(h['announcing']) or 'nothing'} "
                 f"(routing table {h['announce_table']})")
    return line


def _columns(rows: list[list[str]], left: int) -> list[str]:
    """Rows of cells, one a line, each column as wide as its widest cell (a
    long name pushes no other column out of line), two spaces apart (a cell
    may hold one: "was1 (backup)"): the first `left` columns justified left,
    the others (numbers) right."""
    widths = [max(map(len, column)) for column in zip(*rows)]
    return ["  ".join(cell.ljust(w) if i < left else cell.rjust(w)
                     for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]


_SERVER_HEADER = ["SERVER", "ADDRESS", "STATE", "WEIGHT", "ACTIVE", "CONNS", "PKTS IN",
                  "PKTS OUT", "BYTES IN", "BYTES OUT"]


def _server_cells(b: dict) -> list[str]:
    return [b["name"] + (" (backup)" if b["backup"] else ""), f"{b['address']}:{b['port']}",
            b["state"], str(b["weight"]), si(b["active_flows"]), si(b["new_flows"]),
            si(b["packets_in"]), si(b["packets_out"]), si(b["bytes_in"]), si(b["bytes_out"])]


def format_status(s: dict) -> str:
    source = f", config {shown(s['config'])}" if s.get("config") else ""
    lines = [f"xlb {s['version']}, pid {s['pid']}, up {s['uptime_seconds']:.0f}s, "
             f"on {interfaces(s['interfaces'])}, "
             f"{s['forwarding']} forwarding{source}", _ha_line(s["ha"]), ""]
    lines += _columns([["FRONTEND", "VIP", "POOL", "TAKING", "CONNS", "PKTS IN", "PKTS OUT",
                        "BYTES IN", "BYTES OUT"]] + [
        [f["name"], f"{f['vip']}:{f['port']}/{f['protocol']}", f["pool"],
         str(f["servers_taking_flows"]), si(f["new_flows"]), si(f["packets_in"]),
         si(f["packets_out"]), si(f["bytes_in"]), si(f["bytes_out"])]
        for f in s["frontends"]], left=3)
    # The servers of every pool in one set of columns, each pool's under its
    # name; the last check, free text, after them.
    servers = iter(_columns([row for p in s["pools"]
                             for row in [_SERVER_HEADER, *map(_server_cells, p["servers"])]],
                            left=3))
    for p in s["pools"]:
        table = f", table {p['table_digest']}" if p.get("table_digest") else ""
        lines += ["", f"pool {p['name']} ({p['algorithm']}, on_server_down "
                      f"{p['on_server_down']}{table})",
                  f"  {next(servers)}  LAST CHECK",
                  *(f"  {next(servers)}  {last_check(b)}" for b in p["servers"])]
    if lag := unapplied(s):
        lines += ["", f"! {lag}"]
    for f in s["frontends"]:
        if f["servers_taking_flows"] == 0:
            lines += ["", f"! frontend {f['name']}: no server of pool {f['pool']} is up; new flows "
                          f"are dropped (drop_no_backend: "
                          f"{s['reasons']['drop_no_backend']['packets']} in all)"]
    a = s["actions"]
    drops = {k[5:]: v["packets"] for k, v in s["reasons"].items() if k.startswith("drop_")}
    fl = s["flows"]
    lines += ["", f"flows: {si(fl['established'])} established, {si(fl['closing'])} closing, "
                  f"{si(fl['half_open'])} half-open; room for {si(fl['connections_capacity'])} "
                  f"connections; maps hold {s['map_memory_bytes'] / 2**20:.1f} MiB",
              # Each table on its own, as `xlb top` and the metrics show them: the
              # established one can be full, evicting, while both together are not.
              "flow tables (two entries a connection): " + "; ".join(
                  f"{name} {count(t['entries'])}/{count(t['capacity'])} entries, "
                  f"{full(t)[0]}% full"
                  for name, t in fl["tables"].items()),
              "flows removed: " + ", ".join(f"{k} {si(v)}" for k, v in fl["removed"].items()),
              *([f"flows adopted: {si(fl['adopted'])} (another node's connections, taken over "
                 "at their server's packet)"] if fl["adopted"] else []),
              *([f"flow replies restored: {si(fl['replies_restored'])} (reply entries the LRU "
                 "evicted from live connections, put back by the sweep)"]
                if fl["replies_restored"] else []),
              "xdp actions: " + ", ".join(f"{k[4:].lower()} {si(v)}" for k, v in a.items()),
              # Each packet's reason, as README's table names them: the count that
              # tells what the data path did (fib_no_neigh, icmp_too_big, ...).
              "packets by reason: " + (", ".join(f"{k} {si(v['packets'])}"
                                                 for k, v in s["reasons"].items()
                                                 if v["packets"]) or "none"),
              "drops: " + ", ".join(f"{k} {si(v)}" for k, v in drops.items())]
    return "\n".join(lines)


def _clip_given(message: str) -> str:
    """click's own message (a value of the wrong type, an unknown option or
    command), which echoes what was given whole, with each long argument
    (or an --option=VALUE's value) cut short as xlb's own messages cut theirs,
    and a byte that is not UTF-8 shown as the byte it was (repr wrote '\\udcff')."""
    given = {a for arg in sys.argv[1:] for a in (arg, arg.partition("=")[2])
             if len(a) > LONG or not_utf8(a)}
    for value in sorted(given, key=len, reverse=True):
        message = message.replace(repr(value), quoted(value)).replace(value, clipped(value))
    return message


def _standard_fds() -> None:
    """Opens /dev/null on each of fds 0-2 that the caller closed (`xlb up
    2>&-`), as daemons do: else the first files xlb opens take those numbers,
    and what writes to fd 2 below Python (bcc, clang's diagnostics) writes
    into them. Python has made the stream None; stdin and stdout stay so,
    stderr's lines go to syslog (log.Syslog)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)      # the lowest free number: fd
    if sys.stderr is None:
        sys.stderr = log.Syslog()


def main() -> None:
    _standard_fds()
    try:
        code = cli.main(standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:
        # `xlb` or `xlb ha` alone: its message is the whole help, kept as it is
        e.show()
        sys.exit(e.exit_code)
    except click.ClickException as e:
        message = e.format_message()
        if isinstance(e, click.MissingParameter):
            # click lists a choice's values one a line ("Choose from:\n\tdisable,\n\t...")
            message = message.replace(":\n\t", ": ").replace(",\n\t", ", ")
        if isinstance(e, click.UsageError):
            message = _clip_given(message)
        _error(f"xlb: error: {message}")
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except OSError as e:
        # Left to Python, a traceback: writing the answer failed (stdout a
        # file on a full disk, `xlb ha keepalived ... > FILE`), or another call
        # of the system's that no command expects to fail.
        _error(f"xlb: error: {clipped(e.filename)}: {e.strerror}" if e.filename
               else f"xlb: error: {e.strerror or e}")
        sys.exit(1)
    sys.exit(code or 0)
