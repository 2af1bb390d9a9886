"""The backlog of Events whose write failed: each is written again when due, only while this
replica leads, waits double up to their bound, and none waits without end or bound."""

from __future__ import annotations

import pytest

from watchdog.actuate.event_backlog import EventBacklog, UnwrittenEvent
from watchdog.actuate.events import ObjectRef

pytestmark = pytest.mark.asyncio


class Api:
    """What the API server answers each write: False (refused) until `accepting`."""

    def __init__(self) -> None:
        self.accepting = False
        self.attempts: list[tuple[float, str]] = []
        self.written: list[UnwrittenEvent] = []
        self.now = 0.0

    async def write(self, event: UnwrittenEvent) -> bool:
        self.attempts.append((self.now, event.reason))
        if self.accepting:
            self.written.append(event)
        return self.accepting

    def clock(self) -> float:
        return self.now


def event(reason: str) -> UnwrittenEvent:
    return UnwrittenEvent(ObjectRef.node("n1"), "Normal", reason, "m", "2026-12-04T20:00:00Z")


async def test_a_refused_event_is_tried_again_with_doubling_waits_until_it_is_written() -> None:
    api = Api()
    backlog = EventBacklog(api.write, clock=api.clock, first_retry_s=2.0, max_retry_s=8.0)
    backlog.add(event("NodeFenced"))
    for t in range(0, 30):
        api.now = float(t)
        await backlog.retry_due(lambda: True)
    assert [t for t, _ in api.attempts] == [2.0, 6.0, 14.0, 22.0]  # 2, 4, 8, then the bound
    api.accepting = True
    api.now = 30.0
    await backlog.retry_due(lambda: True)
    assert api.written == [event("NodeFenced")] and len(backlog) == 0
    assert api.written[0].stamp == "2026-12-04T20:00:00Z"  # when it happened


async def test_a_standby_writes_nothing_and_the_same_event_waits_once() -> None:
    api = Api()
    api.accepting = True
    backlog = EventBacklog(api.write, clock=api.clock)
    backlog.add(event("NodeFenced"))
    backlog.add(event("NodeFenced"))
    api.now = 100.0
    assert await backlog.retry_due(lambda: False) == 2.0  # not in a loop: again 2 s later
    assert api.attempts == [] and len(backlog) == 1
    api.now = 102.0
    await backlog.retry_due(lambda: True)
    assert len(api.written) == 1


async def test_none_waits_without_bound_in_time_or_number() -> None:
    api = Api()
    backlog = EventBacklog(api.write, clock=api.clock, give_up_s=60.0, max_items=3)
    for reason in ("a", "b", "c", "d"):
        backlog.add(event(reason))
    assert len(backlog) == 3 and backlog.given_up == 1  # the oldest ("a") went first
    api.now = 61.0
    assert await backlog.retry_due(lambda: True) is None
    assert len(backlog) == 0 and backlog.given_up == 4
    assert [r for _, r in api.attempts] == []  # given up before a late write
