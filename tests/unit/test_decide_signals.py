"""Per-source signals: ALIVE / STALE / UNKNOWN, with ages on the controller's own clock."""

from __future__ import annotations

import pytest

from watchdog.decide.config import DecideConfig
from watchdog.decide.observations import NodeObservation, SourceHealth
from watchdog.decide.signals import Signal, heartbeat_signal, lease_signal, signals_of

CFG = DecideConfig(suspect_after_s=3.0, lease_stale_after_s=15.0)
NOW = 1000.0


def obs(**kw: object) -> NodeObservation:
    return NodeObservation(name="node-a", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("last", "up_since", "offline", "signal", "age"),
    [
        pytest.param(999.0, 0.0, False, Signal.ALIVE, 1.0, id="heartbeat 1 s old: alive"),
        pytest.param(
            997.0, 0.0, False, Signal.STALE, 3.0, id="heartbeat exactly suspect_after old: stale"
        ),
        pytest.param(997.1, 0.0, False, Signal.ALIVE, 2.9, id="just under suspect_after: alive"),
        pytest.param(999.5, 0.0, True, Signal.STALE, 0.5, id="Last Will delivered: stale at once"),
        pytest.param(
            10.0,
            998.0,
            False,
            Signal.ALIVE,
            2.0,
            id="broker reconnected 2 s ago: the 990 s before do not count",
        ),
        pytest.param(
            10.0,
            996.0,
            False,
            Signal.STALE,
            4.0,
            id="broker reconnected 4 s ago, nothing since: stale, aged from the reconnection",
        ),
        pytest.param(
            None,
            998.0,
            False,
            Signal.ALIVE,
            2.0,
            id="never heard, connected 2 s ago: not yet stale",
        ),
        pytest.param(
            None,
            990.0,
            False,
            Signal.STALE,
            10.0,
            id="never heard since connecting 10 s ago: stale",
        ),
        pytest.param(
            999.0, None, False, Signal.UNKNOWN, None, id="broker down: unknown, not stale"
        ),
        pytest.param(
            10.0, None, True, Signal.UNKNOWN, None, id="broker down hides even a Will: unknown"
        ),
    ],
)
def test_heartbeat_signal(
    last: float | None, up_since: float | None, offline: bool, signal: Signal, age: float | None
) -> None:
    health = SourceHealth(broker_up_since=up_since, api_up_since=0.0)
    got, got_age = heartbeat_signal(
        obs(last_heartbeat_at=last, agent_offline=offline), health, NOW, CFG
    )
    assert got is signal
    assert got_age == (None if age is None else pytest.approx(age))


@pytest.mark.parametrize(
    ("seen", "renewed", "up_since", "signal"),
    [
        pytest.param(True, 990.0, 0.0, Signal.ALIVE, id="renewed 10 s ago: alive"),
        pytest.param(True, 985.0, 0.0, Signal.STALE, id="not renewed for 15 s: stale"),
        pytest.param(
            True,
            100.0,
            990.0,
            Signal.ALIVE,
            id="API reconnected 10 s ago: older silence does not count",
        ),
        pytest.param(
            True, 100.0, 980.0, Signal.STALE, id="API reconnected 20 s ago, no renewal since: stale"
        ),
        pytest.param(
            True, None, 980.0, Signal.STALE, id="seen but never renewed, connected 20 s ago: stale"
        ),
        pytest.param(False, None, 0.0, Signal.UNKNOWN, id="no Lease seen: unknown"),
        pytest.param(True, 990.0, None, Signal.UNKNOWN, id="API down: unknown"),
    ],
)
def test_lease_signal(
    seen: bool, renewed: float | None, up_since: float | None, signal: Signal
) -> None:
    health = SourceHealth(broker_up_since=0.0, api_up_since=up_since)
    assert lease_signal(obs(lease_seen=seen, lease_renewed_at=renewed), health, NOW, CFG) is signal


@pytest.mark.parametrize(
    ("answered", "signal", "pending"),
    [
        # Renewed at 984: its deadline is 999 (15 s). The API froze before the deadline: the
        # last probe it answered was sent at 998, so a renewal may have been stuck in it.
        pytest.param(998.0, Signal.ALIVE, True, id="no answer after the deadline: not stale yet"),
        pytest.param(999.0, Signal.STALE, False, id="answered a probe sent at the deadline"),
        pytest.param(999.5, Signal.STALE, False, id="answered after the deadline: stale"),
        pytest.param(None, Signal.STALE, False, id="answers not tracked: stale at the deadline"),
    ],
)
def test_a_lease_is_stale_only_once_the_api_answered_after_its_deadline(
    answered: float | None, signal: Signal, pending: bool
) -> None:
    health = SourceHealth(broker_up_since=0.0, api_up_since=0.0, api_answered_at=answered)
    o = obs(lease_seen=True, lease_renewed_at=984.0)
    sig = signals_of(o, health, NOW, CFG)
    assert (sig.lease, sig.lease_pending) == (signal, pending)
    # Before the deadline, the answers do not matter: alive, nothing pending.
    early = signals_of(o, health, 998.9, CFG)
    assert (early.lease, early.lease_pending) == (Signal.ALIVE, False)


@pytest.mark.parametrize(
    ("ready", "api", "signal"),
    [
        pytest.param("True", 0.0, Signal.ALIVE, id="Ready True: alive"),
        pytest.param("False", 0.0, Signal.STALE, id="Ready False: stale"),
        pytest.param("Unknown", 0.0, Signal.STALE, id="Ready Unknown: stale"),
        pytest.param(None, 0.0, Signal.UNKNOWN, id="no Ready condition seen: unknown"),
        pytest.param("False", None, Signal.UNKNOWN, id="API down: unknown"),
    ],
)
def test_ready_signal(ready: str | None, api: float | None, signal: Signal) -> None:
    sig = signals_of(obs(ready=ready), SourceHealth(0.0, api), NOW, CFG)
    assert sig.ready is signal


@pytest.mark.parametrize(
    ("unreachable", "broker", "signal"),
    [
        pytest.param(True, 0.0, Signal.STALE, id="a quorum of peers cannot reach it: stale"),
        pytest.param(False, 0.0, Signal.ALIVE, id="peers reach it: alive"),
        pytest.param(None, 0.0, Signal.UNKNOWN, id="no peer reports: unknown"),
        pytest.param(True, None, Signal.UNKNOWN, id="broker down: peer reports are blind too"),
    ],
)
def test_peers_signal(unreachable: bool | None, broker: float | None, signal: Signal) -> None:
    sig = signals_of(obs(peers_unreachable=unreachable), SourceHealth(broker, 0.0), NOW, CFG)
    assert sig.peers is signal


def test_losing_both_connections_makes_every_signal_unknown() -> None:
    o = obs(
        last_heartbeat_at=1.0,
        agent_offline=True,
        lease_seen=True,
        lease_renewed_at=1.0,
        ready="Unknown",
        peers_unreachable=True,
    )
    sig = signals_of(o, SourceHealth(None, None), NOW, CFG)
    assert (sig.heartbeat, sig.lease, sig.ready, sig.peers) == (Signal.UNKNOWN,) * 4
    assert sig.heartbeat_age_s is None


@pytest.mark.parametrize(
    ("last", "known_since", "signal", "age"),
    [
        pytest.param(None, 998.0, Signal.ALIVE, 2.0, id="node listed 2 s ago, no heartbeat yet"),
        pytest.param(None, 996.0, Signal.STALE, 4.0, id="listed 4 s ago and silent since: stale"),
        pytest.param(None, None, Signal.STALE, 1000.0, id="unknown listing time: broker counts"),
        pytest.param(999.0, 10.0, Signal.ALIVE, 1.0, id="known long ago: its heartbeat counts"),
        pytest.param(990.0, 998.5, Signal.ALIVE, 1.5, id="listed after its last heartbeat"),
    ],
)
def test_silence_before_a_node_was_known_is_not_counted(
    last: float | None, known_since: float | None, signal: Signal, age: float
) -> None:
    """At a takeover the last pages of a large Node list arrive after the broker connection;
    heartbeats of nodes not listed yet were rejected as unknown, not missed."""
    got = heartbeat_signal(
        obs(last_heartbeat_at=last, known_since=known_since), SourceHealth(0.0, 0.0), NOW, CFG
    )
    assert got == (signal, pytest.approx(age))
