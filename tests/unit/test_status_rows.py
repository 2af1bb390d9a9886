"""What `node-watchdog status` makes of a Node: the recorded phase, or that nothing (or nothing
readable) is recorded; never a reason nobody wrote."""

from __future__ import annotations

import json

from watchdog.decide.names import STATE_ANNOTATION
from watchdog.runtime.status import Status, apply_metrics, node_row, render_table

TAINT = "node.kubernetes.io/out-of-service"


def node(name: str, annotation: str | None = None, **extra: object) -> dict[str, object]:
    meta: dict[str, object] = {"name": name}
    if annotation is not None:
        meta["annotations"] = {STATE_ANNOTATION: annotation}
    return {"metadata": meta, **extra}


def test_a_recorded_phase_is_shown_with_its_reason_and_fence() -> None:
    doc = {"phase": "Resetting", "reason": "ResetStarted", "tainted": True,
           "fence": {"armed": True, "after_s": 8.0, "bound_s": 5.0}}  # fmt: skip
    row = node_row(
        node("n1", json.dumps(doc), spec={"taints": [{"key": TAINT, "effect": "NoExecute"}]}),
        TAINT,
    )
    assert (row.phase, row.reason, row.fence, row.tainted) == (
        "Resetting",
        "ResetStarted",
        "armed (weak)",
        True,
    )


def test_no_annotation_and_an_unreadable_one_say_so() -> None:
    assert node_row(node("n1"), TAINT).reason == "-"
    bad = node_row(node("n2", '{"phase": "Exploded"}'), TAINT)
    assert (bad.phase, bad.reason) == ("Healthy", "unreadable annotation")


def test_metrics_of_nodes_not_in_the_cluster_are_ignored() -> None:
    status = Status("leader", 1.0, [node_row(node("n1"), TAINT)])
    text = (
        'watchdog_heartbeat_age_seconds{node="n1"} 2.0\n'
        'watchdog_heartbeat_age_seconds{node="ghost"} 9.0\n'
        'watchdog_nodes_held{reason="StormHold"} 0.0\n'
    )
    apply_metrics(status, text, 0.0)
    assert status.nodes[0].heartbeat_age_s == 2.0 and status.holds == {}
    assert "ghost" not in render_table(status)
