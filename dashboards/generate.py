#!/usr/bin/env python3
"""Grafana dashboards and Prometheus alert rules of node-watchdog, as code.

One source for what an operator looks at: the four dashboards (built with
grafana-foundation-sdk, pinned in pyproject's `test` extra) and the alert rules. It writes

    dashboards/json/<uid>.json          one file per dashboard (Grafana import / provisioning)
    dashboards/alerts.yaml              plain Prometheus rules file (`promtool check rules`)
    deploy/base/grafana-dashboards.yaml ConfigMap for Grafana's dashboard sidecar
    deploy/base/prometheusrule.yaml     the same rules as a prometheus-operator PrometheusRule

Output is deterministic (sorted JSON keys, panel ids numbered in order, no timestamps), so the
committed files must equal a fresh run byte for byte (tests/unit/test_dashboards.py).

Every query uses only metric names declared in watchdog/metrics.py (DESIGN §7 is the contract).
Gauges that every replica exports (all replicas compute, only the leader acts) are scoped to the
leader's view with `and on (instance) (watchdog_leader == 1)`; counters and histograms move only
on the leader, so they are summed over all replicas.

Usage: python dashboards/generate.py [--out DIR] [--runbook-base URL] [--check]

`panel_queries()` and `ALERTS` are also the hook for checking every panel query and alert
expression against a real Prometheus scraping a failover scenario.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from grafana_foundation_sdk.builders import bargauge, dashboard, heatmap, prometheus, stat, table
from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import timeseries as ts
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import heatmap as hm
from grafana_foundation_sdk.models import prometheus as pm

ROOT = Path(__file__).resolve().parents[1]

# Where each alert's runbook lives: a section of docs/OPERATIONS.md, one anchor per alert.
# Relative by default (the repository's own docs); pass --runbook-base to point at a hosted copy.
RUNBOOK_BASE = "docs/OPERATIONS.md"

# DESIGN §10: p95 node power-off → VM running elsewhere ≤ 30 s with self-fencing.
FAILOVER_BUDGET_S = 30

# The leader's view of a per-replica gauge (standbys compute too, but only the leader acts).
LEADER = "and on (instance) (watchdog_leader == 1)"

DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
TAGS = ["node-watchdog", "kubevirt"]

# Phases of watchdog/decide/state.py (the `phase` label values).
DOWN = "Unreachable|Fencing|Resetting|Reset"
FAILING_OVER = "Fencing|Resetting|Reset"

# Holds that an operator switched on deliberately (detect-only policy, --dry-run): shown on the
# dashboards, never paged on.
DELIBERATE_HOLDS = "DryRun|PolicyDisabled"


# --------------------------------------------------------------------------------------------
# Alerts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str


ALERTS: tuple[Alert, ...] = (
    Alert(
        name="WatchdogNodeUnreachable",
        expr=f'sum(watchdog_nodes{{phase=~"{DOWN}"}} {LEADER}) > 0',
        for_="1m",
        severity="warning",
        summary="{{ $value }} node(s) unreachable",
        description=(
            "node-watchdog has {{ $value }} node(s) in a down phase (Unreachable, Fencing, "
            "Resetting or Reset). Their VMs are being failed over; the nodes themselves need "
            "repair."
        ),
    ),
    Alert(
        name="WatchdogFalselyReadyPods",
        expr=f"max(watchdog_false_ready_pods {LEADER}) > 0",
        for_="1m",
        severity="warning",
        summary="{{ $value }} virt-launcher pod(s) falsely Ready on unreachable nodes",
        description=(
            "{{ $value }} virt-launcher pod(s) on unreachable nodes still report Ready=True for "
            "more than a minute: Services still route to them and their VMIs look Running."
        ),
    ),
    Alert(
        name="WatchdogFailoverSlowerThanBudget",
        expr=(
            "histogram_quantile(0.95, sum by (le) (rate(watchdog_failover_seconds_bucket[1h])))"
            f" > {FAILOVER_BUDGET_S}"
        ),
        for_="0m",
        severity="warning",
        summary="Failover p95 over the last hour is {{ $value | humanizeDuration }}",
        description=(
            "The 95th percentile of node last-contact to VM-running-elsewhere over the last hour "
            f"is {{{{ $value | humanizeDuration }}}}, above the {FAILOVER_BUDGET_S} s budget."
        ),
    ),
    Alert(
        name="WatchdogResetsHeld",
        expr=(
            f'max by (reason) (watchdog_resets_held{{reason!~"{DELIBERATE_HOLDS}"}} {LEADER}) > 0'
        ),
        for_="5m",
        severity="critical",
        summary="Resets held: {{ $labels.reason }}",
        description=(
            "node-watchdog has held every force-reset for 5 minutes (reason {{ $labels.reason }}). "
            "VMs on nodes that die now stay down until the hold clears."
        ),
    ),
    Alert(
        name="WatchdogNodeUnfenced",
        expr=(
            "max by (reason) (watchdog_nodes_held"
            '{reason=~"NoArmedFence|WeakFence|PowerFenceContradiction"} '
            f"{LEADER}) > 0"
        ),
        for_="2m",
        severity="critical",
        summary="A dead node cannot be reset: {{ $labels.reason }}",
        description=(
            "A node declared unreachable has waited 2 minutes without proof that it is fenced "
            "(reason {{ $labels.reason }}: no armed fence, one without a watchdog device, or a "
            "BMC that said off while the node's agent was still heard). "
            "Its VMs stay down until an administrator fences it."
        ),
    ),
    Alert(
        name="WatchdogFenceFailing",
        # Counters move on the leader only: summed over replicas. A failing fence is run again
        # after 2, 4, 8, 16 and then every 30 s, so a persistent failure is many per 5 minutes;
        # one or two that a retry fixed are not.
        expr=(
            'sum(increase(watchdog_actions_total{action="RunFenceHook",result="failed"}[5m])) >= 3'
        ),
        for_="2m",
        severity="critical",
        summary="Fencing a dead node keeps failing",
        description=(
            "Fences run by the controller failed 3 times or more in 5 minutes, for 2 minutes: "
            "the fence hook, or the power-off through the BMC (fence_mode power). This fence "
            "proves nothing: the node's VMs wait for its self-fence and the safe delay, or stay "
            "down where there is none."
        ),
    ),
    Alert(
        name="WatchdogPolicyInvalid",
        expr="max(watchdog_policy_invalid) > 0",
        for_="1m",
        severity="warning",
        summary="vm-force-reset-policy is invalid",
        description=(
            "The Harvester setting vm-force-reset-policy does not parse or validate; "
            "node-watchdog keeps using the last good policy until it is fixed."
        ),
    ),
    Alert(
        name="WatchdogNoLeader",
        expr="sum(watchdog_leader) < 1 or absent(watchdog_leader)",
        for_="1m",
        severity="critical",
        summary="No node-watchdog controller is leading",
        description=(
            "No node-watchdog replica has held the leader Lease for a minute (or none is "
            "scraped): dead nodes are neither detected nor failed over."
        ),
    ),
    Alert(
        name="WatchdogHeartbeatsRejected",
        expr="sum by (reason) (rate(watchdog_heartbeats_rejected_total[5m])) > 0",
        for_="2m",
        severity="warning",
        summary="Heartbeats rejected: {{ $labels.reason }}",
        description=(
            "node-watchdog rejected heartbeats in the last 5 minutes ({{ $value | humanize }}/s, "
            "reason {{ $labels.reason }}): a misconfigured or impersonating agent, or an agent "
            "replaying old sequence numbers."
        ),
    ),
    Alert(
        name="WatchdogAgentMissing",
        expr=f"max by (node) (watchdog_heartbeat_age_seconds {LEADER}) > 60",
        for_="2m",
        severity="warning",
        summary="No heartbeat from node {{ $labels.node }}",
        description=(
            "The node-watchdog agent on {{ $labels.node }} has not sent a heartbeat for "
            "{{ $value | humanizeDuration }}. Without an agent the node is never self-fenced, "
            "so its VMs are not failed over automatically."
        ),
    ),
    Alert(
        name="WatchdogBrokerCertificateExpiring",
        # The agent renews at 2/3 of the lifetime (8 h left of the default 24 h): under 4 h
        # left means its renewals have failed for hours.
        expr="(watchdog_mqtt_certificate_expiry_timestamp_seconds > 0) - time() < 4 * 3600",
        for_="10m",
        severity="warning",
        summary="Broker certificate of {{ $labels.instance }} expires soon",
        description=(
            "The node-watchdog agent at {{ $labels.instance }} holds a broker certificate that "
            "expires in {{ $value | humanizeDuration }} and has not renewed it. When it expires "
            "the agent cannot reach the broker: its node is not protected."
        ),
    ),
)


def runbook_anchor(name: str) -> str:
    """GitHub-style anchor of the runbook heading `### <name>` in docs/OPERATIONS.md."""
    return name.lower()


def rule_groups(runbook_base: str) -> list[dict[str, Any]]:
    rules = []
    for a in ALERTS:
        rules.append(
            {
                "alert": a.name,
                "expr": a.expr,
                "for": a.for_,
                "labels": {"severity": a.severity},
                "annotations": {
                    "summary": a.summary,
                    "description": a.description,
                    "runbook_url": f"{runbook_base}#{runbook_anchor(a.name)}",
                },
            }
        )
    return [{"name": "node-watchdog", "rules": rules}]


# --------------------------------------------------------------------------------------------
# Dashboards
# --------------------------------------------------------------------------------------------


def q(expr: str, legend: str = "", *, instant: bool = False, fmt: str | None = None) -> Any:
    query = prometheus.Dataquery().expr(expr).datasource(DS)
    if legend:
        query = query.legend_format(legend)
    if instant:
        query = query.instant()
    if fmt == "heatmap":
        query = query.format(pm.PromQueryFormat.HEATMAP)
    elif fmt == "table":
        query = query.format(pm.PromQueryFormat.TABLE)
    return query


def thresholds(*steps: tuple[float | None, str]) -> Any:
    return (
        dashboard.ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(value=v, color=c) for v, c in steps])
    )


GREEN_IF_ZERO = ((None, "green"), (1, "red"))


def stat_panel(title: str, desc: str, *targets: Any, unit: str = "short", steps=GREEN_IF_ZERO):
    p = (
        stat.Panel()
        .title(title)
        .description(desc)
        .datasource(DS)
        .unit(unit)
        .height(4)
        .span(4)
        .thresholds(thresholds(*steps))
        .color_scheme(dashboard.FieldColor().mode(dm.FieldColorModeId.THRESHOLDS))
        .graph_mode(common.BigValueGraphMode.AREA)
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]))
    )
    for i, t in enumerate(targets):
        p = p.with_target(t.ref_id(chr(ord("A") + i)))
    return p


def series_panel(
    title: str,
    desc: str,
    *targets: Any,
    unit: str = "short",
    span: int = 12,
    stacked: bool = False,
    bars: bool = False,
    steps: tuple[tuple[float | None, str], ...] | None = None,
):
    p = (
        ts.Panel()
        .title(title)
        .description(desc)
        .datasource(DS)
        .unit(unit)
        .height(8)
        .span(span)
        .fill_opacity(20 if stacked else 10)
        .legend(
            cb.VizLegendOptions()
            .show_legend(True)
            .display_mode(common.LegendDisplayMode.TABLE)
            .placement(
                common.LegendPlacement.RIGHT if span >= 12 else common.LegendPlacement.BOTTOM
            )
            .calcs(["lastNotNull", "max"])
        )
    )
    if stacked:
        p = p.stacking(cb.StackingConfig().mode(common.StackingMode.NORMAL))
    if bars:
        p = p.draw_style(common.GraphDrawStyle.BARS)
    if steps is not None:
        p = p.thresholds(thresholds(*steps)).thresholds_style(
            cb.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.LINE)
        )
    for i, t in enumerate(targets):
        p = p.with_target(t.ref_id(chr(ord("A") + i)))
    return p


def heatmap_panel(title: str, desc: str, metric: str):
    return (
        heatmap.Panel()
        .title(title)
        .description(desc)
        .datasource(DS)
        .height(8)
        .span(12)
        .calculate(False)
        .y_axis(heatmap.YAxisConfig().unit("s"))
        .color(heatmap.HeatmapColorOptions().mode(hm.HeatmapColorMode.SCHEME))
        .with_target(
            q(
                f"sum by (le) (increase({metric}_bucket[$__rate_interval]))",
                "{{le}}",
                fmt="heatmap",
            ).ref_id("A")
        )
    )


def quantiles(metric: str, window: str = "$__rate_interval") -> list[Any]:
    return [
        q(
            f"histogram_quantile({p}, sum by (le) (rate({metric}_bucket[{window}])))",
            f"p{int(p * 100)}",
        )
        for p in (0.5, 0.95, 0.99)
    ]


def over_range_quantile(metric: str, p: float) -> str:
    return f"histogram_quantile({p}, sum by (le) (increase({metric}_bucket[$__range])))"


def datasource_variable() -> Any:
    return dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")


def base(uid: str, title: str, desc: str) -> Any:
    return (
        dashboard.Dashboard(title)
        .uid(uid)
        .description(desc)
        .tags(TAGS)
        .editable()
        .refresh("30s")
        .time("now-3h", "now")
        .timezone("browser")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .with_variable(datasource_variable())
        .link(
            dashboard.DashboardLink("node-watchdog")
            .type(dm.DashboardLinkType.DASHBOARDS)
            .tags(["node-watchdog"])
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
    )


def failover_overview() -> Any:
    d = base(
        "node-watchdog-overview",
        "node-watchdog / Failover overview",
        "Where every node stands, failovers in progress and how fast they complete.",
    )
    d = d.with_row(dashboard.Row("Now"))
    d = d.with_panel(
        stat_panel(
            "Awaiting reset",
            # A node declared Unreachable is Fencing from the same evaluation on: both count.
            "Nodes declared unreachable whose reset waits for its period, safe delay, a fence "
            "proof or a hold (Reset due in, below, says when).",
            q(f'sum(watchdog_nodes{{phase=~"Unreachable|Fencing"}} {LEADER})', instant=True),
        )
    )
    d = d.with_panel(
        stat_panel(
            "Active failovers",
            "Nodes being fenced, reset, or whose VMs are being restarted elsewhere.",
            q(f'sum(watchdog_nodes{{phase=~"{FAILING_OVER}"}} {LEADER})', instant=True),
        )
    )
    d = d.with_panel(
        stat_panel(
            "Degraded (evacuating)",
            "Agent alive but kubelet/API path lost: VMs are live-migrated, never reset.",
            q(f'sum(watchdog_nodes{{phase="Degraded"}} {LEADER})', instant=True),
            steps=((None, "green"), (1, "orange")),
        )
    )
    d = d.with_panel(
        stat_panel(
            "Falsely-ready pods",
            "virt-launcher pods still Ready=True on unreachable nodes.",
            q(f"max(watchdog_false_ready_pods {LEADER})", instant=True),
        )
    )
    d = d.with_panel(
        stat_panel(
            "Resets held",
            "Holds in force (storm, broker/API down, policy disabled, dry-run, upgrade).",
            q(f"sum(watchdog_resets_held {LEADER})", instant=True),
            steps=((None, "green"), (1, "red")),
        )
    )
    d = d.with_panel(
        stat_panel(
            "Policy reset period",
            "The force-reset period of the policy in force. A node whose agent declared an "
            "armed fence waits at least its safe delay instead when that is longer (declared "
            "self-fence after + action bound + heartbeat interval + margin).",
            q(f"max(watchdog_policy_period_seconds {LEADER})", instant=True),
            unit="s",
            steps=((None, "blue"),),
        )
    )
    d = d.with_row(dashboard.Row("Failover latency"))
    d = d.with_panel(
        stat_panel(
            "Failovers in range",
            "VMs restarted on another node within the dashboard's time range.",
            q("sum(increase(watchdog_failover_seconds_count[$__range]))", instant=True),
            steps=((None, "blue"),),
        ).span(6)
    )
    d = d.with_panel(
        stat_panel(
            "Failover p50 (range)",
            "Median last contact → VM Running elsewhere, over the time range.",
            q(over_range_quantile("watchdog_failover_seconds", 0.5), instant=True),
            unit="s",
            steps=((None, "green"), (FAILOVER_BUDGET_S, "red")),
        ).span(6)
    )
    d = d.with_panel(
        stat_panel(
            "Failover p95 (range)",
            f"95th percentile last contact → VM Running elsewhere; budget {FAILOVER_BUDGET_S} s.",
            q(over_range_quantile("watchdog_failover_seconds", 0.95), instant=True),
            unit="s",
            steps=((None, "green"), (FAILOVER_BUDGET_S, "red")),
        ).span(6)
    )
    d = d.with_panel(
        stat_panel(
            "Policy invalid",
            "1 while the Harvester vm-force-reset-policy setting is invalid (last good kept).",
            q("max(watchdog_policy_invalid)", instant=True),
        ).span(6)
    )
    d = d.with_panel(
        series_panel(
            "Failover latency p50 / p95 (15 m windows)",
            "Last contact → VM Running elsewhere, per VM; dashed line: budget.",
            *quantiles("watchdog_failover_seconds", "15m")[:2],
            unit="s",
            steps=((None, "green"), (FAILOVER_BUDGET_S, "red")),
        )
    )
    d = d.with_panel(
        series_panel(
            "Nodes per phase",
            "Leader's view of every node's phase.",
            q(f"max by (phase) (watchdog_nodes {LEADER})", "{{phase}}"),
            stacked=True,
        )
    )
    d = d.with_row(dashboard.Row("Holds and transitions"))
    d = d.with_panel(
        series_panel(
            "Resets held by reason",
            "1 while a hold blocks every reset.",
            q(f"max by (reason) (watchdog_resets_held {LEADER})", "{{reason}}"),
        )
    )
    d = d.with_panel(
        series_panel(
            "Reset due in, per node",
            "Seconds until the VMs of each node being fenced are reset: the longer of the "
            "policy period and the node's safe delay. Absent while a hold or a missing fence "
            "proof means no time can be promised (see Resets held).",
            q(
                f"max by (node) (watchdog_reset_not_before_timestamp_seconds {LEADER}) - time()",
                "{{node}}",
            ),
            unit="s",
        )
    )
    d = d.with_panel(
        series_panel(
            "Phase transitions",
            "Transitions per interval by target phase and reason.",
            q(
                "sum by (to, reason) (increase(watchdog_transitions_total[$__rate_interval]))",
                "→ {{to}} ({{reason}})",
            ),
            bars=True,
        )
    )
    d = d.with_panel(
        series_panel(
            "Falsely-ready pods",
            "virt-launcher pods Ready=True on unreachable nodes.",
            q(f"max(watchdog_false_ready_pods {LEADER})", "pods"),
        )
    )
    d = d.with_panel(
        series_panel(
            "Policy reset period",
            "Seconds from UNREACHABLE to reset by policy; a self-fenced node waits "
            "max(this, its safe delay).",
            q(f"max(watchdog_policy_period_seconds {LEADER})", "period"),
            unit="s",
        )
    )
    return d


def heartbeats() -> Any:
    d = base(
        "node-watchdog-heartbeats",
        "node-watchdog / Heartbeats",
        "MQTT heartbeats as the leading controller sees them, and those it rejected.",
    )
    d = d.with_variable(
        dashboard.QueryVariable("node")
        .label("Node")
        .datasource(DS)
        .query("label_values(watchdog_heartbeat_age_seconds, node)")
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )
    age = f'watchdog_heartbeat_age_seconds{{node=~"$node"}} {LEADER}'
    d = d.with_row(dashboard.Row("Heartbeat age"))
    d = d.with_panel(
        stat_panel(
            "Nodes with stale heartbeats",
            "Nodes whose last heartbeat is older than 3 s (3 missed at the default 1 s).",
            q(f"count(({age}) > 3) or vector(0)", instant=True),
        ).span(6)
    )
    d = d.with_panel(
        stat_panel(
            "Oldest heartbeat",
            "Age of the stalest heartbeat among the selected nodes.",
            q(f"max({age})", instant=True),
            unit="s",
            steps=((None, "green"), (3, "orange"), (60, "red")),
        ).span(6)
    )
    d = d.with_panel(
        stat_panel(
            "Accepted heartbeats/s",
            "Heartbeats accepted per second (about nodes / heartbeat_interval_s).",
            q("sum(rate(watchdog_heartbeats_total[$__rate_interval]))", instant=True),
            unit="reqps",
            steps=((None, "blue"),),
        ).span(6)
    )
    d = d.with_panel(
        stat_panel(
            "Rejected heartbeats/s",
            "Heartbeats refused: wrong topic, malformed, oversized, replayed or unknown node.",
            # The counter has no series before the first rejection: show 0, not "No data".
            q(
                "sum(rate(watchdog_heartbeats_rejected_total[$__rate_interval])) or vector(0)",
                instant=True,
            ),
            unit="reqps",
            steps=((None, "green"), (0.001, "red")),
        ).span(6)
    )
    d = d.with_panel(
        series_panel(
            "Heartbeat age per node",
            "Seconds since the controller last saw a heartbeat from each node (its own clock).",
            q(f"max by (node) ({age})", "{{node}}"),
            unit="s",
            span=24,
            steps=((None, "green"), (3, "orange"), (60, "red")),
        )
    )
    d = d.with_row(dashboard.Row("Accepted and rejected"))
    d = d.with_panel(
        table.Panel()
        .title("Stalest heartbeats")
        .description("The 20 nodes with the oldest last heartbeat.")
        .datasource(DS)
        .unit("s")
        .height(8)
        .span(8)
        .with_target(q(f"topk(20, max by (node) ({age}))", instant=True, fmt="table").ref_id("A"))
    )
    d = d.with_panel(
        series_panel(
            "Accepted heartbeats/s",
            "All nodes together.",
            q("sum(rate(watchdog_heartbeats_total[$__rate_interval]))", "accepted"),
            unit="reqps",
            span=8,
        )
    )
    d = d.with_panel(
        series_panel(
            "Rejected heartbeats by reason",
            "Each reason is a problem to fix: see the WatchdogHeartbeatsRejected runbook.",
            q(
                "sum by (reason) (rate(watchdog_heartbeats_rejected_total[$__rate_interval]))",
                "{{reason}}",
            ),
            unit="reqps",
            span=8,
        )
    )
    d = d.with_row(dashboard.Row("Peer probes"))
    d = d.with_panel(
        series_panel(
            "Peer reports",
            "Agents' reports on the peers they probe, accepted by the leader per interval: "
            "they change when a peer becomes unreachable or reachable again (and every 30 s).",
            q(
                f"sum(increase(watchdog_peer_reports_total[$__rate_interval]) {LEADER})",
                "accepted",
            ),
            bars=True,
        )
    )
    d = d.with_panel(
        series_panel(
            "Rejected peer reports by reason",
            "Reports refused like heartbeats (wrong topic, malformed, replayed, unknown node).",
            q(
                "sum by (reason) "
                "(increase(watchdog_peer_reports_rejected_total[$__rate_interval])) or vector(0)",
                "{{reason}}",
            ),
            bars=True,
        )
    )
    return d


TIMELINE_PHASES = (
    ("Detection", "watchdog_detection_seconds", "Last contact → UNREACHABLE."),
    ("Reset", "watchdog_reset_seconds", "UNREACHABLE → launcher pods force-deleted."),
    (
        "Reschedule",
        "watchdog_reschedule_seconds",
        "Launcher pod deleted → VMI Running on another node.",
    ),
    ("Failover", "watchdog_failover_seconds", "Last contact → VMI Running elsewhere (per VM)."),
)


def failover_timeline() -> Any:
    d = base(
        "node-watchdog-timeline",
        "node-watchdog / Failover timeline",
        "Distributions of each phase of a failover: detection, reset, reschedule, end to end.",
    )
    d = d.with_row(dashboard.Row("Phase summary (time range)"))
    breakdown = bargauge.Panel().title("p95 per phase (time range)")
    breakdown = (
        breakdown.description("Where the time goes: 95th percentile of each phase.")
        .datasource(DS)
        .unit("s")
        .height(6)
        .span(12)
        .orientation(common.VizOrientation.HORIZONTAL)
        .display_mode(common.BarGaugeDisplayMode.GRADIENT)
        .thresholds(thresholds((None, "green"), (FAILOVER_BUDGET_S, "red")))
    )
    counts = bargauge.Panel().title("Observations per phase (time range)")
    counts = (
        counts.description("How many nodes / VMs each distribution is made of.")
        .datasource(DS)
        .height(6)
        .span(12)
        .orientation(common.VizOrientation.HORIZONTAL)
        .display_mode(common.BarGaugeDisplayMode.BASIC)
        .thresholds(thresholds((None, "blue")))
    )
    for i, (name, metric, _) in enumerate(TIMELINE_PHASES):
        ref = chr(ord("A") + i)
        breakdown = breakdown.with_target(
            q(over_range_quantile(metric, 0.95), name, instant=True).ref_id(ref)
        )
        counts = counts.with_target(
            q(f"sum(increase({metric}_count[$__range]))", name, instant=True).ref_id(ref)
        )
    d = d.with_panel(breakdown).with_panel(counts)
    for name, metric, what in TIMELINE_PHASES:
        d = d.with_row(dashboard.Row(f"{name}: {what}"))
        d = d.with_panel(heatmap_panel(f"{name} distribution", what, metric))
        d = d.with_panel(
            series_panel(
                f"{name} p50 / p95 / p99",
                f"{what} Quantiles over 15 m windows (failovers are rare events).",
                *quantiles(metric, "15m"),
                unit="s",
            )
        )
    d = d.with_row(dashboard.Row("Evacuation of degraded nodes (live migration)"))
    d = d.with_panel(
        heatmap_panel("Migration duration", "Migration start → end.", "watchdog_migration_seconds")
    )
    d = d.with_panel(
        series_panel(
            "Migrations by result",
            "Evacuation migrations finished per interval.",
            q(
                "sum by (result) (increase(watchdog_migrations_total[$__rate_interval]))",
                "{{result}}",
            ),
            bars=True,
        )
    )
    return d


def controller_health() -> Any:
    d = base(
        "node-watchdog-controller",
        "node-watchdog / Controller health",
        "Leader election, actuations, Kubernetes watches, internal queues and source connections.",
    )
    d = d.with_row(dashboard.Row("Leader and sources"))
    d = d.with_panel(
        stat_panel(
            "Leaders",
            "Replicas acting as controller: exactly 1 is healthy.",
            q("sum(watchdog_leader)", instant=True),
            steps=((None, "red"), (1, "green"), (2, "red")),
        ).span(6)
    )
    d = d.with_panel(
        stat_panel(
            "Leader's broker connection",
            "1 while the leading controller is connected to the MQTT broker.",
            q(f'min(watchdog_source_up{{source="broker"}} {LEADER})', instant=True),
            steps=((None, "red"), (1, "green")),
        ).span(6)
    )
    d = d.with_panel(
        stat_panel(
            "Leader's API connection",
            "1 while the leading controller's Kubernetes watches are connected.",
            q(f'min(watchdog_source_up{{source="api"}} {LEADER})', instant=True),
            steps=((None, "red"), (1, "green")),
        ).span(6)
    )
    d = d.with_panel(
        stat_panel(
            "Failed actions (range)",
            "Actuations that failed after their retries in the time range.",
            q(
                'sum(increase(watchdog_actions_total{result="failed"}[$__range])) or vector(0)',
                instant=True,
            ),
        ).span(6)
    )
    d = d.with_panel(
        series_panel(
            "Leader by replica",
            "1 on the replica holding the leader Lease.",
            q("max by (pod, instance) (watchdog_leader)", "{{pod}} {{instance}}"),
        )
    )
    d = d.with_panel(
        series_panel(
            "Source connections by replica",
            "Each replica's connection to the broker and the Kubernetes API.",
            q("min by (pod, instance, source) (watchdog_source_up)", "{{pod}} {{source}}"),
        )
    )
    d = d.with_row(dashboard.Row("Work"))
    d = d.with_panel(
        series_panel(
            "Actions by result",
            "Actuations per second by action and result.",
            q(
                "sum by (action, result) (rate(watchdog_actions_total[$__rate_interval]))",
                "{{action}} {{result}}",
            ),
            unit="ops",
        )
    )
    d = d.with_panel(
        series_panel(
            "Watch restarts",
            "Kubernetes watch restarts per interval by resource and cause (410 relists, "
            "timeouts, errors).",
            q(
                "sum by (resource, cause) "
                "(increase(watchdog_watch_restarts_total[$__rate_interval]))",
                "{{resource}} {{cause}}",
            ),
            bars=True,
        )
    )
    d = d.with_panel(
        series_panel(
            "Queue depths",
            "Items waiting per internal queue on each replica.",
            q("max by (instance, queue) (watchdog_queue_depth)", "{{queue}} {{instance}}"),
        )
    )
    d = d.with_panel(
        series_panel(
            "Heartbeat ingest lag",
            "How far each replica reads heartbeats behind the broker (an echo through its own "
            "connection). Above mqtt.max_ingest_lag_s (1 s) the leader treats heartbeats as "
            "UNKNOWN and holds resets (IngestLag): it is starved of CPU or overloaded.",
            q("max by (pod, instance) (watchdog_ingest_lag_seconds)", "{{pod}} {{instance}}"),
            unit="s",
            steps=((None, "green"), (1, "red")),
        )
    )
    return d


DASHBOARDS: tuple[Callable[[], Any], ...] = (
    failover_overview,
    heartbeats,
    failover_timeline,
    controller_health,
)


def number_panels(model: dict[str, Any]) -> dict[str, Any]:
    """Stable panel ids 1..n in layout order (Grafana needs unique ids per dashboard)."""
    n = 0
    for panel in model.get("panels", []):
        n += 1
        panel["id"] = n
        for inner in panel.get("panels", []):
            n += 1
            inner["id"] = n
    return model


def dashboard_models() -> dict[str, dict[str, Any]]:
    models = {}
    for make in DASHBOARDS:
        built = make().build()
        model = json.loads(json.dumps(built, cls=JSONEncoder))
        models[model["uid"]] = number_panels(model)
    return models


# What Grafana substitutes before a query reaches Prometheus (for promtool and for running every
# panel query against a real Prometheus in a scenario test).
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "30s",
    "$__range": "3h",
    "$node": ".+",
}


def as_prometheus_query(expr: str, variables: dict[str, str] | None = None) -> str:
    """A panel's expression with Grafana's variables replaced as Grafana would send it."""
    for var, value in (variables or GRAFANA_VARIABLES).items():
        expr = expr.replace(var, value)
    if "$" in expr:
        raise ValueError(f"unknown Grafana variable in {expr!r}")
    return expr


def panel_queries(
    models: dict[str, dict[str, Any]] | None = None, variables: dict[str, str] | None = None
) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target: "<uid> #<id> '<title>' <refId>" and the query
    as Prometheus receives it. `models` defaults to the dashboards this module generates."""
    out = []
    for uid, model in sorted((models or dashboard_models()).items()):
        for panel in model["panels"]:
            for p in [panel, *panel.get("panels", [])]:
                for t in p.get("targets", []):
                    where = f"{uid} #{p['id']} {p['title']!r} {t['refId']}"
                    out.append((where, as_prometheus_query(t["expr"], variables)))
    return out


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

HEADER = "# Generated by dashboards/generate.py — do not edit; edit the generator and re-run it.\n"


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=160, allow_unicode=True)


def dump_json(model: Any) -> str:
    return json.dumps(model, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def render(runbook_base: str = RUNBOOK_BASE) -> dict[str, str]:
    """Every generated file: path relative to the repository root → exact text."""
    files: dict[str, str] = {}
    models = dashboard_models()
    for uid, model in sorted(models.items()):
        files[f"dashboards/json/{uid}.json"] = dump_json(model)

    groups = rule_groups(runbook_base)
    files["dashboards/alerts.yaml"] = HEADER + dump_yaml({"groups": groups})

    labels = {
        "app.kubernetes.io/name": "node-watchdog",
        "app.kubernetes.io/component": "monitoring",
    }
    files["deploy/base/prometheusrule.yaml"] = HEADER + dump_yaml(
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PrometheusRule",
            "metadata": {"name": "node-watchdog", "labels": labels},
            "spec": {"groups": groups},
        }
    )
    files["deploy/base/grafana-dashboards.yaml"] = HEADER + dump_yaml(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": "node-watchdog-dashboards",
                # Grafana's sidecar (kube-prometheus-stack, rancher-monitoring) loads every
                # ConfigMap with this label; the annotation names the folder where supported.
                "labels": {**labels, "grafana_dashboard": "1"},
                "annotations": {"grafana_folder": "node-watchdog"},
            },
            "data": {f"{uid}.json": dump_json(m) for uid, m in sorted(models.items())},
        }
    )
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="root to write into (default: repo)")
    parser.add_argument(
        "--runbook-base", default=RUNBOOK_BASE, help="URL of OPERATIONS.md for runbook links"
    )
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if a file would change"
    )
    args = parser.parse_args(argv)
    stale = []
    for rel, text in render(args.runbook_base).items():
        path = args.out / rel
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(rel)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    if stale:
        print("out of date (run dashboards/generate.py):", *stale, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
