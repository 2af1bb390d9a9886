"""Each agent's broker identity, issued without a manual step, proven on the real API server
and a real Mosquitto (DESIGN §9).

The shipped RBAC (kubevirt overlay) is applied to a fresh control plane. An agent runs as the
agents' ServiceAccount with a token bound to its pod on node-1, as the kubelet mounts it; the
controller's signer runs as the controller's ServiceAccount. The agent asks for a certificate
through a CertificateSigningRequest (actuate/mqtt_identity.py); the signer approves and signs
it only for the node the API server names as the requesting pod's. The certificate then logs
into Mosquitto started from deploy/'s broker configuration (tests/integration/
test_broker_config.py's harness), where it can write only node-1's topics.

Must-not twins: node-1's credentials asking for node-2, a token not bound to a pod, an
administrator's request, the agent approving or signing its own request, a signer that does
not lead.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from cryptography import x509

from chaos.bench.kubeload import node_body
from chaos.sim import rbac
from chaos.sim.binaries import ControlPlaneBinaries
from chaos.sim.controlplane import ControlPlane
from chaos.sim.informer import NODES, Kube, Resource
from tests.integration import test_broker_config as broker_harness
from watchdog.actuate.mqtt_identity import CSRS, CertificateSigner, Enrollment, EnrollmentRefused
from watchdog.actuate.writer import KubeWriter
from watchdog.decide.names import MQTT_CLIENT_SIGNER
from watchdog.transport.certificates import Authority, held, new_key_and_request
from watchdog.transport.kube import load_api_client
from watchdog.transport.kube_errors import KubeError

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.broker,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(240),
]

CSR_RESOURCE = Resource("/apis/certificates.k8s.io/v1", "certificatesigningrequests", False)
PREFIX = "node-watchdog/v1"
DEADLINE_S = 30.0


class World:
    """The control plane with deploy/'s RBAC, node-1 and node-2, an agent pod on node-1, the
    agents' signer and a broker that trusts it."""

    def __init__(self, cp: ControlPlane, admin: Kube, work: Path) -> None:
        self.cp, self.admin, self.work = cp, admin, work
        self.clients: list[Any] = []

    async def writer(self, kubeconfig: Path) -> KubeWriter:
        client = await load_api_client(kubeconfig)
        self.clients.append(client)
        return KubeWriter(client, request_timeout_s=10.0, attempts=2)


@pytest.fixture(scope="module")
def broker_dir() -> Iterator[Path]:
    yield from broker_harness.readable_workdir()


async def agent_pod_token(world: World, node: str) -> Path:
    """An agent pod on `node` and its pod-bound token (chaos/sim/rbac.py)."""
    return await rbac.agent_pod_token(
        world.cp, world.admin, world.agent, node, world.work / f"agent-{node}.kubeconfig"
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(
    control_plane_binaries: ControlPlaneBinaries,
    tmp_path_factory: pytest.TempPathFactory,
    broker_dir: Path,
) -> AsyncIterator[World]:
    work = Path(tmp_path_factory.mktemp("identity"))
    async with ControlPlane(binaries=control_plane_binaries) as cp:
        admin = await Kube.from_kubeconfig(cp.admin_kubeconfig)
        w = World(cp, admin, work)
        try:
            w.controller, w.agent = await rbac.install(
                cp, admin, "kubevirt", work / "controller.kubeconfig"
            )
            for node in ("node-1", "node-2"):
                await admin.create(NODES, node_body(node))
            w.pod_token = await agent_pod_token(w, "node-1")
            proc, w.broker = broker_harness.start_broker(
                broker_dir, broker_harness.controller_passwd(broker_dir)
            )
            w.signer_dir = w.broker.signer_dir
            try:
                yield w
            finally:
                broker_harness.stop(proc)
        finally:
            for client in w.clients:
                await client.close()
            await admin.close()


def signer(world: World, writer: KubeWriter, leading: bool = True) -> CertificateSigner:
    ca, key = world.signer_dir / "ca.crt", world.signer_dir / "ca.key"
    return CertificateSigner(
        writer,
        lambda: Authority.load(ca, key),
        f"system:serviceaccount:{world.agent.namespace}:{world.agent.name}",
        lambda: leading,
        interval_s=0.2,
    )


async def ask(writer: KubeWriter, common_name: str) -> str:
    """A request for `common_name`, sent by `writer`'s identity: its name."""
    _, request = new_key_and_request(common_name)
    created = await writer.call(
        "POST",
        CSRS,
        body={
            "apiVersion": "certificates.k8s.io/v1",
            "kind": "CertificateSigningRequest",
            "metadata": {"generateName": "test-"},
            "spec": {
                "request": base64.b64encode(request).decode(),
                "signerName": MQTT_CLIENT_SIGNER,
                "usages": ["client auth", "digital signature"],
            },
        },
    )
    return str(created["metadata"]["name"])


def conditions(csr: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (csr.get("status") or {}).get("conditions") or ()}


async def test_an_agent_obtains_its_nodes_certificate_and_speaks_as_its_node_only(
    world: World,
) -> None:
    ctl = await world.writer(world.controller.kubeconfig)
    agent = await world.writer(world.pod_token)
    path = world.work / "node-1.pem"
    enrollment = Enrollment(agent, "node-1", path, lifetime_s=3600, poll_s=0.2)
    signing = asyncio.create_task(signer(world, ctl).run())
    try:
        await asyncio.wait_for(enrollment.enroll(), DEADLINE_S)
    finally:
        signing.cancel()
    h = held(path)
    assert h is not None and h.common_name == "node-1"
    assert datetime.timedelta(minutes=55) < h.not_after - h.not_before < datetime.timedelta(hours=2)
    certificate = x509.load_pem_x509_certificate(path.read_bytes())
    signer_cert = x509.load_pem_x509_certificate((world.signer_dir / "ca.crt").read_bytes())
    certificate.verify_directly_issued_by(signer_cert)
    [csr] = [
        c
        for c in (await world.admin.list(CSR_RESOURCE))["items"]
        if c["spec"]["username"].endswith(f":{world.agent.name}") and c["status"].get("certificate")
    ]
    assert conditions(csr)["Approved"]["reason"] == "NodeWatchdogApproved"
    assert csr["spec"]["extra"]["authentication.kubernetes.io/node-name"] == ["node-1"]

    # The broker takes it as node-1: its own heartbeat goes through, node-2's does not.
    b = world.broker
    user = broker_harness.mqtt_credentials.CONTROLLER_USER
    async with broker_harness.subscribed(b, user, f"{PREFIX}/heartbeat/+") as inbox:
        async with b.client(None, identity=path) as client:
            await client.publish(f"{PREFIX}/heartbeat/node-2", b"forged", qos=1)
            await client.publish(f"{PREFIX}/heartbeat/node-1", b"own", qos=1)
        got = await inbox.wait_for(f"{PREFIX}/heartbeat/node-1", b"own")
    assert got == [(f"{PREFIX}/heartbeat/node-1", b"own")]

    # A restarted agent (same pod, same memory volume) reuses it until two thirds of its
    # lifetime; from then on (its clock moved on) it asks again.
    restarted = Enrollment(agent, "node-1", path)
    due = restarted.due_in()
    assert due is not None and 2000 < due < 2 * 3600 / 3
    later = h.renew_at() + datetime.timedelta(seconds=1)
    assert Enrollment(agent, "node-1", path, now=lambda: later).due_in() is None
    assert Enrollment(agent, "node-2", path).due_in() is None  # not this node's


async def test_a_nodes_credentials_get_no_certificate_of_another_node(world: World) -> None:
    """The must-not twin: node-1's pod-bound token asks for node-2; the API server records
    node-1 as the pod's node, so the signer denies it, naming both."""
    agent = await world.writer(world.pod_token)
    name = await ask(agent, "node-2")
    ctl = await world.writer(world.controller.kubeconfig)
    answered = await signer(world, ctl).pass_()
    assert (name, "denied") in answered
    csr = await world.admin.get(CSR_RESOURCE, name)
    denied = conditions(csr)["Denied"]
    assert "CN='node-2'" in denied["message"] and "'node-1'" in denied["message"]
    assert not csr["status"].get("certificate")
    # Enrollment reports it as a refusal (what the agent logs), never as a certificate.
    path = world.work / "node-2.pem"
    refused = Enrollment(agent, "node-2", path, poll_s=0.2)
    signing = asyncio.create_task(signer(world, ctl).run())
    try:
        with pytest.raises(EnrollmentRefused, match="denied"):
            await asyncio.wait_for(refused.enroll(), DEADLINE_S)
    finally:
        signing.cancel()
    assert held(path) is None


async def test_a_token_not_bound_to_a_pod_or_an_administrator_gets_none(world: World) -> None:
    ctl = await world.writer(world.controller.kubeconfig)
    unbound = await world.writer(world.agent.kubeconfig)  # the agents' account, no pod
    admin = await world.writer(world.cp.admin_kubeconfig)
    names = {await ask(unbound, "node-1"): "node-name", await ask(admin, "node-1"): "username"}
    answered = dict(await signer(world, ctl).pass_())
    for name, field in names.items():
        assert answered.get(name) == "denied", (name, answered)
        csr = await world.admin.get(CSR_RESOURCE, name)
        assert field in conditions(csr)["Denied"]["message"]
        assert not csr["status"].get("certificate")


async def test_the_agent_can_neither_approve_nor_sign_and_a_standby_answers_nothing(
    world: World,
) -> None:
    agent = await world.writer(world.pod_token)
    name = await ask(agent, "node-1")
    csr = await world.admin.get(CSR_RESOURCE, name)
    approved = json.loads(json.dumps(csr))
    approved.setdefault("status", {})["conditions"] = [
        {"type": "Approved", "status": "True", "reason": "Self", "message": "self"}
    ]
    for sub in ("approval", "status"):
        with pytest.raises(KubeError) as forbidden:
            await agent.call("PUT", f"{CSRS}/{name}/{sub}", body=approved)
        assert forbidden.value.status == 403, forbidden.value
    # A replica that does not lead leaves it pending for the leader.
    ctl = await world.writer(world.controller.kubeconfig)
    assert await signer(world, ctl, leading=False).pass_() == []
    assert not conditions(await world.admin.get(CSR_RESOURCE, name))
    # The leader then grants it.
    assert (name, "issued") in await signer(world, ctl).pass_()


async def test_the_controllers_account_cannot_ask_for_a_certificate(world: World) -> None:
    """Least privilege: only the agents ask; the controller only answers."""
    ctl = await world.writer(world.controller.kubeconfig)
    with pytest.raises(KubeError) as forbidden:
        await ask(ctl, "node-1")
    assert forbidden.value.status == 403


async def test_a_node_that_floods_requests_gets_one_certificate_and_others_are_not_delayed(
    world: World,
) -> None:
    """Bounded work per pass against one node's credentials: of its pending requests only the
    newest is signed, the others denied as superseded, and a request right after an issue is
    denied; another node's request in the same pass is granted first."""
    ctl = await world.writer(world.controller.kubeconfig)
    flooder = await world.writer(world.pod_token)
    floods = [await ask(flooder, "node-1") for _ in range(3)]
    other = await ask(await world.writer(await agent_pod_token(world, "node-2")), "node-2")
    s = signer(world, ctl)
    s.max_writes = 2  # room for the grants only: they come first
    answered = dict(await s.pass_())
    assert answered.get(other) == "issued", answered
    assert len(answered) == 2 and sum(r == "issued" for r in answered.values()) == 2
    issued = [n for n in floods if answered.get(n) == "issued"]
    assert len(issued) == 1, answered
    s.max_writes = 64
    rest = dict(await s.pass_())
    for name in floods:
        if name not in issued:
            assert rest[name] == "denied"
            message = conditions(await world.admin.get(CSR_RESOURCE, name))["Denied"]["message"]
            assert "superseded by" in message or "less than 30s ago" in message, message
    again = await ask(flooder, "node-1")
    assert dict(await s.pass_()).get(again) == "denied"
    message = conditions(await world.admin.get(CSR_RESOURCE, again))["Denied"]["message"]
    assert "issued a certificate less than 30s ago" in message
