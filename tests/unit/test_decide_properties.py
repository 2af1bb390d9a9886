"""Safety properties of the decision core over random histories on virtual time.

Hypothesis generates a configuration, a policy and a history: the node dying, rebooting, losing
only its broker path or only its kubelet; the controller losing the broker or the API; peers,
storms, upgrades, administrators' taints, policy and fence-declaration changes, leader
failovers, pod deletes that fail. `Sim` replays the history, calling `decide` on news and at
`wake_at` only, and records the ground truth next to each decision. The properties compare the
two: would a VM be reset, and when, and was that safe given what really happened?
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import Any

from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from watchdog.decide.actions import ForceDeletePods, TaintOutOfService
from watchdog.decide.config import DecideConfig, FenceMode, Policy
from watchdog.decide.machine import decide
from watchdog.decide.observations import FenceDeclaration
from watchdog.decide.reasons import Reason
from watchdog.decide.signals import Signal
from watchdog.decide.state import NodeState, Phase

from .decide_helpers import Evaluation, Sim, pods, self_safe_delay, starts_reset

# The unit run is fast and deterministic (a fixed seed, few examples, every regression pinned
# with @example). Explore for real with e.g. DECIDE_EXAMPLES=3000: random seeds, many examples.
_EXPLORE = int(os.environ.get("DECIDE_EXAMPLES", "0"))
PROPERTY = settings(
    max_examples=_EXPLORE or 50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=not _EXPLORE,
)

# --- strategies ---------------------------------------------------------------------------------

armed = st.builds(
    FenceDeclaration,
    armed=st.just(True),
    after_s=st.sampled_from([0.0, 5.0, 10.0, 30.0, 60.0]),
    bound_s=st.sampled_from([0.0, 5.0, 20.0]),
)
declarations = st.one_of(
    armed,
    armed,
    armed,
    st.none(),
    st.builds(FenceDeclaration, armed=st.just(False), after_s=st.just(10.0), bound_s=st.just(5.0)),
)

policies = st.builds(
    Policy,
    enable=st.sampled_from([True, True, True, True, True, False]),
    period_s=st.sampled_from([1.0, 5.0, 15.0, 40.0, 120.0]),
)


@st.composite
def configs(draw: st.DrawFn) -> DecideConfig:
    interval = draw(st.sampled_from([1.0, 2.0]))
    suspect = interval * draw(st.integers(2, 4))
    return DecideConfig(
        heartbeat_interval_s=interval,
        suspect_after_s=suspect,
        unreachable_after_s=suspect + draw(st.sampled_from([1.0, 2.0, 10.0])),
        lease_stale_after_s=draw(st.sampled_from([5.0, 15.0, 40.0])),
        recovery_heartbeats=draw(st.integers(1, 4)),
        storm_max_unreachable=draw(st.integers(1, 10)),
        storm_max_fraction=draw(st.sampled_from([0.3, 0.5, 1.0])),
        fence_mode=draw(st.sampled_from(list(FenceMode))),
        fence_margin_s=draw(st.sampled_from([0.0, 2.0])),
        dry_run=draw(st.sampled_from([False] * 5 + [True])),
        mark_pods_not_ready=draw(st.booleans()),
        delete_volume_attachments=draw(st.booleans()),
    )


# What happens to the node (often), and around it (less often) ...
STORY = st.one_of(
    st.just(("die",)),
    st.just(("die_with_will",)),
    st.tuples(st.just("boot"), st.booleans()),  # back; True: with a new boot id
    st.just(("agent_cut",)),  # agent loses the broker, kubelet fine
    st.just(("agent_back",)),
    st.just(("kubelet_lost",)),  # kubelet or its API path lost, agent fine
    st.just(("kubelet_back",)),
    st.tuples(st.just("blip"), st.integers(1, 3)),  # the agent gets n heartbeats out, then not
    st.tuples(st.just("declare"), declarations),
    st.just(("admin_taint",)),
    st.just(("pod_appears",)),  # a launcher pod (still, or newly) bound to the node
    st.tuples(st.just("deletes_fail"), st.booleans()),
)
NOISE = st.one_of(
    st.just(("broker_down",)),
    st.just(("broker_up",)),
    st.just(("api_down",)),
    st.just(("api_up",)),
    st.tuples(st.just("peers"), st.sampled_from([None, True, False])),
    st.tuples(st.just("others_down"), st.integers(0, 9)),
    st.tuples(st.just("upgrade"), st.booleans()),
    st.tuples(st.just("policy"), policies),
    st.just(("failover",)),
    st.just(("pods_gone",)),
    st.tuples(st.just("hook_confirms"), st.booleans()),
)
OPS = st.one_of(STORY, STORY, NOISE)
# ... then how long to let it run (seconds of virtual time)
WAITS = st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 15.0, 30.0, 60.0])
HISTORIES = st.lists(st.tuples(OPS, WAITS), min_size=1, max_size=12)


@dataclass(frozen=True)
class Scenario:
    cfg: DecideConfig
    policy: Policy
    fence: FenceDeclaration | None
    others_down: int
    history: list[tuple[tuple[Any, ...], float]]
    ends_dead: bool  # finally the node dies for good (so most histories reach a reset)


scenarios = st.builds(
    Scenario,
    cfg=configs(),
    policy=policies,
    fence=declarations,
    others_down=st.sampled_from([0, 0, 0, 0, 2, 5]),
    history=HISTORIES,
    ends_dead=st.booleans(),
)


def apply(sim: Sim, op: tuple[Any, ...]) -> None:
    match op:
        case ("die",):
            sim.node_dies()
        case ("die_with_will",):
            sim.node_dies(will=True)
        case ("boot", new_boot):
            sim.node_boots(f"boot-{sim.now}" if new_boot else sim.boot_id)
        case ("agent_cut",):
            sim.agent_sending = False
        case ("agent_back",):
            sim.agent_sending, sim.agent_offline = True, False
        case ("blip", n):
            sim.agent_sending, sim.agent_offline = True, False
            sim.advance(n * sim.cfg.heartbeat_interval_s)  # exactly n ticks
            sim.agent_sending = False
        case ("pod_appears",):
            sim.launcher_pods.append(pods(f"vm-{sim.now}")[0])
        case ("kubelet_lost",):
            sim.kubelet_renewing = False
        case ("kubelet_back",):
            sim.kubelet_renewing, sim.ready = True, "True"
        case ("broker_down",):
            sim.broker_down()
        case ("broker_up",):
            if sim.broker_up_since is None:
                sim.broker_up()
        case ("api_down",):
            sim.api_down()
        case ("api_up",):
            if sim.api_up_since is None:
                sim.api_up()
        case ("peers", value):
            sim.peers_unreachable = value
        case ("admin_taint",):
            sim.admin_taint = True
        case ("others_down", k):
            sim.other_down = k
        case ("upgrade", running):
            sim.upgrade_running = running
        case ("policy", policy):
            sim.policy = policy
        case ("declare", declaration):
            sim.fence = declaration
        case ("failover",):
            sim.failover()
        case ("pods_gone",):
            sim.launcher_pods = []
        case ("deletes_fail", fail):
            sim.deletes_fail = fail
        case ("hook_confirms", ok):
            sim.hook_confirms = ok
        case _:  # pragma: no cover
            raise AssertionError(op)


# Regression histories: each once broke a property below (found by hypothesis, fixed in
# machine.py); pinned as explicit examples so that the fast deterministic run always has them.
FAST = DecideConfig(
    heartbeat_interval_s=1.0,
    suspect_after_s=2.0,
    unreachable_after_s=3.0,
    lease_stale_after_s=5.0,
    recovery_heartbeats=1,
)
ZERO_FENCE = FenceDeclaration(armed=True, after_s=0.0, bound_s=0.0, device=True, watchdog_s=0.0)
# the node comes back while its pods' force-deletes keep failing
BACK_DURING_RESETTING = Scenario(
    FAST,
    Policy(period_s=1.0),
    ZERO_FENCE,
    0,
    [(("die",), 0.0), (("deletes_fail", True), 8.0), (("agent_back",), 0.0)],
    ends_dead=False,
)
# degraded (it came back without its kubelet), then the controller loses the API
DEGRADED_API_DOWN = Scenario(
    FAST,
    Policy(period_s=1.0),
    None,
    0,
    [(("die",), 0.0), (("agent_back",), 5.0), (("api_down",), 0.0)],
    ends_dead=False,
)
# reset, back with a launcher pod still bound: recovering, waiting for that pod
RECOVERING_WITH_A_POD = Scenario(
    FAST,
    Policy(period_s=1.0),
    ZERO_FENCE,
    0,
    [(("die",), 10.0), (("pod_appears",), 0.0), (("boot", True), 5.0)],
    ends_dead=False,
)
# ... and a short flap while recovering
RECOVERING_FLAP = Scenario(
    FAST,
    Policy(period_s=1.0),
    ZERO_FENCE,
    0,
    [
        (("die",), 10.0),
        (("pod_appears",), 0.0),
        (("boot", True), 5.0),
        (("agent_cut",), 3.0),
        (("agent_back",), 5.0),
    ],
    ends_dead=False,
)


def replay(sc: Scenario) -> Sim:
    sim = Sim(cfg=sc.cfg, policy=sc.policy, fence=sc.fence, other_down=sc.others_down)
    sim.advance(3 * sc.cfg.heartbeat_interval_s)
    for op, wait in sc.history:
        apply(sim, op)
        sim.advance(wait)
    if sc.ends_dead:
        sim.node_dies()
    sim.advance(200.0)  # let whatever was started finish
    event(f"mode {sc.cfg.fence_mode}: {'reset' if sim.reset_times() else 'no reset'}")
    return sim


def resets(sim: Sim) -> list[tuple[int, Evaluation]]:
    return [(i, e) for i, e in enumerate(sim.log) if starts_reset(e.decision)]


def unreachable_since(sim: Sim, upto: int) -> float:
    """When the node was last declared unreachable before log entry `upto`: by a transition,
    or by a new leader resuming it as down (its clocks start at its first evaluation)."""
    for i in range(upto, -1, -1):
        e = sim.log[i]
        if any(to is Phase.UNREACHABLE for _, to, _ in e.decision.transitions):
            return e.now
        if i in sim.failovers and e.state.phase in (Phase.UNREACHABLE, Phase.FENCING):
            return e.now
    raise AssertionError("reset without the node ever being unreachable")


def admin_proof(e: Evaluation) -> bool:
    return e.admin_taint and not e.state.tainted


# --- (a) no reset action while the heartbeat is alive ------------------------------------------


@PROPERTY
@given(scenarios)
@example(BACK_DURING_RESETTING)
def test_no_taint_or_force_delete_while_the_heartbeat_is_alive(sc: Scenario) -> None:
    sim = replay(sc)
    for e in sim.log:
        destructive = [
            a for a in e.decision.actions if isinstance(a, TaintOutOfService | ForceDeletePods)
        ]
        if not destructive:
            continue
        assert e.decision.signals is not None
        assert e.decision.signals.heartbeat is not Signal.ALIVE, (e.now, destructive)
        assert not e.truly_heartbeating, (e.now, destructive)


# --- (b) no reset without fencing proof ---------------------------------------------------------


@PROPERTY
@given(scenarios)
def test_no_reset_without_fencing_proof(sc: Scenario) -> None:
    sim = replay(sc)
    for i, e in resets(sim):
        mode = sc.cfg.fence_mode
        if admin_proof(e):
            continue  # an administrator's out-of-service taint is proof in every mode
        assert mode is not FenceMode.MANUAL, "manual mode reset without the administrator's taint"
        if mode is FenceMode.EXTERNAL:
            assert e.obs.external_fence_confirmed
        if mode is FenceMode.POWER and power_confirmed(sim, i):
            continue  # the BMC read back off in this episode
        if mode in (FenceMode.SELF, FenceMode.POWER):
            # (mode power without the BMC's confirmation falls back to the self-fence)
            # the agent's last declaration the controller received was an armed fence ...
            assert e.last_declaration_seen is not None and e.last_declaration_seen.armed
            # ... and it could read that it is being fenced: the annotation was visible
            since = unreachable_since(sim, i)
            assert any(
                x.obs.persisted_phase in ("Unreachable", "Fencing")
                for x in sim.log[: i + 1]
                if x.now >= since
            )


def power_confirmed(sim: Sim, i: int) -> bool:
    """Whether a BMC confirmation (a fence run's success) was observed in the episode of the
    reset at log index `i`."""
    since = unreachable_since(sim, i)
    return any(x.obs.external_fence_confirmed for x in sim.log[: i + 1] if x.now >= since)


# --- (c) UNKNOWN sources never produce UNREACHABLE ----------------------------------------------


def declared_unreachable(e: Evaluation) -> bool:
    return any(to is Phase.UNREACHABLE for _, to, _ in e.decision.transitions)


@PROPERTY
@given(scenarios)
def test_unknown_sources_never_make_a_node_unreachable(sc: Scenario) -> None:
    sim = replay(sc)
    for e in sim.log:
        if not declared_unreachable(e):
            continue
        health = e.ctx.health
        assert health.broker_up_since is not None, "unreachable while the broker was down"
        api_corroborates = health.api_up_since is not None and (
            (e.obs.ready is not None and e.obs.ready != "True")
            or (
                e.obs.lease_seen
                and e.obs.lease_renewed_at is not None
                and e.now - max(e.obs.lease_renewed_at, health.api_up_since)
                >= sc.cfg.lease_stale_after_s
            )
        )
        assert api_corroborates or e.obs.peers_unreachable is True


@PROPERTY
@given(scenarios)
def test_with_the_broker_down_throughout_nothing_is_declared_unreachable(sc: Scenario) -> None:
    sim = Sim(cfg=sc.cfg, policy=sc.policy, fence=sc.fence)
    sim.advance(5.0)
    sim.broker_down()
    for op, wait in sc.history:
        if op[0] not in ("broker_up", "failover"):
            apply(sim, op)
        sim.advance(wait)
    sim.advance(120.0)
    assert not any(declared_unreachable(e) for e in sim.log)
    assert sim.reset_times() == []


@PROPERTY
@given(scenarios)
def test_with_the_api_down_and_no_peers_nothing_is_declared_unreachable(sc: Scenario) -> None:
    sim = Sim(cfg=sc.cfg, policy=sc.policy, fence=sc.fence)
    sim.advance(5.0)
    sim.api_down()
    for op, wait in sc.history:
        if op[0] not in ("api_up", "peers", "failover"):
            apply(sim, op)
        sim.advance(wait)
    sim.advance(120.0)
    assert not any(declared_unreachable(e) for e in sim.log)
    assert sim.reset_times() == []


# --- (d) a storm holds every reset --------------------------------------------------------------


@PROPERTY
@given(scenarios)
def test_a_storm_produces_a_hold_and_no_reset(sc: Scenario) -> None:
    sim = replay(sc)
    for e in sim.log:
        if Reason.HOLD_STORM not in e.ctx.holds:
            continue
        assert not starts_reset(e.decision)
        d = e.decision
        assert d.signals is not None
        if d.state.phase is Phase.FENCING and d.signals.heartbeat is not Signal.ALIVE:
            assert d.state.held is e.ctx.holds[0]


@PROPERTY
@given(scenarios, st.integers(5, 9))
def test_half_the_cluster_down_never_resets(sc: Scenario, others_down: int) -> None:
    # 10 nodes; with this one down, at least 6 are: over the 0.5 default fraction
    cfg = DecideConfig(fence_mode=sc.cfg.fence_mode)
    sim = Sim(cfg=cfg, policy=sc.policy, fence=sc.fence, other_down=others_down)
    for op, wait in sc.history:
        if op[0] not in ("others_down", "admin_taint"):
            apply(sim, op)
        sim.advance(wait)
    sim.node_dies()
    sim.advance(300.0)
    assert sim.reset_times() == []
    if sim.phase is Phase.FENCING:
        assert sim.state is not None and sim.state.held is not None


# --- (e) never too early ------------------------------------------------------------------------


@PROPERTY
@given(scenarios)
def test_no_reset_before_the_period_and_the_safe_delay(sc: Scenario) -> None:
    sim = replay(sc)
    cfg = sc.cfg
    for i, e in resets(sim):
        since = unreachable_since(sim, i)
        assert e.now >= since + e.ctx.policy.period_s
        if admin_proof(e) or cfg.fence_mode not in (FenceMode.SELF, FenceMode.POWER):
            continue
        if cfg.fence_mode is FenceMode.POWER and power_confirmed(sim, i):
            continue  # read back off from the BMC: the policy period only
        declared = e.state.fence
        assert declared is not None and declared.armed
        delay = self_safe_delay(declared, cfg)
        # the agent could read that it is being fenced from this moment (annotation visible)
        visible = next(
            x.now
            for x in sim.log[: i + 1]
            if x.now >= since and x.obs.persisted_phase in ("Unreachable", "Fencing")
        )
        assert e.now >= visible + delay
        # and never earlier than its last contact with the broker + the safe delay it declared
        assert e.agent_last_contact is not None
        agent_declared = e.declared_at_agent_contact
        assert agent_declared is not None and agent_declared.armed
        assert e.now >= e.agent_last_contact + self_safe_delay(agent_declared, cfg), (
            f"reset at {e.now}, agent last reached the broker at {e.agent_last_contact} "
            f"and may take {self_safe_delay(agent_declared, cfg)}s to fence"
        )


@PROPERTY
@given(
    configs().map(lambda c: replace(c, fence_mode=FenceMode.SELF, dry_run=False)),
    armed,
    st.lists(
        st.tuples(
            st.sampled_from([0.0, 1.0, 3.0, 5.0, 10.0, 20.0, 40.0]),  # silence before the blip
            st.integers(1, 3),  # heartbeats that get out
            st.one_of(st.none(), armed),  # a new declaration in them (agent reconfigured)
        ),
        max_size=4,
    ),
)
@example(  # one heartbeat gets out while fencing: the agent's own fence timer restarts
    replace(FAST, recovery_heartbeats=3),
    FenceDeclaration(True, 10.0, 5.0, device=True, watchdog_s=5.0),
    [(12.0, 1, None)],
)
@example(  # ... and in it the agent declares a slower fence than before
    replace(FAST, recovery_heartbeats=3),
    FenceDeclaration(True, 10.0, 0.0, device=True, watchdog_s=0.0),
    [(8.0, 1, FenceDeclaration(True, 10.0, 20.0, device=True, watchdog_s=20.0))],
)
@example(  # a new, slower declaration arrives while the node is only suspect
    replace(FAST, recovery_heartbeats=3),
    FenceDeclaration(True, 10.0, 0.0, device=True, watchdog_s=0.0),
    [(2.5, 1, FenceDeclaration(True, 10.0, 20.0, device=True, watchdog_s=20.0))],
)
def test_heartbeats_of_a_dying_node_never_shorten_the_wait_after_the_last_one(
    cfg: DecideConfig,
    declared: FenceDeclaration,
    blips: list[tuple[float, int, FenceDeclaration | None]],
) -> None:
    sim = Sim(cfg=cfg, policy=Policy(period_s=1.0), fence=declared, other_nodes=99)
    sim.advance(5.0)
    sim.node_dies()  # then blips while it is suspect, unreachable or fencing
    for silence, n, new_declaration in blips:
        sim.advance(silence)
        if new_declaration is not None:
            sim.fence = new_declaration
        apply(sim, ("blip", n))
    sim.advance(300.0)
    for _, e in resets(sim):
        assert e.agent_last_contact is not None and e.declared_at_agent_contact is not None
        assert e.now >= e.agent_last_contact + self_safe_delay(e.declared_at_agent_contact, cfg), (
            f"reset at {e.now}, agent last reached the broker at {e.agent_last_contact} "
            f"and declared {e.declared_at_agent_contact}"
        )


# --- (f) determinism ----------------------------------------------------------------------------


@PROPERTY
@given(scenarios)
def test_same_history_same_decisions(sc: Scenario) -> None:
    first, second = replay(sc), replay(sc)
    assert [(e.now, e.decision) for e in first.log] == [(e.now, e.decision) for e in second.log]
    # and deciding again on any recorded input gives the recorded output
    for e in first.log[:: max(1, len(first.log) // 20)]:
        assert decide(e.state, e.obs, e.ctx, e.now, sc.cfg) == e.decision


# --- liveness: a silent node is always noticed --------------------------------------------------


@PROPERTY
@given(scenarios)
@example(DEGRADED_API_DOWN)
@example(RECOVERING_WITH_A_POD)
def test_a_node_that_stops_heartbeating_is_noticed_without_outside_news(sc: Scenario) -> None:
    sim = Sim(cfg=sc.cfg, policy=sc.policy, fence=sc.fence, other_down=sc.others_down)
    for op, wait in sc.history:
        apply(sim, op)
        sim.advance(wait)
    # now nothing changes any more except that the agent is silent: only wake-ups drive decide
    sim.node_dies()
    if sim.broker_up_since is None:
        sim.broker_up()
    sim.advance(sc.cfg.suspect_after_s + sc.cfg.heartbeat_interval_s)
    assert sim.phase not in (Phase.HEALTHY, Phase.DEGRADED, Phase.RECOVERING), sim.phase


@PROPERTY
@given(scenarios)
@example(RECOVERING_FLAP)
def test_a_node_back_for_good_ends_healthy_without_the_out_of_service_taint(sc: Scenario) -> None:
    sim = replay(sc)
    # whatever happened, the node is now back and everything works again
    sim.node_boots(f"boot-{sim.now}")
    sim.peers_unreachable = None
    sim.deletes_fail = False
    for up, since in ((sim.broker_up, sim.broker_up_since), (sim.api_up, sim.api_up_since)):
        if since is None:
            up()
    sim.advance(60.0)
    sim.launcher_pods = []  # Kubernetes cleans up what is left on the node
    sim.advance(60.0)
    assert sim.phase is Phase.HEALTHY
    assert not sim.our_taint, (
        "a recovered node kept the out-of-service taint: nothing schedules there"
    )


# --- (g) persisted state ------------------------------------------------------------------------

states = st.builds(
    NodeState,
    name=st.just("node-a"),
    phase=st.sampled_from(list(Phase)),
    reason=st.sampled_from(list(Reason)),
    boot_id=st.one_of(st.none(), st.text(min_size=1, max_size=40)),
    fence=st.one_of(
        st.none(),
        st.builds(
            FenceDeclaration,
            armed=st.booleans(),
            after_s=st.floats(0, 1e6, allow_nan=False),
            bound_s=st.floats(0, 1e6, allow_nan=False),
        ),
    ),
    tainted=st.booleans(),
)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(states, st.floats(0, 1e9, allow_nan=False))
def test_persisted_state_round_trips(state: NodeState, now: float) -> None:
    back = NodeState.from_annotation("node-a", state.to_annotation(), now)
    # DEGRADED resumes as HEALTHY: the new leader re-enters it and starts its own evacuation.
    expected_phase = Phase.HEALTHY if state.phase is Phase.DEGRADED else state.phase
    assert (back.phase, back.reason, back.boot_id, back.fence, back.tainted) == (
        expected_phase,
        state.reason,
        state.boot_id,
        state.fence,
        state.tainted,
    )
    assert back.resumed
    # a resumed down node restarts its clocks from now: it can only wait longer, never less
    if state.phase in (Phase.UNREACHABLE, Phase.FENCING, Phase.RESETTING, Phase.RESET):
        assert back.unreachable_at == now and back.fence_clock_from is None


def _json_containers(kids: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    keys = st.sampled_from(
        ["phase", "reason", "fence", "bootID", "tainted", "armed", "after_s", "bound_s"]
    )
    return st.lists(kids, max_size=4) | st.dictionaries(keys, kids, max_size=5)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    st.one_of(
        st.text(max_size=60),
        st.binary(max_size=60).map(lambda b: b.decode("latin-1")),
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers()
            | st.just(10**400)  # a JSON integer no float can hold
            | st.floats(allow_nan=False)
            | st.text(max_size=10)
            | st.sampled_from([p.value for p in Phase] + [r.value for r in Reason]),
            _json_containers,
            max_leaves=10,
        ).map(json.dumps),
    )
)
@example('{"phase":"Fencing","fence":{"armed":true,"after_s":' + "9" * 400 + ',"bound_s":1}}')
def test_any_annotation_resumes_without_crashing(value: str) -> None:
    state = NodeState.from_annotation("node-a", value, 5.0)
    assert state.name == "node-a" and state.entered_at == 5.0
    if state.phase is Phase.HEALTHY and state.reason is Reason.RESUMED:
        assert state.fence is None and not state.tainted
