"""Actuation against the test cluster's real kube-apiserver: every action twice (the second run
is `already_done`), results checked with kubectl; the leader Lease lock; preflight with real RBAC.

Objects are set up with the simulators' admin client (chaos.sim.informer.Kube). The nodes have
no kubelet, exactly the situation the watchdog acts in: a normally deleted pod stays Terminating.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from aiohttp import web
from kubernetes_asyncio import client as k8s_client

from chaos.sim.binaries import ControlPlaneBinaries
from chaos.sim.controlplane import ControlPlane
from chaos.sim.informer import CRDS, NODES, PODS, ApiError, Kube, Resource
from tests.eventually import eventually
from tests.integration.test_service_failover import VAP, VAP_BINDINGS
from tests.loopback_http import serving
from watchdog.actuate import Actuator, LeaseLock, LeaseRecord, Result
from watchdog.actuate.preflight import (
    check_access,
    check_api,
    check_crds,
    cluster_role_rules,
    required_access,
    run_preflight,
)
from watchdog.actuate.writer import KubeWriter
from watchdog.decide.actions import (
    Basis,
    DeleteVolumeAttachments,
    EmitEvent,
    EventType,
    ForceDeletePods,
    MarkPodsNotReady,
    PersistState,
    RemoveOutOfServiceTaint,
    StartEvacuation,
    StopEvacuation,
    TaintOutOfService,
)
from watchdog.decide.names import EVACUATION_LABEL, LEGACY_STATE_ANNOTATION, STATE_ANNOTATION
from watchdog.decide.reasons import Reason
from watchdog.runtime.settings import Settings
from watchdog.transport.kube import load_api_client
from watchdog.transport.kube_errors import TransientError

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "chaos" / "sim" / "crds"
VMIS = Resource("/apis/kubevirt.io/v1", "virtualmachineinstances")
VMIMS = Resource("/apis/kubevirt.io/v1", "virtualmachineinstancemigrations")
PVCS = Resource("/api/v1", "persistentvolumeclaims")
VOLUME_ATTACHMENTS = Resource("/apis/storage.k8s.io/v1", "volumeattachments", namespaced=False)
LEASES = Resource("/apis/coordination.k8s.io/v1", "leases")
CLUSTER_ROLES = Resource("/apis/rbac.authorization.k8s.io/v1", "clusterroles", namespaced=False)
CLUSTER_ROLE_BINDINGS = Resource(
    "/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", namespaced=False
)
OOS_KEY = "node.kubernetes.io/out-of-service"

pytestmark = [pytest.mark.cluster, pytest.mark.asyncio(loop_scope="module")]


# -- helpers ----------------------------------------------------------------------------------


async def kubectl_json(kubeconfig: Path, *args: str) -> Any:
    proc = await asyncio.create_subprocess_exec(
        "kubectl",
        f"--kubeconfig={kubeconfig}",
        *args,
        "-o",
        "json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


async def kubectl_text(kubeconfig: Path, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "kubectl",
        f"--kubeconfig={kubeconfig}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


def settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {"api_request_timeout_s": 5.0, "namespace": "node-watchdog"}
    return Settings(**{**base, **overrides})


async def install_crds(kube: Kube, *names: str) -> None:
    for name in names:
        doc = yaml.safe_load((CRD_DIR / f"{name}.yaml").read_text())
        with contextlib.suppress(ApiError):
            await kube.create(CRDS, doc)

        async def established(crd: str = doc["metadata"]["name"]) -> bool:
            conds = (await kube.get(CRDS, crd)).get("status", {}).get("conditions") or []
            return any(c["type"] == "Established" and c["status"] == "True" for c in conds)

        await eventually(established, what=f"CRD {name} established")


async def create_node(kube: Kube, name: str, taints: list[dict[str, str]] | None = None) -> None:
    body: dict[str, Any] = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}
    if taints:
        body["spec"] = {"taints": taints}
    await kube.create(NODES, body)


async def create_launcher_pod(kube: Kube, name: str, node: str, *, ready: bool = True) -> str:
    pod = await kube.create(
        PODS,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": "default",
                "labels": {"kubevirt.io": "virt-launcher", "vm.kubevirt.io/name": name},
            },
            "spec": {
                "nodeName": node,
                "tolerations": [{"operator": "Exists"}],
                "containers": [{"name": "compute", "image": "virt-launcher"}],
            },
        },
    )
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
        "default",
        sub="status",
        content_type="application/strategic-merge-patch+json",
    )
    return str(pod["metadata"]["uid"])


def conditions(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in pod.get("status", {}).get("conditions") or []}


# -- fixtures ---------------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(control_plane_binaries: ControlPlaneBinaries) -> AsyncIterator[ControlPlane]:
    async with ControlPlane(binaries=control_plane_binaries) as cp:
        yield cp


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def admin(cluster: ControlPlane) -> AsyncIterator[Kube]:
    kube = await Kube.from_kubeconfig(cluster.admin_kubeconfig)
    await install_crds(
        kube,
        "kubevirt.io_virtualmachineinstances",
        "kubevirt.io_virtualmachines",
        "kubevirt.io_virtualmachineinstancemigrations",
        "kubevirt.io_kubevirts",
    )
    with contextlib.suppress(ApiError):
        await kube.create(
            Resource("/api/v1", "namespaces", namespaced=False),
            {"metadata": {"name": "node-watchdog"}},
        )
    try:
        yield kube
    finally:
        await kube.close()


@pytest_asyncio.fixture(loop_scope="module")
async def api_client(cluster: ControlPlane) -> AsyncIterator[k8s_client.ApiClient]:
    client = await load_api_client(cluster.admin_kubeconfig)
    try:
        yield client
    finally:
        await client.close()


@pytest_asyncio.fixture(loop_scope="module")
async def actuator(api_client: k8s_client.ApiClient) -> Actuator:
    return Actuator(api_client, settings(), dry_run=False)


# -- preflight without KubeVirt (must run before `admin` installs it) --------------------------


async def test_crd_check_says_what_a_missing_kubevirt_and_harvester_mean(
    cluster: ControlPlane,
) -> None:
    """Runs first, before the module's `admin` fixture installs KubeVirt's CRDs."""
    client = await load_api_client(cluster.admin_kubeconfig)
    try:
        checks = {c.name: c for c in await check_crds(client)}
    finally:
        await client.close()
    vmis = checks["crd: virtualmachineinstances.kubevirt.io"]
    assert not vmis.ok and vmis.detail == "absent: no KubeVirt: there are no VMs to protect"
    harvester = checks["crd: settings.harvesterhci.io"]
    assert harvester.ok and harvester.detail == "absent: no Harvester: policy from config"
    policies = checks["crd: migrationpolicies.migrations.kubevirt.io"]
    assert policies.ok, "optional: without it every migration uses the KubeVirt CR's settings"
    assert policies.detail.startswith("absent: no MigrationPolicies")


# -- actions ----------------------------------------------------------------------------------


async def test_marking_pods_not_ready_shows_in_kubectl_and_repeats_as_already_done(
    cluster: ControlPlane, admin: Kube, actuator: Actuator
) -> None:
    await create_node(admin, "mark-1")
    await create_launcher_pod(admin, "mark-a", "mark-1")
    await create_launcher_pod(admin, "mark-b", "mark-1")
    action = MarkPodsNotReady(
        "mark-1", (("default", "mark-a"), ("default", "mark-b"), ("default", "mark-gone"))
    )

    first = await actuator.pods.mark_pods_not_ready(action)
    assert first.result is Result.SUCCESS, first
    assert dict(first.items) == {
        "default/mark-a": Result.SUCCESS,
        "default/mark-b": Result.SUCCESS,
        "default/mark-gone": Result.ALREADY_DONE,  # 404: nothing left to mark
    }
    pod = await kubectl_json(cluster.admin_kubeconfig, "get", "pod", "-n", "default", "mark-a")
    conds = conditions(pod)
    assert conds["Ready"]["status"] == "False"
    assert conds["Ready"]["reason"] == "NodeUnreachable"
    assert conds["ContainersReady"]["status"] == "False"

    second = await actuator.pods.mark_pods_not_ready(action)
    assert second.result is Result.ALREADY_DONE, second


async def test_out_of_service_taint_added_and_removed_once_each_without_losing_other_taints(
    cluster: ControlPlane, admin: Kube, api_client: k8s_client.ApiClient, actuator: Actuator
) -> None:
    other = {"key": "example.com/maintenance", "value": "yes", "effect": "NoSchedule"}
    await create_node(admin, "taint-1", taints=[other])

    first = await actuator.nodes.taint_out_of_service(TaintOutOfService("taint-1"))
    assert first.result is Result.SUCCESS, first
    node = await kubectl_json(cluster.admin_kubeconfig, "get", "node", "taint-1")
    taints = {(t["key"], t.get("value"), t["effect"]) for t in node["spec"]["taints"]}
    assert (OOS_KEY, "nodeshutdown", "NoExecute") in taints
    assert ("example.com/maintenance", "yes", "NoSchedule") in taints
    assert (await actuator.nodes.taint_out_of_service(TaintOutOfService("taint-1"))).result is (
        Result.ALREADY_DONE
    )

    removed = await actuator.nodes.remove_out_of_service_taint(RemoveOutOfServiceTaint("taint-1"))
    assert removed.result is Result.SUCCESS, removed
    node = await kubectl_json(cluster.admin_kubeconfig, "get", "node", "taint-1")
    keys = [t["key"] for t in node["spec"]["taints"]]
    assert OOS_KEY not in keys and "example.com/maintenance" in keys
    again = await actuator.nodes.remove_out_of_service_taint(RemoveOutOfServiceTaint("taint-1"))
    assert again.result is Result.ALREADY_DONE
    missing = await actuator.nodes.remove_out_of_service_taint(
        RemoveOutOfServiceTaint("no-such-node")
    )
    assert missing.result is Result.ALREADY_DONE
    absent = await actuator.nodes.taint_out_of_service(TaintOutOfService("no-such-node"))
    assert absent.result is Result.FAILED


async def test_concurrent_taint_writers_never_lose_an_update(
    admin: Kube, api_client: k8s_client.ApiClient
) -> None:
    """Read-modify-write with a resourceVersion precondition: whichever order the writes land
    in, a 409 makes the loser re-read, so every taint survives."""
    await create_node(admin, "race-1")
    writers = [
        Actuator(api_client, settings(out_of_service_taint=f"example.com/t{i}=x:NoSchedule"))
        for i in range(6)
    ]
    outcomes = await asyncio.gather(
        *(w.nodes.taint_out_of_service(TaintOutOfService("race-1")) for w in writers)
    )
    assert all(o.result is Result.SUCCESS for o in outcomes), outcomes
    node = await admin.get(NODES, "race-1")
    # The node lifecycle controller may add its own not-ready taint meanwhile: a real
    # competitor, whose write must survive as well as ours.
    keys = {t["key"] for t in node["spec"]["taints"]}
    assert {f"example.com/t{i}" for i in range(6)} <= keys
    assert keys - {f"example.com/t{i}" for i in range(6)} <= {
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/unreachable",
    }


async def test_force_delete_removes_a_pod_that_a_normal_delete_leaves_terminating(
    cluster: ControlPlane, admin: Kube, actuator: Actuator
) -> None:
    await create_node(admin, "dead-1")
    uid = await create_launcher_pod(admin, "dead-pod", "dead-1")
    await admin.delete(PODS, "dead-pod", "default")  # graceful: needs the (absent) kubelet
    pod = await kubectl_json(cluster.admin_kubeconfig, "get", "pod", "-n", "default", "dead-pod")
    assert pod["metadata"].get("deletionTimestamp"), "Terminating, waiting for a kubelet"

    action = ForceDeletePods("dead-1", (("default", "dead-pod"),))
    first = await actuator.pods.force_delete_pods(action, uids={("default", "dead-pod"): uid})
    assert first.result is Result.SUCCESS, first
    assert await admin.get_or_none(PODS, "dead-pod", "default") is None
    second = await actuator.pods.force_delete_pods(action)
    assert second.result is Result.ALREADY_DONE

    # A pod recreated under the same name is not ours: the uid precondition protects it.
    await create_launcher_pod(admin, "dead-pod", "dead-1")
    third = await actuator.pods.force_delete_pods(action, uids={("default", "dead-pod"): uid})
    assert third.result is Result.ALREADY_DONE
    assert await admin.get_or_none(PODS, "dead-pod", "default") is not None
    await admin.delete(PODS, "dead-pod", "default", grace_period_s=0)


async def test_state_annotation_is_persisted_once(
    cluster: ControlPlane, admin: Kube, actuator: Actuator
) -> None:
    await create_node(admin, "state-1")
    value = '{"phase":"Unreachable","reason":"CorroboratedByLease"}'
    first = await actuator.nodes.persist_state(PersistState("state-1", value))
    assert first.result is Result.SUCCESS
    node = await kubectl_json(cluster.admin_kubeconfig, "get", "node", "state-1")
    assert node["metadata"]["annotations"][STATE_ANNOTATION] == value
    assert (await actuator.nodes.persist_state(PersistState("state-1", value))).result is (
        Result.ALREADY_DONE
    )
    newer = '{"phase":"Fencing","reason":"PeriodRunning"}'
    changed = await actuator.nodes.persist_state(PersistState("state-1", newer))
    assert changed.result is Result.SUCCESS
    assert (await admin.get(NODES, "state-1"))["metadata"]["annotations"][STATE_ANNOTATION] == newer
    # What `kubectl describe node` shows: the NodeWatchdog condition says the same.
    described = await kubectl_text(cluster.admin_kubeconfig, "describe", "node", "state-1")
    line = next(x for x in described.splitlines() if x.strip().startswith("NodeWatchdog"))
    assert "True" in line and "Fencing" in line and "PeriodRunning" in line, line
    back = '{"phase":"Healthy","reason":"HeartbeatFresh"}'
    healthy = await actuator.nodes.persist_state(PersistState("state-1", back))
    assert healthy.result is Result.SUCCESS
    conditions = (await admin.get(NODES, "state-1"))["status"]["conditions"]
    [cond] = [c for c in conditions if c["type"] == "NodeWatchdog"]
    assert (cond["status"], cond["reason"]) == ("False", "Healthy")


async def test_events_are_created_then_counted_and_visible_to_kubectl(
    cluster: ControlPlane, admin: Kube, actuator: Actuator
) -> None:
    await create_node(admin, "event-1")
    action = EmitEvent(
        "event-1",
        "NodeUnreachable",
        Reason.CORROBORATED_LEASE,
        "no heartbeat for 5.2s, lease stale",
        EventType.WARNING,
    )
    assert (await actuator.events.emit_event(action)).result is Result.SUCCESS
    assert (await actuator.events.emit_event(action)).result is Result.ALREADY_DONE  # counted

    listing = await kubectl_json(
        cluster.admin_kubeconfig,
        "get",
        "events",
        "-n",
        "default",
        "--field-selector",
        "involvedObject.kind=Node,involvedObject.name=event-1",
    )
    (event,) = listing["items"]
    assert (event["reason"], event["type"], event["count"]) == ("NodeUnreachable", "Warning", 2)
    assert event["reportingComponent"] == "node-watchdog"
    assert event["source"]["component"] == "node-watchdog"
    assert "CorroboratedByLease" in event["message"]
    described = await kubectl_text(cluster.admin_kubeconfig, "describe", "node", "event-1")
    assert "NodeUnreachable" in described, described

    await admin.create(
        VMIS,
        {
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstance",
            "metadata": {"name": "event-vm", "namespace": "default"},
            "spec": {},
        },
        "default",
    )
    vmi_event = await actuator.events.emit_vmi_event(
        "default", "event-vm", "VMRescheduled", "running on node-2 after 21.3s"
    )
    assert vmi_event.result is Result.SUCCESS
    listing = await kubectl_json(
        cluster.admin_kubeconfig,
        "get",
        "events",
        "-n",
        "default",
        "--field-selector",
        "involvedObject.kind=VirtualMachineInstance,involvedObject.name=event-vm",
    )
    assert [e["reason"] for e in listing["items"]] == ["VMRescheduled"]


async def test_evacuation_creates_one_migration_per_vmi_and_stop_aborts_them(
    admin: Kube, actuator: Actuator
) -> None:
    for vmi in ("evac-a", "evac-b"):
        await admin.create(
            VMIS,
            {
                "apiVersion": "kubevirt.io/v1",
                "kind": "VirtualMachineInstance",
                "metadata": {"name": vmi, "namespace": "default"},
                "spec": {},
            },
            "default",
        )
    vmis = [("default", "evac-a"), ("default", "evac-b")]
    first = await actuator.migrations.start_evacuation(StartEvacuation("evac-node"), vmis)
    assert first.result is Result.SUCCESS, first
    again = await actuator.migrations.start_evacuation(StartEvacuation("evac-node"), vmis)
    assert again.result is Result.ALREADY_DONE, again

    listing = await admin.list(VMIMS, "default", labelSelector=f"{EVACUATION_LABEL}=evac-node")
    migrations = listing["items"]
    assert sorted(m["spec"]["vmiName"] for m in migrations) == ["evac-a", "evac-b"]
    assert all(
        m["metadata"]["name"].startswith(f"evacuate-{m['spec']['vmiName']}-") for m in migrations
    )

    stopped = await actuator.migrations.stop_evacuation(StopEvacuation("evac-node"))
    assert stopped.result is Result.SUCCESS, stopped
    listing = await admin.list(VMIMS, "default", labelSelector=f"{EVACUATION_LABEL}=evac-node")
    assert listing["items"] == []
    assert (await actuator.migrations.stop_evacuation(StopEvacuation("evac-node"))).result is (
        Result.ALREADY_DONE
    )


async def test_volume_attachments_of_the_reset_pods_volumes_are_deleted_and_no_others(
    admin: Kube, actuator: Actuator
) -> None:
    for claim, pv in (("vm-disk", "pv-vm-disk"), ("other-disk", "pv-other")):
        await admin.create(
            PVCS,
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": claim, "namespace": "default"},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "resources": {"requests": {"storage": "1Gi"}},
                    "volumeName": pv,
                    "storageClassName": "",
                },
            },
            "default",
        )
        await admin.create(
            VOLUME_ATTACHMENTS,
            {
                "apiVersion": "storage.k8s.io/v1",
                "kind": "VolumeAttachment",
                "metadata": {"name": f"csi-{pv}"},
                "spec": {
                    "attacher": "driver.longhorn.io",
                    "nodeName": "va-node",
                    "source": {"persistentVolumeName": pv},
                },
            },
        )
    action = DeleteVolumeAttachments("va-node")
    claims = [("default", "vm-disk"), ("default", "missing-claim")]
    first = await actuator.pods.delete_volume_attachments(action, claims)
    assert first.result is Result.SUCCESS, first
    assert await admin.get_or_none(VOLUME_ATTACHMENTS, "csi-pv-vm-disk") is None
    assert await admin.get_or_none(VOLUME_ATTACHMENTS, "csi-pv-other") is not None
    second = await actuator.pods.delete_volume_attachments(action, claims)
    assert second.result is Result.ALREADY_DONE, second


async def test_dry_run_reports_and_writes_nothing(
    admin: Kube, api_client: k8s_client.ApiClient
) -> None:
    await create_node(admin, "dry-1")
    await create_launcher_pod(admin, "dry-pod", "dry-1")
    dry = Actuator(api_client, settings(dry_run=True))
    assert dry.dry_run
    outcomes = [
        await dry.nodes.taint_out_of_service(TaintOutOfService("dry-1")),
        await dry.nodes.persist_state(PersistState("dry-1", "{}")),
        await dry.pods.mark_pods_not_ready(MarkPodsNotReady("dry-1", (("default", "dry-pod"),))),
        await dry.pods.force_delete_pods(ForceDeletePods("dry-1", (("default", "dry-pod"),))),
    ]
    assert {o.result for o in outcomes} == {Result.DRY_RUN}
    node = await admin.get(NODES, "dry-1")
    assert OOS_KEY not in [t["key"] for t in node["spec"].get("taints") or ()]
    assert STATE_ANNOTATION not in (node["metadata"].get("annotations") or {})
    pod = await admin.get(PODS, "dry-pod", "default")
    assert conditions(pod)["Ready"]["status"] == "True"
    await admin.delete(PODS, "dry-pod", "default", grace_period_s=0)


async def test_an_action_during_an_api_restart_is_retried_until_it_succeeds(
    cluster: ControlPlane,
    admin: Kube,
    api_client: k8s_client.ApiClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await create_node(admin, "retry-1")
    patient = Actuator(api_client, settings(api_request_timeout_s=2.0), attempts=12)
    caplog.set_level(logging.WARNING, logger="watchdog.actuate")
    await cluster.api_outage_start("stop")
    try:
        task = asyncio.ensure_future(patient.nodes.persist_state(PersistState("retry-1", "{}")))

        async def first_attempt_failed() -> bool:
            return "attempt 1/12" in caplog.text

        await eventually(first_attempt_failed, what="first attempt failed and logged")
    finally:
        await cluster.api_outage_stop()
    outcome = await asyncio.wait_for(task, 60)
    assert outcome.result is Result.SUCCESS, outcome
    assert (await admin.get(NODES, "retry-1"))["metadata"]["annotations"][STATE_ANNOTATION] == "{}"

    # With too few attempts the failure is reported as transient, not raised.
    hopeless = Actuator(api_client, settings(api_request_timeout_s=1.0), attempts=2)
    async with cluster.api_outage("freeze"):
        failed = await hopeless.nodes.persist_state(PersistState("retry-1", "{}"))
    assert failed.result is Result.FAILED
    assert isinstance(failed.error, TransientError)


REFUSE_EVENTS = "test-refuse-node-fenced-events"


async def test_an_event_the_api_refused_is_written_once_it_accepts_with_when_it_happened(
    cluster: ControlPlane, admin: Kube, actuator: Actuator
) -> None:
    """A real API error (a ValidatingAdmissionPolicy refusing NodeFenced Events): the Event
    waits, is written once the refusal ends, and says when it happened, not when written."""
    await create_node(admin, "event-2")
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": REFUSE_EVENTS},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE", "UPDATE"],
                        "resources": ["events"],
                    }
                ]
            },
            "validations": [
                {"expression": "object.reason != 'NodeFenced'", "message": "refused by the test"}
            ],
        },
    }
    await admin.create(VAP, policy)
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": REFUSE_EVENTS},
        "spec": {"policyName": REFUSE_EVENTS, "validationActions": ["Deny"]},
    }
    await admin.create(VAP_BINDINGS, binding)
    action = EmitEvent("event-2", "NodeFenced", Reason.FENCE_SELF_ELAPSED, "fencing proven")

    async def events() -> list[dict[str, Any]]:
        listing = await kubectl_json(
            cluster.admin_kubeconfig,
            "get",
            "events",
            "-n",
            "default",
            "--field-selector",
            "involvedObject.kind=Node,involvedObject.name=event-2",
        )
        return [e for e in listing["items"] if e["reason"] == "NodeFenced"]

    retrying = asyncio.ensure_future(actuator.events.backlog.run(lambda: True))
    try:
        refused_at = datetime.now(UTC).replace(microsecond=0)

        async def refused() -> bool:  # a dry run goes through admission and stores nothing
            probe = {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"generateName": "probe-"},
                "involvedObject": {"kind": "Node", "name": "event-2"},
                "reason": "NodeFenced",
            }
            try:
                await admin.request(
                    "POST", "/api/v1/namespaces/default/events", query={"dryRun": "All"}, body=probe
                )
            except ApiError as e:
                return e.status in (400, 403, 422)
            return False

        await eventually(refused, what="the API server refusing NodeFenced Events")
        assert (await actuator.events.emit_event(action)).result is Result.FAILED
        assert len(actuator.events.backlog) == 1 and await events() == []
        await admin.delete(VAP_BINDINGS, REFUSE_EVENTS)
        await admin.delete(VAP, REFUSE_EVENTS)

        async def written() -> bool:
            return len(await events()) == 1

        await eventually(written, timeout_s=60.0, what="the refused Event written late")
    finally:
        retrying.cancel()
    (event,) = await events()
    assert event["reason"] == "NodeFenced" and len(actuator.events.backlog) == 0
    happened = datetime.fromisoformat(event["firstTimestamp"].replace("Z", "+00:00"))
    written_at = datetime.fromisoformat(
        event["metadata"]["creationTimestamp"].replace("Z", "+00:00")
    )
    assert happened <= refused_at + timedelta(seconds=30) and happened < written_at


# -- a decision's basis: writes that stand on the Node it was decided on ------------------------


async def version_of(kube: Kube, node: str) -> str:
    return str((await kube.get(NODES, node))["metadata"]["resourceVersion"])


async def test_a_decision_whose_node_changed_since_writes_nothing_more(
    admin: Kube, actuator: Actuator
) -> None:
    """A deposed leader's plan, or one made on a view behind etcd: once anybody else wrote the
    Node after the decision (here a newer leader's withdrawal), none of the decision's Node,
    pod or volume writes lands. Its own writes move the basis, so its chain goes on."""
    await create_node(admin, "basis-1")
    await create_launcher_pod(admin, "basis-pod", "basis-1")
    basis = Basis(await version_of(admin, "basis-1"))
    fencing = '{"phase":"Fencing"}'
    first = await actuator.execute(PersistState("basis-1", fencing), basis=basis)
    assert first.result is Result.SUCCESS, first
    assert basis.node_version == await version_of(admin, "basis-1"), "the chain moves on"
    tainted = await actuator.execute(TaintOutOfService("basis-1"), basis=basis)
    assert tainted.result is Result.SUCCESS, tainted

    withdrawal = '{"phase":"Healthy"}'
    # Under both names, as a leader of this release writes it.
    both = {STATE_ANNOTATION: withdrawal, LEGACY_STATE_ANNOTATION: withdrawal}
    await admin.patch(NODES, "basis-1", {"metadata": {"annotations": both}})
    pods = (("default", "basis-pod"),)
    refused = [
        await actuator.execute(PersistState("basis-1", '{"phase":"Resetting"}'), basis=basis),
        await actuator.execute(RemoveOutOfServiceTaint("basis-1"), basis=basis),
        await actuator.execute(ForceDeletePods("basis-1", pods), basis=basis),
        await actuator.execute(MarkPodsNotReady("basis-1", pods), basis=basis),
        await actuator.execute(DeleteVolumeAttachments("basis-1"), basis=basis),
    ]
    assert [o.result for o in refused] == [Result.STALE] * 5, refused
    node = await admin.get(NODES, "basis-1")
    assert node["metadata"]["annotations"][STATE_ANNOTATION] == withdrawal
    assert OOS_KEY in [t["key"] for t in node["spec"].get("taints") or ()]
    pod = await admin.get(PODS, "basis-pod", "default")
    assert conditions(pod)["Ready"]["status"] == "True" and not pod["metadata"].get(
        "deletionTimestamp"
    )

    # The twin: a decision made on the Node as it is now goes ahead, with what the Node shows
    # of ours, as the controller takes it: the node-lifecycle controller writes this Node too
    # (its kubelet never reports, so it is tainted unreachable after the grace period), and
    # those writes of others' fields must not refuse it.
    fresh = Basis(await version_of(admin, "basis-1"), expect=(withdrawal, True))
    done = await actuator.execute(ForceDeletePods("basis-1", pods), basis=fresh)
    assert done.result is Result.SUCCESS, done
    assert await admin.get_or_none(PODS, "basis-pod", "default") is None
    untainted = await actuator.execute(RemoveOutOfServiceTaint("basis-1"), basis=fresh)
    assert untainted.result is Result.SUCCESS, untainted


async def test_a_node_written_by_others_in_their_fields_still_carries_the_decision(
    admin: Kube, actuator: Actuator
) -> None:
    """The kubelet's status, a label: a newer version of the Node that shows of ours (our
    annotation, our taint) what the decision saw does not refuse its writes; a change of our
    annotation does."""
    await create_node(admin, "basis-3")
    basis = Basis(await version_of(admin, "basis-3"), expect=(None, False))
    await admin.patch(NODES, "basis-3", {"metadata": {"labels": {"rack": "r7"}}})
    fencing = '{"phase":"Fencing"}'
    first = await actuator.execute(PersistState("basis-3", fencing), basis=basis)
    assert first.result is Result.SUCCESS, first
    await admin.patch(NODES, "basis-3", {"metadata": {"labels": {"rack": "r8"}}})
    tainted = await actuator.execute(TaintOutOfService("basis-3"), basis=basis)
    assert tainted.result is Result.SUCCESS, tainted
    assert basis.expect == (fencing, True)

    # Another writer of the state writes it under both names, as we do (an administrator
    # repairing by hand: docs/OPERATIONS.md).
    healthy = '{"phase":"Healthy"}'
    both = {STATE_ANNOTATION: healthy, LEGACY_STATE_ANNOTATION: healthy}
    await admin.patch(NODES, "basis-3", {"metadata": {"annotations": both}})
    refused = await actuator.execute(PersistState("basis-3", '{"phase":"Reset"}'), basis=basis)
    assert refused.result is Result.STALE, refused
    annotations = (await admin.get(NODES, "basis-3"))["metadata"]["annotations"]
    assert annotations[STATE_ANNOTATION] == '{"phase":"Healthy"}'


async def test_a_state_under_the_legacy_name_is_carried_on_and_moved_to_ours(
    admin: Kube, actuator: Actuator
) -> None:
    """A node declared by a release before our own domain: its state, under the legacy name,
    is what the decision saw (a change by others still refuses the write), and the next write
    puts it under both names in one request (agents of that release read only the legacy
    one)."""
    await create_node(admin, "legacy-1")
    fencing = '{"phase":"Fencing","reason":"PeriodRunning"}'
    await admin.patch(
        NODES, "legacy-1", {"metadata": {"annotations": {LEGACY_STATE_ANNOTATION: fencing}}}
    )
    basis = Basis(await version_of(admin, "legacy-1"), expect=(fencing, False))
    await admin.patch(NODES, "legacy-1", {"metadata": {"labels": {"rack": "r1"}}})
    resetting = '{"phase":"Resetting","reason":"FencedBySelf"}'
    moved = await actuator.execute(PersistState("legacy-1", resetting), basis=basis)
    assert moved.result is Result.SUCCESS, moved
    annotations = (await admin.get(NODES, "legacy-1"))["metadata"]["annotations"]
    assert annotations[STATE_ANNOTATION] == annotations[LEGACY_STATE_ANNOTATION] == resetting

    # The must-not twin: a decision made on that state, after someone else wrote a newer one
    # under the legacy name only (a controller of the previous release, after a rollback).
    stale = Basis(await version_of(admin, "legacy-1"), expect=(resetting, False))
    await admin.patch(
        NODES, "legacy-1", {"metadata": {"annotations": {LEGACY_STATE_ANNOTATION: fencing}}}
    )
    refused = await actuator.execute(PersistState("legacy-1", '{"phase":"Reset"}'), basis=stale)
    assert refused.result is Result.STALE, refused
    await admin.patch(
        NODES,
        "legacy-1",
        {"metadata": {"annotations": {STATE_ANNOTATION: None, LEGACY_STATE_ANNOTATION: None}}},
    )
    stale = Basis(await version_of(admin, "legacy-1"), expect=(None, False))
    await admin.patch(NODES, "legacy-1", {"metadata": {"annotations": {STATE_ANNOTATION: "{}"}}})
    refused = await actuator.execute(PersistState("legacy-1", '{"phase":"Reset"}'), basis=stale)
    assert refused.result is Result.STALE, refused
    annotations = (await admin.get(NODES, "legacy-1"))["metadata"].get("annotations") or {}
    assert annotations.get(STATE_ANNOTATION) == "{}" and LEGACY_STATE_ANNOTATION not in annotations


async def test_a_replica_that_stopped_leading_sends_nothing_more_even_mid_retry(
    cluster: ControlPlane,
    admin: Kube,
    api_client: k8s_client.ApiClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its Lease ran out while a write was being retried through an API restart: the retry
    is never sent, although the API is back and the write would have succeeded."""
    await create_node(admin, "basis-2")

    async def settled() -> bool:
        # The node lifecycle controller taints a node without a kubelet once, soon after it
        # appears: a write of someone else that would (rightly) make ours stale.
        node = await admin.get(NODES, "basis-2")
        return "node.kubernetes.io/not-ready" in [
            t["key"] for t in node["spec"].get("taints") or ()
        ]

    # Bound: earlier tests of this module restart and freeze the API server, after which
    # kube-controller-manager's watches come back with a backoff of up to 30 s of their own.
    await eventually(settled, timeout_s=90, what="the node lifecycle controller's taint")
    leading = True
    # As the controller makes it: what the Node shows of ours goes with the version, so that
    # the API server's own controllers writing the Node (its TTL annotation) refuse nothing.
    basis = Basis(await version_of(admin, "basis-2"), lambda: leading, expect=(None, False))
    patient = Actuator(api_client, settings(api_request_timeout_s=2.0), attempts=12)
    caplog.set_level(logging.WARNING, logger="watchdog.actuate")
    await cluster.api_outage_start("stop")
    try:
        task = asyncio.ensure_future(
            patient.execute(PersistState("basis-2", '{"phase":"Fencing"}'), basis=basis)
        )

        async def first_attempt_failed() -> bool:
            return "attempt 1/12" in caplog.text

        await eventually(first_attempt_failed, what="first attempt failed and logged")
        leading = False
    finally:
        await cluster.api_outage_stop()
    outcome = await asyncio.wait_for(task, 60)
    assert outcome.result is Result.STALE, outcome
    node = await admin.get(NODES, "basis-2")
    assert STATE_ANNOTATION not in (node["metadata"].get("annotations") or {})

    # The twin: while it leads, the same write through the same kind of outage lands.
    leading = True
    caplog.clear()
    await cluster.api_outage_start("stop")
    try:
        task = asyncio.ensure_future(
            patient.execute(PersistState("basis-2", '{"phase":"Fencing"}'), basis=basis)
        )
        await eventually(first_attempt_failed, what="first attempt failed and logged")
    finally:
        await cluster.api_outage_stop()
    outcome = await asyncio.wait_for(task, 60)
    node = await admin.get(NODES, "basis-2")
    assert node["metadata"]["annotations"][STATE_ANNOTATION] == '{"phase":"Fencing"}'
    # A restarting API server may apply a write and lose its answer: the retry then finds the
    # Node changed (by that very write) and says stale. That is safe (the controller decides
    # again on the newer Node) and the write is there.
    assert outcome.result in (Result.SUCCESS, Result.STALE), outcome


async def test_retry_after_of_a_429_is_honoured() -> None:
    """The real apiserver throttles only under load; a local HTTP server answers 429."""
    hits: list[float] = []

    async def handler(request: web.Request) -> web.Response:
        hits.append(time.monotonic())
        if len(hits) < 3:
            return web.json_response(
                {"kind": "Status", "code": 429, "reason": "TooManyRequests", "message": "slow"},
                status=429,
                headers={"Retry-After": "1"},
            )
        return web.json_response({"gitVersion": "v1.37.2"})

    app = web.Application()
    app.router.add_get("/version", handler)
    async with serving(app) as port:
        cfg = k8s_client.Configuration(host=f"http://127.0.0.1:{port}")
        client = k8s_client.ApiClient(configuration=cfg)
        try:
            answer = await KubeWriter(client, attempts=5).call("GET", "/version")
        finally:
            await client.close()
    assert answer["gitVersion"] == "v1.37.2"
    assert len(hits) == 3
    assert hits[1] - hits[0] >= 0.95 and hits[2] - hits[1] >= 0.95


# -- lease lock -------------------------------------------------------------------------------


async def test_lease_lock_one_creator_wins_and_a_stale_update_loses(
    admin: Kube, api_client: k8s_client.ApiClient
) -> None:
    locks = [LeaseLock(api_client, "node-watchdog", "leader-test") for _ in range(2)]
    now = datetime.now(UTC)
    records = [LeaseRecord(f"replica-{i}", 8, acquire_time=now, renew_time=now) for i in range(2)]
    created = await asyncio.gather(
        *(lock.create(r) for lock, r in zip(locks, records, strict=True))
    )
    assert sorted(created) == [False, True], "exactly one contender creates the lease"
    winner = records[created.index(True)].holder_identity

    a, b = locks
    seen = await a.get()
    assert seen is not None and seen.holder_identity == winner
    assert seen.resource_version
    raw = await admin.get(LEASES, "leader-test", "node-watchdog")
    assert len(raw["spec"]["renewTime"].split(".")[1]) == len("123456Z"), "MicroTime"

    renewed = LeaseRecord(
        winner, 8, seen.acquire_time, now + timedelta(seconds=1), seen.lease_transitions
    )
    assert await b.update(renewed, seen.resource_version) is True
    taken = LeaseRecord("usurper", 8, now, now, seen.lease_transitions + 1)
    assert await a.update(taken, seen.resource_version) is False, "stale resourceVersion loses"
    current = await a.get()
    assert current is not None and current.holder_identity == winner
    assert current.renew_time == now + timedelta(seconds=1)

    assert await a.release("someone-else") is True  # not ours: nothing to do
    assert (await a.get()).holder_identity == winner  # type: ignore[union-attr]
    assert await a.release(winner or "") is True
    released = await a.get()
    assert released is not None and released.holder_identity is None
    assert await LeaseLock(api_client, "node-watchdog", "absent").get() is None


# -- preflight --------------------------------------------------------------------------------


async def _service_account_client(
    cluster: ControlPlane, admin: Kube, tmp_path: Path, name: str, rules: list[dict[str, Any]]
) -> k8s_client.ApiClient:
    await admin.create(
        CLUSTER_ROLES,
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": name},
            "rules": rules,
        },
    )
    await admin.create(
        CLUSTER_ROLE_BINDINGS,
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": name,
            },
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": "node-watchdog"}],
        },
    )
    path = await cluster.kubeconfig_for_service_account(
        "node-watchdog", name, tmp_path / f"{name}.kubeconfig"
    )
    return await load_api_client(path)


async def test_preflight_names_exactly_the_verb_a_role_lacks(
    cluster: ControlPlane, admin: Kube, tmp_path: Path
) -> None:
    s = settings()
    full = cluster_role_rules(required_access(s))
    lacking = [
        {**rule, "verbs": [v for v in rule["verbs"] if v != "delete"]}
        if rule["apiGroups"] == [""] and rule["resources"] == ["pods"]
        else rule
        for rule in full
    ]
    client = await _service_account_client(cluster, admin, tmp_path, "watchdog-lacking", lacking)
    try:

        async def only_delete_pods_denied() -> bool:
            checks = await check_access(client, s)
            return [c.name for c in checks if not c.ok] == ["rbac: delete pods"]

        await eventually(only_delete_pods_denied, what="exactly `delete pods` denied")
        (denied,) = [c for c in await check_access(client, s) if not c.ok]
        assert "force-delete" in denied.detail
    finally:
        await client.close()

    client = await _service_account_client(cluster, admin, tmp_path, "watchdog-full", full)
    try:

        async def all_allowed() -> bool:
            return all(c.ok for c in await check_access(client, s))

        await eventually(all_allowed, what="every verb allowed with the full role")
        checks = await run_preflight(client, s)
        names = [c.name for c in checks]
        assert names[0] == "api reachable" and checks[0].ok
        assert "rbac: update leases.coordination.k8s.io in node-watchdog" in names
        assert "rbac: patch pods/status" in names
        crds = {c.name: c for c in checks if c.name.startswith("crd:")}
        assert crds["crd: virtualmachineinstances.kubevirt.io"].ok
        harvester = crds["crd: settings.harvesterhci.io"]
        assert harvester.ok and harvester.detail == "absent: no Harvester: policy from config"
        assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    finally:
        await client.close()


async def test_preflight_reports_an_unreachable_api_and_missing_kubevirt() -> None:
    cfg = k8s_client.Configuration(host="https://127.0.0.1:1")
    client = k8s_client.ApiClient(configuration=cfg)
    try:
        api = await check_api(client, timeout_s=2.0)
        assert not api.ok and "127.0.0.1:1" in api.detail
        assert await run_preflight(client, settings(api_request_timeout_s=2.0)) == [api]
    finally:
        await client.close()


async def test_a_write_still_out_at_the_leader_deadline_is_abandoned_there_not_at_its_timeout(
    cluster: ControlPlane, admin: Kube, api_client: k8s_client.ApiClient
) -> None:
    """A frozen API server holds a write with no answer. A leader whose Lease is not renewed
    meanwhile (it cannot be: the same API) stops waiting at its renew deadline and acts no
    further (stale), instead of waiting out the 10 s request timeout and acting on an answer
    that may come after another replica took the lead. Its twin: a leader whose deadline moves
    on with its renewals keeps waiting, and the write lands once the API answers."""
    await create_node(admin, "deadline-1")
    version = await version_of(admin, "deadline-1")
    slow = Actuator(api_client, settings(api_request_timeout_s=10.0), attempts=1)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 1.0
    basis = Basis(
        version,
        lambda: True,
        acting_left_s=lambda: deadline - loop.time(),
        expect=None,
    )
    await cluster.api_outage_start("freeze")
    try:
        started = loop.time()
        outcome = await asyncio.wait_for(
            slow.execute(PersistState("deadline-1", '{"phase":"Fencing"}'), basis=basis), 8
        )
        took = loop.time() - started
    finally:
        await cluster.api_outage_stop()
    assert outcome.result is Result.STALE, outcome
    assert 0.9 <= took <= 3.0, f"abandoned after {took:.2f}s, its deadline was 1 s away"

    # The twin: renewed every 0.2 s (as the leader's own renewals move its deadline) while the
    # API is frozen for 2 s, longer than any one deadline: the same write waits and lands.
    renewing = True

    async def renew() -> None:
        nonlocal deadline
        while renewing:
            deadline = loop.time() + 1.0
            await asyncio.sleep(0.2)

    # Another Node: the abandoned write may still land on deadline-1 once the API thaws (the API
    # server had received it; only its answer was given up on).
    await create_node(admin, "deadline-2")

    async def settled() -> bool:
        # The node lifecycle controller taints a node without a kubelet once, soon after it
        # appears (see the test above); our write goes after it, as the controller's would.
        node = await admin.get(NODES, "deadline-2")
        return "node.kubernetes.io/not-ready" in [
            t["key"] for t in node["spec"].get("taints") or ()
        ]

    await eventually(settled, timeout_s=90, what="the node lifecycle controller's taint")
    renewer = asyncio.ensure_future(renew())
    basis = Basis(
        await version_of(admin, "deadline-2"),
        lambda: True,
        acting_left_s=lambda: deadline - loop.time(),
        expect=(None, False),
    )
    await cluster.api_outage_start("freeze")
    try:
        task = asyncio.ensure_future(
            slow.execute(PersistState("deadline-2", '{"phase":"Suspect"}'), basis=basis)
        )
        await asyncio.sleep(2.0)  # the outage's length: a fault time, not a wait for a result
        assert not task.done(), "abandoned although its deadline kept moving on"
    finally:
        await cluster.api_outage_stop()
    try:
        outcome = await asyncio.wait_for(task, 15)
    finally:
        renewing = False
        await renewer
    assert outcome.result is Result.SUCCESS, outcome
    node = await admin.get(NODES, "deadline-2")
    assert "Suspect" in node["metadata"]["annotations"][STATE_ANNOTATION]
