"""Prometheus metrics: a custom collector that reads the per-CPU BPF counters
(through `Balancer.status()`, the same view as `xlb status`) at scrape time;
nothing is copied on a timer. Names follow Prometheus conventions and, where
it maps, HAProxy's exporter vocabulary: frontend, pool (HAProxy's backend),
server. README lists every metric.
"""

from __future__ import annotations

import bisect
import threading
from ipaddress import IPv4Address

from prometheus_client import start_http_server
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.registry import CollectorRegistry

from . import __version__

DEFAULT_ADDRESS = "127.0.0.1:9717"
STATES = ("up", "down", "drain", "maint")
# Check durations: a local TCP connect takes ~0.1 ms, a timeout ends at 1-2 s.
CHECK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def parse_address(text: str) -> tuple[str, int] | None:
    """ADDR:PORT, or "off" (None). Raises ValueError naming the problem."""
    if text == "off":
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not ADDR:PORT or off")
    try:
        IPv4Address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IPv4 address") from None
    return host, int(port)


class CheckDurations:
    """Histogram of health-check durations per server, fed by the checker."""

    def __init__(self):
        self._lock = threading.Lock()
        self._data: dict[tuple[str, str], list] = {}   # key -> [bucket counts, sum]

    def observe(self, key: tuple[str, str], seconds: float) -> None:
        with self._lock:
            counts, total = self._data.get(key, ([0] * (len(CHECK_BUCKETS) + 1), 0.0))
            counts[bisect.bisect_left(CHECK_BUCKETS, seconds)] += 1
            self._data[key] = [counts, total + seconds]

    def forget_except(self, keys: set) -> None:
        with self._lock:
            self._data = {k: v for k, v in self._data.items() if k in keys}

    def snapshot(self) -> dict[tuple[str, str], tuple[list[int], float]]:
        with self._lock:
            return {k: (list(c), s) for k, (c, s) in self._data.items()}


class XlbCollector:
    def __init__(self, balancer, durations: CheckDurations):
        self.balancer = balancer
        self.durations = durations

    def describe(self):
        return []    # no metadata up front: the registry need not call collect() to register

    def collect(self):
        st = self.balancer.status()
        yield _gauge("xlb_build_info", "xlb's version.", {"version": __version__}, 1)

        fe_info = GaugeMetricFamily("xlb_frontend_info", "A frontend: its VIP, port, protocol "
                                    "and pool.", labels=["frontend", "vip", "port", "protocol",
                                                         "pool"])
        fe_packets = CounterMetricFamily("xlb_frontend_packets", "Packets of the frontend's "
                                         "flows: in from clients, out to them.",
                                         labels=["frontend", "direction"])
        fe_bytes = CounterMetricFamily("xlb_frontend_bytes", "Bytes of the frontend's flows.",
                                       labels=["frontend", "direction"])
        fe_conns = CounterMetricFamily("xlb_frontend_connections", "New flows (connections) "
                                       "balanced.", labels=["frontend"])
        for f in st["frontends"]:
            fe_info.add_metric([f["name"], f["vip"], str(f["port"]), f["protocol"], f["pool"]], 1)
            for direction in ("in", "out"):
                fe_packets.add_metric([f["name"], direction], f[f"packets_{direction}"])
                fe_bytes.add_metric([f["name"], direction], f[f"bytes_{direction}"])
            fe_conns.add_metric([f["name"]], f["new_flows"])
        yield from (fe_info, fe_packets, fe_bytes, fe_conns)

        labels = ["pool", "server"]
        pool_servers = GaugeMetricFamily("xlb_pool_servers", "Servers in the pool.",
                                         labels=["pool"])
        pool_up = GaugeMetricFamily("xlb_pool_servers_up", "Servers of the pool in state up.",
                                    labels=["pool"])
        sv_packets = CounterMetricFamily("xlb_server_packets", "Packets of the server's flows.",
                                         labels=[*labels, "direction"])
        sv_bytes = CounterMetricFamily("xlb_server_bytes", "Bytes of the server's flows.",
                                       labels=[*labels, "direction"])
        sv_conns = CounterMetricFamily("xlb_server_connections", "New flows sent to the server.",
                                       labels=labels)
        sv_active = GaugeMetricFamily("xlb_server_active_flows", "The server's connections in "
                                      "the flow table.", labels=labels)
        sv_up = GaugeMetricFamily("xlb_server_up", "1 if the server's health checks pass (or it "
                                  "is not checked), else 0.", labels=labels)
        sv_state = GaugeMetricFamily("xlb_server_state", "1 for the server's current state: up, "
                                     "down (failed checks), drain or maint.",
                                     labels=[*labels, "state"])
        sv_weight = GaugeMetricFamily("xlb_server_weight", "The server's weight.", labels=labels)
        sv_changes = CounterMetricFamily("xlb_server_health_changes", "Health state changes "
                                         "(up to down and back).", labels=labels)
        durations = self.durations.snapshot()
        sv_check = HistogramMetricFamily("xlb_server_check_duration_seconds", "Duration of the "
                                         "server's health checks.", labels=labels)
        for p in st["pools"]:
            pool_servers.add_metric([p["name"]], len(p["servers"]))
            pool_up.add_metric([p["name"]], sum(s["state"] == "up" for s in p["servers"]))
            for s in p["servers"]:
                lv = [p["name"], s["name"]]
                for direction in ("in", "out"):
                    sv_packets.add_metric([*lv, direction], s[f"packets_{direction}"])
                    sv_bytes.add_metric([*lv, direction], s[f"bytes_{direction}"])
                sv_conns.add_metric(lv, s["new_flows"])
                sv_active.add_metric(lv, s["active_flows"])
                sv_up.add_metric(lv, 1 if s["health"] == "up" else 0)
                for state in STATES:
                    sv_state.add_metric([*lv, state], 1 if s["state"] == state else 0)
                sv_weight.add_metric(lv, s["weight"])
                sv_changes.add_metric(lv, s["health_changes"])
                counts, total = durations.get((p["name"], s["name"]), (None, 0.0))
                if counts is not None:
                    cumulative, buckets = 0, []
                    for bound, n in zip((*CHECK_BUCKETS, float("inf")), counts):
                        cumulative += n
                        buckets.append(("+Inf" if bound == float("inf") else str(bound),
                                        cumulative))
                    sv_check.add_metric(lv, buckets, total)
        yield from (pool_servers, pool_up, sv_packets, sv_bytes, sv_conns, sv_active, sv_up,
                    sv_state, sv_weight, sv_changes, sv_check)

        actions = CounterMetricFamily("xlb_xdp_actions", "Packets by the XDP action taken.",
                                      labels=["action"])
        for action, n in st["actions"].items():
            actions.add_metric([action[4:].lower()], n)
        reasons = CounterMetricFamily("xlb_packets", "Packets by why the program did what it "
                                      "did (see README).", labels=["reason"])
        drops = CounterMetricFamily("xlb_drops", "Packets dropped, by reason.", labels=["reason"])
        for reason, t in st["reasons"].items():
            reasons.add_metric([reason], t["packets"])
            if reason.startswith("drop_"):
                drops.add_metric([reason[5:]], t["packets"])
        yield from (actions, reasons, drops)

        yield _gauge("xlb_flow_table_entries", "Entries in the flow table (two per "
                     "connection).", {}, st["flows"]["entries"])
        yield _gauge("xlb_flow_table_capacity", "Entries the flow table holds.", {},
                     st["flows"]["capacity"])
        yield _gauge("xlb_bpf_map_memory_bytes", "Kernel memory the BPF maps hold.", {},
                     st["map_memory_bytes"])
        applies = CounterMetricFamily("xlb_config_applies", "Config applies, by result.",
                                      labels=["result"])
        for result in ("ok", "error"):
            applies.add_metric([result], st["applies"][result])
        yield applies
        yield _gauge("xlb_config_last_apply_timestamp_seconds", "When the last successful "
                     "apply (or the start) happened, Unix time.", {}, st["last_apply"])


def _gauge(name: str, doc: str, labels: dict, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=list(labels))
    g.add_metric(list(labels.values()), value)
    return g


def serve(balancer, durations: CheckDurations, address: tuple[str, int]):
    """Starts the /metrics endpoint in a thread; returns the server (call .shutdown())."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(XlbCollector(balancer, durations))
    server, _ = start_http_server(address[1], address[0], registry=registry)
    return server
