"""When each node is evaluated: on change, or at the `wake_at` its last decision asked for.

Work is proportional to what changed: a heartbeat marks one node dirty; a timer wakes one node.
Each node is evaluated by at most one worker at a time (sequential per node), and many nodes
concurrently up to a bound. Marks coalesce: ten heartbeats of one node while its worker is busy
cause one more evaluation, not ten.

An evaluation that decides without acting (a healthy node's wake-up: nearly all of them) is
finished when `evaluate` returns its `wake_at`: it runs inline, with no task. One that acts
returns an awaitable instead; that runs as a task of its own, the node busy until it ends.

A wake-up that is due is first offered to `rearm`: a node whose decision would only move its
wake-up later (a quiet HEALTHY node with newer heartbeats: decide/quiet.py) gets that later
wake-up without an evaluation. A node marked meanwhile, or busy, is evaluated as before.
"""

from __future__ import annotations

import asyncio
import heapq
import inspect
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

# Inline evaluations in a row before the scheduler yields to the event loop: a burst of marks
# (every node after a reconnection) must not keep heartbeats waiting for all of them.
INLINE_BATCH = 64

Evaluate = Callable[[str], "float | Awaitable[float | None] | None"]
# A due wake-up's next time without an evaluation, or None: evaluate it.
Rearm = Callable[[str], "float | None"]


class NodeScheduler:
    def __init__(
        self,
        evaluate: Evaluate,
        clock: Callable[[], float],
        *,
        concurrency: int = 64,
        retry_after_failure_s: float = 2.0,
        rearm: Rearm | None = None,
    ) -> None:
        self._retry_after_failure_s = retry_after_failure_s
        self._evaluate = evaluate
        self._rearm = rearm
        self._clock = clock
        self._dirty: dict[str, None] = {}  # insertion-ordered set
        self._busy: set[str] = set()
        self._timers: list[tuple[float, str]] = []
        self._wake_at: dict[str, float] = {}
        self._kick = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self.evaluations = 0
        self.rearms = 0

    def mark(self, node: str) -> None:
        self._dirty[node] = None
        self._kick.set()

    def mark_all(self, nodes: list[str]) -> None:
        for n in nodes:
            self._dirty[n] = None
        self._kick.set()

    def forget(self, node: str) -> None:
        self._dirty.pop(node, None)
        self._wake_at.pop(node, None)

    def _schedule(self, node: str, at: float | None) -> None:
        if at is None:
            self._wake_at.pop(node, None)
            return
        self._wake_at[node] = at
        heapq.heappush(self._timers, (at, node))

    def statistics(self) -> dict[str, int]:
        return {
            "dirty": len(self._dirty),
            "busy": len(self._busy),
            "timers": len(self._wake_at),
            "evaluations": self.evaluations,
            "rearms": self.rearms,
        }

    def _due(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            at, node = heapq.heappop(self._timers)
            if self._wake_at.get(node) == at:  # stale heap entries are skipped lazily
                del self._wake_at[node]
                if node not in self._dirty and node not in self._busy:
                    later = self._rearmed(node, now)
                    if later is not None:
                        self._schedule(node, later)
                        continue
                self._dirty[node] = None

    def _rearmed(self, node: str, now: float) -> float | None:
        if self._rearm is None:
            return None
        try:
            later = self._rearm(node)
        except Exception:
            log.exception("re-arming the wake-up of node %s failed; evaluating it", node)
            return None
        if later is None or later <= now:
            return None  # never a wake-up that is due already: that would never end
        self.rearms += 1
        return later

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as tg:
            while True:
                self._due(self._clock())
                ready = [n for n in self._dirty if n not in self._busy]
                inline = 0
                for node in ready:
                    if node not in self._dirty:
                        continue  # forgotten (its Node deleted) while we yielded
                    del self._dirty[node]
                    # A slot before deciding: when every slot is taken by actions that hang
                    # (a frozen API server), a node waits here undecided, so the actions it
                    # gets are decided on what is true when they can start, not before.
                    await self._slots.acquire()
                    pending = self._start(node)
                    if pending is not None:
                        self._busy.add(node)
                        tg.create_task(self._work(node, pending), name=f"evaluate:{node}")
                    else:
                        self._slots.release()
                        inline += 1
                        if inline % INLINE_BATCH == 0:
                            await asyncio.sleep(0)
                self._kick.clear()
                if self._dirty.keys() - self._busy:
                    continue  # marked while we yielded
                timer = None
                if self._timers:
                    # A timer handle, not wait_for: that would make a task per wait.
                    timer = loop.call_later(self._until_next(), self._kick.set)
                await self._kick.wait()
                if timer is not None:
                    timer.cancel()

    def _until_next(self) -> float:
        return max(0.0, self._timers[0][0] - self._clock())

    def _start(self, node: str) -> Awaitable[float | None] | None:
        """Evaluates `node`; None when that is done (its wake-up scheduled), else what is left
        to await (its actions)."""
        try:
            result = self._evaluate(node)
        except Exception:
            self._failed(node)
            return None
        if inspect.isawaitable(result):
            return result
        self.evaluations += 1
        self._schedule(node, result)
        return None

    def _failed(self, node: str) -> None:
        # One node's failure must not stop the others; look again soon.
        log.exception(
            "evaluation of node %s failed; retrying in %gs", node, self._retry_after_failure_s
        )
        self._schedule(node, self._clock() + self._retry_after_failure_s)

    async def _work(self, node: str, pending: Awaitable[float | None]) -> None:
        try:
            wake = await pending
            self.evaluations += 1
            self._schedule(node, wake)
        except asyncio.CancelledError:
            raise
        except Exception:
            self._failed(node)
        finally:
            self._busy.discard(node)
            self._slots.release()
            # The loop may be waiting on a later timer, or on a mark made while we were busy.
            self._kick.set()
