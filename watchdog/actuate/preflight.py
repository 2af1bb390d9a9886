"""Preflight checks against the Kubernetes API: reachable, every verb the role uses allowed
(and, for the agent, none of the controller's writes), KubeVirt and Harvester CRDs present or
absent (and what that means).

Owns `CONTROLLER_ACCESS` and `AGENT_ACCESS`, the tables of what each role does to the API
(resource, verbs, namespace, why), and `AGENT_MUST_NOT`, what a node's identity must not be
able to do. `check_access` asks a SelfSubjectAccessReview per verb of a table;
tests/unit/test_deploy.py holds deploy/'s roles equal to the tables, so the shipped roles and the
check can never disagree.

Returns `Check(name, ok, detail)` values; printing them, and the exit code, is the runtime's.
Must not: write anything but SelfSubjectAccessReviews (which persist nothing).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from watchdog.actuate.writer import KubeWriter
from watchdog.decide.names import MQTT_CLIENT_SIGNER, NODE_LEASE_NAMESPACE
from watchdog.transport.kube import ApiClient
from watchdog.transport.kube_errors import KubeError, NotFound

# Placeholder in the table for the watchdog's own namespace (Settings.namespace).
OWN_NAMESPACE = "{namespace}"


class PreflightSettings(Protocol):
    @property
    def namespace(self) -> str: ...

    @property
    def delete_volume_attachments(self) -> bool: ...

    @property
    def api_request_timeout_s(self) -> float: ...


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class AccessRule:
    """Verbs on one resource. `namespace` None = all namespaces (or cluster-scoped);
    `feature` names the setting that must be on for the rule to be needed."""

    group: str
    resource: str
    verbs: tuple[str, ...]
    purpose: str
    subresource: str = ""
    namespace: str | None = None
    feature: str | None = None
    # RBAC resourceNames: the rule covers these objects only (at most one: a
    # SelfSubjectAccessReview asks about one name).
    name: str | None = None

    @property
    def resource_name(self) -> str:
        """`pods/status`, `leases.coordination.k8s.io`: how kubectl and RBAC errors say it."""
        res = f"{self.resource}/{self.subresource}" if self.subresource else self.resource
        res = f"{res}.{self.group}" if self.group else res
        return f"{res} {self.name}" if self.name else res


# Everything the controller does to the API: its informers (observe) and its writes (actuate).
CONTROLLER_ACCESS: tuple[AccessRule, ...] = (
    AccessRule("", "nodes", ("get", "list", "watch"), "watch nodes; re-read before a write"),
    AccessRule("", "nodes", ("patch",), "out-of-service taint; phase annotation"),
    AccessRule("", "nodes", ("patch",), "the NodeWatchdog condition", "status"),
    AccessRule("", "pods", ("list", "watch", "get"), "virt-launcher pods on each node"),
    AccessRule("", "pods", ("delete",), "force-delete launcher pods of a reset node"),
    AccessRule("", "pods", ("patch",), "mark falsely-ready pods Ready=False", "status"),
    AccessRule("", "events", ("create", "patch"), "Events on Nodes and VMIs (counted)"),
    AccessRule(
        "coordination.k8s.io",
        "leases",
        ("list", "watch"),
        "kubelet leases (a node signal)",
        namespace=NODE_LEASE_NAMESPACE,
    ),
    AccessRule(
        "coordination.k8s.io",
        "leases",
        ("get", "create", "update"),
        "leader election",
        namespace=OWN_NAMESPACE,
    ),
    AccessRule("kubevirt.io", "virtualmachineinstances", ("list", "watch"), "VMIs per node"),
    AccessRule("kubevirt.io", "virtualmachines", ("list", "watch"), "VM run strategies"),
    AccessRule(
        "kubevirt.io",
        "virtualmachineinstancemigrations",
        ("list", "watch", "create", "delete"),
        "evacuation of degraded nodes",
    ),
    AccessRule("kubevirt.io", "kubevirts", ("list", "watch"), "KubeVirt migration limits"),
    AccessRule(
        "migrations.kubevirt.io",
        "migrationpolicies",
        ("list", "watch"),
        "report the MigrationPolicy each evacuated VMI migrates under",
    ),
    AccessRule("", "namespaces", ("list", "watch"), "namespace labels for MigrationPolicies"),
    AccessRule("harvesterhci.io", "settings", ("list", "watch"), "vm-force-reset-policy"),
    AccessRule("harvesterhci.io", "upgrades", ("list", "watch"), "hold resets during an upgrade"),
    AccessRule(
        "certificates.k8s.io",
        "certificatesigningrequests",
        ("list",),
        "the agents' broker certificate requests",
    ),
    AccessRule(
        "certificates.k8s.io",
        "certificatesigningrequests",
        ("update",),
        "approve or deny them",
        "approval",
    ),
    AccessRule(
        "certificates.k8s.io",
        "certificatesigningrequests",
        ("update",),
        "issue the certificates",
        "status",
    ),
    AccessRule(
        "certificates.k8s.io",
        "signers",
        ("approve", "sign"),
        "approve and sign for our signer only",
        name=MQTT_CLIENT_SIGNER,
    ),
    AccessRule(
        "storage.k8s.io",
        "volumeattachments",
        ("list", "watch", "delete"),
        "delete stale VolumeAttachments of reset VMs",
        feature="delete_volume_attachments",
    ),
    AccessRule(
        "",
        "persistentvolumeclaims",
        ("get",),
        "map reset pods' PVCs to their volumes",
        feature="delete_volume_attachments",
    ),
)

# Everything the agent does to the API: one GET of its own Node per check, and of its own node
# Lease while it is at risk of fencing (observe/node_probe.py).
AGENT_ACCESS: tuple[AccessRule, ...] = (
    AccessRule("", "nodes", ("get",), "read the phase recorded on its own Node"),
    AccessRule(
        "coordination.k8s.io",
        "leases",
        ("get",),
        "read its kubelet's Lease renewals before fencing (self_fence_lease_s)",
        namespace=NODE_LEASE_NAMESPACE,
    ),
    AccessRule(
        "certificates.k8s.io",
        "certificatesigningrequests",
        ("create", "get"),
        "ask for its node's broker certificate and read the answer",
    ),
)

# What a node's identity must not be able to do: each would let one compromised node reboot,
# reset or silence another (DESIGN §9). `preflight --role agent` fails when any is allowed.
AGENT_MUST_NOT: tuple[AccessRule, ...] = (
    AccessRule("", "nodes", ("patch", "update"), "write a state annotation or a taint"),
    AccessRule("", "pods", ("delete",), "force-delete another node's VM pods"),
    AccessRule("", "pods", ("patch",), "mark pods not ready", "status"),
    AccessRule(
        "coordination.k8s.io",
        "leases",
        ("create", "update"),
        "take the leader Lease",
        namespace=OWN_NAMESPACE,
    ),
    AccessRule(
        "kubevirt.io",
        "virtualmachineinstancemigrations",
        ("create", "delete"),
        "start or stop migrations",
    ),
    AccessRule(
        "certificates.k8s.io",
        "signers",
        ("approve", "sign"),
        "grant itself a broker certificate of another node",
        name=MQTT_CLIENT_SIGNER,
    ),
    AccessRule(
        "certificates.k8s.io",
        "certificatesigningrequests",
        ("update",),
        "approve a certificate request",
        "approval",
    ),
)

# API groups/versions the controller reads, with what their absence means.
CRD_CHECKS: tuple[tuple[str, str, str, bool], ...] = (
    # (group/version, plural, meaning when absent, required)
    (
        "kubevirt.io/v1",
        "virtualmachineinstances",
        "no KubeVirt: there are no VMs to protect",
        True,
    ),
    ("kubevirt.io/v1", "virtualmachines", "no KubeVirt VMs: restarts cannot be followed", True),
    (
        "kubevirt.io/v1",
        "virtualmachineinstancemigrations",
        "no KubeVirt migrations: degraded nodes cannot be evacuated",
        True,
    ),
    ("kubevirt.io/v1", "kubevirts", "no KubeVirt CR: configured migration limits apply", True),
    (
        "migrations.kubevirt.io/v1alpha1",
        "migrationpolicies",
        "no MigrationPolicies: every migration uses the KubeVirt CR's settings",
        False,
    ),
    ("harvesterhci.io/v1beta1", "settings", "no Harvester: policy from config", False),
    ("harvesterhci.io/v1beta1", "upgrades", "no Harvester upgrades: no upgrade hold", False),
)


def required_access(
    settings: PreflightSettings, table: Iterable[AccessRule] = CONTROLLER_ACCESS
) -> list[AccessRule]:
    """The table for these settings: features off dropped, own namespace filled in."""
    enabled = {"delete_volume_attachments": settings.delete_volume_attachments}
    rules = []
    for rule in table:
        if rule.feature is not None and not enabled.get(rule.feature, False):
            continue
        if rule.namespace == OWN_NAMESPACE:
            rule = AccessRule(
                rule.group,
                rule.resource,
                rule.verbs,
                rule.purpose,
                rule.subresource,
                settings.namespace,
                rule.feature,
                rule.name,
            )
        rules.append(rule)
    return rules


def cluster_role_rules(rules: Iterable[AccessRule]) -> list[dict[str, Any]]:
    """RBAC PolicyRules for a ClusterRole granting `rules` (namespaces are a binding's business:
    bind namespaced rules with a RoleBinding to narrow them)."""
    merged: dict[tuple[str, str, str | None], list[str]] = {}
    for rule in rules:
        res = f"{rule.resource}/{rule.subresource}" if rule.subresource else rule.resource
        verbs = merged.setdefault((rule.group, res, rule.name), [])
        verbs.extend(v for v in rule.verbs if v not in verbs)
    return [
        {"apiGroups": [group], "resources": [res], "verbs": verbs}
        | ({"resourceNames": [name]} if name else {})
        for (group, res, name), verbs in merged.items()
    ]


async def check_api(api_client: ApiClient, *, timeout_s: float = 10.0) -> Check:
    """`/version` answers."""
    writer = KubeWriter(api_client, request_timeout_s=timeout_s, attempts=1)
    try:
        version = await writer.once("GET", "/version", what="GET /version")
    except KubeError as e:
        return Check("api reachable", False, f"{api_client.configuration.host}: {e}")
    return Check(
        "api reachable",
        True,
        f"{api_client.configuration.host}: Kubernetes {version.get('gitVersion', '?')}",
    )


async def check_access(
    api_client: ApiClient,
    settings: PreflightSettings,
    *,
    table: Iterable[AccessRule] = CONTROLLER_ACCESS,
    forbidden: bool = False,
    concurrency: int = 8,
) -> list[Check]:
    """One SelfSubjectAccessReview per verb of the table; one Check per verb, named
    `rbac: <verb> <resource>[ in <namespace>]`. With `forbidden`, the table lists what must be
    denied, and a Check fails when it is allowed."""
    writer = KubeWriter(api_client, request_timeout_s=settings.api_request_timeout_s)
    limit = asyncio.Semaphore(concurrency)
    asks = [(rule, verb) for rule in required_access(settings, table) for verb in rule.verbs]

    async def review(rule: AccessRule, verb: str) -> Check:
        where = f" in {rule.namespace}" if rule.namespace else ""
        name = f"rbac: {verb} {rule.resource_name}{where}"
        attributes: dict[str, str] = {
            "group": rule.group,
            "resource": rule.resource,
            "verb": verb,
        }
        if rule.subresource:
            attributes["subresource"] = rule.subresource
        if rule.namespace:
            attributes["namespace"] = rule.namespace
        if rule.name:
            attributes["name"] = rule.name
        body = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": attributes},
        }
        async with limit:
            try:
                answer = await writer.call(
                    "POST",
                    "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                    body=body,
                    what=f"SelfSubjectAccessReview {verb} {rule.resource_name}",
                )
            except KubeError as e:
                return Check(name, False, f"cannot ask: {e}")
        status = answer.get("status") or {}
        allowed = bool(status.get("allowed"))
        if forbidden:
            if allowed:
                return Check(
                    f"rbac: must not {verb} {rule.resource_name}{where}",
                    False,
                    f"ALLOWED: this identity could {rule.purpose}; grant the agent's "
                    "ServiceAccount only AGENT_ACCESS",
                )
            return Check(f"rbac: must not {verb} {rule.resource_name}{where}", True, "denied")
        if allowed:
            return Check(name, True, f"allowed ({rule.purpose})")
        why = status.get("reason") or status.get("evaluationError") or "no rule allows it"
        return Check(name, False, f"DENIED: needed for {rule.purpose}; {why}")

    return list(await asyncio.gather(*(review(rule, verb) for rule, verb in asks)))


async def check_crds(api_client: ApiClient, *, timeout_s: float = 10.0) -> list[Check]:
    """Whether the API serves KubeVirt's and Harvester's resources (discovery: no RBAC needed).
    A missing Harvester is fine; missing KubeVirt is a failure."""
    writer = KubeWriter(api_client, request_timeout_s=timeout_s)
    # group/version → the plural names it serves; None: not served at all; str: why unknown
    served: dict[str, set[str] | str | None] = {}
    checks = []
    for group_version, plural, absent_means, required in CRD_CHECKS:
        if group_version not in served:
            try:
                doc = await writer.call(
                    "GET", f"/apis/{group_version}", what=f"discover {group_version}"
                )
                served[group_version] = {str(r.get("name")) for r in doc.get("resources") or ()}
            except NotFound:
                served[group_version] = None
            except KubeError as e:
                served[group_version] = str(e)
        resources = served[group_version]
        name = f"crd: {plural}.{group_version.split('/')[0]}"
        if isinstance(resources, str):
            checks.append(Check(name, False, f"cannot ask: {resources}"))
        elif resources is not None and plural in resources:
            checks.append(Check(name, True, f"served ({group_version})"))
        else:
            checks.append(Check(name, not required, f"absent: {absent_means}"))
    return checks


async def run_preflight(
    api_client: ApiClient, settings: PreflightSettings, role: str = "controller"
) -> list[Check]:
    """API reachability first; when it answers, the role's RBAC (for the agent: also what it
    must not be allowed) and, for the controller, the CRDs it reads."""
    api = await check_api(api_client, timeout_s=settings.api_request_timeout_s)
    if not api.ok:
        return [api]
    if role == "agent":
        allowed, denied = await asyncio.gather(
            check_access(api_client, settings, table=AGENT_ACCESS),
            check_access(api_client, settings, table=AGENT_MUST_NOT, forbidden=True),
        )
        return [api, *allowed, *denied]
    access, crds = await asyncio.gather(
        check_access(api_client, settings),
        check_crds(api_client, timeout_s=settings.api_request_timeout_s),
    )
    return [api, *access, *crds]


__all__ = [
    "AGENT_ACCESS",
    "AGENT_MUST_NOT",
    "CONTROLLER_ACCESS",
    "CRD_CHECKS",
    "AccessRule",
    "Check",
    "PreflightSettings",
    "check_access",
    "check_api",
    "check_crds",
    "cluster_role_rules",
    "required_access",
    "run_preflight",
]
