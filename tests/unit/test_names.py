"""Our names under our own domain, and the legacy ones still read across an upgrade."""

from __future__ import annotations

from watchdog.decide.names import (
    DOMAIN,
    EVACUATION_LABEL,
    EVACUATION_NODE_ANNOTATION,
    EVACUATION_PRIORITY,
    LEGACY_EVACUATION_PRIORITY,
    LEGACY_STATE_ANNOTATION,
    STATE_ANNOTATION,
    read_name,
    read_state_annotation,
)


def test_everything_we_write_is_under_our_own_domain_not_kubevirts() -> None:
    for name in (STATE_ANNOTATION, EVACUATION_LABEL, EVACUATION_NODE_ANNOTATION):
        assert name.split("/")[0] == DOMAIN == "node-watchdog.io", name
    assert EVACUATION_PRIORITY.startswith(f"{DOMAIN}/")


def test_the_state_is_read_under_our_name_first_then_the_legacy_one() -> None:
    assert read_state_annotation(None) is None
    assert read_state_annotation({"other": "x"}) is None
    assert read_state_annotation({LEGACY_STATE_ANNOTATION: "old"}) == "old"
    assert read_state_annotation({STATE_ANNOTATION: "ours"}) == "ours"
    # We write both at once: they differ only after a release that writes only the legacy
    # name (a rollback) wrote it. A stale state of ours must not win over that newer one.
    rolled_back = {STATE_ANNOTATION: '{"phase":"Fencing"}', LEGACY_STATE_ANNOTATION: "{}"}
    assert read_state_annotation(rolled_back) == "{}"


def test_an_operators_priority_under_our_name_wins_over_the_legacy_one() -> None:
    both = {LEGACY_EVACUATION_PRIORITY: "1", EVACUATION_PRIORITY: "9"}
    assert read_name(both, EVACUATION_PRIORITY, LEGACY_EVACUATION_PRIORITY) == "9"
    assert read_name({LEGACY_EVACUATION_PRIORITY: "1"}, EVACUATION_PRIORITY, "x") is None
