"""What real Kubernetes and our KubeVirt simulation do with a dead node.

These are the semantics the watchdog exists for, produced by the real kube-apiserver,
kube-controller-manager and kube-scheduler acting on what the simulated kubelets write.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from chaos.sim.cluster import SimCluster
from chaos.sim.informer import NODES, PODS, VMIMS, condition, has_taint

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]


def vm_on(cluster: SimCluster, node: str) -> str:
    vms = cluster.vms_on(node)
    assert vms, f"no VM on {node}"
    return vms[0]


def launcher_pod_of(cluster: SimCluster, vm: str, node: str) -> dict:
    pods = [
        p
        for p in cluster.launcher_pods(node)
        if p["metadata"]["labels"]["vm.kubevirt.io/name"] == vm
    ]
    assert len(pods) == 1, pods
    return pods[0]


def record_vmi_phases(cluster: SimCluster) -> list[tuple[str, str, str | None]]:
    """(vmi name, uid, phase) for every change the VMI informer sees, in order."""
    seen: list[tuple[str, str, str | None]] = []

    def handler(key: str, new: dict | None, old: dict | None) -> None:
        if new is not None:
            seen.append(
                (
                    new["metadata"]["name"],
                    new["metadata"]["uid"],
                    new.get("status", {}).get("phase"),
                )
            )

    cluster.informers["vmis"].add_handler(handler)
    return seen


async def hold(cluster: SimCluster, seconds: float, check, what: str) -> None:
    """Assert `check()` stays true for `seconds` (a bounded negative test)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert check(), what
        await asyncio.sleep(0.1)


async def test_power_off_then_delete_leaves_the_pod_terminating_until_grace_zero(sim_cluster):
    cluster = await sim_cluster(nodes=3, vms=6, time_scale=0.2)
    phases = record_vmi_phases(cluster)
    vm = vm_on(cluster, "node-1")
    pod = launcher_pod_of(cluster, vm, "node-1")
    old_uid = cluster.vmi(vm)["metadata"]["uid"]
    t_off = time.monotonic()
    await cluster.faults.apply("poweroff", "node-1")
    assert cluster.ledger.running_on(f"default/{vm}") == []

    # The real node lifecycle controller: Ready=Unknown and the unreachable taints after the
    # (scaled) 50 s grace period.
    await cluster.wait_until(
        lambda: cluster.node_ready("node-1") == "Unknown", 30, "node-1 Ready=Unknown"
    )
    unknown_after = time.monotonic() - t_off
    scale = cluster.config.time_scale
    # Counted from the last lease renewal (up to one renew interval before the power-off),
    # noticed at the next monitor period.
    grace, renew, monitor = 50 * scale, 10 * scale, 5 * scale
    assert grace - renew - 0.5 <= unknown_after <= grace + monitor + 2
    await cluster.wait_until(
        lambda: has_taint(cluster.node("node-1"), "node.kubernetes.io/unreachable"),
        10,
        "unreachable taint",
    )

    # A normal delete: nobody is left to confirm it, the pod stays Terminating and its VMI
    # stays Running (Ready=False, PodTerminating).
    name, ns = pod["metadata"]["name"], pod["metadata"]["namespace"]
    await cluster.kube.delete(PODS, name, ns)
    await cluster.wait_until(
        lambda: (
            (cluster.informers["pods"].get(f"{ns}/{name}") or {})
            .get("metadata", {})
            .get("deletionTimestamp")
            is not None
        ),
        10,
        "deletionTimestamp",
    )

    def still_terminating() -> bool:
        vmi = cluster.vmi(vm)
        ready = condition(vmi, "Ready") or {}
        return (
            cluster.informers["pods"].get(f"{ns}/{name}") is not None
            and vmi is not None
            and vmi["status"]["phase"] == "Running"
            and ready.get("reason") == "PodTerminating"
        )

    await cluster.wait_until(still_terminating, 10, "VMI Ready=False/PodTerminating")
    await hold(cluster, 3.0, still_terminating, "the pod must stay Terminating")

    # Grace 0 removes it: only then does the VMI fail, and the VM restarts elsewhere.
    await cluster.kube.delete(PODS, name, ns, grace_period_s=0)
    await cluster.wait_until(
        lambda: (
            (cluster.vmi(vm) or {}).get("metadata", {}).get("uid") not in (None, old_uid)
            and cluster.vmi_phase(vm) == "Running"
        ),
        60,
        f"{vm} running again",
    )
    assert (vm, old_uid, "Failed") in phases
    assert cluster.vmi_node(vm) != "node-1"
    assert cluster.ledger.running_on(f"default/{vm}") == [cluster.vmi_node(vm)]
    assert cluster.ledger.totals()["false_resets"] == 0


async def test_out_of_service_taint_makes_pod_gc_force_delete_terminating_pods(sim_cluster):
    cluster = await sim_cluster(nodes=3, vms=6, time_scale=0.2)
    vms = cluster.vms_on("node-1")
    await cluster.faults.apply("poweroff", "node-1")
    await cluster.wait_until(lambda: cluster.node_ready("node-1") == "Unknown", 30, "NotReady")
    for pod in cluster.launcher_pods("node-1"):
        await cluster.kube.delete(PODS, pod["metadata"]["name"], pod["metadata"]["namespace"])
    node = cluster.node("node-1")
    await cluster.kube.patch(
        NODES,
        "node-1",
        {
            "spec": {
                "taints": [
                    *node["spec"].get("taints", []),
                    {
                        "key": "node.kubernetes.io/out-of-service",
                        "value": "nodeshutdown",
                        "effect": "NoExecute",
                    },
                ]
            }
        },
    )
    # The pod GC runs every 20 s (not scalable): Terminating pods on a NotReady node with the
    # out-of-service taint are force-deleted.
    await cluster.wait_until(
        lambda: not cluster.launcher_pods("node-1"), 45, "launcher pods force-deleted by the pod GC"
    )
    await cluster.wait_until(cluster.all_running, 30, "VMs running elsewhere")
    for vm in vms:
        assert cluster.vmi_node(vm) in ("node-2", "node-3")
    assert cluster.ledger.totals()["split_brain_s"] == 0


async def test_without_controller_manager_pods_on_a_dead_node_stay_falsely_ready(sim_cluster):
    cluster = await sim_cluster(nodes=2, vms=2, time_scale=0.1)
    vm = vm_on(cluster, "node-1")
    await cluster.faults.apply("controller-manager-stop")
    await cluster.faults.apply("poweroff", "node-1")

    def falsely_ready() -> bool:
        pod = launcher_pod_of(cluster, vm, "node-1")
        return (
            cluster.node_ready("node-1") == "True"
            and (condition(pod, "Ready") or {}).get("status") == "True"
            and (condition(cluster.vmi(vm), "Ready") or {}).get("status") == "True"
            and not cluster.ledger.running_on(f"default/{vm}")
        )

    # Twice the scaled grace period: nothing marks the node or its pods.
    await hold(
        cluster,
        2 * 50 * cluster.config.time_scale,
        falsely_ready,
        "pods on a dead node stay Ready while the controller-manager is down",
    )
    await cluster.faults.apply("controller-manager-start")
    await cluster.wait_until(
        lambda: cluster.node_ready("node-1") == "Unknown",
        30,
        "node-1 Unknown once the controller-manager is back",
    )
    await cluster.wait_until(
        lambda: (
            (condition(launcher_pod_of(cluster, vm, "node-1"), "Ready") or {}).get("status")
            == "False"
        ),
        30,
        "MarkPodsNotReady",
    )


async def test_live_migration_moves_the_domain_without_a_second_copy(sim_cluster):
    cluster = await sim_cluster(
        nodes=3, vms=4, time_scale=0.2, access_modes=("ReadWriteMany", "ReadWriteOnce")
    )
    movable, stuck = "vm-1", "vm-2"
    assert (condition(cluster.vmi(stuck), "LiveMigratable") or {}).get(
        "reason"
    ) == "DisksNotLiveMigratable"
    source = cluster.vmi_node(movable)
    for vm in (movable, stuck):
        await cluster.kube.create(
            VMIMS,
            {
                "apiVersion": "kubevirt.io/v1",
                "kind": "VirtualMachineInstanceMigration",
                "metadata": {"name": f"migrate-{vm}", "namespace": "default"},
                "spec": {"vmiName": vm},
            },
        )

    def phase(vm: str) -> str | None:
        m = cluster.informers["vmims"].get(f"default/migrate-{vm}")
        return (m or {}).get("status", {}).get("phase")

    await cluster.wait_until(lambda: phase(movable) == "Succeeded", 60, "migration Succeeded")
    await cluster.wait_until(lambda: phase(stuck) == "Failed", 10, "RWO migration Failed")
    await cluster.wait_until(lambda: cluster.vmi_node(movable) != source, 10, "VMI moved")
    target = cluster.vmi_node(movable)
    assert cluster.ledger.running_on(f"default/{movable}") == [target]
    rec = cluster.ledger.snapshot()["vms"][f"default/{movable}"]
    assert [h["stop_reason"] for h in rec["history"]] == ["migrated-away", None]
    assert rec["split_brain_s"] == 0 and rec["downtime_s"] == 0
    await cluster.wait_until(
        lambda: any(
            p.get("status", {}).get("phase") == "Succeeded" for p in cluster.launcher_pods(source)
        ),
        10,
        "source pod Succeeded",
    )
    assert cluster.vmi_phase(movable) == "Running"
    assert cluster.ledger.running_on(f"default/{stuck}") != []


async def test_migrations_respect_kubevirt_parallel_limits(sim_cluster):
    from chaos.sim.kubevirt import MigrationLimits

    cluster = await sim_cluster(
        nodes=3, vms=6, time_scale=0.2, migration_limits=MigrationLimits(2, 1)
    )
    active: dict[str, str] = {}
    peak = {"cluster": 0, "node": 0}

    def track(key: str, new: dict | None, old: dict | None) -> None:
        phase = (new or {}).get("status", {}).get("phase")
        if phase in ("Scheduling", "Scheduled", "PreparingTarget", "TargetReady", "Running"):
            active[key] = new["status"]["migrationState"]["sourceNode"] or ""
        else:
            active.pop(key, None)
        peak["cluster"] = max(peak["cluster"], len(active))
        per_node: dict[str, int] = {}
        for src in active.values():
            per_node[src] = per_node.get(src, 0) + 1
        peak["node"] = max([peak["node"], *per_node.values()])

    cluster.informers["vmims"].add_handler(track)
    for vm in cluster.vm_names():
        await cluster.kube.create(
            VMIMS,
            {
                "apiVersion": "kubevirt.io/v1",
                "kind": "VirtualMachineInstanceMigration",
                "metadata": {"name": f"migrate-{vm}", "namespace": "default"},
                "spec": {"vmiName": vm},
            },
        )
    await cluster.wait_until(
        lambda: all(
            (cluster.informers["vmims"].get(f"default/migrate-{vm}") or {})
            .get("status", {})
            .get("phase")
            == "Succeeded"
            for vm in cluster.vm_names()
        ),
        120,
        "all migrations Succeeded",
    )
    assert peak == {"cluster": 2, "node": 1}
    assert cluster.ledger.totals()["split_brain_s"] == 0


async def test_reboot_fails_the_launcher_pods_that_survived_in_the_api_and_vms_restart(
    sim_cluster,
):
    cluster = await sim_cluster(nodes=2, vms=2, time_scale=0.2)
    vm = vm_on(cluster, "node-1")
    old_pod = launcher_pod_of(cluster, vm, "node-1")
    old_boot = cluster.fleet["node-1"].boot_id
    await cluster.faults.apply("reboot", "node-1")
    new_boot = cluster.fleet["node-1"].boot_id
    assert new_boot != old_boot
    # Back before the grace period: the pod object still exists, but its containers died with
    # the machine and virt-launcher pods never restart (restartPolicy Never): Failed.
    await cluster.wait_until(
        lambda: (
            (cluster.informers["pods"].get(f"default/{old_pod['metadata']['name']}") or {})
            .get("status", {})
            .get("phase")
            == "Failed"
        ),
        30,
        "old launcher pod Failed",
    )
    assert (cluster.node("node-1") or {})["status"]["nodeInfo"]["bootID"] == new_boot
    await cluster.wait_until(cluster.all_running, 60, "VMs running again")
    rec = cluster.ledger.snapshot()["vms"][f"default/{vm}"]
    assert rec["history"][0]["stop_reason"] == "poweroff"
    assert rec["starts"] == 2 and rec["split_brain_s"] == 0
