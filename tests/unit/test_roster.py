"""The roster (decide/roster.py): its wire format, the count a sweep looks for, and what the
leader publishes of it (runtime/probe_lists.py)."""

from __future__ import annotations

import json

import pytest

from watchdog.decide.heartbeats import HeartbeatRejected
from watchdog.decide.quorum import spared
from watchdog.decide.roster import (
    MAX_ROSTER_SHARD_BYTES,
    ROSTER_SHARDS,
    cut_peers_needed,
    encode_roster_shard,
    encode_roster_shard_within,
    parse_roster_shard,
    roster_topic,
    shard_of,
)
from watchdog.runtime.probe_lists import ProbeLists

PREFIX = "node-watchdog/v1"


def test_the_count_a_sweep_looks_for_is_exactly_what_spares() -> None:
    assert cut_peers_needed(None) is None and cut_peers_needed(0) is None
    for members in range(1, 300):
        need = cut_peers_needed(members)
        assert need is not None
        assert spared(members, need), members
        assert need == 0 or not spared(members, need - 1), members


def test_shards_are_stable_across_processes_and_versions() -> None:
    """A leader and agents of different versions must agree on a node's shard (an agent refuses
    a shard that holds a node of another): the hash is CRC-32, pinned here."""
    assert (shard_of("node-1"), shard_of("node-2")) == (95, 229)
    assert {shard_of(f"n{i}") for i in range(5000)} == set(range(ROSTER_SHARDS))


def test_a_shard_too_large_for_the_broker_leaves_nodes_out_rather_than_drop_the_leader() -> None:
    """The shipped broker drops a connection that publishes more than 65,536 bytes: an
    oversized shard would take the leader's connection with it. It is cut to fit instead."""
    long = "x" * 200
    nodes = {
        f"n{i:05d}{long}": f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:9101" for i in range(600)
    }
    shard = 7
    payload, left_out = encode_roster_shard_within(shard, nodes)
    assert len(encode_roster_shard(shard, nodes)) > MAX_ROSTER_SHARD_BYTES
    assert len(payload) <= MAX_ROSTER_SHARD_BYTES and 0 < left_out < 600
    doc = json.loads(payload)
    assert len(doc["nodes"]) == 600 - left_out
    assert list(doc["nodes"]) == sorted(nodes)[: 600 - left_out]  # the last in name order go
    small = {"node-1": "10.0.0.1:9101"}
    assert encode_roster_shard_within(shard, small) == (encode_roster_shard(shard, small), 0)


def test_a_roster_shard_round_trips_and_anything_else_is_refused() -> None:
    node = "node-1"
    shard = shard_of(node)
    topic = roster_topic(PREFIX, shard)
    payload = encode_roster_shard(shard, {node: "10.0.0.1:9101"})
    assert parse_roster_shard(topic, payload, PREFIX).nodes == {node: "10.0.0.1:9101"}
    other = next(n for n in (f"node-{i}" for i in range(2, 200)) if shard_of(n) != shard)
    bad = [
        (topic, b"[]"),
        (topic, b'{"shard":0}'),
        (topic, json.dumps({"shard": shard, "nodes": [], "x": 1}).encode()),
        (topic, json.dumps({"shard": True, "nodes": {}}).encode()),
        (topic, json.dumps({"shard": ROSTER_SHARDS, "nodes": {}}).encode()),
        (roster_topic(PREFIX, (shard + 1) % ROSTER_SHARDS), payload),  # another shard's topic
        (topic, encode_roster_shard(shard, {other: "10.0.0.2:9101"})),  # not of this shard
        (topic, encode_roster_shard(shard, {node: "10.0.0.1"})),  # no port
        (topic, encode_roster_shard(shard, {node: "a b:1"})),
        (f"{PREFIX}/roster/{shard}/x", payload),
        (topic, b"{" + b" " * MAX_ROSTER_SHARD_BYTES + b"}"),
    ]
    for t, p in bad:
        with pytest.raises(HeartbeatRejected):
            parse_roster_shard(t, p, PREFIX)


class Published:
    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []

    def __call__(self, topic: str, payload: bytes) -> None:
        self.messages.append((topic, payload))

    def roster(self) -> dict[str, str]:
        """The roster an agent would hold: the latest of every shard, merged."""
        latest: dict[str, bytes] = {}
        for topic, payload in self.messages:
            if topic.startswith(f"{PREFIX}/roster/"):
                latest[topic] = payload
        nodes: dict[str, str] = {}
        for topic, payload in latest.items():
            nodes.update(parse_roster_shard(topic, payload, PREFIX).nodes)
        return nodes

    def roster_topics(self) -> list[str]:
        return [t for t, _ in self.messages if t.startswith(f"{PREFIX}/roster/")]


def test_the_leader_publishes_the_roster_and_only_the_shard_that_changed() -> None:
    out = Published()
    lists = ProbeLists(3, PREFIX, out)
    for i in range(10):
        lists.address_seen(f"node-{i}", f"10.0.0.{i}:9101")
    assert out.messages == [], "a replica that does not lead publishes nothing"
    lists.lead()
    # Every shard, the empty ones too: a previous leader's retained shard may name a node gone.
    assert len(set(out.roster_topics())) == ROSTER_SHARDS
    assert out.roster() == {f"node-{i}": f"10.0.0.{i}:9101" for i in range(10)}

    seen = len(out.roster_topics())
    lists.address_seen("node-3", "10.0.0.3:9101")  # unchanged: nothing
    assert out.roster_topics()[seen:] == []
    lists.address_seen("node-3", "10.0.1.3:9101")  # moved: its shard only
    assert out.roster_topics()[seen:] == [roster_topic(PREFIX, shard_of("node-3"))]
    lists.node_deleted("node-4")
    assert out.roster_topics()[seen + 1 :] == [roster_topic(PREFIX, shard_of("node-4"))]
    lists.address_seen("node-5", None)  # no longer takes part
    expected = {f"node-{i}": f"10.0.0.{i}:9101" for i in range(10) if i not in (4, 5)}
    expected["node-3"] = "10.0.1.3:9101"
    # What the agents hold after the changes alone equals what a new leader would publish.
    assert out.roster() == expected
    fresh = Published()
    other = ProbeLists(3, PREFIX, fresh)
    for node, address in expected.items():
        other.address_seen(node, address)
    other.lead()
    assert fresh.roster() == expected
    out.messages.clear()
    lists.reconnected()  # the broker lost its retained messages: every shard again
    assert len(set(out.roster_topics())) == ROSTER_SHARDS
    assert out.roster() == expected
    lists.step_down()
    out.messages.clear()
    lists.address_seen("node-7", "10.0.9.7:9101")
    assert out.messages == [], "a replica that stepped down publishes nothing"
