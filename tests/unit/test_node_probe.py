"""What the agent reads from its Node: a declaration about an earlier boot is not about us, and
one is acted on only when it names this boot and the kubelet reports this boot too."""

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
            "Unreadable",
            id="no boot id recorded: not acted on, not contact either",
        ),
        pytest.param(
            json.dumps({"phase": "Suspect"}),
            "Suspect",
            id="not a declaration: contact",
        ),
        pytest.param(
            json.dumps({"phase": "Quarantined", "bootID": "b1"}),
            "Unreadable",
            id="a phase we do not know (a newer controller's): not contact",
        ),
    ],
)
def test_phase_for_boot(annotation: str | None, expected: str) -> None:
    assert phase_for_boot(annotation, "b1", "b1") == expected


def test_a_declaration_the_kubelets_boot_contradicts_is_not_acted_on_nor_contact() -> None:
    fencing = json.dumps({"phase": "Fencing", "bootID": "b1"})
    assert phase_for_boot(fencing, "b1", "b1") == "Fencing"
    assert phase_for_boot(fencing, "b1", "b2") == "Unreadable"
    assert phase_for_boot(fencing, "b1", None) == "Unreadable"
    # About an earlier boot: our VMs are not the ones it was about, whatever the kubelet says.
    assert phase_for_boot(json.dumps({"phase": "Reset", "bootID": "b0"}), "b1", "b0") == "Healthy"
