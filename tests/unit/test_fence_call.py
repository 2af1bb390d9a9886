"""The agent's fence rule as pure code (heartbeat/fence.py: `fence_at`, `fence_call`), the rule
its fence guard runs (heartbeat/agent.py, `_fence_guard`) and a protocol simulation can run
without an agent process: when it fences, and when it must look again."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from watchdog.decide.state import Phase
from watchdog.heartbeat.fence import FenceCall, fence_at, fence_call

AFTER, GRACE = 8.0, 3.0


def call(now: float, deadline: float | None, phase: str | None = None, since: float | None = None,
         lease: float | None = None) -> FenceCall:  # fmt: skip
    return fence_call(
        now,
        deadline,
        declared_phase=phase,
        declared_since=since,
        grace_s=GRACE,
        lease_deadline=lease,
        last_contact=None if deadline is None else deadline - AFTER,
        after_s=AFTER,
    )


def test_not_armed_in_this_boot_never_fences_whatever_the_api_says() -> None:
    """A cold boot after a cluster-wide power cut: no contact yet, nothing promised."""
    assert call(1_000.0, None, Phase.FENCING.value, since=0.0) == FenceCall()


def test_cut_off_it_fences_at_its_deadline_not_a_moment_before() -> None:
    assert call(107.9, 108.0) == FenceCall(wake_at=108.0)
    fenced = call(108.0, 108.0)
    assert fenced.reason == "no contact with broker or API for 8.0s"


def test_a_declaration_is_obeyed_after_the_grace_unless_withdrawn() -> None:
    declared = Phase.FENCING.value
    assert call(101.0, 200.0, declared, since=100.0) == FenceCall(wake_at=103.0)
    assert call(103.0, 200.0, declared, since=100.0).reason == "the API says this node is Fencing"


def test_the_lease_wait_holds_a_declaration_only_while_the_controller_waits_for_it_too() -> None:
    """Fencing: the controller still waits for its Lease gate, so may the agent. Resetting: it
    has passed it; the agent waits no more, whatever renewal it read."""
    assert call(104.0, 200.0, Phase.FENCING.value, since=100.0, lease=110.0).reason is None
    assert call(110.0, 200.0, Phase.FENCING.value, since=100.0, lease=110.0).reason is not None
    assert call(104.0, 200.0, Phase.RESETTING.value, since=100.0, lease=110.0).reason is not None


def test_the_deadline_moves_with_a_spare_and_the_lease_wait_never_before_contact() -> None:
    assert fence_at(None, 500.0, 500.0) is None  # not armed: spares and Leases change nothing
    assert fence_at(108.0, None, None) == 108.0
    assert fence_at(108.0, 115.0, None) == 115.0  # spared by a majority of cut-off peers
    assert fence_at(108.0, 104.0, 120.0) == 120.0  # the later of all three


times = st.floats(0.0, 300.0, allow_nan=False)


@given(
    now=times,
    deadline=st.one_of(st.none(), times),
    phase=st.sampled_from([None, *(p.value for p in Phase)]),
    since=times,
    lease=st.one_of(st.none(), times),
)
def test_it_fences_only_for_a_reason_and_always_wakes_before_one(
    now: float, deadline: float | None, phase: str | None, since: float, lease: float | None
) -> None:
    """Never a fence before the deadline or the declaration's grace; never a wake-up after
    either (the guard sleeps until `wake_at`, so a late one would be a late fence)."""
    c = call(now, deadline, phase, since if phase else None, lease)
    if deadline is None:
        assert c == FenceCall()
        return
    grace = since + GRACE if phase else None
    if grace is not None and lease is not None and phase in {"Unreachable", "Fencing"}:
        grace = max(grace, lease)
    due = [t for t in (deadline, grace) if t is not None]
    if c.reason is not None:
        assert now >= min(due)
    else:
        assert c.wake_at is not None and now < c.wake_at <= min(due) + 1e-9
