"""What a reset means for each VM, by its runStrategy (DESIGN §5, KubeVirt semantics)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Outcome(StrEnum):
    EXPECT_RESTART = "ExpectRestart"  # KubeVirt starts a new VMI: follow it to Running
    NOT_RESTARTED_BY_POLICY = "NotRestartedByPolicy"  # Manual/Once/Halted: report, don't wait
    UNKNOWN_STRATEGY = "UnknownRunStrategy"


_RESTARTING = frozenset({"Always", "RerunOnFailure"})
_NOT_RESTARTING = frozenset({"Manual", "Once", "Halted"})


@dataclass(frozen=True, slots=True)
class VMPlan:
    namespace: str
    name: str
    outcome: Outcome


def outcome_for(run_strategy: str | None, running: bool | None = None) -> Outcome:
    """KubeVirt's rule: `spec.running: true` is the legacy spelling of runStrategy Always."""
    strategy = run_strategy or ("Always" if running else "Halted" if running is False else None)
    if strategy in _RESTARTING:
        return Outcome.EXPECT_RESTART
    if strategy in _NOT_RESTARTING:
        return Outcome.NOT_RESTARTED_BY_POLICY
    return Outcome.UNKNOWN_STRATEGY


def plan_vms(vms: list[tuple[str, str, str | None]]) -> tuple[VMPlan, ...]:
    """Plan per (namespace, name, runStrategy) of the VMs whose launcher pods are reset."""
    return tuple(VMPlan(ns, name, outcome_for(rs)) for ns, name, rs in sorted(vms))
