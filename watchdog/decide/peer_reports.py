"""Peer reports: what agents say about the nodes they probe, and when that corroborates (DESIGN §4).

An agent publishes its verdicts, retained, QoS 1, on `<prefix>/peers/<node>` when one changes
(and as a periodic refresh): `{"node", "boot_id", "seq", "sent_at", "results": {target: view}}`.
The controller trusts a report no more than a heartbeat (DESIGN §9): its topic must name its
node, size and schema must be right, the node must be known, and (boot_id, seq) must move
forward. `PeerBook` keeps the latest accepted report of every observer, indexed by target, and
`peers_unreachable` turns them into `NodeObservation.peers_unreachable`.

Peers only ever ADD corroboration to a silent heartbeat; they never veto and never act alone:
a node is UNREACHABLE only once its heartbeat is stale as well, a Lease renewed after the
silence still vetoes, and the reset still waits the declared fence's safe delay.
"""

from __future__ import annotations

import json
import math
from collections.abc import Container, Iterable
from dataclasses import dataclass, field

from watchdog.decide.heartbeats import (
    HeartbeatRejected,
    RejectReason,
    RetiredBoots,
    json_message,
)
from watchdog.decide.peer_probe import PeerView
from watchdog.decide.peer_ring import MAX_TARGETS, valid_node_name

MAX_REPORT_BYTES = 8192
_FIELDS = {"node", "boot_id", "seq", "sent_at", "results"}


def peers_topic(prefix: str, node: str) -> str:
    return f"{prefix}/peers/{node}"


@dataclass(frozen=True, slots=True)
class PeerReport:
    node: str
    boot_id: str
    seq: int
    sent_at: float  # the observer's wall clock: informational only
    results: dict[str, PeerView]


def encode_report(report: PeerReport) -> bytes:
    doc = {
        "node": report.node,
        "boot_id": report.boot_id,
        "seq": report.seq,
        "sent_at": report.sent_at,
        "results": {t: v.value for t, v in sorted(report.results.items())},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def _reject(reason: RejectReason, detail: str) -> HeartbeatRejected:
    return HeartbeatRejected(reason, detail)


def parse_report(topic: str, payload: bytes, prefix: str) -> PeerReport:
    """Validate one peer report; raise HeartbeatRejected naming why it is refused."""
    topic_node, doc = json_message(topic, payload, f"{prefix}/peers/", MAX_REPORT_BYTES)
    if set(doc) != _FIELDS:
        raise _reject(RejectReason.SCHEMA, f"fields {sorted(map(str, doc))[:8]}")
    node = doc["node"]
    if not isinstance(node, str) or node != topic_node:
        raise _reject(RejectReason.TOPIC_MISMATCH, f"node {str(node)[:64]!r} on {topic!r}")
    boot_id = doc["boot_id"]
    if not isinstance(boot_id, str) or not 0 < len(boot_id) <= 64:
        raise _reject(RejectReason.SCHEMA, "boot_id")
    seq = doc["seq"]
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise _reject(RejectReason.SCHEMA, "seq")
    sent_at = doc["sent_at"]
    if isinstance(sent_at, bool) or not isinstance(sent_at, int | float):
        raise _reject(RejectReason.SCHEMA, "sent_at")
    try:
        if not math.isfinite(float(sent_at)):
            raise _reject(RejectReason.SCHEMA, "sent_at not finite")
    except OverflowError as e:
        raise _reject(RejectReason.SCHEMA, "sent_at out of range") from e
    results = doc["results"]
    if not isinstance(results, dict) or len(results) > MAX_TARGETS:
        raise _reject(RejectReason.SCHEMA, f"results must be an object of <= {MAX_TARGETS}")
    views: dict[str, PeerView] = {}
    for target, view in results.items():
        if target == node or not valid_node_name(target):
            raise _reject(RejectReason.SCHEMA, f"target {target[:64]!r}")
        try:
            views[target] = PeerView(view)
        except ValueError as e:
            raise _reject(RejectReason.SCHEMA, f"view of {target[:64]!r}") from e
    return PeerReport(node, boot_id, seq, float(sent_at), views)


# --- what the controller believes -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerEvidence:
    """One observer's latest view of one target, with when the controller received it."""

    observer: str
    view: PeerView
    received_at: float  # controller's monotonic clock
    observer_heard_at: float | None  # the observer's own last accepted heartbeat


@dataclass(slots=True)
class _Observer:
    boot_id: str | None = None
    seq: int = -1
    results: dict[str, PeerView] = field(default_factory=dict)


class PeerBook:
    """Latest accepted report per observer, indexed by target for O(observers) lookups.

    Bounded by the cluster, not by what observers send: only known nodes report, only views
    of known targets are kept (`ignored_targets` counts the others), a target's index entry
    goes when its last view does, and each node keeps its last `MAX_RETIRED_BOOTS` boot ids.
    """

    def __init__(self) -> None:
        self._observers: dict[str, _Observer] = {}
        self._retired: dict[str, RetiredBoots] = {}
        # target → observer → (view, received at)
        self._about: dict[str, dict[str, tuple[PeerView, float]]] = {}
        self.ignored_targets = 0

    def accept(self, report: PeerReport, now: float, known: Container[str]) -> set[str] | None:
        """Record `report`; returns the targets whose evidence changed (to re-evaluate them),
        or None for the very report already recorded (the broker re-delivers a retained report
        on every resubscription: old news, neither accepted again nor refused)."""
        if report.node not in known:
            raise _reject(RejectReason.UNKNOWN_NODE, report.node[:64])
        rec = self._observers.get(report.node)
        if rec is None:
            rec = self._observers[report.node] = _Observer()
        if report.boot_id == rec.boot_id:
            if report.seq == rec.seq and report.results == rec.results:
                return None
            if report.seq <= rec.seq:
                raise _reject(RejectReason.REPLAYED, f"seq {report.seq} <= {rec.seq}")
        elif report.boot_id in self._retired.get(report.node, ()):
            raise _reject(RejectReason.REPLAYED, "boot_id of an earlier boot")
        elif rec.boot_id is not None:
            self._retired.setdefault(report.node, RetiredBoots()).add(rec.boot_id)
        rec.boot_id, rec.seq = report.boot_id, report.seq
        results = {t: v for t, v in report.results.items() if t in known}
        self.ignored_targets += len(report.results) - len(results)
        dropped = set(rec.results) - set(results)
        for target in dropped:
            self._drop(target, report.node)
        for target, view in results.items():
            self._about.setdefault(target, {})[report.node] = (view, now)
        rec.results = results
        return dropped | set(results)

    def _drop(self, target: str, observer: str) -> None:
        views = self._about.get(target)
        if views is not None:
            views.pop(observer, None)
            if not views:
                del self._about[target]

    def forget(self, node: str) -> set[str]:
        """A deleted node: its reports no longer count, nor do reports about it."""
        rec = self._observers.pop(node, None)
        self._retired.pop(node, None)
        self._about.pop(node, None)
        if rec is None:
            return set()
        for target in rec.results:
            self._drop(target, node)
        return set(rec.results)

    def sizes(self) -> dict[str, int]:
        """Entries held, per index (for the memory bound's tests and metrics)."""
        return {
            "observers": len(self._observers),
            "targets": len(self._about),
            "retired_boots": sum(len(r) for r in self._retired.values()),
        }

    def about(self, target: str) -> dict[str, tuple[PeerView, float]]:
        return self._about.get(target, {})


def peers_unreachable(
    target_last_heartbeat: float | None,
    evidence: Iterable[PeerEvidence],
    now: float,
    fresh_s: float,
    quorum: int,
) -> bool | None:
    """Whether the target's peers corroborate its silence (True), contradict it (False), or
    say nothing (None).

    Only evidence that post-dates the target's last heartbeat counts (an older report says how
    things were while it still talked to us), and only from observers whose own heartbeats are
    fresh (a silent observer may be on the wrong side of the same partition). One such
    observer that reaches the target outweighs any number that do not: True needs `quorum`
    observers reporting it unreachable and none reporting it reachable.
    """
    unreachable = 0
    for e in evidence:
        heard = e.observer_heard_at
        if heard is None or now - heard >= fresh_s:
            continue
        if target_last_heartbeat is not None and e.received_at <= target_last_heartbeat:
            continue
        if e.view is PeerView.REACHABLE:
            return False
        if e.view is PeerView.UNREACHABLE:
            unreachable += 1
    return True if unreachable >= max(1, quorum) else None
