"""Node phases, the per-node state the machine carries, and its persisted annotation form.

The phase is persisted on the Node (annotation `node-watchdog.io/state`) so that a new
leader resumes where the old one stopped. Monotonic timestamps are process-local and are not
persisted: a resuming leader restarts its timers from its own observations, which can only
delay a reset, never hasten it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from watchdog.decide import bounded_json
from watchdog.decide.observations import FenceDeclaration
from watchdog.decide.reasons import Reason

# Ours is about 300 bytes; anything much longer was not written by us.
MAX_ANNOTATION_BYTES = 4096
# What the agent reads from an annotation that is there but not ours to read (too long, too
# deep, not JSON): the API was reached, yet it cannot say whether the controller declared this
# node down, so the answer is not contact either.
UNREADABLE = "Unreadable"


class Phase(StrEnum):
    HEALTHY = "Healthy"
    SUSPECT = "Suspect"
    DEGRADED = "Degraded"
    UNREACHABLE = "Unreachable"
    FENCING = "Fencing"
    RESETTING = "Resetting"
    RESET = "Reset"
    RECOVERING = "Recovering"
    # Silent, but planned: in maintenance with no VM left on it (decide/maintenance.py). Not
    # down: no declaration, no fence, no reset, no failure alert.
    MAINTENANCE = "Maintenance"


# Phases in which a node counts as down: for the node's own agent (a declaration it acts on),
# and for storm control where resets are not each proven on their own (holds.py).
DOWN_PHASES = frozenset({Phase.UNREACHABLE, Phase.FENCING, Phase.RESETTING, Phase.RESET})
# Phases that count toward a storm where every reset has its own proof that the node stopped
# (holds.py, `storm_phases`): nodes going down *now*. A node whose reset is done (RESET) no
# longer counts there: counting it would hold the next, unrelated failure for as long as the
# first machine stays broken (two of four nodes failing a minute apart held the second one's
# VMs until the first was repaired).
STORM_PHASES = frozenset({Phase.UNREACHABLE, Phase.FENCING, Phase.RESETTING})


@dataclass(frozen=True, slots=True)
class NodeState:
    """What the machine remembers about one node between two decisions."""

    name: str
    phase: Phase = Phase.HEALTHY
    reason: Reason = Reason.HEARTBEAT_FRESH
    entered_at: float = 0.0
    last_contact_at: float | None = None
    unreachable_at: float | None = None
    fence_clock_from: float | None = None
    heartbeats_at_mark: int = 0
    boot_id: str | None = None
    fence: FenceDeclaration | None = None
    tainted: bool = False
    held: Reason | None = None
    resumed: bool = False
    # RECOVERING: when the removal of our out-of-service taint was last sent (our clock); it is
    # sent again while the Node still shows the taint. Not persisted: a new leader sends it.
    untaint_sent_at: float | None = None
    # Fence mode `external`, per episode: how often the hook was sent, when first and last
    # (our clock, not persisted: a new leader runs it again), and whether it confirmed the
    # fence (persisted: a new leader resumes with the proof instead of waiting for it again).
    hook_runs: int = 0
    hook_since: float | None = None
    hook_sent_at: float | None = None
    fence_confirmed: bool = False
    # Fence mode `power`: this node's BMC once reported it off while its agent heartbeated from
    # the same boot. From then on the BMC proves nothing for this node (only the agent's
    # self-fence does). Survives every phase and a leader change (persisted); an administrator
    # who fixed the BMC removes `powerDistrusted` from the annotation.
    power_contradicted: bool = False

    def moved(self, phase: Phase, reason: Reason, now: float, **changes: Any) -> NodeState:
        changes.setdefault("untaint_sent_at", None)
        if phase is not Phase.FENCING:
            # The hook belongs to one FENCING episode: nothing of it outlives the episode (a
            # new one, UNREACHABLE again, needs its own fence).
            changes.setdefault("hook_runs", 0)
            changes.setdefault("hook_since", None)
            changes.setdefault("hook_sent_at", None)
            changes.setdefault("fence_confirmed", False)
        return replace(self, phase=phase, reason=reason, entered_at=now, held=None, **changes)

    def to_annotation(self) -> str:
        """Compact JSON for the Node annotation (what a new leader needs to resume)."""
        doc: dict[str, Any] = {"phase": self.phase.value, "reason": self.reason.value}
        if self.boot_id is not None:
            doc["bootID"] = self.boot_id
        if self.fence is not None:
            doc["fence"] = self.fence.to_json()
        if self.tainted:
            doc["tainted"] = True
        if self.fence_confirmed:
            doc["fenceConfirmed"] = True
        if self.power_contradicted:
            doc["powerDistrusted"] = True
        return json.dumps(doc, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_annotation(cls, name: str, value: str | None, now: float) -> NodeState:
        """Resume from an annotation; anything unreadable resumes as HEALTHY (and is said so).

        Timers restart at `now`: a resumed UNREACHABLE/FENCING node waits its whole period and
        safe delay again, counted from this leader's own observations.
        """
        if not value:
            return cls(name=name, entered_at=now)
        try:
            doc = bounded_json.loads(value, max_bytes=MAX_ANNOTATION_BYTES, what="state annotation")
            phase = Phase(doc["phase"])
            reason = Reason(doc.get("reason", Reason.RESUMED.value))
            fence_doc = doc.get("fence")
            fence = FenceDeclaration.from_json(fence_doc) if isinstance(fence_doc, dict) else None
            boot_id = doc.get("bootID")
            tainted = bool(doc.get("tainted", False))
            confirmed = doc.get("fenceConfirmed") is True
            distrusted = doc.get("powerDistrusted") is True
        except (ValueError, KeyError, TypeError, OverflowError):
            return cls(name=name, entered_at=now, reason=Reason.RESUMED, resumed=True)
        if phase is Phase.DEGRADED:
            # DEGRADED carries no obligation: resume as HEALTHY so the machine enters it
            # again and this leader starts its own evacuation.
            phase = Phase.HEALTHY
        return cls(
            name=name,
            phase=phase,
            reason=reason,
            entered_at=now,
            unreachable_at=now if phase in DOWN_PHASES else None,
            boot_id=boot_id if isinstance(boot_id, str) else None,
            fence=fence,
            tainted=tainted,
            fence_confirmed=confirmed and phase in {Phase.UNREACHABLE, Phase.FENCING},
            power_contradicted=distrusted,
            resumed=True,
        )
