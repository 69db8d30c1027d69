#!/usr/bin/env python3
"""xlb's Grafana dashboard, as code (grafana-foundation-sdk, `pip install -e '.[test]'`).

    python metrics/dashboard.py          # writes metrics/xlb-dashboard.json
    python metrics/dashboard.py --check  # exit 1 if that file is not what this code makes

Every query reads only the metrics that control/metrics.py exposes. Two variables:
`datasource` (any Prometheus) and `instance` (the balancers to show, all by default).
Rates use Grafana's $__rate_interval, which is at least four scrape intervals;
counts in bars, $__interval (each bar's own).

`expressions()` lists the PromQL of every panel of the generated JSON; the lab test
(tests/test_metrics_lab.py) runs each against a real Prometheus scraping xlb.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
JSON_PATH = HERE / "xlb-dashboard.json"
UID = "xlb"

# A selector of the chosen balancers, in every query: `xlb_server_up{SEL}`.
SEL = 'instance=~"$instance"'
RATE = "$__rate_interval"
UNAPPLIED = f"xlb_health_unapplied_since_timestamp_seconds{{{SEL}}}"


def _rate(metric: str, by: str) -> str:
    return f"sum by ({by}) (rate({metric}{{{SEL}}}[{RATE}]))"


def build():
    """The dashboard (an SDK Dashboard model). The SDK is imported here only, so
    that expressions() works from the JSON alone."""
    from grafana_foundation_sdk.builders import (common, dashboard, prometheus, stat,
                                                 statetimeline, timeseries)
    from grafana_foundation_sdk.models import common as cm
    from grafana_foundation_sdk.models import dashboard as dm

    ds = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
    ref_ids = "ABCDEFGH"

    def query(expr: str, legend: str, i: int = 0):
        return (prometheus.Dataquery().expr(expr).legend_format(legend)
                .ref_id(ref_ids[i]).datasource(ds).range())

    def legend_table(panel, *calcs: str):
        return panel.legend(common.VizLegendOptions().display_mode(cm.LegendDisplayMode.TABLE)
                            .placement(cm.LegendPlacement.BOTTOM).show_legend(True)
                            .calcs(list(calcs or ("mean", "lastNotNull", "max"))))

    def ts(title: str, unit: str, description: str, *queries, w: int = 12, h: int = 8):
        panel = (timeseries.Panel().title(title).description(description)
                 .datasource(ds).unit(unit).span(w).height(h).fill_opacity(10)
                 .line_width(1).show_points(cm.VisibilityMode.NEVER)
                 .tooltip(common.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI)
                          .sort(cm.SortOrder.DESCENDING)))
        for i, (expr, legend) in enumerate(queries):
            panel = panel.with_target(query(expr, legend, i))
        return legend_table(panel)

    def in_out(panel):
        # Traffic to the clients is drawn below the axis, traffic from them above.
        return panel.override_by_regexp(" out$", [dm.DynamicConfigValue(
            id_val="custom.transform", value=cm.GraphTransform.NEGATIVE_Y)])

    def fixed(color: str) -> dm.DynamicConfigValue:
        return dm.DynamicConfigValue(id_val="color", value={"mode": "fixed",
                                                            "fixedColor": color})

    def timeline(title: str, description: str, expr: str, legend: str):
        return (statetimeline.Panel().title(title).description(description)
                .datasource(ds).span(12).height(8).with_target(query(expr, legend))
                .show_value(cm.VisibilityMode.NEVER).fill_opacity(80).line_width(0)
                .legend(common.VizLegendOptions().show_legend(False)))

    traffic = [
        ts("New connections/s per frontend", "cps",
           "New flows balanced per second: each is one new TCP connection (or UDP flow) "
           "to the frontend's VIP.",
           (_rate("xlb_frontend_connections_total", "frontend"), "{{frontend}}")),
        ts("Share of new connections per server", "percentunit",
           "Each server's part of its pool's new connections. Round-robin over equal "
           "weights gives equal shares.",
           (f'{_rate("xlb_server_connections_total", "pool, server")} / on (pool) group_left '
            f'{_rate("xlb_server_connections_total", "pool")}', "{{pool}} / {{server}}"))
        .min(0).max(1),
        in_out(ts("Packets/s per frontend", "pps",
                  "Packets of the frontend's flows: in from the clients (up), out to them "
                  "(down).",
                  (_rate("xlb_frontend_packets_total", "frontend, direction"),
                   "{{frontend}} {{direction}}"))),
        in_out(ts("Bytes/s per frontend", "Bps",
                  "Bytes of the frontend's flows: in from the clients (up), out to them "
                  "(down).",
                  (_rate("xlb_frontend_bytes_total", "frontend, direction"),
                   "{{frontend}} {{direction}}"))),
    ]

    servers = [
        timeline("Server health", "Whether each server's health checks pass (a server "
                 "without checks is up). Down if any chosen balancer sees it down.",
                 f"min by (pool, server) (xlb_server_up{{{SEL}}})", "{{pool}} / {{server}}")
        .mappings([dm.ValueMap(options={
            "0": dm.ValueMappingResult(text="down", color="red", index=0),
            "1": dm.ValueMappingResult(text="up", color="green", index=1)})]),
        timeline("Server state", "Each server's state over time: up, down (failed checks), "
                 "drain (no new connections) or maint (disabled).",
                 f"max by (pool, server, state) (xlb_server_state{{{SEL}}}) == 1",
                 "{{pool}} / {{server}}: {{state}}")
        .override_by_regexp(": up$", [fixed("green")])
        .override_by_regexp(": down$", [fixed("red")])
        .override_by_regexp(": drain$", [fixed("orange")])
        .override_by_regexp(": maint$", [fixed("blue")]),
        ts("Servers up per pool", "short", "Servers of each pool in state up, and all of "
           "its servers. With none up, the pool's new connections are dropped. Of several "
           "balancers, the one that sees fewest up.",
           (f"min by (pool) (xlb_pool_servers_up{{{SEL}}})", "{{pool}} up"),
           (f"max by (pool) (xlb_pool_servers{{{SEL}}})", "{{pool}} servers"))
        .min(0).decimals(0),
        ts("Active flows per server", "short", "Each server's open connections: "
           "established, not closing, not idle past their timeout.",
           (f"sum by (pool, server) (xlb_server_active_flows{{{SEL}}})",
            "{{pool}} / {{server}}")).min(0),
        ts("Health-check duration", "s", "99th and 50th percentiles of each server's health "
           "check durations (a check that times out counts its timeout).",
           *[(f"histogram_quantile({q}, sum by (pool, server, le) "
              f"(rate(xlb_server_check_duration_seconds_bucket{{{SEL}}}[{RATE}])))",
              f"p{round(q * 100)} {{{{pool}}}} / {{{{server}}}}") for q in (0.99, 0.5)])
        .min(0),
        ts("Maglev tables per VIP", "short", "How many different tables the chosen "
           "balancers hold for each VIP port (xlb_pool_table_info's digest, none for a pool "
           "not on Maglev; by VIP, as pool names are each node's own): 1 where each sends a "
           "flow to the same server, more where their configs, drained or disabled servers "
           "or health checks differ (the alert XlbMaglevTablesDiffer fires after 5 minutes of that). "
           "`xlb status` shows each node's digest.",
           (f"count by (vip, port, protocol) (count by (vip, port, protocol, digest) "
            f"(xlb_frontend_info{{{SEL}}} * on (job, instance, pool) group_left (digest) "
            f"xlb_pool_table_info{{{SEL}}}))", "{{vip}}:{{port}}/{{protocol}}"))
        .min(0).decimals(0),
        ts("Health changes not in the data path", "s", "How long each balancer's data path "
           "has lacked its health checks' latest states (their apply to the maps failed; "
           "tried again up to every minute): a server they call down may still get new "
           "connections. 0 while it holds them. The alert XlbHealthNotApplied fires after "
           "a minute.",
           (f"max by (instance) ((time() - {UNAPPLIED}) * ({UNAPPLIED} > bool 0))",
            "{{instance}}")).min(0),
    ]

    dataplane = [
        ts("XDP actions/s", "pps", "Packets per second by what the XDP program did with "
           "them: redirect and tx (the fast path; tx also for ARP and ICMP answers), pass (to the "
           "kernel: not xlb's, or NATed where the kernel must route), drop.",
           (_rate("xlb_xdp_actions_total", "action"), "{{action}}")),
        ts("Drops/s by reason", "pps", "Packets dropped per second: malformed, fragment "
           "(to a VIP before its first fragment), no_backend (no server of the pool is up), no_service "
           "(to a VIP port or protocol no frontend serves).",
           (_rate("xlb_drops_total", "reason"), "{{reason}}")).min(0),
        ts("Flow-table fill", "percentunit", "Each flow table's entries over its capacity: "
           "flows (established connections) and flows_new (half-open: a SYN flood fills "
           "this one only). The alert XlbFlowTableNearlyFull fires above 90 % of either.",
           (f"max by (table) (xlb_flow_table_pressure{{{SEL}}})", "{{table}}"))
        .min(0).max(1)
        .thresholds(dashboard.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps([
            dm.Threshold(value=None, color="green"), dm.Threshold(value=0.9, color="red")]))
        .thresholds_style(common.GraphThresholdsStyleConfig()
                          .mode(cm.GraphThresholdsStyleMode.LINE)),
    ]

    flows = [
        ts("Connections by state", "short", "Connections in the flow tables: established, "
           "closing (after a FIN or RST), half-open (the handshake not complete).",
           (f"sum by (state) (xlb_flows{{{SEL}}})", "{{state}}")).min(0),
        ts("Connections removed/s by reason", "cps", "expired (idle past their timeout), "
           "reopened (a SYN on a closing one, or a SYN or a datagram it never answered on one "
           "whose server takes no new flows), "
           "ended (a server's state, a removed frontend), evicted (by the LRU when a table "
           "is full, or left out of a smaller table by a restart).",
           (_rate("xlb_flows_removed_total", "reason"), "{{reason}}")).min(0),
    ]

    config = [
        # What the counter gained since the bar before: each apply in one bar.
        # increase() over $__rate_interval (four scrapes or more) put one in
        # each of the bars its window spans, a third more in each.
        ts("Config applies", "short", "`xlb apply` requests in each interval, by result.",
           (f"sum by (result) (clamp_min(xlb_config_applies_total{{{SEL}}} - "
            f"xlb_config_applies_total{{{SEL}}} offset $__interval, 0))", "{{result}}"))
        .draw_style(cm.GraphDrawStyle.BARS).fill_opacity(60).min(0)
        .override_by_name("error", [fixed("red")]).override_by_name("ok", [fixed("green")]),
        stat.Panel().title("Last successful apply").datasource(ds)
        .description("When each balancer last applied a config successfully (or started).")
        .span(12).height(8).unit("dateTimeFromNow")
        .with_target(query(f"xlb_config_last_apply_timestamp_seconds{{{SEL}}} * 1000",
                           "{{instance}}"))
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]))
        .color_mode(cm.BigValueColorMode.NONE).graph_mode(cm.BigValueGraphMode.NONE),
    ]

    board = (dashboard.Dashboard("xlb").uid(UID)
             .description("xlb, the XDP L4 load balancer: traffic, servers and health, "
                          "the data plane, config applies. Generated by metrics/dashboard.py.")
             .tags(["xlb", "load-balancer", "xdp"]).editable().refresh("30s")
             .time("now-1h", "now").timezone("browser")
             .tooltip(dm.DashboardCursorSync.CROSSHAIR)
             .with_variable(dashboard.DatasourceVariable("datasource").label("Data source")
                            .type("prometheus"))
             .with_variable(dashboard.QueryVariable("instance").label("Balancer")
                            .datasource(ds).query("label_values(xlb_build_info, instance)")
                            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
                            .sort(dm.VariableSort.ALPHABETICAL_ASC)
                            .multi(True).include_all(True).all_value(".*")))
    for title, panels in (("Traffic", traffic), ("Servers and health", servers),
                          ("Data plane", dataplane), ("Flows", flows), ("Config", config)):
        board = board.with_row(dashboard.Row(title))
        for panel in panels:
            board = board.with_panel(panel)
    model = board.build()
    for i, panel in enumerate(model.panels, 1):    # ids in reading order, rows included
        panel.id_val = i
    return model


def render() -> str:
    """The dashboard JSON, byte for byte what the file holds."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    return json.dumps(build(), cls=JSONEncoder, sort_keys=True, indent=2) + "\n"


def panels(model: dict):
    """Every panel of a dashboard JSON, rows' nested panels included."""
    for panel in model.get("panels", []):
        yield panel
        yield from panels(panel)


def expressions(model: dict | None = None) -> list[str]:
    """The PromQL of every target of every panel, in order (default: the checked-in JSON)."""
    if model is None:
        model = json.loads(JSON_PATH.read_text())
    return [t["expr"] for p in panels(model) for t in p.get("targets", []) if "expr" in t]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true",
                    help=f"exit 1 if {JSON_PATH.name} differs from what the code makes")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        current = JSON_PATH.read_text() if JSON_PATH.exists() else ""
        if current == text:
            print(f"{JSON_PATH.name} is up to date")
            return 0
        sys.stdout.writelines(difflib.unified_diff(
            current.splitlines(keepends=True), text.splitlines(keepends=True),
            f"{JSON_PATH.name} (checked in)", f"{JSON_PATH.name} (generated)"))
        print(f"{JSON_PATH.name} is stale: run python metrics/dashboard.py", file=sys.stderr)
        return 1
    JSON_PATH.write_text(text)
    print(f"wrote {JSON_PATH} ({len(expressions(json.loads(text)))} queries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
