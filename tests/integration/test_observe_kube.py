"""The observers against the test cluster's real kube-apiserver: list+watch, 410 Gone, API
outages, absent CRDs, and the projections the controller reads.

Objects are created with the simulators' own admin client (chaos.sim.informer.Kube), not with
the code under test. Every wait polls a condition against a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml

from chaos.sim.binaries import ControlPlaneBinaries
from chaos.sim.controlplane import ControlPlane, OutageMode
from chaos.sim.informer import CRDS, LEASES, NAMESPACES, NODES, PODS, ApiError, Kube, Resource
from tests.eventually import eventually
from watchdog.decide.names import NODE_LEASE_NAMESPACE
from watchdog.decide.observations import LauncherPod
from watchdog.observe.cluster_cache import PODS as LAUNCHER_PODS
from watchdog.observe.cluster_cache import ClusterCache
from watchdog.observe.informer import EventKind, Informer, RestartCause
from watchdog.observe.projections import project_pod, project_vmi
from watchdog.observe.records import PodRecord, VMIRecord
from watchdog.runtime.settings import Settings
from watchdog.transport.kube import KubeApi, load_api_client

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "chaos" / "sim" / "crds"
VMIS = Resource("/apis/kubevirt.io/v1", "virtualmachineinstances")
VMS = Resource("/apis/kubevirt.io/v1", "virtualmachines")
VMIMS = Resource("/apis/kubevirt.io/v1", "virtualmachineinstancemigrations")
KUBEVIRTS = Resource("/apis/kubevirt.io/v1", "kubevirts")
HARVESTER_SETTINGS = Resource("/apis/harvesterhci.io/v1beta1", "settings", namespaced=False)
VOLUME_ATTACHMENTS = Resource("/apis/storage.k8s.io/v1", "volumeattachments", namespaced=False)
MIGRATION_POLICIES = Resource(
    "/apis/migrations.kubevirt.io/v1alpha1", "migrationpolicies", namespaced=False
)

# Every test but the memory measurement needs the control plane (marked one by one).
pytestmark = [pytest.mark.asyncio(loop_scope="module")]


# -- helpers ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running(*coros: Any) -> AsyncIterator[None]:
    """Run informers/caches for the duration of the block (the runtime's TaskGroup, here)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        yield
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
            assert t.cancelled(), "a run() loop ended on its own"


def settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {"api_request_timeout_s": 3.0, "watch_timeout_s": 5}
    return Settings(**{**base, **overrides})


async def install_crds(kube: Kube, *names: str) -> None:
    for name in names:
        doc = yaml.safe_load((CRD_DIR / f"{name}.yaml").read_text())
        with contextlib.suppress(ApiError):
            await kube.create(CRDS, doc)
        crd_name = doc["metadata"]["name"]

        async def established(crd_name: str = crd_name) -> bool:
            crd = await kube.get(CRDS, crd_name)
            conds = crd.get("status", {}).get("conditions") or []
            return any(c["type"] == "Established" and c["status"] == "True" for c in conds)

        deadline = time.monotonic() + 20
        while not await established():
            assert time.monotonic() < deadline, f"CRD {crd_name} not established"
            await asyncio.sleep(0.1)


async def create_node(kube: Kube, name: str, *, ready: str = "True") -> None:
    await kube.create(
        NODES,
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": {"kubevirt.io/schedulable": "true"}},
        },
    )
    await kube.patch(
        NODES,
        name,
        {
            "status": {
                "conditions": [
                    {
                        "type": "Ready",
                        "status": ready,
                        "reason": "KubeletReady",
                        "lastHeartbeatTime": "2026-01-01T00:00:00Z",
                        "lastTransitionTime": "2026-01-01T00:00:00Z",
                    }
                ]
            }
        },
        sub="status",
    )


def launcher_pod(name: str, node: str, vmi: str, namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                "kubevirt.io": "virt-launcher",
                "vm.kubevirt.io/name": vmi,
                "kubevirt.io/created-by": f"uid-of-{vmi}",
            },
        },
        "spec": {
            "nodeName": node,
            # No taint may evict it while a test runs (these nodes have no kubelet).
            "tolerations": [{"operator": "Exists"}],
            "containers": [{"name": "compute", "image": "virt-launcher"}],
            "volumes": [{"name": "disk", "persistentVolumeClaim": {"claimName": f"{vmi}-disk"}}],
        },
    }


async def set_pod_ready(kube: Kube, namespace: str, name: str, ready: bool) -> None:
    status = "True" if ready else "False"
    await kube.patch(
        PODS,
        name,
        {
            "status": {
                "phase": "Running",
                "conditions": [
                    {"type": "Ready", "status": status},
                    {"type": "ContainersReady", "status": status},
                ],
            }
        },
        namespace,
        sub="status",
        content_type="application/strategic-merge-patch+json",
    )


# -- fixtures ---------------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(control_plane_binaries: ControlPlaneBinaries) -> AsyncIterator[ControlPlane]:
    async with ControlPlane(binaries=control_plane_binaries) as cp:
        yield cp


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def admin(cluster: ControlPlane) -> AsyncIterator[Kube]:
    kube = await Kube.from_kubeconfig(cluster.admin_kubeconfig)
    # KubeVirt is installed; Harvester is not (test_absent_crd_... installs it itself).
    await install_crds(
        kube,
        "kubevirt.io_virtualmachineinstances",
        "kubevirt.io_virtualmachines",
        "kubevirt.io_virtualmachineinstancemigrations",
        "kubevirt.io_kubevirts",
    )
    try:
        yield kube
    finally:
        await kube.close()


@pytest_asyncio.fixture(loop_scope="module")
async def api(cluster: ControlPlane) -> AsyncIterator[KubeApi]:
    client = await load_api_client(cluster.admin_kubeconfig)
    kube_api = KubeApi(client, request_timeout_s=3.0, watch_timeout_s=5)
    try:
        yield kube_api
    finally:
        await kube_api.close()


# -- tests ------------------------------------------------------------------------------------


@pytest.mark.cluster
async def test_cache_lists_then_follows_nodes_and_launcher_pods(admin: Kube, api: KubeApi) -> None:
    await create_node(admin, "follow-1")
    await admin.create(PODS, launcher_pod("virt-launcher-a", "follow-1", "vm-a"))
    await set_pod_ready(admin, "default", "virt-launcher-a", True)
    # Not a launcher: the label selector keeps it out of the cache.
    other = launcher_pod("plain", "follow-1", "none")
    other["metadata"]["labels"] = {"app": "plain"}
    await admin.create(PODS, other)

    events: list[tuple[str, EventKind, str]] = []
    cache = ClusterCache(
        api, settings(), on_event=lambda res, kind, key, old, new: events.append((res, kind, key))
    )
    async with running(cache.run()):
        await cache.wait_synced(20)
        node = cache.node("follow-1")
        assert node is not None and node.ready == "True"
        assert node.label("kubevirt.io/schedulable") == "true"
        assert cache.launcher_pods("follow-1") == (
            LauncherPod("default", "virt-launcher-a", "vm-a", ready=True, terminating=False),
        )
        assert cache.pod("default", "plain") is None

        # Followed: a new pod, a Ready flip, a normal delete (Terminating: no kubelet here).
        await admin.create(PODS, launcher_pod("virt-launcher-b", "follow-1", "vm-b"))
        await eventually(lambda: len(cache.launcher_pods("follow-1")) == 2, what="pod b seen")
        await set_pod_ready(admin, "default", "virt-launcher-a", False)
        await eventually(
            lambda: not cache.pod("default", "virt-launcher-a").ready,  # type: ignore[union-attr]
            what="Ready=False seen",
        )
        await admin.delete(PODS, "virt-launcher-b", "default")
        await eventually(
            lambda: cache.pod("default", "virt-launcher-b").terminating,  # type: ignore[union-attr]
            what="Terminating seen",
        )
        await admin.delete(PODS, "virt-launcher-b", "default", grace_period_s=0)
        await eventually(lambda: cache.pod("default", "virt-launcher-b") is None, what="pod gone")
        assert [p.name for p in cache.pods_on("follow-1")] == ["virt-launcher-a"]

        await admin.delete(NODES, "follow-1")
        await eventually(lambda: cache.node("follow-1") is None, what="node deletion seen")
    assert ("nodes", EventKind.DELETED, "follow-1") in events
    assert ("pods", EventKind.DELETED, "default/virt-launcher-b") in events
    stats = cache.statistics()
    assert stats.informers["pods"].restarts == {}
    await admin.delete(PODS, "virt-launcher-a", "default", grace_period_s=0)
    await admin.delete(PODS, "plain", "default", grace_period_s=0)


@pytest.mark.cluster
async def test_a_real_410_gone_relists_quietly_and_the_cache_stays_correct(
    cluster: ControlPlane, admin: Kube, api: KubeApi, caplog: pytest.LogCaptureFixture
) -> None:
    await create_node(admin, "gone-1")
    for i in range(3):
        await admin.create(PODS, launcher_pod(f"gone-pod-{i}", "gone-1", f"vm-{i}"))
    restarts: list[tuple[str, RestartCause]] = []
    deleted: list[str] = []
    informer: Informer[PodRecord | None] = Informer(
        api,
        LAUNCHER_PODS,
        project_pod(frozenset()),
        label_selector="kubevirt.io=virt-launcher",
        on_restart=lambda res, cause: restarts.append((res, cause)),
        on_event=lambda kind, key, old, new: deleted.append(key) if kind == "DELETED" else None,
    )
    async with running(informer.run()):
        await informer.wait_synced(20)
        assert {"default/gone-pod-0", "default/gone-pod-1", "default/gone-pod-2"} <= set(
            informer.items
        )
    old_rv = informer.resource_version
    assert old_rv is not None

    # While nobody watches: changes, then compaction past the informer's resourceVersion.
    await admin.delete(PODS, "gone-pod-0", "default", grace_period_s=0)
    await admin.create(PODS, launcher_pod("gone-pod-3", "gone-1", "vm-3"))
    for _ in range(5):  # more writes, so the compacted revision is well past old_rv
        await admin.patch(
            PODS, "gone-pod-1", {"metadata": {"labels": {"touch": str(_)}}}, "default"
        )
    await cluster.compact()

    caplog.set_level("WARNING", logger="watchdog.observe")
    async with running(informer.run()):  # resumes the watch from old_rv → 410
        await eventually(lambda: bool(restarts), what="relist after 410")
        await eventually(lambda: "default/gone-pod-3" in informer.items, what="new pod listed")
    assert restarts == [("pods", RestartCause.GONE)]
    assert "default/gone-pod-0" not in informer.items
    assert "default/gone-pod-0" in deleted, "the relist reports what vanished meanwhile"
    assert int(informer.resource_version or 0) > int(old_rv)
    assert informer.statistics().restarts == {"gone": 1}
    assert not [r for r in caplog.records if r.name.startswith("watchdog.observe")], (
        "a 410 is routine: no warning"
    )
    for i in (1, 2, 3):
        await admin.delete(PODS, f"gone-pod-{i}", "default", grace_period_s=0)


@pytest.mark.cluster
async def test_a_probe_asked_for_is_sent_at_once_not_at_the_next_interval(api: KubeApi) -> None:
    """A Lease past its deadline waits for an API answer to a probe sent after it; the
    controller asks for that probe (`probe_soon`) rather than waiting up to a whole interval,
    which in a fence decision is time the VMs stay down."""
    answers: list[float] = []
    cache = ClusterCache(
        api,
        settings(),
        on_api_answer=lambda: answers.append(time.monotonic()),
        probe_interval_s=60.0,  # the next periodic probe is ≥ 54 s away
    )
    async with running(cache.run()):
        await eventually(lambda: len(answers) == 1, what="first probe answered")
        first = cache.api_answered_at
        assert first is not None
        asked = time.monotonic()
        cache.probe_soon()
        await eventually(lambda: len(answers) == 2, timeout_s=5, what="asked-for probe")
        answered = cache.api_answered_at
        assert answered is not None and answered >= asked, "sent after it was asked for"
        assert answers[1] - asked < 5.0
        # Asked for twice in a row: the requests coalesce into one more probe.
        cache.probe_soon()
        cache.probe_soon()
        await eventually(lambda: len(answers) == 3, timeout_s=5, what="second asked-for probe")


@pytest.mark.cluster
@pytest.mark.parametrize(
    "mode",
    [
        pytest.param("freeze", id="hung apiserver (SIGSTOP)"),
        pytest.param("stop", id="apiserver down (connection refused, restart)"),
    ],
)
async def test_api_outage_flips_health_down_then_up_and_the_cache_catches_up(
    cluster: ControlPlane, admin: Kube, api: KubeApi, mode: OutageMode
) -> None:
    await create_node(admin, f"outage-{mode}-1")
    health: list[bool] = []
    went_down: list[float] = []  # when the cache reported the API down

    def on_health(up: bool) -> None:
        health.append(up)
        if not up:
            went_down.append(time.monotonic())

    informer_health: list[tuple[str, bool]] = []
    answers: list[float] = []  # when each probe answer was handed over
    cache = ClusterCache(
        api,
        settings(),
        on_health=on_health,
        on_api_answer=lambda: answers.append(time.monotonic()),
        probe_interval_s=0.5,
        backoff_max_s=1.0,
    )
    cache.nodes.add_health_handler(lambda res, up: informer_health.append((res, up)))
    async with running(cache.run()):
        await cache.wait_synced(20)
        await eventually(lambda: cache.api_up, what="API up")
        up_since = cache.api_up_since
        assert up_since is not None

        started = time.monotonic()
        async with cluster.api_outage(mode):
            probe_s = await eventually(lambda: not cache.api_up, what="API down (probe)")
            # A frozen server keeps the watch open: the informer notices when its read
            # timeout (watch timeout + slack) expires. A stopped one closes it at once.
            await eventually(lambda: not cache.nodes.up, timeout_s=25, what="node informer down")
            assert cache.api_up_since is None
            # No probe sent during the outage was answered: the last answer is older, and it
            # is stamped when its probe was sent (the Lease gate counts on that, signals.py).
            answered = cache.api_answered_at
            assert answered is not None and answered < started, (answered, started)
            assert answers  # every answer was handed over (the runtime re-decides on it)
        down_for = time.monotonic() - started
        # Changes right after the outage (none can be made during it).
        await create_node(admin, f"outage-{mode}-2")
        await admin.create(PODS, launcher_pod(f"outage-{mode}", f"outage-{mode}-2", "vm-outage"))
        await eventually(lambda: cache.api_up, timeout_s=20, what="API up again")
        # Answers resume: one to a probe sent after the outage comes. (Not "the latest answer
        # is from after half the outage": a probe sent into a frozen server is answered at the
        # thaw, stamped when it was sent, and may be the latest answer for a moment.)
        await eventually(
            lambda: (cache.api_answered_at or 0.0) > started + down_for,
            timeout_s=10,
            what="an answer to a probe sent after the outage",
        )
        await eventually(
            lambda: cache.node(f"outage-{mode}-2") is not None, what="node after outage"
        )
        await eventually(
            lambda: len(cache.launcher_pods(f"outage-{mode}-2")) == 1, what="pod after outage"
        )
    assert probe_s < 3.0, f"the probe took {probe_s:.1f}s to notice the outage"
    assert health == [True, False, True]
    assert informer_health[-2:] == [("nodes", False), ("nodes", True)]
    # Up since the return, not since before the outage. (Not "after half the outage": a
    # restarted apiserver can answer before the outage's context has finished waiting for it.)
    assert cache.api_up_since is not None and cache.api_up_since > went_down[-1] > up_since
    await admin.delete(PODS, f"outage-{mode}", "default", grace_period_s=0)


@pytest.mark.cluster
async def test_lease_renewal_is_stamped_on_the_local_monotonic_clock(
    admin: Kube, api: KubeApi
) -> None:
    now = [1000.0]  # the controller's monotonic clock, driven by the test
    cache = ClusterCache(api, settings(), clock=lambda: now[0], probe_interval_s=None)
    lease = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "clock-1", "namespace": NODE_LEASE_NAMESPACE},
        # A remote wall clock decades off: it must not matter.
        "spec": {
            "holderIdentity": "clock-1",
            "leaseDurationSeconds": 40,
            "renewTime": "2001-01-01T00:00:00.000000Z",
        },
    }
    with contextlib.suppress(ApiError):
        await admin.create(
            Resource("/api/v1", "namespaces", namespaced=False),
            {"metadata": {"name": NODE_LEASE_NAMESPACE}},
        )
    await admin.create(LEASES, lease, NODE_LEASE_NAMESPACE)
    async with running(cache.run()):
        await cache.wait_synced(20)
        first = cache.lease("clock-1")
        assert first is not None and first.renewed_at == 1000.0

        now[0] = 1005.0
        await admin.patch(
            LEASES,
            "clock-1",
            {"spec": {"renewTime": "2001-01-01T00:00:10.000000Z"}},
            NODE_LEASE_NAMESPACE,
        )
        await eventually(
            lambda: cache.lease("clock-1").renewed_at == 1005.0,  # type: ignore[union-attr]
            what="renewal stamped with the local clock",
        )
        now[0] = 1010.0  # a change that is not a renewal keeps the stamp
        await admin.patch(
            LEASES, "clock-1", {"spec": {"leaseDurationSeconds": 41}}, NODE_LEASE_NAMESPACE
        )
        await eventually(
            lambda: cache.lease("clock-1").duration_s == 41,  # type: ignore[union-attr]
            what="lease update seen",
        )
        renewed = cache.lease("clock-1")
        assert renewed is not None
        assert renewed.renewed_at == 1005.0
        assert renewed.renew_time == "2001-01-01T00:00:10.000000Z"


@pytest.mark.cluster
async def test_kubevirt_objects_are_projected_and_indexed_by_node(
    admin: Kube, api: KubeApi
) -> None:
    await create_node(admin, "kv-1")
    vmi = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {
            "name": "vm-kv",
            "namespace": "default",
            # An ownerReference to a VM that does not exist would let the garbage collector
            # delete the VMI: the label names the VM instead.
            "labels": {"app": "db", "kubevirt.io/nodeName": "kv-1", "vm.kubevirt.io/name": "vm-kv"},
            "annotations": {"node-watchdog.io/evacuation-priority": "7"},
        },
        "spec": {"domain": {"memory": {"guest": "2Gi"}}},
    }
    created = await admin.create(VMIS, vmi, "default")
    await admin.patch(
        VMIS,
        "vm-kv",
        {
            "status": {
                "phase": "Running",
                "nodeName": "kv-1",
                "conditions": [
                    {"type": "Ready", "status": "True"},
                    {
                        "type": "LiveMigratable",
                        "status": "False",
                        "reason": "DisksNotLiveMigratable",
                        "message": "PVC disk is not shared",
                    },
                ],
            }
        },
        "default",
        sub="status",
    )
    await admin.create(
        VMS,
        {
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachine",
            "metadata": {"name": "vm-legacy", "namespace": "default"},
            "spec": {"running": True, "template": {"spec": {}}},
        },
        "default",
    )
    await admin.create(
        KUBEVIRTS,
        {
            "apiVersion": "kubevirt.io/v1",
            "kind": "KubeVirt",
            "metadata": {"name": "kubevirt", "namespace": "default"},
            "spec": {"configuration": {"migrations": {"parallelMigrationsPerCluster": 9}}},
        },
        "default",
    )
    await admin.create(
        VMIMS,
        {
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstanceMigration",
            "metadata": {
                "name": "evacuate-vm-kv-x",
                "namespace": "default",
                # The legacy label (a release before our own domain): still read.
                "labels": {"node-watchdog.kubevirt.io/evacuation": "kv-1"},
            },
            "spec": {"vmiName": "vm-kv"},
        },
        "default",
    )
    cache = ClusterCache(api, settings(delete_volume_attachments=True), probe_interval_s=None)
    await admin.create(
        VOLUME_ATTACHMENTS,
        {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "VolumeAttachment",
            "metadata": {"name": "csi-kv-1-disk"},
            "spec": {
                "attacher": "driver.longhorn.io",
                "nodeName": "kv-1",
                "source": {"persistentVolumeName": "pv-disk"},
            },
        },
    )
    async with running(cache.run()):
        await cache.wait_synced(20)
        await eventually(lambda: bool(cache.vmis_on("kv-1")), what="VMI indexed on its node")
        (record,) = cache.vmis_on("kv-1")
        assert record.uid == created["metadata"]["uid"]
        assert (record.phase, record.ready, record.vm, record.priority) == (
            "Running",
            True,
            "vm-kv",
            7,
        )
        assert record.memory_bytes == 2 * 2**30
        assert record.live_migratable == "False"
        assert record.live_migratable_reason == "DisksNotLiveMigratable"
        assert dict(record.labels) == {"app": "db", "vm.kubevirt.io/name": "vm-kv"}, (
            "KubeVirt's kubevirt.io/ bookkeeping labels are dropped"
        )
        evac = record.evacuation()
        assert not evac.live_migratable and evac.not_migratable_reason == "DisksNotLiveMigratable"

        vm = cache.vm("default", "vm-legacy")
        assert vm is not None and vm.run_strategy == "Always"
        assert cache.migration_limits().per_cluster == 9
        assert cache.migration_limits().outbound_per_node == 2, "unset → configured default"
        assert [m.name for m in cache.migrations_from("kv-1")] == ["evacuate-vm-kv-x"]
        assert cache.active_migrations() == 1
        await admin.patch(
            VMIMS, "evacuate-vm-kv-x", {"status": {"phase": "Succeeded"}}, "default", sub="status"
        )
        await eventually(lambda: cache.active_migrations() == 0, what="migration finished")
        assert cache.migrations_from("kv-1") == ()
        (va,) = cache.volume_attachments_on("kv-1")
        assert (va.pv, va.attacher) == ("pv-disk", "driver.longhorn.io")

        await admin.delete(VMIS, "vm-kv", "default")
        await eventually(lambda: not cache.vmis_on("kv-1"), what="VMI deletion indexed")


@pytest.mark.cluster
async def test_an_absent_harvester_crd_is_reported_and_picked_up_once_installed(
    admin: Kube, api: KubeApi
) -> None:
    cache = ClusterCache(api, settings(), probe_interval_s=None, absent_retry_s=0.5)
    async with running(cache.run()):
        await cache.wait_synced(20)
        assert cache.harvester_present is False
        assert cache.harvester_policy() is None
        stats = cache.statistics()
        assert stats.harvester == "absent (no Harvester: policy from config)"
        assert stats.kubevirt == "present"
        assert cache.api_up, "an absent CRD is not an unreachable API"

        await install_crds(admin, "harvesterhci.io_settings")
        value = json.dumps({"enable": True, "period": 30})
        await admin.create(
            HARVESTER_SETTINGS,
            {
                "apiVersion": "harvesterhci.io/v1beta1",
                "kind": "Setting",
                "metadata": {"name": "vm-force-reset-policy"},
                "default": '{"enable":true,"period":15,"vmMigrationTimeout":180}',
                "value": value,
            },
        )
        await admin.create(
            HARVESTER_SETTINGS,
            {
                "apiVersion": "harvesterhci.io/v1beta1",
                "kind": "Setting",
                "metadata": {"name": "unrelated-setting"},
                "value": "x",
            },
        )
        await eventually(lambda: cache.harvester_policy() is not None, what="setting picked up")
        policy = cache.harvester_policy()
        assert policy is not None and policy.value == value
        assert cache.harvester_present is True
        assert len(cache.harvester_settings) == 1, "only the policy Setting is watched"
        assert cache.statistics().informers["settings.harvesterhci.io"].restarts == {"appeared": 1}


@pytest.mark.cluster
async def test_migration_policies_are_absent_until_installed_then_select_by_vmi_and_namespace(
    admin: Kube, api: KubeApi
) -> None:
    """Without the MigrationPolicy CRD no policy applies and nothing is an error; once policies
    exist, the one KubeVirt would apply is found from the VMI's and its namespace's labels."""
    await admin.create(
        NAMESPACES,
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "tenant-pol"}},
    )
    await admin.create(
        VMIS,
        {
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstance",
            "metadata": {"name": "vm-pol", "namespace": "tenant-pol", "labels": {"app": "db"}},
            "spec": {"domain": {"memory": {"guest": "1Gi"}}},
        },
        "tenant-pol",
    )
    cache = ClusterCache(api, settings(), probe_interval_s=None, absent_retry_s=0.5)
    async with running(cache.run()):
        await cache.wait_synced(20)
        await eventually(
            lambda: cache.vmi("tenant-pol", "vm-pol") is not None, what="VMI in the cache"
        )
        vmi = cache.vmi("tenant-pol", "vm-pol")
        assert vmi is not None
        assert cache.migration_policies.absent and cache.api_up
        assert cache.migration_policy(vmi) is None

        await install_crds(admin, "migrations.kubevirt.io_migrationpolicies")

        def policy(
            name: str, ns: dict[str, str], vmi_labels: dict[str, str], **spec: Any
        ) -> dict[str, Any]:
            return {
                "apiVersion": "migrations.kubevirt.io/v1alpha1",
                "kind": "MigrationPolicy",
                "metadata": {"name": name},
                "spec": {
                    "selectors": {
                        "namespaceSelector": ns,
                        "virtualMachineInstanceSelector": vmi_labels,
                    },
                    **spec,
                },
            }

        await admin.create(
            MIGRATION_POLICIES,
            policy("by-app", {}, {"app": "db"}, allowPostCopy=True, completionTimeoutPerGiB=800),
        )
        await admin.create(MIGRATION_POLICIES, policy("other-app", {}, {"app": "web"}))
        await eventually(lambda: len(cache.migration_policies) == 2, what="both policies picked up")
        chosen = cache.migration_policy(vmi)
        assert chosen is not None and chosen.name == "by-app"
        assert (chosen.allow_post_copy, chosen.completion_timeout_per_gib) == (True, 800)

        # A namespace label makes a more specific policy match: it wins (2 labels over 1).
        await admin.create(
            MIGRATION_POLICIES,
            policy("gold-db", {"tier": "gold"}, {"app": "db"}, bandwidthPerMigration="64Mi"),
        )
        await eventually(lambda: len(cache.migration_policies) == 3, what="third policy")
        assert cache.migration_policy(vmi).name == "by-app", "namespace not labelled yet"
        await admin.patch(NAMESPACES, "tenant-pol", {"metadata": {"labels": {"tier": "gold"}}})

        def gold() -> bool:
            p = cache.migration_policy(vmi)
            return p is not None and p.name == "gold-db"

        await eventually(gold, what="namespace labels followed")
        assert cache.migration_policy(vmi).bandwidth_per_migration == "64Mi"
        assert cache.statistics().informers[
            "migrationpolicies.migrations.kubevirt.io"
        ].restarts == {"appeared": 1}


# -- memory (no cluster) ----------------------------------------------------------------------


def _raw_pod(i: int) -> dict[str, Any]:
    """A virt-launcher pod as the API returns it, trimmed only of managedFields."""
    vmi = f"vm-{i:06d}"
    return {
        "metadata": {
            "name": f"virt-launcher-{vmi}-abcde",
            "namespace": f"tenant-{i % 50}",
            "uid": f"3cbb32a1-f11c-4065-99e6-{i:012d}",
            "resourceVersion": str(10_000_000 + i),
            "labels": {
                "kubevirt.io": "virt-launcher",
                "kubevirt.io/created-by": f"2076f683-2d58-4f46-a2d9-{i:012d}",
                "vm.kubevirt.io/name": vmi,
            },
            "annotations": {
                "kubevirt.io/domain": vmi,
                "kubectl.kubernetes.io/default-container": "compute",
            },
            "ownerReferences": [
                {
                    "kind": "VirtualMachineInstance",
                    "name": vmi,
                    "uid": f"2076f683-2d58-4f46-a2d9-{i:012d}",
                }
            ],
        },
        "spec": {
            "nodeName": f"node-{i % 5000:04d}",
            "volumes": [{"name": "disk0", "persistentVolumeClaim": {"claimName": f"{vmi}-disk0"}}],
            "containers": [{"name": "compute", "image": "registry/virt-launcher:v1.6"}],
        },
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def _raw_vmi(i: int) -> dict[str, Any]:
    vmi = f"vm-{i:06d}"
    return {
        "metadata": {
            "name": vmi,
            "namespace": f"tenant-{i % 50}",
            "uid": f"2076f683-2d58-4f46-a2d9-{i:012d}",
            "labels": {
                "app": f"app-{i % 20}",
                "kubevirt.io/nodeName": f"node-{i % 5000:04d}",
                "harvesterhci.io/vmName": vmi,
            },
            "ownerReferences": [{"kind": "VirtualMachine", "name": vmi, "uid": "x"}],
        },
        "spec": {"domain": {"memory": {"guest": "4Gi"}}},
        "status": {
            "phase": "Running",
            "nodeName": f"node-{i % 5000:04d}",
            "conditions": [
                {"type": "Ready", "status": "True"},
                {"type": "LiveMigratable", "status": "True"},
            ],
        },
    }


@pytest.mark.asyncio(loop_scope="function")
async def test_a_hundred_thousand_pods_and_vmis_fit_in_a_small_fraction_of_a_gibibyte() -> None:
    # Measured on 20,000 of each (tracemalloc is slow) and extrapolated: records are
    # independent, so memory is linear in their number.
    n = 20_000
    project_p, project_v = project_pod(frozenset()), project_vmi(frozenset())
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        pods: dict[str, PodRecord | None] = {}
        for i in range(n):
            raw = _raw_pod(i)
            pods[f"{raw['metadata']['namespace']}/{raw['metadata']['name']}"] = project_p(raw, None)
        after_pods = tracemalloc.get_traced_memory()[0]
        vmis: dict[str, VMIRecord | None] = {}
        for i in range(n):
            raw = _raw_vmi(i)
            vmis[f"{raw['metadata']['namespace']}/{raw['metadata']['name']}"] = project_v(raw, None)
        after_vmis = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    per_pod = (after_pods - before) / n
    per_vmi = (after_vmis - after_pods) / n
    total_100k = (per_pod + per_vmi) * 100_000
    print(
        f"\nmemory per cached pod: {per_pod:.0f} B, per VMI: {per_vmi:.0f} B "
        f"(100,000 of each: {total_100k / 2**20:.0f} MiB)"
    )
    assert per_pod < 1500 and per_vmi < 1500
    assert total_100k < 300 * 2**20
