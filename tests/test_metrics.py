"""The /metrics text: what the parser of prometheus-client reads in it, and the
same text as prometheus-client itself would write it. No kernel needed."""

import contextlib
import itertools
import json
import re
import threading
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString
from prometheus_client.parser import text_string_to_metric_families

import xlb
from xlb import metrics

STATUS = {
    "frontends": [
        {"name": "www", "vip": "10.1.1.101", "port": 80, "protocol": "tcp", "pool": "was",
         "packets_in": 21, "packets_out": 15, "bytes_in": 1632, "bytes_out": 1440,
         "new_flows": 3},
        {"name": "dns", "vip": "10.1.1.102", "port": 53, "protocol": "udp", "pool": "was",
         "packets_in": 9, "packets_out": 8, "bytes_in": 700, "bytes_out": 900, "new_flows": 4}],
    # Every number differs between the two servers, so a mix-up cannot pass.
    "pools": [{"name": "was", "table_digest": "5b0f3e2a9c1d4e67", "servers": [
        {"name": "was1", "address": "10.1.11.101", "port": 8080, "backup": False,
         "state": "down", "health": "down", "packets_in": 7, "packets_out": 5, "bytes_in": 544,
         "bytes_out": 480, "new_flows": 3, "active_flows": 1, "weight": 2,
         "health_changes": 4},
        {"name": "was2", "address": "10.1.11.102", "port": 8081, "backup": True,
         "state": "drain", "health": "up", "packets_in": 70, "packets_out": 50,
         "bytes_in": 5440, "bytes_out": 4800, "new_flows": 30, "active_flows": 10,
         "weight": 20, "health_changes": 40}]}],
    "actions": {"XDP_ABORTED": 0, "XDP_DROP": 2, "XDP_PASS": 30, "XDP_TX": 1,
                "XDP_REDIRECT": 0},
    "reasons": {"forward": {"packets": 20, "bytes": 1},
                "drop_malformed": {"packets": 5, "bytes": 3},
                "drop_no_backend": {"packets": 2, "bytes": 2}},
    "flows": {"entries": 6, "capacity": 327680, "connections_capacity": 131072,
              "established": 2, "closing": 1, "half_open": 3,
              "tables": {"flows": {"entries": 4, "capacity": 262144},
                         "flows_new": {"entries": 2, "capacity": 65536}},
              "created": 40, "promoted": 30, "adopted": 5, "replies_restored": 6,
              "removed": {"expired": 11, "reopened": 12, "ended": 13, "evicted": 14}},
    "map_memory_bytes": 31000000, "applies": {"ok": 3, "error": 1}, "last_apply": 1.7e9,
    "health_applies": {"failed": 2, "unapplied_since": 1.8e9,
                       "error": "Could not update table: Operation not permitted"},
    "ha": {"role": "active", "announce_table": 100, "announcing": ["10.1.1.101"]},
    "interfaces": [{"name": "eth0", "ifindex": 2, "mode": "native", "state": "up"},
                   {"name": "eth1", "ifindex": 3, "mode": "generic", "state": "gone"}],
}


def durations():
    d = metrics.CheckDurations()
    d.track({("was", "was1")}, {})
    for seconds in (0.0002, 0.002, 0.002, 3.0):
        d.observe(("was", "was1"), seconds)
    return d.snapshot()


class Answering:
    """A balancer for metrics.serve whose status is STATUS."""
    lock = threading.RLock()

    def status(self):
        return STATUS


@contextlib.contextmanager
def served(balancer, checked=None):
    """metrics.serve of `balancer` on a free port of 127.0.0.1 while the block
    runs; yields the server."""
    server = metrics.bind(("127.0.0.1", 0))
    metrics.serve(server, balancer, metrics.CheckDurations() if checked is None else checked)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def families(text):
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(text):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


class Library:
    """The same families as prometheus-client's own objects, built from STATUS
    independently of metrics.render (README's table of metrics, by hand)."""

    def __init__(self, st, durations):
        self.st, self.durations = st, durations

    def collect(self):
        # xlb leaves out a family without samples (no checked server, say), where
        # the library would write its HELP and TYPE alone.
        return (f for f in self._families() if f.samples)

    def _families(self):
        st = self.st
        yield fam("xlb_build_info", GaugeMetricFamily, ["version"], [([xlb.__version__], 1)])
        yield fam("xlb_interface_state", GaugeMetricFamily, ["interface", "state"],
                  [([i["name"], state], i["state"] == state) for i in st["interfaces"]
                   for state in ("up", "down", "gone", "detached")])
        fes = st["frontends"]
        yield fam("xlb_frontend_info", GaugeMetricFamily,
                  ["frontend", "vip", "port", "protocol", "pool"],
                  [([f["name"], f["vip"], str(f["port"]), f["protocol"], f["pool"]], 1)
                   for f in fes])
        for what in ("packets", "bytes"):
            yield fam(f"xlb_frontend_{what}", CounterMetricFamily, ["frontend", "direction"],
                      [([f["name"], d], f[f"{what}_{d}"]) for f in fes for d in ("in", "out")])
        yield fam("xlb_frontend_connections", CounterMetricFamily, ["frontend"],
                  [([f["name"]], f["new_flows"]) for f in fes])
        pools = st["pools"]
        yield fam("xlb_pool_servers", GaugeMetricFamily, ["pool"],
                  [([p["name"]], len(p["servers"])) for p in pools])
        yield fam("xlb_pool_servers_up", GaugeMetricFamily, ["pool"],
                  [([p["name"]], sum(s["state"] == "up" for s in p["servers"])) for p in pools])
        served = {f["pool"] for f in fes}
        yield fam("xlb_pool_table_info", GaugeMetricFamily, ["pool", "digest"],
                  [([p["name"], p["table_digest"] or "none"], 1) for p in pools
                   if p["name"] in served])
        servers = [(p["name"], s) for p in pools for s in p["servers"]]
        ps = ["pool", "server"]
        yield fam("xlb_server_info", GaugeMetricFamily, ps + ["address", "port", "backup"],
                  [([p, s["name"], s["address"], str(s["port"]), str(s["backup"]).lower()], 1)
                   for p, s in servers])
        for what in ("packets", "bytes"):
            yield fam(f"xlb_server_{what}", CounterMetricFamily, ps + ["direction"],
                      [([p, s["name"], d], s[f"{what}_{d}"]) for p, s in servers
                       for d in ("in", "out")])
        yield fam("xlb_server_connections", CounterMetricFamily, ps,
                  [([p, s["name"]], s["new_flows"]) for p, s in servers])
        yield fam("xlb_server_active_flows", GaugeMetricFamily, ps,
                  [([p, s["name"]], s["active_flows"]) for p, s in servers])
        yield fam("xlb_server_up", GaugeMetricFamily, ps,
                  [([p, s["name"]], s["health"] == "up") for p, s in servers])
        yield fam("xlb_server_state", GaugeMetricFamily, ps + ["state"],
                  [([p, s["name"], state], s["state"] == state) for p, s in servers
                   for state in ("up", "down", "drain", "maint")])
        yield fam("xlb_server_weight", GaugeMetricFamily, ps,
                  [([p, s["name"]], s["weight"]) for p, s in servers])
        yield fam("xlb_server_health_changes", CounterMetricFamily, ps,
                  [([p, s["name"]], s["health_changes"]) for p, s in servers])
        name = "xlb_server_check_duration_seconds"
        hist = HistogramMetricFamily(name, metrics.FAMILIES[name][1], labels=ps)
        for p, s in servers:
            if (p, s["name"]) in self.durations:
                counts, total = self.durations[(p, s["name"])]
                les = [floatToGoString(b) for b in metrics.CHECK_BUCKETS] + ["+Inf"]
                hist.add_metric([p, s["name"]], list(zip(les, itertools.accumulate(counts))),
                                total)
        yield hist
        yield fam("xlb_xdp_actions", CounterMetricFamily, ["action"],
                  [([a[len("XDP_"):].lower()], n) for a, n in st["actions"].items()])
        yield fam("xlb_packets", CounterMetricFamily, ["reason"],
                  [([r], t["packets"]) for r, t in st["reasons"].items()])
        yield fam("xlb_drops", CounterMetricFamily, ["reason"],
                  [([r[len("drop_"):]], t["packets"]) for r, t in st["reasons"].items()
                   if r.startswith("drop_")])
        yield fam("xlb_flow_table_entries", GaugeMetricFamily, [], [([], st["flows"]["entries"])])
        yield fam("xlb_flow_table_capacity", GaugeMetricFamily, [],
                  [([], st["flows"]["capacity"])])
        yield fam("xlb_flow_table_pressure", GaugeMetricFamily, ["table"],
                  [([t], v["entries"] / v["capacity"]) for t, v in st["flows"]["tables"].items()])
        yield fam("xlb_flows", GaugeMetricFamily, ["state"],
                  [([k], st["flows"][k]) for k in ("established", "closing", "half_open")])
        yield fam("xlb_flows_created", CounterMetricFamily, [], [([], st["flows"]["created"])])
        yield fam("xlb_flows_established", CounterMetricFamily, [],
                  [([], st["flows"]["promoted"])])
        yield fam("xlb_flows_adopted", CounterMetricFamily, [], [([], st["flows"]["adopted"])])
        yield fam("xlb_flows_replies_restored", CounterMetricFamily, [],
                  [([], st["flows"]["replies_restored"])])
        yield fam("xlb_flows_removed", CounterMetricFamily, ["reason"],
                  [([r], n) for r, n in st["flows"]["removed"].items()])
        yield fam("xlb_bpf_map_memory_bytes", GaugeMetricFamily, [],
                  [([], st["map_memory_bytes"])])
        yield fam("xlb_config_applies", CounterMetricFamily, ["result"],
                  [([r], st["applies"][r]) for r in ("ok", "error")])
        yield fam("xlb_config_last_apply_timestamp_seconds", GaugeMetricFamily, [],
                  [([], st["last_apply"])])
        yield fam("xlb_health_apply_failures", CounterMetricFamily, [],
                  [([], st["health_applies"]["failed"])])
        yield fam("xlb_health_unapplied_since_timestamp_seconds", GaugeMetricFamily, [],
                  [([], st["health_applies"]["unapplied_since"] or 0)])
        yield fam("xlb_node_role", GaugeMetricFamily, ["role"],
                  [([r], st["ha"]["role"] == r) for r in ("active", "backup")])
        if st["ha"]["announce_table"] is not None:
            yield fam("xlb_bgp_announcing", GaugeMetricFamily, ["vip"],
                      [([v], v in st["ha"]["announcing"])
                       for v in sorted({f["vip"] for f in st["frontends"]})])


def fam(name, cls, labels, rows):
    f = cls(name, metrics.FAMILIES[name][1], labels=labels)
    for values, value in rows:
        f.add_metric(values, float(value))
    return f


LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def normalized(text: str) -> list[str]:
    """The lines of an exposition with each sample's labels sorted (the library
    sorts them, xlb writes them in a fixed order) and its value read as a float
    (xlb writes 3.0 where the library writes 3); everything else as written."""
    out = []
    for line in text.splitlines():
        if not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            name, _, labels = series.partition("{")
            labels = ",".join(sorted(f'{k}="{v}"' for k, v in LABEL.findall(labels)))
            line = f"{name}{{{labels}}} {float(value)!r}"
        out.append(line)
    return out


def test_the_exposition_is_what_the_library_writes():
    """Line by line, HELP and TYPE included, what generate_latest writes for the
    same families; nothing more, nothing less."""
    text = metrics.render(STATUS, durations())
    expected = generate_latest(Library(STATUS, durations())).decode()
    assert normalized(text) == normalized(expected)


def test_the_library_reads_what_it_would_write():
    text = metrics.render(STATUS, durations())

    class Parsed:
        def collect(self):
            return text_string_to_metric_families(text)

    again = generate_latest(Parsed()).decode()
    assert samples(again) == samples(text)
    assert {n: f.type for n, f in families(again).items()} == \
        {n: f.type for n, f in families(text).items()}


def test_values_and_types():
    fams = families(metrics.render(STATUS, durations()))
    assert set(fams) == {name for name in metrics.FAMILIES}   # every family is written
    types = {n: f.type for n, f in fams.items()}
    assert {n for n, t in types.items() if t == "counter"} == {
        "xlb_frontend_packets", "xlb_frontend_bytes", "xlb_frontend_connections",
        "xlb_server_packets", "xlb_server_bytes", "xlb_server_connections",
        "xlb_server_health_changes", "xlb_xdp_actions", "xlb_packets", "xlb_drops",
        "xlb_config_applies", "xlb_health_apply_failures", "xlb_flows_created",
        "xlb_flows_established", "xlb_flows_adopted", "xlb_flows_replies_restored",
        "xlb_flows_removed"}
    assert {n for n, t in types.items() if t == "histogram"} == {
        "xlb_server_check_duration_seconds"}
    got = samples(metrics.render(STATUS, durations()))
    www, dns = (("frontend", "www"),), (("frontend", "dns"),)
    assert got[("xlb_build_info", (("version", xlb.__version__),))] == 1
    assert {(i, state) for (name, labels), v in got.items() if name == "xlb_interface_state"
            and v == 1 for (_, i), (_, state) in [labels]} == {("eth0", "up"), ("eth1", "gone")}
    assert got[("xlb_frontend_info", www + (("pool", "was"), ("port", "80"),
                                            ("protocol", "tcp"), ("vip", "10.1.1.101")))] == 1
    assert got[("xlb_frontend_info", dns + (("pool", "was"), ("port", "53"),
                                            ("protocol", "udp"), ("vip", "10.1.1.102")))] == 1
    assert got[("xlb_frontend_packets_total", (("direction", "in"),) + www)] == 21
    assert got[("xlb_frontend_packets_total", (("direction", "out"),) + dns)] == 8
    assert got[("xlb_frontend_bytes_total", (("direction", "out"),) + www)] == 1440
    assert got[("xlb_frontend_bytes_total", (("direction", "in"),) + dns)] == 700
    assert got[("xlb_frontend_connections_total", www)] == 3
    assert got[("xlb_frontend_connections_total", dns)] == 4
    assert got[("xlb_pool_servers", (("pool", "was"),))] == 2
    assert got[("xlb_pool_servers_up", (("pool", "was"),))] == 0   # down, and drain
    assert got[("xlb_pool_table_info", (("digest", "5b0f3e2a9c1d4e67"), ("pool", "was")))] == 1
    one = (("pool", "was"), ("server", "was1"))
    two = (("pool", "was"), ("server", "was2"))
    assert got[("xlb_server_info", (("address", "10.1.11.101"), ("backup", "false"),
                                    ("pool", "was"), ("port", "8080"), ("server", "was1")))] == 1
    assert got[("xlb_server_info", (("address", "10.1.11.102"), ("backup", "true"),
                                    ("pool", "was"), ("port", "8081"), ("server", "was2")))] == 1
    assert got[("xlb_server_packets_total", (("direction", "in"),) + one)] == 7
    assert got[("xlb_server_packets_total", (("direction", "out"),) + two)] == 50
    assert got[("xlb_server_bytes_total", (("direction", "out"),) + one)] == 480
    assert got[("xlb_server_bytes_total", (("direction", "in"),) + two)] == 5440
    assert got[("xlb_server_connections_total", one)] == 3
    assert got[("xlb_server_connections_total", two)] == 30
    assert got[("xlb_server_active_flows", one)] == 1
    assert got[("xlb_server_active_flows", two)] == 10
    assert got[("xlb_server_up", one)] == 0 and got[("xlb_server_up", two)] == 1
    assert {state: got[("xlb_server_state", two + (("state", state),))]
            for state in ("up", "down", "drain", "maint")} == \
        {"up": 0, "down": 0, "drain": 1, "maint": 0}
    assert got[("xlb_server_state", one + (("state", "down"),))] == 1
    assert got[("xlb_server_weight", one)] == 2 and got[("xlb_server_weight", two)] == 20
    assert got[("xlb_server_health_changes_total", one)] == 4
    assert got[("xlb_server_health_changes_total", two)] == 40
    assert got[("xlb_server_check_duration_seconds_bucket", (("le", "0.0005"),) + one)] == 1
    assert got[("xlb_server_check_duration_seconds_bucket", (("le", "0.0025"),) + one)] == 3
    assert got[("xlb_server_check_duration_seconds_bucket", (("le", "+Inf"),) + one)] == 4
    assert got[("xlb_server_check_duration_seconds_count", one)] == 4
    assert got[("xlb_server_check_duration_seconds_sum", one)] == pytest.approx(3.0042)
    # unchecked servers have no histogram
    assert ("xlb_server_check_duration_seconds_count", two) not in got
    assert {dict(k)["action"]: v for (n, k), v in got.items() if n == "xlb_xdp_actions_total"} \
        == {"aborted": 0, "drop": 2, "pass": 30, "tx": 1, "redirect": 0}
    assert {dict(k)["reason"]: v for (n, k), v in got.items() if n == "xlb_packets_total"} \
        == {"forward": 20, "drop_malformed": 5, "drop_no_backend": 2}
    assert {dict(k)["reason"]: v for (n, k), v in got.items() if n == "xlb_drops_total"} \
        == {"malformed": 5, "no_backend": 2}
    assert got[("xlb_flow_table_entries", ())] == 6
    assert got[("xlb_flow_table_capacity", ())] == 327680
    assert got[("xlb_flow_table_pressure", (("table", "flows"),))] == 4 / 262144
    assert got[("xlb_flow_table_pressure", (("table", "flows_new"),))] == 2 / 65536
    assert {dict(k)["state"]: v for (n, k), v in got.items() if n == "xlb_flows"} \
        == {"established": 2, "closing": 1, "half_open": 3}
    assert got[("xlb_flows_created_total", ())] == 40
    assert got[("xlb_flows_established_total", ())] == 30
    assert got[("xlb_flows_adopted_total", ())] == 5
    assert got[("xlb_flows_replies_restored_total", ())] == 6
    assert {dict(k)["reason"]: v for (n, k), v in got.items() if n == "xlb_flows_removed_total"} \
        == {"expired": 11, "reopened": 12, "ended": 13, "evicted": 14}
    assert got[("xlb_bpf_map_memory_bytes", ())] == 31000000
    assert got[("xlb_config_applies_total", (("result", "ok"),))] == 3
    assert got[("xlb_config_applies_total", (("result", "error"),))] == 1
    assert got[("xlb_config_last_apply_timestamp_seconds", ())] == 1.7e9
    assert got[("xlb_health_apply_failures_total", ())] == 2
    assert got[("xlb_health_unapplied_since_timestamp_seconds", ())] == 1.8e9


def test_a_data_path_that_holds_the_health_states_lags_since_zero():
    """0, not absent: an alert or a panel reads it alike on every instance."""
    holds = {**STATUS, "health_applies": {"failed": 2, "unapplied_since": None, "error": None}}
    got = samples(metrics.render(holds, {}))
    assert got[("xlb_health_unapplied_since_timestamp_seconds", ())] == 0
    assert got[("xlb_health_apply_failures_total", ())] == 2
    assert normalized(metrics.render(holds, {})) == \
        normalized(generate_latest(Library(holds, {})).decode())


def test_a_pool_without_a_table_reports_none_where_it_serves_a_frontend():
    """A round-robin pool has no table, but its node must still count among
    the nodes serving the VIP (a peer on Maglev holds one: XlbMaglevTablesDiffer
    fires); a pool that serves no frontend shares no flows with anyone."""
    ring = {**STATUS["pools"][0], "table_digest": None}
    idle = {**ring, "name": "idle"}
    status = {**STATUS, "pools": [ring, idle]}
    text = metrics.render(status, {})
    got = samples(text)
    assert got[("xlb_pool_table_info", (("digest", "none"), ("pool", "was")))] == 1
    assert [k for k in got if k[0] == "xlb_pool_table_info"] == \
        [("xlb_pool_table_info", (("digest", "none"), ("pool", "was")))]
    assert normalized(text) == normalized(generate_latest(Library(status, {})).decode())


def test_label_values_are_escaped():
    name = 'a"b\\c\nd'
    pool = STATUS["pools"][0]
    status = {**STATUS, "frontends": [{**STATUS["frontends"][0], "name": name,
                                       "pool": "p" + name}],
              "pools": [{**pool, "name": "p" + name, "servers": [{**pool["servers"][0],
                                                                    "name": "s" + name}]}]}
    text = metrics.render(status, {})
    got = samples(text)
    assert got[("xlb_pool_table_info", (("digest", "5b0f3e2a9c1d4e67"), ("pool", "p" + name)))] == 1
    assert got[("xlb_frontend_connections_total", (("frontend", name),))] == 3
    assert got[("xlb_server_weight", (("pool", "p" + name), ("server", "s" + name)))] == 2
    assert normalized(text) == normalized(generate_latest(Library(status, {})).decode())


@pytest.mark.parametrize("text,expected", [
    ("off", None), ("127.0.0.1:9717", ("127.0.0.1", 9717)), ("0.0.0.0:1", ("0.0.0.0", 1)),
    ("127.0.0.1:65535", ("127.0.0.1", 65535))])
def test_parse_address(text, expected):
    assert metrics.parse_address(text) == expected


@pytest.mark.parametrize("text,problem", [
    *((t, f"{t!r} is not ADDR:PORT or off") for t in ("9717", "")),
    # the port as --vip's (model.parse_port)
    ("1.2.3.4:0", "port 0 is out of range 1-65535"),
    ("1.2.3.4:70000", "port 70000 is out of range 1-65535"),
    ("1.2.3.4:x", "port 'x' is not a number"), ("1.2.3.4:\u00b2", "port '\u00b2' is not a number"),
    ("1.2.3.4:09717", "port '09717' has a leading zero"),
    ("1.2.3.4:" + "9" * 4301, f"port {'9' * 60}... (4,301 characters) is out of range 1-65535"),
    ("localhost:9717", "'localhost' is not an IPv4 address"),
    *((t, f"{t.split(':')[0]!r} is not an address of this host to listen on")
      for t in ("224.0.0.1:9717", "255.255.255.255:9717", "240.0.0.1:9717"))])
def test_parse_address_errors(text, problem):
    """Each refused for its own reason (any ValueError, int()'s too, passed before)."""
    with pytest.raises(ValueError) as e:
        metrics.parse_address(text)
    assert str(e.value) == problem


def test_check_durations_track_the_servers_checked_now():
    d = metrics.CheckDurations()
    d.track({("was", "was1"), ("was", "gone")}, {})
    d.observe(("was", "was1"), 0.002)
    d.observe(("was", "gone"), 0.002)
    d.track({("was", "was1"), ("was", "was2")}, {("was", "was1"): ("was", "was1")})
    d.observe(("was", "gone"), 0.002)       # a check that ended after its server went
    snap = d.snapshot()
    assert set(snap) == {("was", "was1"), ("was", "was2")}
    assert snap[("was", "was2")] == ([0] * (len(metrics.CHECK_BUCKETS) + 1), 0.0)
    assert sum(snap[("was", "was1")][0]) == 1
    got = samples(metrics.render(STATUS, snap))
    two = (("pool", "was"), ("server", "was2"))
    assert got[("xlb_server_check_duration_seconds_count", two)] == 0
    assert got[("xlb_server_check_duration_seconds_bucket", (("le", "+Inf"),) + two)] == 0


def test_check_durations_a_renamed_server_keeps_its_histogram_a_moved_one_starts_anew():
    """track's `stays`: a server renamed at its address goes on with its checks
    so far; one at another address (the same name) is a new server's."""
    d = metrics.CheckDurations()
    d.track({("was", "was1"), ("was", "moved")}, {})
    d.observe(("was", "was1"), 0.002)
    d.observe(("was", "moved"), 0.002)
    d.track({("was", "www1"), ("was", "moved")}, {("was", "was1"): ("was", "www1")})
    snap = d.snapshot()
    assert set(snap) == {("was", "www1"), ("was", "moved")}
    assert (sum(snap[("was", "www1")][0]), snap[("was", "www1")][1]) == (1, 0.002)
    assert snap[("was", "moved")] == ([0] * (len(metrics.CHECK_BUCKETS) + 1), 0.0)


def test_a_check_as_long_as_a_bucket_bound_counts_in_that_bucket():
    """Prometheus' `le`: a duration equal to a bound is in that bound's bucket."""
    d = metrics.CheckDurations()
    d.track({("was", "was1")}, {})
    d.observe(("was", "was1"), 0.001)
    got = samples(metrics.render(STATUS, d.snapshot()))
    one = (("pool", "was"), ("server", "was1"))
    assert [got[("xlb_server_check_duration_seconds_bucket", (("le", le),) + one)]
            for le in ("0.0005", "0.001")] == [0, 1]


def test_dashboard_and_alerts_name_the_metrics_xlb_serves():
    """The dashboard and the alert rules read no metric that xlb does not write."""
    root = Path(__file__).resolve().parent.parent
    scraped = {name + ("_total" if kind == "counter" else "")
               for name, (kind, _) in metrics.FAMILIES.items()}
    histograms = [name for name, (kind, _) in metrics.FAMILIES.items() if kind == "histogram"]
    series = scraped | {h + s for h in histograms for s in ("_bucket", "_count", "_sum")}
    for path in ("metrics/xlb-dashboard.json", "metrics/alerts.yml", "metrics/alerts_test.yml"):
        assert set(re.findall(r"\bxlb_\w+", (root / path).read_text())) <= series, path


def test_readmes_table_of_reasons_is_the_programs():
    """README's table of reasons (the values of xlb_packets_total's label)
    lists each reason of bpf/xlb_shared.h once, with its XDP action."""
    from xlb import layout
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme[readme.index("| reason | action | when |"):]
    documented = []
    for row in table[:table.index("\n\n")].splitlines()[2:]:
        names, actions = (cell.strip() for cell in row.split("|")[1:3])
        names, actions = re.findall(r"`(\w+)`", names), actions.split(", ")
        documented += zip(names, actions * len(names) if len(actions) == 1 else actions)
    assert sorted(documented) == sorted(
        (name, action.removeprefix("XDP_"))
        for name, action in zip(layout.REASON_NAMES, layout.REASON_ACTIONS))


def series_labels() -> dict[str, set[str]]:
    """The label names of each series name xlb writes (a histogram's _bucket has le)."""
    labels: dict[str, set[str]] = {}
    for f in families(metrics.render(STATUS, durations())).values():
        for s in f.samples:
            labels.setdefault(s.name, set()).update(s.labels)
    return labels


def test_readmes_table_lists_every_metric_with_its_type_and_labels():
    """README's table of metrics: every family, as scraped (counters with
    _total), with its type and label names (`{...}`: those of the name before
    it in its row), as xlb writes them."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme[readme.index("| metric | type | what |"):]
    rows = table[:table.index("\n\n")].splitlines()[2:]
    written = {f.name + ("_total" if f.type == "counter" else ""):
               set().union(*(s.labels for s in f.samples)) - {"le"}
               for f in families(metrics.render(STATUS, durations())).values()}
    assert len(written) == len(metrics.FAMILIES)        # STATUS has every family
    documented = {}
    for row in rows:
        names, kind = (cell.strip() for cell in row.split("|")[1:3])
        before = None
        for name, labels in re.findall(r"`(xlb_\w+)(?:\{([^}]*)\})?`", names):
            before = before if labels == "..." else set(filter(None, labels.split(",")))
            documented[name] = before
            family = name.removesuffix("_total") if kind == "counter" else name
            assert metrics.FAMILIES[family][0] == kind, name
    assert documented == written


def test_readmes_table_names_every_value_of_a_label():
    """README's table of metrics names, in each metric's row, every value
    that its state, table, role, result, action or reason label takes (every
    drop reason of the program; xlb_packets_total's reasons have a table of
    their own, above)."""
    from xlb import layout
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme[readme.index("| metric | type | what |"):]
    what = {name: row.split("|")[3]
            for row in table[:table.index("\n\n")].splitlines()[2:]
            for name in re.findall(r"`(xlb_\w+)", row.split("|")[1])}
    values: dict[str, set[str]] = {
        "xlb_drops_total": {r[5:] for r in layout.REASON_NAMES if r.startswith("drop_")}}
    for f in families(metrics.render(STATUS, durations())).values():
        for s in f.samples:
            for label in {"state", "table", "role", "result", "action", "reason"} & set(s.labels):
                values.setdefault(s.name, set()).add(s.labels[label])
    del values["xlb_packets_total"]
    missing = {name: sorted(v for v in vs if not re.search(rf"\b{v}\b", what[name]))
               for name, vs in values.items()}
    assert {name: vs for name, vs in missing.items() if vs} == {}


def targets(node):
    """The Prometheus queries of a dashboard JSON, wherever they are nested."""
    if isinstance(node, dict):
        if "expr" in node:
            yield node
        node = list(node.values())
    for item in node if isinstance(node, list) else ():
        yield from targets(item)


def test_dashboard_and_alerts_use_labels_their_metrics_have():
    """Every label a dashboard query or an alert rule selects, groups or
    matches by, or names in a legend or an annotation, is one that the xlb
    metrics it reads carry (or Prometheus' own job and instance)."""
    root = Path(__file__).resolve().parent.parent
    labels = series_labels()
    dashboard = json.loads((root / "metrics" / "xlb-dashboard.json").read_text())
    queries = [t["expr"] + " " + t.get("legendFormat", "") for t in targets(dashboard)]
    rules = (root / "metrics" / "alerts.yml").read_text().split("- alert:")[1:]
    assert len(queries) >= 17 and len(rules) == 10
    for text in queries + rules:
        have = {"job", "instance"}.union(*(labels[m] for m in re.findall(r"\bxlb_\w+", text)))
        groupings = re.findall(r"\b(?:by|on|without|ignoring|group_left|group_right)\s*"
                               r"\(([^)]*)\)", text)
        selectors = re.findall(r"\bxlb_\w+\{([^}]*)\}", text)
        used = {label for g in groupings for label in re.findall(r"\w+", g)}
        used |= {label for s in selectors for label in re.findall(r"(\w+)\s*[=!]~?", s)}
        used |= set(re.findall(r"\{\{(\w+)\}\}", text))          # a legend's
        used |= set(re.findall(r"\$labels\.(\w+)", text))        # an annotation's
        assert used <= have, (sorted(used - have), text)


def test_metrics_is_answered_with_a_query_and_no_other_path_is():
    """A scrape config's `params` come as a query (/metrics?x=y): the same
    answer; another path is 404."""
    import urllib.error
    import urllib.request

    with served(Answering()) as server:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        scraped = urllib.request.urlopen(url + "/metrics?module=xlb", timeout=10).read().decode()
        assert "xlb_build_info" in scraped
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "/metric", timeout=10)
        assert e.value.code == 404


def test_a_scraper_that_hangs_up_before_its_answer_leaves_no_traceback(capfd):
    """A scrape given up (a scraper's timeout) broke the answer's write, and the
    HTTP server printed a traceback on xlb up's log."""
    import socket
    import struct
    import time

    asked, gone = threading.Event(), threading.Event()

    class Balancer:
        lock = threading.RLock()

        def status(self):
            asked.set()
            gone.wait(10)
            return STATUS

    with served(Balancer()) as server:
        with socket.create_connection(server.server_address[:2]) as s:
            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            assert asked.wait(10)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        gone.set()                      # closed with a reset: the answer's write fails
        deadline = time.monotonic() + 10
        while server._slots._value < metrics.MAX_CLIENTS and time.monotonic() < deadline:
            time.sleep(0.01)            # the request's thread gives its slot back last
        assert server._slots._value == metrics.MAX_CLIENTS
    assert "Traceback" not in capfd.readouterr().err


def test_the_listener_queues_as_many_connections_as_it_serves_at_once():
    """The listen backlog was socketserver's 5: of MAX_CLIENTS + 1 connections
    made at once, most waited in the kernel for the SYN-ACK's retries (seconds),
    and the one beyond MAX_CLIENTS was not closed at once, as README says."""
    import subprocess

    with served(Answering()) as server:
        port = server.server_address[1]
        out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True,
                             text=True, check=True).stdout.split()
    backlog = int(out[2])       # State Recv-Q Send-Q: a listener's Send-Q is its backlog
    assert backlog >= metrics.MAX_CLIENTS


def test_clients_that_trickle_their_request_do_not_keep_scrapes_out(monkeypatch):
    """MAX_CLIENTS connections that each send a byte of their request less than
    CLIENT_TIMEOUT apart (a slowloris: any local user, on the default address)
    held every slot for as long as they went on: each scrape was closed
    unanswered. A request has CLIENT_TIMEOUT in all to arrive."""
    import socket
    import time
    import urllib.error
    import urllib.request

    monkeypatch.setattr(metrics, "CLIENT_TIMEOUT", 3.0)
    slow: list[socket.socket] = []
    held, stop = threading.Event(), threading.Event()

    with served(Answering()) as server:
        def trickle():
            while not stop.wait(0.05):       # a byte each, well within CLIENT_TIMEOUT
                # A few a round, as clients come.
                for _ in range(min(4, metrics.MAX_CLIENTS - len(slow))):
                    slow.append(socket.create_connection(server.server_address[:2]))
                    slow[-1].sendall(b"GET /metrics HTTP/1.0\r\n")
                if len(slow) == metrics.MAX_CLIENTS and server._slots._value == 0:
                    held.set()
                for s in slow:
                    try:
                        s.send(b"X")
                    except OSError:             # closed by the server: what a fix does
                        pass

        trickling = threading.Thread(target=trickle)
        trickling.start()
        try:
            assert held.wait(30)
            url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
            deadline, answered = time.monotonic() + 10 * metrics.CLIENT_TIMEOUT, None
            while answered is None and time.monotonic() < deadline:
                try:
                    answered = urllib.request.urlopen(url, timeout=5).read()
                except (urllib.error.URLError, ConnectionError):
                    time.sleep(0.05)
            assert answered is not None and b"xlb_server_up" in answered
        finally:
            stop.set()
            trickling.join()
            for s in slow:
                s.close()


def test_a_scrape_during_an_apply_has_the_histograms_of_the_servers_it_shows():
    """An apply that renamed servers between the scrape's status and its look at
    the check durations left a server shown without its histogram, and its
    new name's count went unseen: both are read under the balancer's lock."""
    import urllib.request

    class Lock:
        """An RLock that tells when another thread had to wait for it."""
        def __init__(self):
            self._lock, self.waited = threading.RLock(), threading.Event()

        def __enter__(self):
            if not self._lock.acquire(blocking=False):
                self.waited.set()
                self._lock.acquire()

        def __exit__(self, *exc):
            self._lock.release()

    checked = metrics.CheckDurations()
    checked.track({("was", "was1"), ("was", "was2")}, {})

    def rename():                       # as Balancer.apply changes them, under its lock
        with balancer.lock:
            checked.track({("was", "www1"), ("was", "was2")}, {("was", "was1"): ("was", "www1")})

    class Balancer:
        lock = Lock()

        def status(self):
            with self.lock:
                st = STATUS
            applying = threading.Thread(target=rename)
            applying.start()
            while applying.is_alive() and not self.lock.waited.wait(0.01):
                pass
            return st

    balancer = Balancer()
    with served(balancer, checked) as server:
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        text = urllib.request.urlopen(url, timeout=30).read().decode()
    histograms = {(s.labels["pool"], s.labels["server"]) for s in
                  families(text)["xlb_server_check_duration_seconds"].samples}
    assert histograms == {("was", "was1"), ("was", "was2")}


def test_a_link_without_carrier_reads_down(monkeypatch):
    """xlb_interface_state (and status, top) show each link as the kernel has
    it: one set up whose carrier is gone (a cable pulled, a switch port down,
    a veth whose peer is down), which `ip link` shows NO-CARRIER, state DOWN,
    and for which the link watch takes its servers down ("lost its carrier"),
    is down, not up. No kernel: the links and the program are stubbed."""
    datapath = pytest.importorskip("xlb.datapath")
    from xlb import netif

    def link(index, name, up, carrier):
        return netif.Link(index=index, name=name, mac=b"\0" * 6, up=up, loopback=False,
                          addresses=(), xdp_prog_id=7, xdp_mode="native", carrier=carrier)

    monkeypatch.setattr(netif, "links", lambda: [link(2, "eth0", True, True),
                                                 link(3, "eth1", True, False),
                                                 link(4, "eth2", False, False)])
    monkeypatch.setattr(datapath.bpfsys, "prog_info", lambda fd: type("Info", (), {"id": 7}))
    dp = object.__new__(datapath.Datapath)
    dp._prog = type("Prog", (), {"fd": 5})
    dp._attached = {i: (5, datapath.Attachment(i, name, "native"))
                    for i, name in ((2, "eth0"), (3, "eth1"), (4, "eth2"))}
    states = {a.ifname: a.state for a in dp.attachments()}
    assert states == {"eth0": "up", "eth1": "down", "eth2": "down"}
    st = {**STATUS, "interfaces": [{"name": a.ifname, "ifindex": a.ifindex, "mode": a.mode,
                                    "state": a.state} for a in dp.attachments()]}
    assert 'xlb_interface_state{interface="eth1",state="down"} 1.0' in metrics.render(st, {})
