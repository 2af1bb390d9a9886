"""Following reset VMs until they run elsewhere: the failover timeline per VM (DESIGN §5, §7).

Pure bookkeeping. The runtime reports when launcher pods were force-deleted and every VMI
change it sees; this module says when a VM counts as rescheduled and with which latencies.
"""

from __future__ import annotations

from dataclasses import dataclass

from watchdog.decide.reset_plan import Outcome


@dataclass(frozen=True, slots=True)
class Followed:
    namespace: str
    vm: str
    old_node: str
    outcome: Outcome
    last_contact_at: float | None
    unreachable_at: float | None
    deleted_at: float


@dataclass(frozen=True, slots=True)
class Rescheduled:
    namespace: str
    vm: str
    old_node: str
    new_node: str
    reschedule_s: float  # launcher pod deleted → VMI Running on another node
    failover_s: float | None  # last contact with the old node → VMI Running elsewhere


class FollowBook:
    """VMs whose launcher pods were reset, awaiting a Running VMI on another node."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, str], Followed] = {}

    def __len__(self) -> int:
        return len(self._open)

    def pending(self) -> list[Followed]:
        return list(self._open.values())

    def start(self, followed: Followed) -> None:
        key = (followed.namespace, followed.vm)
        # A second delete of the same pod (retry, new leader) must not restart the clock.
        self._open.setdefault(key, followed)

    def vmi_changed(
        self, namespace: str, vm: str, node: str | None, phase: str | None, now: float
    ) -> Rescheduled | None:
        key = (namespace, vm)
        f = self._open.get(key)
        if f is None or phase != "Running" or not node or node == f.old_node:
            return None
        del self._open[key]
        failover = None if f.last_contact_at is None else now - f.last_contact_at
        return Rescheduled(namespace, vm, f.old_node, node, now - f.deleted_at, failover)

    def drop_node(self, node: str) -> list[Followed]:
        """Forget VMs of a node (e.g. it came back and they restarted there)."""
        gone = [f for f in self._open.values() if f.old_node == node]
        for f in gone:
            del self._open[(f.namespace, f.vm)]
        return gone
