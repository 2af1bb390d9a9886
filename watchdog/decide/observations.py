"""Typed observations handed to the decision core by the observers (values, no clients).

Times are seconds on the controller's monotonic clock, stamped when the controller saw the
change, never another machine's wall clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class FenceDeclaration:
    """What a node's agent says about its own fencing, in every heartbeat (DESIGN §5)."""

    armed: bool
    after_s: float
    bound_s: float
    # A watchdog device backs the fence: it resets the node `watchdog_s` after the agent's
    # last pet even when the agent froze, died or its fence command failed. Without one the
    # fence is *weak*: it holds only while the agent itself works.
    device: bool = False
    watchdog_s: float = 0.0
    # Opt-in (self_fence_lease_s): while its own kubelet renews its Lease, the agent does not
    # fence before `lease_s` after the latest renewal it read (a quorum read): a node cut off
    # from broker and peers but still reaching the API is alive, and its kubelet's next
    # renewal (every 10 s) proves it to the controller. The controller resets on this fence
    # only `lease_s` plus the fence's stop time after the latest renewal it saw (safety.py,
    # lease_gate). 0: the agent never waits for its Lease (no gate).
    lease_s: float = 0.0

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {
            "armed": self.armed,
            "after_s": self.after_s,
            "bound_s": self.bound_s,
        }
        if self.device:
            doc["device"] = True
            doc["watchdog_s"] = self.watchdog_s
        if self.lease_s:
            doc["lease_s"] = self.lease_s
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, object]) -> FenceDeclaration:
        """Inverse of to_json (trusted input: our own annotation); KeyError/TypeError/ValueError
        on anything else. An older agent's declaration has no device fields: weak."""
        armed, device = doc["armed"], doc.get("device", False)
        if not isinstance(armed, bool) or not isinstance(device, bool):
            raise TypeError("armed and device must be booleans")
        return cls(
            armed=armed,
            after_s=_number(doc["after_s"]),
            bound_s=_number(doc["bound_s"]),
            device=device,
            watchdog_s=_number(doc.get("watchdog_s", 0.0)),
            lease_s=_number(doc.get("lease_s", 0.0)),
        )


def _number(value: object) -> float:
    """A duration in seconds: finite and not negative (a negative one would shorten the safe
    delay)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError("not a number")
    try:
        seconds = float(value)
    except OverflowError:
        raise ValueError("duration out of range") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"not a duration: {seconds}")
    return seconds


@dataclass(frozen=True, slots=True)
class SourceHealth:
    """When the controller's own connections came up; None while a connection is down."""

    broker_up_since: float | None
    api_up_since: float | None
    # The broker connection is up but our own ingest runs behind it (decide/ingest_lag.py):
    # broker_up_since is None then too (heartbeats UNKNOWN); this only names the cause.
    broker_lagging: bool = False
    # When the latest API probe that got an answer was sent (our clock); None: not tracked.
    # A Lease is judged stale only once the API answered a request sent after its deadline
    # (signals.py, lease_signal).
    api_answered_at: float | None = None


@dataclass(frozen=True, slots=True)
class LauncherPod:
    """A virt-launcher pod bound to a node, as the API shows it."""

    namespace: str
    name: str
    vmi: str
    ready: bool
    terminating: bool = False


@dataclass(frozen=True, slots=True)
class NodeObservation:
    """Everything observed about one node, assembled per decision by the runtime."""

    name: str
    # What the heartbeat signal ages from: the agent's own contact as its heartbeats report it
    # (decide/heartbeats.py, `NodeHeartbeats.contact_at`), so an agent that is cut off but
    # still heard counts as silent.
    last_heartbeat_at: float | None = None
    # When its latest heartbeat was received, whatever contact it reported: evidence that the
    # node runs (a BMC that said "off" is contradicted by it). None: as last_heartbeat_at.
    heard_at: float | None = None
    heartbeats_received: int = 0
    boot_id: str | None = None
    fence: FenceDeclaration | None = None
    agent_offline: bool = False
    lease_seen: bool = False
    lease_renewed_at: float | None = None
    ready: str | None = None
    peers_unreachable: bool | None = None
    out_of_service_tainted: bool = False
    launcher_pods: tuple[LauncherPod, ...] = field(default_factory=tuple)
    external_fence_confirmed: bool = False
    # The phase this node's annotation shows, as last seen through the API watch: the fence
    # clock starts only once the agent could read that it is being fenced.
    persisted_phase: str | None = None
    # When this controller first saw the Node object. Heartbeats of a node it did not know yet
    # were rejected (unknown node), so silence before then is not evidence either.
    known_since: float | None = None
    # Planned maintenance (decide/maintenance.py): the Node's cordon, Harvester's maintenance
    # status annotation, and how many VMIs the API shows on the node.
    cordoned: bool = False
    maintain_status: str | None = None
    vmis_here: int = 0
