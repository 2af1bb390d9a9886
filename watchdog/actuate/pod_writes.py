"""Writes on a reset node's pods and their volumes: mark them not ready, force-delete them,
delete the VolumeAttachments that still hold their volumes on the node.

Owns: `PodWrites`, whose every method is safe to repeat. Idempotency, per STYLE 6: a 404 on a
delete, or on the pod to mark, is `already_done` (so is a pod already not ready); one outcome
per action over many objects (outcome.py `aggregate`). A decision's pod and volume writes go
ahead only once its Node passed `NodeWrites.refused` (the actuator checks before calling here).

Must not: decide, read the observers' caches (a sibling layer), or swallow
`asyncio.CancelledError`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from urllib.parse import quote

from watchdog.actuate.outcome import Outcome, Result, aggregate, guard
from watchdog.actuate.writer import STRATEGIC_MERGE_PATCH, KubeWriter, Obj, now_rfc3339
from watchdog.decide.actions import DeleteVolumeAttachments, ForceDeletePods, MarkPodsNotReady
from watchdog.transport.kube_errors import Conflict, KubeError, NotFound, Stale

log = logging.getLogger(__name__)

NOT_READY_REASON = "NodeUnreachable"
_PARALLEL_ITEMS = 16


def _pods_path(namespace: str, name: str, sub: str = "") -> str:
    path = f"/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(name, safe='')}"
    return f"{path}/{sub}" if sub else path


class PodWrites:
    """The writes of the actions `MarkPodsNotReady`, `ForceDeletePods` and
    `DeleteVolumeAttachments`."""

    def __init__(self, writer: KubeWriter, *, dry_run: bool) -> None:
        self.writer = writer
        self.dry_run = dry_run

    async def mark_pods_not_ready(self, action: MarkPodsNotReady) -> Outcome:
        """Set Ready=False and ContainersReady=False (reason NodeUnreachable) on each pod's
        status, as the node lifecycle controller's MarkPodsNotReady would have."""
        if self.dry_run:
            return Outcome("mark_pods_not_ready", Result.DRY_RUN, "dry run: nothing written")
        message = f"Node {action.node} is unreachable (node-watchdog)"

        async def one(namespace: str, name: str) -> Result:
            try:
                pod = await self.writer.call(
                    "GET", _pods_path(namespace, name), what=f"get pod {namespace}/{name}"
                )
            except NotFound:
                return Result.ALREADY_DONE
            conditions = (pod.get("status") or {}).get("conditions") or []
            ready = next((c for c in conditions if c.get("type") == "Ready"), None)
            if ready is not None and ready.get("status") == "False":
                return Result.ALREADY_DONE
            stamp = now_rfc3339()
            patch = {
                "status": {
                    "conditions": [
                        {
                            "type": ctype,
                            "status": "False",
                            "reason": NOT_READY_REASON,
                            "message": message,
                            "lastTransitionTime": stamp,
                            "lastProbeTime": None,
                        }
                        for ctype in ("Ready", "ContainersReady")
                    ]
                }
            }
            try:
                await self.writer.call(
                    "PATCH",
                    _pods_path(namespace, name, "status"),
                    body=patch,
                    content_type=STRATEGIC_MERGE_PATCH,
                    what=f"mark pod {namespace}/{name} not ready",
                )
            except NotFound:
                return Result.ALREADY_DONE
            return Result.SUCCESS

        return await self._for_each("mark_pods_not_ready", action.pods, one)

    async def force_delete_pods(
        self, action: ForceDeletePods, *, uids: Mapping[tuple[str, str], str] | None = None
    ) -> Outcome:
        """Delete each pod with grace 0 (no kubelet is left to confirm a graceful delete).
        With `uids`, a pod recreated under the same name is left alone."""
        if self.dry_run:
            return Outcome("force_delete_pods", Result.DRY_RUN, "dry run: nothing written")

        async def one(namespace: str, name: str) -> Result:
            options: Obj = {
                "apiVersion": "v1",
                "kind": "DeleteOptions",
                "gracePeriodSeconds": 0,
                "propagationPolicy": "Background",
            }
            uid = (uids or {}).get((namespace, name))
            if uid:
                options["preconditions"] = {"uid": uid}
            try:
                await self.writer.call(
                    "DELETE",
                    _pods_path(namespace, name),
                    body=options,
                    what=f"force-delete pod {namespace}/{name}",
                )
            except NotFound:
                return Result.ALREADY_DONE
            except Conflict:
                if uid:  # another pod of that name now: ours is gone
                    return Result.ALREADY_DONE
                raise
            return Result.SUCCESS

        return await self._for_each("force_delete_pods", action.pods, one)

    async def _for_each(
        self,
        name: str,
        pods: Iterable[tuple[str, str]],
        one: Callable[[str, str], Awaitable[Result]],
    ) -> Outcome:
        items: list[tuple[str, Result, KubeError | None]] = []
        limit = asyncio.Semaphore(_PARALLEL_ITEMS)

        async def run(namespace: str, pod: str) -> None:
            async with limit:
                try:
                    items.append((f"{namespace}/{pod}", await one(namespace, pod), None))
                except Stale as e:
                    items.append((f"{namespace}/{pod}", Result.STALE, e))
                except KubeError as e:
                    log.warning("%s %s/%s failed: %s", name, namespace, pod, e)
                    items.append((f"{namespace}/{pod}", Result.FAILED, e))

        async with asyncio.TaskGroup() as tg:
            for namespace, pod in dict.fromkeys(pods):
                tg.create_task(run(namespace, pod), name=f"{name} {namespace}/{pod}")
        if not items:
            return Outcome(name, Result.ALREADY_DONE, "no pods")
        items.sort(key=lambda item: item[0])
        return aggregate(name, items)

    async def delete_volume_attachments(
        self,
        action: DeleteVolumeAttachments,
        claims: Iterable[tuple[str, str]],
        *,
        attacher: str | None = None,
    ) -> Outcome:
        """Delete the VolumeAttachments on `action.node` of the PVs bound to `claims`
        ((namespace, PVC name) of the reset pods' volumes), optionally only `attacher`'s
        (e.g. `driver.longhorn.io`). Nothing else on the node is touched."""
        name = "delete_volume_attachments"
        if self.dry_run:
            return Outcome(name, Result.DRY_RUN, "dry run: nothing written")

        async def body() -> Outcome:
            pvs: set[str] = set()
            for namespace, claim in dict.fromkeys(claims):
                path = (
                    f"/api/v1/namespaces/{quote(namespace, safe='')}/persistentvolumeclaims/"
                    f"{quote(claim, safe='')}"
                )
                try:
                    pvc = await self.writer.call("GET", path, what=f"get PVC {namespace}/{claim}")
                except NotFound:
                    continue
                volume = (pvc.get("spec") or {}).get("volumeName")
                if volume:
                    pvs.add(volume)
            if not pvs:
                return Outcome(name, Result.ALREADY_DONE, "no bound volumes")
            listing = await self.writer.call(
                "GET", "/apis/storage.k8s.io/v1/volumeattachments", what="list VolumeAttachments"
            )
            targets = [
                va["metadata"]["name"]
                for va in listing.get("items") or ()
                if (va.get("spec") or {}).get("nodeName") == action.node
                and ((va.get("spec") or {}).get("source") or {}).get("persistentVolumeName") in pvs
                and (attacher is None or va["spec"].get("attacher") == attacher)
            ]
            items: list[tuple[str, Result, KubeError | None]] = []
            for va_name in targets:
                try:
                    await self.writer.call(
                        "DELETE",
                        f"/apis/storage.k8s.io/v1/volumeattachments/{quote(va_name, safe='')}",
                        body={
                            "apiVersion": "v1",
                            "kind": "DeleteOptions",
                            "propagationPolicy": "Background",
                        },
                        what=f"delete VolumeAttachment {va_name}",
                    )
                    items.append((va_name, Result.SUCCESS, None))
                except NotFound:
                    items.append((va_name, Result.ALREADY_DONE, None))
                except Stale as e:
                    items.append((va_name, Result.STALE, e))
                except KubeError as e:
                    items.append((va_name, Result.FAILED, e))
            if not items:
                return Outcome(name, Result.ALREADY_DONE, "no attachments on the node")
            return aggregate(name, items)

        return await guard(name, body, dry_run=self.dry_run)


__all__ = ["NOT_READY_REASON", "PodWrites"]
