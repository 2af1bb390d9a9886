"""Quorum before self-fencing: when an agent cut off from broker and API may spare itself.

An agent that has proven no contact with broker or API for `self_fence_after_s` fences — unless
the outage is cluster-wide. It asks its peers (its probe targets, and while cut off the nodes
of the roster, decide/roster.py; each answers `PONG ... cut` once it has proven no contact for
`cut_after_s`, heartbeat/peers.py) and spares itself while

    1 + (peers it reached that are cut off too)  >  members / 2

where `members` is the node count the leader publishes retained on `<prefix>/members`. The
controller, for its part, holds every reset while more than half of the nodes are silent to it
(`quorum_lost`), and declares no node down meanwhile.

Why that is safe — two majorities of one set intersect: the agent's spare rests on more than
half of the nodes being cut off, every one of them silent to the controller. No contact for
`cut_after_s` means none of its heartbeats came back from the broker for that long. If the
controller no longer hears it, its latest heartbeat there is at most a lost echo and the
ingest lag newer, so it has gone `suspect_after_s` without one; if it still hears it (a one-way
broker path), every heartbeat reports the agent's contact age and the controller ages the node
from that contact plus one interval (decide/heartbeats.py, `contact_at`), with the same bound.
Either way the node is SUSPECT or further down there, the controller hears at most half of
them, and holds. It needs, at the moment the controller would reset:
- the controller's member count not above the agent's, and every node the agents count
  counted by the controller: each replica keeps the smallest node count it saw within
  `MEMBERS_MEMORY_S`, and counts Nodes deleted within that time as silent (a count that grows
  while more than half of the nodes are cut off for longer, or across a replica's restart, is
  the known limit);
- a spare that expires soon after the last answer that justified it (`spare_valid_s`), and a
  controller that, after a blind hold ends, counts the whole safe delay again
  (decide/machine.py): the spare then lapses, and the device fires, before that delay is over;
- the timings `spare_timing_error` checks, and a controller that wakes a node when its
  heartbeat turns `suspect_after_s` old without a delay that matters;
- honest peers: a compromised node can answer `cut` while it heartbeats (DESIGN §9).

A spared agent keeps petting its watchdog device only until the spare expires, so a frozen
spared agent is still fenced by its device.

The whole rule is checked against a model of partitions in tests/unit/test_quorum.py.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass

from watchdog.decide.heartbeats import HeartbeatRejected, RejectReason

# How long the controller keeps a published member count as its floor: an agent cut off before
# a node joined still spares itself on the count it knew (longer cuts are the known limit).
MEMBERS_MEMORY_S = 600.0
MAX_MEMBERS = 100_000
MAX_MEMBERS_BYTES = 64


def members_topic(prefix: str) -> str:
    return f"{prefix}/members"


def spared(members: int | None, cut_peers: int) -> bool:
    """Whether an agent cut off from broker and API may spare itself: it and the peers it
    reached that are cut off too are more than half of the `members` (None: never told)."""
    if members is None or members < 1:
        return False
    return 2 * (1 + cut_peers) > members


def quorum_lost(silent: int, members: int) -> bool:
    """The controller's hold: more than half of the nodes are silent to it (then a majority of
    nodes may be cut off together, and their agents may be sparing themselves)."""
    return members > 0 and 2 * silent > members


def spare_valid_s(peer_interval_s: float, peer_probe_timeout_s: float) -> float:
    """How long one round's answers spare an agent: two rounds (one may be lost to a slow
    probe), so a spare lapses within that long of the peers' last `cut`."""
    return 2 * (peer_interval_s + peer_probe_timeout_s)


def cut_after_s(
    self_fence_after_s: float,
    peer_interval_s: float,
    peer_probe_timeout_s: float,
    heartbeat_interval_s: float,
) -> float:
    """How long without proven contact before an agent answers `cut` (and may be spared): one
    probe round and one heartbeat interval before its own fence deadline, so that a round's
    answers can spare it before that deadline when it and its peers were cut off together."""
    return self_fence_after_s - (peer_interval_s + peer_probe_timeout_s) - heartbeat_interval_s


def spare_timing_error(
    *,
    peer_interval_s: float,
    peer_probe_timeout_s: float,
    self_fence_after_s: float,
    heartbeat_interval_s: float,
    fence_margin_s: float,
    suspect_after_s: float,
    max_ingest_lag_s: float,
) -> str | None:
    """Why these settings cannot keep the spare safe, or None.

    - `cut` must mean SUSPECT (or further down) at the controller: the controller's latest
      heartbeat of a node is at most one interval newer than the node's latest contact (that
      heartbeat's echo may be lost) and reached it at most `max_ingest_lag_s` late (a backlog
      longer than that is a blind hold); so cut_after_s >= suspect_after_s + max_ingest_lag_s
      + heartbeat_interval_s.
    - A spare must lapse before the controller's safe delay after a blind hold is over: the
      controller waits `self_fence_after_s + max(bound, device) + heartbeat_interval_s +
      margin` from the hold's end (decide/safety.py); the answers that ended the hold reach a
      spared agent within one round (`peer_interval_s + peer_probe_timeout_s`), its spare lapses
      `spare_valid_s` after the last `cut`, and it stops within `max(bound, device)`. So
      round + spare_valid_s <= self_fence_after_s + heartbeat_interval_s + margin.

    Both sides read these from the same configuration (one ConfigMap in deploy/)."""
    round_s = peer_interval_s + peer_probe_timeout_s
    cut = cut_after_s(
        self_fence_after_s, peer_interval_s, peer_probe_timeout_s, heartbeat_interval_s
    )
    silent = suspect_after_s + max_ingest_lag_s + heartbeat_interval_s
    if cut < silent:
        return (
            f"self_fence_after_s - (peer_interval_s + peer_probe_timeout_s) - "
            f"heartbeat_interval_s = {cut:g}s is below suspect_after_s + mqtt.max_ingest_lag_s + "
            f"heartbeat_interval_s = {silent:g}s: an agent would tell its peers it is cut off "
            "while the controller may still count it heard (quorum before self-fencing, "
            "decide/quorum.py)"
        )
    need = round_s + spare_valid_s(peer_interval_s, peer_probe_timeout_s)
    have = self_fence_after_s + heartbeat_interval_s + fence_margin_s
    if need <= have:
        return None
    return (
        f"3 * (peer_interval_s + peer_probe_timeout_s) = {need:g}s exceeds self_fence_after_s + "
        f"heartbeat_interval_s + fence_margin_s = {have:g}s: an agent spared by its peers in a "
        "cluster-wide outage could still run after the controller's safe delay"
    )


class MembersFloor:
    """The controller's member count for its quorum hold: the smallest it had within
    `MEMBERS_MEMORY_S` (an agent cut off meanwhile still counts on the older, smaller one)."""

    def __init__(self, memory_s: float = MEMBERS_MEMORY_S) -> None:
        self._memory_s = memory_s
        self._seen: deque[tuple[float, int]] = deque()  # (since, count), counts ascending

    def floor(self, now: float, current: int) -> int:
        seen = self._seen
        # Keep a monotonic queue: an older count larger than the current one can never be the
        # minimum again, so memory stays O(distinct recent minima).
        while seen and seen[-1][1] >= current:
            seen.pop()
        seen.append((now, current))
        while len(seen) > 1 and seen[0][0] < now - self._memory_s:
            seen.popleft()  # last seen before the window
        return seen[0][1]


# --- the member count on the wire -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Members:
    nodes: int


def encode_members(nodes: int) -> bytes:
    return json.dumps({"nodes": nodes}, separators=(",", ":")).encode()


def parse_members(payload: bytes) -> Members:
    """`{"nodes": n}`, 1 <= n <= 100000; HeartbeatRejected naming what is wrong."""
    if len(payload) > MAX_MEMBERS_BYTES:
        raise HeartbeatRejected(RejectReason.OVERSIZED, f"{len(payload)} bytes")
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as e:
        raise HeartbeatRejected(RejectReason.MALFORMED, str(e)[:80]) from None
    if not isinstance(doc, dict) or set(doc) != {"nodes"}:
        raise HeartbeatRejected(RejectReason.SCHEMA, 'expected exactly {"nodes": n}')
    nodes = doc["nodes"]
    if isinstance(nodes, bool) or not isinstance(nodes, int) or not 1 <= nodes <= MAX_MEMBERS:
        raise HeartbeatRejected(RejectReason.SCHEMA, f"nodes {str(nodes)[:20]!r}")
    return Members(nodes)
