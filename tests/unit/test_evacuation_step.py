"""One look at a degraded node's evacuation, decided without the cache, the clock or the API
(decide.evacuation.evacuation_step, migration_ended; DESIGN §6)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from watchdog.decide.evacuation import (
    MAX_ATTEMPTS,
    EvacuationEffects,
    EvacuationEvent,
    EvacuationState,
    EvacuationVMI,
    Limits,
    evacuation_step,
    evacuation_wake_at,
    migration_ended,
    migration_result,
)

NODE = "n1"
T0 = 100.0
TIMEOUT_S = 180.0
LIMITS = Limits(per_cluster=5, outbound_per_node=2)


def vm(name: str, *, movable: bool = True, **kw: object) -> EvacuationVMI:
    reason = None if movable else "HostDevice"
    return EvacuationVMI("vms", name, movable, not_migratable_reason=reason, **kw)  # type: ignore[arg-type]


def start() -> EvacuationState:
    return EvacuationState(NODE, started_at=T0)


def step(
    state: EvacuationState,
    vmis: list[EvacuationVMI],
    *,
    active: int = 0,
    running_here: int = 0,
    limits: Limits = LIMITS,
    now: float = T0 + 1,
    timeout_s: float = TIMEOUT_S,
) -> tuple[EvacuationState, EvacuationEffects]:
    return evacuation_step(state, vmis, active, running_here, limits, now, timeout_s)


def fail(state: EvacuationState, name: str, times: int = 1) -> EvacuationState:
    for _ in range(times):
        state = migration_ended(state, ("vms", name), migration_result("Failed"))
    return state


# -- started within the limits -------------------------------------------------------------


def test_vmis_are_started_within_the_limits_in_priority_order() -> None:
    vmis = [vm("a", memory_bytes=8), vm("b", memory_bytes=1), vm("c", priority=5), vm("d")]
    state, fx = step(start(), vmis)
    assert fx.migrate == (("vms", "c"), ("vms", "d"))  # priority 5, then 0 bytes before 1
    assert fx.counts == {"started": 2}
    assert fx.events == ()
    assert state == start()  # nothing to remember: attempts count only ended migrations


def test_migrations_already_running_take_their_slots() -> None:
    vmis = [vm("a"), vm("b"), vm("c")]
    assert step(start(), vmis, running_here=1)[1].migrate == (("vms", "a"),)
    assert step(start(), vmis, active=4)[1].migrate == (("vms", "a"),)
    _, full = step(start(), vmis, active=5)
    assert full.migrate == ()
    assert full.counts == {}
    assert full.end is None  # three VMIs still to move: not finished


def test_a_vmi_already_migrating_is_not_started_again_and_keeps_the_evacuation_open() -> None:
    state, fx = step(start(), [vm("a", migrating=True)], running_here=1)
    assert fx == EvacuationEffects()
    assert not state.finished


# -- not migratable: reported once ---------------------------------------------------------


def test_a_not_migratable_vmi_is_reported_once_and_never_started() -> None:
    vmis = [vm("pinned", movable=False), vm("ok")]
    state, fx = step(start(), vmis)
    assert fx.reports == (
        EvacuationEvent(
            "VMNotMigratable",
            "vms/pinned cannot live-migrate (HostDevice); it keeps running on the degraded node",
            warning=True,
            result="not_migratable",
        ),
    )
    assert fx.migrate == (("vms", "ok"),)
    assert fx.counts == {"not_migratable": 1, "started": 1}
    assert state.reported == {("vms", "pinned")}

    again, fx2 = step(state, vmis, running_here=1)
    assert fx2.reports == ()
    assert "not_migratable" not in fx2.counts
    assert ("vms", "pinned") not in fx2.migrate
    assert again.reported == {("vms", "pinned")}


def test_a_not_migratable_vmi_without_a_reason_names_the_missing_condition() -> None:
    v = EvacuationVMI("vms", "x", False, not_migratable_reason="NoLiveMigratableCondition")
    _, fx = step(start(), [v])
    assert fx.reports[0].message == (
        "vms/x cannot live-migrate (NoLiveMigratableCondition); "
        "it keeps running on the degraded node"
    )


# -- given up after MAX_ATTEMPTS failed migrations -----------------------------------------


def test_migration_ended_counts_failures_only() -> None:
    assert MAX_ATTEMPTS == 2
    assert migration_result("Succeeded") == "succeeded"
    assert migration_result("Failed") == "failed"
    s = fail(start(), "a")
    assert s.attempts == {("vms", "a"): 1}
    assert migration_ended(s, ("vms", "a"), "succeeded") is s
    assert fail(s, "a").attempts == {("vms", "a"): 2}
    assert start().attempts == {}  # the original is untouched


def test_a_vmi_is_retried_until_max_attempts_then_given_up_once() -> None:
    vmis = [vm("a")]
    state = fail(start(), "a", MAX_ATTEMPTS - 1)
    state, fx = step(state, vmis)
    assert fx.migrate == (("vms", "a"),)  # one failure: tried again
    assert fx.events == ()

    state = fail(state, "a")
    state, fx = step(state, vmis, now=T0 + 2)
    assert fx.reports == (
        EvacuationEvent(
            "VMNotMigratable",
            "vms/a: 2 migrations failed; not retrying",
            warning=True,
            result="given_up",
        ),
    )
    assert fx.migrate == ()
    assert fx.counts == {"given_up": 1}
    assert fx.end is None  # counted as left until the next look
    assert state.given_up == {("vms", "a")}

    state, fx = step(state, vmis, now=T0 + 3)
    assert "given_up" not in fx.counts
    assert fx.migrate == ()
    assert fx.end == EvacuationEvent(
        "EvacuationFinished",
        f"every live-migratable VMI left {NODE} (0 not migratable, 1 given up)",
    )
    assert state.finished


def test_a_given_up_vmi_is_never_started_again_even_with_room() -> None:
    state, _ = step(fail(start(), "a", MAX_ATTEMPTS), [vm("a")])
    for now in (T0 + 5, T0 + 50, T0 + 500):
        state, fx = step(state, [vm("a")], limits=Limits(50, 50), now=now)
        assert fx.migrate == ()
        assert all(e.result != "given_up" for e in fx.events)


def test_a_vmi_given_up_keeps_the_slot_the_plan_gave_it_for_this_look() -> None:
    vmis = [vm("a", priority=9), vm("b")]
    one = Limits(per_cluster=5, outbound_per_node=1)
    state, fx = step(fail(start(), "a", MAX_ATTEMPTS), vmis, limits=one)
    assert fx.migrate == ()
    assert [e.result for e in fx.reports] == ["given_up"]
    _, fx = step(state, vmis, limits=one)
    assert fx.migrate == (("vms", "b"),)


# -- finished -------------------------------------------------------------------------------


def test_finished_once_nothing_movable_is_left_and_no_migration_runs() -> None:
    state, fx = step(start(), [vm("pinned", movable=False)])
    assert fx.end == EvacuationEvent(
        "EvacuationFinished",
        f"every live-migratable VMI left {NODE} (1 not migratable, 0 given up)",
    )
    assert fx.counts == {"not_migratable": 1}
    assert state.finished
    state, fx = step(state, [vm("pinned", movable=False)])
    assert fx == EvacuationEffects()  # neither reported nor finished twice


def test_not_finished_while_a_migration_runs_or_was_just_started() -> None:
    running, fx = step(start(), [], running_here=1)
    assert fx.end is None
    assert not running.finished
    started, fx = step(start(), [vm("a")])
    assert fx.migrate == (("vms", "a"),)
    assert fx.end is None
    assert not started.finished
    # The migration ended, the VMI runs elsewhere: nothing on the node any more.
    done, fx = step(started, [], now=T0 + 30)
    assert fx.end is not None
    assert fx.end.event == "EvacuationFinished"
    assert done.finished


# -- the time limit -------------------------------------------------------------------------


def test_the_timeout_is_reported_once_after_timeout_s_and_resets_nothing() -> None:
    vmis = [vm("a", migrating=True)]
    state, fx = step(start(), vmis, running_here=1, now=T0 + TIMEOUT_S)
    assert fx == EvacuationEffects()  # not past the limit yet: exactly at it
    assert not state.timed_out

    state, fx = step(state, vmis, running_here=1, now=T0 + TIMEOUT_S + 0.5)
    # The whole of what the step asks for: one Event and its count, no reset, nothing else.
    assert fx == EvacuationEffects(
        end=EvacuationEvent(
            "EvacuationTimeout",
            f"evacuation of {NODE} still unfinished after 180s (1 VMIs left); "
            "VMs keep running, nothing is reset",
            warning=True,
            result="timeout",
        )
    )
    assert fx.counts == {"timeout": 1}
    assert state.timed_out
    assert not state.finished

    state, fx = step(state, vmis, running_here=1, now=T0 + 10 * TIMEOUT_S)
    assert fx == EvacuationEffects()


def test_after_the_timeout_the_evacuation_goes_on() -> None:
    state, _ = step(start(), [vm("a"), vm("b")], active=5, now=T0 + TIMEOUT_S + 1)
    assert state.timed_out
    state, fx = step(state, [vm("a"), vm("b")], now=T0 + TIMEOUT_S + 2)
    assert fx.migrate == (("vms", "a"), ("vms", "b"))
    _, fx = step(state, [], now=T0 + TIMEOUT_S + 60)
    assert fx.end is not None
    assert fx.end.event == "EvacuationFinished"


def test_finishing_past_the_limit_is_a_finish_not_a_timeout() -> None:
    state, fx = step(start(), [], now=T0 + TIMEOUT_S + 100)
    assert fx.end is not None
    assert fx.end.event == "EvacuationFinished"
    assert "timeout" not in fx.counts
    assert not state.timed_out


def test_a_finished_evacuation_never_reports_a_timeout_later() -> None:
    # The node stays DEGRADED after every VMI left: no "still unfinished (0 VMIs left)".
    state, fx = step(start(), [], now=T0 + 10)
    assert fx.end is not None and fx.end.event == "EvacuationFinished"
    for later in (TIMEOUT_S + 1, 10 * TIMEOUT_S):
        state, fx = step(state, [], now=T0 + later)
        assert fx.end is None and fx.counts == {}, later
    assert not state.timed_out


def test_the_timeout_names_the_limit_and_the_vmis_left() -> None:
    vmis = [vm("a"), vm("b"), vm("c"), vm("pinned", movable=False)]
    _, fx = step(start(), vmis, active=5, now=T0 + 91, timeout_s=90.4)
    assert fx.end is not None
    assert fx.end.message == (
        f"evacuation of {NODE} still unfinished after 90s (3 VMIs left); "
        "VMs keep running, nothing is reset"
    )


# -- over many looks ------------------------------------------------------------------------

LOOK = st.tuples(
    st.integers(0, 6),  # migrations running in the cluster
    st.integers(0, 3),  # of which from this node
    st.lists(st.sampled_from("abcd"), max_size=3),  # VMIs whose migration failed since
    st.floats(0, 60),  # seconds since the previous look
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(LOOK, min_size=1, max_size=12),
    st.sets(st.sampled_from("abcd")),
    st.integers(1, 3),
    st.integers(1, 6),
)
def test_over_any_sequence_of_looks(
    looks: list[tuple[int, int, list[str], float]],
    pinned: set[str],
    per_node: int,
    per_cluster: int,
) -> None:
    """Within the limits, each report at most once, given-up VMIs never started again."""
    limits = Limits(per_cluster=per_cluster, outbound_per_node=per_node)
    vmis = [vm(n, movable=n not in pinned) for n in "abcd"]
    state, now = start(), T0
    seen: list[EvacuationEvent] = []
    for active, here, failed, dt in looks:
        for name in failed:
            state = fail(state, name)
        now += dt
        given_up_before = state.given_up
        state, fx = step(
            state, vmis, active=active + here, running_here=here, limits=limits, now=now
        )
        assert len(fx.migrate) <= max(0, min(per_cluster - active - here, per_node - here))
        assert not set(fx.migrate) & given_up_before
        assert all(name not in pinned for _, name in fx.migrate)
        assert all(state.attempts.get(k, 0) < MAX_ATTEMPTS for k in fx.migrate)
        seen.extend(fx.events)
    messages = [e.message for e in seen]
    assert len(messages) == len(set(messages))
    assert [e.event for e in seen].count("EvacuationTimeout") <= 1
    assert [e.event for e in seen].count("EvacuationFinished") <= 1
    assert sum(e.result == "not_migratable" for e in seen) == len(pinned & {"a", "b", "c", "d"})


def test_a_look_for_time_alone_is_due_just_past_the_limit_and_finds_the_timeout() -> None:
    """The runtime sleeps until `evacuation_wake_at`; a look then must report the timeout (a
    look exactly at the limit would find it not yet passed and ask for the same moment)."""
    vmis = [vm("a", migrating=True)]
    state = start()
    wake = evacuation_wake_at(state, TIMEOUT_S)
    assert wake is not None and T0 + TIMEOUT_S < wake < T0 + TIMEOUT_S + 0.1
    state, fx = step(state, vmis, running_here=1, now=wake)
    assert fx.end is not None and fx.end.event == "EvacuationTimeout"
    assert evacuation_wake_at(state, TIMEOUT_S) is None  # reported once: nothing more is due
    finished, _ = step(start(), [], now=T0 + 1)
    assert evacuation_wake_at(finished, TIMEOUT_S) is None
