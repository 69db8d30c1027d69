"""`xlb up`: wires the parts together and serves until told to stop.

Order matters for the promise that bad input or a failure leaves nothing
behind: validate, claim the control socket (one instance per namespace),
load the program, fill its maps, attach it; any failure on the way detaches
what was attached. Attachments are BPF links, so even a killed process
leaves no program behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time

from . import __version__, ctl, netif, planner
from .datapath import Attachment, Datapath, Limits
from .layout import REASON_ACTIONS, XDP_ACTIONS
from .model import Config


class Balancer:
    """A running instance: the config it serves and the data path serving it."""

    def __init__(self, config: Config, datapath: Datapath, links: list[netif.Link]):
        self.config = config
        self.datapath = datapath
        self.links = links
        self.state = planner.DataplaneState()
        self.started = time.time()

    def apply(self, config: Config) -> None:
        lim = self.datapath.limits
        target = planner.desired(config, self.links, self.state, lim.max_services,
                                 lim.max_backends, lim.ring_size)
        planner.execute(self.datapath, planner.plan(self.state, target))
        self.state, self.config = target, config

    def status(self) -> dict:
        dp = self.datapath
        frontends = []
        for fe in self.config.frontends:
            svc = self.state.services[(fe.vip, fe.port, fe.proto_number)]
            frontends.append({"name": fe.name, "vip": str(fe.vip), "port": fe.port,
                              "protocol": fe.protocol, "pool": fe.pool,
                              **_counters(dp.service_counters(svc.id))})
        pools = []
        for pool in self.config.pools:
            servers = []
            for s in pool.servers:
                b = self.state.backends[(pool.name, s.name)]
                servers.append({"name": s.name, "address": str(s.address), "port": s.port,
                                "weight": s.weight, "state": "up", "health": "up",
                                **_counters(dp.backend_counters(b.id))})
            pools.append({"name": pool.name, "algorithm": pool.algorithm, "servers": servers})
        reasons = dp.reason_counters()
        actions = dict.fromkeys(XDP_ACTIONS, 0)
        for (name, tally), action in zip(reasons.items(), REASON_ACTIONS):
            actions[action] += tally.packets
        return {
            "version": __version__, "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started, 1),
            "interfaces": [{"name": a.ifname, "ifindex": a.ifindex, "mode": a.mode}
                           for a in dp.attachments()],
            "frontends": frontends, "pools": pools,
            "flows": {"entries": dp.flow_entries(), "capacity": dp.limits.max_flows},
            "actions": actions,
            "reasons": {name: {"packets": t.packets, "bytes": t.bytes}
                        for name, t in reasons.items()},
        }


def _counters(c) -> dict:
    return {"packets_in": c.packets_in, "bytes_in": c.bytes_in, "packets_out": c.packets_out,
            "bytes_out": c.bytes_out, "new_flows": c.new_flows}


def _attach_all(datapath: Datapath, links: list[netif.Link]) -> list[Attachment]:
    """Native XDP where the driver takes it, generic with a warning elsewhere."""
    attached = []
    for link in links:
        att = datapath.attach(link.index, link.name)
        if att.mode != "native":
            print(f"xlb: warning: {link.name}: native XDP refused ({att.note}); "
                  f"using generic XDP, which is slower", file=sys.stderr)
        attached.append(att)
    return attached


def _check_host(config: Config, links: list[netif.Link]) -> None:
    """Refuses VIPs that are local addresses; warns where replies would be filtered."""
    for fe in config.frontends:
        owner = netif.local_owner(fe.vip)
        if owner:
            raise LookupError(f"VIP {fe.vip} is a local address (on {owner}): reverse-NATed "
                              f"replies would look martian; remove it from the host")
    for link in links:
        if netif.strict_rp_filter(link.name):
            print(f"xlb: warning: {link.name}: strict rp_filter drops reverse-NATed replies "
                  f"(their source is the VIP); set net.ipv4.conf.{link.name}.rp_filter=0 or 2",
                  file=sys.stderr)


def up(config: Config) -> int:
    """Runs the balancer in the foreground until SIGINT or SIGTERM (or `xlb down`)."""
    sock = ctl.bind()
    datapath = None
    try:
        links = netif.select(config.interfaces)
        if not links:
            raise LookupError("no up, non-loopback interface in this network namespace")
        _check_host(config, links)
        datapath = Datapath(Limits())
        balancer = Balancer(config, datapath, links)
        balancer.apply(config)
        attached = _attach_all(datapath, links)
        print(f"xlb: serving {', '.join(f.endpoint for f in config.frontends)} -> "
              f"{', '.join(s.name for p in config.pools for s in p.servers)} on "
              f"{', '.join(f'{a.ifname} ({a.mode})' for a in attached)}", flush=True)
        asyncio.run(_serve(balancer, sock))
    finally:
        if datapath is not None:
            datapath.close()
        sock.close()
    print("xlb: stopped, XDP detached", flush=True)
    return 0


async def _serve(balancer: Balancer, sock) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            reply = await _answer(balancer, stop, reader, writer)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_unix_server(handle, sock=sock, limit=ctl.MAX_REQUEST)
    async with server:
        await stop.wait()


async def _answer(balancer, stop, reader, writer) -> dict:
    if ctl.peer_uid(writer.get_extra_info("socket")) != 0:
        return {"ok": False, "error": "permission denied: the control socket is root-only"}
    try:
        line = await asyncio.wait_for(reader.readline(), timeout=5)
        req = json.loads(line)
        cmd = req["cmd"]
    except (ValueError, asyncio.LimitOverrunError):
        return {"ok": False, "error": f"malformed or oversized request (limit {ctl.MAX_REQUEST} bytes)"}
    except (KeyError, TypeError):
        return {"ok": False, "error": "request has no \"cmd\""}
    except asyncio.TimeoutError:
        return {"ok": False, "error": "request timed out"}
    if cmd == "ping":
        return {"ok": True, "result": "pong"}
    if cmd == "status":
        return {"ok": True, "result": balancer.status()}
    if cmd == "down":
        stop.set()
        return {"ok": True, "result": "stopping"}
    return {"ok": False, "error": f"unknown command {cmd!r}"}
