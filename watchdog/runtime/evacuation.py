"""Evacuation of degraded-but-alive nodes by live migration (DESIGN §6).

A DEGRADED node's agent still heartbeats: its VMs are alive and must never be reset. This
module moves what can move, within KubeVirt's limits (which VMIs, in what order: the pure
`decide.evacuation.plan_evacuation`), follows each migration, reports what cannot move or does
not finish within the policy's `vmMigrationTimeout`, and gives up on a VMI after
`MAX_ATTEMPTS` failed migrations instead of retrying forever.

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
from collections.abc import Callable
from dataclasses import dataclass, field

from watchdog.actuate.actuator import Actuator
from watchdog.actuate.outcome import Result
from watchdog.decide.actions import EmitEvent, EventType, StartEvacuation, StopEvacuation
from watchdog.decide.evacuation import describe_policy, plan_evacuation
from watchdog.decide.reasons import Reason
from watchdog.metrics import Metrics
from watchdog.observe.cluster_cache import ClusterCache
from watchdog.observe.records import MigrationRecord

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 2  # a VMI whose migration failed twice is reported and left running where it is


@dataclass
class NodeEvacuation:
    node: str
    started_at: float
    attempts: dict[tuple[str, str], int] = field(default_factory=dict)
    given_up: set[tuple[str, str]] = field(default_factory=set)
    reported: set[tuple[str, str]] = field(default_factory=set)
    timed_out: bool = False
    finished: bool = False


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
        self.active: dict[str, NodeEvacuation] = {}
        # Ticks come from the decision worker (start) and from the evacuation loop (events):
        # two at once would both plan from the same cache and start the same VMI twice.
        self._lock = asyncio.Lock()
        self._migration_started: dict[str, float] = {}  # "ns/name" → first seen unfinished

    async def start(self, action: StartEvacuation) -> str:
        if action.node not in self.active:
            self.active[action.node] = NodeEvacuation(action.node, self.clock())
            log.warning("evacuating degraded node %s by live migration", action.node)
        await self.tick(action.node)
        return "success"

    async def stop(self, action: StopEvacuation) -> str:
        async with self._lock:
            ev = self.active.pop(action.node, None)
            outcome = await self.actuator.execute(action)
        if ev is not None and not ev.finished:
            log.info("evacuation of %s stopped (node healthy again or down for real)", action.node)
        return outcome.result.value

    async def _event(self, node: str, event: str, message: str, warning: bool = False) -> None:
        kind = EventType.WARNING if warning else EventType.NORMAL
        await self.actuator.execute(EmitEvent(node, event, Reason.KUBELET_PATH_LOST, message, kind))

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
        result = "succeeded" if new.phase == "Succeeded" else "failed"
        self.metrics.migrations.labels(result=result).inc()
        if started is not None:
            self.metrics.migration_duration.observe(self.clock() - started)
        node = new.node
        ev = self.active.get(node) if node else None
        if ev is not None and result == "failed":
            vmi = (new.namespace, new.vmi)
            ev.attempts[vmi] = ev.attempts.get(vmi, 0) + 1
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
        vmis = [v.evacuation() for v in self.cache.vmis_on(node)]
        running_here = len(self.cache.migrations_from(node))
        movable = [v for v in vmis if (v.namespace, v.name) not in ev.given_up]
        plan = plan_evacuation(
            movable, self.cache.active_migrations(), running_here, self.cache.migration_limits()
        )
        for v in plan.not_migratable:
            key = (v.namespace, v.name)
            if key not in ev.reported:
                ev.reported.add(key)
                self.metrics.migrations.labels(result="not_migratable").inc()
                await self._event(
                    node,
                    "VMNotMigratable",
                    f"{v.namespace}/{v.name} cannot live-migrate ({v.not_migratable_reason}); "
                    "it keeps running on the degraded node",
                    warning=True,
                )
        chosen: list[tuple[str, str]] = []
        for v in plan.start:
            key = (v.namespace, v.name)
            n = ev.attempts.get(key, 0)
            if n >= MAX_ATTEMPTS:
                ev.given_up.add(key)
                self.metrics.migrations.labels(result="given_up").inc()
                await self._event(
                    node,
                    "VMNotMigratable",
                    f"{v.namespace}/{v.name}: {n} migrations failed; not retrying",
                    warning=True,
                )
                continue
            chosen.append(key)
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
        await self._check_end(
            ev,
            vmis_left=[v for v in movable if v.live_migratable],
            running_here=running_here + len(chosen),
        )

    async def _check_end(
        self, ev: NodeEvacuation, vmis_left: list[object], running_here: int
    ) -> None:
        if not vmis_left and running_here == 0 and not ev.finished:
            ev.finished = True
            await self._event(
                ev.node,
                "EvacuationFinished",
                f"every live-migratable VMI left {ev.node} "
                f"({len(ev.reported)} not migratable, {len(ev.given_up)} given up)",
            )
            return
        timeout = self.timeout_s()
        if not ev.timed_out and self.clock() - ev.started_at > timeout:
            ev.timed_out = True
            self.metrics.migrations.labels(result="timeout").inc()
            await self._event(
                ev.node,
                "EvacuationTimeout",
                f"evacuation of {ev.node} still unfinished after {timeout:.0f}s "
                f"({len(vmis_left)} VMIs left); VMs keep running, nothing is reset",
                warning=True,
            )

    async def tick_all(self) -> None:
        for node in list(self.active):
            await self.tick(node)
