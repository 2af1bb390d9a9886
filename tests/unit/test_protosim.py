"""The protocol simulation (chaos/protosim): the shipped service breaks no invariant over random
fault schedules, and the simulation is able to: with either of two fencing fixes taken out
(`Variant`), it finds the split-brain that fix closed. A seed replays exactly.

A small run (CI); the full one is `watchdog-chaos protosim --schedules 100000`, recorded in
docs/RELIABILITY.md.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from chaos.cli import main
from chaos.protosim.schedule import KINDS, campaign, replay
from chaos.protosim.world import Variant


@pytest.fixture(autouse=True)
def quiet_controller() -> Iterator[None]:
    """The real controller logs every decision; thousands per schedule."""
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def test_the_shipped_service_breaks_no_invariant_over_random_schedules() -> None:
    c = campaign(1, 150)
    assert [o.violation for o in c.violations] == []
    # Not vacuous: VMs were reset (nodes died and were fenced), and every fault kind was drawn.
    assert c.resets > 50
    assert set(c.faults) == set(KINDS)


def test_without_restart_continuity_a_restarted_agent_is_unheard_and_its_vms_run_twice() -> None:
    """The agent's seq restarts with its process; the controller refuses its
    heartbeats as replays; once the node also loses the API, its VMs are reset while its agent
    (with broker contact) never fences."""
    kinds = ["agent-restart", "api-link-cut"]
    broken = campaign(1, 12, kinds, Variant(restart_continuity=False))
    assert broken.violations, "the simulation must be able to show this hole"
    assert all("reset while it still runs" in (o.violation or "") for o in broken.violations)
    assert campaign(1, 12, kinds).violations == []


def test_without_a_watchdog_device_a_frozen_agent_leaves_a_promise_nobody_keeps() -> None:
    """A frozen agent with its kubelet stopped: the controller resets after
    the safe delay while the VMs still run, unless a device stops the node."""
    kinds = ["agent-freeze", "kubelet-stop"]
    broken = campaign(1, 10, kinds, Variant(watchdog_device=False))
    assert broken.violations, "the simulation must be able to show this hole"
    assert campaign(1, 10, kinds).violations == []


def test_a_seed_replays_exactly_with_its_trace() -> None:
    kinds = ["agent-restart", "api-link-cut"]
    first = replay(3, kinds, Variant(restart_continuity=False))
    again = replay(3, kinds, Variant(restart_continuity=False))
    assert first.trace == again.trace and first.violation == again.violation
    assert first.violation is not None and any("VIOLATION" in line for line in first.trace)
    # ... and it is the schedule and the failure the campaign reported for that seed.
    found = campaign(3, 1, kinds, Variant(restart_continuity=False)).violations
    assert [o.violation for o in found] == [first.violation]


def test_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["protosim", "--schedules", "20", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    assert "20 schedules (seeds 5..24)" in out and "0 violation(s)" in out
    assert main(["protosim", "--faults", "power-off,meteor"]) == 2
    assert "unknown fault kind(s) ['meteor']" in capsys.readouterr().err
    assert main(["protosim", "--replay", "7"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("seed 7:") and "every fault healed" in out
