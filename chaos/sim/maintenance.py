"""Planned maintenance of a test-cluster machine, done through the API as an operator's tools do.

Owns what Harvester's `enableMaintenanceMode` and its maintain-node controller do to a Node, and
`kubectl cordon`:

- `enter`: the Node cordoned (`spec.unschedulable`), annotated `harvesterhci.io/maintain-status:
  running`, and drained: Harvester drains through evictions that KubeVirt turns into live
  migrations; here the `kubevirt.io/drain` taint asks the simulated KubeVirt for the same
  migrations (chaos/sim/kubevirt.py, evacuation). Once the API shows no VMI on the node, the
  annotation says `completed` and the drain taint goes, as Harvester's controller marks it.
  Returns only then (bounded): a fault scheduled after it (a planned power-off) finds the node
  empty, as an operator waiting for "Maintenance" in the UI would.
- `leave`: cordon and annotation removed (`disableMaintenanceMode`).
- `cordon`: `spec.unschedulable` only; the node's VMIs stay where they are.

Must not: fence, migrate anything itself, or know about the watchdog.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from chaos.sim.informer import NODES, VMIS, Clock, Kube, Obj

MAINTAIN_STATUS = "harvesterhci.io/maintain-status"
DRAIN_TAINT = {"key": "kubevirt.io/drain", "value": "draining", "effect": "NoSchedule"}
DRAIN_TIMEOUT_S = 600.0  # unscaled: VMs that cannot leave fail the fault, naming them
FINAL = ("Succeeded", "Failed")


async def vmis_on(kube: Kube, node: str) -> list[str]:
    """The VMIs the API shows running (not finished) on `node`, as namespace/name."""
    items = (await kube.list(VMIS)).get("items") or []
    return [
        f"{v['metadata']['namespace']}/{v['metadata']['name']}"
        for v in items
        if (v.get("status") or {}).get("nodeName") == node
        and (v.get("status") or {}).get("phase") not in FINAL
    ]


def _taints(node: Obj, *, drain: bool) -> list[Any]:
    kept = [
        t for t in node.get("spec", {}).get("taints") or [] if t.get("key") != DRAIN_TAINT["key"]
    ]
    return [*kept, DRAIN_TAINT] if drain else kept


async def enter(kube: Kube, node: str, clock: Clock) -> dict[str, Any]:
    started = time.monotonic()
    obj = await kube.get(NODES, node)
    before = await vmis_on(kube, node)
    await kube.patch(
        NODES,
        node,
        {
            "metadata": {"annotations": {MAINTAIN_STATUS: "running"}},
            "spec": {"unschedulable": True, "taints": _taints(obj, drain=True)},
        },
    )
    deadline = started + clock.scaled(DRAIN_TIMEOUT_S)
    while left := await vmis_on(kube, node):
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"maintenance of {node}: {len(left)} VMIs did not leave within "
                f"{DRAIN_TIMEOUT_S:g}s ({', '.join(left)})"
            )
        await asyncio.sleep(max(0.05, clock.scaled(1.0)))
    obj = await kube.get(NODES, node)
    await kube.patch(
        NODES,
        node,
        {
            "metadata": {"annotations": {MAINTAIN_STATUS: "completed"}},
            "spec": {"taints": _taints(obj, drain=False)},
        },
    )
    return {"migrated_off": before, "drained_in_s": round(time.monotonic() - started, 2)}


async def leave(kube: Kube, node: str) -> dict[str, Any]:
    obj = await kube.get(NODES, node)
    await kube.patch(
        NODES,
        node,
        {
            "metadata": {"annotations": {MAINTAIN_STATUS: None}},
            "spec": {"unschedulable": None, "taints": _taints(obj, drain=False)},
        },
    )
    return {}


async def cordon(kube: Kube, node: str, *, on: bool) -> dict[str, Any]:
    await kube.patch(NODES, node, {"spec": {"unschedulable": True if on else None}})
    return {"vmis_left_on_it": await vmis_on(kube, node)}
