"""The test cluster seen through the real kubectl: what an operator (or the watchdog) sees.

Real control plane, simulated kubelets/KubeVirt/Harvester; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from chaos.sim.cluster import SimCluster
from chaos.sim.informer import VMS
from chaos.sim.kubevirt import vm_manifest

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]


async def kubectl(cluster: SimCluster, *args: str) -> str:
    # Asynchronous on purpose: the simulated kubelets share this event loop, a blocking
    # subprocess call would stop their lease renewals.
    proc = await asyncio.create_subprocess_exec(
        "kubectl",
        f"--kubeconfig={cluster.kubeconfig}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, f"kubectl {' '.join(args)}: {err.decode()}"
    return out.decode()


async def kubectl_json(cluster: SimCluster, *args: str) -> Any:
    return json.loads(await kubectl(cluster, *args, "-o", "json"))


async def test_kubectl_sees_nodes_launcher_pods_vmis_and_the_harvester_setting(sim_cluster):
    cluster = await sim_cluster(nodes=3, vms=6, harvester="1.7")

    nodes = await kubectl_json(cluster, "get", "nodes")
    by_name = {n["metadata"]["name"]: n for n in nodes["items"]}
    assert sorted(by_name) == ["node-1", "node-2", "node-3"]
    for name, node in by_name.items():
        ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "True"
        assert node["metadata"]["labels"]["kubevirt.io/schedulable"] == "true"
        assert node["metadata"]["labels"]["kubernetes.io/hostname"] == name
        assert "kubevirt.io/heartbeat" in node["metadata"]["annotations"]
        assert node["status"]["nodeInfo"]["bootID"] == cluster.fleet[name].boot_id
    table = await kubectl(cluster, "get", "nodes")
    assert table.count(" Ready ") == 3

    pods = await kubectl_json(
        cluster,
        "get",
        "pods",
        "-A",
        "-l",
        "kubevirt.io=virt-launcher",
        "--field-selector",
        "spec.nodeName=node-1",
    )
    names = sorted(p["metadata"]["name"] for p in pods["items"])
    assert names == sorted(p["metadata"]["name"] for p in cluster.launcher_pods("node-1"))
    assert names, "the scheduler spread the VMs: node-1 has launcher pods"
    for pod in pods["items"]:
        conds = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
        assert pod["status"]["phase"] == "Running"
        assert conds["Ready"] == "True"
        assert conds["kubevirt.io/virtual-machine-unpaused"] == "True"
        assert pod["spec"]["readinessGates"] == [
            {"conditionType": "kubevirt.io/virtual-machine-unpaused"}
        ]
        assert pod["metadata"]["ownerReferences"][0]["kind"] == "VirtualMachineInstance"

    vmi_table = await kubectl(cluster, "get", "vmi", "-A")
    header, *rows = vmi_table.strip().splitlines()
    assert header.split()[:5] == ["NAMESPACE", "NAME", "AGE", "PHASE", "IP"]
    assert sorted(r.split()[1] for r in rows) == [f"vm-{i}" for i in range(1, 7)]
    assert all("Running" in r and " node-" in r for r in rows)
    vmis = await kubectl_json(cluster, "get", "vmi", "-A")
    for vmi in vmis["items"]:
        conds = {c["type"]: c["status"] for c in vmi["status"]["conditions"]}
        assert conds == {"Ready": "True", "LiveMigratable": "True"}
        assert vmi["metadata"]["labels"]["kubevirt.io/nodeName"] == vmi["status"]["nodeName"]
    vms = await kubectl(cluster, "get", "vm", "-A")
    assert vms.count("Running") == 6

    # A VM no node can hold: the scheduler's verdict reaches the VM's printable status.
    await cluster.longhorn.provision("default", "big-rootdisk")
    await cluster.kube.create(VMS, vm_manifest("big", memory="1Ti", claim="big-rootdisk"))
    await cluster.wait_until(
        lambda: (
            (cluster.informers["vms"].get("default/big") or {})
            .get("status", {})
            .get("printableStatus")
            == "ErrorUnschedulable"
        ),
        30,
        "ErrorUnschedulable",
    )
    assert "ErrorUnschedulable" in await kubectl(cluster, "get", "vm", "big")

    setting = await kubectl_json(
        cluster, "get", "settings.harvesterhci.io", "vm-force-reset-policy"
    )
    assert json.loads(setting["default"]) == {
        "enable": True,
        "period": 15,
        "vmMigrationTimeout": 180,
    }
    assert setting["value"] == ""


async def test_kubectl_get_pods_watch_receives_the_simulated_kubelets_changes(sim_cluster):
    cluster = await sim_cluster(nodes=2, vms=2)
    watch = await asyncio.create_subprocess_exec(
        "kubectl",
        f"--kubeconfig={cluster.kubeconfig}",
        "get",
        "pods",
        "-A",
        "-w",
        "--output-watch-events",
        "-l",
        "kubevirt.io=virt-launcher",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert watch.stdout is not None
        # The initial listing: both launcher pods Running.
        seen: list[str] = []
        while sum("Running" in line for line in seen) < 2:
            seen.append((await asyncio.wait_for(watch.stdout.readline(), 30)).decode())
        victim = cluster.launcher_pods()[0]
        vm = victim["metadata"]["labels"]["vm.kubevirt.io/name"]
        # A normal delete on a live node: the kubelet stops the pod and confirms the deletion,
        # the VMI fails, the VM controller restarts it, a kubelet runs the new pod.
        await kubectl(
            cluster, "delete", "pod", "-n", "default", victim["metadata"]["name"], "--wait=false"
        )
        deadline = time.monotonic() + 60
        events: list[str] = []
        while not any(
            line.startswith("MODIFIED")
            and "Running" in line
            and victim["metadata"]["name"] not in line
            and f"-{vm}-" in line
            for line in events
        ):
            assert time.monotonic() < deadline, f"no Running event for {vm}'s new pod: {events}"
            line = await asyncio.wait_for(watch.stdout.readline(), 60)
            events.append(line.decode())
        assert any(
            line.startswith("DELETED") and victim["metadata"]["name"] in line for line in events
        ), events
    finally:
        watch.terminate()
        await watch.wait()
