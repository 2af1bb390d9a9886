"""The leader's probe lists: who probes whom, published retained on `<prefix>/probe/<node>`;
and the member count the agents' quorum divides by, retained on `<prefix>/members`.

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

    def node_deleted(self, node: str) -> None:
        changed = self.ring.remove(node)
        self._send(changed)
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

    def step_down(self) -> None:
        self._leading = False

    def reconnected(self) -> None:
        if self._leading:
            self._send(list(self.ring.addresses), force=True)
            self._send_members(force=True)

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
