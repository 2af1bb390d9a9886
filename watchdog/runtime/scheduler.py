"""When each node is evaluated: on change, or at the `wake_at` its last decision asked for.

Work is proportional to what changed: a heartbeat marks one node dirty; a timer wakes one node.
Each node is evaluated by at most one worker at a time (sequential per node), and many nodes
concurrently up to a bound. Marks coalesce: ten heartbeats of one node while its worker is busy
cause one more evaluation, not ten.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class NodeScheduler:
    def __init__(
        self,
        evaluate: Callable[[str], Awaitable[float | None]],
        clock: Callable[[], float],
        *,
        concurrency: int = 64,
    ) -> None:
        self._evaluate = evaluate
        self._clock = clock
        self._dirty: dict[str, None] = {}  # insertion-ordered set
        self._busy: set[str] = set()
        self._timers: list[tuple[float, str]] = []
        self._wake_at: dict[str, float] = {}
        self._kick = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self.evaluations = 0

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
        }

    def _due(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            at, node = heapq.heappop(self._timers)
            if self._wake_at.get(node) == at:  # stale heap entries are skipped lazily
                del self._wake_at[node]
                self._dirty[node] = None

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            while True:
                self._due(self._clock())
                ready = [n for n in self._dirty if n not in self._busy]
                for node in ready:
                    del self._dirty[node]
                    self._busy.add(node)
                    await self._slots.acquire()
                    tg.create_task(self._work(node), name=f"evaluate:{node}")
                self._kick.clear()
                timeout = None
                if self._timers:
                    timeout = max(0.0, self._timers[0][0] - self._clock())
                try:
                    await asyncio.wait_for(self._kick.wait(), timeout)
                except TimeoutError:
                    pass

    async def _work(self, node: str) -> None:
        try:
            wake = await self._evaluate(node)
            self.evaluations += 1
            self._schedule(node, wake)
        except asyncio.CancelledError:
            raise
        except Exception:
            # One node's failure must not stop the others; look again soon.
            log.exception("evaluation of node %s failed; retrying in 2s", node)
            self._schedule(node, self._clock() + 2.0)
        finally:
            self._busy.discard(node)
            self._slots.release()
            if node in self._dirty:
                self._kick.set()
