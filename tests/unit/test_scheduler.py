"""NodeScheduler: evaluations that only decide run inline; one that acts keeps its node busy
while the others go on; wake-ups come at the time asked; a burst yields to the event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager

from tests.eventually import eventually
from watchdog.runtime.scheduler import INLINE_BATCH, NodeScheduler


@asynccontextmanager
async def running(scheduler: NodeScheduler) -> AsyncIterator[None]:
    task = asyncio.create_task(scheduler.run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_node_acting_stays_busy_while_others_are_decided_and_a_mark_meanwhile_counts_once():
    calls: list[str] = []
    release = asyncio.Event()

    async def act() -> float | None:
        await release.wait()  # an API call that takes its time
        return None

    def evaluate(node: str) -> float | Awaitable[float | None] | None:
        calls.append(node)
        if node == "slow" and calls.count("slow") == 1:
            return act()
        return None

    s = NodeScheduler(evaluate, time.monotonic)
    async with running(s):
        s.mark("slow")
        await eventually(lambda: calls == ["slow"])
        for _ in range(5):
            s.mark("slow")  # heartbeats while its actions run: one more evaluation, later
        s.mark("quick")
        await eventually(lambda: "quick" in calls)
        assert calls.count("slow") == 1, "never two evaluations of one node at once"
        release.set()
        await eventually(lambda: calls.count("slow") == 2)
        await asyncio.sleep(0.05)
    assert calls.count("slow") == 2, "the marks made while busy coalesced into one"
    assert s.evaluations == 3


async def test_each_node_is_woken_at_the_time_its_evaluation_asked_for():
    woken: dict[str, list[float]] = {"a": [], "b": []}
    delays = {"a": 0.05, "b": 0.15}

    def evaluate(node: str) -> float | None:
        now = time.monotonic()
        woken[node].append(now)
        return now + delays[node] if len(woken[node]) < 2 else None

    s = NodeScheduler(evaluate, time.monotonic)
    async with running(s):
        s.mark_all(["a", "b"])
        await eventually(lambda: len(woken["a"]) == 2 and len(woken["b"]) == 2)
        await asyncio.sleep(0.2)
    for node, delay in delays.items():
        first, second = woken[node]
        assert second - first >= delay - 0.005, f"{node} woken early"
    assert len(woken["a"]) == len(woken["b"]) == 2, "no wake-up that was not asked for"


async def test_a_failing_evaluation_is_retried_and_does_not_stop_the_others():
    calls: list[str] = []

    def evaluate(node: str) -> float | None:
        calls.append(node)
        if node == "bad" and calls.count("bad") == 1:
            raise KeyError("a bug")
        return None

    s = NodeScheduler(evaluate, time.monotonic, retry_after_failure_s=0.05)
    async with running(s):
        s.mark_all(["bad", "good"])
        await eventually(lambda: calls.count("bad") == 2)
    assert "good" in calls


async def test_a_burst_of_inline_evaluations_yields_to_the_event_loop():
    """Every node marked at once (a reconnection): what arrives meanwhile (a heartbeat read)
    is not kept waiting for all of them."""
    n = INLINE_BATCH * 10
    done = 0
    seen_at: list[int] = []

    def evaluate(node: str) -> None:
        nonlocal done
        done += 1

    s = NodeScheduler(evaluate, time.monotonic)
    async with running(s):
        s.mark_all([f"node-{i}" for i in range(n)])
        asyncio.get_running_loop().call_soon(lambda: seen_at.append(done))
        await eventually(lambda: done == n)
    assert seen_at and seen_at[0] < n, "the callback ran before the burst was over"


async def test_a_node_forgotten_during_a_pass_is_skipped_and_the_scheduler_carries_on():
    """Its Node deleted while the scheduler works through a burst (it yields every 64)."""
    calls: list[str] = []
    nodes = [f"node-{i}" for i in range(3 * INLINE_BATCH)]

    def evaluate(node: str) -> None:
        calls.append(node)
        if node == nodes[0]:
            s.forget(nodes[-1])  # what the Node informer's delete does, mid-pass

    s = NodeScheduler(evaluate, time.monotonic)
    async with running(s):
        s.mark_all(nodes)
        await eventually(lambda: len(calls) == len(nodes) - 1)
        s.mark("late")
        await eventually(lambda: "late" in calls)
    assert nodes[-1] not in calls


async def test_a_wake_up_asked_for_by_an_evaluation_that_acted_comes_on_time():
    """No other timer pending and nothing marked: the loop must still learn of it."""
    calls: list[float] = []

    async def act() -> float:
        return time.monotonic() + 0.05

    def evaluate(node: str) -> float | Awaitable[float | None] | None:
        calls.append(time.monotonic())
        return act() if len(calls) == 1 else None

    s = NodeScheduler(evaluate, time.monotonic)
    async with running(s):
        s.mark("n")
        await eventually(lambda: len(calls) == 2, timeout_s=2.0)
    assert calls[1] - calls[0] >= 0.05


async def test_a_due_wake_up_that_rearm_moves_on_is_not_evaluated_and_comes_again_when_asked():
    """A quiet node (decide/quiet.py): its wake-up is moved on twice without an evaluation,
    then `rearm` refuses (its heartbeat would be stale) and it is evaluated at that time."""
    calls: list[float] = []
    rearmed: list[float] = []

    def evaluate(node: str) -> float | None:
        calls.append(time.monotonic())
        return time.monotonic() + 0.03 if len(calls) == 1 else None

    def rearm(node: str) -> float | None:
        rearmed.append(time.monotonic())
        return time.monotonic() + 0.03 if len(rearmed) < 3 else None

    s = NodeScheduler(evaluate, time.monotonic, rearm=rearm)
    async with running(s):
        s.mark("n")
        await eventually(lambda: len(calls) == 2, timeout_s=2.0)
    assert len(rearmed) == 3 and s.rearms == 2
    assert calls[1] - calls[0] >= 3 * 0.03 - 0.005, "evaluated only when rearm refused"
    assert s.evaluations == 2


async def test_a_node_marked_before_its_wake_up_is_evaluated_not_rearmed():
    """News about a node (its Node, Lease, a status message) always means a whole decision."""
    calls: list[str] = []
    rearmed: list[str] = []
    now = [100.0]

    def evaluate(node: str) -> float | None:
        calls.append(node)
        return now[0] + 1.0 if len(calls) == 1 else None

    def rearm(node: str) -> float | None:
        rearmed.append(node)
        return now[0] + 1.0

    s = NodeScheduler(evaluate, lambda: now[0], rearm=rearm)
    async with running(s):
        s.mark("n")
        await eventually(lambda: len(calls) == 1)
        now[0] += 2.0
        s.mark("n")  # marked, and its wake-up is due in the same pass
        await eventually(lambda: len(calls) == 2)
    assert rearmed == [], "a marked node's due wake-up is not re-armed"


async def test_a_rearm_that_fails_or_asks_for_a_time_already_past_means_an_evaluation():
    """Never a wake-up that is due again at once (the loop would spin), never one lost."""
    calls: list[str] = []
    now = [100.0]

    def evaluate(node: str) -> float | None:
        calls.append(node)
        return now[0] + 1.0 if len(calls) <= 2 else None

    answers: list[float | Exception] = [now[0], RuntimeError("broken")]

    def rearm(node: str) -> float | None:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    s = NodeScheduler(evaluate, lambda: now[0], rearm=rearm)
    async with running(s):
        s.mark("n")
        await eventually(lambda: len(calls) == 1)
        now[0] += 1.5  # its wake-up is due; rearm answers a time already past
        s._kick.set()
        await eventually(lambda: len(calls) == 2)
        now[0] += 1.5  # due again; rearm raises
        s._kick.set()
        await eventually(lambda: len(calls) == 3)
    assert s.rearms == 0 and answers == []
