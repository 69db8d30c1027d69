"""Prometheus metrics, read from the per-CPU BPF counters at scrape time
(through `Balancer.status()`, the same view as `xlb status`); nothing is copied
on a timer. Names follow Prometheus conventions and, where it maps, HAProxy's
exporter vocabulary: frontend, pool (HAProxy's backend), server. README lists
every metric.

The text exposition is written here rather than by prometheus-client's
`generate_latest`: with 10,000 servers a scrape holds some 140,000 samples,
and the library's per-sample objects and label validation take seconds where
a scrape should take a fraction of one. The format is the library's own
text format, under its content type (CONTENT_TYPE_LATEST, whose version
differs between the library's releases); tests parse every scrape with
prometheus-client's parser and compare it with what `generate_latest` writes
for the same families.
"""

from __future__ import annotations

import bisect
import http.server
import io
import socketserver
import sys
import threading
import time
from collections.abc import Mapping
from ipaddress import IPv4Address

from prometheus_client import CONTENT_TYPE_LATEST, ProcessCollector, generate_latest
from prometheus_client.registry import CollectorRegistry

from . import __version__
from . import model
from .netif import LINK_STATES
from .planner import STATES
from .units import quoted

# Check durations: a local TCP connect takes ~0.1 ms, a timeout ends at 1-2 s.
CHECK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_LE = tuple(repr(b) for b in CHECK_BUCKETS) + ("+Inf",)

# name, type, help. Counters are named without _total here; samples get it.
FAMILIES = {
    "xlb_build_info": ("gauge", "xlb's version."),
    "xlb_interface_state": ("gauge", "1 for the current state of each link xlb attached to: "
                                     "up, down (set down or without carrier; keeps the program), "
                                     "gone (deleted) or "
                                     "detached (its program removed or replaced by hand)."),
    "xlb_frontend_info": ("gauge", "A frontend: its VIP, port, protocol and pool."),
    "xlb_frontend_packets": ("counter", "Packets of the frontend's flows: in from clients, "
                                        "out to them."),
    "xlb_frontend_bytes": ("counter", "Bytes of the frontend's flows."),
    "xlb_frontend_connections": ("counter", "New flows (connections) balanced."),
    "xlb_pool_servers": ("gauge", "Servers in the pool."),
    "xlb_pool_servers_up": ("gauge", "Servers of the pool in state up."),
    "xlb_pool_table_info": ("gauge", "A Maglev pool's table as the data path holds it (the "
                                     "servers taking flows): a digest of each slot's server "
                                     "and of the hash that picks the slot (maglev's or "
                                     "source's), the same on every node that sends each flow "
                                     "where this one does; none for a round-robin or weighted "
                                     "pool."),
    "xlb_server_info": ("gauge", "A server of a pool: its address, port and whether it is a "
                                 "backup."),
    "xlb_server_packets": ("counter", "Packets of the server's flows."),
    "xlb_server_bytes": ("counter", "Bytes of the server's flows."),
    "xlb_server_connections": ("counter", "New flows sent to the server."),
    "xlb_server_active_flows": ("gauge", "The server's open connections: established, not "
                                         "closing, not idle past their timeout."),
    "xlb_server_up": ("gauge", "1 if the server's health checks pass (or it is not checked), "
                               "else 0."),
    "xlb_server_state": ("gauge", "1 for the server's current state: up, down (failed checks), "
                                  "drain or maint."),
    "xlb_server_weight": ("gauge", "The server's weight."),
    "xlb_server_health_changes": ("counter", "Health state changes (up to down and back)."),
    "xlb_server_check_duration_seconds": ("histogram", "Duration of the server's health "
                                                       "checks."),
    "xlb_xdp_actions": ("counter", "Packets by the XDP action the program returned (never "
                                   "aborted); a frame sent that the kernel fails to deliver "
                                   "counts as sent."),
    "xlb_packets": ("counter", "Packets by why the program did what it did (see README)."),
    "xlb_drops": ("counter", "Packets dropped, by reason."),
    "xlb_flow_table_entries": ("gauge", "Entries in the flow tables (two per connection)."),
    "xlb_flow_table_capacity": ("gauge", "Entries the flow tables hold."),
    "xlb_flow_table_pressure": ("gauge", "How full each flow table is, 0 to 1: flows (established) "
                                         "and flows_new (half-open)."),
    "xlb_flows": ("gauge", "Connections in the flow tables by state: established, closing, "
                           "half_open."),
    "xlb_flows_created": ("counter", "Connections that entered the half-open table."),
    "xlb_flows_established": ("counter", "Connections that completed their handshake and moved "
                                         "to the established table."),
    "xlb_flows_adopted": ("counter", "Connections another node balanced, taken over at their "
                                     "server's packet (adopt_replies): of xlb_flows_created_total."),
    "xlb_flows_replies_restored": ("counter", "Reply entries the LRU evicted from live established "
                                              "connections, put back by the sweep: evictions "
                                              "that xlb_flows_removed_total does not count."),
    "xlb_flows_removed": ("counter", "Connections that left the flow tables, by reason: expired "
                                     "(idle past their timeout), reopened (a SYN on a closing "
                                     "one, or a SYN or a datagram it never answered on one "
                                     "whose server takes no new flows), ended "
                                     "(by a server's state or a removed frontend), evicted (by "
                                     "the LRU when full, or left out of a smaller table by a "
                                     "restart; derived: a lower bound)."),
    "xlb_bpf_map_memory_bytes": ("gauge", "Kernel memory the BPF maps hold."),
    "xlb_config_applies": ("counter", "Config applies, by result."),
    "xlb_config_last_apply_timestamp_seconds": ("gauge", "When the last successful apply (or "
                                                         "the start) happened, Unix time."),
    "xlb_health_apply_failures": ("counter", "Applies of health changes to the data path "
                                             "that failed (each is tried again)."),
    "xlb_health_unapplied_since_timestamp_seconds": ("gauge", "Since when the data path lacks "
                                                              "the health checks' latest states "
                                                              "(their apply failed), Unix time; "
                                                              "0 while it holds them."),
    "xlb_node_role": ("gauge", "1 for the node's current role: active (answers ARP for the "
                               "VIPs) or backup (silent)."),
    "xlb_bgp_announcing": ("gauge", "1 while the VIP's route is in the announce table (BIRD "
                                    "announces it), else 0; only with --announce-table."),
}


def parse_address(text: str) -> tuple[str, int] | None:
    """ADDR:PORT, or "off" (None). Raises ValueError naming the problem."""
    if text == "off":
        return None
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError(f"{quoted(text)} is not ADDR:PORT or off")
    number = model.parse_port(port)
    addr = model.parse_address(host)
    # 0.0.0.0 (every address) and loopback are a listener's; the others no host
    # has, though Linux lets a TCP socket bind one and listen where nobody can connect.
    if not (addr.is_unspecified or addr.is_loopback) and model.no_host_kind(addr):
        raise ValueError(f"{quoted(host)} is not an address of this host to listen on")
    return host, number


class CheckDurations:
    """Histogram of health-check durations per server, fed by the checker."""

    def __init__(self):
        self._lock = threading.Lock()
        self._data: dict[tuple[str, str], list] = {}   # key -> [bucket counts, sum]

    def observe(self, key: tuple[str, str], seconds: float) -> None:
        """Counts a check of a server tracked; one that an apply has taken out
        meanwhile (the checker hears of it after the apply) is dropped, or
        its histogram would come back, frozen."""
        with self._lock:
            if key not in self._data:
                return
            counts, total = self._data[key]
            counts[bisect.bisect_left(CHECK_BUCKETS, seconds)] += 1
            self._data[key] = [counts, total + seconds]

    def track(self, keys: set, stays: Mapping[tuple[str, str], tuple[str, str]]) -> None:
        """Keeps the histograms of the servers checked now (keys), at zero for
        those new to it: a histogram that appeared only with a first check
        would hide that check from rate() and increase(), and from the
        dashboard until then. The others go: one kept no longer checked would
        stay there, frozen, as if checks still ran. `stays` maps the servers
        tracked until now that stay to their keys now: a renamed server keeps
        its histogram, a moved one (another address) starts anew."""
        with self._lock:
            kept = {stays[k]: v for k, v in self._data.items() if k in stays}
            self._data = {k: kept.get(k, [[0] * len(_LE), 0.0]) for k in keys}

    def snapshot(self) -> dict[tuple[str, str], tuple[list[int], float]]:
        with self._lock:
            return {k: (list(c), s) for k, (c, s) in self._data.items()}


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


def _labels(**labels: str) -> str:
    return ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())


def _num(v: float) -> str:
    return repr(float(v))


# A server's xlb_server_state samples after its labels, by its state: each
# joined after the labels (the "" first puts them before the first), one join a
# server where a call per sample took a quarter of the rendering of 10,000.
_STATE_SAMPLES = {now: ["", *(f',state="{state}"}} {int(state == now)}\n' for state in STATES)]
                  for now in STATES}


def render(st: dict, durations: dict[tuple[str, str], tuple[list[int], float]]) -> str:
    """The text exposition of a status (Balancer.status()) and check durations."""
    out: dict[str, list[str]] = {name: [] for name in FAMILIES}

    def add(family: str, labels: str, value: float, suffix: str = "") -> None:
        kind = FAMILIES[family][0]
        name = family + (suffix or ("_total" if kind == "counter" else ""))
        out[family].append(f"{name}{{{labels}}} {_num(value)}\n" if labels
                           else f"{name} {_num(value)}\n")

    add("xlb_build_info", _labels(version=__version__), 1)
    for i in st["interfaces"]:
        for state in LINK_STATES:
            add("xlb_interface_state", _labels(interface=i["name"], state=state),
                int(i["state"] == state))
    for f in st["frontends"]:
        lv = _labels(frontend=f["name"])
        add("xlb_frontend_info", _labels(frontend=f["name"], vip=f["vip"], port=f["port"],
                                         protocol=f["protocol"], pool=f["pool"]), 1)
        for d in ("in", "out"):
            add("xlb_frontend_packets", f'{lv},direction="{d}"', f[f"packets_{d}"])
            add("xlb_frontend_bytes", f'{lv},direction="{d}"', f[f"bytes_{d}"])
        add("xlb_frontend_connections", lv, f["new_flows"])

    # The bulk of a large scrape: one f-string per server and family, no call per sample.
    sv = {name: out[name] for name in FAMILIES if name.startswith("xlb_server_")}
    served = {f["pool"] for f in st["frontends"]}
    for p in st["pools"]:
        add("xlb_pool_servers", _labels(pool=p["name"]), len(p["servers"]))
        add("xlb_pool_servers_up", _labels(pool=p["name"]),
            sum(s["state"] == "up" for s in p["servers"]))
        if p["name"] in served:    # a ring has no table, but its node is one of the VIP's
            add("xlb_pool_table_info",
                _labels(pool=p["name"], digest=p["table_digest"] or "none"), 1)
        pool = _escape(p["name"])
        for s in p["servers"]:
            lv = f'pool="{pool}",server="{_escape(s["name"])}"'
            sv["xlb_server_info"].append(
                f'xlb_server_info{{{lv},address="{s["address"]}",port="{s["port"]}",'
                f'backup="{str(s["backup"]).lower()}"}} 1\n')
            sv["xlb_server_packets"].append(
                f'xlb_server_packets_total{{{lv},direction="in"}} {s["packets_in"]}\n'
                f'xlb_server_packets_total{{{lv},direction="out"}} {s["packets_out"]}\n')
            sv["xlb_server_bytes"].append(
                f'xlb_server_bytes_total{{{lv},direction="in"}} {s["bytes_in"]}\n'
                f'xlb_server_bytes_total{{{lv},direction="out"}} {s["bytes_out"]}\n')
            sv["xlb_server_connections"].append(
                f"xlb_server_connections_total{{{lv}}} {s['new_flows']}\n")
            sv["xlb_server_active_flows"].append(
                f"xlb_server_active_flows{{{lv}}} {s['active_flows']}\n")
            sv["xlb_server_up"].append(f"xlb_server_up{{{lv}}} {int(s['health'] == 'up')}\n")
            sv["xlb_server_state"].append(
                f"xlb_server_state{{{lv}".join(_STATE_SAMPLES[s["state"]]))
            sv["xlb_server_weight"].append(f"xlb_server_weight{{{lv}}} {s['weight']}\n")
            sv["xlb_server_health_changes"].append(
                f"xlb_server_health_changes_total{{{lv}}} {s['health_changes']}\n")
            counts, total = durations.get((p["name"], s["name"]), (None, 0.0))
            if counts is not None:
                cumulative = 0
                for le, n in zip(_LE, counts):
                    cumulative += n
                    add("xlb_server_check_duration_seconds", f'{lv},le="{le}"', cumulative,
                        "_bucket")
                add("xlb_server_check_duration_seconds", lv, cumulative, "_count")
                add("xlb_server_check_duration_seconds", lv, total, "_sum")

    for action, n in st["actions"].items():
        add("xlb_xdp_actions", _labels(action=action[4:].lower()), n)
    for reason, t in st["reasons"].items():
        add("xlb_packets", _labels(reason=reason), t["packets"])
        if reason.startswith("drop_"):
            add("xlb_drops", _labels(reason=reason[5:]), t["packets"])
    flows = st["flows"]
    add("xlb_flow_table_entries", "", flows["entries"])
    add("xlb_flow_table_capacity", "", flows["capacity"])
    for table, t in flows["tables"].items():
        add("xlb_flow_table_pressure", _labels(table=table), t["entries"] / t["capacity"])
    for state in ("established", "closing", "half_open"):
        add("xlb_flows", _labels(state=state), flows[state])
    add("xlb_flows_created", "", flows["created"])
    add("xlb_flows_established", "", flows["promoted"])
    add("xlb_flows_adopted", "", flows["adopted"])
    add("xlb_flows_replies_restored", "", flows["replies_restored"])
    for reason, n in flows["removed"].items():
        add("xlb_flows_removed", _labels(reason=reason), n)
    add("xlb_bpf_map_memory_bytes", "", st["map_memory_bytes"])
    for result in ("ok", "error"):
        add("xlb_config_applies", _labels(result=result), st["applies"][result])
    add("xlb_config_last_apply_timestamp_seconds", "", st["last_apply"])
    add("xlb_health_apply_failures", "", st["health_applies"]["failed"])
    add("xlb_health_unapplied_since_timestamp_seconds", "",
        st["health_applies"]["unapplied_since"] or 0)
    for role in ("active", "backup"):
        add("xlb_node_role", _labels(role=role), int(st["ha"]["role"] == role))
    if st["ha"]["announce_table"] is not None:
        for vip in sorted({f["vip"] for f in st["frontends"]}, key=IPv4Address):
            add("xlb_bgp_announcing", _labels(vip=vip), int(vip in st["ha"]["announcing"]))

    text = []
    for family, (kind, doc) in FAMILIES.items():
        if out[family]:
            text.append(f"# HELP {family}{'_total' if kind == 'counter' else ''} {doc}\n"
                        f"# TYPE {family}{'_total' if kind == 'counter' else ''} {kind}\n")
            text.extend(out[family])
    return "".join(text)


# A scrape takes a fraction of a second. Each connection costs a thread and a
# descriptor of xlb up, which its health checks need too: one whose request has
# not all come CLIENT_TIMEOUT seconds after its connect, or that takes longer
# to read its answer, is closed; one beyond MAX_CLIENTS at once is closed
# unanswered.
CLIENT_TIMEOUT = 5.0
MAX_CLIENTS = 32


class _RequestReads(io.RawIOBase):
    """A connection's reads, CLIENT_TIMEOUT seconds for them all: with the
    socket's timeout alone, a client that sends its request a byte at a time,
    each in time (a slowloris), held its slot as long as it went on, and
    MAX_CLIENTS such kept every scrape out."""

    def __init__(self, sock, seconds: float):
        self._sock, self._timeout = sock, seconds
        self._until = time.monotonic() + seconds

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self._until - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request took too long to come")
        self._sock.settimeout(left)
        try:
            return self._sock.recv_into(buffer)
        finally:
            self._sock.settimeout(self._timeout)   # the answer's writes have their own


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's backlog is 5: connections beyond it at once waited seconds
    # in the kernel (the SYN-ACK's retries), not served nor closed.
    request_queue_size = MAX_CLIENTS

    def __init__(self, *args, **kw):
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        super().__init__(*args, **kw)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:          # no thread started: nothing else gives the slot back
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address):
        # A scraper that hung up before its answer (its timeout) is no error of
        # xlb's: socketserver printed a traceback on the log for it.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def server_bind(self):
        # HTTPServer.server_bind() looks the host name up (socket.getfqdn), which
        # can stall on DNS in an isolated namespace; /metrics does not need it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


def bind(address: tuple[str, int]) -> _Server:
    """Claims the /metrics address (raises OSError), before `serve` starts answering."""
    return _Server(address, http.server.BaseHTTPRequestHandler)


def serve(server: _Server, balancer, durations: CheckDurations) -> None:
    """Answers /metrics on a bound server, in a thread (stop it with .shutdown())."""
    process = CollectorRegistry(auto_describe=False)   # process_* (CPU, memory, start time)
    ProcessCollector(registry=process)

    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = CLIENT_TIMEOUT

        def setup(self):
            super().setup()
            self.rfile.close()      # the socket's own reader: each read in time, not all
            self.rfile = io.BufferedReader(_RequestReads(self.connection, self.timeout))

        def do_GET(self):
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404, "see /metrics")
                return
            with balancer.lock:     # an apply changes both under it: one apply's servers
                st, checked = balancer.status(), durations.snapshot()
            body = render(st, checked).encode() + generate_latest(process)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):   # scrapes are not events worth a log line
            pass

    server.RequestHandlerClass = Handler
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
