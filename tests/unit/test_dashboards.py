"""The Grafana dashboards: generated as code, committed byte for byte, querying real metrics.

- Running dashboards/generate.py (a fresh process, so hash seeds differ) reproduces every
  committed file exactly: dashboard JSON, alerts.yaml, the PrometheusRule and the ConfigMap.
- Every metric name a panel or variable queries is one watchdog/metrics.py declares.
- Every panel query is valid PromQL: promtool checks each one as a recording rule, with
  Grafana's variables replaced by what Grafana would send.

In CI (CI=true) a missing promtool fails instead of skipping.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from watchdog.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = ROOT / "dashboards" / "generate.py"
JSON_DIR = ROOT / "dashboards" / "json"
METRIC = re.compile(r"\bwatchdog_[A-Za-z0-9_]+")
TITLES = {
    "node-watchdog-overview": "node-watchdog / Failover overview",
    "node-watchdog-heartbeats": "node-watchdog / Heartbeats",
    "node-watchdog-timeline": "node-watchdog / Failover timeline",
    "node-watchdog-controller": "node-watchdog / Controller health",
}


def load_generator():
    spec = importlib.util.spec_from_file_location("dashboards_generate", GENERATOR)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def require_tool(name: str, hint: str) -> str:
    """The tool's path; a missing tool skips locally and fails in CI (CI=true)."""
    found = shutil.which(name)
    if found is None:
        msg = f"{name} is not installed ({hint})"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return found


def dashboards() -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(JSON_DIR.glob("*.json"))}


def panels(model: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in model["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def queries(model: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target."""
    return [
        (f"{model['uid']} #{p['id']} {p['title']!r} {t['refId']}", t["expr"])
        for p in panels(model)
        for t in p.get("targets", [])
    ]


def declared_metric_names() -> set[str]:
    """Every sample name the service can expose, from watchdog/metrics.py itself."""
    names = set()
    for family in Metrics().registry.collect():
        if family.type == "counter":
            names |= {f"{family.name}_total", f"{family.name}_created"}
        elif family.type == "histogram":
            names |= {f"{family.name}_{s}" for s in ("bucket", "count", "sum", "created")}
        else:
            names.add(family.name)
    return names


def test_regenerating_reproduces_the_committed_files_byte_for_byte(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONHASHSEED": "random"}
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert [str(p) for p in generated] == [
        "dashboards/alerts.yaml",
        "dashboards/json/node-watchdog-controller.json",
        "dashboards/json/node-watchdog-heartbeats.json",
        "dashboards/json/node-watchdog-overview.json",
        "dashboards/json/node-watchdog-timeline.json",
        "deploy/base/grafana-dashboards.yaml",
        "deploy/base/prometheusrule.yaml",
    ]
    stale = [str(p) for p in generated if (tmp_path / p).read_bytes() != (ROOT / p).read_bytes()]
    assert not stale, f"committed files differ from the generator's output: {stale}"
    assert sorted(p.name for p in JSON_DIR.glob("*.json")) == sorted(
        p.name for p in generated if p.parent == Path("dashboards/json")
    ), "dashboards/json holds a file the generator does not make"


def test_the_sidecar_configmap_carries_exactly_the_committed_dashboards() -> None:
    cm = yaml.safe_load((ROOT / "deploy" / "base" / "grafana-dashboards.yaml").read_text())
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"] == {p.name: p.read_text() for p in sorted(JSON_DIR.glob("*.json"))}


def test_the_four_dashboards_are_there_with_unique_ids_and_the_datasource_variable() -> None:
    models = dashboards()
    assert {uid: m["title"] for uid, m in models.items()} == TITLES
    for uid, model in models.items():
        assert model["uid"] == uid
        ids = [p["id"] for p in panels(model)]
        assert len(ids) == len(set(ids)), f"{uid}: duplicate panel ids"
        variables = {v["name"]: v for v in model["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        for p in panels(model):
            assert 0 <= p["gridPos"]["x"] and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
            if p["type"] == "row":
                continue
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert p["targets"], f"{uid}: panel {p['title']!r} has no query"
            assert p.get("description"), f"{uid}: panel {p['title']!r} explains nothing"
            refs = [t["refId"] for t in p["targets"]]
            assert len(refs) == len(set(refs)) and all(refs), f"{uid}: {p['title']!r} refIds"


def test_each_dashboard_shows_what_the_issue_asks_for() -> None:
    text = {uid: "\n".join(q for _, q in queries(m)) for uid, m in dashboards().items()}
    overview = text["node-watchdog-overview"]
    for needle in (
        "watchdog_nodes",
        "histogram_quantile(0.5, sum by (le) (increase(watchdog_failover_seconds_bucket",
        "histogram_quantile(0.95, sum by (le) (increase(watchdog_failover_seconds_bucket",
        "watchdog_false_ready_pods",
        "watchdog_resets_held",
    ):
        assert needle in overview, needle
    heartbeats = text["node-watchdog-heartbeats"]
    assert "max by (node) (watchdog_heartbeat_age_seconds" in heartbeats
    assert "sum by (reason) (rate(watchdog_heartbeats_rejected_total" in heartbeats
    timeline = text["node-watchdog-timeline"]
    for metric in ("detection", "reset", "reschedule", "failover"):
        assert f"watchdog_{metric}_seconds_bucket" in timeline, metric
    controller = text["node-watchdog-controller"]
    for metric in (
        "watchdog_leader",
        "watchdog_actions_total",
        "watchdog_watch_restarts_total",
        "watchdog_queue_depth",
    ):
        assert metric in controller, metric


def test_every_query_uses_only_metrics_the_service_declares() -> None:
    declared = declared_metric_names()
    used: dict[str, set[str]] = {}
    for uid, model in dashboards().items():
        texts = [q for _, q in queries(model)]
        texts += [str(v.get("query", "")) for v in model["templating"]["list"]]
        for text in texts:
            for name in METRIC.findall(text):
                used.setdefault(name, set()).add(uid)
    unknown = {name: sorted(uids) for name, uids in used.items() if name not in declared}
    assert not unknown, f"queried but not declared in watchdog/metrics.py: {unknown}"
    assert len(used) >= 15  # the check is not vacuous


def test_every_panel_query_is_valid_promql(tmp_path: Path) -> None:
    promtool = require_tool("promtool", "Debian package prometheus; .ci/run installs it")
    # The committed JSON, with Grafana's variables replaced as Grafana would send them.
    all_queries = load_generator().panel_queries(dashboards())
    assert len(all_queries) == sum(len(queries(m)) for m in dashboards().values())
    rules = [{"record": f"dashboard_query:{i}", "expr": q} for i, (_, q) in enumerate(all_queries)]
    path = tmp_path / "dashboard-queries.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        # Name the offending panels, not just rule indexes.
        bad = sorted({int(i) for i in re.findall(r"dashboard_query:(\d+)", result.stdout)})
        detail = "\n".join(f"{all_queries[i][0]}: {all_queries[i][1]}" for i in bad)
        pytest.fail(f"invalid PromQL:\n{result.stdout}{result.stderr}\n{detail}")
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout
