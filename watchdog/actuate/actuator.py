"""Idempotent Kubernetes writes: `Actuator` runs each action of `watchdog.decide.actions`.

Owns: `Actuator`, the dispatcher over the action union (mypy checks that every action type has
its case), and the rule that binds a decision's writes to its `Basis` (decide/actions.py):
with one, every request is sent only while the replica leads in the decision's term
(writer.py `sent_only_while`), Node writes carry the Node's version as precondition
(node_writes.py), and pod and volume writes start only once etcd's Node still carries the
decision (`NodeWrites.refused`). Each kind of write is its own component, every one safe to
repeat and returning an `Outcome` whose `result` feeds `watchdog_actions_total{action,result}`
(outcome.py): node_writes.py (state annotation, condition, out-of-service taint),
pod_writes.py (pods not ready, force-delete, VolumeAttachments), event_writes.py (Events),
migrations.py (evacuation), fence_runners.py (the fence hook), all over one `KubeWriter`
(writer.py).

Must not: decide (the actions say what to do), read the observers' caches (a sibling layer),
or swallow `asyncio.CancelledError`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from typing import Protocol, assert_never

from watchdog.actuate.event_writes import EventWrites
from watchdog.actuate.fence_runners import FenceRunner, FenceSettings
from watchdog.actuate.migrations import Migrations
from watchdog.actuate.node_writes import NodeWrites, TaintSpec
from watchdog.actuate.outcome import Outcome
from watchdog.actuate.pod_writes import PodWrites
from watchdog.actuate.writer import KubeWriter, sent_only_while
from watchdog.decide.actions import (
    Action,
    Basis,
    DeleteVolumeAttachments,
    EmitEvent,
    ForceDeletePods,
    MarkPodsNotReady,
    PersistState,
    RemoveOutOfServiceTaint,
    RunFenceHook,
    StartEvacuation,
    StopEvacuation,
    TaintOutOfService,
)
from watchdog.transport.kube import ApiClient


class ActuatorSettings(FenceSettings, Protocol):
    """What the actuator reads from the runtime's Settings (structural: actuate must not
    import the runtime layer)."""

    @property
    def out_of_service_taint(self) -> str: ...

    @property
    def api_request_timeout_s(self) -> float: ...

    @property
    def dry_run(self) -> bool: ...


class Actuator:
    """Executes decide's actions against the cluster; every action is idempotent."""

    def __init__(
        self,
        api_client: ApiClient,
        settings: ActuatorSettings,
        *,
        dry_run: bool | None = None,
        attempts: int = 5,
        component: str = "node-watchdog",
        instance: str | None = None,
    ) -> None:
        self.settings = settings
        self.dry_run = settings.dry_run if dry_run is None else dry_run
        self.writer = KubeWriter(
            api_client, request_timeout_s=settings.api_request_timeout_s, attempts=attempts
        )
        self.taint = TaintSpec.parse(settings.out_of_service_taint)
        self.nodes = NodeWrites(self.writer, self.taint, dry_run=self.dry_run)
        self.pods = PodWrites(self.writer, dry_run=self.dry_run)
        self.events = EventWrites(
            self.writer,
            component=component,
            instance=instance or os.environ.get("POD_NAME") or socket.gethostname(),
            dry_run=self.dry_run,
        )
        self.migrations = Migrations(self.writer, dry_run=self.dry_run)
        self.fence = FenceRunner(settings, dry_run=self.dry_run)

    async def execute(
        self,
        action: Action,
        *,
        claims: Iterable[tuple[str, str]] = (),
        vmis: Iterable[tuple[str, str]] = (),
        basis: Basis | None = None,
    ) -> Outcome:
        """Run one action. `DeleteVolumeAttachments` needs the (namespace, PVC) `claims` of the
        reset pods; `StartEvacuation` the (namespace, name) `vmis` chosen to migrate now.
        With the decision's `basis`, Node writes carry its resourceVersion as precondition,
        pod and volume writes go ahead only while etcd's Node still has it, and nothing is
        sent once `basis.may_act()` says no (`Basis`, decide/actions.py)."""
        if basis is None:
            return await self._dispatch(action, claims, vmis, None)
        with sent_only_while(basis.may_act, basis.acting_left_s):
            if isinstance(action, MarkPodsNotReady | ForceDeletePods | DeleteVolumeAttachments):
                refused = await self.nodes.refused(type(action).__name__, action.node, basis)
                if refused is not None:
                    return refused
            return await self._dispatch(action, claims, vmis, basis)

    async def _dispatch(
        self,
        action: Action,
        claims: Iterable[tuple[str, str]],
        vmis: Iterable[tuple[str, str]],
        basis: Basis | None,
    ) -> Outcome:
        match action:
            case EmitEvent():
                return await self.events.emit_event(action)
            case PersistState():
                return await self.nodes.persist_state(action, basis)
            case MarkPodsNotReady():
                return await self.pods.mark_pods_not_ready(action)
            case RunFenceHook():
                return await self.fence.run_fence_hook(action)
            case TaintOutOfService():
                return await self.nodes.taint_out_of_service(action, basis)
            case ForceDeletePods():
                return await self.pods.force_delete_pods(action)
            case DeleteVolumeAttachments():
                return await self.pods.delete_volume_attachments(action, claims)
            case RemoveOutOfServiceTaint():
                return await self.nodes.remove_out_of_service_taint(action, basis)
            case StartEvacuation():
                return await self.migrations.start_evacuation(action, vmis)
            case StopEvacuation():
                return await self.migrations.stop_evacuation(action)
            case _:
                assert_never(action)


__all__ = ["Actuator", "ActuatorSettings"]
