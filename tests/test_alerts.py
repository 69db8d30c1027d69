"""The alerting rules (metrics/alerts.yml) pass promtool's checks and their unit
tests (metrics/alerts_test.yml), and the checked-in dashboard JSON is what
metrics/dashboard.py generates. No root needed; promtool comes with Debian's
prometheus package (scripts/setup.sh installs it)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
METRICS = ROOT / "metrics"
PROMTOOL = shutil.which("promtool")

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package prometheus; "
                             "scripts/setup.sh installs it)")


def load_dashboard():
    """metrics/dashboard.py as a module (metrics/ is no package)."""
    spec = importlib.util.spec_from_file_location("xlb_dashboard", METRICS / "dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


@needs_promtool
def test_rules_pass_promtool_check():
    r = promtool("check", "rules", str(METRICS / "alerts.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 10 rules found" in r.stdout


@needs_promtool
def test_rules_pass_their_unit_tests():
    r = promtool("test", "rules", str(METRICS / "alerts_test.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


@needs_promtool
def test_broken_rules_fail_the_check(tmp_path):
    """The check can fail: a PromQL syntax error, and a rule whose template is bad."""
    text = (METRICS / "alerts.yml").read_text()
    broken = tmp_path / "syntax.yml"
    assert "xlb_flow_table_pressure > 0.9" in text
    broken.write_text(text.replace("xlb_flow_table_pressure > 0.9", "xlb_flow_table_pressure / > 0.9"))
    r = promtool("check", "rules", str(broken))
    assert r.returncode != 0 and "FAILED" in r.stdout + r.stderr, r.stdout + r.stderr
    template = tmp_path / "template.yml"
    template.write_text(text.replace("{{ $labels.pool }} has no server up",
                                     "{{ $labels.pool has no server up"))
    r = promtool("check", "rules", str(template))
    assert r.returncode != 0, r.stdout + r.stderr


@needs_promtool
def test_unit_tests_catch_a_rule_that_fires_too_much(tmp_path):
    """The unit tests can fail: without its maint exception, XlbServerDown also
    fires for a server disabled on purpose, which the tests forbid."""
    text = (METRICS / "alerts.yml").read_text()
    exception = ('\n          unless on (job, instance, pool, server) '
                 'xlb_server_state{state="maint"} == 1')
    assert exception in text
    (tmp_path / "alerts.yml").write_text(text.replace(exception, ""))
    shutil.copy(METRICS / "alerts_test.yml", tmp_path)
    r = promtool("test", "rules", str(tmp_path / "alerts_test.yml"))
    assert r.returncode != 0 and 'server="was3"' in r.stdout + r.stderr, r.stdout + r.stderr


def test_dashboard_json_is_generated():
    pytest.importorskip("grafana_foundation_sdk",
                        reason="grafana-foundation-sdk not installed (pip install -e '.[test]')")
    r = subprocess.run([sys.executable, str(METRICS / "dashboard.py"), "--check"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dashboard_check_fails_on_a_stale_json(tmp_path, monkeypatch):
    pytest.importorskip("grafana_foundation_sdk",
                        reason="grafana-foundation-sdk not installed (pip install -e '.[test]')")
    dashboard = load_dashboard()
    stale = tmp_path / "xlb-dashboard.json"
    stale.write_text(dashboard.render().replace("New connections/s", "Connections/s"))
    monkeypatch.setattr(dashboard, "JSON_PATH", stale)
    assert dashboard.main(["--check"]) == 1
    assert dashboard.main([]) == 0 and dashboard.main(["--check"]) == 0


def test_dashboard_queries_only_xlb_metrics():
    """Every panel has a query, on the ${datasource} variable, reading xlb_ metrics."""
    dashboard = load_dashboard()
    model = json.loads(dashboard.JSON_PATH.read_text())
    graphs = [p for p in dashboard.panels(model) if p["type"] != "row"]
    assert graphs and all(p.get("targets") for p in graphs)
    for p in graphs:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        for t in p["targets"]:
            assert "xlb_" in t["expr"] and t["legendFormat"], (p["title"], t)
    assert len(dashboard.expressions()) == sum(len(p["targets"]) for p in graphs)


# What a panel titled "<what>/s" counts, by <what>, and its Grafana unit: counts/s
# of connections (one carries any number of requests: not reqps), packets/s,
# bytes/s (Bps; bps would be bits).
RATE_UNITS = {"connections": "cps", "removed": "cps", "packets": "pps", "actions": "pps",
              "drops": "pps", "bytes": "Bps"}


def test_every_rate_panel_has_the_unit_of_what_it_counts():
    dashboard = load_dashboard()
    model = json.loads(dashboard.JSON_PATH.read_text())
    rates = {p["title"]: p["fieldConfig"]["defaults"].get("unit")
             for p in dashboard.panels(model) if "/s" in p.get("title", "")}
    assert len(rates) >= 6
    for title, unit in rates.items():
        what = title.split("/s")[0].split()[-1].lower()
        assert unit == RATE_UNITS[what], (title, unit)
