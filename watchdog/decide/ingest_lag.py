"""How far the controller's own heartbeat ingest runs behind the broker (pure bookkeeping).

The controller publishes a small echo probe on its own connection every so often and reads it
back through the same socket and the same MQTT client as every heartbeat. An echo that takes
long to come back is the time a heartbeat published now would wait before the controller sees
it. While that lag is large, heartbeat ages measure the controller's backlog, not the nodes: a
saturated controller (CPU starved, a relist decoding a page of objects, a burst) would otherwise
read its own lag as thousands of silent nodes. The caller then treats heartbeats as UNKNOWN
(blind), exactly like a lost broker connection, and holds resets until the echo is prompt again.

The lag is the age of the oldest echo still unanswered (a lower bound on the current delay,
accurate to one probe interval). Echoes travel in order, so an answer also settles every older
probe. An older probe settled that way was **lost**: on a TCP connection only the broker drops
a message, when the queue it keeps for a subscriber that reads too slowly is full (Mosquitto's
`max_queued_messages` applies to QoS 0 for connected clients too), and it drops heartbeats the
same way. Their absence says nothing about the nodes, however prompt the next echo is, so a loss
counts as lagging for `loss_blind_s` after it (by then every node has heartbeated again).
Before the first answer on a connection the lag counts too (a controller that connects into a
backlog is blind from its first second), but only for `unsupported_after_s`: a broker that
never answers (an ACL that does not let the controller write its echo topic) then measures
nothing, lag 0, and `unsupported` says so, rather than blinding the controller for good.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

# Probes kept waiting for their answer; a broker that answers nothing must not grow this.
MAX_UNANSWERED = 128
# No answer at all for this long: the broker does not echo (see the module docstring).
UNSUPPORTED_AFTER_S = 30.0
# Blind this long after a lost probe: heartbeats were dropped with it, and every node heartbeats
# again within this (its interval is 1 s by default; DESIGN §4).
LOSS_BLIND_S = 3.0


@dataclass
class EchoBook:
    """Echo probes of one broker connection; times on the controller's monotonic clock."""

    max_lag_s: float
    unsupported_after_s: float = UNSUPPORTED_AFTER_S
    loss_blind_s: float = LOSS_BLIND_S
    unanswered: OrderedDict[int, float] = field(default_factory=OrderedDict)
    answered: int = 0
    lost: int = 0  # probes settled by the answer of a later one: dropped on the way
    last_loss_at: float | None = None
    last_rtt_s: float | None = None
    _seq: int = 0
    _first_sent_at: float = 0.0

    def sent(self, now: float) -> int:
        """Record a probe handed to the broker now; returns its sequence number."""
        if not self._seq:
            self._first_sent_at = now
        self._seq += 1
        self.unanswered[self._seq] = now
        while len(self.unanswered) > MAX_UNANSWERED:
            self.unanswered.popitem(last=False)
        return self._seq

    def answer(self, seq: int, now: float) -> float | None:
        """An echo came back; returns its round trip, or None for one we do not know."""
        sent_at = self.unanswered.get(seq)
        if sent_at is None:
            return None
        # In-order delivery: every older probe was lost on the way.
        while self.unanswered:
            first, _ = self.unanswered.popitem(last=False)
            if first == seq:
                break
            self.lost += 1
            self.last_loss_at = now
        self.answered += 1
        self.last_rtt_s = now - sent_at
        return self.last_rtt_s

    def lag_s(self, now: float) -> float:
        """The age of the oldest unanswered probe (0 once the broker proved it echoes nothing)."""
        if not self.unanswered or self.unsupported(now):
            return 0.0
        return max(0.0, now - next(iter(self.unanswered.values())))

    def dropping(self, now: float) -> bool:
        """A probe was lost less than `loss_blind_s` ago: heartbeats are being dropped."""
        return self.last_loss_at is not None and now - self.last_loss_at < self.loss_blind_s

    def lagging(self, now: float) -> bool:
        return self.lag_s(now) > self.max_lag_s or self.dropping(now)

    def unsupported(self, now: float) -> bool:
        """Probes for `unsupported_after_s` and not one answer: the broker does not echo them."""
        if self.answered or not self.unanswered:
            return False
        return now - self._first_sent_at > self.unsupported_after_s
