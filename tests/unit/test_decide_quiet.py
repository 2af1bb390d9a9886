"""A quiet node's wake-up moved on by newer heartbeats (decide/quiet.py) is exactly the wake-up
`decide` would ask for: whenever `next_quiet_wake` gives a time instead of a decision, deciding
in full at that moment keeps the node HEALTHY, does nothing and asks for that same time.

What may change between the quiet decision and its wake-up is what the runtime does not
decide a node again for: its heartbeat fields (time, count, boot, declaration, contact),
peer reports' verdict, the cluster-wide holds, the API's latest answer, and the clock. What
the runtime does decide again for (the node's Node, Lease, pods; a connection going up or
down; the policy) is held fixed, as it is in the runtime between two such events.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from watchdog.decide.config import DecideConfig, Policy
from watchdog.decide.machine import Context, Decision, decide
from watchdog.decide.observations import FenceDeclaration, NodeObservation, SourceHealth
from watchdog.decide.quiet import Quiet
from watchdog.decide.quiet import next_quiet_wake as next_wake
from watchdog.decide.reasons import Reason
from watchdog.decide.state import NodeState, Phase

from .test_decide_properties import PROPERTY, Scenario, configs, replay, scenarios

T0 = 1000.0
times = st.floats(T0 - 60.0, T0, allow_nan=False)  # all before the first decision, at T0
maybe_times = st.one_of(st.none(), times)
persisted = st.sampled_from([None, Phase.HEALTHY.value, Phase.FENCING.value, Phase.RESETTING.value])
declarations = st.one_of(
    st.none(),
    st.builds(
        FenceDeclaration,
        armed=st.booleans(),
        after_s=st.sampled_from([0.0, 5.0, 10.0]),
        bound_s=st.sampled_from([0.0, 5.0]),
    ),
)
any_holds = st.lists(st.sampled_from(list(Reason)), max_size=3).map(tuple)


def next_quiet_wake(
    quiet: Quiet, last: float | None, health: SourceHealth, now: float, cfg: DecideConfig
) -> tuple[float, float] | None:
    """decide/quiet.py's, given the sources' health as `decide` sees it."""
    return next_wake(quiet, last, health.broker_up_since, health.api_up_since, now, cfg)


@st.composite
def healthy_nodes(draw: st.DrawFn) -> tuple[NodeState, NodeObservation, Context]:
    """A HEALTHY node with any observation and any sources' health; half of them drawn as a
    healthy node usually looks (sources up, Ready, a recent heartbeat), so many are quiet."""
    typical = draw(st.booleans())
    # Mostly what a quiet node shows (a recent heartbeat and renewal), sometimes anything.
    recent = st.floats(T0 - 3.0, T0, allow_nan=False)
    lease = draw(st.one_of(st.floats(T0 - 14.0, T0, allow_nan=False), maybe_times))
    obs = NodeObservation(
        name="n1",
        last_heartbeat_at=draw(recent if typical else maybe_times),
        heard_at=draw(maybe_times),
        heartbeats_received=draw(st.integers(0, 50)),
        boot_id=draw(st.sampled_from([None, "b1", "b2"])),
        fence=draw(declarations),
        agent_offline=False if typical else draw(st.booleans()),
        lease_seen=lease is not None or draw(st.booleans()),
        lease_renewed_at=lease,
        ready="True" if typical else draw(st.sampled_from(["True", "False", "Unknown", None])),
        peers_unreachable=draw(st.sampled_from([None, False, True])),
        persisted_phase=draw(persisted),
        known_since=draw(maybe_times),
    )
    health = SourceHealth(
        broker_up_since=draw(times if typical else maybe_times),
        api_up_since=draw(times if typical else maybe_times),
        api_answered_at=draw(maybe_times),
    )
    ctx = Context(health, Policy(period_s=draw(st.sampled_from([5.0, 15.0]))), draw(any_holds))
    state = NodeState("n1", entered_at=draw(times))
    return state, obs, ctx


@st.composite
def later_inputs(
    draw: st.DrawFn, obs: NodeObservation, ctx: Context, now: float
) -> tuple[NodeObservation, Context, float]:
    """What may move between a quiet decision and its wake-up without the node being marked."""
    later = now + draw(st.floats(0.0, 60.0, allow_nan=False))
    last = obs.last_heartbeat_at
    new_last = draw(
        st.one_of(st.just(last), st.floats(now - 5.0, later, allow_nan=False))
        if last is None
        else st.one_of(st.just(last), st.floats(last, later, allow_nan=False))
    )
    obs2 = replace(
        obs,
        last_heartbeat_at=new_last,
        heard_at=draw(st.one_of(st.just(new_last), maybe_times)),
        heartbeats_received=obs.heartbeats_received + draw(st.integers(0, 40)),
        boot_id=draw(st.sampled_from([obs.boot_id, "b3"])),
        fence=draw(declarations),
        peers_unreachable=draw(st.sampled_from([None, False, True])),
    )
    health2 = replace(ctx.health, api_answered_at=draw(maybe_times))
    ctx2 = Context(health2, ctx.policy, draw(any_holds), draw(maybe_times))
    return obs2, ctx2, later


def assert_same_as_decide(
    state: NodeState,
    quiet: Quiet,
    obs: NodeObservation,
    ctx: Context,
    now: float,
    cfg: DecideConfig,
) -> bool:
    """When the wake-up is re-armed, it is what a whole decision would do; whether it was."""
    moved = next_quiet_wake(quiet, obs.last_heartbeat_at, ctx.health, now, cfg)
    if moved is None:
        return False
    wake_at, age = moved
    d: Decision = decide(state, obs, ctx, now, cfg)
    assert d.state == state, "a re-armed node would have changed state"
    assert d.actions == (), "a re-armed node would have acted"
    assert d.transitions == ()
    assert d.wake_at == wake_at, "the re-armed wake-up differs from the decision's"
    assert d.quiet is not None, "the decision would not be quiet any more"
    assert d.signals is not None and d.signals.heartbeat_age_s == age
    return True


@settings(
    PROPERTY, suppress_health_check=[*PROPERTY.suppress_health_check, HealthCheck.filter_too_much]
)
@given(configs(), healthy_nodes(), st.data())
def test_a_rearmed_wake_up_is_the_one_decide_would_ask_for(
    cfg: DecideConfig, node: tuple[NodeState, NodeObservation, Context], data: st.DataObject
) -> None:
    state, obs, ctx = node
    now = T0
    d = decide(state, obs, ctx, now, cfg)
    assume(d.quiet is not None)
    assert d.quiet is not None and d.wake_at is not None
    for _ in range(8):
        obs2, ctx2, later = data.draw(later_inputs(obs, ctx, now))
        rearmed = assert_same_as_decide(d.state, d.quiet, obs2, ctx2, later, cfg)
        event("re-armed" if rearmed else "decided in full")


@PROPERTY
@given(scenarios, st.data())
def test_over_whole_histories_every_rearm_matches_decide(sc: Scenario, data: st.DataObject) -> None:
    """The same, from the quiet decisions of random histories (tests/unit/decide_helpers.Sim)."""
    sim = replay(sc)
    quiet = [e for e in sim.log if e.decision.quiet is not None]
    event(f"quiet decisions: {'some' if quiet else 'none'}")
    for e in quiet[:: max(1, len(quiet) // 6)]:
        assert e.decision.quiet is not None
        obs2, ctx2, later = data.draw(later_inputs(e.obs, e.ctx, e.now))
        assert_same_as_decide(e.decision.state, e.decision.quiet, obs2, ctx2, later, sc.cfg)


# --- what must not be re-armed ------------------------------------------------------------------

CFG = DecideConfig()  # suspect after 4 s, Lease stale after 15 s


def quiet_decision(
    obs: NodeObservation | None = None, health: SourceHealth | None = None
) -> tuple[Decision, NodeObservation, Context]:
    obs = obs or NodeObservation(
        "n1", last_heartbeat_at=T0, lease_seen=True, lease_renewed_at=T0 - 10.0, ready="True"
    )
    ctx = Context(health or SourceHealth(T0 - 100.0, T0 - 100.0), Policy())
    d = decide(NodeState("n1", entered_at=T0 - 100.0), obs, ctx, T0, CFG)
    assert d.quiet is not None, "the fixture must be quiet"
    return d, obs, ctx


def test_a_node_silent_since_its_decision_is_decided_in_full_when_its_heartbeat_turns_stale():
    d, obs, ctx = quiet_decision()
    assert d.quiet is not None
    at = T0 + CFG.suspect_after_s
    assert next_quiet_wake(d.quiet, obs.last_heartbeat_at, ctx.health, at, CFG) is None
    # ... and decide at that moment indeed moves it: the refusal is what keeps detection.
    later = decide(d.state, obs, ctx, at, CFG)
    assert later.state.phase is Phase.SUSPECT


def test_a_newer_heartbeat_moves_the_wake_up_but_never_past_the_lease_deadline():
    d, _, ctx = quiet_decision()
    assert d.quiet is not None
    lease_deadline = T0 - 10.0 + CFG.lease_stale_after_s  # T0 + 5
    moved = next_quiet_wake(d.quiet, T0 + 3.0, ctx.health, T0 + 4.0, CFG)
    assert moved == (lease_deadline, 1.0), "the Lease deadline comes before the heartbeat's"
    # At the Lease deadline the node is decided in full (its Lease may be stale by then).
    assert next_quiet_wake(d.quiet, T0 + 4.9, ctx.health, lease_deadline, CFG) is None


def test_a_connection_that_went_down_or_came_back_since_the_decision_means_a_full_decision():
    d, _, _ = quiet_decision()
    assert d.quiet is not None
    for health in (
        SourceHealth(None, T0 - 100.0),  # broker down (or our ingest lagging)
        SourceHealth(T0 + 1.0, T0 - 100.0),  # broker reconnected
        SourceHealth(T0 - 100.0, None),  # API down
        SourceHealth(T0 - 100.0, T0 + 1.0),  # API back
    ):
        assert next_quiet_wake(d.quiet, T0 + 2.0, health, T0 + 3.0, CFG) is None, health


def test_nodes_that_are_not_quiet_have_no_quiet_decision():
    base = NodeObservation(
        "n1", last_heartbeat_at=T0, lease_seen=True, lease_renewed_at=T0 - 10.0, ready="True"
    )
    up = SourceHealth(T0 - 100.0, T0 - 100.0)
    state = NodeState("n1", entered_at=T0 - 100.0)
    cases = {
        "Ready=False (kubelet says so)": (replace(base, ready="False"), up),
        "Lease stale": (
            replace(base, lease_renewed_at=T0 - 30.0),
            SourceHealth(T0 - 100, T0 - 100, api_answered_at=T0),
        ),
        "Lease past its deadline, API answer pending": (
            replace(base, lease_renewed_at=T0 - 30.0),
            up,
        ),
        "agent offline": (replace(base, agent_offline=True), up),
        # Not heard since the broker came back, so not DEGRADED yet, but the first heartbeat
        # heard makes it so (found by the property above).
        "Ready=False from before the API went down": (
            replace(base, ready="False", last_heartbeat_at=None),
            SourceHealth(T0 - 1.0, None),
        ),
        "broker down": (base, SourceHealth(None, T0 - 100.0)),
        "withdrawal to re-write now": (replace(base, persisted_phase=Phase.FENCING.value), up),
    }
    for why, (obs, health) in cases.items():
        d = decide(state, obs, Context(health, Policy()), T0, CFG)
        assert d.quiet is None, why


def test_a_withdrawal_the_node_does_not_show_yet_is_written_before_the_heartbeat_would_wake():
    """reconcile's wake-up (the re-write of a withdrawn declaration) is not the heartbeat's: a
    newer heartbeat must not move the node past it."""
    obs = NodeObservation(
        "n1",
        last_heartbeat_at=T0,
        lease_seen=True,
        lease_renewed_at=T0,
        ready="True",
        persisted_phase=Phase.FENCING.value,
    )
    state = NodeState("n1", entered_at=T0 - 0.2)  # withdrawn 0.2 s ago
    ctx = Context(SourceHealth(T0 - 100.0, T0 - 100.0), Policy())
    d = decide(state, obs, ctx, T0, CFG)
    assert d.quiet is not None and d.actions == ()
    due = state.entered_at + 0.5
    assert d.quiet.other_wake == due
    assert next_quiet_wake(d.quiet, T0 + 0.4, ctx.health, due, CFG) is None
    assert decide(d.state, replace(obs, last_heartbeat_at=T0 + 0.4), ctx, due, CFG).actions


def test_a_heartbeat_from_before_the_broker_connection_counts_from_the_connection():
    """As in `decide` (heartbeat_watch_since): after a reconnection, a node not heard since
    counts from the connection, not from its last heartbeat (benefit of the doubt)."""
    obs = NodeObservation(
        "n1", last_heartbeat_at=T0 - 3.0, lease_seen=True, lease_renewed_at=T0, ready="True"
    )
    ctx = Context(SourceHealth(T0 - 1.0, T0 - 100.0), Policy())
    d = decide(NodeState("n1", entered_at=T0 - 100.0), obs, ctx, T0, CFG)
    assert d.quiet is not None and d.wake_at == T0 - 1.0 + CFG.suspect_after_s
    assert next_quiet_wake(d.quiet, T0 - 3.0, ctx.health, T0 + 0.5, CFG) == (
        T0 - 1.0 + CFG.suspect_after_s,
        1.5,
    )
    assert assert_same_as_decide(d.state, d.quiet, obs, ctx, T0 + 0.5, CFG)
