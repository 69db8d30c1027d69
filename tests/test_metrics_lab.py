"""xlb's metrics end to end in the lab: the exposition passes promtool's lint,
counters count exactly and never go back, and a real Prometheus scraping xlb
answers every query of the dashboard (metrics/xlb-dashboard.json) with data,
over metric names and labels that xlb really exposes, with the alerting rules
(metrics/alerts.yml) loaded."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from labctl import HERE, PY, VIP, WAS, even_split, running_lab

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.lab,
              pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
              pytest.mark.skipif(shutil.which("prometheus") is None
                                 or shutil.which("promtool") is None,
                                 reason="prometheus/promtool not installed (Debian package "
                                        "prometheus; scripts/setup.sh installs it)")]

SEED = HERE / "seed.toml"
METRICS_URL = "http://127.0.0.1:9717/metrics"     # xlb up's default, inside lb
PROM = "127.0.0.1:19090"                           # our Prometheus, inside lb too
ALERTS = ROOT / "metrics" / "alerts.yml"
# Labels Prometheus itself gives every series of a target.
TARGET_LABELS = {"job", "instance"}


@pytest.fixture(scope="module")
def lab():
    with running_lab("xlbp") as lab:
        yield lab


@pytest.fixture(scope="module")
def xlb(lab, tmp_path_factory):
    """`xlb up --config <copy of the seed>`, metrics on the default address."""
    with lab.xlb_seed(tmp_path_factory.mktemp("xlb")) as x:
        yield x


# --- helpers --------------------------------------------------------------------

def load_dashboard():
    """metrics/dashboard.py (its expressions() reads the checked-in JSON; no SDK needed)."""
    path = ROOT / "metrics" / "dashboard.py"
    spec = importlib.util.spec_from_file_location("xlb_dashboard", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def curl(lab, *args: str) -> subprocess.CompletedProcess:
    """curl inside lb, straight to the address (never through a proxy from the env)."""
    return lab.run("lb", "curl", "--noproxy", "*", "-sS", "--max-time", "5", *args, timeout=10)


def scrape(lab) -> str:
    r = curl(lab, "-f", METRICS_URL)
    assert r.returncode == 0, r.stderr
    return r.stdout


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} of an exposition."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def counters(text: str) -> dict[tuple[str, frozenset], float]:
    """The samples that must never decrease: counters, and histograms' buckets,
    counts and sums (durations are not negative)."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text)
            if fam.type in ("counter", "histogram") for s in fam.samples}


def values(text: str, name: str, label: str) -> dict[str, float]:
    """{value of `label`: value} of the samples called `name`."""
    return {dict(labels)[label]: v for (n, labels), v in samples(text).items() if n == name}


def prom_get(lab, path: str, **params: str) -> dict:
    """GET Prometheus's HTTP API from inside lb; the decoded JSON answer."""
    args = [a for k, v in params.items() for a in ("--data-urlencode", f"{k}={v}")]
    r = curl(lab, "-G", *args, f"http://{PROM}{path}")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def query(lab, expr: str) -> list[dict]:
    answer = prom_get(lab, "/api/v1/query", query=expr)
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]["result"]


def wait_for(what: str, seconds: float, probe, interval: float = 0.5):
    """Calls probe() until it returns something true (returned), for at most `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            result = probe()
        except (AssertionError, json.JSONDecodeError, subprocess.TimeoutExpired):
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {seconds} s")
        time.sleep(interval)


def for_prometheus(expr: str) -> str:
    """A dashboard query as Prometheus itself can run it: Grafana's variables replaced."""
    # $__interval: a bar's or a point's own, here the scrape interval of the
    # Prometheus the tests run (a count over it reaches no further back).
    for var, value in (("$__rate_interval", "1m"), ("$__interval", "1s"), ("$__range", "1m"),
                       ("${instance}", ".*"), ("$instance", ".*")):
        expr = expr.replace(var, value)
    assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
    return expr


TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\[[^\]]*\]|\d+(?:ms|[smhdwy])\b'
                   r'|\d+(?:\.\d+)?(?:[eE][+-]?\d+)?'
                   r'|[A-Za-z_:][A-Za-z0-9_:]*|=~|!~|!=|==|>=|<=|\S')
IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
AGGREGATIONS = {"sum", "min", "max", "avg", "count", "group", "stddev", "stdvar", "topk",
                "bottomk", "quantile", "count_values"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def names_in(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) a PromQL expression uses: labels in matchers
    and in by/without/on/ignoring/group_left/group_right lists. Strings, range
    brackets, numbers, functions and keywords are skipped. Enough for the
    dashboard's queries; not a full PromQL parser."""
    tokens = TOKEN.findall(expr)
    metrics, labels = set(), set()
    in_braces = False
    i = 0
    while i < len(tokens):
        t, nxt = tokens[i], tokens[i + 1] if i + 1 < len(tokens) else ""
        if t == "{":
            in_braces = True
        elif t == "}":
            in_braces = False
        elif IDENT.fullmatch(t):
            if in_braces:
                if nxt in ("=", "!=", "=~", "!~"):
                    labels.add(t)
            elif t in GROUPING:
                if nxt == "(":
                    i += 2
                    while tokens[i] != ")":
                        if IDENT.fullmatch(tokens[i]):
                            labels.add(tokens[i])
                        i += 1
            elif nxt != "(" and t not in AGGREGATIONS and t.lower() not in KEYWORDS:
                metrics.add(t)
        i += 1
    return metrics, labels


def test_names_in_parses_the_dashboards_kind_of_query():
    m, l = names_in('sum by (pool, server) (rate(a_total{instance=~"x", job="y"}[1m])) '
                    '/ on (pool) group_left sum without (le) (b) > bool 0.9')
    assert m == {"a_total", "b"} and l == {"pool", "server", "instance", "job", "le"}
    m, l = names_in("histogram_quantile(0.99, sum by (le) (rate(c_bucket[5m]))) * 1000")
    assert m == {"c_bucket"} and l == {"le"}
    m, l = names_in("clamp_min(d_total - d_total offset 15s, 0)")
    assert m == {"d_total"} and l == set()


# --- the tests ------------------------------------------------------------------

def test_exposition_passes_promtool(lab, xlb):
    text = scrape(lab)
    assert "xlb_frontend_connections_total" in text
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr.strip() == "", \
        r.stdout + r.stderr


def test_new_connections_are_counted_exactly(lab, xlb):
    n = 100
    before = scrape(lab)
    out = lab.client("client", "http", VIP, "80", "--count", str(n))
    after = scrape(lab)
    assert out["errors"] == [] and len(out["names"]) == n, out["errors"]

    fe = {k: values(after, "xlb_frontend_connections_total", "frontend")[k]
          - values(before, "xlb_frontend_connections_total", "frontend").get(k, 0)
          for k in values(after, "xlb_frontend_connections_total", "frontend")}
    assert fe == {"www": n}
    sv = {k: int(v - values(before, "xlb_server_connections_total", "server").get(k, 0))
          for k, v in values(after, "xlb_server_connections_total", "server").items()}
    assert sum(sv.values()) == n, sv
    assert even_split(sv, {"was1", "was2"}, n), sv   # round-robin: one off per CPU at most
    # The clients saw the same split as the counters.
    assert {"was1": out["names"].count("WAS1"), "was2": out["names"].count("WAS2")} == sv


def test_counters_never_decrease_under_load(lab, xlb):
    load = lab.spawn("client", PY, str(HERE / "clients.py"), "load", VIP, "80",
                     "--seconds", "5", "--concurrency", "4", "--timeout", "2")
    try:
        scrapes = []
        for _ in range(8):
            scrapes.append(counters(scrape(lab)))
            time.sleep(0.5)
        result = json.loads(load.communicate(timeout=30)[0])
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    assert result["ok"] > 0 and result["error_count"] == 0, result["errors"]
    for i, (earlier, later) in enumerate(zip(scrapes, scrapes[1:])):
        assert set(earlier) <= set(later), f"series vanished at scrape {i + 1}"
        went_back = {k: (earlier[k], later[k]) for k in earlier if later[k] < earlier[k]}
        assert not went_back, f"scrape {i} -> {i + 1}: {went_back}"
    grew = {key[0] for key, v in scrapes[-1].items() if v > scrapes[0].get(key, 0)}
    assert {"xlb_frontend_connections_total", "xlb_server_connections_total",
            "xlb_frontend_packets_total", "xlb_xdp_actions_total"} <= grew, grew


@contextlib.contextmanager
def prometheus(lab, directory: Path):
    """A real Prometheus in lb, scraping xlb every second with the alerting rules
    loaded, its data in directory; yields once it holds five scrapes of xlb."""
    config = directory / "prometheus.yml"
    # scrape_timeout may not exceed scrape_interval (its default is 10 s).
    config.write_text(f"""\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - {ALERTS}
scrape_configs:
  - job_name: xlb
    static_configs:
      - targets: ["127.0.0.1:9717"]
""")
    log = directory / "prometheus.log"
    cmd = ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={directory / 'tsdb'}",
           f"--web.listen-address={PROM}", "--log.level=warn"]
    # Its log goes to a file: a pipe nobody reads could fill up and stall it.
    prom = lab.spawn("lb", "sh", "-c", f"exec {shlex.join(cmd)} >{shlex.quote(str(log))} 2>&1")
    try:
        wait_for("Prometheus ready", 20, lambda: prom.poll() is not None
                 or curl(lab, "-f", f"http://{PROM}/-/ready").returncode == 0)
        assert prom.poll() is None, log.read_text()
        # Enough scrapes for rate() over 1m: at least two samples in the window.
        wait_for("five scrapes of xlb", 20, lambda: any(
            float(r["value"][1]) >= 5 for r in query(lab, 'count_over_time(up{job="xlb"}[1m])')))
        assert [r["value"][1] for r in query(lab, 'up{job="xlb"}')] == ["1"]
        yield
    finally:
        stop(prom)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rules(lab) -> list[dict] | None:
    """The rules of group xlb once every one of them is evaluated and healthy."""
    groups = prom_get(lab, "/api/v1/rules")["data"]["groups"]
    found = [r for g in groups if g["name"] == "xlb" for r in g["rules"]]
    return found if found and all(r["health"] == "ok" for r in found) else None


@pytest.fixture
def maglev_seed(lab, xlb, tmp_path):
    """The seed with its pool on Maglev, whose table digest only a Maglev pool
    has (xlb_pool_table_info, which XlbMaglevTablesDiffer reads); the seed
    again after."""
    maglev = tmp_path / "maglev.toml"
    maglev.write_text(SEED.read_text().replace('algorithm = "roundrobin"', 'algorithm = "maglev"'))
    assert lab.xlb_cmd("apply", str(maglev), timeout=60).returncode == 0
    yield
    assert lab.xlb_cmd("apply", str(SEED), timeout=60).returncode == 0


def test_prometheus_answers_every_dashboard_query(lab, xlb, maglev_seed, tmp_path):
    exposition = scrape(lab)
    [pool] = lab.status()["pools"]
    assert samples(exposition)[("xlb_pool_table_info", frozenset(
        {("pool", "was"), ("digest", pool["table_digest"])}))] == 1
    exposed_metrics = {name for name, _ in samples(exposition)}
    exposed_labels = {k for _, labels in samples(exposition) for k, _ in labels}
    load = lab.spawn("client", PY, str(HERE / "clients.py"), "load", VIP, "80",
                     "--seconds", "20", "--concurrency", "4", "--timeout", "2")
    try:
        with prometheus(lab, tmp_path):
            dashboard = load_dashboard()
            model = json.loads(dashboard.JSON_PATH.read_text())
            targets = [(p["title"], t) for p in dashboard.panels(model)
                       for t in p.get("targets", [])]
            assert [t["expr"] for _, t in targets] == dashboard.expressions() \
                and len(targets) >= 10
            for title, target in targets:
                expr = for_prometheus(target["expr"])
                metrics, labels = names_in(expr)
                assert metrics and metrics <= exposed_metrics, (title, metrics - exposed_metrics)
                assert labels <= exposed_labels | TARGET_LABELS, (title, labels - exposed_labels)
                result = query(lab, expr)
                assert result, f"{title}: no data for {expr}"
                # Every label the legend shows is on every series.
                for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")):
                    assert all(label in r["metric"] for r in result), (title, label, result)

            seed_servers = set(tomllib.loads(SEED.read_text())["servers"])
            up = {r["metric"]["server"]: r["value"][1] for r in query(lab, "xlb_server_up")}
            assert up == {s: "1" for s in seed_servers}

            # The rules are loaded, and once evaluated every one of them is healthy.
            evaluated = wait_for("rules evaluated", 10, lambda: rules(lab))
            assert {r["name"] for r in evaluated} == {
                "XlbDown", "XlbServerDown", "XlbPoolAllServersDown", "XlbInterfaceNotServed",
                "XlbInterfaceDown", "XlbFlowTableNearlyFull", "XlbFlowTableEvicting",
                "XlbDropsRising", "XlbMaglevTablesDiffer", "XlbHealthNotApplied"}
            assert all(r["state"] == "inactive" for r in evaluated), evaluated  # a healthy lab
            for r in evaluated:   # the rules, too, read only what xlb (or the scrape: up) has
                metrics, labels = names_in(r["query"])
                assert metrics <= exposed_metrics | {"up"}, (r["name"], metrics - exposed_metrics)
                assert labels <= exposed_labels | TARGET_LABELS, (r["name"], labels)

        result = json.loads(load.communicate(timeout=40)[0])
        assert result["ok"] > 0 and result["error_count"] == 0, result["errors"]
    finally:
        stop(load)


def test_the_config_applies_panel_counts_each_apply_once(lab, xlb, tmp_path):
    """The bars of the dashboard's "Config applies" add up to the applies made,
    as Grafana draws them: a bar every $__interval (here the scrape interval),
    $__rate_interval four of them. increase() over $__rate_interval counted
    each apply in every bar its window spans: some five times over."""
    dashboard = load_dashboard()
    model = json.loads(dashboard.JSON_PATH.read_text())
    [expr] = [t["expr"] for p in dashboard.panels(model) if p.get("title") == "Config applies"
              for t in p["targets"]]
    for var, value in (("$__rate_interval", "4s"), ("$__interval", "1s"),
                       ("${instance}", ".*"), ("$instance", ".*")):
        expr = expr.replace(var, value)
    def applied() -> float:
        """The successful applies in Prometheus's last scrape."""
        return sum(float(r["value"][1])
                   for r in query(lab, 'xlb_config_applies_total{result="ok"}'))

    with prometheus(lab, tmp_path):
        before = applied()
        start = time.time()
        for _ in range(2):
            assert lab.xlb_cmd("apply", str(SEED), timeout=60).returncode == 0
            time.sleep(3)
        # Until Prometheus holds the second apply, and a bar after it (a step
        # is a second): a fixed 2 s left a late scrape of it out of the bars.
        wait_for("Prometheus scrapes the second apply", 30, lambda: applied() == before + 2)
        end = time.time() + 1
        answer = prom_get(lab, "/api/v1/query_range", query=expr, start=f"{start:.3f}",
                          end=f"{end:.3f}", step="1")
    assert answer["status"] == "success", answer
    bars = {r["metric"]["result"]: sum(float(v) for _, v in r["values"])
            for r in answer["data"]["result"]}
    assert bars == {"ok": 2, "error": 0}, answer["data"]["result"]


def test_applies_and_health_changes_are_counted(lab, xlb, tmp_path):
    """xlb_config_applies_total counts each `xlb apply` by result, and
    xlb_server_health_changes_total each health change of that server only."""
    before = scrape(lab)
    applies = values(before, "xlb_config_applies_total", "result")
    changes = values(before, "xlb_server_health_changes_total", "server")
    assert lab.xlb_cmd("apply", str(SEED), timeout=60).returncode == 0
    bad = tmp_path / "bad.toml"
    bad.write_text(SEED.read_text().replace('pool = "was"', 'pool = "nosuch"'))
    assert lab.xlb_cmd("apply", str(bad), timeout=60).returncode == 2
    assert lab.xlb_cmd("apply", str(bad), timeout=60).returncode == 2
    after = scrape(lab)
    assert values(after, "xlb_config_applies_total", "result") == \
        {"ok": applies["ok"] + 1, "error": applies["error"] + 2}
    last = ("xlb_config_last_apply_timestamp_seconds", frozenset())
    assert samples(after)[last] > samples(before)[last]     # moved by the apply that succeeded

    # The seed's monitor: every 2 s, fall 3, rise 2.
    lab.server("stop", "was2")
    try:
        wait_for("was2 down", 15, lambda: values(scrape(lab), "xlb_server_up", "server")
                 == {"was1": 1, "was2": 0})
        assert values(scrape(lab), "xlb_server_health_changes_total", "server") == \
            {"was1": changes["was1"], "was2": changes["was2"] + 1}
    finally:
        lab.server("start", "was2")
    wait_for("was2 up", 15, lambda: values(scrape(lab), "xlb_server_up", "server")
             == {"was1": 1, "was2": 1})
    end = scrape(lab)
    assert values(end, "xlb_server_health_changes_total", "server") == \
        {"was1": changes["was1"], "was2": changes["was2"] + 2}
    assert samples(end)[last] == samples(after)[last]       # health changes are no apply


def test_a_full_flow_table_reads_alike_in_status_top_metrics_and_alerts(tmp_path):
    """--flow-table 64: the established table holds 128 entries, and 300 closed
    connections (each remembered 120 s as closing) fill it; the LRU evicts the
    rest. `xlb status` shows that table on its own, as `xlb top` and the metric
    do (both tables together are 10 % full), the evictions add up, and the
    alert on evictions goes off, while the table reads under the 90 % of
    XlbFlowTableNearlyFull or not (the LRU evicts before the last entry)."""
    backends = [a for addr in (f"{WAS['WAS1']}:8080", f"{WAS['WAS2']}:8080")
                for a in ("--backend", addr)]
    with running_lab("xlbe") as lab, \
            lab.xlb("--vip", f"{VIP}:80", *backends, "--flow-table", "64"), \
            prometheus(lab, tmp_path):
        n = 300
        out = lab.client("client", "http", VIP, "80", "--count", str(n))
        assert out["errors"] == [] and len(out["names"]) == n

        fl = lab.status()["flows"]
        table = fl["tables"]["flows"]
        assert table["capacity"] == 128 and table["entries"] >= 64
        assert fl["created"] == fl["promoted"] == n
        # Each connection is there (closing), or was evicted: nothing else removed it.
        assert fl["removed"] == {"expired": 0, "reopened": 0, "ended": 0,
                                 "evicted": n - fl["closing"]}

        shown = re.search(r"flows (\d+)/128 entries, ([\d.]+)% full",
                          lab.xlb_cmd("status", check=True).stdout)
        assert shown, "xlb status shows the established table's fill"
        assert int(shown[1]) >= 64 and float(shown[2]) >= 50
        top_shown = re.search(r" flows ([\d.]+)% full", lab.xlb_cmd(
            "top", "--once", "--interval", "0.2", check=True).stdout)
        assert top_shown and float(top_shown[1]) >= 50
        pressure = values(scrape(lab), "xlb_flow_table_pressure", "table")
        assert pressure["flows"] >= 0.5 and pressure["flows_new"] == 0

        def evicting():
            return [r["metric"]["alertstate"] for r in
                    query(lab, 'ALERTS{alertname="XlbFlowTableEvicting"}')]
        assert wait_for("the eviction alert", 20, evicting) == ["pending"]
