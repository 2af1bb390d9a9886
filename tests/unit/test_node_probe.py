"""What the agent reads from its Node: a declaration about an earlier boot is not about us."""

from __future__ import annotations

import json

import pytest

from watchdog.observe.node_probe import phase_for_boot


@pytest.mark.parametrize(
    ("annotation", "expected"),
    [
        pytest.param(None, "Healthy", id="no annotation: healthy"),
        pytest.param("{not json", "Unreadable", id="garbage: unreadable, not contact"),
        pytest.param("[" * 5000 + "]" * 5000, "Unreadable", id="too long: unreadable"),
        pytest.param("[" * 800 + "]" * 800, "Unreadable", id="too deep: unreadable"),
        pytest.param('{"phase": NaN}', "Unreadable", id="NaN: unreadable"),
        pytest.param('["Fencing"]', "Unreadable", id="not an object: unreadable"),
        pytest.param(
            json.dumps({"phase": "Fencing", "bootID": "b1"}),
            "Fencing",
            id="fencing this boot: fence",
        ),
        pytest.param(
            json.dumps({"phase": "Reset", "bootID": "b0"}),
            "Healthy",
            id="reset of an earlier boot: a rebooted node must not fence again",
        ),
        pytest.param(
            json.dumps({"phase": "Fencing"}),
            "Fencing",
            id="no boot id recorded: trust the declaration",
        ),
    ],
)
def test_phase_for_boot(annotation: str | None, expected: str) -> None:
    assert phase_for_boot(annotation, "b1") == expected
