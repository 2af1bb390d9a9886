"""The leader's probe lists: who probes whom, published retained on `<prefix>/probe/<node>`;
the member count the agents' quorum divides by, retained on `<prefix>/members`; and the roster
of every node's probe address a cut-off agent sweeps, retained on `<prefix>/roster/<shard>`
(decide/roster.py; a shard only when one of its nodes joined, moved or left).

Owns the assignment ring (decide/peer_ring.py) fed from the addresses agents announce in their
heartbeats, and what it last published per node. Every replica keeps the ring (the controller
needs each target's assigned observers to weigh peer reports); only the leader publishes, a
node's list only when it changed, every list once after taking leadership and again after a
reconnection to the broker (which keeps no retained messages across its own restart).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from watchdog.decide.peer_ring import PeerRing, encode_probe_list, probe_topic
from watchdog.decide.quorum import encode_members, members_topic
from watchdog.decide.roster import (
    ROSTER_SHARDS,
    encode_roster_shard_within,
    roster_topic,
    shard_of,
)

log = logging.getLogger(__name__)


class ProbeLists:
    def __init__(self, k: int, prefix: str, publish: Callable[[str, bytes], None]) -> None:
        self.ring = PeerRing(k)
        self._prefix = prefix
        self._publish = publish
        self._leading = False
        self._published: dict[str, bytes] = {}
        self.publishes = 0
        self._members = 0  # the node count (the controller's known nodes)
        self._members_published: int | None = None
        self._shards: dict[int, dict[str, str]] = {}  # the roster: shard → {node: address}
        self._shards_published: dict[int, bytes] = {}

    def set_members(self, nodes: int) -> None:
        """The node count changed (a Node added or deleted): the leader says so at once."""
        self._members = nodes
        self._send_members()

    def _send_members(self, *, force: bool = False) -> None:
        if not self._leading or self._members < 1:
            return
        if not force and self._members_published == self._members:
            return
        self._members_published = self._members
        self._publish(members_topic(self._prefix), encode_members(self._members))
        self.publishes += 1

    def address_seen(self, node: str, address: str | None) -> None:
        """A heartbeat of `node` announced `address` (None: it no longer takes part)."""
        if self.ring.addresses.get(node) == address:
            return  # the common case: one dict lookup per heartbeat
        if address is None:
            changed = self.ring.remove(node)
        else:
            changed = self.ring.set_address(node, address)
        self._send(changed)
        self._roster_entry(node, address)

    def node_deleted(self, node: str) -> None:
        changed = self.ring.remove(node)
        self._send(changed)
        self._roster_entry(node, None)
        if self._leading and self._published.pop(node, None) is not None:
            self._publish(probe_topic(self._prefix, node), b"")  # clears the retained list
            self.publishes += 1

    def observers_of(self, node: str) -> list[str]:
        return self.ring.observers_of(node) if node in self.ring else []

    def lead(self) -> None:
        self._leading = True
        self._published.clear()
        self._send(list(self.ring.addresses), force=True)
        self._send_members(force=True)
        self._shards_published.clear()
        self._send_roster(range(ROSTER_SHARDS), force=True)

    def step_down(self) -> None:
        self._leading = False

    def reconnected(self) -> None:
        if self._leading:
            self._send(list(self.ring.addresses), force=True)
            self._send_members(force=True)
            self._send_roster(range(ROSTER_SHARDS), force=True)

    def _send(self, nodes: Iterable[str], *, force: bool = False) -> None:
        if not self._leading:
            return
        for node in nodes:
            if node not in self.ring:
                continue
            payload = encode_probe_list(node, self.ring.targets_of(node))
            if not force and self._published.get(node) == payload:
                continue
            self._published[node] = payload
            self._publish(probe_topic(self._prefix, node), payload)
            self.publishes += 1

    def _roster_entry(self, node: str, address: str | None) -> None:
        shard = shard_of(node)
        entries = self._shards.setdefault(shard, {})
        if address is None:
            if entries.pop(node, None) is None:
                return
        else:
            entries[node] = address
        self._send_roster((shard,))

    def _send_roster(self, shards: Iterable[int], *, force: bool = False) -> None:
        """Every shard in `shards`, empty ones too: a previous leader's retained shard may still
        name nodes that have left since."""
        if not self._leading:
            return
        for shard in shards:
            payload, left_out = encode_roster_shard_within(shard, self._shards.get(shard, {}))
            if not force and self._shards_published.get(shard) == payload:
                continue
            if left_out:
                log.warning(
                    "roster shard %d leaves out %d nodes to stay within the broker's packet "
                    "size: cut-off agents cannot ask them for the quorum",
                    shard,
                    left_out,
                )
            self._shards_published[shard] = payload
            self._publish(roster_topic(self._prefix, shard), payload)
            self.publishes += 1
