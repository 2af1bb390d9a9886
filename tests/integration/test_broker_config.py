"""The shipped broker configuration, proven on a real Mosquitto (DESIGN §9).

Mosquitto is started from deploy/base/broker/mosquitto.conf and deploy/base/broker/acl as they
ship; only file paths and the listener ports are rewritten. The broker's certificate and the
agents' signer are made by deploy/tools/mqtt_credentials.py; each agent's client certificate
is signed here by that signer with the signer's own code (transport/certificates.py), as the
controller signs them (tests/integration/test_mqtt_identity.py proves that path through the
API server). The controller's password is set with `mosquitto_passwd -b`. Clients are aiomqtt,
like the service's.

"Not delivered" is proven with a barrier, never with a sleep: MQTT delivers one connection's
messages in order, and a QoS 1 publish returns only after the broker has routed it, so once a
later message from the same sender (or, after the PUBACK, from anyone) has reached the
subscriber, an earlier message that was allowed would have arrived before it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest

from chaos.sim.broker_identity import shipped_config, sign_identity
from chaos.sim.ports import free_port
from watchdog.decide.roster import encode_roster_shard, roster_topic, shard_of

ROOT = Path(__file__).resolve().parents[2]
BROKER_DIR = ROOT / "deploy" / "base" / "broker"
TOOLS = ROOT / "deploy" / "tools"
PREFIX = "node-watchdog/v1"
DEADLINE_S = 10.0

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

sys.path.insert(0, str(TOOLS))
import mqtt_credentials  # noqa: E402  (deploy/tools is not a package)


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str, *fallbacks: str) -> str:
    """The tool's path; a missing tool skips locally and fails in CI (CI=true)."""
    found = shutil.which(name) or next((p for p in fallbacks if os.access(p, os.X_OK)), None)
    if found is None:
        msg = f"{name} is not installed (Debian package mosquitto; .ci/run installs it)"
        if _in_ci():
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return found


# Only the controller logs in with a password; agents with the certificate of their node.
PASSWORDS = {mqtt_credentials.CONTROLLER_USER: "pw-controller"}


@dataclass
class Broker:
    port: int  # the agents' listener: client certificates
    controller_port: int  # the controllers' listener: the controller's password
    ca_file: Path  # verifies the broker
    log: Path
    signer_dir: Path  # the agents' signer (ca.crt, ca.key), as the controller mounts it
    identities: Path  # client certificates issued here, one file per node (cert + key)

    def tls(self, identity: Path | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if identity is not None:
            ctx.load_cert_chain(str(identity))
        return ctx

    def identity(self, node: str, signer_dir: Path | None = None) -> Path:
        """A client certificate of `node` (with its key, one file), signed by the agents'
        signer (or the one in `signer_dir`)."""
        signer_dir = signer_dir or self.signer_dir
        path = self.identities / f"{signer_dir.name}-{node}.pem"
        return path if path.exists() else sign_identity(signer_dir, node, path)

    def client(
        self,
        user: str | None,
        password: str | None = None,
        *,
        tls: bool = True,
        identity: Path | None = None,
        port: int | None = None,
        **kw,
    ) -> aiomqtt.Client:
        """The controller (its user, or any password given) on the controllers' listener; a
        node name (or None: anonymous) on the agents' listener, with that node's certificate
        (or `identity`)."""
        if user == mqtt_credentials.CONTROLLER_USER or password is not None:
            password = PASSWORDS[user] if password is None and user else password
            context = self.tls() if tls else None
            return aiomqtt.Client(
                "127.0.0.1",
                port or self.controller_port,
                username=user,
                password=password,
                tls_context=context,
                timeout=DEADLINE_S,
                keepalive=5,
                **kw,
            )
        if identity is None and user is not None:
            identity = self.identity(user)
        return aiomqtt.Client(
            "127.0.0.1",
            port or self.port,
            tls_context=self.tls(identity) if tls else None,
            timeout=DEADLINE_S,
            keepalive=5,
            **kw,
        )


def _wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mosquitto exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"mosquitto did not listen on {port} within {DEADLINE_S} s:\n{log.read_text()}")


def readable_workdir() -> Iterator[Path]:
    """A directory readable by the `mosquitto` user: mosquitto started as root drops to it
    before it reads its files, and pytest's tmp_path is private to root."""
    d = Path(tempfile.mkdtemp(prefix="nw-broker-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    yield from readable_workdir()


def start_broker(workdir: Path, passwd: Path) -> tuple[subprocess.Popen[bytes], Broker]:
    exe = require_tool("mosquitto", "/usr/sbin/mosquitto")
    tls_dir = workdir / "tls"
    if not (tls_dir / "tls.crt").exists():
        tls_dir.mkdir(exist_ok=True)
        mqtt_credentials.write_tls(tls_dir, ["localhost", "127.0.0.1"])
        mqtt_credentials.write_signer(tls_dir)
    acl = workdir / "acl"
    shutil.copyfile(BROKER_DIR / "acl", acl)
    paths = {"passwd": passwd, "acl": acl, "signer.crt": tls_dir / "signer" / "ca.crt"} | {
        n: tls_dir / n for n in ("ca.crt", "tls.crt", "tls.key")
    }
    for p in [*paths.values(), tls_dir, tls_dir / "signer"]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    port, controller_port = free_port(), free_port()
    conf = workdir / f"mosquitto-{port}.conf"
    conf.write_text(shipped_config(paths, port, controller_port))
    log = workdir / f"mosquitto-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([exe, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    _wait_listening(port, proc, log)
    _wait_listening(controller_port, proc, log)
    identities = workdir / "identities"
    identities.mkdir(exist_ok=True)
    broker = Broker(
        port=port,
        controller_port=controller_port,
        ca_file=tls_dir / "ca.crt",
        log=log,
        signer_dir=tls_dir / "signer",
        identities=identities,
    )
    return proc, broker


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def controller_passwd(workdir: Path) -> Path:
    """The broker's password file, made by `mosquitto_passwd` itself: the controller's login."""
    mosquitto_passwd = require_tool("mosquitto_passwd")
    passwd = workdir / "passwd"
    for i, (user, password) in enumerate(PASSWORDS.items()):
        args = [mosquitto_passwd, *(["-c"] if i == 0 else []), "-b", str(passwd), user, password]
        subprocess.run(args, check=True, capture_output=True, timeout=30)
    return passwd


@pytest.fixture(scope="module")
def broker(workdir: Path) -> Iterator[Broker]:
    proc, b = start_broker(workdir, controller_passwd(workdir))
    yield b
    stop(proc)


# --- helpers -------------------------------------------------------------------------------


class Inbox:
    """Messages a subscriber received, in order, with `wait_for` on a deadline."""

    def __init__(self) -> None:
        self.received: list[tuple[str, bytes]] = []
        self._changed = asyncio.Event()
        # The subscriber's connection: a node has one connection at a time (its client id is
        # its name), so a node that subscribes also publishes through it.
        self.client: aiomqtt.Client | None = None

    def add(self, topic: str, payload: bytes) -> None:
        self.received.append((topic, payload))
        self._changed.set()

    async def wait_for(self, topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        """Everything received up to and including (topic, payload)."""
        try:
            async with asyncio.timeout(DEADLINE_S):
                while True:
                    for i, item in enumerate(self.received):
                        if item == (topic, payload):
                            return self.received[: i + 1]
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"{topic} {payload!r} not delivered within {DEADLINE_S} s; got {self.received}"
            ) from None


@asynccontextmanager
async def subscribed(
    broker: Broker, user: str, topic: str, password: str | None = None
) -> AsyncIterator[Inbox]:
    inbox = Inbox()
    name = f"sub-{user}-{time.monotonic_ns()}"
    async with broker.client(user, password, identifier=name) as client:
        await client.subscribe(topic, qos=1)
        inbox.client = client

        async def pump() -> None:
            async for message in client.messages:
                # Retained messages replayed on subscribe are earlier tests' history; live
                # messages arrive with retain unset (MQTT 3.1.1 §3.3.1.3).
                if not message.retain:
                    inbox.add(message.topic.value, bytes(message.payload))

        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(pump(), name=f"inbox-{user}")
            try:
                yield inbox
            finally:
                task.cancel()


async def refused(client: aiomqtt.Client) -> BaseException:
    """The error with which the broker refuses this client's connection."""
    try:
        async with asyncio.timeout(DEADLINE_S):
            async with client:
                pass
    except aiomqtt.MqttError as e:
        return e
    raise AssertionError("the broker accepted a connection it must refuse")


# --- the tests -----------------------------------------------------------------------------


def mqtt_connect_packet(client_id: str, user: str, password: str) -> bytes:
    """An MQTT 3.1.1 CONNECT with username and password, as a plain-TCP client sends it."""

    def field(text: str) -> bytes:
        raw = text.encode()
        return len(raw).to_bytes(2, "big") + raw

    body = field("MQTT") + bytes([4, 0xC2]) + (30).to_bytes(2, "big")  # level 4; user+pw+clean
    body += field(client_id) + field(user) + field(password)
    assert len(body) < 128  # one-byte remaining length
    return bytes([0x10, len(body)]) + body


async def test_plain_tcp_is_refused_every_listener_is_tls(broker: Broker) -> None:
    listeners = [
        line
        for line in (BROKER_DIR / "mosquitto.conf").read_text().splitlines()
        if line.startswith("listener ")
    ]
    assert listeners == ["listener 8883", "listener 8884"], listeners

    # Valid credentials over plain TCP: the broker must close the connection, never CONNACK.
    user = mqtt_credentials.CONTROLLER_USER
    for port in (broker.port, broker.controller_port):
        answer = await first_answer(port, mqtt_connect_packet("plain", user, PASSWORDS[user]))
        assert not is_connack_accepted(answer), f"plain-TCP client got a CONNACK: {answer!r}"


async def first_answer(port: int, packet: bytes, tls: ssl.SSLContext | None = None) -> bytes:
    """What the broker answers first to `packet` sent on a fresh connection (b"": it closed
    the connection or ended the TLS session, e.g. for want of a client certificate)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
    except (ssl.SSLError, ConnectionResetError):
        return b""
    try:
        writer.write(packet)
        await writer.drain()
        async with asyncio.timeout(DEADLINE_S):
            try:
                return await reader.read(64)
            except (ConnectionResetError, ssl.SSLError):
                return b""
    finally:
        writer.close()


def is_connack_accepted(answer: bytes) -> bool:
    """A CONNACK (0x20) with return code 0: the client is in."""
    return len(answer) >= 4 and answer[0] == 0x20 and answer[3] == 0


async def test_anonymous_clients_are_refused(broker: Broker) -> None:
    err = await refused(broker.client(None, port=broker.controller_port))
    assert isinstance(err, aiomqtt.MqttCodeError), err


async def test_a_wrong_password_is_refused(broker: Broker) -> None:
    err = await refused(broker.client(mqtt_credentials.CONTROLLER_USER, "not-the-password"))
    assert isinstance(err, aiomqtt.MqttCodeError), err


async def test_the_agents_listener_takes_a_certificate_of_our_signer_and_nothing_else(
    broker: Broker, workdir: Path
) -> None:
    """No certificate (even with the controller's password), or one from another CA: refused
    during the TLS handshake or at CONNECT. The controller's listener takes no certificate in
    place of its password."""
    user = mqtt_credentials.CONTROLLER_USER
    connect = mqtt_connect_packet("no-cert", user, PASSWORDS[user])
    answer = await first_answer(broker.port, connect, broker.tls())
    assert not is_connack_accepted(answer), answer
    rogue = workdir / "rogue-signer"
    mqtt_credentials.write_ca(rogue, "not our signer")
    forged = broker.identity("node-1", signer_dir=rogue)
    answer = await first_answer(broker.port, connect, broker.tls(forged))
    assert not is_connack_accepted(answer), answer
    # The twin: our signer's certificate of node-1 is let in, at this level too.
    ours = broker.identity("node-1")
    assert is_connack_accepted(await first_answer(broker.port, connect, broker.tls(ours)))
    # A node's certificate on the controllers' listener, no password: anonymous there.
    on_controllers = broker.client(
        None, identity=broker.identity("node-1"), port=broker.controller_port
    )
    assert isinstance(await refused(on_controllers), aiomqtt.MqttCodeError)


async def test_an_agent_cannot_take_over_another_clients_session(broker: Broker) -> None:
    """The client id is the certificate's node: node-2 connecting with node-1's client id (or
    the controller's) gets its own, so node-1 stays connected and its Will never fires."""
    status = f"{PREFIX}/status/node-1"
    will = aiomqtt.Will(status, b"offline", qos=1, retain=False)
    async with subscribed(broker, mqtt_credentials.CONTROLLER_USER, f"{PREFIX}/#") as inbox:
        async with broker.client("node-1", identifier="node-1", will=will) as victim:
            for claimed in ("node-1", "node-watchdog-agent-node-1", "watchdog_controller_x_1"):
                async with broker.client("node-2", identifier=claimed) as attacker:
                    await attacker.publish(f"{PREFIX}/heartbeat/node-2", claimed.encode(), qos=1)
                await inbox.wait_for(f"{PREFIX}/heartbeat/node-2", claimed.encode())
            # Still connected: its publish goes through, after everything above.
            await victim.publish(f"{PREFIX}/heartbeat/node-1", b"still here", qos=1)
            got = await inbox.wait_for(f"{PREFIX}/heartbeat/node-1", b"still here")
    assert (status, b"offline") not in got, "node-1 was disconnected by node-2"


async def test_agent_publishes_its_own_topics_and_the_controller_reads_them_all(
    broker: Broker,
) -> None:
    own = [
        (f"{PREFIX}/heartbeat/node-1", b'{"node":"node-1","seq":1}'),
        (f"{PREFIX}/status/node-1", b"online"),
        (f"{PREFIX}/peers/node-1", b'{"node-2":true}'),
    ]
    async with subscribed(broker, mqtt_credentials.CONTROLLER_USER, f"{PREFIX}/#") as inbox:
        async with broker.client("node-1", identifier="agent-node-1") as agent:
            for topic, payload in own:
                await agent.publish(topic, payload, qos=1, retain=topic.split("/")[2] == "status")
        got = await inbox.wait_for(*own[-1])
    assert got == own


async def test_agent_cannot_publish_to_another_nodes_topics(broker: Broker) -> None:
    forbidden = [
        (f"{PREFIX}/heartbeat/node-2", b'{"node":"node-2","seq":99}'),
        (f"{PREFIX}/status/node-2", b"offline"),
        (f"{PREFIX}/peers/node-2", b'{"node-3":false}'),
        (f"{PREFIX}/peers/node-1/extra", b"{}"),
        (f"{PREFIX}/heartbeat/node-1/extra", b"{}"),
    ]
    marker = (f"{PREFIX}/heartbeat/node-1", b"marker")
    async with subscribed(broker, mqtt_credentials.CONTROLLER_USER, f"{PREFIX}/#") as inbox:
        async with broker.client("node-1", identifier="agent-node-1") as agent:
            for topic, payload in forbidden:
                await agent.publish(topic, payload, qos=1)
            await agent.publish(*marker, qos=1)
        got = await inbox.wait_for(*marker)
        # node-2 itself may publish there: the topics are deliverable, just not by node-1.
        async with broker.client("node-2", identifier="agent-node-2") as other:
            await other.publish(f"{PREFIX}/heartbeat/node-2", b"from node-2", qos=1)
        await inbox.wait_for(f"{PREFIX}/heartbeat/node-2", b"from node-2")
    assert got == [marker], f"delivered despite the ACL: {got[:-1]}"


async def test_the_controller_user_reads_but_cannot_publish_node_topics(broker: Broker) -> None:
    async with subscribed(broker, mqtt_credentials.CONTROLLER_USER, f"{PREFIX}/#") as inbox:
        async with broker.client(mqtt_credentials.CONTROLLER_USER) as controller:
            # QoS 1: returns after the broker's PUBACK, i.e. after it routed (or dropped) it.
            for kind in ("heartbeat", "status", "peers"):
                await controller.publish(f"{PREFIX}/{kind}/node-1", b"forged", qos=1)
        async with broker.client("node-1", identifier="agent-node-1") as agent:
            await agent.publish(f"{PREFIX}/heartbeat/node-1", b"after", qos=1)
        got = await inbox.wait_for(f"{PREFIX}/heartbeat/node-1", b"after")
    assert [m for m in got if m[1] == b"forged"] == [], got


async def test_an_agent_reads_nothing_of_another_node(broker: Broker) -> None:
    """A node's credentials are no window on the others: its heartbeats, status and peer
    reports reach the controller only. Each agent reads back only its own heartbeats and the
    leader's acknowledgements of them (its proof of broker contact: `echo` or `leader-ack`)."""
    others = [
        (f"{PREFIX}/heartbeat/node-2", b"hb-2"),
        (f"{PREFIX}/status/node-2", b"online"),
        (f"{PREFIX}/peers/node-2", b"{}"),
    ]
    own = (f"{PREFIX}/heartbeat/node-1", b"hb-1")
    acks = [(f"{PREFIX}/ack/node-2", b"2 boot-2"), (f"{PREFIX}/ack/node-1", b"1 boot-1")]
    async with (
        subscribed(broker, "node-1", f"{PREFIX}/#") as spy,
        subscribed(broker, mqtt_credentials.CONTROLLER_USER, f"{PREFIX}/#") as controller,
    ):
        async with broker.client("node-2", identifier="agent-node-2") as agent:
            for topic, payload in others:
                await agent.publish(topic, payload, qos=1)
        assert spy.client is not None
        await spy.client.publish(*own, qos=1)
        await controller.wait_for(*own)
        async with broker.client(mqtt_credentials.CONTROLLER_USER, identifier="leader") as leader:
            for topic, payload in acks:  # in order: node-1's own acknowledgement is the barrier
                await leader.publish(topic, payload, qos=1)
        got = await spy.wait_for(*acks[-1])
    assert got == [own, acks[-1]], f"node-1 read another node's topics: {got}"


async def test_no_agent_can_acknowledge_a_heartbeat(broker: Broker) -> None:
    """An acknowledgement is an agent's proof that the leader heard it: a node that could write
    one, for itself or another node, could keep an agent from fencing while the leader hears
    nothing of it. Only the controller's identity writes them."""
    real = (f"{PREFIX}/ack/node-2", b"9 boot-2")
    async with subscribed(broker, "node-2", f"{PREFIX}/ack/node-2") as inbox:
        async with broker.client("node-1", identifier="agent-node-1") as forger:
            await forger.publish(f"{PREFIX}/ack/node-2", b"8 boot-2", qos=1)
            await forger.publish(f"{PREFIX}/ack/node-1", b"8 boot-1", qos=1)
        assert inbox.client is not None
        await inbox.client.publish(f"{PREFIX}/ack/node-2", b"8 boot-2", qos=1)  # its own
        async with broker.client(mqtt_credentials.CONTROLLER_USER, identifier="leader") as leader:
            await leader.publish(*real, qos=1)
        got = await inbox.wait_for(*real)
    assert got == [real], f"an agent forged an acknowledgement: {got[:-1]}"


async def test_a_client_writes_only_its_own_echo_topic(broker: Broker) -> None:
    """The controller measures its ingest lag by an echo on `echo/<its client id>`; even the
    read-only controller user may write and read back that one topic, nobody another's."""
    # node-2's client id is its node name, whatever it asks for.
    me, other = "watchdog_controller_host-a_1", "node-2"
    mine, theirs = f"{PREFIX}/echo/{me}", f"{PREFIX}/echo/{other}"

    async def first(client: aiomqtt.Client) -> tuple[str, bytes]:
        async with asyncio.timeout(DEADLINE_S):
            message = await anext(aiter(client.messages))
        return message.topic.value, bytes(message.payload)

    async with (
        broker.client(mqtt_credentials.CONTROLLER_USER, identifier=me) as a,
        broker.client("node-2", identifier="anything") as b,
    ):
        await a.subscribe(mine, qos=1)
        await b.subscribe(theirs, qos=1)
        await a.publish(theirs, b"forged", qos=1)  # dropped by the broker
        await b.publish(theirs, b"b's own", qos=1)
        await a.publish(mine, b"a's own", qos=1)
        assert await first(b) == (theirs, b"b's own"), "another client's echo was forged"
        assert await first(a) == (mine, b"a's own")


async def test_an_agent_reads_only_its_own_probe_list(broker: Broker) -> None:
    """Probe lists are written by the controller's leader; each agent reads only its own list
    (where it must connect is nobody else's business)."""
    lists = [
        (f"{PREFIX}/probe/node-2", b'{"node":"node-2","targets":{}}'),
        (f"{PREFIX}/probe/node-1", b'{"node":"node-1","targets":{"node-2":"10.0.0.2:9103"}}'),
    ]
    async with subscribed(broker, "node-1", f"{PREFIX}/probe/#") as inbox:
        async with broker.client(mqtt_credentials.CONTROLLER_USER, identifier="leader") as leader:
            for topic, payload in lists:  # in order: node-1's own list is the barrier
                await leader.publish(topic, payload, qos=1)
        got = await inbox.wait_for(*lists[-1])
    assert got == [lists[-1]], f"node-1 read another node's probe list: {got[:-1]}"


async def test_the_controller_publishes_probe_lists_and_reads_every_peer_report(
    broker: Broker,
) -> None:
    report = (f"{PREFIX}/peers/node-1", b'{"node":"node-1","results":{"node-2":"reachable"}}')
    probe = (f"{PREFIX}/probe/node-1", b'{"node":"node-1","targets":{}}')
    async with subscribed(broker, mqtt_credentials.CONTROLLER_USER, f"{PREFIX}/peers/+") as got:
        async with broker.client("node-1", identifier="agent-node-1") as agent:
            await agent.publish(*report, qos=1)
        assert await got.wait_for(*report) == [report]
    async with subscribed(broker, "node-1", f"{PREFIX}/probe/node-1") as lists:
        async with broker.client(mqtt_credentials.CONTROLLER_USER, identifier="leader") as leader:
            await leader.publish(*probe, qos=1)
        assert await lists.wait_for(*probe) == [probe]


async def test_no_agent_can_publish_probe_lists(broker: Broker) -> None:
    """A compromised node cannot steer other nodes' peer probes (and so their votes)."""
    forged = (f"{PREFIX}/probe/node-1", b'{"node":"node-1","targets":{"node-2":"6.6.6.6:1"}}')
    own = (f"{PREFIX}/probe/node-2", b'{"node":"node-2","targets":{}}')
    after = (f"{PREFIX}/probe/node-1", b'{"node":"node-1","targets":{}}')
    after_own = (f"{PREFIX}/probe/node-2", b'{"node":"node-2","targets":{"node-3":"x"}}')
    async with (
        subscribed(broker, "node-1", f"{PREFIX}/probe/node-1") as victim,
        subscribed(broker, "node-2", f"{PREFIX}/probe/node-2") as itself,
    ):
        attacker = itself.client
        assert attacker is not None
        await attacker.publish(*forged, qos=1)
        await attacker.publish(*own, qos=1)
        async with broker.client(mqtt_credentials.CONTROLLER_USER, identifier="leader") as leader:
            await leader.publish(*after, qos=1)
            await leader.publish(*after_own, qos=1)
        assert await victim.wait_for(*after) == [after]
        assert await itself.wait_for(*after_own) == [after_own]


async def test_every_agent_reads_the_member_count_and_only_the_controller_writes_it(
    broker: Broker,
) -> None:
    """The count the agents' quorum divides by (decide/quorum.py): a node that could raise it
    would make its peers fence in a cluster-wide outage; lower it, spare them wrongly."""
    topic = f"{PREFIX}/members"
    forged = (topic, b'{"nodes":1}')
    real = (topic, b'{"nodes":4}')
    async with (
        subscribed(broker, "node-1", topic) as one,
        subscribed(broker, "node-2", topic) as two,
    ):
        assert two.client is not None
        await two.client.publish(*forged, qos=1)  # node-2 as the attacker
        async with broker.client(mqtt_credentials.CONTROLLER_USER, identifier="leader") as leader:
            await leader.publish(*real, qos=1)
        assert await one.wait_for(*real) == [real], "an agent wrote the member count"
        assert await two.wait_for(*real) == [real]


async def test_every_agent_reads_the_roster_and_only_the_controller_writes_it(
    broker: Broker,
) -> None:
    """The roster a cut-off agent sweeps for cut-off peers (decide/roster.py): a node that could
    write it would point the sweeps of others at answers of its choosing."""
    shard = shard_of("node-9")
    topic = roster_topic(PREFIX, shard)
    forged = (topic, encode_roster_shard(shard, {"node-9": "6.6.6.6:1"}))
    real = (topic, encode_roster_shard(shard, {"node-9": "10.0.0.9:9101"}))
    async with (
        subscribed(broker, "node-1", f"{PREFIX}/roster/+") as one,
        subscribed(broker, "node-2", f"{PREFIX}/roster/+") as two,
    ):
        assert two.client is not None
        await two.client.publish(*forged, qos=1)  # node-2 as the attacker
        async with broker.client(mqtt_credentials.CONTROLLER_USER, identifier="leader") as leader:
            await leader.publish(*real, qos=1)
        assert await one.wait_for(*real) == [real], "an agent wrote the roster"
        assert await two.wait_for(*real) == [real]


async def test_a_packet_above_the_size_limit_disconnects_its_sender_and_reaches_nobody(
    broker: Broker,
) -> None:
    """max_packet_size: a node cannot push oversized messages through the broker."""
    big = (f"{PREFIX}/heartbeat/node-1", b"x" * 70_000)
    after = (f"{PREFIX}/heartbeat/node-1", b"after")
    async with subscribed(broker, mqtt_credentials.CONTROLLER_USER, f"{PREFIX}/#") as inbox:
        with pytest.raises(aiomqtt.MqttError):
            async with broker.client("node-1", identifier="agent-node-1") as agent:
                await agent.publish(*big, qos=1)  # no PUBACK: the broker drops the connection
        async with broker.client("node-1", identifier="agent-node-1") as agent:
            await agent.publish(*after, qos=1)
        got = await inbox.wait_for(*after)
    assert big not in got and got[-1] == after


async def test_an_agents_last_will_announces_it_offline(broker: Broker) -> None:
    """A SIGKILLed agent's Will (status/<own node> offline) reaches the controller."""
    script = (
        "import asyncio, ssl, sys, aiomqtt\n"
        "async def main():\n"
        "    ctx = ssl.create_default_context(cafile=sys.argv[2])\n"
        "    ctx.load_cert_chain(sys.argv[4])\n"
        "    will = aiomqtt.Will(sys.argv[3], b'offline', qos=1, retain=True)\n"
        "    async with aiomqtt.Client('127.0.0.1', int(sys.argv[1]),\n"
        "            tls_context=ctx, will=will, keepalive=5) as c:\n"
        "        await c.publish(sys.argv[3], b'online', qos=1, retain=True)\n"
        "        print('up', flush=True)\n"
        "        await asyncio.sleep(3600)\n"
        "asyncio.run(main())\n"
    )
    status = f"{PREFIX}/status/node-1"
    async with subscribed(broker, mqtt_credentials.CONTROLLER_USER, f"{PREFIX}/status/#") as inbox:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            script,
            str(broker.port),
            str(broker.ca_file),
            status,
            str(broker.identity("node-1")),
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            async with asyncio.timeout(DEADLINE_S):
                assert (await proc.stdout.readline()).strip() == b"up"
            await inbox.wait_for(status, b"online")
        finally:
            proc.kill()
            await proc.wait()
        await inbox.wait_for(status, b"offline")


async def test_a_password_file_made_by_the_credentials_tool_is_accepted(workdir: Path) -> None:
    """deploy/tools/mqtt_credentials.py writes mosquitto's own hash format, no mosquitto tools;
    it holds the controller's login only."""
    creds = workdir / "tool-creds"
    creds.mkdir(exist_ok=True)
    mqtt_credentials.write_credentials(creds)
    assert [line.split(":")[0] for line in (creds / "passwd").read_text().splitlines()] == [
        mqtt_credentials.CONTROLLER_USER
    ]
    proc, b = start_broker(workdir, creds / "passwd")
    try:
        controller_pw = (creds / "controller").read_text().strip()
        controller = mqtt_credentials.CONTROLLER_USER
        async with subscribed(b, controller, f"{PREFIX}/#", controller_pw) as inbox:
            async with b.client("node-3") as agent:
                await agent.publish(f"{PREFIX}/heartbeat/node-3", b"hb", qos=1)
            await inbox.wait_for(f"{PREFIX}/heartbeat/node-3", b"hb")
        err = await refused(b.client(controller, "guessed"))
        assert isinstance(err, aiomqtt.MqttCodeError), err
    finally:
        stop(proc)
