"""The state guard (deploy/base/state-guard.yaml) on the real API server: only the controller's
ServiceAccount (and whoever RBAC allows the permission the guard names, cluster-admin included)
may write the node's state annotation or its out-of-service taint.

The harvester overlay is rendered with the real kubectl (its namespace, harvester-system, is
not the base's: the guard must follow it) and its guard objects are applied as an operator
would. Then identities that RBAC allows to patch Nodes try to write the annotation: another
ServiceAccount (a compromised pod of any workload with `patch nodes`), a node's own kubelet
credentials (the Node authorizer lets it patch its own Node), the controller, and an admin.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from chaos.bench.kubeload import node_body
from chaos.sim.binaries import ControlPlaneBinaries
from chaos.sim.controlplane import ControlPlane
from chaos.sim.informer import NODES, ApiError, Kube, Resource
from chaos.sim.rbac import apply, render
from tests.integration.watchdog_env import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.asyncio(loop_scope="module")]

KEY = "node-watchdog.io/state"
LEGACY_KEY = "node-watchdog.kubevirt.io/state"  # still read by the watchdog: still guarded
NAMESPACE = "harvester-system"  # the harvester overlay's
GUARD = "node-watchdog-state-guard"
CONFIG_MAPS = Resource("/api/v1", "configmaps", namespaced=True)
CLUSTER_ROLES = Resource("/apis/rbac.authorization.k8s.io/v1", "clusterroles", namespaced=False)
CLUSTER_ROLE_BINDINGS = Resource(
    "/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", namespaced=False
)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(
    control_plane_binaries: ControlPlaneBinaries, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[ControlPlane, Kube, dict[str, Kube]]]:
    work = Path(tmp_path_factory.mktemp("state-guard"))
    async with ControlPlane(binaries=control_plane_binaries) as cp:
        admin = await Kube.from_kubeconfig(cp.admin_kubeconfig)
        clients: dict[str, Kube] = {}
        try:
            await admin.create(
                Resource("/api/v1", "namespaces", namespaced=False),
                {"metadata": {"name": NAMESPACE}},
            )
            guard = [o for o in render("harvester") if o["metadata"]["name"] == GUARD]
            assert sorted(o["kind"] for o in guard) == [
                "ConfigMap",
                "ValidatingAdmissionPolicy",
                "ValidatingAdmissionPolicyBinding",
            ]
            apply(guard, cp.admin_kubeconfig)
            # Both ServiceAccounts may patch Nodes: RBAC lets them, only the guard tells apart.
            await _grant_patch_nodes(admin, [(NAMESPACE, "node-watchdog"), ("default", "intruder")])
            for name, ns, sa in (
                ("controller", NAMESPACE, "node-watchdog"),
                ("intruder", "default", "intruder"),
            ):
                path = await cp.kubeconfig_for_service_account(ns, sa, work / f"{name}.kubeconfig")
                clients[name] = await Kube.from_kubeconfig(path)
            kubelet = cp.kubeconfig_for_user("system:node:n1", ["system:nodes"], work / "n1.kc")
            clients["kubelet"] = await Kube.from_kubeconfig(kubelet)
            await admin.create(NODES, node_body("n1"))
            yield cp, admin, clients
        finally:
            for c in clients.values():
                await c.close()
            await admin.close()


async def _grant_patch_nodes(
    admin: Kube, subjects: list[tuple[str, str]], name: str = "patch-nodes"
) -> None:
    rule = {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]}
    await admin.create(CLUSTER_ROLES, {"metadata": {"name": name}, "rules": [rule]})
    await _bind(admin, name, *subjects)


async def _bind(admin: Kube, role: str, *subjects: tuple[str, str]) -> None:
    await admin.create(
        CLUSTER_ROLE_BINDINGS,
        {
            "metadata": {"name": f"{role}-{subjects[0][1]}"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": role,
            },
            "subjects": [
                {"kind": "ServiceAccount", "namespace": ns, "name": name} for ns, name in subjects
            ],
        },
    )


async def _annotate(kube: Kube, value: str | None, key: str = KEY, sub: str | None = None) -> None:
    await kube.patch(NODES, "n1", {"metadata": {"annotations": {key: value}}}, sub=sub)


async def _state(admin: Kube) -> str | None:
    node = await admin.get(NODES, "n1")
    return (node["metadata"].get("annotations") or {}).get(KEY)


def _fencing(n: int) -> str:
    return json.dumps({"phase": "Fencing", "bootID": f"forged-{n}"})


async def test_another_service_account_cannot_write_the_state_annotation(cluster) -> None:
    _, admin, clients = cluster
    attempts = iter(range(10_000))
    refused: list[ApiError] = []

    async def intruder_refused() -> bool:
        # A new value each time: the guard lets an unchanged value through. The API server
        # loads a new policy within a second or so; until then the write goes through.
        try:
            await _annotate(clients["intruder"], _fencing(next(attempts)))
        except ApiError as e:
            refused.append(e)
            return True
        return False

    await wait_for(intruder_refused, 30, "the guard refusing the intruder")
    (error,) = refused
    assert error.status == 403, error
    message = json.dumps(error.body)
    assert (
        f"only system:serviceaccount:{NAMESPACE}:node-watchdog, system:masters or whoever may"
        " update states.node-watchdog.io may change the annotation" in message
    )
    assert "not system:serviceaccount:default:intruder" in message
    before = await _state(admin)

    # The controller writes it; the intruder can neither change nor delete that.
    declared = json.dumps({"phase": "Fencing", "bootID": "b1"})
    await _annotate(clients["controller"], declared)
    assert await _state(admin) == declared
    for value in (_fencing(-1), json.dumps({"phase": "Healthy"}), None):
        with pytest.raises(ApiError) as refused_write:
            await _annotate(clients["intruder"], value)
        assert refused_write.value.status == 403
    assert await _state(admin) == declared != before
    # Nor under the legacy name, which the watchdog still reads.
    for value in (_fencing(-2), json.dumps({"phase": "Healthy"})):
        with pytest.raises(ApiError) as refused_write:
            await _annotate(clients["intruder"], value, key=LEGACY_KEY)
        assert refused_write.value.status == 403
    # Other annotations stay the intruder's business (RBAC's, not ours).
    await _annotate(clients["intruder"], "x", key="example.com/other")


async def test_a_nodes_own_kubelet_credentials_cannot_declare_or_withdraw_it(cluster) -> None:
    _, admin, clients = cluster
    declared = json.dumps({"phase": "Resetting", "bootID": "b1"})
    await _annotate(clients["controller"], declared)
    for sub in (None, "status"):
        with pytest.raises(ApiError) as refused:
            await _annotate(clients["kubelet"], json.dumps({"phase": "Healthy"}), sub=sub)
        assert refused.value.status == 403, refused.value
        # Refused by the guard, not by RBAC: the Node authorizer lets a kubelet patch its Node.
        assert "may change the annotation" in json.dumps(refused.value.body), refused.value.body
    assert await _state(admin) == declared


async def test_an_admin_may_still_repair_it_by_hand(cluster) -> None:
    _, admin, _ = cluster
    await _annotate(admin, None)  # e.g. after an uninstall (docs/OPERATIONS.md)
    assert await _state(admin) is None
    await _annotate(admin, json.dumps({"phase": "Healthy"}))
    assert await _state(admin) == json.dumps({"phase": "Healthy"})


OUT_OF_SERVICE = {"key": "node.kubernetes.io/out-of-service", "effect": "NoExecute"}


async def _taint(kube: Kube, *taints: dict[str, str]) -> None:
    # A merge patch replaces the whole list: what the writer sends is what the Node gets.
    await kube.patch(NODES, "n1", {"spec": {"taints": list(taints)}})


async def _taints(admin: Kube) -> list[dict[str, str]]:
    """The Node's taints that these tests write (kube-controller-manager adds its own)."""
    node = await admin.get(NODES, "n1")
    mine = {OUT_OF_SERVICE["key"], "example.com/maintenance"}
    return [t for t in node["spec"].get("taints") or [] if t["key"] in mine]


async def test_only_the_controller_places_or_lifts_the_out_of_service_taint(cluster) -> None:
    _, admin, clients = cluster
    ours = {**OUT_OF_SERVICE, "value": "nodeshutdown"}
    other = {"key": "example.com/maintenance", "effect": "NoSchedule"}
    # On a node that runs, this taint makes Kubernetes force-delete its pods and detach their
    # volumes: from an intruder it is refused, whatever its value.

    async def guarded() -> bool:
        # The API server loads a new policy within a second or so (this test may run alone).
        try:
            await _taint(clients["intruder"], ours)
        except ApiError as e:
            return e.status == 403
        await _taint(clients["controller"])  # let through before the policy loaded: lift it
        return False

    await wait_for(guarded, 30, "the guard refusing the intruder's taint")
    for taint in (ours, {**OUT_OF_SERVICE, "value": "anything"}):
        with pytest.raises(ApiError) as refused:
            await _taint(clients["intruder"], taint)
        assert refused.value.status == 403, refused.value
        message = json.dumps(refused.value.body)
        assert "may add, change or remove the taint node.kubernetes.io/out-of-service" in message
    # A node's own kubelet is refused too (the NodeRestriction admission plugin already forbids
    # a kubelet any taint change on its Node; the guard is the second line).
    with pytest.raises(ApiError) as refused:
        await _taint(clients["kubelet"], ours)
    assert refused.value.status == 403, refused.value
    assert await _taints(admin) == []

    await _taint(clients["controller"], ours)
    assert await _taints(admin) == [ours]
    # Nor may the intruder lift it, change it, or drop it while adding a taint of its own;
    # taints other than this one stay RBAC's business.
    for taints in ([], [{**ours, "value": "changed"}], [other]):
        with pytest.raises(ApiError) as refused:
            await _taint(clients["intruder"], *taints)
        assert refused.value.status == 403, refused.value
    assert await _taints(admin) == [ours]
    await _taint(clients["intruder"], ours, other)
    assert await _taints(admin) == [ours, other]
    await _taint(clients["controller"])
    assert await _taints(admin) == []


async def test_whoever_rbac_allows_the_named_permission_may_change_it(
    cluster, tmp_path: Path
) -> None:
    cp, admin, clients = cluster
    ours = {**OUT_OF_SERVICE, "value": "nodeshutdown"}
    # Another remediator is granted the taint only; cluster-admin (an SSO administrator, or
    # Harvester's own ServiceAccount) has every permission, these two included.
    await admin.create(
        CLUSTER_ROLES,
        {
            "metadata": {"name": "place-out-of-service"},
            "rules": [
                {
                    "apiGroups": ["node-watchdog.io"],
                    "resources": ["outofservicetaints"],
                    "verbs": ["update"],
                }
            ],
        },
    )
    await _bind(admin, "place-out-of-service", ("default", "remediator"))
    await _bind(admin, "cluster-admin", ("default", "operator"))
    await _grant_patch_nodes(admin, [("default", "remediator")], name="patch-nodes-remediator")
    for sa in ("remediator", "operator"):
        path = await cp.kubeconfig_for_service_account("default", sa, tmp_path / f"{sa}.kc")
        clients[sa] = await Kube.from_kubeconfig(path)

    async def placed() -> bool:
        # RBAC's cache takes the new bindings within a moment.
        try:
            await _taint(clients["remediator"], ours)
        except ApiError:
            return False
        return True

    await wait_for(placed, 30, "the remediator placing the taint")
    assert await _taints(admin) == [ours]
    with pytest.raises(ApiError) as refused:
        await _annotate(clients["remediator"], json.dumps({"phase": "Fencing", "bootID": "r"}))
    assert refused.value.status == 403, refused.value
    await _taint(clients["operator"])
    await _annotate(clients["operator"], json.dumps({"phase": "Healthy", "by": "operator"}))
    assert await _taints(admin) == []
    assert await _state(admin) == json.dumps({"phase": "Healthy", "by": "operator"})


async def test_without_its_parameter_the_guard_steps_aside_and_never_blocks_node_writes(
    cluster,
) -> None:
    _, admin, clients = cluster
    await admin.delete(CONFIG_MAPS, GUARD, NAMESPACE)
    # The kubelet's own writes and everyone's other changes go on (a guard that refused them
    # would stop every kubelet's status updates in the cluster).
    await clients["kubelet"].patch(
        NODES, "n1", {"metadata": {"labels": {"example.com/zone": "b"}}}, sub="status"
    )

    async def open_again() -> bool:
        try:
            await _annotate(clients["intruder"], json.dumps({"phase": "Healthy", "n": 1}))
        except ApiError:
            return False
        return True

    await wait_for(open_again, 30, "the guard stepping aside without its parameter")
