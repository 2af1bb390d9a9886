"""The roster: every node's probe address, so that a cut-off agent can ask a majority of them.

An agent's probe list names only its `peer_count` successors (decide/peer_ring.py), so by
itself it can be spared by quorum (decide/quorum.py: it and the cut-off peers it reached are
more than half of the nodes) only on clusters of up to `2 * peer_count + 1` nodes. On larger
clusters a control-plane outage would reboot every armed node. The roster closes that: the
leader publishes every participating node's address, and an agent that has proven no contact
for `cut_after_s` sweeps the roster for cut-off peers (heartbeat/peers.py) until it has counted
enough of them for a spare, or until it is clear that it cannot.

The rule a spare rests on does not change: every peer it counts answered `PONG <itself> <boot>
cut` at its own address within this round, so the spare still rests on more than half of the
nodes being cut off, each of them silent to the controller, which then holds (`quorum_lost`).
The roster only widens whom the agent may ask.

On the wire: `<prefix>/roster/<shard>` (retained, QoS 1, written by the leader only), one of
`ROSTER_SHARDS` shards by a stable hash of the node name, `{"shard": i, "nodes": {name:
"host:port"}}`. Shards keep each change small: a node joining or moving its address rewrites
one shard (about 1/256 of the cluster), not the whole roster. Every agent holds the whole
roster: a node joining costs one shard to every agent, a broker restart every shard to every
agent (about 40 bytes x nodes² in all: 40 MB at 1,000 nodes, 1 GB at 5,000).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

from watchdog.decide.heartbeats import HeartbeatRejected, RejectReason, json_message
from watchdog.decide.peer_address import valid_peer_address
from watchdog.decide.peer_ring import valid_node_name

ROSTER_SHARDS = 256
# Below the shipped broker's max_packet_size (65,536 bytes, deploy/base/broker/mosquitto.conf),
# which would drop the leader's connection for a larger publish. Entries take ~40 bytes (a
# 20-character name and an IPv4 address), so a shard holds ~1,500 of them: 380,000 nodes.
MAX_ROSTER_SHARD_BYTES = 60_000


def roster_topic(prefix: str, shard: int) -> str:
    return f"{prefix}/roster/{shard}"


def roster_filter(prefix: str) -> str:
    return f"{prefix}/roster/+"


def shard_of(node: str) -> int:
    """The shard a node's entry lives in: stable across processes and versions (CRC-32)."""
    return zlib.crc32(node.encode()) % ROSTER_SHARDS


@dataclass(frozen=True, slots=True)
class RosterShard:
    shard: int
    nodes: dict[str, str]


def encode_roster_shard(shard: int, nodes: Mapping[str, str]) -> bytes:
    doc = {"shard": shard, "nodes": dict(sorted(nodes.items()))}
    return json.dumps(doc, separators=(",", ":")).encode()


def encode_roster_shard_within(shard: int, nodes: Mapping[str, str]) -> tuple[bytes, int]:
    """The shard as it may be published, and how many entries had to be left out to keep it
    within MAX_ROSTER_SHARD_BYTES (the last in name order). Leaving a node out only narrows
    whom a cut-off agent may ask: it may fence where it could have been spared, never the
    reverse."""
    payload = encode_roster_shard(shard, nodes)
    if len(payload) <= MAX_ROSTER_SHARD_BYTES:
        return payload, 0
    kept = sorted(nodes.items())
    while kept and len(payload) > MAX_ROSTER_SHARD_BYTES:
        # Cut in proportion to the excess, at least one entry: a few encodes, not one per entry.
        over = len(payload) - MAX_ROSTER_SHARD_BYTES
        kept = kept[: len(kept) - max(1, over * len(kept) // len(payload) + 1)]
        payload = encode_roster_shard(shard, dict(kept))
    return payload, len(nodes) - len(kept)


def parse_roster_shard(topic: str, payload: bytes, prefix: str) -> RosterShard:
    """Validate one roster shard; raise HeartbeatRejected naming why it is refused."""
    shard_text, doc = json_message(topic, payload, f"{prefix}/roster/", MAX_ROSTER_SHARD_BYTES)
    if set(doc) != {"shard", "nodes"}:
        raise HeartbeatRejected(RejectReason.SCHEMA, f"fields {sorted(doc)[:8]}")
    shard = doc["shard"]
    if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < ROSTER_SHARDS:
        raise HeartbeatRejected(RejectReason.SCHEMA, f"shard {str(shard)[:20]!r}")
    if shard_text != str(shard):
        raise HeartbeatRejected(RejectReason.TOPIC_MISMATCH, f"shard {shard} on {topic[:120]!r}")
    nodes = doc["nodes"]
    if not isinstance(nodes, dict):
        raise HeartbeatRejected(RejectReason.SCHEMA, "nodes must be an object")
    for name, address in nodes.items():
        if not valid_node_name(name) or shard_of(name) != shard:
            raise HeartbeatRejected(RejectReason.SCHEMA, f"node {name[:64]!r} in shard {shard}")
        if not valid_peer_address(address):
            raise HeartbeatRejected(RejectReason.SCHEMA, f"address of {name[:64]!r}")
    return RosterShard(shard, dict(nodes))


def cut_peers_needed(members: int | None) -> int | None:
    """How many cut-off peers spare an agent (quorum.spared): the smallest c with
    2 * (1 + c) > members; None when it was never told the member count (never spared)."""
    if members is None or members < 1:
        return None
    return members // 2
