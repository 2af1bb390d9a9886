"""A compromised node: what one node's credentials can do to the others (DESIGN §9).

The test cluster runs the broker as deploy/ ships it (`SimConfig.broker_identity`: the shipped
mosquitto.conf and ACL, TLS only; each agent obtained a certificate of its node from the
controller through a CertificateSigningRequest, with a token bound to its agent pod), the RBAC
and the state guard of the kubevirt overlay, a real controller and a real agent per node.

The attacker holds everything node-4 holds: the certificate and key its agent obtained, and the
token bound to its agent pod. It stops node-4's agent (it owns the machine) and tries every
attack: publish another node's heartbeat, status or peer report, take another client id, write
probe lists and the member count, send 1,000,000 node names, ask for another node's
certificate, and, through the API server, fence, taint, reset or replace the controller. Each
is refused (the broker's ACL and identity-derived client ids, the signer's review, RBAC) or
bounded (the controller's books), and no other node changes phase.

"Not delivered" is shown with a barrier, never a sleep: a QoS 1 publish returns only after the
broker routed it, and one connection's messages arrive in order, so once a later message has
reached a subscriber, an earlier one that was allowed would have reached it before.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest
import pytest_asyncio

from chaos.sim.broker_identity import IdentityBroker, sign_identity
from chaos.sim.informer import LEASES, Kube, Obj, Resource
from tests.integration.attacks import api_attacks
from tests.integration.watchdog_env import LEADER_LEASE, WatchdogEnv, default_config
from watchdog.decide.acks import ack_topic
from watchdog.decide.heartbeats import Heartbeat, encode_heartbeat, heartbeat_topic, status_topic
from watchdog.decide.names import MQTT_CLIENT_SIGNER
from watchdog.decide.observations import FenceDeclaration
from watchdog.decide.peer_probe import PeerView
from watchdog.decide.peer_reports import PeerReport, encode_report, peers_topic
from watchdog.decide.peer_ring import MAX_TARGETS, encode_probe_list, probe_topic
from watchdog.decide.quorum import encode_members, members_topic
from watchdog.decide.roster import roster_topic
from watchdog.transport.certificates import new_key_and_request

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.broker,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(300),
]

PREFIX = "node-watchdog/v1"
ATTACKER = "node-4"
OTHERS = ("node-1", "node-2", "node-3")
FLOOD_NAMES = 1_000_000
FLOOD_BATCH = 512  # reports (of 16 names) per batch: below the broker's queue for a client
DEADLINE_S = 15.0
CSRS = Resource("/apis/certificates.k8s.io/v1", "certificatesigningrequests", False)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(control_plane_binaries, tmp_path_factory: pytest.TempPathFactory):
    work = Path(tmp_path_factory.mktemp("compromised"))
    # No watchdog devices: the attacker stops node-4's agent, and a device would then reboot
    # node-4 (taking the attacker's foothold with it); nothing here may be reset anyway.
    config = default_config(rbac_overlay="kubevirt", broker_identity=True, watchdog_devices=False)
    async with WatchdogEnv(config, control_plane_binaries, work) as e:
        yield e


def tls(broker: IdentityBroker, identity: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(broker.ca_file))
    if identity is not None:
        ctx.load_cert_chain(str(identity))
    return ctx


@asynccontextmanager
async def connected(
    broker: IdentityBroker, identity: Path | None, identifier: str | None = None
) -> AsyncIterator[aiomqtt.Client]:
    """On the agents' listener with `identity` (cert + key), or, with None, as the controller
    (its password, its listener)."""
    if identity is None:
        client = aiomqtt.Client(
            broker.host,
            broker.controller_port,
            username=broker.controller_user,
            password=broker.controller_password_file.read_text().strip(),
            tls_context=tls(broker, None),
            identifier=identifier,
            timeout=DEADLINE_S,
        )
    else:
        client = aiomqtt.Client(
            broker.host,
            broker.port,
            tls_context=tls(broker, identity),
            identifier=identifier,
            timeout=DEADLINE_S,
        )
    async with client:
        yield client


class Inbox:
    """Every message a client receives, by topic, read in the background."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.messages: list[tuple[str, bytes]] = []
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for m in self.client.messages:
            payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
            self.messages.append((str(m.topic), payload))

    async def wait_for(self, topic: str, payload: bytes) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while (topic, payload) not in self.messages:
            assert time.monotonic() < deadline, f"{topic} {payload!r} never arrived"
            await asyncio.sleep(0.02)

    def got(self, marker: bytes) -> list[str]:
        return [t for t, p in self.messages if marker in p]

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def hb(node: str, boot_id: str, seq: int, marker: str) -> bytes:
    fence = FenceDeclaration(armed=False, after_s=1.0, bound_s=1.0)
    return encode_heartbeat(Heartbeat(node, boot_id, seq, time.time(), marker, fence))


async def scrape(env: WatchdogEnv):
    leader = await env.wait_leader()
    return await leader.scrape()


async def attack_topics(
    attacker: aiomqtt.Client,
    mine: Inbox,
    spy: Inbox,
    witness_client: aiomqtt.Client,
    witness: Inbox,
    mark: bytes,
) -> None:
    """Another node's heartbeat, status and peer topics, probe lists, the member count, the
    roster, another client id's echo topic, and acknowledgements (its own node's or another's:
    the proof of broker contact only the leader gives): each refused by the broker, shown by
    barriers."""
    p, marker = PREFIX, mark.decode()
    # The ACL lets a client read only the echo topic of its own client id: it reads `node-2`'s
    # only if the broker gave it the id it asked for.
    await attacker.subscribe(f"{p}/echo/#", qos=1)
    await attacker.subscribe(f"{p}/ack/#", qos=1)  # its own node's are readable
    forged = {
        heartbeat_topic(p, "node-2"): hb("node-2", "new-boot", 1, marker),
        status_topic(p, "node-2"): b"offline " + mark,
        peers_topic(p, "node-2"): mark,
        probe_topic(p, "node-99"): encode_probe_list("node-99", {"node-1": marker}),
        probe_topic(p, "node-1"): encode_probe_list("node-1", {"node-2": marker}),
        members_topic(p): encode_members(1)[:-1] + b',"x":"' + mark + b'"}',
        roster_topic(p, 0): b'{"shard":0,"nodes":{"x":"' + mark + b'"}}',
        f"{p}/echo/node-2": mark,
        ack_topic(p, "node-99"): b"1 " + mark,
        ack_topic(p, ATTACKER): b"1 " + mark,
    }
    # QoS 1: each is routed (or dropped) before the next is sent.
    for topic, payload in forged.items():
        await attacker.publish(topic, payload, qos=1, retain=topic.startswith(f"{p}/s"))
    # Its own topic with another node's name in the body: delivered, then refused by the
    # controller (the body must name the topic's node).
    await attacker.publish(heartbeat_topic(p, ATTACKER), hb("node-2", "new-boot", 2, marker), qos=1)
    # Barriers: its own heartbeat topic (the spy reads it), its own echo (it reads it back),
    # the witness's own echo (routed after the forged probe list and member count).
    barrier = b"barrier " + mark
    await attacker.publish(heartbeat_topic(p, ATTACKER), barrier, qos=1)
    await spy.wait_for(heartbeat_topic(p, ATTACKER), barrier)
    await attacker.publish(f"{p}/echo/{ATTACKER}", barrier, qos=1)
    await mine.wait_for(f"{p}/echo/{ATTACKER}", barrier)
    await witness_client.publish(f"{p}/echo/node-99", barrier, qos=1)
    await witness.wait_for(f"{p}/echo/node-99", barrier)
    assert spy.got(mark) == [heartbeat_topic(p, ATTACKER)] * 2, spy.got(mark)
    assert mine.got(mark) == [f"{p}/echo/{ATTACKER}"], mine.got(mark)
    assert witness.got(mark) == [f"{p}/echo/node-99"], witness.got(mark)


@dataclass(frozen=True)
class Flood:
    ignored: float  # names the controller read and dropped
    seconds: float
    grew_mib: float  # the controller's RSS, after minus before


async def flood_with_names(env: WatchdogEnv, attacker: aiomqtt.Client, boot: str) -> Flood:
    """Its own peer reports: node-1..3 "unreachable" (one observer's word), then FLOOD_NAMES
    names of nodes the cluster does not have, 16 per report, in batches the controller has
    read before the next is sent (faster, the broker would drop what the controller cannot
    take, and the test would show only that)."""
    p, ignored, rss = PREFIX, "watchdog_peer_targets_ignored", "process_resident_memory_bytes"
    seq = 10**15  # above the agent's own (its boot's monotonic clock)
    views = dict.fromkeys(OTHERS, PeerView.UNREACHABLE)
    await attacker.publish(
        peers_topic(p, ATTACKER),
        encode_report(PeerReport(ATTACKER, boot, seq, time.time(), views)),
        qos=1,
    )
    first = await scrape(env)
    t0 = time.monotonic()
    reports = FLOOD_NAMES // MAX_TARGETS
    for start in range(0, reports, FLOOD_BATCH):
        for i in range(start, min(reports, start + FLOOD_BATCH)):
            names = {f"n{i}-{j}.attack": PeerView.UNREACHABLE for j in range(MAX_TARGETS)}
            report = PeerReport(ATTACKER, boot, seq + 1 + i, time.time(), names)
            await attacker.publish(peers_topic(p, ATTACKER), encode_report(report))
        want = first.get(ignored) + min(reports, start + FLOOD_BATCH) * MAX_TARGETS

        async def read(want: float = want) -> bool:
            return (await scrape(env)).get(ignored) >= want

        await env.wait_for(read, 30, f"the controller read {want:.0f} invented names")
    last = await scrape(env)
    return Flood(
        last.get(ignored) - first.get(ignored),
        time.monotonic() - t0,
        (last.get(rss) - first.get(rss)) / 2**20,
    )


async def test_a_compromised_node_cannot_reboot_reset_or_silence_another(env, tmp_path) -> None:
    c = env.cluster
    broker = c.broker
    assert isinstance(broker, IdentityBroker)
    # Every agent speaks with the certificate the controller issued for its node.
    for node in c.fleet.members:
        assert (c.broker_identity_dir(node) / "mqtt.pem").is_file(), node
    before = await scrape(env)
    assert before.get("watchdog_mqtt_certificates_total", result="issued") >= len(c.fleet.members)
    # Until its certificate was issued a node was unheard (Suspect): wait for the baseline.
    await env.wait_for(lambda: not env.baseline_problems(), 60, "every node Healthy")
    boots = {n: c.fleet[n].boot_id for n in OTHERS}
    launchers = {n: sorted(p["metadata"]["uid"] for p in c.launcher_pods(n)) for n in OTHERS}
    t0 = time.monotonic()

    # What node-4 holds, taken before its agent is stopped.
    stolen_identity = tmp_path / "node-4.pem"
    stolen_identity.write_bytes((c.broker_identity_dir(ATTACKER) / "mqtt.pem").read_bytes())
    stolen_token = c.node_kubeconfig(ATTACKER)
    boot4 = c.fleet[ATTACKER].boot_id
    await env.fault("agent-kill", ATTACKER)

    # The test's own witness: a certificate the operator (who holds the signer) makes.
    witness_id = sign_identity(broker.signer_dir, "node-99", tmp_path / "witness.pem")
    marker = uuid.uuid4().hex
    mark = marker.encode()
    p = PREFIX
    async with (
        connected(broker, None, "watchdog_spy") as spy_client,
        connected(broker, witness_id) as witness_client,
    ):
        spy, witness = Inbox(spy_client), Inbox(witness_client)
        try:
            # Subscribed before the attacker connects: a session it displaced would leave that
            # client's Will (offline) here. Not node-4's peer reports (the flood below).
            for topic in ("heartbeat/#", "status/#", "peers/node-2"):
                await spy_client.subscribe(f"{p}/{topic}", qos=1)
            await witness_client.subscribe(f"{p}/#", qos=1)
            async with connected(broker, stolen_identity, identifier="node-2") as attacker:
                mine = Inbox(attacker)
                try:
                    await attack_topics(attacker, mine, spy, witness_client, witness, mark)
                    flood = await flood_with_names(env, attacker, boot4)
                finally:
                    await mine.close()
            # Nobody's session was displaced: no Will other than node-4's own (its agent was
            # stopped: its Will, retained, may be replayed to the spy on subscribing).
            offline = [t for t, m in spy.messages if m == b"offline"]
            assert set(offline) <= {status_topic(p, ATTACKER)}, offline
        finally:
            await spy.close()
            await witness.close()

    await env.wait_for(
        lambda: env.leader_hears(OTHERS), 30, "the leader hears every other node again"
    )
    after = await scrape(env)
    entries = after.labelled("watchdog_input_entries", "book")
    nodes = len(c.fleet.members)
    assert entries["peers_observers"] <= nodes and entries["peers_targets"] <= nodes, entries
    assert entries["peers_retired_boots"] + entries["heartbeat_retired_boots"] <= 2 * 64 * nodes
    grew_mib = flood.grew_mib
    print(
        f"flood: {flood.ignored:.0f} invented names read and dropped in {flood.seconds:.1f}s, "
        f"books {entries}, controller RSS {grew_mib:+.1f} MiB"
    )
    assert flood.ignored == FLOOD_NAMES, flood
    assert grew_mib < 32, f"the controller grew {grew_mib:.0f} MiB under the flood"
    mismatched = "watchdog_heartbeats_rejected_total"
    assert after.get(mismatched, reason="topic_mismatch") > before.get(
        mismatched, reason="topic_mismatch"
    )

    # A certificate of another node, asked for with node-4's pod-bound token: denied.
    stolen = await Kube.from_kubeconfig(stolen_token)
    try:
        csr_name = await ask_for_certificate(stolen, "node-2")
        denied = await wait_denied(c.kube, csr_name)
        assert "certificate" not in denied.get("status", {}), denied["status"]
        why = next(x for x in denied["status"]["conditions"] if x["type"] == "Denied")
        assert "'node-2'" in why["message"] and "'node-4'" in why["message"], why
        # The API server: every write that would fence, reset or replace the controller.
        victim = max(OTHERS, key=lambda n: len(c.vms_on(n)))
        pod = next(iter(c.launcher_pods(victim)))
        lease = await c.kube.get(LEASES, LEADER_LEASE, env.namespace)
        refused = await api_attacks(stolen, victim, pod, lease)
    finally:
        await stolen.close()
    assert set(refused.values()) == {403}, refused

    # No other node changed phase, none is tainted, nothing was fenced or reset.
    changed = {n: env.timeline.phases_of(n, after=t0) for n in OTHERS}
    assert all(set(v) <= {"Healthy"} for v in changed.values()), changed
    assert {n: env.phase(n) for n in OTHERS} == dict.fromkeys(OTHERS, "Healthy")
    assert not any(env.tainted(n) for n in OTHERS)
    assert {n: c.fleet[n].boot_id for n in OTHERS} == boots  # nobody fenced
    assert {  # nothing reset: the same launcher pods
        n: sorted(p["metadata"]["uid"] for p in c.launcher_pods(n)) for n in OTHERS
    } == launchers
    assert c.ledger.totals()["split_brain_s"] == 0


async def ask_for_certificate(kube: Kube, node: str) -> str:
    """A CertificateSigningRequest for `node`'s broker identity, as an agent makes one."""
    _, request = new_key_and_request(node)
    name = f"attack-{uuid.uuid4().hex[:8]}"
    await kube.create(
        CSRS,
        {
            "apiVersion": "certificates.k8s.io/v1",
            "kind": "CertificateSigningRequest",
            "metadata": {"name": name},
            "spec": {
                "request": base64.b64encode(request).decode(),
                "signerName": MQTT_CLIENT_SIGNER,
                "usages": ["client auth", "digital signature"],
            },
        },
    )
    return name


async def wait_denied(kube: Kube, name: str) -> Obj:
    deadline = time.monotonic() + 60
    while True:
        csr = await kube.get(CSRS, name)
        conditions = {c["type"]: c for c in csr.get("status", {}).get("conditions", [])}
        if "Denied" in conditions:
            return csr
        assert "Approved" not in conditions, json.dumps(csr["status"])
        assert time.monotonic() < deadline, f"{name}: not answered within 60 s"
        await asyncio.sleep(0.5)
