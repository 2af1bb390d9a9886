"""Every transition of DESIGN §4 as machine.py implements it, one decision step per row.

Timings are the DecideConfig defaults: suspect after 3 s without a heartbeat, unreachable after
5 s, lease stale after 15 s, 3 heartbeats to recover; the policy period is 15 s and the node's
agent declared an armed fence of 10 s + 5 s, so its safe delay is 10 + 5 + 1 + 2 = 18 s.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from watchdog.decide.actions import (
    DeleteVolumeAttachments,
    EmitEvent,
    ForceDeletePods,
    MarkPodsNotReady,
    PersistState,
    RemoveOutOfServiceTaint,
    RunFenceHook,
    StartEvacuation,
    StopEvacuation,
    TaintOutOfService,
)
from watchdog.decide.config import DecideConfig, FenceMode, Policy
from watchdog.decide.machine import RECONCILE_AFTER_S, RESET_RETRY_S, WITHDRAW_RETRY_S
from watchdog.decide.observations import NodeObservation, SourceHealth
from watchdog.decide.reasons import Reason
from watchdog.decide.state import NodeState, Phase

from .decide_helpers import (
    API_DOWN,
    ARMED,
    BROKER_DOWN,
    NODE,
    UNARMED,
    UP,
    T,
    actions_of,
    context,
    events,
    is_destructive,
    node,
    pods,
    seen,
    starts_reset,
    step,
)

H, S, D = Phase.HEALTHY, Phase.SUSPECT, Phase.DEGRADED
U, F, RS, R, RC = Phase.UNREACHABLE, Phase.FENCING, Phase.RESETTING, Phase.RESET, Phase.RECOVERING
TO_FENCING = (U, F, Reason.PERIOD_RUNNING)


# --- detection: HEALTHY / SUSPECT / DEGRADED / UNREACHABLE ---------------------------------------

DETECTION = [
    pytest.param(
        node(H),
        seen(0.5),
        UP,
        [],
        id="healthy node with fresh heartbeat, lease and Ready stays healthy",
    ),
    pytest.param(
        node(H),
        seen(3.5),
        UP,
        [(H, S, Reason.HEARTBEAT_STALE)],
        id="three missed heartbeats make a healthy node suspect",
    ),
    pytest.param(
        node(H),
        seen(2.9),
        UP,
        [],
        id="a heartbeat just under the suspect threshold keeps the node healthy",
    ),
    pytest.param(
        node(H),
        seen(0.5, offline=True),
        UP,
        [(H, S, Reason.AGENT_OFFLINE)],
        id="agent Last Will makes a healthy node suspect at once, before heartbeats go stale",
    ),
    pytest.param(
        node(H),
        seen(6.0, lease_age=20.0),
        UP,
        [(H, S, Reason.HEARTBEAT_STALE), (S, U, Reason.CORROBORATED_LEASE), TO_FENCING],
        id="stale heartbeat corroborated by a stale lease goes to fencing in one step",
    ),
    pytest.param(
        node(S),
        seen(6.0, lease_age=20.0),
        UP,
        [(S, U, Reason.CORROBORATED_LEASE), TO_FENCING],
        id="suspect node with stale lease is unreachable, reason lease",
    ),
    pytest.param(
        node(S),
        seen(6.0, lease_age=7.0, ready="Unknown"),
        UP,
        [(S, U, Reason.CORROBORATED_READY), TO_FENCING],
        id="suspect node with Ready Unknown is unreachable, reason Ready",
    ),
    pytest.param(
        node(S),
        seen(6.0, lease_age=7.0, ready="False"),
        UP,
        [(S, U, Reason.CORROBORATED_READY), TO_FENCING],
        id="suspect node with Ready False is unreachable, reason Ready",
    ),
    pytest.param(
        node(S),
        seen(6.0, lease_age=7.0, peers_unreachable=True),
        UP,
        [(S, U, Reason.CORROBORATED_PEERS), TO_FENCING],
        id="suspect node its peers cannot reach is unreachable, reason peers",
    ),
    pytest.param(
        node(S),
        seen(6.0, lease_age=20.0, ready="Unknown", peers_unreachable=True),
        UP,
        [(S, U, Reason.CORROBORATED_LEASE), TO_FENCING],
        id="with every corroborator stale the lease is named first",
    ),
    pytest.param(
        node(S),
        seen(6.0, peers_unreachable=False),
        UP,
        [],
        id="uncorroborated suspect stays suspect: lease fresh, Ready True, peers reach it",
    ),
    pytest.param(
        node(S),
        seen(600.0),
        UP,
        [],
        id="a heartbeat silent for ten minutes alone is still not evidence",
    ),
    pytest.param(
        node(S),
        seen(3.5, lease_age=20.0),
        UP,
        [],
        id="corroborated but heartbeat younger than unreachable_after stays suspect",
    ),
    pytest.param(
        node(S),
        seen(0.5, received=102),
        UP,
        [],
        id="two fresh heartbeats are not enough to recover (hysteresis)",
    ),
    pytest.param(
        node(S),
        seen(0.5, received=103),
        UP,
        [(S, H, Reason.HEARTBEAT_FRESH)],
        id="three fresh heartbeats in a row bring a suspect node back to healthy",
    ),
    pytest.param(
        node(S),
        seen(4.0, received=110),
        UP,
        [],
        id="heartbeats counted but the last one stale again does not recover",
    ),
    pytest.param(
        node(S),
        seen(0.5, received=103, lease_age=20.0),
        UP,
        [(S, D, Reason.KUBELET_PATH_LOST)],
        id="suspect node heartbeating again with a stale lease is degraded, not healthy",
    ),
    pytest.param(
        node(H),
        seen(0.5, lease_age=20.0),
        UP,
        [(H, D, Reason.KUBELET_PATH_LOST)],
        id="stale lease while heartbeats are alive: degraded",
    ),
    pytest.param(
        node(H),
        seen(0.5, ready="False"),
        UP,
        [(H, D, Reason.KUBELET_PATH_LOST)],
        id="Ready False while heartbeats are alive: degraded",
    ),
    pytest.param(
        node(D),
        seen(0.5),
        UP,
        [(D, H, Reason.KUBELET_PATH_BACK)],
        id="degraded node whose lease and Ready recover is healthy again",
    ),
    pytest.param(
        node(D),
        seen(0.5, lease_age=20.0),
        UP,
        [],
        id="degraded node whose lease is still stale stays degraded",
    ),
    pytest.param(
        node(D),
        seen(0.5),
        API_DOWN,
        [],
        id="degraded node stays degraded while the API is blind",
    ),
    pytest.param(
        node(D),
        seen(3.5, lease_age=20.0),
        UP,
        [(D, S, Reason.HEARTBEAT_STALE)],
        id="degraded node whose heartbeat goes stale becomes suspect",
    ),
    pytest.param(
        node(D),
        seen(6.0, lease_age=20.0),
        UP,
        [(D, S, Reason.HEARTBEAT_STALE), (S, U, Reason.CORROBORATED_LEASE), TO_FENCING],
        id="degraded node silent past unreachable_after goes on to fencing",
    ),
    pytest.param(
        node(H),
        seen(600.0, lease_age=600.0, ready="Unknown"),
        BROKER_DOWN,
        [],
        id="broker down: a silent node stays healthy, the heartbeat is unknown not stale",
    ),
    pytest.param(
        node(S),
        seen(600.0, lease_age=600.0, ready="Unknown"),
        BROKER_DOWN,
        [],
        id="broker down: a suspect node is neither recovered nor escalated",
    ),
    pytest.param(
        node(S),
        seen(600.0, lease_age=600.0, ready="Unknown"),
        API_DOWN,
        [],
        id="API down and no peers: nothing corroborates, the node stays suspect",
    ),
    pytest.param(
        node(S),
        seen(600.0, peers_unreachable=True),
        API_DOWN,
        [(S, U, Reason.CORROBORATED_PEERS), TO_FENCING],
        id="API down but peers cannot reach it: corroborated by peers",
    ),
    pytest.param(
        node(S),
        seen(600.0, lease_age=None, ready=None),
        UP,
        [],
        id="lease never seen and Ready unknown corroborate nothing",
    ),
]


@pytest.mark.parametrize(("state", "obs", "health", "expected"), DETECTION)
def test_detection_transitions(
    state: NodeState,
    obs: NodeObservation,
    health: SourceHealth,
    expected: list[tuple[Phase, Phase, Reason]],
) -> None:
    d = step(state, obs, ctx=context(health))
    assert list(d.transitions) == expected
    assert d.state.phase is (expected[-1][1] if expected else state.phase)
    # the phase change reaches the cluster, so a new leader resumes from it
    persisted = actions_of(d, PersistState)
    if expected:
        assert persisted == [PersistState(NODE, d.state.to_annotation())]
        assert d.state.reason is expected[-1][2]
    else:
        assert persisted == []
    # detection alone never resets anything
    assert not is_destructive(d)


EVENT_OF = {
    S: "NodeSuspect",
    U: "NodeUnreachable",
    D: "EvacuationStarted",
}


@pytest.mark.parametrize(
    ("state", "obs", "health", "expected"),
    [p for p in DETECTION if p.values[3]],
    ids=[p.id for p in DETECTION if p.values[3]],
)
def test_each_detection_transition_emits_its_event_with_the_reason(
    state: NodeState,
    obs: NodeObservation,
    health: SourceHealth,
    expected: list[tuple[Phase, Phase, Reason]],
) -> None:
    d = step(state, obs, ctx=context(health))
    for _, to, reason in expected:
        if to in EVENT_OF:
            assert (EVENT_OF[to], reason) in events(d)


def test_suspect_event_is_a_warning_with_the_heartbeat_age() -> None:
    d = step(node(H), seen(3.5))
    (ev,) = actions_of(d, EmitEvent)
    assert isinstance(ev, EmitEvent)
    assert ev.type == "Warning"
    assert "3.5s" in ev.message


def test_entering_suspect_records_what_the_agent_last_declared() -> None:
    obs = seen(3.5, boot_id="boot-7", fence=UNARMED, received=42)
    d = step(node(H, fence=None, boot_id=None), obs)
    assert d.state.boot_id == "boot-7"
    assert d.state.fence == UNARMED  # its last heartbeat said: not armed
    assert d.state.last_contact_at == pytest.approx(T - 3.5)
    # three more heartbeats from here are needed to recover
    assert not step(d.state, seen(0.5, received=44)).transitions
    assert step(d.state, seen(0.5, received=45)).state.phase is H


@pytest.mark.parametrize(
    ("state", "obs", "start", "stop"),
    [
        pytest.param(
            node(H), seen(0.5, lease_age=20.0), 1, 0, id="entering degraded starts evacuation"
        ),
        pytest.param(node(D), seen(0.5), 0, 1, id="kubelet path back stops evacuation"),
        pytest.param(node(D), seen(3.5), 0, 1, id="heartbeat lost while degraded stops evacuation"),
        pytest.param(
            node(D),
            seen(0.5, lease_age=20.0),
            0,
            0,
            id="still degraded: evacuation neither restarted nor stopped",
        ),
    ],
)
def test_evacuation_is_started_and_stopped_exactly_on_degraded_edges(
    state: NodeState, obs: NodeObservation, start: int, stop: int
) -> None:
    d = step(state, obs)
    assert len(actions_of(d, StartEvacuation)) == start
    assert len(actions_of(d, StopEvacuation)) == stop
    assert not is_destructive(d)


# --- fencing and the reset, per fence mode ------------------------------------------------------

PERIOD = Policy(period_s=15.0)
SELF = DecideConfig(fence_mode=FenceMode.SELF)
EXTERNAL = DecideConfig(fence_mode=FenceMode.EXTERNAL)
MANUAL = DecideConfig(fence_mode=FenceMode.MANUAL)
NONE = DecideConfig(fence_mode=FenceMode.NONE)
POWER = DecideConfig(fence_mode=FenceMode.POWER)
DEAD = {"hb_age": 40.0, "lease_age": 40.0, "ready": "Unknown"}


def dead(**kw: object) -> NodeObservation:
    return seen(**{**DEAD, "launcher_pods": pods("vm1", "vm2"), **kw})  # type: ignore[arg-type]


FENCING_ROWS = [
    # mode self: an armed declaration, and the fence clock started once the agent could see it
    pytest.param(
        SELF,
        node(F, fence_clock_from=T - 18.0),
        dead(persisted="Fencing"),
        Reason.FENCE_SELF_ELAPSED,
        id="self: period and safe delay elapsed on an armed fence → reset",
    ),
    pytest.param(
        SELF,
        node(F, fence_clock_from=T - 17.9),
        dead(persisted="Fencing"),
        None,
        id="self: period elapsed but safe delay 0.1 s short → wait",
    ),
    pytest.param(
        SELF,
        node(F, unreachable_at=T - 14.9, fence_clock_from=T - 20.0),
        dead(persisted="Fencing"),
        None,
        id="self: safe delay elapsed but the policy period not yet → wait",
    ),
    pytest.param(
        SELF,
        node(F, fence_clock_from=None),
        dead(persisted="Suspect"),
        None,
        id="self: annotation not yet visible, fence clock not started → wait",
    ),
    pytest.param(
        SELF,
        node(F, fence_clock_from=None),
        dead(persisted="Fencing"),
        None,
        id="self: annotation just became visible → clock starts now, no reset yet",
    ),
    pytest.param(
        SELF,
        node(F, fence_clock_from=T - 60.0, fence=UNARMED),
        dead(persisted="Fencing"),
        None,
        id="self: agent declared its fence unarmed → never reset on time alone",
    ),
    pytest.param(
        SELF,
        node(F, fence_clock_from=T - 60.0, fence=None),
        dead(persisted="Fencing"),
        None,
        id="self: agent never declared a fence → never reset on time alone",
    ),
    pytest.param(
        SELF,
        node(F, fence_clock_from=T - 60.0, fence=UNARMED),
        dead(persisted="Fencing", out_of_service_tainted=True),
        Reason.FENCE_MANUAL_TAINT,
        id="self: unarmed but an administrator tainted the node out-of-service → reset",
    ),
    # mode external: the fence hook must have confirmed
    pytest.param(
        EXTERNAL,
        node(F, hook_runs=1, hook_sent_at=T - 5.0),
        dead(external_fence_confirmed=True),
        Reason.FENCE_EXTERNAL_CONFIRMED,
        id="external: hook confirmed and period elapsed → reset",
    ),
    pytest.param(
        EXTERNAL,
        node(F, fence_confirmed=True),
        dead(),
        Reason.FENCE_EXTERNAL_CONFIRMED,
        id="external: confirmation resumed from the annotation (new leader) → reset",
    ),
    pytest.param(
        EXTERNAL,
        node(F),
        dead(external_fence_confirmed=True),
        None,
        id="external: a success of a hook not sent in this episode is no proof",
    ),
    pytest.param(
        EXTERNAL,
        node(F),
        dead(),
        None,
        id="external: hook not confirmed → wait however long it takes",
    ),
    pytest.param(
        EXTERNAL,
        node(F, unreachable_at=T - 10.0, hook_runs=1, hook_sent_at=T - 5.0),
        dead(external_fence_confirmed=True),
        None,
        id="external: hook confirmed but period not elapsed → wait",
    ),
    # mode power: the BMC read back off resets at once (period only, no safe delay); without
    # it the agent's self-fence is the proof, with its safe delay, exactly as in mode self
    pytest.param(
        POWER,
        node(F, hook_runs=1, hook_sent_at=T - 2.0, fence_clock_from=T - 1.0),
        dead(external_fence_confirmed=True, persisted="Fencing"),
        Reason.FENCE_POWER_OFF_VERIFIED,
        id="power: BMC switched it off and read back off, period elapsed → reset at once",
    ),
    pytest.param(
        POWER,
        node(F, fence_confirmed=True, fence_clock_from=T - 1.0),
        dead(persisted="Fencing"),
        None,
        id="power: a confirmation resumed from the annotation (new leader) → ask the BMC again",
    ),
    pytest.param(
        POWER,
        node(F, unreachable_at=T - 10.0, hook_runs=1, hook_sent_at=T - 2.0),
        dead(external_fence_confirmed=True, persisted="Fencing"),
        None,
        id="power: read back off but the policy period not elapsed → wait",
    ),
    pytest.param(
        POWER,
        node(F, hook_runs=3, hook_sent_at=T - 1.0, fence_clock_from=T - 17.9),
        dead(persisted="Fencing"),
        None,
        id="power: BMC not answering and the safe delay 0.1 s short → wait",
    ),
    pytest.param(
        POWER,
        node(F, hook_runs=3, hook_sent_at=T - 1.0, fence_clock_from=T - 18.0),
        dead(persisted="Fencing"),
        Reason.FENCE_SELF_ELAPSED,
        id="power: BMC not answering → the agent's self-fence after its safe delay",
    ),
    pytest.param(
        POWER,
        node(F, hook_runs=3, hook_sent_at=T - 1.0, fence_clock_from=T - 60.0, fence=UNARMED),
        dead(persisted="Fencing"),
        None,
        id="power: BMC not answering and the agent's fence unarmed → never reset on time",
    ),
    pytest.param(
        POWER,
        node(F, hook_runs=1, hook_sent_at=T - 2.0, power_contradicted=True),
        dead(external_fence_confirmed=True, persisted="Fencing"),
        None,
        id="power: a BMC that once said off while the node ran proves nothing",
    ),
    # mode manual: an administrator's out-of-service taint
    pytest.param(
        MANUAL,
        node(F),
        dead(out_of_service_tainted=True),
        Reason.FENCE_MANUAL_TAINT,
        id="manual: administrator's out-of-service taint and period elapsed → reset",
    ),
    pytest.param(
        MANUAL,
        node(F),
        dead(),
        None,
        id="manual: no taint → wait for the administrator",
    ),
    pytest.param(
        MANUAL,
        node(F, tainted=True),
        dead(out_of_service_tainted=True),
        None,
        id="manual: the out-of-service taint is our own from an earlier reset → not proof",
    ),
    pytest.param(
        MANUAL,
        node(F, unreachable_at=T - 10.0),
        dead(out_of_service_tainted=True),
        None,
        id="manual: taint present but period not elapsed → wait",
    ),
    # mode none: Harvester behaviour, period only
    pytest.param(
        NONE,
        node(F),
        dead(),
        Reason.FENCE_NOT_REQUIRED,
        id="none: period elapsed → reset without proof",
    ),
    pytest.param(
        NONE,
        node(F, unreachable_at=T - 14.0),
        dead(),
        None,
        id="none: period not elapsed → wait",
    ),
]


@pytest.mark.parametrize(("cfg", "state", "obs", "proof"), FENCING_ROWS)
def test_fencing_to_resetting_needs_elapsed_period_and_fencing_proof(
    cfg: DecideConfig, state: NodeState, obs: NodeObservation, proof: Reason | None
) -> None:
    d = step(state, obs, cfg=cfg, ctx=context(policy=PERIOD))
    if proof is None:
        assert d.state.phase is F
        assert not is_destructive(d)
        return
    assert list(d.transitions) == [(F, RS, Reason.RESET_STARTED)]
    assert ("NodeFenced", proof) in events(d)
    assert ("ForceReset", Reason.RESET_STARTED) in events(d)
    assert actions_of(d, TaintOutOfService) == [TaintOutOfService(NODE)]
    assert actions_of(d, ForceDeletePods) == [
        ForceDeletePods(NODE, (("vms", "virt-launcher-vm1"), ("vms", "virt-launcher-vm2")))
    ]
    # taint first: with the taint, Kubernetes detaches the volumes of the deleted pods
    kinds = [type(a) for a in d.actions]
    assert kinds.index(TaintOutOfService) < kinds.index(ForceDeletePods)
    assert d.state.tainted
    assert d.wake_at == T + RESET_RETRY_S  # look again while the pods are going


@pytest.mark.parametrize(
    ("cfg", "state", "obs", "wake"),
    [
        pytest.param(
            SELF,
            node(F, fence_clock_from=T - 10.0),
            dead(persisted="Fencing"),
            T + 8.0,
            id="self: wakes exactly when the safe delay ends",
        ),
        pytest.param(
            SELF,
            node(F, fence_clock_from=None),
            dead(persisted="Fencing"),
            T + 18.0,
            id="self: clock starting now wakes a safe delay from now",
        ),
        pytest.param(
            SELF,
            node(F, unreachable_at=T - 1.0, fence_clock_from=T - 17.0),
            dead(persisted="Fencing"),
            T + 14.0,
            id="self: a longer policy period wins over the safe delay",
        ),
        pytest.param(
            NONE,
            node(F, unreachable_at=T - 5.0),
            dead(persisted="Fencing"),
            T + 10.0,
            id="none: wakes when the period ends",
        ),
        pytest.param(
            MANUAL,
            node(F, unreachable_at=T - 5.0),
            dead(out_of_service_tainted=True, persisted="Fencing"),
            T + 10.0,
            id="manual: tainted early, wakes when the period ends",
        ),
    ],
)
def test_a_waiting_fencing_node_asks_to_be_woken_when_the_reset_becomes_due(
    cfg: DecideConfig, state: NodeState, obs: NodeObservation, wake: float
) -> None:
    d = step(state, obs, cfg=cfg)
    assert d.state.phase is F
    assert d.wake_at == pytest.approx(wake)
    later = step(d.state, obs, cfg=cfg, now=wake)
    assert starts_reset(later)


def test_fence_clock_starts_once_and_is_not_moved_by_later_steps() -> None:
    d1 = step(node(F, fence_clock_from=None), dead(persisted="Fencing"))
    assert d1.state.fence_clock_from == T
    d2 = step(d1.state, dead(persisted="Fencing"), now=T + 5.0)
    assert d2.state.fence_clock_from == T
    assert d2.wake_at == pytest.approx(T + 18.0)


def test_fence_clock_starts_when_the_unreachable_annotation_is_visible() -> None:
    d = step(node(F, fence_clock_from=None), dead(persisted="Unreachable"))
    assert d.state.fence_clock_from == T


@pytest.mark.parametrize(
    ("cfg", "runs_hook"),
    [
        pytest.param(EXTERNAL, True, id="external mode runs the fence hook on entering fencing"),
        pytest.param(
            DecideConfig(fence_mode=FenceMode.EXTERNAL, dry_run=True),
            False,
            id="external mode in dry-run does not run the fence hook",
        ),
        pytest.param(POWER, True, id="power mode runs the fence agent on entering fencing"),
        pytest.param(SELF, False, id="self mode runs no hook"),
        pytest.param(MANUAL, False, id="manual mode runs no hook"),
        pytest.param(NONE, False, id="none mode runs no hook"),
    ],
)
def test_fence_hook_runs_once_on_entering_fencing_in_external_mode(
    cfg: DecideConfig, runs_hook: bool
) -> None:
    d = step(node(S), dead(), cfg=cfg)
    assert d.state.phase is F
    assert actions_of(d, RunFenceHook) == ([RunFenceHook(NODE)] if runs_hook else [])
    # not again on the next step
    assert actions_of(step(d.state, dead(), cfg=cfg, now=T + 1), RunFenceHook) == []


def test_a_fence_hook_that_does_not_confirm_runs_again_with_backoff() -> None:
    d = step(node(S), dead(), cfg=EXTERNAL)
    assert actions_of(d, RunFenceHook) == [RunFenceHook(NODE)]
    runs: list[float] = []
    state, now = d.state, T
    while now < T + 70.0:
        now = d.wake_at if d.wake_at is not None else now + 1.0
        d = step(state, dead(now=now), now=now, cfg=EXTERNAL)
        state = d.state
        if actions_of(d, RunFenceHook):
            runs.append(round(now - T, 3))
        assert d.state.phase is F and not is_destructive(d)
    # again after 2, 4, 8, 16 s, then every 30 s: never a reset without a confirmation
    assert runs == [2.0, 6.0, 14.0, 30.0, 60.0], runs


def test_a_confirmed_hook_is_persisted_and_a_new_episode_needs_a_new_one() -> None:
    state = node(F, unreachable_at=T - 5.0, hook_runs=1, hook_sent_at=T - 1.0)  # period runs
    d = step(state, dead(external_fence_confirmed=True, persisted="Fencing"), cfg=EXTERNAL)
    assert d.state.fence_confirmed and d.transitions == ()
    (persist,) = actions_of(d, PersistState)
    assert json.loads(persist.annotation)["fenceConfirmed"] is True
    resumed = NodeState.from_annotation(NODE, persist.annotation, T + 5.0)
    assert resumed.fence_confirmed and resumed.phase is F
    # back, then gone again: the next episode starts without the earlier proof
    again = resumed.moved(U, Reason.CORROBORATED_LEASE, T + 100.0)
    assert not again.fence_confirmed and again.hook_runs == 0 and again.hook_sent_at is None
    # and a withdrawal (or any phase but FENCING) drops it from what is persisted
    withdrawn = d.state.moved(S, Reason.HEARTBEAT_FRESH, T + 1.0)
    assert not withdrawn.fence_confirmed and withdrawn.hook_since is None
    assert "fenceConfirmed" not in json.loads(withdrawn.to_annotation())


def test_a_bmc_that_said_off_while_the_node_heartbeats_is_held_and_distrusted() -> None:
    """Must-not twin of the immediate power reset: a BMC read back off, yet the agent
    heartbeats from the same boot. No reset, an Event, and the BMC proves nothing more for
    this node, also after a leader change."""
    state = node(
        F,
        unreachable_at=T - 5.0,  # the period still runs: the confirmation alone cannot reset
        boot_id="boot-1",
        fence_confirmed=True,
        hook_runs=1,
        hook_sent_at=T - 2.0,
        heartbeats_at_mark=10,
    )
    alive = seen(0.2, boot_id="boot-1", received=11, persisted="Fencing")
    d = step(state, alive, cfg=POWER, ctx=context(policy=PERIOD))
    assert not is_destructive(d)
    assert ("PowerFenceContradiction", Reason.HOLD_POWER_CONTRADICTION) in events(d)
    assert d.state.power_contradicted and not d.state.fence_confirmed
    (persist,) = actions_of(d, PersistState)
    doc = json.loads(persist.annotation)
    assert doc["powerDistrusted"] is True and "fenceConfirmed" not in doc
    assert NodeState.from_annotation(NODE, persist.annotation, T).power_contradicted
    # the next episode: the BMC is not run and a confirmation does not count
    later = d.state.moved(F, Reason.PERIOD_RUNNING, T + 100.0, unreachable_at=T + 50.0)
    assert later.power_contradicted
    d2 = step(
        replace(later, fence_clock_from=T + 100.0),
        dead(external_fence_confirmed=True, persisted="Fencing", now=T + 110.0),
        cfg=POWER,
        now=T + 110.0,
        ctx=context(policy=PERIOD),
    )
    assert actions_of(d2, RunFenceHook) == [] and not is_destructive(d2)
    assert not d2.state.fence_confirmed


def test_heartbeats_from_an_agent_without_contact_still_contradict_a_bmc_that_said_off() -> None:
    """The agent reports no contact (a one-way broker path: its heartbeat signal is aged as
    silent, decide/heartbeats.py `contact_at`), but its heartbeats keep arriving from the same
    boot: the node runs, whatever the BMC said. Held and distrusted, as when it is in contact;
    its twin, no heartbeat heard at all, is the power fence's immediate reset (above)."""
    state = node(
        F,
        unreachable_at=T - 5.0,
        boot_id="boot-1",
        fence_confirmed=True,
        hook_runs=1,
        hook_sent_at=T - 2.0,
        heartbeats_at_mark=10,
    )
    cut_but_heard = replace(
        seen(6.0, boot_id="boot-1", received=11, persisted="Fencing"), heard_at=T - 0.2
    )
    d = step(state, cut_but_heard, cfg=POWER, ctx=context(policy=PERIOD))
    assert not is_destructive(d)
    assert ("PowerFenceContradiction", Reason.HOLD_POWER_CONTRADICTION) in events(d)
    assert d.state.power_contradicted and not d.state.fence_confirmed
    # Not heard since either: no contradiction, and nothing but the period holds the reset.
    silent = replace(cut_but_heard, heard_at=T - 6.0)
    d = step(state, silent, cfg=POWER, ctx=context(policy=PERIOD))
    assert ("PowerFenceContradiction", Reason.HOLD_POWER_CONTRADICTION) not in events(d)
    assert not d.state.power_contradicted


def test_a_node_rebooted_after_the_bmc_said_off_is_no_contradiction() -> None:
    state = node(F, boot_id="boot-1", fence_confirmed=True, hook_runs=1, hook_sent_at=T - 2.0)
    d = step(state, seen(0.2, boot_id="boot-2", received=1, persisted="Fencing"), cfg=POWER)
    assert ("PowerFenceContradiction", Reason.HOLD_POWER_CONTRADICTION) not in events(d)
    assert not d.state.power_contradicted


def test_a_new_leader_asks_the_bmc_again_instead_of_trusting_the_annotation() -> None:
    resumed = node(F, fence_confirmed=True, fence_clock_from=T - 1.0)
    d = step(resumed, dead(persisted="Fencing"), cfg=POWER, ctx=context(policy=PERIOD))
    assert actions_of(d, RunFenceHook) == [RunFenceHook(NODE)] and not is_destructive(d)
    assert not d.state.fence_confirmed
    # mode external keeps trusting it (its hook may not be idempotent)
    d = step(resumed, dead(persisted="Fencing"), cfg=EXTERNAL, ctx=context(policy=PERIOD))
    assert starts_reset(d)


@pytest.mark.parametrize(
    "hold", [Reason.HOLD_STORM, Reason.HOLD_UPGRADE, Reason.HOLD_POLICY_DISABLED]
)
def test_no_power_off_is_sent_while_a_hold_is_in_force(hold: Reason) -> None:
    """Switching a node off is as destructive as resetting its VMs: during a storm (maybe the
    controller's own network), an upgrade or with resets disabled, the BMC is not asked, not
    even once; mode external sends its first run regardless, as before."""
    held = context(holds=(hold,))
    assert actions_of(step(node(S), dead(), cfg=POWER, ctx=held), RunFenceHook) == []
    assert actions_of(step(node(S), dead(), cfg=EXTERNAL, ctx=held), RunFenceHook) != []
    assert actions_of(step(node(S), dead(), cfg=POWER), RunFenceHook) == [RunFenceHook(NODE)]


def test_no_power_off_before_the_lease_is_stale_and_the_agents_own_deadline() -> None:
    """The BMC switches off only a node whose kubelet Lease is stale (no other node can forge
    that) and that has been silent at least as long as its own agent waits before fencing
    itself (ARMED: 10 s): never a node that its own self-fence would have spared."""
    recent = node(F, last_contact_at=T - 6.0, unreachable_at=T - 2.0)
    d = step(recent, dead(hb_age=6.0, persisted="Fencing"), cfg=POWER)
    assert actions_of(d, RunFenceHook) == [] and d.wake_at is not None
    assert d.wake_at <= T + 4.0  # wakes when the agent's own deadline has passed
    later = step(
        recent, dead(hb_age=10.0, persisted="Fencing", now=T + 4.0), cfg=POWER, now=T + 4.0
    )
    assert actions_of(later, RunFenceHook) == [RunFenceHook(NODE)]
    # a Lease renewed 5 s ago is not stale (15 s): no power-off, however long the silence
    fresh_lease = dead(hb_age=40.0, lease_age=5.0, ready="True", persisted="Fencing")
    d = step(node(F), fresh_lease, cfg=POWER)
    assert actions_of(d, RunFenceHook) == [] and not is_destructive(d)
    # A silent node whose Lease, renewed just before the silence, turns stale in 2 s: decided
    # again then, not left waiting for an unrelated event (a chaos run once held a cut-off
    # node, unfenced, until its partition healed).
    silent = node(F, last_contact_at=T - 12.0, unreachable_at=T - 8.0)
    d = step(silent, dead(hb_age=12.0, lease_age=13.0, persisted="Fencing"), cfg=POWER)
    assert actions_of(d, RunFenceHook) == [] and d.wake_at == T + 2.0


def test_no_fence_hook_retry_while_a_hold_is_in_force() -> None:
    state = node(F, hook_runs=1, hook_sent_at=T - 60.0)
    held = step(state, dead(), ctx=context(holds=(Reason.HOLD_STORM,)), cfg=EXTERNAL)
    assert actions_of(held, RunFenceHook) == []
    assert actions_of(step(state, dead(), cfg=EXTERNAL), RunFenceHook) == [RunFenceHook(NODE)]


def test_unarmed_fence_in_self_mode_is_held_with_one_event() -> None:
    state = node(F, fence_clock_from=T - 60.0, fence=UNARMED)
    d1 = step(state, dead(persisted="Fencing"))
    assert events(d1) == [("ResetHeld", Reason.HOLD_UNFENCED)]
    assert d1.state.held is Reason.HOLD_UNFENCED
    d2 = step(d1.state, dead(persisted="Fencing"), now=T + 30.0)
    assert events(d2) == []
    assert not is_destructive(d2)


def test_volume_attachments_are_deleted_only_when_configured() -> None:
    cfg = DecideConfig(fence_mode=FenceMode.NONE, delete_volume_attachments=True)
    assert actions_of(step(node(F), dead(), cfg=cfg), DeleteVolumeAttachments) == [
        DeleteVolumeAttachments(NODE)
    ]
    assert actions_of(step(node(F), dead(), cfg=NONE), DeleteVolumeAttachments) == []


def test_reset_of_a_node_without_launcher_pods_taints_deletes_nothing_and_completes() -> None:
    d = step(node(F), dead(launcher_pods=()), cfg=NONE)
    assert [(a, b) for a, b, _ in d.transitions] == [(F, RS), (RS, R)]
    assert d.state.phase is R
    assert actions_of(d, TaintOutOfService) == [TaintOutOfService(NODE)]
    assert actions_of(d, ForceDeletePods) == []


# --- holds --------------------------------------------------------------------------------------

HOLDS = [
    pytest.param(Reason.HOLD_STORM, UP, id="storm: too many nodes down at once"),
    pytest.param(Reason.HOLD_QUORUM, UP, id="more than half of the nodes silent"),
    pytest.param(Reason.HOLD_BROKER_DOWN, BROKER_DOWN, id="the controller lost the broker"),
    pytest.param(Reason.HOLD_API_DOWN, API_DOWN, id="the controller lost the API server"),
    pytest.param(Reason.HOLD_POLICY_DISABLED, UP, id="policy enable false: detect only"),
    pytest.param(Reason.HOLD_DRY_RUN, UP, id="dry-run"),
    pytest.param(Reason.HOLD_UPGRADE, UP, id="a Harvester upgrade is running"),
]


@pytest.mark.parametrize("mode", list(FenceMode), ids=lambda m: f"mode {m}")
@pytest.mark.parametrize(("hold", "health"), HOLDS)
def test_a_hold_keeps_the_node_fencing_with_one_reset_held_event(
    hold: Reason, health: SourceHealth, mode: FenceMode
) -> None:
    cfg = DecideConfig(fence_mode=mode)
    # fully proven in every mode: period and safe delay long past, hook confirmed, admin taint
    state = node(F, fence_clock_from=T - 60.0, unreachable_at=T - 60.0)
    obs = dead(persisted="Fencing", external_fence_confirmed=True, out_of_service_tainted=True)
    ctx = context(health, holds=(hold,))
    d1 = step(state, obs, cfg=cfg, ctx=ctx)
    assert d1.state.phase is F
    assert not is_destructive(d1)
    assert events(d1) == [("ResetHeld", hold)]
    assert d1.state.held is hold
    # the hold persists: no reset, and no event repeated on every evaluation
    d2 = step(d1.state, obs, cfg=cfg, ctx=ctx, now=T + 10.0)
    d3 = step(d2.state, obs, cfg=cfg, ctx=ctx, now=T + 20.0)
    for d in (d2, d3):
        assert d.state.phase is F
        assert not is_destructive(d)
        assert events(d) == []
    # the hold lifts: the reset goes ahead
    d4 = step(d3.state, obs, cfg=cfg, ctx=context(UP), now=T + 30.0)
    assert starts_reset(d4)


def test_the_first_hold_is_reported_and_a_new_hold_reason_is_reported_again() -> None:
    state = node(F, fence_clock_from=T - 60.0)
    obs = dead(persisted="Fencing")
    d1 = step(state, obs, ctx=context(holds=(Reason.HOLD_BROKER_DOWN, Reason.HOLD_STORM)))
    assert events(d1) == [("ResetHeld", Reason.HOLD_BROKER_DOWN)]
    d2 = step(d1.state, obs, ctx=context(holds=(Reason.HOLD_STORM,)), now=T + 1)
    assert events(d2) == [("ResetHeld", Reason.HOLD_STORM)]
    assert not is_destructive(d2)


def test_while_more_than_half_are_silent_a_node_is_not_declared_down() -> None:
    """QuorumLost: its agent may be sparing itself, and a declaration would be the first thing
    it reads when its link returns (before we hear it): it would fence. It stays SUSPECT."""
    d = step(node(S), dead(), ctx=context(holds=(Reason.HOLD_QUORUM,)))
    assert d.state.phase is S and not d.transitions
    assert events(d) == [("ResetHeld", Reason.HOLD_QUORUM)]
    assert actions_of(d, PersistState) == []
    # The hold over, the same observation declares it.
    d2 = step(d.state, dead(), ctx=context(), now=T + 1)
    assert next(iter(d2.transitions)) == (S, U, Reason.CORROBORATED_LEASE)


def test_a_hold_while_entering_fencing_is_reported_in_the_same_step() -> None:
    d = step(node(S), dead(), ctx=context(holds=(Reason.HOLD_STORM,)))
    assert list(d.transitions) == [(S, U, Reason.CORROBORATED_LEASE), TO_FENCING]
    assert ("ResetHeld", Reason.HOLD_STORM) in events(d)


# --- falsely ready launcher pods ----------------------------------------------------------------

MIXED_PODS = (
    *pods("a", "b"),
    *pods("c", ready=False),
    *pods("d", terminating=True),
)


@pytest.mark.parametrize(
    ("cfg", "marked"),
    [
        pytest.param(
            DecideConfig(), True, id="falsely ready pods are reported and marked not ready"
        ),
        pytest.param(
            DecideConfig(dry_run=True),
            False,
            id="dry-run reports falsely ready pods but marks none",
        ),
        pytest.param(
            DecideConfig(mark_pods_not_ready=False),
            False,
            id="mark_pods_not_ready off reports falsely ready pods but marks none",
        ),
    ],
)
def test_falsely_ready_pods_on_an_unreachable_node(cfg: DecideConfig, marked: bool) -> None:
    d = step(node(S), dead(launcher_pods=MIXED_PODS), cfg=cfg)
    assert d.state.phase is F
    (ev,) = [a for a in actions_of(d, EmitEvent) if a.event == "FalselyReadyPods"]  # type: ignore[union-attr]
    assert isinstance(ev, EmitEvent)
    # Ready pods only; the Terminating one is already reported not ready by KubeVirt
    assert "vms/virt-launcher-a" in ev.message and "vms/virt-launcher-b" in ev.message
    assert "virt-launcher-c" not in ev.message and "virt-launcher-d" not in ev.message
    expected = [MarkPodsNotReady(NODE, (("vms", "virt-launcher-a"), ("vms", "virt-launcher-b")))]
    assert actions_of(d, MarkPodsNotReady) == (expected if marked else [])


def test_no_falsely_ready_report_when_no_pod_claims_ready() -> None:
    d = step(node(S), dead(launcher_pods=pods("c", ready=False) + pods("d", terminating=True)))
    assert d.state.phase is F
    assert all(name != "FalselyReadyPods" for name, _ in events(d))
    assert actions_of(d, MarkPodsNotReady) == []


# --- resetting, reset, recovering ---------------------------------------------------------------


def test_resetting_reissues_force_deletes_while_pods_remain() -> None:
    d = step(node(RS), dead(persisted="Resetting", out_of_service_tainted=True))
    assert d.state.phase is RS
    assert actions_of(d, ForceDeletePods) == [
        ForceDeletePods(NODE, (("vms", "virt-launcher-vm1"), ("vms", "virt-launcher-vm2")))
    ]
    assert d.wake_at == T + RESET_RETRY_S
    assert actions_of(d, TaintOutOfService) == []  # placed, and the Node shows it
    assert actions_of(d, PersistState) == []


# --- reconciliation: what the Node should show but does not is written again ------------------


def test_a_fencing_declaration_whose_write_failed_is_written_again_and_then_counts() -> None:
    state = node(F, fence_clock_from=None, entered_at=T - 5.0)
    lost = step(state, dead())  # the write of "Fencing" failed: the Node shows nothing
    (persist,) = actions_of(lost, PersistState)
    assert json.loads(persist.annotation)["phase"] == "Fencing"
    assert lost.state.fence_clock_from is None  # the agent cannot have read it: no clock
    assert lost.wake_at == T + RECONCILE_AFTER_S
    shown = step(lost.state, dead(persisted="Fencing"), now=T + 1.0)
    assert actions_of(shown, PersistState) == []
    assert shown.state.fence_clock_from == T + 1.0


def test_a_write_just_made_is_given_time_to_show_before_it_is_made_again() -> None:
    d = step(node(F, fence_clock_from=None, entered_at=T - 0.5), dead())
    assert actions_of(d, PersistState) == []
    assert d.wake_at == pytest.approx(T - 0.5 + RECONCILE_AFTER_S)


def test_a_resetting_node_whose_taint_is_missing_is_tainted_again() -> None:
    d = step(node(RS, entered_at=T - 5.0), dead(persisted="Resetting"))
    assert actions_of(d, TaintOutOfService) == [TaintOutOfService(NODE)]
    assert actions_of(d, PersistState) == []


def test_healthy_nodes_are_not_reconciled() -> None:
    d = step(node(H, entered_at=T - 50.0), seen())
    assert actions_of(d, PersistState) == [] and actions_of(d, TaintOutOfService) == []


def test_resetting_waits_without_deleting_while_the_api_is_down() -> None:
    d = step(node(RS), dead(), ctx=context(API_DOWN))
    assert d.state.phase is RS
    assert d.actions == ()


def test_resetting_becomes_reset_once_launcher_pods_are_gone() -> None:
    d = step(node(RS), dead(launcher_pods=(), received=150))
    assert list(d.transitions) == [(RS, R, Reason.LAUNCHER_PODS_GONE)]
    assert d.state.heartbeats_at_mark == 150  # recovery counts heartbeats from here


RECOVERY = [
    pytest.param(
        node(R),
        seen(0.5, received=103, boot_id="boot-2"),
        [],
        [(R, RC, Reason.NODE_REBOOTED), (RC, H, Reason.RECOVERED)],
        True,
        id="reset node back with a new boot id: rebooted, recovered, taint removed",
    ),
    pytest.param(
        node(R),
        seen(0.5, received=103),
        [],
        [(R, RC, Reason.NODE_BACK), (RC, H, Reason.RECOVERED)],
        True,
        id="reset node back with the same boot id: back, recovered, taint removed",
    ),
    pytest.param(
        node(R),
        seen(0.5, received=103, boot_id="boot-2"),
        pods("vm1"),
        [(R, RC, Reason.NODE_REBOOTED)],
        False,
        id="reset node back while a launcher pod is still bound: recovering, taint kept",
    ),
    pytest.param(
        node(R),
        seen(0.5, received=102, boot_id="boot-2"),
        [],
        [],
        False,
        id="reset node with two fresh heartbeats is not yet back",
    ),
    pytest.param(
        node(R),
        dead(launcher_pods=()),
        [],
        [],
        False,
        id="reset node still silent stays reset",
    ),
    pytest.param(
        node(RC, tainted=True),
        seen(0.5),
        [],
        [(RC, H, Reason.RECOVERED)],
        True,
        id="recovering node whose pods are all gone: taint removed, healthy",
    ),
    pytest.param(
        node(RC, tainted=True),
        seen(0.5),
        pods("vm1"),
        [],
        False,
        id="recovering node with a pod still bound keeps the out-of-service taint",
    ),
    pytest.param(
        node(RC, tainted=True),
        seen(3.5),
        pods("vm1"),
        [(RC, S, Reason.HEARTBEAT_STALE)],
        False,
        id="recovering node that goes silent again is suspect",
    ),
    pytest.param(
        node(F),
        seen(0.5, received=103),
        pods("vm1"),
        [(F, RC, Reason.NODE_BACK), (RC, H, Reason.RECOVERED)],
        False,
        id="node back during fencing recovers without any reset",
    ),
    pytest.param(
        node(F),
        seen(0.5, received=103, boot_id="boot-2"),
        pods("vm1"),
        [(F, RC, Reason.NODE_REBOOTED), (RC, H, Reason.RECOVERED)],
        False,
        id="node rebooted during fencing recovers as rebooted without any reset",
    ),
    pytest.param(
        node(F),
        seen(0.5, received=101),
        pods("vm1"),
        [(F, S, Reason.HEARTBEAT_FRESH)],
        False,
        id="one heartbeat during fencing withdraws the declaration at once, never resets",
    ),
    pytest.param(
        node(U),
        seen(0.5, received=103),
        pods("vm1"),
        [(U, RC, Reason.NODE_BACK), (RC, H, Reason.RECOVERED)],
        False,
        id="a resumed unreachable node that heartbeats again recovers",
    ),
]


@pytest.mark.parametrize(("state", "obs", "bound", "expected", "untaints"), RECOVERY)
def test_recovery_transitions(
    state: NodeState,
    obs: NodeObservation,
    bound: tuple[object, ...],
    expected: list[tuple[Phase, Phase, Reason]],
    untaints: bool,
) -> None:
    obs = replace(obs, launcher_pods=tuple(bound))  # type: ignore[arg-type]
    d = step(state, obs)
    assert list(d.transitions) == expected
    assert actions_of(d, RemoveOutOfServiceTaint) == (
        [RemoveOutOfServiceTaint(NODE)] if untaints else []
    )
    assert not is_destructive(d)
    if expected and expected[-1][1] is H:
        assert not d.state.tainted
        assert d.state.unreachable_at is None and d.state.fence_clock_from is None
    if expected and expected[0][1] is RC:
        assert ("NodeRecovered", expected[0][2]) in events(d)


def test_a_node_back_during_fencing_wakes_for_its_next_heartbeat_deadline() -> None:
    d = step(node(F), seen(0.5, received=101))
    assert d.state.phase is S and d.state.unreachable_at is None
    assert d.wake_at == pytest.approx(T - 0.5 + 3.0)


def test_alive_only_by_the_benefit_of_the_doubt_keeps_fencing() -> None:
    """A new leader (or a reconnected broker) counts every node alive for suspect_after_s:
    that is no heartbeat, and must not withdraw a declaration."""
    reconnected = context(SourceHealth(broker_up_since=T - 1.0, api_up_since=0.0))
    state = node(F, heartbeats_at_mark=100)
    d = step(state, seen(30.0, received=100), ctx=reconnected)
    assert d.state.phase is F and not d.transitions


# --- regressions (each was a bug in machine.py, found by the properties) ------------------------


def test_no_force_delete_once_the_agent_heartbeats_again_during_resetting() -> None:
    d = step(node(RS), seen(0.5, launcher_pods=pods("vm1")))
    assert d.state.phase is RS
    assert not is_destructive(d)


def test_a_tainted_suspect_node_back_goes_through_recovering_to_lose_the_taint() -> None:
    # it went silent while RECOVERING after a reset: our out-of-service taint is still on it
    state = node(S, tainted=True)
    d = step(state, seen(0.5, received=103))
    assert list(d.transitions) == [(S, RC, Reason.NODE_BACK), (RC, H, Reason.RECOVERED)]
    assert actions_of(d, RemoveOutOfServiceTaint) == [RemoveOutOfServiceTaint(NODE)]
    d2 = step(state, seen(0.5, received=103, launcher_pods=pods("vm1")))
    assert list(d2.transitions) == [(S, RC, Reason.NODE_BACK)]
    assert actions_of(d2, RemoveOutOfServiceTaint) == []
    d3 = step(state, seen(0.5, received=101))
    assert d3.transitions == () and d3.wake_at is not None


@pytest.mark.parametrize(
    ("state", "obs", "health"),
    [
        pytest.param(node(D), seen(0.5), API_DOWN, id="degraded while the API is blind"),
        pytest.param(
            node(RC, tainted=True),
            seen(0.5, launcher_pods=pods("vm1")),
            UP,
            id="recovering, waiting for the last pod to go",
        ),
    ],
)
def test_a_waiting_node_still_asks_to_be_woken_when_its_heartbeat_would_go_stale(
    state: NodeState, obs: NodeObservation, health: SourceHealth
) -> None:
    d = step(state, obs, ctx=context(health))
    assert d.transitions == ()
    assert d.wake_at == pytest.approx(T - 0.5 + 3.0)


def test_a_recovering_node_silent_past_unreachable_after_escalates_in_the_same_step() -> None:
    d = step(node(RC, tainted=True), dead())
    assert [to for _, to, _ in d.transitions] == [S, U, F]


def test_a_heartbeat_during_fencing_restarts_the_fence_clock_with_the_newest_declaration() -> None:
    slower = replace(node(F).fence, bound_s=60.0)  # type: ignore[type-var]
    state = node(F, fence_clock_from=T - 10.0)
    d = step(state, seen(0.2, received=101, fence=slower, persisted="Fencing"))
    assert d.state.phase is S
    assert d.state.fence_clock_from is None and d.state.fence == slower
    # silent again: a new episode, whose fence clock starts when its declaration is visible,
    # with the slower fence
    later = dead(persisted="Fencing", fence=slower)
    d2 = step(d.state, later, now=T + 10.0)
    assert d2.state.phase in (U, F) and d2.state.fence == slower
    d3 = step(d2.state, later, now=T + 11.0)
    assert d3.state.fence_clock_from == T + 10.0 or d3.state.fence_clock_from == T + 11.0
    assert d3.wake_at is not None
    assert d3.wake_at >= d3.state.fence_clock_from + 10.0 + 60.0 + 1.0 + 2.0


def test_unreachable_takes_the_declaration_of_the_last_heartbeat_seen() -> None:
    slower = replace(node(S).fence, after_s=120.0)  # type: ignore[type-var]
    d = step(node(S), dead(fence=slower))
    assert d.state.fence == slower
    # a new leader that has not heard the agent yet keeps what the annotation said
    d2 = step(node(S), dead(fence=None))
    assert d2.state.fence == node(S).fence


@pytest.mark.parametrize(
    ("hb_age", "lease_age", "unreachable"),
    [
        # DecideConfig default heartbeat 1 s: the Lease renewed 0.5 s after the last heartbeat,
        # then the machine lost power (the renewal may even be seen after that heartbeat).
        pytest.param(6.0, 5.5, True, id="renewed right after the last heartbeat: no veto"),
        pytest.param(6.0, 4.1, True, id="renewed 1.9 s after it: still no veto"),
        # renewed 3 s after the agent's last heartbeat: the kubelet ran after a missed beat
        pytest.param(6.0, 3.0, False, id="renewed after the next beat was due: veto"),
    ],
)
def test_only_a_lease_renewed_after_a_missed_heartbeat_vetoes_peer_corroboration(
    hb_age: float, lease_age: float, unreachable: bool
) -> None:
    d = step(node(S), seen(hb_age, lease_age=lease_age, peers_unreachable=True))
    assert (d.state.phase in (U, F)) is unreachable
    if unreachable:
        assert (S, U, Reason.CORROBORATED_PEERS) in d.transitions


def test_a_weak_fence_is_held_and_reset_only_where_the_operator_accepts_it() -> None:
    """No watchdog device behind the agent's fence: a frozen agent or a failing fence command
    would leave the VMs running, so its safe delay proves nothing (WeakFence), however long."""
    weak = replace(ARMED, device=False, watchdog_s=0.0)
    state = node(F, fence_clock_from=T - 600.0, unreachable_at=T - 600.0, fence=weak)
    d1 = step(state, dead(persisted="Fencing", fence=weak))
    assert events(d1) == [("ResetHeld", Reason.HOLD_WEAK_FENCE)]
    assert d1.state.held is Reason.HOLD_WEAK_FENCE and d1.reset_not_before is None
    d2 = step(d1.state, dead(persisted="Fencing", fence=weak), now=T + 600.0)
    assert not is_destructive(d2) and events(d2) == []
    # the twin: the operator opted in; the same node is reset after the same safe delay
    accepted = DecideConfig(accept_weak_fence=True)
    d3 = step(state, dead(persisted="Fencing", fence=weak), cfg=accepted)
    assert starts_reset(d3)
    # and a device-backed fence needs no opt-in
    assert starts_reset(step(replace(state, fence=ARMED), dead(persisted="Fencing")))


def test_a_withdrawal_the_node_does_not_show_is_written_again_soon_and_first() -> None:
    # The agent is heard again: SUSPECT/HEALTHY, but the Node still shows "Fencing" (the
    # withdrawal failed): its armed agent would fence on it within its grace.
    state = node(H, entered_at=T - 1.0)
    d = step(state, seen(persisted="Fencing"))
    assert isinstance(d.actions[0], PersistState)
    assert json.loads(d.actions[0].annotation)["phase"] == "Healthy"
    assert d.wake_at == pytest.approx(T + WITHDRAW_RETRY_S)
    just = step(node(H, entered_at=T - 0.1), seen(persisted="Fencing"))
    assert actions_of(just, PersistState) == []  # just written: give the watch a moment
    assert just.wake_at == pytest.approx(T - 0.1 + WITHDRAW_RETRY_S)


def test_a_withdrawal_goes_before_the_events_of_its_step() -> None:
    d = step(node(F, entered_at=T - 5.0), seen(0.5, received=101, persisted="Fencing"))
    assert d.state.phase is S
    persists = [i for i, a in enumerate(d.actions) if isinstance(a, PersistState)]
    assert persists == [0], d.actions


def test_a_recovering_node_is_healthy_only_once_the_node_shows_our_taint_gone() -> None:
    # Back, no pod bound any more, kubelet fine: our taint is removed, but the node stays
    # RECOVERING while the Node still shows it (a removal refused, lost, or not watched yet);
    # it is sent again every RECONCILE_AFTER_S, never more often.
    state = node(RC, tainted=True, entered_at=T - 5.0)

    def shown(at: float, tainted: bool = True) -> NodeObservation:
        return seen(0.5, received=103, out_of_service_tainted=tainted, now=at)

    first = step(state, shown(T))
    assert first.transitions == () and first.state.phase is RC and first.state.tainted
    assert actions_of(first, RemoveOutOfServiceTaint) == [RemoveOutOfServiceTaint(NODE)]
    assert first.wake_at == pytest.approx(T + RECONCILE_AFTER_S)

    soon = step(first.state, shown(T + 1.0), now=T + 1.0)
    assert soon.state.phase is RC and actions_of(soon, RemoveOutOfServiceTaint) == []
    again = step(soon.state, shown(T + RECONCILE_AFTER_S), now=T + RECONCILE_AFTER_S)
    assert again.state.phase is RC
    assert actions_of(again, RemoveOutOfServiceTaint) == [RemoveOutOfServiceTaint(NODE)]

    done = step(again.state, shown(T + 3.0, tainted=False), now=T + 3.0)
    assert list(done.transitions) == [(RC, H, Reason.RECOVERED)]
    assert not done.state.tainted and done.state.untaint_sent_at is None
    assert actions_of(done, RemoveOutOfServiceTaint) == []  # already sent, and shown gone


def test_a_recovering_node_we_never_tainted_keeps_a_taint_someone_else_placed() -> None:
    # The state says we placed no taint on it in this episode: whoever did, lifts it.
    d = step(node(RC, tainted=False), seen(0.5, received=103, out_of_service_tainted=True))
    assert list(d.transitions) == [(RC, H, Reason.RECOVERED)]
    assert actions_of(d, RemoveOutOfServiceTaint) == []


def test_dry_run_reconciles_nothing() -> None:
    cfg = DecideConfig(dry_run=True)
    d = step(node(F, fence_clock_from=None, entered_at=T - 5.0), dead(), cfg=cfg)
    assert actions_of(d, PersistState) == []


def test_a_lease_aged_past_its_deadline_during_an_unnoticed_api_freeze_degrades_nothing():
    """A CI run once turned three live nodes DEGRADED (their VMs live-migrated away): the API
    server froze 2.5 s after their kubelets' last renewal, the controller noticed the freeze
    only 3.7 s later, and the Leases' deadline fell in between. A Lease is stale only once
    the API answered a request sent after its deadline."""
    lease_age = 15.5  # past lease_stale_after_s (15 s): deadline at T - 0.5
    frozen = replace(UP, api_answered_at=T - 2.0)  # last answered probe sent before it
    d = step(node(H), seen(0.5, lease_age=lease_age), ctx=context(frozen))
    assert d.state.phase is H and not d.transitions and not actions_of(d, StartEvacuation)
    assert d.signals is not None and d.signals.lease_pending
    # Its twin: the API answers a probe sent after the deadline, and no renewal came: the
    # kubelet really lost its path, and the node is evacuated.
    answered = replace(UP, api_answered_at=T - 0.2)
    d = step(node(H), seen(0.5, lease_age=lease_age), ctx=context(answered))
    assert list(d.transitions) == [(H, D, Reason.KUBELET_PATH_LOST)]
    assert actions_of(d, StartEvacuation)
    assert d.signals is not None and not d.signals.lease_pending
