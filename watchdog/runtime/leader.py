"""Leader election on a coordination.k8s.io Lease (the client-go algorithm, in asyncio).

Expiry is judged on *our* monotonic clock from when we last saw the record change, never by
comparing the holder's renewTime with our wall clock (the two machines' clocks may disagree).

Why two leaders do not start actions at once: a standby takes over only once the record has
not changed for `lease_duration_s` since it saw it change, stamped after the read that showed
it, so no earlier than the leader's renewal was committed, which is after the leader *started*
that attempt. The leader counts its `renew_deadline_s` from that start (`valid_until`),
cancels any attempt still running at that instant (a hung API server cannot hold it past its
deadline) and, through `holds_lease()`, starts no action past it even if this loop has not run
yet. `LeaderSettings` requires `lease_duration_s` to exceed `renew_deadline_s` by a margin for
the drift between the two machines' clock rates and the scheduling of this loop. An action
already started is not cut short: its own retries may outlast the deadline.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from datetime import UTC, datetime
from typing import Protocol

from watchdog.actuate.lease_lock import LeaseRecord
from watchdog.transport.kube_errors import KubeError

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
        # Start of the last successful attempt + renew_deadline_s: we lead until then at most.
        self.valid_until = 0.0
        self.leader_changed = asyncio.Event()
        self._last_problem: str | None = None
        # The on_change handlers, run one after another but never in this loop: becoming
        # leader waits for the caches to sync, and renewals must go on meanwhile (or a long
        # sync would outlast the renew deadline and step the new leader down at once).
        self._transition: asyncio.Future[None] | None = None
        self._pending: set[asyncio.Future[None]] = set()

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
        previous, result = self._transition, self._on_change(value)
        if result is not None:
            self._transition = asyncio.ensure_future(_after(previous, result))
            self._pending.add(self._transition)
            self._transition.add_done_callback(self._pending.discard)

    def _raise_failed_transition(self) -> None:
        # A handler that failed (e.g. the caches never synced) ends the election as it did
        # when the handler ran inline: the process exits rather than lead half-way.
        t = self._transition
        if t is not None and t.done() and not t.cancelled() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]

    async def wait_transitions(self) -> None:
        """Until the on_change handlers started so far have run (for tests and shutdown)."""
        if self._transition is not None:
            await asyncio.shield(self._transition)

    async def try_acquire_or_renew(self) -> bool:
        wall = datetime.now(UTC)
        try:
            current = await self.lock.get()
        except KubeError as e:  # API trouble: we cannot prove we are leader
            # Only the API's errors: anything else is a bug, which must not pass for an outage.
            self._report("read", e)
            return False
        # After the read: the record it returned was written no later than now. Read before
        # it, a slow read would date the leader's renewal too early and shorten our wait.
        now = self._clock()
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
        except KubeError as e:
            self._report("write", e)
            return False

    def holds_lease(self) -> bool:
        """Leader, and still within the renew deadline of the last renewal that succeeded."""
        return self.is_leader and self._clock() < self.valid_until

    def lease_left_s(self) -> float:
        """Seconds until that renew deadline (0 when not leading): how long a write may wait."""
        return max(0.0, self.valid_until - self._clock()) if self.is_leader else 0.0

    async def attempt(self) -> bool:
        """One acquire-or-renew, bounded: a leader's attempt ends at its deadline, a
        candidate's after `renew_deadline_s` (a hung request must not stall the campaign)."""
        started = self._clock()
        budget = self.valid_until - started if self.is_leader else self.renew_deadline_s
        ok = False
        if budget > 0:
            try:
                ok = await asyncio.wait_for(self.try_acquire_or_renew(), timeout=budget)
            except TimeoutError:
                self._report("attempt", TimeoutError(f"no answer within {budget:.1f}s"))
        if ok and self.is_leader and self._clock() >= self.valid_until:
            # Renewed, but only after our deadline (a starved loop): we had stopped acting
            # meanwhile, and evaluations made then were dropped. Lose it and take it over
            # afresh, through the takeover that resumes every node.
            ok = False
        if ok:
            self._last_problem = None
            # The write committed after `started`: a standby's lease_duration_s counts from
            # no earlier than that.
            self.valid_until = started + self.renew_deadline_s
            await self._set_leader(True)
        elif self.is_leader and self._clock() >= self.valid_until:
            await self._set_leader(False)
        return ok

    async def run(self) -> None:
        """Campaign, lead, step down on renewal failure, campaign again: until cancelled."""
        try:
            while True:
                await self.attempt()
                self._raise_failed_transition()
                pause = self.retry_period_s
                if self.is_leader:
                    # Wake at the deadline to step down on time, even between attempts.
                    pause = max(0.0, min(pause, self.valid_until - self._clock()))
                await asyncio.sleep(pause)
        finally:
            for transition in list(self._pending):
                transition.cancel()

    async def release(self) -> None:
        """On clean shutdown: hand the Lease over at once instead of letting it expire."""
        if not self.is_leader:
            return
        self.is_leader = False
        try:
            await self.lock.release(self.identity)
        except KubeError as e:
            log.info("leader lease release failed: %s", e)


async def _after(previous: asyncio.Future[None] | None, handler: Awaitable[None]) -> None:
    try:
        await _run_after(previous, handler)
    finally:
        if isinstance(handler, Coroutine):
            handler.close()  # never started (cancelled or a failure before it): no warning


async def _run_after(previous: asyncio.Future[None] | None, handler: Awaitable[None]) -> None:
    """Run `handler` once `previous` has ended: a step-down never overtakes the takeover it
    follows (whose cache sync may still be running), so the last state wins."""
    if previous is not None:
        # Waits without taking on `previous`'s outcome, while our own cancellation still
        # cancels us (awaiting it directly could not tell its cancellation from ours).
        await asyncio.wait({previous})
        if not previous.cancelled() and previous.exception() is not None:
            # Carried on, so the election loop, which raises the latest transition's failure
            # (_raise_failed_transition), never misses it.
            raise previous.exception()  # type: ignore[misc]
    await handler
