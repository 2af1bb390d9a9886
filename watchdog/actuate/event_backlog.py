"""Events whose write failed, written again until they land.

An Event is how an operator sees what the watchdog did (`kubectl describe node`, DESIGN §7); a
passing API error (a restart, a 429 storm, an admission webhook down) must not erase it. Owns the
backlog of Events that could not be written: each is tried again 2 s after its failure, then
after doubling waits up to 60 s, only while this replica leads, with the time it happened kept
(the Event's timestamps say when it happened, not when it was finally written). Bounded: at most
`max_items` wait (the oldest goes first) and none waits longer than `give_up_s`; each one given
up is logged with what it said.

Must not: decide which Events to emit, or retry anything but Events.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from watchdog.actuate.events import ObjectRef

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class UnwrittenEvent:
    ref: ObjectRef
    event_type: str
    reason: str
    message: str
    stamp: str  # when it happened (RFC 3339, remote-readable)


@dataclass(slots=True)
class _Entry:
    event: UnwrittenEvent
    since: float  # monotonic: when its first write failed
    due: float
    wait_s: float


class EventBacklog:
    def __init__(
        self,
        write: Callable[[UnwrittenEvent], Awaitable[bool]],
        *,
        clock: Callable[[], float] = time.monotonic,
        first_retry_s: float = 2.0,
        max_retry_s: float = 60.0,
        give_up_s: float = 900.0,
        max_items: int = 1000,
    ) -> None:
        self._write = write
        self._clock = clock
        self._first_retry_s = first_retry_s
        self._max_retry_s = max_retry_s
        self._give_up_s = give_up_s
        self._max_items = max_items
        self._entries: OrderedDict[UnwrittenEvent, _Entry] = OrderedDict()
        self._added = asyncio.Event()
        self.given_up = 0

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, event: UnwrittenEvent) -> None:
        if event in self._entries:
            return  # the same Event, failed again on a later attempt: it keeps its schedule
        now = self._clock()
        self._entries[event] = _Entry(event, now, now + self._first_retry_s, self._first_retry_s)
        while len(self._entries) > self._max_items:
            _, oldest = self._entries.popitem(last=False)
            self._give_up(oldest, "too many Events waiting")
        self._added.set()

    async def run(self, may_write: Callable[[], bool]) -> None:
        """Forever: write each waiting Event when it is due, while `may_write()` says so."""
        while True:
            wait = await self.retry_due(may_write)
            self._added.clear()
            if wait is None:
                await self._added.wait()
                continue
            try:
                async with asyncio.timeout(wait):
                    await self._added.wait()
            except TimeoutError:
                pass

    async def retry_due(self, may_write: Callable[[], bool]) -> float | None:
        """One pass; returns how long until the next Event is due (None: none waits)."""
        now = self._clock()
        for event, entry in list(self._entries.items()):
            if now - entry.since > self._give_up_s:
                del self._entries[event]
                self._give_up(entry, f"not written within {self._give_up_s:.0f}s")
                continue
            if entry.due > now:
                continue
            if not may_write():
                entry.due = now + self._first_retry_s  # a standby: look again later, not in a loop
                continue
            if await self._write(event):
                self._entries.pop(event, None)
                ref = event.ref
                log.info("Event %s on %s %s written late", event.reason, ref.kind, ref.name)
                continue
            entry.wait_s = min(entry.wait_s * 2, self._max_retry_s)
            entry.due = self._clock() + entry.wait_s
        if not self._entries:
            return None
        return max(0.05, min(e.due for e in self._entries.values()) - self._clock())

    def _give_up(self, entry: _Entry, why: str) -> None:
        self.given_up += 1
        e = entry.event
        log.warning(
            "Event %s on %s %s given up (%s): %s (at %s)",
            e.reason,
            e.ref.kind,
            e.ref.name,
            why,
            e.message,
            e.stamp,
        )


__all__ = ["EventBacklog", "UnwrittenEvent"]
