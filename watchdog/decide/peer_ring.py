"""Who probes whom: each node probes its k successors in sorted-name ring order (DESIGN §4).

Only nodes whose agent announced a probe address take part. Deterministic (any replica computes
the same lists), and work is proportional to what changed: a node joining, leaving or moving its
address changes the lists of its k predecessors (they list it) and its own, nothing else, so the
controller republishes only those.

Also the probe list's wire format, `<prefix>/probe/<node>` (retained, QoS 1, published by the
leader): `{"node": ..., "targets": {name: "host:port"}}`, parsed as strictly as a heartbeat.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Mapping
from dataclasses import dataclass

from watchdog.decide.heartbeats import HeartbeatRejected, RejectReason, json_message
from watchdog.decide.peer_address import valid_peer_address

MAX_TARGETS = 16  # peer_count is bounded by settings; this bounds what an agent accepts
MAX_PROBE_LIST_BYTES = 8192


def probe_topic(prefix: str, node: str) -> str:
    return f"{prefix}/probe/{node}"


class PeerRing:
    """Sorted nodes with a known probe address; lists computed on demand in O(k log n)."""

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError("k must be at least 1")
        self.k = k
        self._names: list[str] = []
        self.addresses: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, node: object) -> bool:
        return node in self.addresses

    def targets_of(self, node: str) -> dict[str, str]:
        """The k successors of `node` (all others when there are fewer), with their addresses."""
        if node not in self.addresses:
            return {}
        n = len(self._names)
        i = bisect.bisect_left(self._names, node)
        picked = (self._names[(i + j) % n] for j in range(1, min(self.k, n - 1) + 1))
        return {t: self.addresses[t] for t in picked}

    def observers_of(self, node: str) -> list[str]:
        """The k predecessors of `node`: whose lists contain it (or would, once it joins)."""
        names = self._names
        n = len(names)
        if node in self.addresses:
            i = bisect.bisect_left(names, node)
            return [names[(i - j) % n] for j in range(1, min(self.k, n - 1) + 1)]
        i = bisect.bisect_left(names, node)  # where it would go
        return [names[(i - j) % n] for j in range(1, min(self.k, n) + 1)]

    def set_address(self, node: str, address: str) -> set[str]:
        """Add or move `node`; returns every node whose list changed (a newcomer's own too)."""
        old = self.addresses.get(node)
        if old == address:
            return set()
        changed = set(self.observers_of(node))
        if old is None:
            # The newcomer enters the predecessors' windows and pushes their k-th out.
            bisect.insort(self._names, node)
            changed.add(node)  # its own list is new; a moved node's own list is unchanged
        self.addresses[node] = address
        return changed

    def remove(self, node: str) -> set[str]:
        """Take `node` out; returns the nodes whose list changed (not the removed one)."""
        if node not in self.addresses:
            return set()
        changed = set(self.observers_of(node))
        del self.addresses[node]
        del self._names[bisect.bisect_left(self._names, node)]
        changed.discard(node)
        return changed


def assignment(addresses: Mapping[str, str], k: int) -> dict[str, dict[str, str]]:
    """Every node's list at once (the reference the incremental ring is tested against)."""
    ring = PeerRing(k)
    for node, address in addresses.items():
        ring.set_address(node, address)
    return {node: ring.targets_of(node) for node in addresses}


# --- the probe list on the wire --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProbeList:
    node: str
    targets: dict[str, str]


def encode_probe_list(node: str, targets: Mapping[str, str]) -> bytes:
    doc = {"node": node, "targets": dict(sorted(targets.items()))}
    return json.dumps(doc, separators=(",", ":")).encode()


def parse_probe_list(topic: str, payload: bytes, prefix: str) -> ProbeList:
    """Validate one probe list; raise HeartbeatRejected naming why it is refused."""
    topic_node, doc = json_message(topic, payload, f"{prefix}/probe/", MAX_PROBE_LIST_BYTES)
    if set(doc) != {"node", "targets"}:
        raise HeartbeatRejected(RejectReason.SCHEMA, f"fields {sorted(doc)[:8]}")
    node = doc["node"]
    if not isinstance(node, str) or node != topic_node:
        detail = f"node {str(node)[:64]!r} on {topic!r}"
        raise HeartbeatRejected(RejectReason.TOPIC_MISMATCH, detail)
    targets = doc["targets"]
    if not isinstance(targets, dict) or len(targets) > MAX_TARGETS:
        raise HeartbeatRejected(RejectReason.SCHEMA, "targets must be an object of <= 16")
    for name, address in targets.items():
        if not valid_node_name(name) or name == node:
            raise HeartbeatRejected(RejectReason.SCHEMA, f"target {name[:64]!r}")
        if not valid_peer_address(address):
            raise HeartbeatRejected(RejectReason.SCHEMA, f"address of {name[:64]!r}")
    return ProbeList(node, dict(targets))


def valid_node_name(name: object) -> bool:
    # A Kubernetes node name is a DNS subdomain; a topic level must not hold wildcards.
    return (
        isinstance(name, str)
        and 0 < len(name) <= 253
        and all((c.isalnum() and c.isascii()) or c in "-." for c in name)
    )
