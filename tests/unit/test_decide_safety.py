"""The safe-delay arithmetic of DESIGN §5: one test per term, and no way to shorten it."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from watchdog.decide.config import DecideConfig, FenceMode, Policy
from watchdog.decide.observations import FenceDeclaration
from watchdog.decide.safety import (
    effective_period_s,
    lease_gate,
    reset_not_before,
    safe_delay_s,
)
from watchdog.decide.state import NodeState, Phase

from .decide_helpers import T, context, is_destructive, node, seen, starts_reset, step

DECLARED = FenceDeclaration(armed=True, after_s=10.0, bound_s=5.0, device=True, watchdog_s=5.0)
CFG = DecideConfig(heartbeat_interval_s=1.0, fence_margin_s=2.0)
BASE = 10.0 + 5.0 + 1.0 + 2.0


def test_safe_delay_is_the_sum_of_its_four_terms() -> None:
    assert safe_delay_s(DECLARED, CFG) == BASE


def test_term_self_fence_after_the_agent_declared() -> None:
    # the agent waits this long cut off from broker and API before fencing
    assert safe_delay_s(replace(DECLARED, after_s=40.0), CFG) == BASE + 30.0


def test_term_fence_action_bound_the_agent_declared() -> None:
    # the fence action (watchdog expiry, reboot) stops the VMs within this
    assert safe_delay_s(replace(DECLARED, bound_s=65.0), CFG) == BASE + 60.0


def test_term_the_watchdog_device_timeout_when_it_outlasts_the_bound() -> None:
    # a frozen agent or a failed fence command: the device resets the node this long after
    # the last pet, which the agent stops at its deadline
    assert safe_delay_s(replace(DECLARED, watchdog_s=35.0), CFG) == BASE + 30.0
    assert safe_delay_s(replace(DECLARED, watchdog_s=1.0), CFG) == BASE  # the bound dominates


def test_a_weak_fence_has_no_safe_delay_unless_the_operator_accepts_it() -> None:
    weak = replace(DECLARED, device=False, watchdog_s=0.0)
    assert safe_delay_s(weak, CFG) is None
    assert safe_delay_s(weak, replace(CFG, accept_weak_fence=True)) == BASE


def test_term_one_heartbeat_interval() -> None:
    # the agent may have had one more broker round trip than the controller saw
    assert safe_delay_s(DECLARED, replace(CFG, heartbeat_interval_s=4.0)) == BASE + 3.0


def test_term_margin() -> None:
    # clock-rate drift between the machines and scheduling delay
    assert safe_delay_s(DECLARED, replace(CFG, fence_margin_s=12.0)) == BASE + 10.0


def test_the_controllers_own_assumptions_do_not_enter_the_delay() -> None:
    # only what the agent declared counts; the controller's suspect/unreachable timings do not
    other = replace(CFG, suspect_after_s=30.0, unreachable_after_s=60.0, lease_stale_after_s=99.0)
    assert safe_delay_s(DECLARED, other) == BASE


@pytest.mark.parametrize(
    "declared",
    [
        pytest.param(None, id="never declared a fence"),
        pytest.param(replace(DECLARED, armed=False), id="declared its fence unarmed"),
    ],
)
def test_no_armed_declaration_means_no_safe_delay_at_all(declared: FenceDeclaration | None) -> None:
    assert safe_delay_s(declared, CFG) is None
    assert reset_not_before(0.0, 0.0, Policy(period_s=15.0), declared, CFG) is None


@pytest.mark.parametrize(
    "declared",
    [
        pytest.param(replace(DECLARED, after_s=math.nan), id="after_s NaN"),
        pytest.param(replace(DECLARED, bound_s=math.nan), id="bound_s NaN"),
        pytest.param(replace(DECLARED, after_s=math.inf), id="after_s infinite"),
        pytest.param(replace(DECLARED, after_s=-100.0), id="after_s negative"),
        pytest.param(replace(DECLARED, bound_s=-100.0), id="bound_s negative"),
        pytest.param(replace(DECLARED, watchdog_s=math.nan), id="watchdog_s NaN"),
        pytest.param(replace(DECLARED, watchdog_s=-1.0), id="watchdog_s negative"),
    ],
)
def test_a_nonsensical_declaration_proves_nothing(declared: FenceDeclaration) -> None:
    # max(period_end, NaN) is period_end: a NaN or negative term would silently shorten the wait
    # to the policy period; such a node is treated as unfenced instead
    assert safe_delay_s(declared, CFG) is None
    assert reset_not_before(0.0, 0.0, Policy(period_s=15.0), declared, CFG) is None


def test_a_resumed_node_with_a_nan_declaration_in_its_annotation_is_not_reset_on_time() -> None:
    annotation = '{"fence":{"after_s":NaN,"armed":true,"bound_s":5.0},"phase":"Fencing"}'
    state = NodeState.from_annotation("node-a", annotation, T - 600.0)
    # NaN is refused with the annotation: resumed as HEALTHY, detected again from scratch.
    assert state.phase is Phase.HEALTHY and state.resumed
    obs = seen(600.0, lease_age=600.0, ready="Unknown", fence=None, persisted="Fencing")
    d1 = step(state, obs, now=T - 590.0)
    d2 = step(d1.state, obs)
    assert not is_destructive(d1) and not is_destructive(d2)
    assert d2.state.phase not in (Phase.RESETTING, Phase.RESET)


# --- effective period ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("period", "declared", "mode", "effective"),
    [
        pytest.param(
            15.0,
            DECLARED,
            FenceMode.SELF,
            BASE,
            id="self: period below the safe delay is raised to it",
        ),
        pytest.param(
            BASE, DECLARED, FenceMode.SELF, BASE, id="self: period equal to the safe delay stays"
        ),
        pytest.param(
            300.0, DECLARED, FenceMode.SELF, 300.0, id="self: period above the safe delay stays"
        ),
        pytest.param(
            15.0, None, FenceMode.SELF, 15.0, id="self: never declared, period as configured"
        ),
        pytest.param(
            15.0,
            replace(DECLARED, armed=False),
            FenceMode.SELF,
            15.0,
            id="self: unarmed, period as configured (reset needs other proof)",
        ),
        pytest.param(15.0, DECLARED, FenceMode.EXTERNAL, 15.0, id="external: the period"),
        pytest.param(15.0, DECLARED, FenceMode.MANUAL, 15.0, id="manual: the period"),
        pytest.param(15.0, DECLARED, FenceMode.NONE, 15.0, id="none: the period"),
    ],
)
def test_effective_period(
    period: float, declared: FenceDeclaration | None, mode: FenceMode, effective: float
) -> None:
    cfg = replace(CFG, fence_mode=mode)
    assert effective_period_s(Policy(period_s=period), declared, cfg) == effective


# --- earliest reset -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("unreachable_at", "clock", "period", "mode", "earliest"),
    [
        pytest.param(
            100.0,
            100.0,
            15.0,
            FenceMode.SELF,
            100.0 + BASE,
            id="self: safe delay longer than the period",
        ),
        pytest.param(
            100.0, 100.0, 60.0, FenceMode.SELF, 160.0, id="self: period longer than the safe delay"
        ),
        pytest.param(
            100.0,
            150.0,
            15.0,
            FenceMode.SELF,
            150.0 + BASE,
            id="self: the safe delay counts from the fence clock, not from unreachable",
        ),
        pytest.param(
            100.0, None, 15.0, FenceMode.SELF, None, id="self: no fence clock yet, no time at all"
        ),
        pytest.param(
            100.0, None, 15.0, FenceMode.EXTERNAL, 115.0, id="external: unreachable + period"
        ),
        pytest.param(100.0, None, 15.0, FenceMode.MANUAL, 115.0, id="manual: unreachable + period"),
        pytest.param(100.0, None, 15.0, FenceMode.NONE, 115.0, id="none: unreachable + period"),
    ],
)
def test_reset_not_before(
    unreachable_at: float,
    clock: float | None,
    period: float,
    mode: FenceMode,
    earliest: float | None,
) -> None:
    cfg = replace(CFG, fence_mode=mode)
    assert (
        reset_not_before(unreachable_at, clock, Policy(period_s=period), DECLARED, cfg) == earliest
    )


def test_decide_applies_the_raised_period() -> None:
    # a 1 s policy period does not let a self-fenced node be reset before its 18 s safe delay
    state = node(Phase.FENCING, unreachable_at=T - 17.0, fence_clock_from=T - 17.0, fence=DECLARED)
    obs = seen(40.0, lease_age=40.0, ready="Unknown", persisted="Fencing")
    d = step(state, obs, cfg=CFG, ctx=context(policy=Policy(period_s=1.0)))
    assert not is_destructive(d)
    assert d.wake_at == pytest.approx(T + 1.0)


# --- the Lease gate: a node whose kubelet renews is not reset before its agent gives up -------

LEASED = replace(DECLARED, lease_s=15.0)  # stop time max(bound 5, watchdog 5) = 5, margin 2


def test_the_lease_gate_counts_from_the_last_renewal_the_controller_saw() -> None:
    assert lease_gate(LEASED, 100.0, CFG) == 100.0 + 15.0 + 5.0 + 2.0
    # the device outlasting the bound stops the node later: the gate waits for it
    assert lease_gate(replace(LEASED, watchdog_s=9.0), 100.0, CFG) == 100.0 + 15.0 + 9.0 + 2.0
    # no promise to wait (an agent without it), or a Lease never seen: no gate
    assert lease_gate(DECLARED, 100.0, CFG) is None
    assert lease_gate(LEASED, None, CFG) is None


def test_a_reset_waits_for_the_lease_gate_the_agent_declared_and_not_without_it() -> None:
    """A node declared unreachable on its peers' word, safe delay and period long passed, its
    Lease last renewed 12 s ago (before its agent went silent 10 s ago). Its agent, if it still
    reaches the API, fences only 15 s after that renewal: no reset before the gate; at it, the
    reset. Twin: an agent that declared no Lease wait is reset at once."""
    state = node(Phase.FENCING, unreachable_at=T - 30.0, fence_clock_from=T - 30.0, fence=LEASED)
    obs = seen(10.0, lease_age=12.0, ready="Unknown", persisted="Fencing", fence=LEASED)
    held = step(state, obs, cfg=CFG)
    assert not is_destructive(held)
    assert held.reset_not_before == pytest.approx(T - 12.0 + 15.0 + 5.0 + 2.0)
    assert held.wake_at == pytest.approx(T + 10.0)
    later = T + 10.0
    obs = seen(20.0, lease_age=22.0, ready="Unknown", persisted="Fencing", fence=LEASED, now=later)
    assert starts_reset(step(held.state, obs, cfg=CFG, now=later))
    # the twin: no lease_s declared
    plain = replace(state, fence=DECLARED)
    obs = seen(10.0, lease_age=12.0, ready="Unknown", persisted="Fencing", fence=DECLARED)
    assert starts_reset(step(plain, obs, cfg=CFG))


@pytest.mark.parametrize("renewed_before_silence_s", [0.0, 2.0, 5.0, 10.0])
def test_a_dead_node_loses_at_most_two_seconds_to_a_15_s_lease_gate(
    renewed_before_silence_s: float,
) -> None:
    """The power-off at the shipped settings and the opt-in lease_s 15 (after 8 s, bound 5 s,
    device 5 s, margin 2 s, heartbeat 1 s, unreachable after 4 s), when the controller saw the
    kubelet's last renewal at or before its agent's last heartbeat (a renewal seen up to two
    heartbeat intervals after it does not veto, and moves the gate as much later), and the
    fence clock starts no earlier than 4 s after that heartbeat. The gate then ends at most
    2 s after the safe delay, and not at all after it once the renewal is 2 s older."""
    shipped = FenceDeclaration(
        armed=True, after_s=8.0, bound_s=5.0, device=True, watchdog_s=5.0, lease_s=15.0
    )
    last_contact = 100.0
    gate = lease_gate(shipped, last_contact - renewed_before_silence_s, CFG)
    delay = safe_delay_s(shipped, CFG)
    assert gate is not None and delay is not None
    late = gate - (last_contact + 4.0 + delay)
    assert late <= 2.0
    if renewed_before_silence_s >= 2.0:
        assert late <= 0.0
