"""Live migrations off a degraded node: the `StartEvacuation` and `StopEvacuation` actions.

Owns: `Migrations`, which creates one `VirtualMachineInstanceMigration` per VMI the plan chose
(decide.evacuation), labelled with the node it evacuates, and deletes (aborts) the unfinished
ones of that label when the evacuation stops; and the label's value (`evacuation_label_value`).
Safe to repeat: a VMI that already migrates, or nothing left to delete, is `already_done`.

Must not: choose the VMIs (the plan does), read the observers' caches (a sibling layer), or
swallow `asyncio.CancelledError`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from urllib.parse import quote

from watchdog.actuate.outcome import Outcome, Result, aggregate, guard
from watchdog.actuate.writer import KubeWriter, Obj
from watchdog.decide.actions import StartEvacuation, StopEvacuation
from watchdog.decide.names import (
    EVACUATION_LABEL,
    EVACUATION_NODE_ANNOTATION,
    FINAL_MIGRATION_PHASES,
    LEGACY_EVACUATION_LABEL,
)
from watchdog.transport.kube_errors import KubeError, NotFound

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def evacuation_label_value(node: str) -> str:
    """The evacuation label's value for `node`: the name itself when it is a valid label value
    (up to 63 characters), else a shortened, hashed form (the full name is annotated)."""
    if len(node) <= 63 and _LABEL_VALUE.match(node):
        return node
    digest = hashlib.sha256(node.encode()).hexdigest()[:10]
    head = re.sub(r"[^A-Za-z0-9_.-]", "-", node)[:50].strip("-_.")
    return f"{head}-{digest}" if head else digest


class Migrations:
    """The writes of the actions `StartEvacuation` and `StopEvacuation`."""

    def __init__(self, writer: KubeWriter, *, dry_run: bool) -> None:
        self.writer = writer
        self.dry_run = dry_run

    async def start_evacuation(
        self, action: StartEvacuation, vmis: Iterable[tuple[str, str]]
    ) -> Outcome:
        """One migration per (namespace, VMI) chosen by the plan (decide.evacuation)."""
        items: list[tuple[str, Result, KubeError | None]] = []
        for namespace, vmi in vmis:
            outcome = await self.create_migration(namespace, vmi, action.node)
            items.append((f"{namespace}/{vmi}", outcome.result, outcome.error))
        if self.dry_run and items:
            return Outcome("start_evacuation", Result.DRY_RUN, f"{len(items)} migrations")
        if not items:
            return Outcome("start_evacuation", Result.ALREADY_DONE, "nothing to migrate now")
        return aggregate("start_evacuation", items)

    async def create_migration(self, namespace: str, vmi: str, node: str) -> Outcome:
        """A `VirtualMachineInstanceMigration` for `vmi` (generateName `evacuate-<vmi>-`,
        labelled with the node being evacuated); a running one for the VMI: already_done."""
        name = "start_evacuation"
        collection = (
            f"/apis/kubevirt.io/v1/namespaces/{quote(namespace, safe='')}"
            "/virtualmachineinstancemigrations"
        )

        async def body() -> Outcome:
            listing = await self.writer.call(
                "GET", collection, what=f"list migrations in {namespace}"
            )
            for m in listing.get("items") or ():
                phase = (m.get("status") or {}).get("phase")
                if (m.get("spec") or {}).get("vmiName") == vmi and phase not in (
                    FINAL_MIGRATION_PHASES
                ):
                    return Outcome(
                        name, Result.ALREADY_DONE, f"{m['metadata']['name']} already migrates it"
                    )
            manifest = {
                "apiVersion": "kubevirt.io/v1",
                "kind": "VirtualMachineInstanceMigration",
                "metadata": {
                    "generateName": f"evacuate-{vmi}-",
                    "namespace": namespace,
                    "labels": {EVACUATION_LABEL: evacuation_label_value(node)},
                    "annotations": {EVACUATION_NODE_ANNOTATION: node},
                },
                "spec": {"vmiName": vmi},
            }
            created = await self.writer.call(
                "POST", collection, body=manifest, what=f"create migration for {namespace}/{vmi}"
            )
            return Outcome(name, Result.SUCCESS, str(created.get("metadata", {}).get("name")))

        return await guard(name, body, dry_run=self.dry_run)

    async def stop_evacuation(self, action: StopEvacuation) -> Outcome:
        """Delete the unfinished migrations this node's evacuation created (aborts them)."""
        name = "stop_evacuation"
        label = evacuation_label_value(action.node)

        async def body() -> Outcome:
            found: list[Obj] = []
            # Also those a release before our own domain created, under the legacy label.
            for key in (EVACUATION_LABEL, LEGACY_EVACUATION_LABEL):
                listing = await self.writer.call(
                    "GET",
                    "/apis/kubevirt.io/v1/virtualmachineinstancemigrations",
                    query={"labelSelector": f"{key}={label}"},
                    what=f"list evacuation migrations of {action.node}",
                )
                found.extend(listing.get("items") or ())
            items: list[tuple[str, Result, KubeError | None]] = []
            for m in found:
                if (m.get("status") or {}).get("phase") in FINAL_MIGRATION_PHASES:
                    continue
                meta = m["metadata"]
                key = f"{meta['namespace']}/{meta['name']}"
                path = (
                    f"/apis/kubevirt.io/v1/namespaces/{quote(meta['namespace'], safe='')}"
                    f"/virtualmachineinstancemigrations/{quote(meta['name'], safe='')}"
                )
                try:
                    await self.writer.call("DELETE", path, what=f"delete migration {key}")
                    items.append((key, Result.SUCCESS, None))
                except NotFound:
                    items.append((key, Result.ALREADY_DONE, None))
                except KubeError as e:
                    items.append((key, Result.FAILED, e))
            if not items:
                return Outcome(name, Result.ALREADY_DONE, "no unfinished migrations")
            return aggregate(name, items)

        return await guard(name, body, dry_run=self.dry_run)


__all__ = ["Migrations", "evacuation_label_value"]
