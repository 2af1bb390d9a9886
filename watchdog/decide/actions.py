"""Actions as data: what the decision core asks `actuate` to do. Executed nowhere in decide."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from watchdog.decide.reasons import Reason


class EventType(StrEnum):
    NORMAL = "Normal"
    WARNING = "Warning"


@dataclass(frozen=True, slots=True)
class EmitEvent:
    node: str
    event: str  # NodeSuspect, NodeUnreachable, ... (DESIGN §7)
    reason: Reason
    message: str
    type: EventType = EventType.NORMAL


@dataclass(frozen=True, slots=True)
class PersistState:
    node: str
    annotation: str


@dataclass(frozen=True, slots=True)
class MarkPodsNotReady:
    node: str
    pods: tuple[tuple[str, str], ...]  # (namespace, name)


@dataclass(frozen=True, slots=True)
class RunFenceHook:
    node: str
    # When the machine sent it (its clock): a success counts only for the episode whose first
    # run was not later than this (see `NodeState.hook_since`).
    sent_at: float | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class TaintOutOfService:
    node: str


@dataclass(frozen=True, slots=True)
class ForceDeletePods:
    node: str
    pods: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class DeleteVolumeAttachments:
    node: str


@dataclass(frozen=True, slots=True)
class RemoveOutOfServiceTaint:
    node: str


@dataclass(frozen=True, slots=True)
class StartEvacuation:
    node: str


@dataclass(frozen=True, slots=True)
class StopEvacuation:
    node: str


Action = (
    EmitEvent
    | PersistState
    | MarkPodsNotReady
    | RunFenceHook
    | TaintOutOfService
    | ForceDeletePods
    | DeleteVolumeAttachments
    | RemoveOutOfServiceTaint
    | StartEvacuation
    | StopEvacuation
)
