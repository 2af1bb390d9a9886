"""The dashboards and alerts against a real Prometheus scraping a power-off (issue 6).

Real control plane, real Mosquitto, real agents, two real `node-watchdog controller` processes
(a leader and a standby, so the dashboards' "leader's view" scoping meets real data), and a real
Prometheus (Debian's package) scraping both controllers every second and evaluating
dashboards/alerts.yaml every second. The agents are not scraped: they serve no /metrics
(WATCHDOG_METRICS_PORT=0 in the test cluster; only `node-watchdog run` replicas do).

A node is powered off and its VMs come back elsewhere; then

- every panel query of the committed dashboards (dashboards/json, Grafana's variables replaced
  as Grafana would send them for this run) is accepted by Prometheus, and returns data unless
  it is listed in NO_DATA_IN_A_POWER_OFF with the reason; the panels an operator reads during a
  failover show what happened (the node down, its heartbeat ageing, one detection, one reset,
  one failover per VM, the actions, exactly one leader, the policy's reset period);
- every alert evaluates without error in Prometheus' rule engine; WatchdogNodeUnreachable fired
  with its rendered summary, and the alerts a clean power-off must not raise (no leader, policy
  invalid, heartbeats rejected, resets held, ...) stayed silent over the whole run.

In CI (CI=true) a missing `prometheus` binary fails instead of skipping.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml

from tests.integration.prometheus_server import (
    Prometheus,
    PrometheusError,
    prometheus_exe_or_skip,
    values,
)
from tests.integration.watchdog_env import (
    POLICY_PERIOD_S,
    UNREACHABLE_AFTER_S,
    WatchdogEnv,
    default_config,
    restarted_elsewhere,
)

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.broker,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(300),
]

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = ROOT / "dashboards" / "generate.py"
JSON_DIR = ROOT / "dashboards" / "json"
ALERT_RULES = ROOT / "dashboards" / "alerts.yaml"
NODE = "node-1"
FAILOVER_BUDGET_S = 30.0
SCRAPE_INTERVAL_S = 1

# The shipped `for:` durations are minutes, longer than this whole scenario. Prometheus loads a
# copy of alerts.yaml whose expressions are byte for byte the shipped ones and whose `for:` is
# divided by FOR_DIVISOR (1m → 3 s, 5m → 15 s), so pending → firing is observable here; the real
# durations are proven by the promtool unit tests (dashboards/alerts_test.yaml).
FOR_DIVISOR = 20

# Panels that legitimately show nothing after a clean power-off (title → why). Any other panel
# without data fails the test.
NO_DATA_IN_A_POWER_OFF = {
    "Rejected heartbeats by reason": "no heartbeat is rejected: the counter has no label set yet",
    "Migrations by result": "a dead node is reset, not evacuated: no live migration starts",
    "Watch restarts": "watches restart on timeouts and 410s, which a short run need not see",
}

# Alerts a clean power-off must raise, and must not raise (over the whole run).
MUST_FIRE = {"WatchdogNodeUnreachable"}
MUST_STAY_SILENT = {
    "WatchdogNoLeader",  # a leader all along
    "WatchdogPolicyInvalid",  # the policy setting is valid
    "WatchdogHeartbeatsRejected",  # only genuine agents publish
    "WatchdogResetsHeld",  # one node of four is not a storm; broker and API stay up
    "WatchdogNodeUnfenced",  # every agent's fence is backed by its (emulated) watchdog device
    "WatchdogFenceFailing",  # fence_mode self: the controller runs no fence of its own
    "WatchdogBrokerCertificateExpiring",  # no agent holds a broker certificate here
    # Checked apart, against what happened (see the test): silent while the dead node's heartbeat
    # is younger than the alert's 60 s, and while failovers stay within the 30 s budget.
    # "WatchdogAgentMissing", "WatchdogFailoverSlowerThanBudget",
}
# A silent alert proves something only if what it compares has data: each expression without its
# threshold must return data over the run, except these (title → why).
NOTHING_TO_COMPARE = {
    "WatchdogHeartbeatsRejected": "the rejection counter has no series before a first rejection",
    "WatchdogFenceFailing": "no fence run by the controller (fence_mode self), so no failed one",
    "WatchdogBrokerCertificateExpiring": "an agent's gauge: agents are not scraped here, and the "
    "test cluster's broker is anonymous, so no agent holds a certificate (promtool's cases in "
    "dashboards/alerts_test.yaml prove it fires)",
}
# WatchdogFalselyReadyPods: the leader marks the pods NotReady right at UNREACHABLE, so the gauge
# may be non-zero for less than a scrape interval; the alert may go pending but is not asserted.


def load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("dashboards_generate", GENERATOR)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def committed_dashboards() -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(JSON_DIR.glob("*.json"))}


def shortened_rules(path: Path) -> Path:
    """A copy of alerts.yaml with every `for:` divided by FOR_DIVISOR, expressions unchanged."""
    rules = yaml.safe_load(ALERT_RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            seconds = duration_s(rule.get("for", "0s"))
            rule["for"] = f"{math.ceil(seconds / FOR_DIVISOR)}s"
    path.write_text(yaml.safe_dump(rules, sort_keys=False, width=1000))
    return path


def without_threshold(expr: str) -> str:
    """What an alert compares: its expression without the trailing `> N` / `< N` (and without
    the `or absent(...)` arm of WatchdogNoLeader)."""
    expr = expr.split(" or absent(")[0]
    return re.sub(r"\s*[<>]=?\s*[0-9.]+\s*$", "", expr)


def duration_s(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+)([smh])", text))


@pytest.fixture(scope="module")
def prometheus_exe() -> str:
    return prometheus_exe_or_skip()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(prometheus_exe, control_plane_binaries, tmp_path_factory: pytest.TempPathFactory):
    work = Path(tmp_path_factory.mktemp("prometheus-scrape"))
    async with WatchdogEnv(default_config(), control_plane_binaries, work, controllers=2) as e:
        yield e


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def prom(env, prometheus_exe, tmp_path_factory: pytest.TempPathFactory):
    work = Path(tmp_path_factory.mktemp("prometheus"))
    server = Prometheus(
        prometheus_exe,
        work,
        {ctl.name: f"127.0.0.1:{ctl.port}" for ctl in env.controllers},
        [shortened_rules(work / "alerts.yaml")],
        scrape_interval=f"{SCRAPE_INTERVAL_S}s",
        evaluation_interval=f"{SCRAPE_INTERVAL_S}s",
    )
    await server.start()
    try:
        yield server
    finally:
        server.stop()


async def scalar(prom: Prometheus, expr: str, at: float | None = None) -> float | None:
    result = await prom.query(expr, time.time() if at is None else at)
    return float(result[0]["value"][1]) if result else None


async def all_rules_evaluated_after(prom: Prometheus, t: float) -> bool:
    rules = await prom.rules()
    return bool(rules) and all(_rfc3339_s(r["lastEvaluation"]) > t for r in rules)


def _rfc3339_s(stamp: str) -> float:
    # Prometheus writes nanoseconds; datetime parses at most microseconds.
    return datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", stamp)).timestamp()


async def test_every_panel_and_alert_against_a_real_prometheus_scraping_a_power_off(env, prom):
    try:
        await _scenario_and_checks(env, prom)
    except BaseException:
        print(f"\n--- prometheus log tail ({prom.log_path}):\n{prom.log_tail()}")
        raise


async def _scenario_and_checks(env: WatchdogEnv, prom: Prometheus) -> None:
    c = env.cluster
    # --- Prometheus sees the healthy cluster: targets up, one leader, every node's heartbeat.
    await env.wait_for(prom.targets_up, 60, "prometheus scraping both controllers")
    nodes = len(c.fleet.members)
    fresh = "count(watchdog_heartbeat_age_seconds and on (instance) (watchdog_leader == 1))"

    async def healthy_in_prometheus() -> bool:
        return await scalar(prom, "sum(watchdog_leader)") == 1 and await scalar(
            prom, fresh
        ) == float(nodes)

    await env.wait_for(healthy_in_prometheus, 60, "the leader and every heartbeat in prometheus")
    seen = time.time()
    await env.wait_for(
        lambda: all_rules_evaluated_after(prom, seen), 60, "every alert rule evaluated on data"
    )
    t_start = time.time()

    # --- The power-off, to completion: every VM of the node running on another node.
    vms = c.vms_on(NODE)
    assert vms, f"{NODE} runs no VM"
    t0 = await env.fault("poweroff", NODE)
    await env.wait_for(
        lambda: all(restarted_elsewhere(c, vm, NODE, t0) for vm in vms) and c.all_running(),
        90,
        f"every VM of {NODE} running elsewhere",
    )
    ground_truth_s = [restarted_elsewhere(c, vm, NODE, t0).started_mono - t0 for vm in vms]
    await env.wait_for(lambda: env.phase(NODE) == "Reset", 30, f"{NODE} Reset")

    # Prometheus has scraped the leader's last failover observation, and the (shortened-`for`)
    # unreachable alert is firing: the node stays powered off, so it is still down.
    async def failovers_scraped() -> bool:
        n = await scalar(prom, "sum(watchdog_failover_seconds_count)")
        return n is not None and n >= len(vms)

    async def unreachable_firing() -> bool:
        return any(
            a["labels"]["alertname"] == "WatchdogNodeUnreachable" and a["state"] == "firing"
            for a in await prom.alerts()
        )

    await env.wait_for(unreachable_firing, 30, "WatchdogNodeUnreachable firing")
    firing = [a for a in await prom.alerts() if a["state"] == "firing"]
    await env.wait_for(failovers_scraped, 30, "every failover observation in prometheus")

    # Range queries evaluate on a grid (start, start + step, ...): end it at t_end, and let two
    # more scrapes land first, so that the last changes sit inside the grid's rate windows.
    last_change = time.time()

    async def scraped_since_last_change() -> bool:
        oldest = await scalar(prom, "min(timestamp(watchdog_leader))")
        return oldest is not None and oldest >= last_change + 2 * SCRAPE_INTERVAL_S

    await env.wait_for(scraped_since_last_change, 30, "two scrapes after the failover")
    t_end = time.time()
    t_start = t_end - math.floor(t_end - t_start)
    window = (t_start, t_end)
    print(
        f"\nrun window {t_end - t_start:.1f}s; VMs {vms} running elsewhere after "
        f"{[round(s, 1) for s in ground_truth_s]} s"
    )

    # The firing alert is what an operator receives: its templates rendered with real data.
    unreachable = next(a for a in firing if a["labels"]["alertname"] == "WatchdogNodeUnreachable")
    assert unreachable["labels"]["severity"] == "warning"
    assert unreachable["annotations"]["summary"] == "1 node(s) unreachable", unreachable
    assert unreachable["annotations"]["runbook_url"].endswith("#watchdognodeunreachable")

    problems = await check_panels(prom, window, nodes, len(vms))
    problems += await check_alerts(prom, window, ground_truth_s)
    assert not problems, "\n".join(problems)


# --- panels -----------------------------------------------------------------------------------


def grafana_variables(window: tuple[float, float]) -> dict[str, str]:
    """What Grafana sends for a dashboard showing exactly this run, scraped every second:
    $__interval = the step (1 s), $__rate_interval = max($__interval + scrape interval,
    4 * scrape interval) = 4 s, $__range = the run, $node = the "All" value."""
    return {
        "$__rate_interval": f"{4 * SCRAPE_INTERVAL_S}s",
        "$__interval": f"{SCRAPE_INTERVAL_S}s",
        "$__range": f"{math.ceil(window[1] - window[0])}s",
        "$node": ".*",
    }


def panel_targets(models: dict[str, dict[str, Any]]) -> list[tuple[str, bool]]:
    """(panel title, instant?) of every target, in panel_queries()' order."""
    out = []
    for _, model in sorted(models.items()):
        for panel in model["panels"]:
            for p in [panel, *panel.get("panels", [])]:
                out.extend((p["title"], bool(t.get("instant"))) for t in p.get("targets", []))
    return out


def by_label(result: list[dict[str, Any]], label: str) -> dict[str, list[float]]:
    """Sample values (instant or range) per value of `label`."""
    out: dict[str, list[float]] = {}
    for series in result:
        samples = series.get("values") or [series["value"]]
        out.setdefault(series["metric"].get(label, ""), []).extend(float(v) for _, v in samples)
    return out


def _finite(vs: list[float]) -> list[float]:
    return [v for v in vs if not math.isnan(v)]


async def check_panels(
    prom: Prometheus, window: tuple[float, float], nodes: int, vms: int
) -> list[str]:
    gen = load_generator()
    models = committed_dashboards()
    queries = gen.panel_queries(models, grafana_variables(window))
    targets = panel_targets(models)
    assert len(queries) == len(targets) and len(queries) >= 50, (len(queries), len(targets))

    # What the scenario must show, per panel title (checked on every target of that title).
    Check = Callable[[list[dict[str, Any]]], bool]
    down = {"Unreachable", "Fencing", "Resetting", "Reset"}
    expect: dict[str, tuple[str, Check]] = {
        "Leaders": ("exactly one leader", lambda r: values_of(r) == [1.0]),
        "Leader's broker connection": ("connected", lambda r: values_of(r) == [1.0]),
        "Leader's API connection": ("connected", lambda r: values_of(r) == [1.0]),
        "Leader by replica": (
            "one replica leads, the other stands by",
            lambda r: {max(vs) for vs in by_label(r, "pod").values()} == {0.0, 1.0},
        ),
        "Active failovers": ("the node in Reset", lambda r: values_of(r) == [1.0]),
        "Nodes with stale heartbeats": ("the dead node", lambda r: values_of(r) == [1.0]),
        "Oldest heartbeat": (
            "the dead node's age",
            lambda r: values_of(r)[0] > UNREACHABLE_AFTER_S,
        ),
        "Policy reset period": (
            f"the policy period, {POLICY_PERIOD_S} s",
            lambda r: set(_finite(values_of(r))) == {POLICY_PERIOD_S},
        ),
        "Nodes per phase": (
            "a down phase during the outage, the others Healthy",
            lambda r: (
                max(max(by_label(r, "phase").get(p, [0.0])) for p in down) == 1.0
                and max(by_label(r, "phase")["Healthy"]) == float(nodes)
            ),
        ),
        "Heartbeat age per node": (
            f"{NODE}'s heartbeat ageing past the unreachable threshold",
            lambda r: max(by_label(r, "node")[NODE]) > UNREACHABLE_AFTER_S,
        ),
        # A counter's label set is born at 1 when it first moves, and increase() cannot see
        # a birth: the first transition of each kind after a controller start draws no bar
        # (documented in OPERATIONS.md). That the series are there is what can be asserted.
        "Phase transitions": (
            "the failover path's transitions",
            lambda r: {"Unreachable", "Fencing", "Resetting", "Reset"} <= set(by_label(r, "to")),
        ),
        # Action and migration counters are born at 0 (watchdog/metrics.py), so their
        # increase() is visible from the first action on, and "failed" has a series at 0.
        "Actions by result": (
            "successful actions, no failed one",
            lambda r: (
                max(by_label(r, "result").get("success", [0.0])) > 0
                and max(by_label(r, "result").get("failed", [0.0])) == 0
            ),
        ),
        # Counted down to the reset and gone with it: the announced time was kept (a series
        # still there after it, or a jump, would show a reset later than promised).
        "Reset due in, per node": (
            f"{NODE} counting down to 0, gone at its reset",
            lambda r: (
                set(by_label(r, "node")) == {NODE}
                and max(by_label(r, "node")[NODE]) > 0
                and min(by_label(r, "node")[NODE]) > -3 * SCRAPE_INTERVAL_S
            ),
        ),
        "Rejected heartbeats/s": ("none", lambda r: values_of(r) == [0.0]),
        "Failed actions (range)": ("none", lambda r: values_of(r) == [0.0]),
        "Accepted heartbeats/s": ("heartbeats flowing", lambda r: max(values_of(r)) > 0),
        "Observations per phase (time range)": (
            "detection, reset, reschedule, failover observed",
            lambda r: min(values_of(r)) > 0.5,
        ),
        "Failovers in range": (f"{vms} VM failovers", lambda r: values_of(r)[0] >= vms - 0.5),
        "Failover p50 (range)": ("a latency", lambda r: 0 < values_of(r)[0] < math.inf),
        "Failover p95 (range)": ("a latency", lambda r: 0 < values_of(r)[0] < math.inf),
        "p95 per phase (time range)": ("a latency", lambda r: 0 < values_of(r)[0] < math.inf),
        "Queue depths": ("every queue of both replicas", lambda r: len(r) >= 2),
        # The dead node's peers reported it: the leader accepted reports during the run.
        "Peer reports": ("reports accepted", lambda r: max(values_of(r)) > 0),
        "Heartbeat ingest lag": (
            "both replicas measured, neither blind",
            lambda r: len(r) >= 2 and max(values_of(r)) < 1.0,
        ),
    }
    for name in ("Detection", "Reset", "Reschedule", "Failover"):
        expect[f"{name} distribution"] = ("an observation", lambda r: max(values_of(r)) > 0)
        expect[f"{name} p50 / p95 / p99"] = ("a latency", lambda r: bool(_finite(values_of(r))))

    problems: list[str] = []
    shown: set[str] = set()
    for (where, expr), (title, instant) in zip(queries, targets, strict=True):
        try:
            if instant:
                result = await prom.query(expr, window[1])
            else:
                result = await prom.query_range(expr, *window, step=SCRAPE_INTERVAL_S)
        except PrometheusError as e:
            problems.append(f"panel {where}: rejected by prometheus: {e}\n    {expr}")
            continue
        if not result:
            if title not in NO_DATA_IN_A_POWER_OFF:
                problems.append(f"panel {where}: no data\n    {expr}")
            continue
        shown.add(title)
        if title in expect:
            what, ok = expect[title]
            try:
                good = ok(result)
            except (KeyError, IndexError, ValueError):
                good = False
            if not good:
                problems.append(f"panel {where}: should show {what}, shows {brief(result)}")
    missing = set(expect) - shown
    problems += [f"panel {t!r}: expected, but no such panel has data" for t in sorted(missing)]
    print(f"panels: {len(queries)} queries, {len(shown)} titles with data, {len(problems)} issues")
    return problems


def values_of(result: list[dict[str, Any]]) -> list[float]:
    """Every value of an instant or range result."""
    if result and "values" in result[0]:
        return values(result)
    return [float(s["value"][1]) for s in result]


def brief(result: list[dict[str, Any]]) -> str:
    parts = []
    for s in result[:6]:
        vs = values_of([s])
        parts.append(f"{s['metric']} max={max(vs, default=None)} last={vs[-1] if vs else None}")
    return "; ".join(parts)


# --- alerts -----------------------------------------------------------------------------------


async def check_alerts(
    prom: Prometheus, window: tuple[float, float], ground_truth_s: list[float]
) -> list[str]:
    shipped = {
        r["alert"]: r["expr"]
        for g in yaml.safe_load(ALERT_RULES.read_text())["groups"]
        for r in g["rules"]
    }
    problems: list[str] = []

    # Every rule loaded and evaluated by the rule engine without error, expressions unchanged.
    loaded = {r["name"]: r for r in await prom.rules() if r["type"] == "alerting"}
    assert set(loaded) == set(shipped), (set(loaded), set(shipped))
    for name, rule in sorted(loaded.items()):
        if rule["health"] != "ok" or rule.get("lastError"):
            problems.append(f"alert {name}: {rule['health']} {rule.get('lastError')}")
        if rule["query"] != shipped[name]:
            problems.append(f"alert {name}: loaded {rule['query']!r}, shipped {shipped[name]!r}")

    # Every expression over the run, and what the rule engine made of it (ALERTS).
    active: dict[str, list[float]] = {}
    states: dict[str, set[str]] = {}
    for name, expr in sorted(shipped.items()):
        try:
            active[name] = values(await prom.query_range(expr, *window, step=SCRAPE_INTERVAL_S))
        except PrometheusError as e:
            problems.append(f"alert {name}: expression rejected: {e}")
            continue
        alerts = await prom.query_range(
            f'ALERTS{{alertname="{name}"}}', *window, step=SCRAPE_INTERVAL_S
        )
        states[name] = {s["metric"]["alertstate"] for s in alerts}
    print("alert states over the run:", {n: sorted(s) for n, s in states.items()})

    for name in sorted(MUST_FIRE):
        if not active.get(name) or "firing" not in states.get(name, set()):
            problems.append(f"alert {name}: should have fired, states {states.get(name)}")
    for name in sorted(MUST_STAY_SILENT):
        if active.get(name) or states.get(name):
            problems.append(
                f"alert {name}: must stay silent, expression {(active.get(name) or [])[:5]} "
                f"states {states.get(name)}"
            )

    # Silent because of the values, not because the expression queries nothing.
    for name, expr in sorted(shipped.items()):
        if name in NOTHING_TO_COMPARE:
            continue
        compared = without_threshold(expr)
        if not await prom.query_range(compared, *window, step=SCRAPE_INTERVAL_S):
            problems.append(f"alert {name}: {compared!r} has no data: the alert can never fire")

    # WatchdogAgentMissing pages on a heartbeat older than 60 s: the dead node's is younger
    # than that for the whole run only if the run is short enough; either way the alert must
    # agree with the heartbeat age Prometheus scraped.
    oldest = max(
        values(
            await prom.query_range(
                "max(watchdog_heartbeat_age_seconds and on (instance) (watchdog_leader == 1))",
                *window,
            )
        )
    )
    if oldest <= 60 and active.get("WatchdogAgentMissing"):
        problems.append(f"alert WatchdogAgentMissing: active with the oldest heartbeat {oldest}s")
    if oldest > 65 and not active.get("WatchdogAgentMissing"):
        problems.append(f"alert WatchdogAgentMissing: silent with a heartbeat {oldest}s old")

    # WatchdogFailoverSlowerThanBudget: a failover well within the 30 s budget must not page.
    if max(ground_truth_s) < FAILOVER_BUDGET_S - 5:
        if active.get("WatchdogFailoverSlowerThanBudget") or states.get(
            "WatchdogFailoverSlowerThanBudget"
        ):
            problems.append(
                f"alert WatchdogFailoverSlowerThanBudget: active, VMs back in {ground_truth_s}"
            )
    else:
        print(f"failover near or over budget on this machine ({ground_truth_s}): not asserted")
    return problems
