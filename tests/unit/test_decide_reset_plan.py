"""What a reset means per VM, by runStrategy (KubeVirt semantics)."""

from __future__ import annotations

import pytest

from watchdog.decide.reset_plan import Outcome, VMPlan, outcome_for, plan_vms


@pytest.mark.parametrize(
    ("run_strategy", "running", "outcome"),
    [
        pytest.param("Always", None, Outcome.EXPECT_RESTART, id="Always is restarted elsewhere"),
        pytest.param(
            "RerunOnFailure", None, Outcome.EXPECT_RESTART, id="RerunOnFailure is restarted"
        ),
        pytest.param("Manual", None, Outcome.NOT_RESTARTED_BY_POLICY, id="Manual is not restarted"),
        pytest.param("Once", None, Outcome.NOT_RESTARTED_BY_POLICY, id="Once is not restarted"),
        pytest.param("Halted", None, Outcome.NOT_RESTARTED_BY_POLICY, id="Halted is not restarted"),
        pytest.param(None, True, Outcome.EXPECT_RESTART, id="legacy running true means Always"),
        pytest.param(
            None, False, Outcome.NOT_RESTARTED_BY_POLICY, id="legacy running false means Halted"
        ),
        pytest.param(
            "Halted", True, Outcome.NOT_RESTARTED_BY_POLICY, id="runStrategy wins over running"
        ),
        pytest.param(None, None, Outcome.UNKNOWN_STRATEGY, id="neither given: unknown"),
        pytest.param(
            "Sometimes", None, Outcome.UNKNOWN_STRATEGY, id="an unknown strategy is reported"
        ),
        pytest.param("always", None, Outcome.UNKNOWN_STRATEGY, id="strategies are case-sensitive"),
    ],
)
def test_outcome_per_run_strategy(
    run_strategy: str | None, running: bool | None, outcome: Outcome
) -> None:
    assert outcome_for(run_strategy, running) is outcome


def test_plan_vms_lists_every_vm_in_a_stable_order() -> None:
    plan = plan_vms([("b", "vm2", "Halted"), ("a", "vm9", "Always"), ("b", "vm1", None)])
    assert plan == (
        VMPlan("a", "vm9", Outcome.EXPECT_RESTART),
        VMPlan("b", "vm1", Outcome.UNKNOWN_STRATEGY),
        VMPlan("b", "vm2", Outcome.NOT_RESTARTED_BY_POLICY),
    )
