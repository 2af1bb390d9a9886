"""Leader election on a coordination.k8s.io Lease (the client-go algorithm, in asyncio).

Expiry is judged on *our* monotonic clock from when we last saw the record change, never by
comparing the holder's renewTime with our wall clock (the two machines' clocks may disagree).
The leader steps down when it could not renew within `renew_deadline_s`; a standby takes over
once the record has not changed for `lease_duration_s`. Since renew_deadline < lease_duration,
the old leader stops acting before anyone else may start.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Protocol

from watchdog.actuate.lease_lock import LeaseRecord

log = logging.getLogger(__name__)


class LeaseLock(Protocol):
    async def get(self) -> LeaseRecord | None: ...
    async def create(self, record: LeaseRecord) -> bool: ...
    async def update(self, record: LeaseRecord, resource_version: str) -> bool: ...
    async def release(self, identity: str) -> bool: ...


class LeaderElector:
    def __init__(
        self,
        lock: LeaseLock,
        identity: str,
        *,
        lease_duration_s: float,
        renew_deadline_s: float,
        retry_period_s: float,
        on_change: Callable[[bool], Awaitable[None] | None],
        clock: Callable[[], float],
    ) -> None:
        self.lock = lock
        self.identity = identity
        self.lease_duration_s = lease_duration_s
        self.renew_deadline_s = renew_deadline_s
        self.retry_period_s = retry_period_s
        self._on_change = on_change
        self._clock = clock
        self.is_leader = False
        self._observed: tuple[str | None, datetime | None, str | None] | None = None
        self._observed_at = 0.0
        self._last_renew = 0.0
        self.leader_changed = asyncio.Event()
        self._last_problem: str | None = None

    def _report(self, what: str, e: Exception) -> None:
        # Once per distinct problem at WARNING, repeats at DEBUG: retries every second.
        text = f"leader lease {what} failed: {e}"
        if text != self._last_problem:
            self._last_problem = text
            log.warning("%s (retrying every %.1fs)", text, self.retry_period_s)
        else:
            log.debug("%s", text)

    async def _set_leader(self, value: bool) -> None:
        if value == self.is_leader:
            return
        self.is_leader = value
        log.warning("%s leadership: %s", "acquired" if value else "lost", self.identity)
        self.leader_changed.set()
        result = self._on_change(value)
        if result is not None:
            await result

    async def try_acquire_or_renew(self) -> bool:
        now = self._clock()
        wall = datetime.now(UTC)
        try:
            current = await self.lock.get()
        except Exception as e:  # API trouble: we cannot prove we are leader
            self._report("read", e)
            return False
        duration = max(1, round(self.lease_duration_s))
        if current is None:
            record = LeaseRecord(self.identity, duration, wall, wall, 0)
            return await self._write(self.lock.create(record))
        seen = (current.holder_identity, current.renew_time, current.resource_version)
        if seen != self._observed:
            self._observed = seen
            self._observed_at = now
        mine = current.holder_identity == self.identity
        held_by_other = current.holder_identity not in (None, "") and not mine
        if held_by_other and now - self._observed_at < self.lease_duration_s:
            return False
        record = replace(
            current,
            holder_identity=self.identity,
            lease_duration_s=duration,
            acquire_time=current.acquire_time if mine else wall,
            renew_time=wall,
            lease_transitions=current.lease_transitions + (0 if mine else 1),
        )
        return await self._write(self.lock.update(record, current.resource_version or ""))

    async def _write(self, op: Awaitable[bool]) -> bool:
        try:
            return await op
        except Exception as e:
            self._report("write", e)
            return False

    async def run(self) -> None:
        """Campaign, lead, step down on renewal failure, campaign again: until cancelled."""
        while True:
            ok = await self.try_acquire_or_renew()
            now = self._clock()
            if ok:
                self._last_problem = None
                self._last_renew = now
                await self._set_leader(True)
            elif self.is_leader and now - self._last_renew >= self.renew_deadline_s:
                await self._set_leader(False)
            await asyncio.sleep(self.retry_period_s)

    async def release(self) -> None:
        """On clean shutdown: hand the Lease over at once instead of letting it expire."""
        if not self.is_leader:
            return
        self.is_leader = False
        try:
            await self.lock.release(self.identity)
        except Exception as e:
            log.info("leader lease release failed: %s", e)
