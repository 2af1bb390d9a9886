"""Actions as data: what the decision core asks `actuate` to do. Executed nowhere in decide."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from watchdog.decide.reasons import Reason


def _always() -> bool:
    return True


@dataclass(slots=True)
class Basis:
    """What one decision's writes stand on, carried from write to write (DESIGN §5).

    `node_version` is the Node's resourceVersion in the view the decision was made from. Every
    Node write of the decision carries it as precondition and moves it to the version it
    wrote; a pod or volume write first reads the Node (a quorum read) and goes ahead only if
    etcd still holds that version. When etcd's Node moved on but still shows `expect` (our
    annotation and taint as the decision saw them: the kubelet or a node controller wrote
    something else), the write goes ahead on the newer version. So a decision whose Node
    changed since it was made — a newer leader withdrew or declared, an administrator wrote
    our annotation or taint — writes nothing more. `may_act` is checked before every request
    and every retry of one: a leader whose Lease ran out sends nothing after it, even in the
    middle of a retried action, and a request still out at its deadline is abandoned then
    (`acting_left_s`). A write refused for either reason ends the decision (result
    `stale`); the next one is made on the newer Node."""

    node_version: str | None
    may_act: Callable[[], bool] = _always
    # Seconds this replica may still act (its leader Lease's renew deadline; None: no bound).
    # Each request waits at most that long for its answer: a leader deposed while a request is
    # out stops waiting at its deadline and sends nothing more, instead of acting on an answer
    # up to a request timeout later.
    acting_left_s: Callable[[], float | None] = lambda: None
    # What the Node shows of ours at `node_version`: the state annotation and whether our
    # out-of-service taint is on (None: unknown). A Node changed only elsewhere (the kubelet's
    # status, labels) still carries the plan; see actuate/node_writes.py.
    expect: tuple[str | None, bool] | None = None
    # The versions etcd held during the plan that differ from the view it was made on by the
    # plan's own writes alone (those writes, and newer versions `expect` still carried on).
    written: list[str] = field(default_factory=list)


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
