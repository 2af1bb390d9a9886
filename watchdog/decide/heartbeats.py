"""The heartbeat wire format and what the controller believes of it (DESIGN §4, §9).

Pure: the agent encodes with `encode_heartbeat`, the controller parses with
`parse_heartbeat` and keeps per-node trust in a `HeartbeatBook`. A heartbeat is never trusted
because it arrived: its topic must name its node, its size and schema must be right, the node
must be known, and (boot_id, seq) must move forward.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from watchdog.decide.observations import FenceDeclaration
from watchdog.decide.peer_address import valid_peer_address

MAX_HEARTBEAT_BYTES = 1024
WIRE_VERSION = 1


class RejectReason(StrEnum):
    OVERSIZED = "oversized"
    MALFORMED = "malformed"
    SCHEMA = "schema"
    TOPIC_MISMATCH = "topic_mismatch"
    UNKNOWN_NODE = "unknown_node"
    REPLAYED = "replayed"


class HeartbeatRejected(ValueError):
    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Heartbeat:
    node: str
    boot_id: str
    seq: int
    sent_at: float  # sender's wall clock: informational only, never compared with ours
    version: str
    fence: FenceDeclaration
    # Where this agent's peer-probe endpoint is reached ("host:port"); optional, additive to
    # wire version 1: agents without peer probes omit it and stay valid.
    peer: str | None = None
    # Seconds since the agent's latest proven contact with broker or API (the age its `cut`
    # answer is judged on, decide/quorum.py), when it sent this; None: no contact in this boot,
    # or an agent that does not say (additive to wire version 1). See `NodeHeartbeats.contact_at`.
    contact_age_s: float | None = None


def heartbeat_topic(prefix: str, node: str) -> str:
    return f"{prefix}/heartbeat/{node}"


def status_topic(prefix: str, node: str) -> str:
    return f"{prefix}/status/{node}"


def encode_heartbeat(hb: Heartbeat) -> bytes:
    doc: dict[str, object] = {
        "node": hb.node,
        "boot_id": hb.boot_id,
        "seq": hb.seq,
        "sent_at": hb.sent_at,
        "version": hb.version,
        "fence": hb.fence.to_json(),
    }
    if hb.peer is not None:
        doc["peer"] = hb.peer
    if hb.contact_age_s is not None:
        doc["contact_age_s"] = hb.contact_age_s
    return json.dumps(doc, separators=(",", ":")).encode()


def _require(doc: dict[str, Any], key: str, kinds: type | tuple[type, ...]) -> Any:
    value = doc.get(key)
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise HeartbeatRejected(RejectReason.SCHEMA, f"{key} has wrong type bool")
    if not isinstance(value, kinds):
        raise HeartbeatRejected(RejectReason.SCHEMA, f"{key} missing or wrong type")
    return value


def _float(doc: dict[str, Any], key: str) -> float:
    try:
        return float(_require(doc, key, (int, float)))
    except OverflowError as e:  # a JSON integer beyond float range
        raise HeartbeatRejected(RejectReason.SCHEMA, f"{key} out of range") from e


def _seconds(doc: dict[str, Any], key: str) -> float:
    value = _float(doc, key)
    if not math.isfinite(value) or value < 0 or value > 86_400:
        raise HeartbeatRejected(RejectReason.SCHEMA, f"{key} out of range: {value}")
    return value


def json_message(
    topic: str, payload: bytes, head: str, max_bytes: int
) -> tuple[str, dict[str, Any]]:
    """The checks every JSON message on our topics passes first (heartbeats, peer reports,
    probe lists): its size, a topic of exactly `head<node>`, a JSON object. Returns the node
    the topic names and the object; raises HeartbeatRejected naming why it is refused."""
    if len(payload) > max_bytes:
        raise HeartbeatRejected(RejectReason.OVERSIZED, f"{len(payload)} bytes")
    if not topic.startswith(head) or "/" in topic[len(head) :] or topic == head:
        raise HeartbeatRejected(RejectReason.TOPIC_MISMATCH, f"unexpected topic {topic[:120]!r}")
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError) as e:  # also an integer of more than 4300 digits
        raise HeartbeatRejected(RejectReason.MALFORMED, str(e)[:120]) from e
    if not isinstance(doc, dict):
        raise HeartbeatRejected(RejectReason.MALFORMED, "not a JSON object")
    return topic[len(head) :], doc


def parse_heartbeat(topic: str, payload: bytes, prefix: str) -> Heartbeat:
    """Validate one heartbeat message; raise HeartbeatRejected naming why it is refused."""
    topic_node, doc = json_message(topic, payload, f"{prefix}/heartbeat/", MAX_HEARTBEAT_BYTES)
    node = _require(doc, "node", str)
    if node != topic_node:
        raise HeartbeatRejected(RejectReason.TOPIC_MISMATCH, f"node {node[:64]!r} on {topic!r}")
    boot_id = _require(doc, "boot_id", str)
    if not 0 < len(boot_id) <= 64:
        raise HeartbeatRejected(RejectReason.SCHEMA, "boot_id length")
    seq = _require(doc, "seq", int)
    if seq < 0:
        raise HeartbeatRejected(RejectReason.SCHEMA, "seq negative")
    sent_at = _float(doc, "sent_at")
    if not math.isfinite(sent_at):
        raise HeartbeatRejected(RejectReason.SCHEMA, "sent_at not finite")
    version = _require(doc, "version", str)[:32]
    fence_doc = _require(doc, "fence", dict)
    device = fence_doc.get("device", False)
    if not isinstance(device, bool):
        raise HeartbeatRejected(RejectReason.SCHEMA, "fence.device is not a boolean")
    fence = FenceDeclaration(
        armed=_require(fence_doc, "armed", bool),
        after_s=_seconds(fence_doc, "after_s"),
        bound_s=_seconds(fence_doc, "bound_s"),
        device=device,
        watchdog_s=_seconds(fence_doc, "watchdog_s") if device else 0.0,
        lease_s=_seconds(fence_doc, "lease_s") if "lease_s" in fence_doc else 0.0,
    )
    peer = doc.get("peer")
    if peer is not None and not valid_peer_address(peer):
        raise HeartbeatRejected(RejectReason.SCHEMA, "peer is not a valid host:port")
    contact_age = _seconds(doc, "contact_age_s") if "contact_age_s" in doc else None
    return Heartbeat(node, boot_id, seq, sent_at, version, fence, peer, contact_age)


# Boot ids of a node's earlier boots that are refused as replays. A node reboots a few times a
# month; keeping the last 64 refuses any replay from the last years, and a node that invents
# boot ids (the only way to exceed it) can only push out its own.
MAX_RETIRED_BOOTS = 64


class RetiredBoots:
    """The last MAX_RETIRED_BOOTS boot ids of one node, oldest evicted first."""

    __slots__ = ("_ids",)

    def __init__(self) -> None:
        self._ids: dict[str, None] = {}

    def add(self, boot_id: str) -> None:
        self._ids.pop(boot_id, None)
        self._ids[boot_id] = None
        while len(self._ids) > MAX_RETIRED_BOOTS:
            del self._ids[next(iter(self._ids))]

    def __contains__(self, boot_id: object) -> bool:
        return boot_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)


@dataclass(slots=True)
class NodeHeartbeats:
    """The controller's trust record of one node's agent."""

    boot_id: str | None = None
    seq: int = -1
    last_at: float | None = None  # controller's monotonic time of the last accepted heartbeat
    received: int = 0
    fence: FenceDeclaration | None = None
    offline: bool = False  # the broker delivered the Will (or a clean "offline")
    peer: str | None = None  # the probe address its latest heartbeat announced
    # What the heartbeat signal ages from (controller's monotonic time): `last_at`, moved back
    # by how much older than one heartbeat interval the agent's own latest contact was when it
    # sent its heartbeat (`contact_age_s`), never backwards within a boot. A heartbeat proves
    # the node runs, not that its agent can be heard back: an agent whose echoes or
    # acknowledgements stopped (a one-way broker path) and that lost the API answers its peers
    # `cut` from `cut_after_s` after its contact, and the controller must count it silent by
    # then (decide/quorum.py), as it would had its heartbeats stopped. A healthy agent reports
    # about one interval (its contact is stamped with the send time of the previous heartbeat
    # that came back), so for it this is `last_at`.
    contact_at: float | None = None


class HeartbeatBook:
    """Per-node acceptance: known nodes only, (boot_id, seq) strictly forward.

    A new boot_id is accepted with any seq (the agent restarted its counter after a reboot);
    a replay of an old boot_id after a newer one was seen is refused, because boot ids are
    random and we cannot order them: only the current one is trusted.
    """

    def __init__(self, will_fresh_s: float = 3.0, contact_slack_s: float = 1.0) -> None:
        # A Last Will that arrives while the agent's heartbeats are younger than this means the
        # agent process died on a live node (its socket closed at once), not a silent node.
        self.will_fresh_s = will_fresh_s
        # The contact age a healthy agent reports: one heartbeat interval (see `contact_at`).
        self.contact_slack_s = contact_slack_s
        self.nodes: dict[str, NodeHeartbeats] = {}
        self.known: set[str] = set()
        self._retired: dict[str, RetiredBoots] = {}

    def count_declared(self, armed: bool) -> int:
        """Known nodes whose latest heartbeat declared a fence that is (not) armed."""
        return sum(
            1
            for node, rec in self.nodes.items()
            if rec.fence is not None and rec.fence.armed is armed and node in self.known
        )

    def retired_count(self) -> int:
        """Boot ids held to refuse replays (at most MAX_RETIRED_BOOTS per node)."""
        return sum(len(r) for r in self._retired.values())

    def set_known(self, names: set[str]) -> None:
        self.known = names

    def record(self, node: str) -> NodeHeartbeats:
        rec = self.nodes.get(node)
        if rec is None:
            rec = self.nodes[node] = NodeHeartbeats()
        return rec

    def accept(self, hb: Heartbeat, now: float) -> NodeHeartbeats:
        if hb.node not in self.known:
            raise HeartbeatRejected(RejectReason.UNKNOWN_NODE, hb.node[:64])
        rec = self.record(hb.node)
        if hb.boot_id == rec.boot_id:
            if hb.seq <= rec.seq:
                raise HeartbeatRejected(RejectReason.REPLAYED, f"seq {hb.seq} <= {rec.seq}")
        elif hb.boot_id in self._retired.get(hb.node, ()):
            raise HeartbeatRejected(RejectReason.REPLAYED, "boot_id of an earlier boot")
        elif rec.boot_id is not None:
            self._retired.setdefault(hb.node, RetiredBoots()).add(rec.boot_id)
        contact_at = now
        if hb.contact_age_s is not None and hb.contact_age_s > self.contact_slack_s:
            contact_at = now - (hb.contact_age_s - self.contact_slack_s)
        if hb.boot_id == rec.boot_id and rec.contact_at is not None:
            contact_at = max(contact_at, rec.contact_at)
        rec.contact_at = contact_at
        rec.boot_id = hb.boot_id
        rec.seq = hb.seq
        rec.last_at = now
        rec.received += 1
        rec.fence = hb.fence
        rec.peer = hb.peer
        rec.offline = False
        return rec

    def status(
        self, node: str, online: bool, now: float | None = None, *, released: bool = False
    ) -> NodeHeartbeats | None:
        """Retained status / Last Will. Only an "offline" changes trust; "online" is a hint.

        An "offline" while heartbeats were still fresh means the agent died on a running node.
        A weak fence (no watchdog device) no longer holds then: nothing is left there to fence
        it (a partition now would leave its VMs running), so it is disarmed until the next
        heartbeat declares it again. A device-backed fence still holds: the device resets the
        node `watchdog_s` after the dead agent's last pet, unless a restarted agent of the same
        boot proves contact (and then it heartbeats again), and never later than its deadline
        plus `watchdog_s`, well within the safe delay.

        `released` ("stopped", a deliberate stop): the agent disarmed its device and cleared its
        boot record; nothing on the node keeps the fence any more, so it is disarmed whatever
        backed it, until a heartbeat declares it again.
        """
        if node not in self.known:
            return None
        rec = self.record(node)
        if not online:
            rec.offline = True
            if released and rec.fence is not None:
                f = rec.fence
                rec.fence = FenceDeclaration(False, f.after_s, f.bound_s, lease_s=f.lease_s)
                return rec
            last, fence = rec.last_at, rec.fence
            if last is not None and now is not None and fence is not None and not fence.device:
                if now - last < self.will_fresh_s:
                    rec.fence = FenceDeclaration(
                        False, fence.after_s, fence.bound_s, lease_s=fence.lease_s
                    )
        return rec
