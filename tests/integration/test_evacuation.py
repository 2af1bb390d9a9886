"""Evacuation of a degraded-but-alive node by live migration (issue 7, DESIGN §6).

A node whose kubelet stopped while its agent still heartbeats is DEGRADED: its VMs are alive and
must never be reset. The watchdog live-migrates the ones that can move, never more than
KubeVirt's limits allow (`parallelOutboundMigrationsPerNode`, `parallelMigrationsPerCluster`,
counting migrations it did not create), reports the ones that cannot (VMNotMigratable, with the
reason from their LiveMigratable condition), and stops cleanly when the kubelet comes back.
Each migration it creates is reported on its VMI with the KubeVirt MigrationPolicy that applies;
an evacuation still unfinished after the policy's `vmMigrationTimeout` is reported
(EvacuationTimeout), and still nothing is reset.

Setup: 3 nodes; 10 VMs are put on node-1 by cordoning the other two while they are created (the
test cluster spreads VMs by default), 6 on ReadWriteMany volumes (live-migratable) and 4 on
ReadWriteOnce (not). Concurrency is sampled from a watch on the migrations: every change of every
VirtualMachineInstanceMigration object, including the ones still Pending, so a migration created
beyond a limit counts even if KubeVirt would queue it.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from chaos.sim.harvester import POLICY_SETTING, setting_manifest
from chaos.sim.informer import (
    KUBEVIRTS,
    MIGRATION_POLICIES,
    NAMESPACES,
    NODES,
    SETTINGS,
    VMIMS,
    VMIS,
    VMS,
    ApiError,
)
from chaos.sim.kubevirt import MIGRATION_SECONDS_ANNOTATION, vm_manifest
from chaos.sim.ledger import StartReason, StopReason
from tests.integration.watchdog_env import WatchdogEnv, default_config

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.broker,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(240),
]

NODE = "node-1"
RWX = "ReadWriteMany"
RWO = "ReadWriteOnce"
MIGRATABLE = ["vm-1", "vm-2", "vm-4", "vm-5", "vm-7", "vm-8"]
NOT_MIGRATABLE = ["vm-3", "vm-6", "vm-9", "vm-10"]
OUTBOUND_PER_NODE = 2  # KubeVirt's default, in the test cluster's KubeVirt CR
PER_CLUSTER = 5


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(control_plane_binaries, tmp_path_factory: pytest.TempPathFactory):
    work = Path(tmp_path_factory.mktemp("evacuation"))
    config = default_config(nodes=3, vms=0)
    async with WatchdogEnv(config, control_plane_binaries, work, controllers=1) as e:
        await place_on(
            e,
            NODE,
            {name: RWX for name in MIGRATABLE} | {name: RWO for name in NOT_MIGRATABLE},
        )
        yield e


async def cordon(env: WatchdogEnv, node: str, on: bool) -> None:
    await env.cluster.kube.patch(NODES, node, {"spec": {"unschedulable": on or None}})


async def create_vm(
    env: WatchdogEnv,
    name: str,
    mode: str,
    node_selector: dict[str, str] | None = None,
    *,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> None:
    c = env.cluster
    await c.longhorn.provision("default", f"{name}-rootdisk", access_mode=mode)
    body = vm_manifest(name, "default", spread=False, labels=labels, annotations=annotations)
    if node_selector:
        body["spec"]["template"]["spec"]["nodeSelector"] = node_selector
    await c.kube.create(VMS, body)


def runs_on(env: WatchdogEnv, name: str, node: str) -> bool:
    c = env.cluster
    return (
        c.vmi_phase(name) == "Running"
        and c.vmi_node(name) == node
        and c.ledger.running_on(f"default/{name}") == [node]
    )


async def place_on(env: WatchdogEnv, node: str, vms: dict[str, str], **kw: Any) -> None:
    """Create `vms` (name → access mode) so that all of them run on `node`."""
    others = [n for n in env.cluster.fleet.members if n != node]
    for n in others:
        await cordon(env, n, True)
    try:
        for name, mode in vms.items():
            await create_vm(env, name, mode, **kw)
        await env.wait_for(
            lambda: all(runs_on(env, name, node) for name in vms), 60, f"VMs running on {node}"
        )
    finally:
        for n in others:
            await cordon(env, n, False)


def ours(env: WatchdogEnv, node: str, since: float = 0.0) -> dict[str, dict]:
    """The migrations the watchdog created for `node`'s evacuation (by its label)."""
    return {
        k: m
        for k, m in env.timeline.migrations.items()
        if m["evacuation"] == node and m["created"] >= since
    }


def max_active(env: WatchdogEnv, since: float) -> tuple[int, int]:
    """(most migrations from NODE unfinished at once, most in the cluster at once) since
    `since`."""
    most_node = most_cluster = 0
    for t, total, per_node in env.timeline.migration_samples:
        if t < since:
            continue
        most_cluster = max(most_cluster, total)
        most_node = max(most_node, per_node.get(NODE, 0))
    return most_node, most_cluster


async def test_a_degraded_node_live_migrates_what_can_move_within_the_limits_and_resets_nothing(
    env,
):
    await env.restore()
    c = env.cluster
    leader = await env.wait_leader()
    before = await leader.scrape()
    copies = {vm: next(iter(c.ledger.vms[f"default/{vm}"].running)) for vm in NOT_MIGRATABLE}
    wall = time.time()
    t0 = await env.fault("kubelet-stop", NODE)

    await env.wait_for(lambda: env.phase(NODE) == "Degraded", 30, f"{NODE} Degraded")
    finished = await _events(env, "EvacuationFinished", wall)
    await env.wait_for(
        lambda: all(c.vmi_node(vm) not in (None, NODE) for vm in MIGRATABLE),
        30,
        "the migratable VMs elsewhere",
    )
    after = await leader.scrape()
    mine = ours(env, NODE, t0)
    most_node, most_cluster = max_active(env, t0)
    print(
        f"\n[evacuation] {len(mine)} migrations, at most {most_node} from {NODE} and "
        f"{most_cluster} in the cluster at once; {finished[0]['message']}"
    )

    # The 6 moved, one migration each, never more than 2 from the node (it used both slots),
    # never more than the cluster limit.
    assert sorted(m["vmi"] for m in mine.values()) == sorted(f"default/{v}" for v in MIGRATABLE)
    assert all(m.get("phase") == "Succeeded" for m in mine.values()), mine
    assert most_node == OUTBOUND_PER_NODE
    assert most_cluster <= PER_CLUSTER
    for vm in MIGRATABLE:
        rec = c.ledger.vms[f"default/{vm}"]
        moved = [x for x in rec.copies if x.started_mono >= t0]
        assert [x.start_reason for x in moved] == [StartReason.MIGRATED_IN], (vm, moved)
        assert c.ledger.running_on(f"default/{vm}") == [moved[0].node] != [NODE]
    # The 4 on ReadWriteOnce volumes: reported with their reason, still running, same copy.
    reported = await _events(env, "VMNotMigratable", wall, count=len(NOT_MIGRATABLE))
    for vm in NOT_MIGRATABLE:
        (event,) = [e for e in reported if f"default/{vm} " in e["message"]]
        assert "DisksNotLiveMigratable" in event["message"], event["message"]
        assert list(c.ledger.vms[f"default/{vm}"].running) == [copies[vm]]
        assert runs_on(env, vm, NODE)
    # Zero resets: nothing tainted, nothing force-deleted, no VM ever stopped but by handover.
    for name in ("TaintOutOfService", "ForceDeletePods"):
        assert after.get("watchdog_actions_total", action=name) == before.get(
            "watchdog_actions_total", action=name
        )
    assert not [v for t, n, v in env.timeline.taints if n == NODE and t >= t0]
    stops = [
        x.stop_reason
        for rec in c.ledger.vms.values()
        for x in rec.copies
        if x.stopped_mono is not None and x.stopped_mono >= t0
    ]
    assert set(stops) <= {StopReason.MIGRATED_AWAY}, stops
    assert c.ledger.split_brain_seconds() == 0 and c.ledger.false_resets() == []

    def moved_by(result: str) -> float:
        return after.get("watchdog_migrations_total", result=result) - before.get(
            "watchdog_migrations_total", result=result
        )

    assert moved_by("succeeded") == len(MIGRATABLE)
    assert moved_by("not_migratable") == len(NOT_MIGRATABLE)
    assert moved_by("failed") == 0

    await env.fault("kubelet-start", NODE)
    await env.wait_for(lambda: env.phase(NODE) == "Healthy", 30, f"{NODE} Healthy")


def migration_policy(name: str, ns: dict[str, str], vmi: dict[str, str], **spec: Any) -> dict:
    return {
        "apiVersion": "migrations.kubevirt.io/v1alpha1",
        "kind": "MigrationPolicy",
        "metadata": {"name": name},
        "spec": {
            "selectors": {"namespaceSelector": ns, "virtualMachineInstanceSelector": vmi},
            **spec,
        },
    }


async def test_a_migration_past_vm_migration_timeout_is_reported_under_its_policy_resets_nothing(
    env,
):
    """A guest whose memory copy does not finish: the operator learns which MigrationPolicy
    it migrates under (the most specific of two that match), then, once the evacuation has
    run longer than the policy's `vmMigrationTimeout`, an EvacuationTimeout and the
    `timeout` count; the VM keeps running where it is, exactly once, and nothing is reset."""
    await env.restore()
    c = env.cluster
    leader = await env.wait_leader()
    timeout_s = 6.0
    # Two policies select the VM by its label; the one also selecting its namespace's label
    # is more specific and is the one KubeVirt applies.
    await c.kube.create(
        MIGRATION_POLICIES,
        migration_policy("in-memory-db", {}, {"workload": "in-memory-db"}, allowPostCopy=True),
    )
    await c.kube.create(
        MIGRATION_POLICIES,
        migration_policy(
            "gold-in-memory-db",
            {"tier": "gold"},
            {"workload": "in-memory-db"},
            bandwidthPerMigration="64Mi",
            completionTimeoutPerGiB=800,
        ),
    )
    await c.kube.patch(NAMESPACES, "default", {"metadata": {"labels": {"tier": "gold"}}})
    await c.kube.create(
        SETTINGS,
        setting_manifest("1.7", {"enable": True, "period": 5, "vmMigrationTimeout": timeout_s}),
    )
    try:

        async def policy_read() -> bool:
            m = await leader.scrape()
            return m.get("watchdog_policy_period_seconds") == 5

        await env.wait_for(policy_read, 20, "the controller reads the Harvester policy")
        # Its copy would take 400 s (100 s at this time scale): far past the timeout.
        await place_on(
            env,
            NODE,
            {"slow-db": RWX},
            labels={"workload": "in-memory-db"},
            annotations={MIGRATION_SECONDS_ANNOTATION: "400"},
        )
        (copy,) = c.ledger.vms["default/slow-db"].running
        before = await leader.scrape()
        wall = time.time()
        t0 = await env.fault("kubelet-stop", NODE)
        await env.wait_for(lambda: env.phase(NODE) == "Degraded", 30, f"{NODE} Degraded")

        reported: list[dict] = []

        async def migrating_reported() -> bool:
            reported[:] = await env.events("EvacuationMigrating", "slow-db", since=wall)
            return bool(reported)

        await env.wait_for(migrating_reported, 30, "EvacuationMigrating on the VMI")
        message = reported[0]["message"]
        assert reported[0]["involvedObject"]["kind"] == "VirtualMachineInstance"
        assert "MigrationPolicy gold-in-memory-db" in message, message
        assert "bandwidthPerMigration=64Mi" in message and "completionTimeoutPerGiB=800" in message

        (timed_out,) = await _events(env, "EvacuationTimeout", wall)
        t_timeout = time.monotonic()
        after = await leader.scrape()
        print(f"\n[migration timeout] {message}; {timed_out['message']}")
        assert timed_out["type"] == "Warning"
        assert f"after {timeout_s:.0f}s" in timed_out["message"], timed_out["message"]
        # Not before the limit: the evacuation started after the node turned Degraded.
        t_degraded = env.timeline.first(env.timeline.phases, NODE, "Degraded", after=t0)
        assert t_degraded is not None and t_timeout - t_degraded >= timeout_s
        (slow,) = [m for m in ours(env, NODE, t0).values() if m["vmi"] == "default/slow-db"]
        assert slow.get("phase") not in ("Succeeded", "Failed"), slow

        def moved_by(result: str) -> float:
            return after.get("watchdog_migrations_total", result=result) - before.get(
                "watchdog_migrations_total", result=result
            )

        assert moved_by("timeout") == 1
        assert moved_by("succeeded") == moved_by("failed") == 0
        # The VM runs where it ran, once; nothing tainted or force-deleted.
        assert list(c.ledger.vms["default/slow-db"].running) == [copy]
        assert runs_on(env, "slow-db", NODE)
        for name in ("TaintOutOfService", "ForceDeletePods"):
            assert after.get("watchdog_actions_total", action=name) == before.get(
                "watchdog_actions_total", action=name
            )
        assert not [v for t, n, v in env.timeline.taints if n == NODE and t >= t0]

        # The kubelet returns: the evacuation stops, the hanging migration is ended, the VM
        # still runs on its node, once.
        await env.fault("kubelet-start", NODE)
        await env.wait_for(lambda: env.phase(NODE) == "Healthy", 30, f"{NODE} Healthy")

        def slow_ended() -> bool:
            return all(
                x.get("phase") in ("Succeeded", "Failed") or "deleted" in x
                for x in ours(env, NODE, t0).values()
            )

        await env.wait_for(slow_ended, 30, "the hanging migration ended")
        assert runs_on(env, "slow-db", NODE)
        assert list(c.ledger.vms["default/slow-db"].running) == [copy]
        assert c.ledger.split_brain_seconds() == 0 and c.ledger.false_resets() == []
    finally:
        await c.kube.delete(SETTINGS, POLICY_SETTING)
        for name in ("in-memory-db", "gold-in-memory-db"):
            await c.kube.delete(MIGRATION_POLICIES, name)
        await c.kube.patch(NAMESPACES, "default", {"metadata": {"labels": {"tier": None}}})
        # Later migrations of this VM copy at the usual speed.
        with contextlib.suppress(ApiError):
            await c.kube.patch(
                VMIS,
                "slow-db",
                {"metadata": {"annotations": {MIGRATION_SECONDS_ANNOTATION: None}}},
                "default",
            )


async def test_a_cluster_limit_used_by_other_migrations_holds_and_a_returning_kubelet_stops_it(
    env,
):
    """Runs last: it leaves two migrations stuck in Scheduling (their targets cannot be placed)
    and the test cluster's migration controller keeps the slots of deleted ones."""
    await env.restore()
    c = env.cluster
    leader = await env.wait_leader()
    before = await leader.scrape()
    # The KubeVirt CR allows 3 migrations in the cluster; 2 are taken by migrations the
    # watchdog did not create and that will not finish soon: VMs pinned to node-3, whose
    # migration targets (never the source node) fit nowhere.
    await c.kube.patch(
        KUBEVIRTS,
        "kubevirt",
        {"spec": {"configuration": {"migrations": {"parallelMigrationsPerCluster": 3}}}},
        "kubevirt",
    )
    pinned = {"kubernetes.io/hostname": "node-3"}
    for name in ("pin-1", "pin-2"):
        await create_vm(env, name, RWX, node_selector=pinned)
    await env.wait_for(
        lambda: runs_on(env, "pin-1", "node-3") and runs_on(env, "pin-2", "node-3"),
        60,
        "pinned VMs running",
    )
    t_others = time.monotonic()
    for name in ("pin-1", "pin-2"):
        await c.kube.create(
            VMIMS,
            {
                "apiVersion": "kubevirt.io/v1",
                "kind": "VirtualMachineInstanceMigration",
                "metadata": {"name": f"other-{name}", "namespace": "default"},
                "spec": {"vmiName": name},
            },
        )
    others = {"default/other-pin-1", "default/other-pin-2"}

    def others_hold_slots() -> bool:
        ms = env.timeline.migrations
        return all(ms.get(k, {}).get("phase") == "Scheduling" for k in others)

    await env.wait_for(others_hold_slots, 30, "two other migrations holding cluster slots")
    movers = {"mv-1": RWX, "mv-2": RWX, "mv-3": RWX}
    await place_on(env, NODE, movers)

    wall = time.time()
    t0 = await env.fault("kubelet-stop", NODE)
    await env.wait_for(lambda: env.phase(NODE) == "Degraded", 30, f"{NODE} Degraded")

    def one_done() -> bool:
        return any(m.get("phase") == "Succeeded" for m in ours(env, NODE, t0).values())

    await env.wait_for(one_done, 60, "a first evacuation migration done")
    # Mid-evacuation, the kubelet comes back.
    t_back = await env.fault("kubelet-start", NODE)
    await env.wait_for(lambda: env.phase(NODE) == "Healthy", 30, f"{NODE} Healthy")
    t_healthy = env.timeline.first(env.timeline.phases, NODE, "Healthy", after=t_back)
    assert t_healthy is not None

    def settled() -> bool:
        return all(m.get("phase") in ("Succeeded", "Failed") or "deleted" in m for m in mine())

    def mine() -> list[dict]:
        return list(ours(env, NODE, t0).values())

    await env.wait_for(settled, 30, "no evacuation migration left running")
    after = await leader.scrape()
    most_node, most_cluster = max_active(env, t0)
    print(
        f"\n[cluster limit 3, 2 taken] watchdog migrations {len(mine())}, at most {most_node} "
        f"from {NODE}, {most_cluster} in the cluster at once"
    )

    # Only the one free cluster slot was used, though the node's own limit allows 2.
    assert most_node == 1
    assert most_cluster <= 3
    assert all(m["created"] >= t_others for m in mine())
    # Stopped cleanly: nothing started once HEALTHY, what was in flight was ended, the VMs that
    # had not moved run where they were, each exactly once; nothing reset.
    assert not [m for m in mine() if m["created"] > t_healthy + 0.5]
    assert after.get("watchdog_actions_total", action="StopEvacuation") > before.get(
        "watchdog_actions_total", action="StopEvacuation"
    )
    moved = [vm for vm in movers if c.vmi_node(vm) != NODE]
    stayed = [vm for vm in movers if runs_on(env, vm, NODE)]
    assert moved and stayed and len(moved) + len(stayed) == len(movers), (moved, stayed)
    assert await env.events("NodeRecovered", NODE, since=wall)
    for name in ("TaintOutOfService", "ForceDeletePods"):
        assert after.get("watchdog_actions_total", action=name) == before.get(
            "watchdog_actions_total", action=name
        )
    for vm in [*movers, *NOT_MIGRATABLE]:
        assert len(c.ledger.vms[f"default/{vm}"].running) == 1
    assert c.ledger.split_brain_seconds() == 0 and c.ledger.false_resets() == []


async def _events(env: WatchdogEnv, reason: str, since: float, count: int = 1) -> list[dict]:
    found: list[dict] = []

    async def enough() -> bool:
        found[:] = await env.events(reason, NODE, since=since)
        return len(found) >= count

    await env.wait_for(enough, 60, f"{count} {reason} Event(s) on {NODE}")
    return found
