"""The alert rules: valid, unit-tested with promtool, each with a runbook an operator can follow.

dashboards/alerts_test.yaml holds promtool unit tests: for every alert a case where it fires
and cases where it must stay silent (short blips, standbys' views, deliberate holds). A silent
case that would pass whatever the rule says proves nothing, so each alert's silent cases are
also run against a sabotaged rule (`vector(1)`, `for: 0m`: always firing) and must
then fail, each one.

In CI (CI=true) a missing promtool fails instead of skipping.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from watchdog.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "dashboards"
RULES = DASHBOARDS / "alerts.yaml"
RULE_TESTS = DASHBOARDS / "alerts_test.yaml"
OPERATIONS = ROOT / "docs" / "OPERATIONS.md"
ISSUE_ALERTS = {
    "WatchdogNodeUnreachable",
    "WatchdogFalselyReadyPods",
    "WatchdogFailoverSlowerThanBudget",
    "WatchdogResetsHeld",
    "WatchdogPolicyInvalid",
    "WatchdogNoLeader",
    "WatchdogHeartbeatsRejected",
    "WatchdogAgentMissing",
    "WatchdogNodeUnfenced",
    "WatchdogFenceFailing",
    "WatchdogBrokerCertificateExpiring",
}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        msg = "promtool is not installed (Debian package prometheus; .ci/run installs it)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return found


def alerts() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def run(*args: str | Path, cwd: Path = DASHBOARDS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def cases() -> dict[str, dict[str, set[tuple[str, str]]]]:
    """alert → {"fires": {(test, eval_time)}, "silent": {(test, eval_time)}} of alerts_test.yaml."""
    out: dict[str, dict[str, set[tuple[str, str]]]] = {}
    for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in test.get("alert_rule_test", []):
            kind = "fires" if check.get("exp_alerts") else "silent"
            entry = out.setdefault(check["alertname"], {"fires": set(), "silent": set()})
            entry[kind].add((test["name"], check["eval_time"]))
    return out


def test_the_issue_alerts_exist_with_severity_summary_description_and_runbook() -> None:
    rules = alerts()
    assert {r["alert"] for r in rules} == ISSUE_ALERTS
    for r in rules:
        assert r["labels"]["severity"] in {"warning", "critical"}, r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
        assert r["annotations"]["runbook_url"] == f"docs/OPERATIONS.md#{r['alert'].lower()}"


def test_every_runbook_link_has_its_section_in_operations_md() -> None:
    headings = re.findall(r"^#{2,4} (.+)$", OPERATIONS.read_text(), flags=re.MULTILINE)
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-") for h in headings}
    for r in alerts():
        anchor = r["annotations"]["runbook_url"].split("#", 1)[1]
        assert anchor in anchors, f"{r['alert']}: no section #{anchor} in docs/OPERATIONS.md"


def test_alert_expressions_use_only_declared_metrics() -> None:
    declared = set()
    for family in Metrics().registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
        declared |= {family.name + s for s in suffixes.get(family.type, [""])}
    for r in alerts():
        for name in re.findall(r"\bwatchdog_[A-Za-z0-9_]+", r["expr"]):
            assert name in declared, f"{r['alert']} queries undeclared {name}"


def test_promtool_check_rules_passes() -> None:
    result = run("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ISSUE_ALERTS)} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = run("test", "rules", RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_case_and_a_silent_case() -> None:
    found = cases()
    assert set(found) == ISSUE_ALERTS
    for alert, kinds in found.items():
        assert kinds["fires"], f"{alert}: no case where it fires"
        assert kinds["silent"], f"{alert}: no case where it must stay silent"


@pytest.mark.parametrize("alert", sorted(ISSUE_ALERTS))
def test_the_silent_cases_catch_an_alert_that_always_fires(alert: str, tmp_path: Path) -> None:
    data = yaml.safe_load(RULES.read_text())
    for group in data["groups"]:
        for rule in group["rules"]:
            if rule["alert"] == alert:
                rule["expr"] = "vector(1)"
                rule["for"] = "0m"
    (tmp_path / "alerts.yaml").write_text(yaml.safe_dump(data))
    shutil.copyfile(RULE_TESTS, tmp_path / "alerts_test.yaml")
    result = run("test", "rules", "alerts_test.yaml", cwd=tmp_path)
    assert result.returncode != 0
    report = result.stdout + result.stderr
    failed = set(re.findall(r"name: (.+?),\s*\n\s*alertname: (\w+), time: (\w+),", report))
    missed = {
        (name, at) for name, at in cases()[alert]["silent"] if (name, alert, at) not in failed
    }
    assert not missed, f"silent cases that pass even when {alert} always fires: {missed}"
