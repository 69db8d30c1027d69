"""The `xlb` command line. Thin: parse, call, format; every error is one line
on stderr and a non-zero exit (2 for bad input, 1 for everything else)."""

from __future__ import annotations

import json
import os
import sys
import time

import click

from . import __version__, ctl
from .model import ConfigError, from_flags


class Failure(click.ClickException):
    exit_code = 1


class BadInput(click.ClickException):
    exit_code = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="xlb")
def cli() -> None:
    """xlb: a kernel-accelerated L4 load balancer.

    An XDP program matches traffic for each VIP:port/protocol, picks a backend
    for every new flow, keeps the flow on it and rewrites addresses both ways;
    everything else passes untouched. One instance runs per network namespace.
    """


@cli.command()
@click.option("--vip", "vips", multiple=True, metavar="IP:PORT[/tcp|/udp]",
              help="A virtual service to balance (tcp if no protocol). Repeatable; "
                   "all VIPs share the backends.")
@click.option("--backend", "backends", multiple=True, metavar="IP:PORT",
              help="A real server. Repeatable; new flows go round-robin.")
@click.option("--iface", "ifaces", multiple=True, metavar="DEV",
              help="Attach to DEV. Repeatable. Default: every up, non-loopback interface.")
def up(vips, backends, ifaces) -> None:
    """Load the XDP program and serve in the foreground until SIGINT or SIGTERM.

    Attaches natively (generic XDP, with a warning, where the driver refuses),
    prints one line when it serves, and on exit detaches everything it
    attached. The VIP must not be an address of this host: xlb answers ARP for
    it on the links whose subnet holds it.
    """
    try:
        config = from_flags(list(vips), list(backends), list(ifaces))
    except ConfigError as e:
        raise BadInput(str(e)) from None
    if os.geteuid() != 0:
        raise Failure("xlb up needs root, to load and attach XDP programs")
    from . import daemon               # imports bcc only when it is needed
    from .datapath import DatapathError
    from .planner import CapacityError
    try:
        daemon.up(config)
    except ctl.AlreadyRunning as e:
        raise Failure(str(e)) from None
    except (LookupError, CapacityError) as e:
        raise BadInput(str(e.args[0])) from None
    except DatapathError as e:
        raise Failure(str(e)) from None


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(as_json: bool) -> None:
    """Describe the instance running in this network namespace.

    Exits 1 when none runs.
    """
    result = _request("status")
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(format_status(result))


@cli.command()
def down() -> None:
    """Stop the instance running in this network namespace and wait until it
    has detached."""
    _request("down")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if not ctl.running():
            click.echo("xlb: stopped")
            return
        time.sleep(0.1)
    raise Failure("the instance did not stop within 15 s")


def _request(cmd: str):
    try:
        return ctl.request(cmd)
    except (ctl.NotRunning, ctl.ControlError) as e:
        raise Failure(str(e)) from None


def _si(n: int) -> str:
    for unit in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}P"


def format_status(s: dict) -> str:
    ifaces = ", ".join(f"{i['name']} ({i['mode']})" for i in s["interfaces"])
    lines = [f"xlb {s['version']}, pid {s['pid']}, up {s['uptime_seconds']:.0f}s, on {ifaces}", ""]
    lines.append(f"{'FRONTEND':<24} {'POOL':<12} {'FLOWS':>8} {'PKTS IN':>9} {'PKTS OUT':>9} "
                 f"{'BYTES IN':>9} {'BYTES OUT':>9}")
    for f in s["frontends"]:
        lines.append(f"{f['name']:<24} {f['pool']:<12} {_si(f['new_flows']):>8} "
                     f"{_si(f['packets_in']):>9} {_si(f['packets_out']):>9} "
                     f"{_si(f['bytes_in']):>9} {_si(f['bytes_out']):>9}")
    for p in s["pools"]:
        lines += ["", f"pool {p['name']} ({p['algorithm']})",
                  f"  {'SERVER':<22} {'STATE':<6} {'WEIGHT':>6} {'FLOWS':>8} {'PKTS IN':>9} "
                  f"{'PKTS OUT':>9} {'BYTES IN':>9} {'BYTES OUT':>9}"]
        for b in p["servers"]:
            lines.append(f"  {b['name']:<22} {b['state']:<6} {b['weight']:>6} "
                         f"{_si(b['new_flows']):>8} {_si(b['packets_in']):>9} "
                         f"{_si(b['packets_out']):>9} {_si(b['bytes_in']):>9} "
                         f"{_si(b['bytes_out']):>9}")
    a = s["actions"]
    drops = {k[5:]: v["packets"] for k, v in s["reasons"].items() if k.startswith("drop_")}
    lines += ["", f"flow table: {s['flows']['entries']}/{s['flows']['capacity']} entries "
                  f"(two per connection)",
              "xdp actions: " + ", ".join(f"{k[4:].lower()} {_si(v)}" for k, v in a.items()),
              "drops: " + ", ".join(f"{k} {_si(v)}" for k, v in drops.items())]
    return "\n".join(lines)


def main() -> None:
    try:
        code = cli.main(standalone_mode=False)
    except click.ClickException as e:
        click.echo(f"xlb: error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    sys.exit(code or 0)
