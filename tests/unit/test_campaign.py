"""chaos/harness/campaign.py: schedules drawn from a seed, what every trial must show, known
holes, shrinking and the summary. The trials themselves run on the real test cluster in
tests/integration/test_campaign.py; here a schedule's outcome is given by a plain function, so
that the bookkeeping around it can be checked on many schedules at once."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chaos.harness import campaign
from chaos.harness.campaign import KINDS, CampaignSpec, draw
from chaos.harness.measure import RunResult
from chaos.harness.scenario import LEADER, load


def test_the_same_seed_draws_the_same_schedules_and_trials_differ() -> None:
    spec = CampaignSpec(seed=7)
    first = [draw(spec, k).model_dump() for k in range(1, 21)]
    assert first == [draw(CampaignSpec(seed=7), k).model_dump() for k in range(1, 21)]
    schedules = {json.dumps(s["faults"], sort_keys=True) for s in first}
    assert len(schedules) == 20
    other = [draw(CampaignSpec(seed=8), k).model_dump() for k in range(1, 21)]
    assert other != first


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    trial=st.integers(1, 10_000),
    nodes=st.integers(3, 12),
    max_faults=st.integers(1, 8),
    kinds=st.lists(st.sampled_from(sorted(KINDS)), min_size=1, unique=True),
    duration=st.floats(5, 600),
)
def test_every_drawn_schedule_is_a_valid_scenario_within_the_campaign_bounds(
    seed: int, trial: int, nodes: int, max_faults: int, kinds: list[str], duration: float
) -> None:
    spec = CampaignSpec(
        seed=seed, nodes=nodes, max_faults=max_faults, faults=tuple(kinds), duration_s=duration
    )
    assert spec.problems() == []
    sc = draw(spec, trial)  # validated like a scenario file
    assert 1 <= len(sc.faults) <= max_faults
    actions = {(KINDS[k].action, KINDS[k].scope) for k in kinds}
    names = sc.node_names()
    for f in sc.faults:
        scope = "cluster" if f.node is None else "leader" if f.node == LEADER else "node"
        assert (f.action, scope) in actions
        assert f.node is None or f.node == LEADER or f.node in names
        assert 0 <= f.at_s <= campaign.LATEST_START_S
        kind = KINDS[campaign.kind_of(f)]
        if kind.undone:
            assert f.duration_s is not None
            # Overlapping outages of the whole cluster merge into one (campaign._merged).
            longest = min(duration, kind.max_s or duration)
            if scope == "cluster":
                longest += campaign.LATEST_START_S
            assert f.duration_s <= longest + 0.05
        else:
            assert f.duration_s is None
        assert sc.time_scale >= max(spec.time_scale, kind.min_time_scale)
    # The test cluster has one API server and one broker: never two outages of one at once.
    cluster = [f for f in sc.faults if f.node is None and f.duration_s is not None]
    for a in cluster:
        for b in cluster:
            if a is not b and a.action == b.action and a.at_s <= b.at_s:
                assert a.duration_s is not None
                assert b.at_s > a.at_s + a.duration_s, (a, b)


def test_a_campaign_draws_every_kind_of_fault() -> None:
    spec = CampaignSpec(seed=1)
    seen = {campaign.kind_of(f) for k in range(1, 301) for f in draw(spec, k).faults}
    assert seen == set(KINDS)


def test_a_saved_schedule_replays_as_the_same_scenario(tmp_path: Path) -> None:
    sc = draw(CampaignSpec(seed=3, time_scale=0.3), 5)
    replayed = load(campaign.save(sc, tmp_path / "trial-5.yaml"))
    assert replayed.model_dump() == sc.model_dump()


def test_bad_campaign_arguments_name_the_field_and_value() -> None:
    spec = CampaignSpec(faults=("partition", "meteor"), nodes=2, duration_s=1, max_faults=9)
    assert spec.problems() == [
        "--faults: unknown fault 'meteor'",
        "--nodes 2: at least 3 (two controllers and a node to fault)",
        "--duration 1: at least 5 s",
        "--max-faults 9: between 1 and 8",
    ]


def _schedule(*faults: dict[str, object]) -> campaign.Scenario:
    return campaign.scenario_for(CampaignSpec(), "t", list(faults))


def test_a_known_hole_is_told_by_its_schedule_and_one_after_the_other_is_not() -> None:
    # The rule the last known hole had (API server and broker lost together, now closed).
    holes = (("both lost", lambda sc: campaign.overlap(sc, "api-outage", "broker-outage")),)
    together = _schedule(
        {"at_s": 0, "action": "api-outage", "duration_s": 40},
        {"at_s": 20, "action": "broker-outage", "duration_s": 40},
    )
    assert campaign.known_hole(together, holes) == "both lost"
    assert campaign.known_hole(together) is None  # closed: a failure there is a new finding
    apart = _schedule(
        {"at_s": 0, "action": "api-outage", "duration_s": 10},
        {"at_s": 20, "action": "broker-outage", "duration_s": 40},
    )
    assert campaign.known_hole(apart, holes) is None


def _run(faults: list[dict[str, object]]) -> RunResult:
    return RunResult(system="watchdog", repetition=1, time_scale=0.25, faults=faults)


def test_a_fence_of_a_node_no_fault_touched_is_a_false_reboot() -> None:
    run = _run(
        [
            {"action": "partition", "node": "node-3"},
            {"action": "fence", "node": "node-3"},
            {"action": "fence", "node": "node-4"},
        ]
    )
    assert campaign.fenced_untouched(run) == ["node-4"]
    # a cluster-wide fault touches every node: nothing to blame on the schedule's shape
    run.faults.insert(0, {"action": "broker-outage"})
    assert campaign.fenced_untouched(run) == []


def test_shrinking_keeps_only_the_faults_that_make_it_fail() -> None:
    sc = _schedule(
        {"at_s": 0, "action": "agent-kill", "node": "node-2", "duration_s": 30},
        {"at_s": 3, "action": "partition", "node": "node-3", "duration_s": 80},
        {"at_s": 9, "action": "compact"},
    )
    tried: list[int] = []

    async def fails(candidate: campaign.Scenario) -> bool:
        tried.append(len(candidate.faults))
        return any(f.action == "partition" and (f.duration_s or 0) > 30 for f in candidate.faults)

    minimal = asyncio.run(campaign.shrink(sc, fails, CampaignSpec()))
    assert [(f.action, f.duration_s) for f in minimal.faults] == [("partition", 40.0)]
    assert len(tried) <= 2 * len(sc.faults) + 2


def test_a_campaign_saves_every_schedule_and_tells_new_holes_from_known_ones(
    tmp_path: Path,
) -> None:
    spec = CampaignSpec(seed=11, trials=12)

    async def run_one(sc: campaign.Scenario, report_dir: Path) -> campaign.TrialRun:
        kinds = {campaign.kind_of(f) for f in sc.faults}
        failures = ["split-brain 3 VM-s > 0 (vm-1)"] if "partition" in kinds else []
        # A storm, its VMs kept down as configured: reported as held, not as a hole.
        held = "Storm" if "broker-outage" in kinds and not failures else None
        if held:
            failures = ["2 VMs lost > 0 (vm-3, vm-4)"]
        return campaign.TrialRun(failures, 1.0, [20.0, 30.0], held)

    lines: list[str] = []
    trials = asyncio.run(campaign.run_campaign(spec, tmp_path, run_one, progress=lines.append))
    assert len(trials) == 12 and all(t.file.exists() for t in trials)
    assert all(t.held is None for t in trials if t.verdict != "HELD")
    held = [t for t in trials if t.verdict == "HELD"]
    failed = [t for t in trials if t.verdict not in ("PASS", "HELD")]
    assert failed == [
        t for t in trials if "partition" in {campaign.kind_of(f) for f in t.scenario.faults}
    ]
    data = campaign.results_json(spec, trials)
    assert [t["trial"] for t in data["trials"]] == list(range(1, 13))
    assert failed, "seed 11 draws no partition in 12 trials: pick another seed"
    row = data["per_fault"]["partition"]
    assert row["failed"] + row["known"] == len(failed)
    summary = "\n".join(campaign.summary_lines(spec, trials))
    assert f"{len(held)} held as configured" in summary
    for t in failed:
        if t.verdict == "FAIL":
            assert f"watchdog-chaos run {t.file}" in summary
    assert any("about" in line and "min left" in line for line in lines)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_names_a_fault_the_test_cluster_has(kind: str) -> None:
    from chaos.harness.scenario import SCENARIO_ACTIONS

    assert KINDS[kind].action in SCENARIO_ACTIONS


def _storm_run(**invariants: object) -> RunResult:
    run = _run(
        [
            {"action": "partition", "node": "node-1"},
            {"action": "fence", "node": "node-1"},
            {"action": "partition", "node": "node-4"},
            {"action": "fence", "node": "node-4"},
        ]
    )
    run.invariants = {
        "ground_truth": True,
        "split_brain_s": 0.0,
        "split_brain_vms": [],
        "lost": 2,
        "lost_vms": ["vm-3", "vm-4"],
        "false_resets": 0,
        "false_reset_vms": [],
    } | invariants
    run.watchdog = {"resets_held_seen": ["BrokerDown", "Storm"]}
    return run


def test_vms_kept_down_by_a_storm_hold_are_held_as_configured_not_a_hole() -> None:
    sc = _schedule({"at_s": 0, "action": "partition", "node": "node-1", "duration_s": 50})
    assert campaign.configured_hold(_storm_run(), sc) == "Storm"


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param({"split_brain_s": 3.0, "split_brain_vms": ["vm-3"]}, id="split-brain"),
        pytest.param({"false_resets": 1, "false_reset_vms": ["vm-1"]}, id="a false reset"),
    ],
)
def test_a_storm_hold_explains_no_broken_safety_invariant(broken: dict[str, object]) -> None:
    sc = _schedule({"at_s": 0, "action": "partition", "node": "node-1", "duration_s": 50})
    assert campaign.configured_hold(_storm_run(**broken), sc) is None


def test_without_a_storm_hold_vms_kept_down_are_a_hole() -> None:
    sc = _schedule({"at_s": 0, "action": "partition", "node": "node-1", "duration_s": 50})
    run = _storm_run()
    run.watchdog = {"resets_held_seen": ["BrokerDown"]}
    assert campaign.configured_hold(run, sc) is None
    crashed = _storm_run()
    crashed.crashed = "controller on node-2 exited 1"
    assert campaign.configured_hold(crashed, sc) is None


def test_overlapping_outages_of_the_whole_cluster_are_drawn_as_one() -> None:
    """Seed 5, trial 4 drew two API outages, the second starting before the first ended; the
    test cluster refused the second ("an API outage is already in progress") and the trial
    failed for the harness's sake. They are one outage, to the later end."""
    sc = draw(CampaignSpec(seed=5), 4)
    outages = [f for f in sc.faults if f.action == "api-outage"]
    assert [(f.at_s, f.duration_s) for f in outages] == [(3.7, 29.3)]
