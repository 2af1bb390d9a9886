"""The ground-truth ledger: its arithmetic (pure), and split-brain caught in the test cluster."""

from __future__ import annotations

import json

import pytest

from chaos.sim.informer import NODES
from chaos.sim.ledger import Ledger, StopReason


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_two_copies_count_as_split_brain_seconds_once_per_vm():
    clock = FakeClock()
    ledger = Ledger(clock)
    ledger.register_vm("default/vm-1", "RerunOnFailure")
    ledger.start("default/vm-1", "node-1", "uid-a", "boot-1")
    clock.now += 10
    ledger.start("default/vm-1", "node-2", "uid-b", "boot-2")
    clock.now += 3
    assert ledger.split_brain_vms() == ["default/vm-1"]
    assert ledger.split_brain_seconds() == pytest.approx(3)
    ledger.stop("default/vm-1", "uid-a", StopReason.REAPED)
    clock.now += 50
    assert ledger.split_brain_seconds() == pytest.approx(3)
    assert ledger.running_on("default/vm-1") == ["node-2"]
    assert ledger.totals()["false_resets"] == 0


def test_a_migration_handover_is_atomic_and_never_split_brain():
    clock = FakeClock()
    ledger = Ledger(clock)
    ledger.register_vm("default/vm-1", "Always")
    ledger.start("default/vm-1", "node-1", "uid-a", "boot-1")
    clock.now += 5
    ledger.move("default/vm-1", "uid-a", "node-2", "uid-b", "boot-2")
    clock.now += 5
    snap = ledger.snapshot()
    vm = snap["vms"]["default/vm-1"]
    assert vm["running_on"] == ["node-2"]
    assert vm["split_brain_s"] == 0 and vm["downtime_s"] == 0
    assert [h["stop_reason"] for h in vm["history"]] == ["migrated-away", None]
    assert [h["start_reason"] for h in vm["history"]] == ["started", "migrated-in"]


def test_lost_counts_only_vms_that_should_run_and_downtime_accumulates():
    clock = FakeClock()
    ledger = Ledger(clock)
    for name, strategy in (
        ("a", "RerunOnFailure"),
        ("b", "Always"),
        ("c", "Manual"),
        ("d", "Halted"),
    ):
        ledger.register_vm(f"default/{name}", strategy)
        ledger.start(f"default/{name}", "node-1", f"uid-{name}", "boot-1")
    ledger.stop("default/a", "uid-a", StopReason.POWEROFF)
    ledger.stop("default/c", "uid-c", StopReason.POWEROFF)
    ledger.stop("default/b", "uid-b", StopReason.FORCE_DELETED, false_reset=True)
    clock.now += 7
    assert ledger.lost() == ["default/a", "default/b"]
    assert ledger.running() == ["default/d"]
    assert [c.vm for c in ledger.false_resets()] == ["default/b"]
    assert ledger.snapshot()["vms"]["default/a"]["downtime_s"] == pytest.approx(7)
    ledger.forget_vm("default/a")
    assert ledger.lost() == ["default/b"]
    json.dumps(ledger.snapshot())  # JSON-serialisable, history included


@pytest.mark.cluster
@pytest.mark.timeout(240)
async def test_ledger_catches_split_brain_from_out_of_service_on_a_partitioned_node(sim_cluster):
    cluster = await sim_cluster(nodes=3, vms=6, time_scale=0.2)
    victims = [f"default/{vm}" for vm in cluster.vms_on("node-1")]
    await cluster.faults.apply("partition", "node-1")
    await cluster.wait_until(lambda: cluster.node_ready("node-1") == "Unknown", 30, "NotReady")
    assert all(cluster.ledger.running_on(vm) == ["node-1"] for vm in victims)

    # What Harvester 1.7 (or an operator) does without fencing: declare the node out of service.
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
    await cluster.wait_until(
        lambda: cluster.ledger.split_brain_vms() == sorted(victims),
        60,
        "second copies of node-1's VMs",
    )
    totals = cluster.ledger.totals()
    assert totals["max_copies"] == 2 and totals["lost"] == 0
    for vm in victims:
        nodes = cluster.ledger.running_on(vm)
        assert "node-1" in nodes and len(nodes) == 2

    # The partition heals: node-1's kubelet finds the pods gone and kills the stale copies.
    await cluster.faults.apply("heal", "node-1")
    await cluster.wait_until(
        lambda: not cluster.ledger.split_brain_vms(), 30, "stale copies reaped"
    )
    snap = cluster.ledger.snapshot()
    assert snap["totals"]["split_brain_s"] > 0
    assert snap["totals"]["false_resets"] == 0
    for vm in victims:
        assert snap["vms"][vm]["history"][0]["stop_reason"] == "reaped"
        assert snap["vms"][vm]["split_brain_s"] > 0
