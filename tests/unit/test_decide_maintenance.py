"""Planned maintenance (watchdog/decide/maintenance.py): a node taken out of service with no VM
left on it is not fenced, reset or declared when it goes silent; one still running a VM is failed
over like any other node (the twins), and a node that leaves maintenance while silent is judged
again."""

from __future__ import annotations

import pytest

from watchdog.decide.actions import (
    MarkPodsNotReady,
    PersistState,
    RunFenceHook,
    TaintOutOfService,
)
from watchdog.decide.config import DecideConfig, FenceMode
from watchdog.decide.holds import is_storm, silent_phases
from watchdog.decide.reasons import Reason
from watchdog.decide.state import DOWN_PHASES, STORM_PHASES, NodeState, Phase
from watchdog.heartbeat.fence import declared_down

from .decide_helpers import T, actions_of, events, node, pods, seen, step

H, S, U, M = Phase.HEALTHY, Phase.SUSPECT, Phase.UNREACHABLE, Phase.MAINTENANCE
# Powered off: no heartbeat for 40 s, Lease stale, Ready Unknown.
OFF = {"hb_age": 40.0, "lease_age": 40.0, "ready": "Unknown"}
MODES = [DecideConfig(fence_mode=m) for m in FenceMode]


def written_phases(d) -> list[str]:
    return [
        NodeState.from_annotation("n", a.annotation, 0.0).phase.value
        for a in actions_of(d, PersistState)
    ]


@pytest.mark.parametrize("cfg", MODES, ids=lambda c: f"mode {c.fence_mode}")
@pytest.mark.parametrize(
    "planned",
    [
        {"cordoned": True},
        {"maintain_status": "completed"},
        {"cordoned": True, "maintain_status": "completed"},
    ],
    ids=["cordoned", "harvester-completed", "both"],
)
def test_a_planned_empty_node_that_goes_down_is_held_in_maintenance(planned, cfg) -> None:
    d = step(node(S), seen(**OFF, **planned), cfg=cfg)
    assert list(d.transitions) == [(S, M, Reason.IN_MAINTENANCE)]
    # Nothing a failure would bring: no declaration, fence, taint or pod write.
    assert actions_of(d, RunFenceHook) == actions_of(d, TaintOutOfService) == []
    assert actions_of(d, MarkPodsNotReady) == []
    assert written_phases(d) == ["Maintenance"]
    assert not declared_down(written_phases(d)[0])  # its agent, reading it, does not fence
    assert ("NodeInMaintenance", Reason.IN_MAINTENANCE) in events(d)


@pytest.mark.parametrize("cfg", MODES, ids=lambda c: f"mode {c.fence_mode}")
def test_a_node_in_maintenance_stays_held_however_long_it_is_silent(cfg) -> None:
    state = node(M, heartbeats_at_mark=100, last_contact_at=T - 40.0)
    for later in (0.0, 60.0, 600.0, 86_400.0):
        obs = seen(
            hb_age=40.0 + later,
            lease_age=40.0 + later,
            ready="Unknown",
            cordoned=True,
            now=T + later,
        )
        d = step(state, obs, cfg=cfg, now=T + later)
        assert d.transitions == () and d.actions == (), later


def test_twin_a_cordoned_node_still_running_vms_is_failed_over() -> None:
    d = step(node(S), seen(**OFF, cordoned=True, vmis_here=2, launcher_pods=pods("vm1", "vm2")))
    assert d.transitions[0] == (S, U, Reason.CORROBORATED_LEASE)
    assert "Unreachable" in written_phases(d) or "Fencing" in written_phases(d)
    assert actions_of(d, MarkPodsNotReady)  # its falsely ready pods are marked, as on any node


def test_twin_harvester_still_migrating_vms_away_is_not_maintenance() -> None:
    d = step(node(S), seen(**OFF, cordoned=True, maintain_status="running", vmis_here=1))
    assert d.transitions[0] == (S, U, Reason.CORROBORATED_LEASE)


def test_twin_a_node_with_vms_and_no_cordon_is_not_maintenance() -> None:
    d = step(node(S), seen(**OFF, vmis_here=1))
    assert d.transitions[0][1] is U


def test_a_node_still_carrying_our_taint_is_finished_normally() -> None:
    # It went silent while RECOVERING: only the normal path removes the out-of-service taint.
    d = step(node(S, tainted=True), seen(**OFF, cordoned=True))
    assert M not in [to for _, to, _ in d.transitions]


def test_a_vmi_showing_on_a_silent_node_in_maintenance_ends_it() -> None:
    state = node(M, heartbeats_at_mark=100, last_contact_at=T - 40.0)
    d = step(state, seen(**OFF, cordoned=True, vmis_here=1))
    assert list(d.transitions)[:2] == [
        (M, S, Reason.MAINTENANCE_ENDED),
        (S, U, Reason.CORROBORATED_LEASE),
    ]


@pytest.mark.parametrize("cfg", MODES, ids=lambda c: f"mode {c.fence_mode}")
@pytest.mark.parametrize(
    "now_seen",
    [{"cordoned": False}, {"cordoned": False, "maintain_status": None}],
    ids=["uncordoned", "harvester-maintenance-disabled"],
)
def test_must_not_switch_off_a_node_uncordoned_while_it_boots_after_maintenance(
    now_seen, cfg
) -> None:
    # The operator powers the node on and disables maintenance at once: its Lease is still
    # stale from the work, its agent not yet up. That old silence proves nothing against a
    # booting machine: no declaration, no BMC power-off, no taint.
    state = node(M, heartbeats_at_mark=100, last_contact_at=T - 3600.0)
    obs = seen(hb_age=3600.0, lease_age=3600.0, ready="Unknown", **now_seen)
    d = step(state, obs, cfg=cfg)
    assert d.transitions == ()
    assert actions_of(d, RunFenceHook) == actions_of(d, TaintOutOfService) == []
    assert written_phases(d) == []


def test_a_kubelet_renewing_again_ends_maintenance_without_any_fence() -> None:
    # The machine runs again (booting, or only its agent is gone): judged from Suspect, where
    # a kubelet alive since the silence vetoes any declaration.
    state = node(M, heartbeats_at_mark=100, last_contact_at=T - 40.0)
    d = step(state, seen(hb_age=40.0, lease_age=1.0, ready="True", cordoned=True))
    assert list(d.transitions) == [(M, S, Reason.KUBELET_PATH_BACK)]
    assert actions_of(d, RunFenceHook) == []


def test_heard_again_after_maintenance_is_healthy_with_nothing_to_undo() -> None:
    state = node(M, heartbeats_at_mark=100, last_contact_at=T - 40.0)
    d = step(state, seen(0.5, received=103, boot_id="boot-2", cordoned=True))
    assert list(d.transitions) == [(M, H, Reason.HEARTBEAT_FRESH)]
    assert actions_of(d, TaintOutOfService) == [] and written_phases(d) == ["Healthy"]


def test_two_heartbeats_are_not_yet_back() -> None:
    state = node(M, heartbeats_at_mark=100, last_contact_at=T - 40.0)
    d = step(state, seen(0.5, received=102, cordoned=True))
    assert d.transitions == ()


@pytest.mark.parametrize("cfg", MODES, ids=lambda c: f"mode {c.fence_mode}")
def test_maintenance_counts_toward_no_storm_but_is_silent_for_the_quorum_hold(cfg) -> None:
    # Four of six nodes in maintenance and switched off: they raise no storm hold...
    assert not is_storm([M, M, M, M, H, H], 6, cfg)
    # ...but the controller cannot tell them off from cut off together with the others, whose
    # majority they may complete: the quorum hold counts them as silent (with those four off,
    # a failure of a fifth node is held as QuorumLost until enough of them are heard again).
    assert M in silent_phases(cfg)
    # The failure alert (WatchdogNodeUnreachable) counts only the down phases.
    assert M not in DOWN_PHASES and M not in STORM_PHASES
