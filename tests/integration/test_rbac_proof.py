"""The shipped RBAC is sufficient and minimal for each role, proven on the real control plane.

For each of the kubevirt overlay, the harvester overlay (namespace harvester-system) and the
kubevirt overlay with the opt-in delete-volume-attachments component (and the feature on), the
kustomization is rendered with the real kubectl; only its RBAC objects (the two ServiceAccounts,
ClusterRoles, Roles and their bindings) are applied to a fresh test cluster; the controller runs
with a token of the controller's ServiceAccount and every agent with a token of the agents'
(through its node's api link, so faults still apply). Then the service does its job:

1. power-off of node-1 → fenced → reset → its VMs run elsewhere → node-1 powered on → recovered;
2. kubelet-only fault on a node with VMs (others cordoned, so migrations cannot finish) →
   DEGRADED → evacuation migrations created → kubelet back → migrations deleted; twice, so the
   repeated Event is counted (patched) instead of created again.

and the kube-apiserver's audit log (level Metadata, every request) is read, per role:

- sufficient: no request by the role's ServiceAccount was denied (403), and the scenario
  succeeded;
- minimal: every (apiGroup, resource[/subresource], verb) granted to that ServiceAccount by the
  rendered roles, in the scope of its binding, was used by an allowed request; `NOT_EXERCISED`
  lists, with why, the grants this run cannot use (the broker certificates' requests:
  tests/integration/test_mqtt_identity.py uses them);
- really used: each node's agent read its Node with the agents' ServiceAccount (and, cut off
  from the broker, its node Lease) and wrote nothing; the controller held the leader Lease
  and wrote the migrations with its own; admin made none of the controller's distinctive writes.

Last, a compromised node: with one agent's token every write that would reboot, reset or
silence another node (state annotation, out-of-service taint, launcher pod deletion, pod status,
the leader Lease, migrations) is refused by the API server, and no node changes phase.

On failure the tables of denied requests / unused grants are printed; `-s` prints the grants
with how often each was used. Rerun (about 50 s per overlay on 2 cores):
    python3 -m pytest -p no:cacheprovider tests/integration/test_rbac_proof.py -s
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from chaos.sim.informer import LEASES, NAMESPACES, NODES, ApiError, Kube
from chaos.sim.rbac import ServiceIdentity
from tests.integration.attacks import api_attacks
from tests.integration.test_service_failover import delta, fail_over
from tests.integration.watchdog_env import (
    LEADER_LEASE,
    TIMINGS,
    WatchdogEnv,
    default_config,
    free_port,
)
from tests.unit.test_deploy import rendered_access

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.broker,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(300),
]

# The overlays whose RBAC is proven here, with the controller settings they ship (harvester: the
# same roles in harvester-system; the opt-in component adds VolumeAttachment and PVC grants).
OVERLAYS: dict[str, dict[str, str]] = {
    "kubevirt": {},
    "harvester": {},
    "kubevirt+delete-volume-attachments": {"WATCHDOG_DELETE_VOLUME_ATTACHMENTS": "true"},
}
# (scope, apiGroup, resource, verb) granted but legitimately not used by this scenario → why.
# Keep it empty unless a grant cannot be exercised here; an entry that the run uses anyway
# fails the test (a stale excuse hides nothing).
_IDENTITY = (
    "the test cluster's broker takes anonymous plain MQTT, so no agent asks for a "
    "certificate and no controller signs one here; tests/integration/test_mqtt_identity.py "
    "exercises these grants of deploy/'s RBAC on the real API server"
)
_SIGNER = "an authorization check inside the request that approves or signs, never a request"
_CSRS = "certificates.k8s.io", "certificatesigningrequests"
NOT_EXERCISED: dict[tuple[str, str, str, str], str] = {
    ("cluster", *_CSRS, "create"): _IDENTITY,
    ("cluster", *_CSRS, "get"): _IDENTITY,
    ("cluster", *_CSRS, "list"): _IDENTITY,
    ("cluster", _CSRS[0], f"{_CSRS[1]}/approval", "update"): _IDENTITY,
    ("cluster", _CSRS[0], f"{_CSRS[1]}/status", "update"): _IDENTITY,
    ("cluster", _CSRS[0], "signers node-watchdog.io/mqtt-client", "approve"): _SIGNER,
    ("cluster", _CSRS[0], "signers node-watchdog.io/mqtt-client", "sign"): _SIGNER,
}

Grant = tuple[str, str, str, str]  # (scope: "cluster" or a namespace, group, resource, verb)


# --- the audit log -------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One API request as the audit log recorded it."""

    user: str
    verb: str
    group: str
    resource: str  # "pods/status" for a subresource; "" for a non-resource URL
    namespace: str
    name: str
    code: int
    decision: str  # authorization.k8s.io/decision: "allow", "forbid" or ""
    uri: str
    user_agent: str

    @property
    def denied(self) -> bool:
        return self.code == 403 or self.decision == "forbid"

    def row(self) -> str:
        return _ROW.format(
            self.code,
            self.verb,
            self.group or "core",
            self.resource or self.uri,
            self.namespace or "-",
            self.name,
        )


_ROW = "{:>4}  {:<8} {:<20} {:<36} {:<16} {}"
_HEADER = _ROW.format("code", "verb", "group", "resource", "namespace", "name")


def read_audit(path: Path) -> list[Request]:
    """Every request (one per auditID, its last stage: a watch shows from ResponseStarted)."""
    by_id: dict[str, dict[str, Any]] = {}
    with path.open(encoding="utf-8") as f:
        for line in f:
            event = json.loads(line)
            by_id[event["auditID"]] = event
    out = []
    for e in by_id.values():
        ref = e.get("objectRef") or {}
        resource = ref.get("resource", "")
        if ref.get("subresource"):
            resource = f"{resource}/{ref['subresource']}"
        out.append(
            Request(
                user=(e.get("user") or {}).get("username", ""),
                verb=e.get("verb", ""),
                group=ref.get("apiGroup", ""),
                resource=resource,
                namespace=ref.get("namespace", ""),
                name=ref.get("name", ""),
                code=int((e.get("responseStatus") or {}).get("code") or 0),
                decision=(e.get("annotations") or {}).get("authorization.k8s.io/decision", ""),
                uri=e.get("requestURI", ""),
                user_agent=e.get("userAgent", ""),
            )
        )
    return out


def grants_used(grants: set[Grant], requests: list[Request]) -> dict[Grant, int]:
    """How many allowed requests each grant covers: a ClusterRoleBinding's in any namespace
    (or cluster-scoped), a RoleBinding's in its namespace only."""
    used: Counter[Grant] = Counter()
    for r in requests:
        if r.denied or not r.resource:
            continue
        for scope, group, resource, verb in grants:
            if (group, resource, verb) == (r.group, r.resource, r.verb) and scope in (
                "cluster",
                r.namespace,
            ):
                used[(scope, group, resource, verb)] += 1
    return dict(used)


def table(title: str, header: str, rows: list[str]) -> str:
    return "\n".join([title, header, *rows])


# --- the scenario --------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=sorted(OVERLAYS))
async def env(
    request: pytest.FixtureRequest,
    control_plane_binaries,
    tmp_path_factory: pytest.TempPathFactory,
):
    overlay = request.param
    work = Path(tmp_path_factory.mktemp(f"rbac-proof-{overlay}"))
    # The agents wait for their kubelet's Lease before fencing (opt-in): their Role grants it.
    config = default_config(
        audit_log=True,
        rbac_overlay=overlay,
        agent_env={**TIMINGS, "WATCHDOG_SELF_FENCE_LEASE_S": "3.75"},  # 15 s at time scale 0.25
    )
    async with WatchdogEnv(
        config, control_plane_binaries, work, controllers=1, controller_env=OVERLAYS[overlay]
    ) as e:
        yield e


ROLES = ("agent", "controller")


def identity(env: WatchdogEnv, role: str = "controller") -> ServiceIdentity:
    ident = env.cluster.identity if role == "controller" else env.cluster.agent_identity
    assert ident is not None, "the cluster was not started with rbac_overlay"
    return ident


async def audited(env: WatchdogEnv) -> list[Request]:
    """The audit log, once everything requested so far is in it: an admin request for a
    namespace that does not exist is made last, and awaited in the log."""
    path = env.cluster.control_plane.audit_log_path
    assert path is not None
    marker = f"audit-marker-{uuid.uuid4().hex[:12]}"
    try:
        await env.cluster.kube.get(NAMESPACES, marker)
    except ApiError as e:
        assert e.status == 404, e
    await env.wait_for(lambda: marker in path.read_text(errors="replace"), 30, "audit log flushed")
    return read_audit(path)


async def cordon(env: WatchdogEnv, node: str, on: bool) -> None:
    await env.cluster.kube.patch(NODES, node, {"spec": {"unschedulable": on or None}})


async def test_power_off_reset_failover_and_recovery_run_as_the_service_account(env):
    await env.restore()
    c = env.cluster
    node = "node-1"
    run = await fail_over(env, node, "poweroff")
    for vm, copy in run["new"].items():
        assert c.vmi_node(vm) not in (None, node) and c.vmi_phase(vm) == "Running"
        assert c.ledger.running_on(f"default/{vm}") == [copy.node]
    for reason in ("NodeUnreachable", "FalselyReadyPods", "NodeFenced", "ForceReset"):
        assert await env.events(reason, node, since=run["wall"]), f"no {reason} Event"
    assert env.tainted(node)
    if env.controller_env.get("WATCHDOG_DELETE_VOLUME_ATTACHMENTS") == "true":
        # The opt-in component: the reset VMs' stale VolumeAttachments on node-1 are gone.
        await env.wait_for(
            lambda: (
                not [
                    va
                    for va in c.informers["volumeattachments"].values()
                    if va["spec"].get("nodeName") == node
                ]
            ),
            30,
            f"no VolumeAttachment left on {node}",
        )
        assert delta(run, "watchdog_actions_total", action="DeleteVolumeAttachments") > 0

    await env.fault("poweron", node)
    await env.wait_for(
        lambda: env.phase(node) == "Healthy" and not env.tainted(node), 60, f"{node} recovered"
    )
    assert await env.events("NodeRecovered", node, since=run["wall"])
    await env.restore()
    assert c.ledger.split_brain_seconds() == 0, c.ledger.totals()
    assert c.ledger.lost() == [] and c.ledger.false_resets() == [], c.ledger.totals()


async def test_a_degraded_node_is_evacuated_and_the_evacuation_stopped_as_the_service_account(
    env,
):
    await env.restore()
    c = env.cluster
    node = max(("node-2", "node-3", "node-4"), key=lambda n: len(c.vms_on(n)))
    vms = c.vms_on(node)
    assert vms, f"{node} runs no VM: nothing to evacuate"
    copies = {vm: list(c.ledger.vms[f"default/{vm}"].running) for vm in vms}
    leader = await env.wait_leader()
    before = await leader.scrape()
    wall = time.time()
    others = [n for n in c.fleet.members if n != node]
    # With every other node cordoned the migration targets cannot be placed: the migrations
    # stay unfinished, so the kubelet's return must delete them (StopEvacuation).
    for n in others:
        await cordon(env, n, True)
    try:
        for cycle in (1, 2):
            t0 = await env.fault("kubelet-stop", node)
            await env.wait_for(lambda: env.phase(node) == "Degraded", 45, f"{node} Degraded")
            await env.wait_for(
                lambda t0=t0: bool(_ours(env, node, t0)), 30, f"evacuation migrations ({cycle})"
            )
            await env.fault("kubelet-start", node)
            await env.wait_for(lambda: env.phase(node) == "Healthy", 45, f"{node} Healthy")
            await env.wait_for(
                lambda t0=t0: all("deleted" in m for m in _ours(env, node, t0).values()),
                30,
                f"unfinished evacuation migrations deleted ({cycle})",
            )
    finally:
        for n in others:
            await cordon(env, n, False)
    after = await leader.scrape()

    # Evacuated and stopped twice; the second EvacuationStarted was counted on the first Event.
    started = await env.events("EvacuationStarted", node, since=wall)
    assert started and max(int(e.get("count") or 1) for e in started) >= 2, started
    assert await env.events("NodeRecovered", node, since=wall)
    # Nothing reset: the VMs kept running where they were, once.
    for name in ("TaintOutOfService", "ForceDeletePods"):
        assert after.get("watchdog_actions_total", action=name) == before.get(
            "watchdog_actions_total", action=name
        )
    for vm in vms:
        assert list(c.ledger.vms[f"default/{vm}"].running) == copies[vm], vm
    await env.restore()
    assert c.ledger.split_brain_seconds() == 0 and c.ledger.false_resets() == []


def _ours(env: WatchdogEnv, node: str, since: float) -> dict[str, dict]:
    return {
        k: m
        for k, m in env.timeline.migrations.items()
        if m["evacuation"] == node and m["created"] >= since
    }


async def test_an_agent_cut_from_the_broker_reads_its_own_lease_as_its_service_account(env):
    """An agent without broker contact is at risk of fencing: it reads its kubelet's Lease
    (quorum GET in kube-node-lease) as the agents' ServiceAccount, and its node, whose kubelet
    renews, is neither fenced nor reset."""
    await env.restore()
    c = env.cluster
    node = "node-3"
    agent = identity(env, "agent")
    fences = len([h for h in c.faults.history if h.get("action") == "fence"])
    await env.fault("broker-link-cut", node)

    def lease_reads(requests: list[Request]) -> list[Request]:
        return [
            r
            for r in requests
            if r.user == agent.username
            and (r.verb, r.resource, r.namespace, r.name)
            == ("get", "leases", "kube-node-lease", node)
            and not r.denied
        ]

    deadline = time.monotonic() + 30
    while not lease_reads(await audited(env)):
        assert time.monotonic() < deadline, "the cut-off agent never read its Lease"
        await asyncio.sleep(1.0)
    await env.fault("broker-link-heal", node)
    await env.wait_for(lambda: env.phase(node) == "Healthy", 30, f"{node} healthy again")
    assert len([h for h in c.faults.history if h.get("action") == "fence"]) == fences
    assert not env.tainted(node)
    await env.restore()


@pytest.mark.parametrize("role", ROLES)
async def test_preflight_as_each_role_finds_every_verb_allowed_and_the_agent_no_more(env, role):
    """What an operator runs after installing (docs/OPERATIONS.md), with the same token; for
    the agent, also every controller write is checked to be denied."""
    environ = env.controller_environment(free_port())
    environ["KUBECONFIG"] = str(identity(env, role).kubeconfig)
    proc = await asyncio.create_subprocess_exec(
        "node-watchdog",
        "preflight",
        "--role",
        role,
        env=environ,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 90)
    text = out.decode(errors="replace")
    rbac = [line for line in text.splitlines() if " rbac: " in f" {line}"]
    assert rbac and all(line.startswith("ok") for line in rbac), text
    must_not = [line for line in rbac if "rbac: must not " in line]
    assert (len(must_not) >= 5) == (role == "agent"), text
    assert proc.returncode == 0, text


# --- what the audit log proves -------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
async def test_no_request_of_either_service_account_was_denied(env, role):
    ident = identity(env, role)
    mine = [r for r in await audited(env) if r.user == ident.username]
    denied = [r for r in mine if r.denied]
    assert not denied, table(
        f"{len(denied)} of {len(mine)} requests by {ident.username} were denied:",
        _HEADER,
        sorted({r.row() for r in denied}),
    )


@pytest.mark.parametrize("role", ROLES)
async def test_every_rule_granted_to_either_service_account_is_used_by_its_role(env, role):
    ident = identity(env, role)
    access = rendered_access(ident.objects, ident.namespace, ident.name)
    grants = {(scope, *g) for scope, gs in access.items() for g in gs}
    assert grants, f"nothing granted to {ident.username}"
    mine = [r for r in await audited(env) if r.user == ident.username]
    used = grants_used(grants, mine)
    unused = sorted(g for g in grants if g not in used and g not in NOT_EXERCISED)
    # An excuse is stale when this role used it, or when neither role is granted it.
    either: set[Grant] = set()
    for r in ROLES:
        i = identity(env, r)
        either |= {
            (s, *g) for s, gs in rendered_access(i.objects, i.namespace, i.name).items() for g in gs
        }
    stale = sorted(g for g in NOT_EXERCISED if g in used or g not in either)
    print(f"\n[rbac] {len(mine)} requests by {ident.username}; grants used:")
    for g in sorted(grants):
        print(f"  {g[0]:<16} {g[1] or 'core':<20} {g[2]:<36} {g[3]:<8} {used.get(g, 0)}")
    assert not unused, table(
        f"granted to the {role} by the {ident.overlay} overlay but never used by it "
        "(remove the rule, or exercise it / explain it in NOT_EXERCISED):",
        "scope            group                resource                             verb",
        [f"{s:<16} {g or 'core':<20} {r:<36} {v}" for s, g, r, v in unused],
    )
    assert not stale, f"NOT_EXERCISED entries that are used or no longer granted: {stale}"


async def test_each_service_account_did_its_roles_work_and_admin_none_of_it(env):
    agent, ctl = identity(env, "agent"), identity(env, "controller")
    assert agent.username != ctl.username
    requests = await audited(env)
    by_agent = [r for r in requests if r.user == agent.username]
    by_controller = [r for r in requests if r.user == ctl.username]
    # Every agent (through its node's api link) read its own Node as the agents' ServiceAccount,
    # again and again (its API check runs every second), and read nothing else.
    reads = Counter(
        r.name for r in by_agent if (r.verb, r.resource) == ("get", "nodes") and not r.denied
    )
    assert all(reads[n] >= 5 for n in env.cluster.fleet.members), reads
    # (`preflight --role agent`, run above with the same token, asks SelfSubjectAccessReviews.)
    service = [r for r in by_agent if "(preflight;" not in r.user_agent]
    own_lease = [r for r in service if (r.resource, r.namespace) == ("leases", "kube-node-lease")]
    assert {r.name for r in own_lease} <= set(env.cluster.fleet.members), own_lease
    others = Counter(
        (r.verb, r.resource or r.uri)
        for r in service
        if r.resource != "nodes" and r not in own_lease
    )
    assert not others, f"the agents did more than read Nodes and node Leases: {others}"
    assert {r.verb for r in service} == {"get"}, Counter(r.verb for r in service)
    assert len(by_controller) > 100, f"only {len(by_controller)} requests by {ctl.username}"
    # The controller's distinctive writes came from its ServiceAccount, never from admin or
    # an agent.
    distinctive = [
        r
        for r in requests
        if r.verb in ("create", "update", "patch", "delete")
        and (
            (r.resource == "leases" and r.namespace == env.namespace)
            or r.resource == "virtualmachineinstancemigrations"
        )
        and not r.denied
    ]
    by_user = Counter(r.user for r in distinctive)
    assert set(by_user) == {ctl.username}, by_user
    lease_writes = [r for r in distinctive if r.resource == "leases"]
    assert {r.verb for r in lease_writes} >= {"create", "update"}, Counter(
        r.verb for r in lease_writes
    )


# --- a compromised node ----------------------------------------------------------------------


async def test_a_compromised_nodes_token_cannot_reboot_reset_or_silence_another_node(env):
    """One node's credentials in an attacker's hands: the agent token (what every DaemonSet pod
    mounts). Each write that would fence a healthy node, reset its VMs or take the controller's
    place is refused by the API server (403), and no node changes phase. Runs last: its
    refusals are the only denied requests of the agents' ServiceAccount."""
    await env.restore()
    c = env.cluster
    victim = max(("node-2", "node-3", "node-4"), key=lambda n: len(c.vms_on(n)))
    phases = {n: env.phase(n) for n in c.fleet.members}
    assert set(phases.values()) == {"Healthy"}, phases
    pod = next(p for p in c.launcher_pods(victim))
    lease = await c.kube.get(LEASES, LEADER_LEASE, env.namespace)
    stolen = await Kube.from_kubeconfig(identity(env, "agent").kubeconfig)
    name = pod["metadata"]["name"]
    try:
        refused = await api_attacks(stolen, victim, pod, lease)
    finally:
        await stolen.close()
    assert set(refused.values()) == {403}, refused
    # Nothing moved: every node still Healthy, the pod still there, the Lease still ours.
    assert {n: env.phase(n) for n in c.fleet.members} == phases
    assert any(p["metadata"]["name"] == name for p in c.launcher_pods(victim))
    after = await c.kube.get(LEASES, LEADER_LEASE, env.namespace)
    assert after["spec"]["holderIdentity"] == lease["spec"]["holderIdentity"]
