"""Harvester's node-down controller as a baseline: its published timelines, at a time scale.

Times are measured in wall seconds and compared with the field's numbers multiplied by the
cluster's time scale. Two things are not compressible and widen the upper bounds: the pod GC's
20 s period (hard-coded in kube-controller-manager) and second-precision API timestamps.
"""

from __future__ import annotations

import time

import pytest

from chaos.sim.controlplane import Timings
from chaos.sim.informer import has_taint, parse_time

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

PODGC_PERIOD_S = 20.0  # kube-controller-manager's pod GC, not scaled


def first(cluster, action: str) -> float:
    """Monotonic time of the Harvester controller's first `action`."""
    return next(a["mono"] for a in cluster.harvester.actions if a["action"] == action)


def did(cluster, action: str) -> bool:
    """The controller recorded `action`: it records after its write returns, so the watch may
    show the write first."""
    return any(a["action"] == action for a in cluster.harvester.actions)


async def test_harvester_16_with_period_10_resets_vms_in_about_a_minute(sim_cluster):
    scale = 0.25
    # Field report harvester#4049 ran Kubernetes with the 40 s grace period of its time.
    cluster = await sim_cluster(
        nodes=3,
        vms=6,
        time_scale=scale,
        harvester="1.6",
        harvester_policy={"enable": True, "period": 10},
        control_plane_timings=Timings(node_monitor_grace_period_s=40.0),
    )
    victims = cluster.vms_on("node-1")
    t0 = time.monotonic()
    await cluster.faults.apply("poweroff", "node-1")

    await cluster.wait_until(lambda: cluster.node_ready("node-1") == "Unknown", 40, "NotReady")
    not_ready = (time.monotonic() - t0) / scale
    await cluster.wait_until(
        lambda: any(a["action"] == "force-delete-pod" for a in cluster.harvester.actions),
        30,
        "force delete",
    )
    deleted = (first(cluster, "force-delete-pod") - t0) / scale
    await cluster.wait_until(cluster.all_running, 60, "VMs running elsewhere")
    running = (time.monotonic() - t0) / scale

    # harvester#4049: ~38 s to NotReady, VM down ~9 s later, Running ~15 s after that.
    assert 28 <= not_ready <= 50, not_ready
    # `period` counts from Ready's lastTransitionTime, which has one-second precision.
    assert 10 - 1 / scale - 1 <= deleted - not_ready <= 10 + 1 / scale + 2, (not_ready, deleted)
    ready = next(c for c in cluster.node("node-1")["status"]["conditions"] if c["type"] == "Ready")
    force_wall = next(
        a["wall"] for a in cluster.harvester.actions if a["action"] == "force-delete-pod"
    )
    assert abs(force_wall - (parse_time(ready["lastTransitionTime"]) + 10 * scale)) < 0.5
    assert 45 <= running <= 80, running
    assert running - deleted <= 20
    for vm in victims:
        assert cluster.vmi_node(vm) != "node-1"
    actions = {a["action"] for a in cluster.harvester.actions}
    assert {"force-delete-pod", "delete-volume-attachments", "backdate-heartbeat"} <= actions
    totals = cluster.ledger.totals()
    assert totals["split_brain_s"] == 0 and totals["lost"] == 0


async def test_harvester_17_defaults_reset_vms_in_about_four_minutes(sim_cluster):
    scale = 0.1
    cluster = await sim_cluster(nodes=3, vms=6, time_scale=scale, harvester="1.7")
    t0 = time.monotonic()
    await cluster.faults.apply("poweroff", "node-1")

    await cluster.wait_until(lambda: cluster.node_ready("node-1") == "Unknown", 30, "NotReady")
    not_ready = time.monotonic() - t0
    await cluster.wait_until(
        lambda: (
            has_taint(cluster.node("node-1"), "kubevirt.io/drain") and did(cluster, "drain-taint")
        ),
        30,
        "drain taint",
    )
    drained = first(cluster, "drain-taint") - t0
    await cluster.wait_until(
        lambda: (
            has_taint(cluster.node("node-1"), "node.kubernetes.io/out-of-service")
            and did(cluster, "out-of-service-taint")
        ),
        60,
        "out-of-service taint",
    )
    oos = first(cluster, "out-of-service-taint") - t0
    await cluster.wait_until(cluster.all_running, PODGC_PERIOD_S + 30, "VMs running elsewhere")
    running = time.monotonic() - t0

    slack = 1.5  # LastTransitionTime has one-second precision
    assert abs((drained - not_ready) - 15 * scale) <= slack, (not_ready, drained)
    assert abs((oos - drained) - 180 * scale) <= slack, (drained, oos)
    # grace (50 s) + period (15 s) + vmMigrationTimeout (180 s) ≈ 4 min, then the pod GC.
    assert (40 + 15 + 180) * scale - 2 * slack <= oos <= (55 + 15 + 180) * scale + 2 * slack
    assert running - oos <= PODGC_PERIOD_S + 10
    cond = next(c for c in cluster.node("node-1")["status"]["conditions"] if c["type"] == "Drained")
    assert cond["status"] == "True"
    # The drain taint made KubeVirt try to evacuate; a dead source cannot migrate.
    results = {(m.get("status") or {}).get("phase") for m in cluster.informers["vmims"].values()}
    assert results <= {"Failed", None, "Pending"}, results
    totals = cluster.ledger.totals()
    assert totals["split_brain_s"] == 0 and totals["lost"] == 0

    await cluster.faults.apply("poweron", "node-1")
    await cluster.wait_until(
        lambda: (
            cluster.node_ready("node-1") == "True"
            and not has_taint(cluster.node("node-1"), "kubevirt.io/drain")
            and not has_taint(cluster.node("node-1"), "node.kubernetes.io/out-of-service")
        ),
        30,
        "taints removed once node-1 is Ready",
    )


async def test_harvester_17_evacuates_a_node_whose_kubelet_died_by_live_migration(sim_cluster):
    scale = 0.1
    cluster = await sim_cluster(nodes=3, vms=6, time_scale=scale, harvester="1.7")
    victims = cluster.vms_on("node-1")
    await cluster.faults.apply("kubelet-stop", "node-1")
    await cluster.wait_until(
        lambda: all(cluster.vmi_node(vm) != "node-1" for vm in victims),
        60,
        "VMIs migrated away from node-1",
    )
    for vm in victims:
        rec = cluster.ledger.snapshot()["vms"][f"default/{vm}"]
        assert [h["stop_reason"] for h in rec["history"]] == ["migrated-away", None]
        assert rec["downtime_s"] == 0
    assert cluster.ledger.totals()["split_brain_s"] == 0
    await cluster.faults.apply("kubelet-start", "node-1")
    await cluster.wait_until(lambda: cluster.node_ready("node-1") == "True", 30, "Ready")
