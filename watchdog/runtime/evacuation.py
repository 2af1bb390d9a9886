"""Evacuation of degraded-but-alive nodes by live migration (DESIGN §6).

A DEGRADED node's agent still heartbeats: its VMs are alive and must never be reset. This
module moves what can move, within KubeVirt's limits, follows each migration, reports what
cannot move or does not finish within the policy's `vmMigrationTimeout`, and gives up on a VMI
after `MAX_ATTEMPTS` failed migrations instead of retrying forever. What to do at each look is
decided by the pure `decide.evacuation.evacuation_step` (which VMIs, in what order, which
reports, finished or timed out) and `migration_ended` (a failed migration counts an attempt);
this module reads the cache and the clock, carries out the step's effects (migrations, Events,
metrics, logs) and keeps each node's `EvacuationState`.

Every migration it creates is reported on its VMI (Event `EvacuationMigrating`, and the log)
with the KubeVirt `MigrationPolicy` that applies to it (`decide.evacuation.select_policy`, from
the VMI's and its namespace's labels) and what that policy overrides, so an operator reading a
slow or failed migration sees at once which timeout, bandwidth and post-copy settings it ran
under. KubeVirt's own record of the applied policy (the VMI's
`status.migrationState.migrationPolicyName`) stays the authority once the migration runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from watchdog.actuate.actuator import Actuator
from watchdog.actuate.outcome import Result
from watchdog.decide.actions import EmitEvent, EventType, StartEvacuation, StopEvacuation
from watchdog.decide.evacuation import (
    EvacuationEvent,
    EvacuationState,
    describe_policy,
    evacuation_step,
    evacuation_wake_at,
    migration_ended,
    migration_result,
)
from watchdog.decide.reasons import Reason
from watchdog.metrics import Metrics
from watchdog.observe.cluster_cache import ClusterCache
from watchdog.observe.records import MigrationRecord

log = logging.getLogger(__name__)


class Evacuations:
    def __init__(
        self,
        cache: ClusterCache,
        actuator: Actuator,
        metrics: Metrics,
        clock: Callable[[], float],
        timeout_s: Callable[[], float],
    ) -> None:
        self.cache = cache
        self.actuator = actuator
        self.metrics = metrics
        self.clock = clock
        self.timeout_s = timeout_s
        self.active: dict[str, EvacuationState] = {}
        # Ticks come from the decision worker (start) and from the evacuation loop (events):
        # two at once would both plan from the same cache and start the same VMI twice.
        self._lock = asyncio.Lock()
        self._migration_started: dict[str, float] = {}  # "ns/name" → first seen unfinished
        # node → when its evacuation needs a look for time alone (decide/evacuation.py,
        # `evacuation_wake_at`); the evacuation loop sleeps until the earliest.
        self.wake_at: dict[str, float] = {}

    async def start(self, action: StartEvacuation) -> str:
        if action.node not in self.active:
            self.active[action.node] = EvacuationState(action.node, self.clock())
            log.warning("evacuating degraded node %s by live migration", action.node)
        await self.tick(action.node)
        return "success"

    async def stop(self, action: StopEvacuation) -> str:
        async with self._lock:
            ev = self.active.pop(action.node, None)
            self.wake_at.pop(action.node, None)
            outcome = await self.actuator.execute(action)
        if ev is not None and not ev.finished:
            log.info("evacuation of %s stopped (node healthy again or down for real)", action.node)
        return outcome.result.value

    async def _event(self, node: str, event: str, message: str, warning: bool = False) -> None:
        kind = EventType.WARNING if warning else EventType.NORMAL
        await self.actuator.execute(EmitEvent(node, event, Reason.KUBELET_PATH_LOST, message, kind))

    async def _report(self, node: str, event: EvacuationEvent) -> None:
        if event.result is not None:
            self.metrics.migrations.labels(result=event.result).inc()
        await self._event(node, event.event, event.message, warning=event.warning)

    async def _vmi_event(self, namespace: str, name: str, event: str, message: str) -> None:
        vmi = self.cache.vmi(namespace, name)
        await self.actuator.events.emit_vmi_event(
            namespace, name, event, message, uid=vmi.uid if vmi is not None else ""
        )

    def _policy(self, namespace: str, name: str) -> str:
        vmi = self.cache.vmi(namespace, name)
        return describe_policy(None if vmi is None else self.cache.migration_policy(vmi))

    def migration_changed(
        self, key: str, old: MigrationRecord | None, new: MigrationRecord | None
    ) -> str | None:
        """Count finished migrations once; returns the node whose evacuation should tick."""
        if new is None:
            self._migration_started.pop(key, None)
            return None
        if not new.final:
            self._migration_started.setdefault(key, self.clock())
            return new.node
        started = self._migration_started.pop(key, None)
        if old is not None and old.final:
            return new.node
        result = migration_result(new.phase)
        self.metrics.migrations.labels(result=result).inc()
        if started is not None:
            self.metrics.migration_duration.observe(self.clock() - started)
        node = new.node
        if node and (ev := self.active.get(node)) is not None:
            vmi = (new.namespace, new.vmi)
            self.active[node] = migration_ended(ev, vmi, result)
            if result == "failed":
                log.warning("evacuation of %s: migration %s of %s failed", node, key, vmi)
        return node

    async def tick(self, node: str) -> None:
        """Start what the limits allow now; report stuck and unmovable VMIs; finish when done."""
        async with self._lock:
            await self._tick(node)

    async def _tick(self, node: str) -> None:
        ev = self.active.get(node)
        if ev is None:
            return
        ev, effects = evacuation_step(
            ev,
            [v.evacuation() for v in self.cache.vmis_on(node)],
            self.cache.active_migrations(),
            len(self.cache.migrations_from(node)),
            self.cache.migration_limits(),
            now=self.clock(),
            timeout_s=self.timeout_s(),
        )
        # Kept before the first await: a migration that ends while the effects are carried out
        # counts its attempt on this state, and an evacuation stopped meanwhile stays stopped.
        self.active[node] = ev
        wake = evacuation_wake_at(ev, self.timeout_s())
        if wake is None:
            self.wake_at.pop(node, None)
        else:
            self.wake_at[node] = wake
        for report in effects.reports:
            await self._report(node, report)
        chosen = effects.migrate
        if chosen:
            policies = {key: self._policy(*key) for key in chosen}
            outcome = await self.actuator.execute(StartEvacuation(node), vmis=chosen)
            self.metrics.migrations.labels(result="started").inc(len(chosen))
            log.info(
                "evacuation of %s: migrating %s (%s)",
                node,
                "; ".join(f"{ns}/{name}: {policies[ns, name]}" for ns, name in chosen),
                outcome.result.value,
            )
            created = {name for name, result in outcome.items if result is Result.SUCCESS}
            for ns, name in chosen:
                if f"{ns}/{name}" in created:
                    await self._vmi_event(
                        ns,
                        name,
                        "EvacuationMigrating",
                        f"live-migrating off degraded node {node}; {policies[ns, name]}",
                    )
        if effects.end is not None:
            await self._report(node, effects.end)

    async def tick_all(self) -> None:
        for node in list(self.active):
            await self.tick(node)

    def forget_all(self) -> None:
        """This replica stopped leading: the next leader evacuates what it finds DEGRADED."""
        self.active.clear()
        self.wake_at.clear()

    def defer(self, nodes: Iterable[str], until: float) -> None:
        """The looks at `nodes` due for time alone come at `until` instead (not acting now)."""
        for node in nodes:
            if node in self.wake_at:
                self.wake_at[node] = max(self.wake_at[node], until)

    def next_wake(self) -> float | None:
        """The earliest look due for time alone (None: none; only changes wake the loop)."""
        return min(self.wake_at.values(), default=None)

    def due(self, now: float) -> set[str]:
        """The evacuations whose look for time alone is due at `now`."""
        return {node for node, at in self.wake_at.items() if at <= now}
