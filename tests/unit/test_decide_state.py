"""The persisted node state: what a new leader resumes from, and what it makes of garbage."""

from __future__ import annotations

import json

import pytest

from watchdog.decide.observations import FenceDeclaration
from watchdog.decide.reasons import Reason
from watchdog.decide.state import NodeState, Phase

from .decide_helpers import T, is_destructive, seen, starts_reset, step

FENCE = FenceDeclaration(armed=True, after_s=10.0, bound_s=5.0, device=True, watchdog_s=5.0)


def test_annotation_is_compact_sorted_json_with_what_a_new_leader_needs() -> None:
    state = NodeState(
        "node-a",
        Phase.FENCING,
        Reason.CORROBORATED_LEASE,
        entered_at=5.0,
        unreachable_at=5.0,
        fence_clock_from=6.0,
        boot_id="b1",
        fence=FENCE,
        tainted=True,
    )
    value = state.to_annotation()
    assert " " not in value
    assert json.loads(value) == {
        "phase": "Fencing",
        "reason": "CorroboratedByLease",
        "bootID": "b1",
        "fence": {
            "armed": True,
            "after_s": 10.0,
            "bound_s": 5.0,
            "device": True,
            "watchdog_s": 5.0,
        },
        "tainted": True,
    }  # and no monotonic timestamps: they are process-local


def test_a_minimal_state_persists_only_phase_and_reason() -> None:
    assert NodeState("node-a").to_annotation() == '{"phase":"Healthy","reason":"HeartbeatFresh"}'


@pytest.mark.parametrize(
    "phase", [p for p in Phase if p is not Phase.DEGRADED], ids=lambda p: f"resume {p}"
)
def test_every_phase_with_an_obligation_resumes_as_itself(phase: Phase) -> None:
    state = NodeState("node-a", phase, Reason.PERIOD_RUNNING, boot_id="b1", fence=FENCE)
    back = NodeState.from_annotation("node-a", state.to_annotation(), 42.0)
    assert (back.phase, back.reason, back.boot_id, back.fence) == (
        phase,
        Reason.PERIOD_RUNNING,
        "b1",
        FENCE,
    )
    assert back.resumed and back.entered_at == 42.0
    down = phase in (Phase.UNREACHABLE, Phase.FENCING, Phase.RESETTING, Phase.RESET)
    assert back.unreachable_at == (42.0 if down else None)
    assert back.fence_clock_from is None  # restarts from this leader's own observation


@pytest.mark.parametrize("value", [None, ""], ids=["no annotation", "empty annotation"])
def test_a_node_without_annotation_starts_healthy(value: str | None) -> None:
    state = NodeState.from_annotation("node-a", value, 7.0)
    assert state == NodeState("node-a", entered_at=7.0)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("not json", id="not JSON"),
        pytest.param("{", id="truncated JSON"),
        pytest.param("[]", id="a list"),
        pytest.param("null", id="null"),
        pytest.param("5", id="a number"),
        pytest.param('"Fencing"', id="a bare string"),
        pytest.param("{}", id="no phase"),
        pytest.param('{"phase":"Exploding"}', id="unknown phase"),
        pytest.param('{"phase":5}', id="phase of the wrong type"),
        pytest.param('{"phase":["Fencing"]}', id="phase as a list"),
        pytest.param('{"phase":"Fencing","reason":"Because"}', id="unknown reason"),
        pytest.param('{"phase":"Fencing","fence":{"armed":true}}', id="fence without its times"),
        pytest.param(
            '{"phase":"Fencing","fence":{"armed":true,"after_s":"soon","bound_s":1}}',
            id="fence time not a number",
        ),
        pytest.param(
            '{"phase":"Fencing","fence":{"armed":true,"after_s":[1],"bound_s":1}}',
            id="fence time a list",
        ),
        pytest.param(
            '{"phase":"Fencing","fence":{"armed":true,"after_s":' + "9" * 400 + ',"bound_s":1}}',
            id="fence time an integer no float can hold",
        ),
    ],
)
def test_garbage_annotations_resume_as_healthy_and_say_so(value: str) -> None:
    state = NodeState.from_annotation("node-a", value, 7.0)
    assert state.phase is Phase.HEALTHY
    assert state.reason is Reason.RESUMED and state.resumed
    assert state.fence is None and not state.tainted
    # and such a node is simply watched again: nothing is reset because of the garbage
    d = step(state, seen(0.5))
    assert d.transitions == () and not is_destructive(d)


@pytest.mark.parametrize(
    ("value", "boot_id", "fence"),
    [
        pytest.param('{"phase":"Fencing"}', None, None, id="reason missing: resumed"),
        pytest.param(
            '{"phase":"Fencing","bootID":42}', None, None, id="boot id not a string: dropped"
        ),
        pytest.param(
            '{"phase":"Fencing","fence":"armed"}', None, None, id="fence not an object: dropped"
        ),
    ],
)
def test_tolerable_oddities_keep_the_phase(value: str, boot_id: str | None, fence: object) -> None:
    state = NodeState.from_annotation("node-a", value, 7.0)
    assert state.phase is Phase.FENCING
    assert state.boot_id == boot_id and state.fence == fence


def test_a_resumed_fencing_node_without_a_known_fence_is_not_reset_on_time() -> None:
    state = NodeState.from_annotation("node-a", '{"phase":"Fencing","fence":"armed"}', T - 600.0)
    obs = seen(600.0, lease_age=600.0, ready="Unknown", fence=None, persisted="Fencing")
    d = step(step(state, obs, now=T - 599.0).state, obs)
    assert not starts_reset(d)
    assert d.state.held is Reason.HOLD_UNFENCED


def test_moving_clears_a_hold_and_stamps_the_time() -> None:
    held = NodeState("node-a", Phase.FENCING, held=Reason.HOLD_STORM)
    moved = held.moved(Phase.RECOVERING, Reason.NODE_BACK, 9.0)
    assert (moved.phase, moved.reason, moved.entered_at, moved.held) == (
        Phase.RECOVERING,
        Reason.NODE_BACK,
        9.0,
        None,
    )


def test_degraded_resumes_as_healthy_so_the_new_leader_evacuates_again() -> None:
    state = NodeState("node-a", Phase.DEGRADED, Reason.KUBELET_PATH_LOST)
    assert NodeState.from_annotation("node-a", state.to_annotation(), 1.0).phase is Phase.HEALTHY
