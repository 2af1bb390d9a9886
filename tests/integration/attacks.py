"""What a compromised node's agent token tries against the API server (shared by the RBAC proof
and the compromised-node test): every write that would fence a healthy node, reset its VMs or
take the controller's place. Each attack's HTTP status is returned (403: refused)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from chaos.sim.informer import LEASES, NODES, PODS, VMIMS, ApiError, Kube, Obj
from watchdog.decide.names import STATE_ANNOTATION


async def api_attacks(stolen: Kube, victim: str, pod: Obj, lease: Obj) -> dict[str, int]:
    """With `stolen` (a node's credentials): against Node `victim`, one of its launcher pods
    and the leader Lease."""
    ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
    # Each made only when tried: one failing unexpectedly leaves no coroutine never awaited.
    attacks: dict[str, Callable[[], Awaitable[Any]]] = {
        "declare the victim Fencing": lambda: stolen.patch(
            NODES,
            victim,
            {"metadata": {"annotations": {STATE_ANNOTATION: '{"phase":"Fencing"}'}}},
        ),
        "delete the victim's state": lambda: stolen.patch(
            NODES, victim, {"metadata": {"annotations": {STATE_ANNOTATION: None}}}
        ),
        "taint the victim out-of-service": lambda: stolen.patch(
            NODES,
            victim,
            {
                "spec": {
                    "taints": [{"key": "node.kubernetes.io/out-of-service", "effect": "NoExecute"}]
                }
            },
        ),
        "force-delete a VM's launcher pod": lambda: stolen.delete(PODS, name, ns, grace_period_s=0),
        "mark a launcher pod not ready": lambda: stolen.patch(
            PODS,
            name,
            {"status": {"conditions": [{"type": "Ready", "status": "False"}]}},
            ns,
            sub="status",
        ),
        "take the leader Lease": lambda: stolen.replace(
            LEASES,
            {**lease, "spec": {**lease["spec"], "holderIdentity": "attacker"}},
        ),
        "start a migration": lambda: stolen.create(
            VMIMS,
            {
                "apiVersion": "kubevirt.io/v1",
                "kind": "VirtualMachineInstanceMigration",
                "metadata": {"name": "attack", "namespace": ns},
                "spec": {"vmiName": pod["metadata"]["labels"].get("vm.kubevirt.io/name", "x")},
            },
            ns,
        ),
    }
    status: dict[str, int] = {}
    for what, call in attacks.items():
        try:
            await call()
            status[what] = 200
        except ApiError as e:
            status[what] = e.status
    return status
