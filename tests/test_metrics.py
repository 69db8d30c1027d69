"""The /metrics text: what the parser of prometheus-client reads in it, and the
same text as prometheus-client itself would write it. No kernel needed."""

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from xlb import metrics

SERVER = {"address": "10.1.11.101", "port": 8080, "backup": False, "packets_in": 7, "packets_out": 5, "bytes_in": 544, "bytes_out": 480, "new_flows": 3,
          "active_flows": 1, "weight": 2, "health_changes": 4}
STATUS = {
    "frontends": [{"name": "www", "vip": "10.1.1.101", "port": 80, "protocol": "tcp",
                   "pool": "was", "packets_in": 21, "packets_out": 15, "bytes_in": 1632,
                   "bytes_out": 1440, "new_flows": 3}],
    "pools": [{"name": "was", "servers": [
        {**SERVER, "name": "was1", "state": "up", "health": "up"},
        {**SERVER, "name": "was2", "state": "drain", "health": "down"}]}],
    "actions": {"XDP_ABORTED": 0, "XDP_DROP": 2, "XDP_PASS": 30, "XDP_TX": 1,
                "XDP_REDIRECT": 0},
    "reasons": {"forward": {"packets": 20, "bytes": 1}, "drop_no_backend": {"packets": 2,
                                                                             "bytes": 2}},
    "flows": {"entries": 6, "capacity": 262144},
    "map_memory_bytes": 31000000, "applies": {"ok": 3, "error": 1}, "last_apply": 1.7e9,
}


def durations():
    d = metrics.CheckDurations()
    for seconds in (0.0002, 0.002, 0.002, 3.0):
        d.observe(("was", "was1"), seconds)
    return d.snapshot()


def families(text):
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(text):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


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
    assert fams["xlb_server_connections"].type == "counter"
    assert fams["xlb_server_check_duration_seconds"].type == "histogram"
    got = samples(metrics.render(STATUS, durations()))
    srv = (("pool", "was"), ("server", "was2"))
    assert got[("xlb_server_connections_total", srv)] == 3
    assert got[("xlb_server_packets_total", (("direction", "out"),) + srv)] == 5
    assert got[("xlb_server_up", srv)] == 0
    assert got[("xlb_server_info", (("address", "10.1.11.101"), ("backup", "false"),
                                    ("pool", "was"), ("port", "8080"), ("server", "was2")))] == 1
    assert got[("xlb_server_state", srv + (("state", "drain"),))] == 1
    assert got[("xlb_server_state", srv + (("state", "up"),))] == 0
    assert got[("xlb_pool_servers_up", (("pool", "was"),))] == 1
    assert got[("xlb_frontend_connections_total", (("frontend", "www"),))] == 3
    assert got[("xlb_drops_total", (("reason", "no_backend"),))] == 2
    assert got[("xlb_xdp_actions_total", (("action", "tx"),))] == 1
    assert got[("xlb_flow_table_entries", ())] == 6
    assert got[("xlb_config_applies_total", (("result", "error"),))] == 1
    one = (("pool", "was"), ("server", "was1"))
    assert got[("xlb_server_check_duration_seconds_bucket", (("le", "0.0005"),) + one)] == 1
    assert got[("xlb_server_check_duration_seconds_bucket", (("le", "0.0025"),) + one)] == 3
    assert got[("xlb_server_check_duration_seconds_bucket", (("le", "+Inf"),) + one)] == 4
    assert got[("xlb_server_check_duration_seconds_count", one)] == 4
    assert got[("xlb_server_check_duration_seconds_sum", one)] == pytest.approx(3.0042)
    # unchecked servers have no histogram
    assert ("xlb_server_check_duration_seconds_count", srv) not in got


def test_label_values_are_escaped():
    status = {**STATUS, "frontends": [{**STATUS["frontends"][0], "name": 'a"b\\c'}]}
    got = samples(metrics.render(status, {}))
    assert got[("xlb_frontend_connections_total", (("frontend", 'a"b\\c'),))] == 3


@pytest.mark.parametrize("text,expected", [
    ("off", None), ("127.0.0.1:9717", ("127.0.0.1", 9717)), ("0.0.0.0:1", ("0.0.0.0", 1))])
def test_parse_address(text, expected):
    assert metrics.parse_address(text) == expected


@pytest.mark.parametrize("text", ["9717", "localhost:9717", "1.2.3.4:0", "1.2.3.4:70000", ""])
def test_parse_address_errors(text):
    with pytest.raises(ValueError):
        metrics.parse_address(text)
