"""The controller's side of re-arming a quiet node's wake-up (decide/quiet.py,
`Controller.rearm`): a healthy node heard since its decision is moved on without a decision;
a node that went silent, went offline, or whose connections changed is decided in full, and
so is every wake-up once the cluster-wide holds are a second old.

The real `Controller` and `decide`, a manual clock, the in-memory cluster of
test_controller_fence_hook.py.
"""

from __future__ import annotations

from watchdog.decide.config import DecideConfig
from watchdog.decide.heartbeats import Heartbeat, HeartbeatBook
from watchdog.decide.observations import FenceDeclaration
from watchdog.decide.state import Phase
from watchdog.runtime.controller import HOLDS_REREAD_S, Controller

from .test_controller_fence_hook import Clock, Cluster, leading_self_fence_controller

NODE = "n2"
ARMED = FenceDeclaration(armed=True, after_s=8.0, bound_s=5.0, device=True, watchdog_s=5.0)
CFG = DecideConfig()


def leading() -> tuple[Controller, Clock, HeartbeatBook, Cluster]:
    return leading_self_fence_controller()


def beat(book: HeartbeatBook, seq: int, at: float) -> None:
    book.accept(Heartbeat(NODE, "boot-1", seq, 0.0, "1", ARMED), at)


async def test_a_quiet_node_heard_since_its_decision_is_moved_on_without_a_decision() -> None:
    c, clock, book, cluster = leading()
    cluster.lease_at = clock.now
    beat(book, 1, clock.now)
    wake = await c.evaluate(NODE)
    assert c.states[NODE].phase is Phase.HEALTHY and wake == clock.now + CFG.suspect_after_s
    for seq in range(2, 4):  # one heartbeat a second until the wake-up
        clock.now += 1.0
        beat(book, seq, clock.now)
    clock.now = wake - 0.5  # (the scheduler's pass may come a little late or early)
    c.holds(now=clock.now)  # another node's decision read the holds just now
    assert c.rearm(NODE) == clock.now - 0.5 + CFG.suspect_after_s, "from the newest heartbeat"
    # Its heartbeat-age gauge still moves.
    age = c.metrics.heartbeat_age.labels(node=NODE)._value.get()
    assert age == 0.5


async def test_a_node_that_went_silent_or_offline_is_decided_in_full_and_found_suspect() -> None:
    c, clock, book, cluster = leading()
    cluster.lease_at = clock.now
    beat(book, 1, clock.now)
    wake = await c.evaluate(NODE)
    assert wake is not None
    clock.now = wake  # no heartbeat since: stale now
    c.holds(now=clock.now)
    assert c.rearm(NODE) is None
    await c.evaluate(NODE)
    assert c.states[NODE].phase is Phase.SUSPECT  # the refusal is what detection rests on

    c, clock, book, cluster = leading()
    cluster.lease_at = clock.now
    beat(book, 1, clock.now)
    await c.evaluate(NODE)
    clock.now += 1.0
    book.status(NODE, False, clock.now)  # its Will
    c.holds(now=clock.now)
    assert c.rearm(NODE) is None


async def test_changed_connections_old_holds_or_a_standby_mean_a_full_decision() -> None:
    c, clock, book, cluster = leading()
    cluster.lease_at = clock.now
    beat(book, 1, clock.now)
    await c.evaluate(NODE)
    clock.now += 1.0
    beat(book, 2, clock.now)
    c.holds(now=clock.now)
    assert c.rearm(NODE) is not None
    clock.now += HOLDS_REREAD_S  # nobody read the holds for a second: this one does
    assert c.rearm(NODE) is None
    c.holds(now=clock.now)
    c.broker_connection(False)
    c.broker_connection(True)  # reconnected: every age counts from now (benefit of the doubt)
    assert c.rearm(NODE) is None
    await c.evaluate(NODE)
    assert c.rearm(NODE) is not None
    c.step_down()
    assert c.rearm(NODE) is None, "a standby decides nothing, and re-arms nothing"
