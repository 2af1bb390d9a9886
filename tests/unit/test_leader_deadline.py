"""The leader's renew deadline holds even when the API server hangs.

The Lease here is an in-memory stand-in for the API server's (same optimistic-concurrency
contract as `watchdog.actuate.lease_lock.LeaseLock`, which the integration tests run against
the real API server); it can be made to hang, as a black-holed connection does. Time is the
event loop's own clock, so the bounds below are exact, not hoped for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace

import pytest

from watchdog.actuate.lease_lock import LeaseRecord
from watchdog.runtime.leader import LeaderElector
from watchdog.runtime.settings import LeaderSettings
from watchdog.transport.kube_errors import TransientError

RENEW_DEADLINE_S = 0.4
LEASE_DURATION_S = 0.6
RETRY_S = 0.05


class Store:
    """The API server's copy of one Lease, with its resourceVersion."""

    def __init__(self) -> None:
        self.record: LeaseRecord | None = None
        self.version = 0


class MemoryLease:
    """One replica's path to the Store; `hang` makes its calls block, as a black-holed
    connection does (no answer, no error)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.hang = asyncio.Event()
        self.answer_after_s = 0.0

    async def _call(self) -> None:
        if self.answer_after_s:
            await asyncio.sleep(self.answer_after_s)
        if self.hang.is_set():
            await asyncio.Event().wait()

    async def get(self) -> LeaseRecord | None:
        await self._call()
        if self.store.record is None:
            return None
        return replace(self.store.record, resource_version=str(self.store.version))

    async def create(self, record: LeaseRecord) -> bool:
        await self._call()
        if self.store.record is not None:
            return False
        self.store.record, self.store.version = record, self.store.version + 1
        return True

    async def update(self, record: LeaseRecord, resource_version: str) -> bool:
        await self._call()
        if resource_version != str(self.store.version):
            return False
        self.store.record, self.store.version = record, self.store.version + 1
        return True

    async def release(self, identity: str) -> bool:
        return True


def elector(lock: MemoryLease, name: str, changes: list[tuple[float, bool]]) -> LeaderElector:
    """An elector that records (time, leading) at every change."""
    loop = asyncio.get_running_loop()
    return elector_with(lock, name, lambda leading: changes.append((loop.time(), leading)))


def elector_with(
    lock: MemoryLease, name: str, on_change: Callable[[bool], Awaitable[None] | None]
) -> LeaderElector:
    return LeaderElector(
        lock,
        name,
        lease_duration_s=LEASE_DURATION_S,
        renew_deadline_s=RENEW_DEADLINE_S,
        retry_period_s=RETRY_S,
        on_change=on_change,
        clock=asyncio.get_running_loop().time,
    )


async def test_a_leader_whose_api_hangs_stops_acting_at_its_deadline_before_a_standby_leads():
    loop = asyncio.get_running_loop()
    store = Store()
    a_path, b_path = MemoryLease(store), MemoryLease(store)
    a_changes: list[tuple[float, bool]] = []
    b_changes: list[tuple[float, bool]] = []
    a = elector(a_path, "a", a_changes)
    b = elector(b_path, "b", b_changes)
    async with asyncio.TaskGroup() as tg:
        ta = tg.create_task(a.run())
        await a.leader_changed.wait()
        tb = tg.create_task(b.run())
        await asyncio.sleep(3 * RETRY_S)  # a renews a few times while b watches
        # Only the leader's path hangs from now on; its next renewal never answers.
        a_path.hang.set()
        cut = loop.time()
        last_valid = a.valid_until
        while not b.is_leader:
            assert not (a.holds_lease() and b.is_leader)
            await asyncio.sleep(0.005)
        ta.cancel()
        tb.cancel()
    (a_down,) = [t for t, leading in a_changes if not leading]
    (b_up,) = [t for t, leading in b_changes if leading]
    # a's hung attempt was cut at its deadline (not left to run on), and it stepped down then.
    assert a_down <= last_valid + 0.05
    assert a_down - cut <= RENEW_DEADLINE_S + 0.05
    assert not a.holds_lease()
    # b waited a full lease_duration after the last renewal it saw: strictly later.
    assert b_up > a_down
    assert b_up - a_down >= LEASE_DURATION_S - RENEW_DEADLINE_S - RETRY_S


async def test_the_deadline_counts_from_the_start_of_a_renewal_that_was_slow_to_answer():
    loop = asyncio.get_running_loop()
    lock = MemoryLease(Store())
    a = elector(lock, "a", [])
    assert await a.attempt()
    lock.answer_after_s = 0.15  # each of get and update
    started = loop.time()
    assert await a.attempt()
    answered = loop.time()
    assert answered - started >= 0.3
    # The write committed somewhere in between: only its start is a safe lower bound.
    assert a.valid_until == pytest.approx(started + RENEW_DEADLINE_S, abs=0.01)


async def test_holds_lease_is_false_past_the_deadline_even_before_the_loop_steps_down():
    loop = asyncio.get_running_loop()
    lock = MemoryLease(Store())
    a = elector(lock, "a", [])
    assert await a.attempt()
    assert a.is_leader and a.holds_lease()
    await asyncio.sleep(a.valid_until - loop.time() + 0.01)
    assert a.is_leader  # nobody ran the election loop
    assert not a.holds_lease()  # yet every write is already refused


def test_settings_refuse_a_lease_that_a_standby_could_take_before_the_leader_steps_down():
    LeaderSettings(lease_duration_s=8, renew_deadline_s=5, retry_period_s=1)
    with pytest.raises(
        ValueError, match=r"lease_duration_s 5.2 must be at least renew_deadline_s x 1.1 = 5.5"
    ):
        LeaderSettings(lease_duration_s=5.2, renew_deadline_s=5, retry_period_s=1)


async def test_a_long_takeover_does_not_stop_the_renewals_that_keep_the_lease():
    """Becoming leader waits for the caches to sync (seconds on a large cluster): meanwhile the
    election keeps renewing, so the new leader does not step down the moment it is ready."""
    lock = MemoryLease(Store())
    synced = asyncio.Event()
    ready: list[bool] = []

    async def on_change(leading: bool) -> None:
        if leading:
            await synced.wait()
        ready.append(leading)

    a = elector_with(lock, "a", on_change)
    task = asyncio.create_task(a.run())
    await a.leader_changed.wait()
    await asyncio.sleep(3 * RENEW_DEADLINE_S)  # a sync far longer than the renew deadline
    assert a.holds_lease()
    synced.set()
    await a.wait_transitions()
    assert ready == [True] and a.holds_lease()
    task.cancel()


async def test_a_takeover_that_fails_ends_the_election():

    async def on_change(leading: bool) -> None:
        raise RuntimeError("caches never synced")

    a = elector_with(MemoryLease(Store()), "a", on_change)
    with pytest.raises(RuntimeError, match="caches never synced"):
        await asyncio.wait_for(a.run(), 5)


async def test_at_shutdown_no_queued_leadership_handler_runs_after_the_election_ends():
    """A takeover still waiting (caches never synced) and the step-down queued behind it:
    ending the election cancels both; the step-down's handler never runs late."""
    path = MemoryLease(Store())
    ran: list[bool] = []

    async def on_change(leading: bool) -> None:
        if leading:
            await asyncio.Event().wait()  # a sync that never ends
        ran.append(leading)

    a = elector_with(path, "a", on_change)
    task = asyncio.create_task(a.run())
    await a.leader_changed.wait()
    a.leader_changed.clear()
    path.hang.set()  # renewals hang: it steps down at its deadline, behind the takeover
    await a.leader_changed.wait()
    assert not a.is_leader
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    assert ran == []


async def test_an_api_error_means_not_leading_but_a_bug_is_not_taken_for_an_outage():
    """The API's errors (the one error tree, transport/kube_errors.py) make an attempt fail
    and are reported; any other exception (a bug in reading the Lease) propagates instead of
    passing for API trouble, so it stops the process rather than being retried forever as an
    outage."""

    class Failing(MemoryLease):
        def __init__(self, store: Store, error: Exception) -> None:
            super().__init__(store)
            self.error = error

        async def get(self) -> LeaseRecord | None:
            raise self.error

    changes: list[tuple[float, bool]] = []
    refused = elector(Failing(Store(), TransientError("connection reset")), "a", changes)
    assert await refused.attempt() is False and not refused.is_leader
    broken = elector(Failing(Store(), KeyError("spec")), "b", changes)
    with pytest.raises(KeyError):
        await broken.attempt()
    assert not broken.is_leader and changes == []
