"""Chaos scenarios: every shipped file parses; a bad one is refused with exit 2 and the path of
the offending field; the watchdog's settings are compressed by the scenario's time scale; the
numbers of a report (percentiles, verdicts, budgets) and its files come out right."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from chaos.cli import main
from chaos.harness import measure, report, scenario
from chaos.harness.measure import RunResult, VmTimeline
from chaos.harness.runner import ScenarioResult
from chaos.harness.settings import FIELDS, WALL_FLOORS_S, scale_settings

REQUIRED = {
    "power-off",
    "partition",
    "nic-flap",
    "broker-outage",
    "api-outage",
    "leader-power-off",
    "storm",
    "kubelet-only",
    "reboot",
}

MINIMAL = {
    "name": "t",
    "cluster": {"nodes": 3, "vms": 3},
    "faults": [{"at_s": 0, "action": "poweroff", "node": "node-3"}],
}


def write(tmp_path: Path, data: object, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def with_(**changes: object) -> dict[str, object]:
    data = json.loads(json.dumps(MINIMAL))
    data.update(changes)
    return data


# --- shipped scenarios ------------------------------------------------------------------------


def test_the_required_scenarios_are_shipped():
    assert REQUIRED <= set(scenario.shipped())


@pytest.mark.parametrize("name", sorted(scenario.shipped()))
def test_every_shipped_scenario_parses_and_asserts_something(name):
    sc = scenario.load(name)
    assert sc.name == name
    assert "watchdog" in sc.systems and "watchdog" in sc.expect.systems
    assert 0 < sc.time_scale <= 1
    e = sc.expect
    asserted = (
        e.resets != "any" or e.fences != "any" or e.disruptions != "any" or e.held or sc.budgets
    )
    assert asserted, f"{name} asserts no more than the invariants"


def test_a_shipped_scenario_is_found_by_name_or_path():
    by_name = scenario.load("power-off")
    by_path = scenario.load(scenario.shipped()["power-off"])
    assert by_name == by_path


def test_list_prints_every_shipped_scenario(capsys):
    assert main(["run", "--list"]) == 0
    out = capsys.readouterr().out
    for name in REQUIRED:
        assert name in out


# --- bad files: exit 2, naming the field path -------------------------------------------------


@pytest.mark.parametrize(
    ("data", "path", "words"),
    [
        pytest.param(
            with_(faults=[{"at_s": 0, "action": "explode", "node": "node-1"}]),
            "faults[0].action",
            "unknown fault 'explode'",
            id="unknown fault",
        ),
        pytest.param(
            with_(
                faults=[
                    {"at_s": 0, "action": "poweroff", "node": "node-1"},
                    {"at_s": -5, "action": "poweron", "node": "node-1"},
                ]
            ),
            "faults[1].at_s",
            "greater than or equal to 0",
            id="negative time",
        ),
        pytest.param(
            with_(faults=[{"at_s": 0, "action": "poweroff", "node": "node-9"}]),
            "faults[0].node",
            "no node 'node-9' in a 3-node cluster",
            id="node that does not exist",
        ),
        pytest.param(
            with_(faults=[{"at_s": 0, "action": "poweroff", "nodes": ["node-1", "node-4"]}]),
            "faults[0].nodes[1]",
            "no node 'node-4'",
            id="one of several nodes does not exist",
        ),
        pytest.param(
            with_(faults=[{"at_s": 1, "action": "poweroff", "duration_s": -1, "node": "node-1"}]),
            "faults[0].duration_s",
            "greater than or equal to 0",
            id="negative duration",
        ),
        pytest.param(
            with_(faults=[{"at_s": 0, "action": "broker-outage", "node": "node-1"}]),
            "faults[0].node",
            "cluster-wide",
            id="cluster fault with a node",
        ),
        pytest.param(
            with_(faults=[{"at_s": 0, "action": "partition"}]),
            "faults[0].node",
            "needs a node",
            id="node fault without a node",
        ),
        pytest.param(
            with_(watchdog={"controllers": ["node-1", "node-7"]}),
            "watchdog.controllers[1]",
            "no node 'node-7'",
            id="controller on a node that does not exist",
        ),
        pytest.param(
            with_(watchdog={"settings": {"heartbeat_s": 1}}),
            "watchdog.settings.heartbeat_s",
            "no such setting",
            id="unknown watchdog setting",
        ),
        pytest.param(
            with_(watchdog={"settings": {"suspect_after_s": 9}}),
            "watchdog.settings",
            "unreachable_after_s",
            id="settings the watchdog refuses",
        ),
        pytest.param(
            with_(faults=[{"at_s": 0, "action": "bmc-down", "node": "node-1"}]),
            "faults[0].action",
            "bmc-down needs machines with BMCs: cluster.bmcs: true",
            id="BMC fault on machines without BMCs",
        ),
        pytest.param(
            with_(watchdog={"settings": {"fence_mode": "power"}}),
            "watchdog.settings.fence_mode",
            "power needs machines with BMCs",
            id="power fencing without BMCs",
        ),
        pytest.param(
            with_(expect={"fenced_by": ["magic"]}),
            "expect.fenced_by[0]",
            "fence-command",
            id="unknown fencer",
        ),
        pytest.param(with_(colour="red"), "colour", "Extra inputs", id="unknown key"),
        pytest.param(
            with_(systems=["watchdog", "openshift"]), "systems[1]", "watchdog", id="unknown system"
        ),
        pytest.param(
            with_(budgets={"harvester-1.7": {"running_p95_s": 60}}),
            "budgets.harvester-1.7",
            "not among systems",
            id="budget for a system not compared",
        ),
        pytest.param(with_(time_scale=0), "time_scale", "greater than 0", id="zero time scale"),
        pytest.param(
            with_(cluster={"nodes": 0}), "cluster.nodes", "greater than or equal to 1", id="no node"
        ),
        pytest.param("faults: [unclosed", "line", "not valid YAML", id="not YAML"),
        pytest.param("- a list", "(file)", "mapping", id="not a mapping"),
    ],
)
def test_a_bad_scenario_exits_2_naming_the_field(tmp_path, capsys, data, path, words):
    file = write(tmp_path, data)
    assert main(["run", str(file)]) == 2
    err = capsys.readouterr().err
    assert f"{file}: {path}" in err, err
    assert words in err, err


def test_every_problem_of_a_file_is_reported_at_once(tmp_path, capsys):
    file = write(
        tmp_path,
        with_(
            faults=[
                {"at_s": 0, "action": "poweroff", "node": "node-8"},
                {"at_s": 0, "action": "reboot", "node": "node-9"},
            ]
        ),
    )
    assert main(["run", str(file)]) == 2
    err = capsys.readouterr().err
    assert "faults[0].node" in err and "faults[1].node" in err


def test_a_missing_scenario_exits_2(tmp_path, capsys):
    assert main(["run", "no-such-scenario"]) == 2
    assert "no shipped scenario 'no-such-scenario'" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "gone.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_overrides_are_validated_like_the_file(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "power-off", "--time-scale", "0"])
    assert exc.value.code == 2
    assert "argument --time-scale: '0' must be in (0, 1]" in capsys.readouterr().err
    sc = scenario.load("power-off").with_overrides(time_scale=0.1, systems=["watchdog"])
    assert sc.time_scale == 0.1 and sc.systems == ["watchdog"]


# --- the watchdog's settings, compressed -------------------------------------------------------


def test_every_duration_of_the_watchdog_is_compressed_from_its_real_world_default():
    scaled = scale_settings({}, 0.25)
    for path, f in FIELDS.items():
        if f.duration and not f.is_int:
            assert scaled.real_world[path] == f.default
            floor = WALL_FLOORS_S.get(path, 0.0)
            assert float(scaled.env[f.env]) == pytest.approx(max(f.default * 0.25, floor))
    # kept at its wall floor (an agent restart must fit in it), and said so
    assert float(scaled.env["WATCHDOG_WATCHDOG_TIMEOUT_S"]) == 2.0
    assert any("watchdog_timeout_s" in n for n in scaled.notes)
    assert scaled.env["WATCHDOG_HEARTBEAT_INTERVAL_S"] == "0.25"
    assert scaled.env["WATCHDOG_POLICY__PERIOD_S"] == "3.75"
    assert "WATCHDOG_API_REQUEST_TIMEOUT_S" not in scaled.env  # a request budget, not a timing


def test_overrides_are_real_world_and_a_bound_that_stops_compression_is_noted():
    scaled = scale_settings({"policy.period_s": 40, "storm_max_fraction": 0.3}, 0.1)
    assert scaled.env["WATCHDOG_POLICY__PERIOD_S"] == "4"
    assert scaled.env["WATCHDOG_STORM_MAX_FRACTION"] == "0.3"
    assert scaled.env["WATCHDOG_MQTT__KEEPALIVE_S"] == "2"  # 0.5 s asked, >= 2 s accepted
    assert any("mqtt.keepalive_s" in n for n in scaled.notes)


# --- numbers ----------------------------------------------------------------------------------


def test_percentiles_count_a_vm_that_never_recovered_as_slower_than_any_that_did():
    s = measure.stat([1.0, 2.0, 3.0, None], cap_s=50)
    assert (s.n, s.missing, s.p50, s.max) == (4, 1, 2.0, None)
    assert measure.stat([], 10).n == 0
    assert measure.percentile([5, 1, 3], 95) == 5


def run_result(**kw: object) -> RunResult:
    r = RunResult(system="watchdog", repetition=1, time_scale=0.1, observed_s=20.0)
    r.invariants = {
        "split_brain_s": 0.0,
        "split_brain_vms": [],
        "lost": 0,
        "lost_vms": [],
        "false_resets": 0,
        "false_reset_vms": [],
        "running": 3,
        "vms": 3,
    }
    r.counts = {"resets": 1, "fences": 0, "disrupted_vms": 1, "migrated_vms": 0}
    r.vms = [VmTimeline("default/vm-1", "node-3", "poweroff", "RerunOnFailure", 0.0, 1.2, 3.0, 3.5)]
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def test_a_run_holds_when_its_invariants_and_expectations_hold():
    expect = scenario.Expect(resets="required")
    assert measure.verdict(run_result(), expect) == []


@pytest.mark.parametrize(
    ("expect", "change", "words"),
    [
        pytest.param({}, {"split_brain_s": 2.5, "split_brain_vms": ["x"]}, "split-brain 2.5"),
        pytest.param({}, {"lost": 1, "lost_vms": ["default/vm-1"]}, "1 VMs lost"),
        pytest.param({}, {"false_resets": 1, "false_reset_vms": ["y"]}, "1 false resets"),
        pytest.param({"resets": "none"}, None, "expected no reset"),
        pytest.param({"disruptions": "none"}, None, "1 VMs disrupted"),
        pytest.param({"fences": "required"}, None, "no fence"),
        pytest.param({"held": ["Storm"]}, None, "never reported holding resets for Storm"),
    ],
)
def test_a_broken_invariant_or_expectation_fails_the_run(expect, change, words):
    r = run_result()
    if change:
        r.invariants.update(change)
    fails = measure.verdict(r, scenario.Expect(**expect))
    assert any(words in f for f in fails), fails


def test_fenced_by_needs_a_fence_by_one_of_them_and_none_by_another():
    expect = scenario.Expect(fenced_by=["bmc"])
    by_bmc = run_result(counts={"fences": 1, "fences_by_bmc": 1})
    assert measure.verdict(by_bmc, expect) == []
    none = run_result(counts={"fences": 0, "fences_by_bmc": 0})
    assert "no fence by bmc" in measure.verdict(none, expect)
    both = run_result(counts={"fences": 2, "fences_by_bmc": 1, "fences_by_fence-command": 1})
    fails = measure.verdict(both, expect)
    assert any("1 by fence-command; expected only by bmc" in f for f in fails), fails


def test_a_vm_that_never_runs_again_fails_and_a_crash_always_fails():
    r = run_result()
    r.vms[0].running_s = None
    assert any("not running again" in f for f in measure.verdict(r, scenario.Expect()))
    crashed = run_result(crashed="kube-apiserver is no longer running")
    assert any("crashed" in f for f in measure.verdict(crashed, scenario.Expect()))
    # A system that is only compared is reported, not asserted — but a crash still counts.
    other = run_result(system="kubernetes-only")
    other.invariants["lost"] = 4
    assert measure.verdict(other, scenario.Expect()) == []


def test_budgets_are_real_world_seconds_times_the_scale_plus_the_slack():
    stats = measure.system_stats([run_result()])
    budget = scenario.Budget(running_p95_s=20)  # 20 s x 0.1 + 1 s slack = 3.0 s wall
    (met,) = measure.budget_checks("watchdog", stats, budget, 0.1, 1.0)
    assert met[1] is False and "35.0s real-world" in met[2]
    (met,) = measure.budget_checks("watchdog", stats, budget, 0.1, 1.5)
    assert met[1] is True


def test_a_report_starts_with_the_invariants_and_draws_one_lane_per_system(tmp_path):
    sc = scenario.validate(
        with_(systems=["watchdog", "kubernetes-only"], time_scale=0.1), "test.yaml"
    )
    slow = run_result(system="kubernetes-only")
    slow.vms[0].reset_s = slow.vms[0].running_s = None
    slow.invariants["lost"] = 1
    result = ScenarioResult(scenario=sc, source="test.yaml", runs=[run_result(), slow])
    for r in result.runs:
        r.failures = measure.verdict(r, sc.expect)
    v = report.write(result, tmp_path)
    assert v.ok
    md = (tmp_path / "report.md").read_text().splitlines()
    assert md[0].startswith("# Chaos run `t`: PASS")
    assert "split-brain 0 VM-s" in md[4] and "lost VMs 0" in md[4] and "false resets 0" in md[4]
    assert "kubernetes-only" in md[5] and "reported only" in md[5]
    assert (tmp_path / "timeline.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["verdict"]["ok"] is True
    assert data["systems"]["watchdog"]["stats"]["running"]["real_world_s"]["p50"] == 35.0
    table = report.side_by_side(result)
    assert "none within 200" in table  # kubernetes-only: no reset within the 20 s observed
    assert "> 5.7x" in table  # ratio to the watchdog's running p50, censored
