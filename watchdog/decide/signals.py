"""Per-source signals: what each independent source says about a node right now.

A source that cannot see (broker or API connection down, nothing observed yet) says UNKNOWN,
never STALE: losing a source is an observation about us, not evidence about the node.
Ages count on the controller's monotonic clock from when *it* observed a change, and never
from before the source was last (re)connected.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from watchdog.decide.config import DecideConfig
from watchdog.decide.observations import NodeObservation, SourceHealth


class Signal(StrEnum):
    ALIVE = "alive"
    STALE = "stale"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Signals:
    """The four signals of one node at one instant, plus the heartbeat age behind them."""

    heartbeat: Signal
    lease: Signal
    ready: Signal
    peers: Signal
    heartbeat_age_s: float | None
    # The Lease passed its staleness deadline, but no API answer after that deadline has
    # shown yet that the API server was serving us then: ALIVE until one does.
    lease_pending: bool = False


def _age(now: float, changed_at: float | None, source_up_since: float) -> float:
    # A change we could not see (source down) must not age: count from reconnection.
    reference = source_up_since if changed_at is None else max(changed_at, source_up_since)
    return now - reference


def heartbeat_signal(
    obs: NodeObservation, health: SourceHealth, now: float, cfg: DecideConfig
) -> tuple[Signal, float | None]:
    if health.broker_up_since is None:
        return Signal.UNKNOWN, None
    age = _age(now, obs.last_heartbeat_at, heartbeat_watch_since(obs, health.broker_up_since))
    if obs.agent_offline:
        # The broker delivered the agent's Last Will or a clean "offline": no need to wait.
        return Signal.STALE, age
    return (Signal.STALE if age >= cfg.suspect_after_s else Signal.ALIVE), age


def heartbeat_watch_since(obs: NodeObservation, broker_up_since: float) -> float:
    """Since when we could have received this node's heartbeats: the broker connection, or the
    moment the node became known to us, whichever is later (at a takeover, the last pages of a
    large Node list arrive after the broker connection; their nodes' earlier heartbeats were
    rejected as unknown, not missed)."""
    if obs.known_since is None:
        return broker_up_since
    return max(broker_up_since, obs.known_since)


def lease_signal(
    obs: NodeObservation, health: SourceHealth, now: float, cfg: DecideConfig
) -> Signal:
    return _lease(obs, health, now, cfg)[0]


def _lease(
    obs: NodeObservation, health: SourceHealth, now: float, cfg: DecideConfig
) -> tuple[Signal, bool]:
    """(signal, pending). STALE needs the deadline passed *and* an API answer to a request sent
    after it: an API server that froze just before the deadline keeps every watch silent, and
    we notice the freeze only a probe interval (plus its timeout) later. Until then a renewal
    made before the freeze may simply not have reached us, and judging every Lease stale
    would turn live nodes DEGRADED (their VMs live-migrated away) at the start of any API
    outage. Pending costs, once the API answers again, up to one probe interval (2 s) plus two
    probe round trips. What it cannot see: a probe answered by a healthy API server while the
    Lease watch hangs on another one, or on a stalled etcd (`/version` reads no etcd)."""
    if health.api_up_since is None or not obs.lease_seen:
        return Signal.UNKNOWN, False
    renewed = now - _age(now, obs.lease_renewed_at, health.api_up_since)  # or reconnected
    deadline = renewed + cfg.lease_stale_after_s
    if now < deadline:
        return Signal.ALIVE, False
    answered = health.api_answered_at
    if answered is not None and answered < deadline:
        return Signal.ALIVE, True
    return Signal.STALE, False


def ready_signal(obs: NodeObservation, health: SourceHealth) -> Signal:
    if health.api_up_since is None or obs.ready is None:
        return Signal.UNKNOWN
    return Signal.ALIVE if obs.ready == "True" else Signal.STALE


def peers_signal(obs: NodeObservation, health: SourceHealth) -> Signal:
    # Peer reports travel over the broker, so they are blind exactly when the broker is.
    if health.broker_up_since is None or obs.peers_unreachable is None:
        return Signal.UNKNOWN
    return Signal.STALE if obs.peers_unreachable else Signal.ALIVE


def signals_of(
    obs: NodeObservation, health: SourceHealth, now: float, cfg: DecideConfig
) -> Signals:
    heartbeat, age = heartbeat_signal(obs, health, now, cfg)
    lease, pending = _lease(obs, health, now, cfg)
    return Signals(
        heartbeat=heartbeat,
        lease=lease,
        ready=ready_signal(obs, health),
        peers=peers_signal(obs, health),
        heartbeat_age_s=age,
        lease_pending=pending,
    )
