"""Whole stories on virtual time: would the VMs of this node be reset, and when?

Each reset story has its "must not reset" twin (partition, broker down, API down, storm,
degraded). The Sim evaluates the node only on news or at the decision's `wake_at`, as the
runtime does, so a missing wake-up shows as a node that never moves on.

Defaults: heartbeat every 1 s, suspect after 3 s, unreachable after 4 s, lease stale after 15 s,
policy period 15 s, agent fence 10 s + 5 s (safe delay 18 s), Ready Unknown 40 s after the
kubelet stops.
"""

from __future__ import annotations

import pytest

from watchdog.decide.actions import (
    ForceDeletePods,
    RemoveOutOfServiceTaint,
    StartEvacuation,
    StopEvacuation,
    TaintOutOfService,
)
from watchdog.decide.config import DecideConfig, FenceMode, Policy
from watchdog.decide.reasons import Reason
from watchdog.decide.state import Phase

from .decide_helpers import UNARMED, Sim, actions_of, pods

H, S, D = Phase.HEALTHY, Phase.SUSPECT, Phase.DEGRADED
U, F, RS, R, RC = Phase.UNREACHABLE, Phase.FENCING, Phase.RESETTING, Phase.RESET, Phase.RECOVERING


def all_actions(sim: Sim, kind: type) -> list[tuple[float, object]]:
    return [(e.now, a) for e in sim.log for a in actions_of(e.decision, kind)]


def sim_after_warmup(**kw: object) -> Sim:
    sim = Sim(**kw)  # type: ignore[arg-type]
    sim.advance(10.0)
    assert sim.phase is H
    return sim


# --- power loss: the reset stories --------------------------------------------------------------


def test_power_loss_in_self_mode_resets_after_the_safe_delay_and_recovers_on_reboot() -> None:
    sim = sim_after_warmup()
    died = sim.last_heartbeat_at
    assert died is not None
    sim.node_dies()
    sim.run_until(R, limit_s=120)

    assert sim.first(S) == died + 3.0  # three missed heartbeats
    # heartbeat silent ≥ 5 s is not enough: unreachable when the lease is 15 s stale
    assert sim.first(U) == died + 15.0
    assert sim.first(F) == died + 15.0
    # the agent fences itself within 10 + 5 s of losing us; the annotation telling it so is
    # visible at once, so the reset waits the 18 s safe delay, longer than the 15 s period
    assert sim.reset_times() == [died + 15.0 + 18.0]
    assert not sim.launcher_pods and sim.our_taint
    assert len(all_actions(sim, ForceDeletePods)) == 1
    assert [r for _, r in sim.events("NodeFenced")] == [Reason.FENCE_SELF_ELAPSED]

    sim.advance(30.0)
    sim.node_boots("boot-2")
    back = sim.now
    sim.run_until(H, limit_s=30)
    assert sim.last_entered(RC) <= back + 3.0
    assert [r for _, r in sim.events("NodeRecovered")] == [Reason.NODE_REBOOTED]
    assert not sim.our_taint  # out-of-service taint removed: pods can be scheduled there again
    assert len(all_actions(sim, RemoveOutOfServiceTaint)) == 1


def test_power_loss_with_last_will_is_suspect_at_once() -> None:
    sim = sim_after_warmup()
    died = sim.now
    sim.node_dies(will=True)
    sim.advance(1.0)
    assert sim.first(S) == died  # on the Will's arrival, not three heartbeats later
    assert [r for _, r in sim.events("NodeSuspect")] == [Reason.AGENT_OFFLINE]


@pytest.mark.parametrize(
    ("period", "reset_after_lease_stale"),
    [
        pytest.param(15.0, 18.0, id="period shorter than the safe delay is raised to it"),
        pytest.param(60.0, 60.0, id="period longer than the safe delay is waited in full"),
    ],
)
def test_reset_waits_the_longer_of_policy_period_and_safe_delay(
    period: float, reset_after_lease_stale: float
) -> None:
    sim = sim_after_warmup(policy=Policy(period_s=period))
    died = sim.now
    sim.node_dies()
    sim.run_until(RS, limit_s=200)
    assert sim.reset_times() == [died + 15.0 + reset_after_lease_stale]


def announced_resets(sim: Sim) -> list[tuple[float, float]]:
    """(when, reset announced for) of every decision that announced a reset time."""
    return [
        (e.now, e.decision.reset_not_before)
        for e in sim.log
        if e.decision.reset_not_before is not None
    ]


@pytest.mark.parametrize("period", [15.0, 60.0], ids=["safe delay longer", "period longer"])
def test_the_reset_time_announced_while_fencing_is_the_time_of_the_reset(period: float) -> None:
    """What the operator is told (watchdog_reset_not_before_timestamp_seconds) is kept: one
    time, announced as soon as the fence clock runs, and the reset happens at it."""
    sim = sim_after_warmup(policy=Policy(period_s=period))
    sim.node_dies()
    sim.run_until(RS, limit_s=200)
    (reset,) = sim.reset_times()
    announced = announced_resets(sim)
    assert announced and {at for _, at in announced} == {reset}
    assert announced[0][0] == sim.first(F)  # the annotation is visible at once here
    assert sim.log[-1].decision.reset_not_before is None  # RESETTING: nothing left to wait for


@pytest.mark.parametrize(
    ("changes", "prevents"),
    [
        pytest.param({"policy": Policy(enable=False)}, "policy disabled", id="policy disabled"),
        pytest.param({"other_nodes": 9, "other_down": 4}, "storm", id="storm"),
        pytest.param(
            {"cfg": DecideConfig(fence_mode=FenceMode.MANUAL)}, "no proof", id="manual fencing"
        ),
    ],
)
def test_no_reset_time_is_announced_while_nothing_will_reset_the_node(
    changes: dict[str, object], prevents: str
) -> None:
    sim = sim_after_warmup(**changes)
    sim.node_dies()
    sim.advance(300.0)
    assert sim.phase is F and sim.reset_times() == [], prevents
    assert announced_resets(sim) == [], prevents


def test_ready_unknown_corroborates_when_the_lease_is_not_watched() -> None:
    sim = sim_after_warmup()
    sim.lease_renewed_at = None  # e.g. no Lease object for this node
    sim.kubelet_renewing = False
    sim.agent_sending = False
    sim.run_until(F, limit_s=120)
    assert sim.transitions()[1][1:] == (S, U, Reason.CORROBORATED_READY)
    # the heartbeat alone was silent long before: unreachable only once Ready went Unknown
    assert sim.kubelet_stopped_at is not None
    assert sim.first(U) == sim.kubelet_stopped_at + 40.0


def test_peers_corroborate_a_silent_node() -> None:
    sim = sim_after_warmup()
    died = sim.now
    sim.node_dies()  # its Lease is not stale yet: only the peers can tell so early
    sim.peers_unreachable = True
    sim.run_until(F, limit_s=60)
    assert sim.first(U) == died + sim.cfg.unreachable_after_s
    assert sim.transitions()[1][1:] == (S, U, Reason.CORROBORATED_PEERS)


# --- the must-not-reset twins -------------------------------------------------------------------


def test_agent_cut_off_from_the_broker_but_kubelet_fine_is_never_reset() -> None:
    sim = sim_after_warmup()
    cut = sim.now
    sim.agent_sending = False  # the node runs, its kubelet renews the lease, Ready stays True
    sim.peers_unreachable = False
    sim.advance(600.0)
    assert sim.phase is S
    assert sim.first(S) == cut + 3.0
    assert sim.reset_times() == [] and sim.launcher_pods
    assert all_actions(sim, TaintOutOfService) == []


def test_broker_down_for_ten_minutes_suspects_nobody_and_resets_nothing() -> None:
    sim = sim_after_warmup()
    sim.broker_down()
    sim.node_dies()  # the node really dies, unseen
    sim.advance(600.0)
    assert sim.transitions() == []
    assert sim.launcher_pods


def test_after_the_broker_returns_heartbeat_ages_count_from_reconnection() -> None:
    sim = sim_after_warmup()
    sim.broker_down()
    sim.node_dies()
    sim.advance(600.0)
    sim.broker_up()
    back = sim.now
    sim.run_until(R, limit_s=120)
    assert sim.first(S) == back + 3.0  # not at once, although the last heartbeat is 600 s old
    assert sim.first(U) == back + sim.cfg.unreachable_after_s
    assert sim.reset_times() == [back + sim.cfg.unreachable_after_s + 18.0]


def test_a_dead_node_is_not_evacuated_after_the_broker_reconnects() -> None:
    sim = sim_after_warmup()
    sim.broker_down()
    sim.node_dies()
    sim.advance(600.0)
    sim.broker_up()
    sim.advance(30.0)
    assert all_actions(sim, StartEvacuation) == []


def test_api_down_without_peers_never_makes_a_dead_node_unreachable() -> None:
    sim = sim_after_warmup()
    sim.api_down()
    sim.node_dies()
    sim.advance(600.0)
    assert sim.phase is S
    assert sim.first(U) is None and sim.reset_times() == []


def test_after_the_api_returns_lease_ages_count_from_reconnection() -> None:
    sim = sim_after_warmup()
    sim.api_down()
    sim.node_dies()
    sim.advance(600.0)
    sim.api_up()
    back = sim.now
    sim.run_until(RS, limit_s=120)
    # Ready was set Unknown by the node-lifecycle controller long ago: seen at the relist
    assert sim.first(U) == back
    assert sim.reset_times() == [back + 18.0]


def test_api_down_at_the_moment_of_fencing_delays_the_fence_clock_until_the_agent_can_see_it() -> (
    None
):
    sim = sim_after_warmup()
    sim.api_down()
    sim.peers_unreachable = True
    died = sim.now
    sim.node_dies()
    sim.advance(60.0)
    assert sim.first(U) == died + sim.cfg.unreachable_after_s
    assert sim.phase is F and sim.reset_times() == []
    assert [r for _, r in sim.events("ResetHeld")] == [Reason.HOLD_API_DOWN]
    sim.api_up()
    back = sim.now
    sim.run_until(RS, limit_s=120)
    # the annotation is written when the API returns; the agent's clock starts then
    assert sim.reset_times() == [back + 18.0]


def test_storm_holds_the_reset_with_one_event_until_the_other_nodes_recover() -> None:
    sim = sim_after_warmup(other_nodes=9, other_down=4)  # with this one: 5 of 10 down
    died = sim.now
    sim.node_dies()
    sim.advance(300.0)
    assert sim.phase is F and sim.reset_times() == [] and sim.launcher_pods
    assert sim.events("ResetHeld") == [(died + 15.0, Reason.HOLD_STORM)]
    sim.other_down = 0
    recovered = sim.now
    sim.run_until(RS, limit_s=60)
    assert sim.reset_times() == [recovered]  # long past period and safe delay: at once


def test_below_the_storm_threshold_the_reset_goes_ahead() -> None:
    sim = sim_after_warmup(other_nodes=9, other_down=3)  # with this one: 4 of 10 down
    died = sim.now
    sim.node_dies()
    sim.run_until(RS, limit_s=120)
    assert sim.reset_times() == [died + 33.0]
    assert sim.events("ResetHeld") == []


@pytest.mark.parametrize(
    ("changes", "hold"),
    [
        pytest.param(
            {"policy": Policy(enable=False)}, Reason.HOLD_POLICY_DISABLED, id="policy disabled"
        ),
        pytest.param({"cfg": DecideConfig(dry_run=True)}, Reason.HOLD_DRY_RUN, id="dry-run"),
        pytest.param({"upgrade_running": True}, Reason.HOLD_UPGRADE, id="upgrade running"),
    ],
)
def test_detect_only_holds_detect_but_never_reset(changes: dict[str, object], hold: Reason) -> None:
    sim = sim_after_warmup(**changes)
    sim.node_dies()
    sim.advance(600.0)
    assert sim.phase is F
    assert sim.reset_times() == [] and sim.launcher_pods and not sim.our_taint
    assert [r for _, r in sim.events("ResetHeld")] == [hold]


def test_dry_run_reports_falsely_ready_pods_without_marking_them() -> None:
    sim = sim_after_warmup(cfg=DecideConfig(dry_run=True))
    sim.node_dies()
    sim.advance(60.0)
    assert len(sim.events("FalselyReadyPods")) == 1
    assert all(p.ready for p in sim.launcher_pods)


def test_falsely_ready_pods_are_marked_not_ready_on_an_unreachable_node() -> None:
    sim = sim_after_warmup(cfg=DecideConfig(fence_mode=FenceMode.MANUAL))
    sim.node_dies()
    sim.advance(60.0)
    assert sim.phase is F
    assert not any(p.ready for p in sim.launcher_pods)


# --- degraded but alive -------------------------------------------------------------------------


def test_kubelet_path_lost_while_the_agent_heartbeats_evacuates_and_never_resets() -> None:
    sim = sim_after_warmup()
    lost = sim.now
    sim.kubelet_renewing = False  # kubelet or its API path dies; VMs and agent live on
    sim.advance(600.0)
    assert sim.phase is D
    assert sim.first(D) == lost + 15.0
    assert len(all_actions(sim, StartEvacuation)) == 1
    assert sim.reset_times() == [] and sim.launcher_pods
    sim.kubelet_renewing = True
    sim.ready = "True"
    sim.advance(2.0)
    assert sim.phase is H
    assert len(all_actions(sim, StopEvacuation)) == 1


def test_degraded_node_that_dies_while_the_api_is_down_is_still_seen_going_silent() -> None:
    sim = sim_after_warmup()
    sim.kubelet_renewing = False
    sim.advance(30.0)
    assert sim.phase is D
    sim.api_down()
    sim.advance(5.0)
    died = sim.now
    sim.agent_sending = False
    sim.advance(60.0)
    assert sim.first(S) == died + 3.0
    assert sim.reset_times() == []  # API down: held


def test_degraded_node_that_then_dies_is_reset_after_evacuation_stops() -> None:
    sim = sim_after_warmup()
    sim.kubelet_renewing = False
    sim.advance(30.0)
    assert sim.phase is D
    died = sim.now
    sim.agent_sending = False
    sim.run_until(RS, limit_s=120)
    assert sim.first(S) == died + 3.0
    assert sim.first(U) == died + sim.cfg.unreachable_after_s  # the lease is long stale
    stops = all_actions(sim, StopEvacuation)
    assert len(stops) == 1 and stops[0][0] == died + 3.0


# --- hysteresis and recovery --------------------------------------------------------------------


def test_a_short_flap_needs_three_fresh_heartbeats_to_recover() -> None:
    sim = sim_after_warmup()
    sim.agent_sending = False
    sim.advance(3.5)
    assert sim.phase is S
    sim.agent_sending = True
    resumed = sim.now
    sim.run_until(H, limit_s=10)
    assert sim.last_entered(H) == pytest.approx(resumed + 2.5)  # heartbeats at +0.5, +1.5, +2.5
    assert sim.reset_times() == []


def test_node_back_during_fencing_recovers_without_reset() -> None:
    sim = sim_after_warmup()
    sim.node_dies()
    sim.run_until(F, limit_s=60)
    sim.advance(10.0)  # well inside the 18 s safe delay
    sim.node_boots("boot-2")
    sim.run_until(H, limit_s=10)
    assert sim.reset_times() == []
    assert sim.launcher_pods and not sim.our_taint
    assert all_actions(sim, RemoveOutOfServiceTaint) == []
    assert [r for _, r in sim.events("NodeRecovered")] == [Reason.NODE_REBOOTED]


def test_after_a_node_returned_a_new_outage_starts_its_clocks_afresh() -> None:
    sim = sim_after_warmup()
    sim.node_dies()
    sim.run_until(F, limit_s=60)
    sim.node_boots("boot-2")
    sim.run_until(H, limit_s=10)
    sim.advance(30.0)
    died = sim.now
    sim.node_dies()
    sim.run_until(RS, limit_s=120)
    assert sim.reset_times() == [died + 15.0 + 18.0]


def test_a_node_that_dies_again_while_recovering_is_detected_again() -> None:
    sim = sim_after_warmup(cfg=DecideConfig(fence_mode=FenceMode.NONE))
    sim.node_dies()
    sim.run_until(R, limit_s=60)
    # a launcher pod is still bound when the node returns (its deletion did not go through)
    sim.launcher_pods = list(pods("vm3"))
    sim.node_boots("boot-2")
    sim.run_until(RC, limit_s=10)
    died = sim.now
    sim.node_dies()
    sim.advance(120.0)
    assert sim.phase is not RC
    assert sim.last_entered(S) == pytest.approx(died + 3.0, abs=1.0)


def test_the_out_of_service_taint_is_removed_even_if_the_node_flaps_while_recovering() -> None:
    sim = sim_after_warmup(cfg=DecideConfig(fence_mode=FenceMode.NONE))
    sim.node_dies()
    sim.run_until(R, limit_s=60)
    sim.launcher_pods = list(pods("vm3"))
    sim.node_boots("boot-2")
    sim.run_until(RC, limit_s=10)
    # a short network flap: suspect, then back
    sim.agent_sending = False
    sim.advance(3.5)
    sim.agent_sending = True
    sim.advance(10.0)
    sim.launcher_pods = []  # Kubernetes finally cleans the last pod up
    sim.advance(10.0)
    assert sim.phase is H
    assert not sim.our_taint, "a healthy node must not keep the out-of-service taint"


def test_force_deletes_stop_once_the_agent_heartbeats_again() -> None:
    sim = sim_after_warmup(cfg=DecideConfig(fence_mode=FenceMode.NONE))
    sim.deletes_fail = True  # e.g. the API rejects the deletes for a while
    sim.node_dies()
    sim.run_until(RS, limit_s=60)
    sim.advance(10.0)
    sim.node_boots("boot-2")
    sim.advance(30.0)
    assert sim.phase is RS and sim.launcher_pods
    deleting_a_live_node = [
        e.now for e in sim.log if e.truly_heartbeating and actions_of(e.decision, ForceDeletePods)
    ]
    assert deleting_a_live_node == [], "pods force-deleted while the node's agent heartbeats"


# --- fence modes end to end ---------------------------------------------------------------------


def test_unarmed_agent_in_self_mode_is_held_until_an_administrator_taints_the_node() -> None:
    sim = sim_after_warmup(fence=UNARMED)
    died = sim.now
    sim.node_dies()
    sim.advance(300.0)
    assert sim.phase is F and sim.reset_times() == []
    assert [r for _, r in sim.events("ResetHeld")] == [Reason.HOLD_UNFENCED]
    sim.admin_taint = True
    tainted = sim.now
    sim.run_until(RS, limit_s=10)
    assert sim.reset_times() == [tainted]
    assert [r for _, r in sim.events("NodeFenced")] == [Reason.FENCE_MANUAL_TAINT]
    assert died < tainted


def test_external_mode_resets_after_the_hook_confirms_and_the_period_ends() -> None:
    sim = sim_after_warmup(cfg=DecideConfig(fence_mode=FenceMode.EXTERNAL))
    died = sim.now
    sim.node_dies()
    sim.run_until(RS, limit_s=120)
    assert sim.reset_times() == [died + 15.0 + 15.0]
    assert [r for _, r in sim.events("NodeFenced")] == [Reason.FENCE_EXTERNAL_CONFIRMED]


def test_external_mode_with_a_failing_hook_never_resets() -> None:
    sim = sim_after_warmup(cfg=DecideConfig(fence_mode=FenceMode.EXTERNAL), hook_confirms=False)
    sim.node_dies()
    sim.advance(600.0)
    assert sim.phase is F and sim.reset_times() == []


def test_external_mode_runs_a_failing_hook_again_until_it_confirms() -> None:
    sim = sim_after_warmup(cfg=DecideConfig(fence_mode=FenceMode.EXTERNAL), hook_failures=3)
    died = sim.now
    sim.node_dies()
    sim.run_until(RS, limit_s=120)
    assert sim.hook_runs == 4  # three failures, then the confirmation
    # the fourth run went out 2 + 4 + 8 s after the first; the reset waits for its confirmation
    # and for the 15 s period, whichever ends last
    first = sim.first(F)
    assert first is not None
    (reset,) = sim.reset_times()
    assert reset >= first + 14.0 and reset >= died + 15.0
    assert reset == pytest.approx(max(first + 14.0, sim.first(U) + 15.0), abs=1.0)


def test_a_new_leader_resumes_a_confirmed_external_fence_without_running_the_hook_again() -> None:
    sim = sim_after_warmup(cfg=DecideConfig(fence_mode=FenceMode.EXTERNAL))
    sim.node_dies()
    sim.run_until(F, limit_s=60)
    sim.advance(2.0)  # the hook confirmed; the period still runs
    assert sim.phase is F and sim.hook_runs == 1
    sim.failover()
    sim.run_until(RS, limit_s=60)
    assert sim.hook_runs == 1
    assert [r for _, r in sim.events("NodeFenced")] == [Reason.FENCE_EXTERNAL_CONFIRMED]


def test_manual_mode_resets_only_after_the_administrator_taints() -> None:
    sim = sim_after_warmup(cfg=DecideConfig(fence_mode=FenceMode.MANUAL))
    sim.node_dies()
    sim.advance(300.0)
    assert sim.phase is F and sim.reset_times() == []
    sim.admin_taint = True
    tainted = sim.now
    sim.run_until(RS, limit_s=10)
    assert sim.reset_times() == [tainted]


def test_manual_taint_before_the_period_ends_waits_for_the_period() -> None:
    sim = sim_after_warmup(cfg=DecideConfig(fence_mode=FenceMode.MANUAL))
    died = sim.now
    sim.node_dies()
    sim.run_until(F, limit_s=60)
    sim.admin_taint = True
    sim.run_until(RS, limit_s=60)
    assert sim.reset_times() == [died + 15.0 + 15.0]


def test_none_mode_resets_when_the_period_ends() -> None:
    sim = sim_after_warmup(cfg=DecideConfig(fence_mode=FenceMode.NONE))
    died = sim.now
    sim.node_dies()
    sim.run_until(RS, limit_s=60)
    assert sim.reset_times() == [died + 15.0 + 15.0]


# --- a new leader -------------------------------------------------------------------------------


def test_a_new_leader_resuming_a_fencing_node_waits_period_and_safe_delay_again() -> None:
    sim = sim_after_warmup()
    sim.node_dies()
    sim.run_until(F, limit_s=60)
    sim.advance(15.0)  # 3 s before the old leader would have reset
    sim.failover()
    resumed = sim.now
    assert sim.phase is F and sim.state is not None and sim.state.resumed
    sim.run_until(RS, limit_s=120)
    # it first gives the node suspect_after_s to be heard from on its fresh connection
    assert sim.reset_times() == [resumed + 3.0 + 18.0]


def test_a_new_leader_resuming_while_the_node_is_back_does_not_reset() -> None:
    sim = sim_after_warmup()
    sim.node_dies()
    sim.run_until(F, limit_s=60)
    sim.node_boots("boot-2")
    sim.failover()
    sim.run_until(H, limit_s=30)
    assert sim.reset_times() == []
