"""The agent and the controller's heartbeat subscriber against a real mosquitto.

Real objects over a real broker (tests/integration/conftest.py starts one per test); an agent
that must die abruptly runs as its own process. Timings are compressed (heartbeat 0.2 s,
keepalive 2 s, self-fence after 1.5 s); every wait polls a condition against a deadline, and
the few "must not happen" checks watch for a stated window.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import ipaddress
import itertools
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from chaos.sim.proxy import ProxyMode, TcpProxy
from tests.eventually import eventually
from watchdog.decide.heartbeats import (
    Heartbeat,
    HeartbeatBook,
    RejectReason,
    encode_heartbeat,
    heartbeat_topic,
    parse_heartbeat,
    status_topic,
)
from watchdog.decide.observations import FenceDeclaration
from watchdog.heartbeat.agent import Agent
from watchdog.observe.mqtt import HeartbeatSubscriber
from watchdog.runtime.settings import Settings

from .conftest import Mosquitto

pytestmark = pytest.mark.broker

REPO = Path(__file__).resolve().parents[2]
PREFIX = "node-watchdog/v1"
NODES = {"node-a", "node-b", "node-c"}
HEARTBEAT_S = 0.2
KEEPALIVE_S = 2
FENCE_AFTER_S = 1.5
FENCE_BOUND_S = 1.0
API_CHECK_S = 0.2


# --- helpers ---------------------------------------------------------------------------------


async def wait_for(
    predicate: Callable[[], object], within_s: float, what: str, *, every: float = 0.02
) -> float:
    """Poll `predicate` until true; returns the seconds it took, fails after `within_s`."""
    return await eventually(predicate, timeout_s=within_s, what=what, every_s=every)


async def stays(predicate: Callable[[], object], window: float, what: str) -> None:
    """Assert `predicate` holds throughout `window` seconds (a bounded 'must not happen')."""
    end = time.monotonic() + window
    while time.monotonic() < end:
        assert predicate(), f"{what} stopped holding"
        await asyncio.sleep(0.02)
    assert predicate(), f"{what} stopped holding"


def settings(broker: Mosquitto | str, tmp_path: Path, node: str = "node-a", **kw: Any) -> Settings:
    boot_id = tmp_path / f"boot_id-{node}"
    if not boot_id.exists():
        boot_id.write_text(f"{uuid.uuid4()}\n")
    mqtt = {"url": broker if isinstance(broker, str) else broker.url, "keepalive_s": KEEPALIVE_S}
    mqtt.update(kw.pop("mqtt", {}))
    values: dict[str, Any] = {
        "node_name": node,
        "boot_id_file": boot_id,
        "boot_state_dir": tmp_path / f"run-{node}",
        "heartbeat_interval_s": HEARTBEAT_S,
        "self_fence_after_s": FENCE_AFTER_S,
        "fence_action_bound_s": FENCE_BOUND_S,
        "api_check_interval_s": API_CHECK_S,
        "mqtt": mqtt,
    }
    values.update(kw)
    return Settings(**values)


@dataclass
class Seen:
    """What the controller side observed, stamped on the monotonic clock."""

    book: HeartbeatBook = field(default_factory=HeartbeatBook)
    heartbeats: dict[str, list[tuple[float, int]]] = field(
        default_factory=lambda: collections.defaultdict(list)
    )
    offline_at: dict[str, float] = field(default_factory=dict)
    connection: list[tuple[float, bool]] = field(default_factory=list)
    rejected: collections.Counter[RejectReason] = field(default_factory=collections.Counter)

    def __post_init__(self) -> None:
        self.book.set_known(set(NODES))
        self._received: dict[str, int] = collections.defaultdict(int)

    def on_change(self, node: str) -> None:
        rec = self.book.nodes[node]
        now = time.monotonic()
        if rec.received != self._received[node]:
            self._received[node] = rec.received
            self.heartbeats[node].append((now, rec.seq))
        if rec.offline and node not in self.offline_at:
            self.offline_at[node] = now
        if not rec.offline:
            self.offline_at.pop(node, None)

    def on_connection(self, up: bool) -> None:
        self.connection.append((time.monotonic(), up))

    def on_reject(self, reason: RejectReason) -> None:
        self.rejected[reason] += 1

    def seqs(self, node: str) -> list[int]:
        return [seq for _, seq in self.heartbeats[node]]

    def count(self, node: str) -> int:
        return len(self.heartbeats[node])

    def seq(self, node: str) -> int:
        rec = self.book.nodes.get(node)
        return -1 if rec is None else rec.seq

    def ups(self) -> list[bool]:
        return [up for _, up in self.connection]


def subscriber(
    broker: Mosquitto | str, tmp_path: Path, seen: Seen, *, leading: bool = True, **kw: Any
) -> HeartbeatSubscriber:
    """The controller's real subscriber; `leading`: it acknowledges what it accepts, as the
    leader does (the agents' only proof of broker contact)."""
    sub = HeartbeatSubscriber(
        settings(broker, tmp_path, node="controller", **kw),
        seen.book,
        on_change=seen.on_change,
        on_connection=seen.on_connection,
        on_reject=seen.on_reject,
    )
    if leading:
        sub.acks_when = lambda: True
    return sub


@contextlib.asynccontextmanager
async def running(*coros: Coroutine[Any, Any, None]) -> AsyncIterator[list[asyncio.Task[None]]]:
    """Run coroutines as tasks of a TaskGroup for the block; cancel them after it. A task that
    fails fails the test (never a leaked or silently dead task)."""
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(c) for c in coros]
        try:
            yield tasks
        finally:
            for t in tasks:
                t.cancel()


class Probe:
    """The API probe the runtime would inject: this node's persisted phase, or None (API down)."""

    def __init__(self, phase: str | None) -> None:
        self.phase = phase
        self.calls = 0

    async def __call__(self) -> str | None:
        self.calls += 1
        return self.phase


async def retained(broker: Mosquitto, topic: str) -> bytes:
    """The retained message of `topic`, read by a fresh client."""
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier=f"probe-{uuid.uuid4()}") as c:
        await c.subscribe(topic, qos=1)
        async with asyncio.timeout(3):
            async for message in c.messages:
                assert message.retain, f"live, not retained, message on {topic}"
                assert isinstance(message.payload, bytes)
                return message.payload
    raise AssertionError("unreachable")


LAUNCHER = """
import asyncio, logging, signal, sys
from watchdog.heartbeat.agent import Agent
from watchdog.runtime.settings import load_settings

logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(asctime)s %(levelname)s %(name)s %(message)s")

async def main():
    agent = Agent(load_settings())
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    try:
        await agent.run()
    except asyncio.CancelledError:
        logging.info("agent stopped")

asyncio.run(main())
"""


@contextlib.asynccontextmanager
async def agent_process(
    broker: Mosquitto, tmp_path: Path, node: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    boot_id = tmp_path / f"boot_id-{node}"
    boot_id.write_text(f"{uuid.uuid4()}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHDOG_")}
    env.update(
        PYTHONPATH=str(REPO),
        WATCHDOG_NODE_NAME=node,
        WATCHDOG_BOOT_ID_FILE=str(boot_id),
        WATCHDOG_BOOT_STATE_DIR=str(tmp_path / f"run-{node}"),
        WATCHDOG_HEARTBEAT_INTERVAL_S=str(HEARTBEAT_S),
        WATCHDOG_MQTT__URL=broker.url,
        WATCHDOG_MQTT__KEEPALIVE_S=str(KEEPALIVE_S),
    )
    log = (tmp_path / f"agent-{node}.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LAUNCHER, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        log.close()


# --- heartbeats ------------------------------------------------------------------------------


async def test_subscriber_sees_agent_heartbeats_on_a_fixed_cadence_with_its_fence(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    seen = Seen()
    agent = Agent(settings(mosquitto, tmp_path, fence_command="true"))
    async with running(subscriber(mosquitto, tmp_path, seen).run(), agent.run()):
        await wait_for(lambda: seen.count("node-a") >= 16, 10, "16 heartbeats")
    beats = seen.heartbeats["node-a"]
    seqs = seen.seqs("node-a")
    assert seqs == sorted(set(seqs)), "seq strictly increasing"
    # seq is milliseconds on this boot's monotonic clock: one interval apart, give or take.
    gaps = [b - a for a, b in itertools.pairwise(seqs)]
    assert all(0.5 * HEARTBEAT_S * 1000 < g < 1.5 * HEARTBEAT_S * 1000 for g in gaps), gaps
    # Fixed cadence: arrival of beat n stays within a tolerance of t0 + n * interval (no drift).
    t0 = beats[0][0]
    late = [t - (t0 + i * HEARTBEAT_S) for i, (t, _) in enumerate(beats)]
    assert max(abs(x) for x in late) < 0.1, f"cadence drifted: {late}"
    rate = (len(beats) - 1) / (beats[-1][0] - t0)
    assert 4.0 < rate < 6.0, f"{rate:.2f} Hz, want 5"
    rec = seen.book.nodes["node-a"]
    assert rec.fence == FenceDeclaration(armed=True, after_s=FENCE_AFTER_S, bound_s=FENCE_BOUND_S)
    assert not rec.offline
    stats = agent.statistics()
    assert stats["last_broker_contact_age_s"] is not None
    assert stats["last_broker_contact_age_s"] < 3 * HEARTBEAT_S, "acknowledged: contact"
    assert stats["fenced"] is False


async def test_agent_without_fence_command_declares_an_unarmed_fence_and_never_runs_one(
    mosquitto: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seen = Seen()
    agent = Agent(settings(mosquitto, tmp_path, fence_command=None))
    async with running(subscriber(mosquitto, tmp_path, seen).run(), agent.run()):
        await wait_for(lambda: seen.count("node-a") >= 2, 5, "heartbeats")
        rec = seen.book.nodes["node-a"]
        assert rec.fence == FenceDeclaration(
            armed=False, after_s=FENCE_AFTER_S, bound_s=FENCE_BOUND_S
        )
        # Cut off from everything: it only says it would fence, and keeps trying to reconnect.
        mosquitto.stop()
        await wait_for(lambda: "WOULD FENCE" in caplog.text, FENCE_AFTER_S + 2, "would-fence log")
        assert agent.statistics()["fenced"] is False
        before = rec.seq
        mosquitto.start()
        await wait_for(lambda: rec.seq > before, 8, "heartbeats after the broker returns")
    assert caplog.text.count("WOULD FENCE") == 1, "logged once per episode"


async def test_cancelled_agent_leaves_retained_stopped_and_releases_its_fence(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    agent = Agent(settings(mosquitto, tmp_path, fence_command="true"))
    record = tmp_path / "run-node-a" / "agent-contact.json"
    async with running(agent.run()):
        await wait_for(lambda: agent.statistics()["fence_armed"], 5, "agent armed")
        assert await retained(mosquitto, status_topic(PREFIX, "node-a")) == b"online"
        assert record.exists()
    # A deliberate stop: said so, and the boot record cleared (the next agent of this boot is
    # armed again only by its own first contact).
    assert await retained(mosquitto, status_topic(PREFIX, "node-a")) == b"stopped"
    assert not record.exists()


async def test_sigkilled_agent_process_is_announced_offline_by_its_will(
    mosquitto: Mosquitto, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    seen = Seen()
    async with (
        running(subscriber(mosquitto, tmp_path, seen).run()),
        agent_process(mosquitto, tmp_path, "node-b") as proc,
    ):
        await wait_for(lambda: seen.count("node-b") >= 3, 15, "heartbeats of the agent process")
        killed_at = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        await wait_for(lambda: "node-b" in seen.offline_at, 1.5 * KEEPALIVE_S, "Will offline")
        latency = seen.offline_at["node-b"] - killed_at
        record_property("will_latency_after_sigkill_s", round(latency, 3))
        print(f"Will latency after SIGKILL: {latency * 1000:.0f} ms")
        # The kernel closes the dead process's socket: the broker publishes the Will at once.
        assert latency < 1.0
    assert await retained(mosquitto, status_topic(PREFIX, "node-b")) == b"offline"


async def test_sigterm_stops_agent_process_cleanly_with_retained_stopped(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    seen = Seen()
    async with (
        running(subscriber(mosquitto, tmp_path, seen).run()),
        agent_process(mosquitto, tmp_path, "node-c") as proc,
    ):
        await wait_for(lambda: seen.count("node-c") >= 3, 15, "heartbeats of the agent process")
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(3):
            assert await proc.wait() == 0
        await wait_for(lambda: "node-c" in seen.offline_at, 2, "stopped status")
        last = seen.count("node-c")
        await stays(lambda: seen.count("node-c") == last, 3 * HEARTBEAT_S, "no heartbeat after")
    assert await retained(mosquitto, status_topic(PREFIX, "node-c")) == b"stopped"
    log = (tmp_path / "agent-node-c.log").read_text()
    assert "published stopped (stopping)" in log, log


# --- broker outage ---------------------------------------------------------------------------


async def test_broker_restart_is_reported_down_then_up_and_heartbeats_resume(
    mosquitto: Mosquitto, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    seen = Seen()
    agent = Agent(settings(mosquitto, tmp_path, fence_command=None))
    sub = subscriber(mosquitto, tmp_path, seen)
    async with running(sub.run(), agent.run()):
        await wait_for(lambda: seen.count("node-a") >= 3, 5, "heartbeats")
        assert seen.ups() == [True]
        mosquitto.stop()
        await wait_for(lambda: seen.ups() == [True, False], 3, "connection reported down")
        await wait_for(lambda: not agent.statistics()["connected"], 3, "agent disconnected")
        assert not sub.statistics()["connected"]
        before = seen.book.nodes["node-a"].seq
        restarted_at = time.monotonic()
        mosquitto.start()
        await wait_for(lambda: seen.ups() == [True, False, True], 8, "connection reported up")
        await wait_for(lambda: seen.book.nodes["node-a"].seq > before, 8, "heartbeats resume")
        resumed = time.monotonic() - restarted_at
        record_property("heartbeats_resumed_after_broker_restart_s", round(resumed, 3))
        print(f"heartbeats resumed {resumed * 1000:.0f} ms after the broker restarted")
        assert agent.statistics()["connects"] == 2
        assert sub.statistics()["connects"] == 2
        # The broker lost its retained messages (no persistence): the agent said online again.
        assert await retained(mosquitto, status_topic(PREFIX, "node-a")) == b"online"


# --- self-fencing ----------------------------------------------------------------------------


def fence_command(marker: Path) -> str:
    return f"echo fenced >> {marker}"


async def test_agent_fences_itself_when_cut_off_from_broker_and_api(
    mosquitto: Mosquitto, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    marker = tmp_path / "fenced"
    seen = Seen()
    probe = Probe(None)  # API unreachable throughout
    agent = Agent(
        settings(mosquitto, tmp_path, fence_command=fence_command(marker)), api_probe=probe
    )
    async with running(subscriber(mosquitto, tmp_path, seen).run(), agent.run()):
        await wait_for(lambda: seen.count("node-a") >= 3, 5, "heartbeats")
        cut_at = time.monotonic()
        mosquitto.stop()
        await wait_for(marker.exists, FENCE_AFTER_S + 2, "fence marker")
        after = time.monotonic() - cut_at
        record_property("self_fence_after_cut_s", round(after, 3))
        print(f"self-fenced {after:.2f}s after the broker stopped (limit {FENCE_AFTER_S}s)")
        # Not early: its last proven contact was at most one heartbeat before the cut.
        assert after >= FENCE_AFTER_S - HEARTBEAT_S - 0.05
        assert after <= FENCE_AFTER_S + 0.5
        async with asyncio.timeout(FENCE_BOUND_S + 1):
            outcome = await agent.wait_fenced()
        assert outcome.succeeded and agent.statistics()["fence_result"] == "exit 0"
        assert probe.calls > 0
        # A fenced node never claims to be alive again, even with the broker back.
        mosquitto.start()
        await wait_for(lambda: seen.ups()[-1:] == [True], 8, "subscriber reconnected")
        last = seen.count("node-a")
        await stays(lambda: seen.count("node-a") == last, 5 * HEARTBEAT_S, "no heartbeats")
        assert not agent.statistics()["connected"]
    assert marker.read_text() == "fenced\n", "the fence ran exactly once"


async def test_partitioned_agent_fences_for_lack_of_echoes_before_the_broker_sends_its_will(
    mosquitto: Mosquitto, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    """A partition sends no FIN: the agent's connection still looks open, yet no heartbeat
    comes back, so it fences on time; the broker announces it only after its keepalive
    timeout (nominally 1.5 x keepalive; mosquitto 2.0.11 measured 2.2-2.8 x)."""
    marker = tmp_path / "fenced"
    seen = Seen()
    async with TcpProxy("127.0.0.1", mosquitto.port, name="partition") as link:
        agent = Agent(
            settings(
                f"mqtt://127.0.0.1:{link.port}", tmp_path, fence_command=fence_command(marker)
            ),
            api_probe=Probe(None),
        )
        async with running(subscriber(mosquitto, tmp_path, seen).run(), agent.run()):
            await wait_for(lambda: seen.count("node-a") >= 3, 5, "heartbeats")
            cut_at = time.monotonic()
            link.set_mode(ProxyMode.BLACKHOLE)
            await wait_for(marker.exists, FENCE_AFTER_S + 2, "fence marker")
            fenced_after = time.monotonic() - cut_at
            assert agent.statistics()["connected"], "the client still believed it was connected"
            assert FENCE_AFTER_S - HEARTBEAT_S - 0.05 <= fenced_after <= FENCE_AFTER_S + 0.5
            await wait_for(lambda: "node-a" in seen.offline_at, 3 * KEEPALIVE_S + 2, "Will")
            will_after = seen.offline_at["node-a"] - cut_at
    record_property("partition_fence_s", round(fenced_after, 3))
    record_property("partition_will_s", round(will_after, 3))
    print(f"partitioned: fenced after {fenced_after:.2f}s, Will after {will_after:.2f}s")
    assert fenced_after + KEEPALIVE_S / 2 < will_after <= 3 * KEEPALIVE_S + 1


async def test_an_agent_heard_one_way_reports_its_contact_ageing_and_the_controller_ages_it(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """A one-way broker path: the agent's heartbeats still reach the broker and the controller,
    but nothing comes back to the agent (its echoes are lost), and the API is gone. The agent
    has no contact: it fences on its deadline, and until then it would answer its peers `cut`.
    Its heartbeats say how old its contact is, and the controller's book ages the node from
    that contact, not from the heartbeats it still hears: what makes it count the node silent
    (decide/heartbeats.py, `contact_at`). The twin, before the cut: the same heartbeats over
    the two-way path keep the node fresh."""
    marker = tmp_path / "fenced"
    seen = Seen(book=HeartbeatBook(contact_slack_s=HEARTBEAT_S))
    probe = Probe("Healthy")  # the API arms it; then it goes
    async with TcpProxy("127.0.0.1", mosquitto.port, name="one-way") as link:
        agent = Agent(
            settings(
                f"mqtt://127.0.0.1:{link.port}", tmp_path, fence_command=fence_command(marker)
            ),
            api_probe=probe,
        )
        async with running(subscriber(mosquitto, tmp_path, seen).run(), agent.run()):
            await wait_for(lambda: seen.count("node-a") >= 5, 5, "heartbeats")
            rec = seen.book.nodes["node-a"]
            now = time.monotonic()
            assert rec.contact_at is not None and now - rec.contact_at < 3 * HEARTBEAT_S
            probe.phase = None  # the API is gone for this node
            link.set_mode(ProxyMode.TO_TARGET)
            cut_at = time.monotonic()
            heard = seen.count("node-a")
            await wait_for(marker.exists, FENCE_AFTER_S + 1, "fence marker")
            at_fence = time.monotonic()
            assert rec.last_at is not None and rec.contact_at is not None
            assert seen.count("node-a") >= heard + (FENCE_AFTER_S / HEARTBEAT_S) - 3, (
                "the controller no longer heard it: not a one-way path"
            )
            assert at_fence - rec.last_at < 3 * HEARTBEAT_S, "heard until it fenced"
            # Aged from its contact (before the cut), give or take a heartbeat interval.
            assert rec.contact_at <= cut_at + 2 * HEARTBEAT_S
            assert at_fence - rec.contact_at >= FENCE_AFTER_S - 3 * HEARTBEAT_S


def bridged_member(make_mosquitto: Callable[..., Mosquitto], port: int) -> Mosquitto:
    """A second broker bridged to the one on `port` for every watchdog topic, both ways (a
    broker cluster of two members, as far as an agent and a controller can tell)."""
    return make_mosquitto(
        extra_config=(
            "connection member-b\n"
            f"address 127.0.0.1:{port}\n"
            f"topic {PREFIX}/# both 0\n"
            "cleansession true\n"
            "keepalive_interval 5\n"
            "restart_timeout 1\n"
        )
    )


@pytest.mark.parametrize(
    ("contact", "bridge"), [("leader-ack", "cut"), ("leader-ack", "up"), ("echo", "cut")]
)
async def test_an_agent_whose_broker_member_no_longer_reaches_the_leader_fences(
    mosquitto: Mosquitto,
    make_mosquitto: Callable[..., Mosquitto],
    tmp_path: Path,
    contact: str,
    bridge: str,
) -> None:
    """A clustered broker split in two: the agent still reaches its own member, which takes its
    heartbeats, but the leader, on the other member, hears nothing, and after the safe delay
    resets the node's VMs. With `broker_contact: leader-ack` contact is only the leader's
    acknowledgement, so the agent, cut from the API too, fences on its deadline. Its twin: the
    same agent on the same member while the members are joined is acknowledged through the
    bridge, keeps contact and never fences. With `echo` (the default, for the single broker the
    manifests ship) its own member's echo keeps it from fencing: why a clustered broker needs
    leader-ack."""
    marker = tmp_path / "fenced"
    seen = Seen()
    probe = Probe("Healthy")  # the API arms it; then it goes
    on_member_b: list[float] = []  # when agent node-a's own member routed one of its heartbeats

    async def witness(port: int) -> None:
        async with aiomqtt.Client("127.0.0.1", port, identifier="witness") as c:
            await c.subscribe(heartbeat_topic(PREFIX, "node-a"), qos=0)
            async for _ in c.messages:
                on_member_b.append(time.monotonic())

    async with TcpProxy("127.0.0.1", mosquitto.port, name="bridge") as link:
        member_b = bridged_member(make_mosquitto, link.port)
        agent = Agent(
            settings(
                member_b,
                tmp_path,
                fence_command=fence_command(marker),
                mqtt={"broker_contact": contact},
            ),
            api_probe=probe,
        )
        leader = subscriber(mosquitto, tmp_path, seen)
        async with running(leader.run(), agent.run(), witness(member_b.port)):
            await wait_for(lambda: seen.count("node-a") >= 3, 10, "heartbeats through the bridge")
            await wait_for(
                lambda: (agent.statistics()["last_broker_contact_age_s"] or 9) < 2 * HEARTBEAT_S,
                5,
                "acknowledged through the bridge",
            )
            probe.phase = None  # the API is gone for this node
            cut_at = time.monotonic()
            if contact == "echo":
                link.set_mode(ProxyMode.BLACKHOLE)
                heard = seen.count("node-a")
                await stays(lambda: not marker.exists(), 2 * FENCE_AFTER_S, "not fenced")
                assert seen.count("node-a") <= heard + 1, "the leader heard it after the cut"
                assert agent.statistics()["last_broker_contact_age_s"] < 3 * HEARTBEAT_S
            elif bridge == "cut":
                link.set_mode(ProxyMode.BLACKHOLE)
                heard = seen.count("node-a")
                await wait_for(marker.exists, FENCE_AFTER_S + 2, "fence marker")
                after = time.monotonic() - cut_at
                routed = [t for t in on_member_b if t > cut_at]
                # Its own member kept taking its heartbeats until it fenced: an echo would
                # have kept it from fencing while the leader heard none of them.
                assert len(routed) >= (FENCE_AFTER_S / HEARTBEAT_S) - 2, routed
                assert seen.count("node-a") <= heard + 1, "the leader heard it after the cut"
                assert FENCE_AFTER_S - 2 * HEARTBEAT_S - 0.1 <= after <= FENCE_AFTER_S + 0.5
            else:
                await stays(lambda: not marker.exists(), 2 * FENCE_AFTER_S, "not fenced")
                assert agent.statistics()["last_broker_contact_age_s"] < 3 * HEARTBEAT_S


async def test_with_leader_ack_a_standby_that_hears_every_heartbeat_is_no_contact(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """Only the leader's hearing counts: with no leader (a controller rollout between two
    leaders) the agent has no broker contact even though a standby replica hears it, and falls
    back on the API; once a leader acknowledges, contact is proven again."""
    seen = Seen()
    probe = Probe("Healthy")
    agent = Agent(
        settings(mosquitto, tmp_path, fence_command="true", mqtt={"broker_contact": "leader-ack"}),
        api_probe=probe,
    )
    standby = subscriber(mosquitto, tmp_path, seen, leading=False)
    async with running(standby.run(), agent.run()):
        await wait_for(lambda: seen.count("node-a") >= 5, 5, "heartbeats heard")
        await wait_for(lambda: agent.statistics()["fence_armed"], 5, "armed by the API")
        stats = agent.statistics()
        assert stats["last_broker_contact_age_s"] is None, "a standby's hearing counted"
        assert stats["last_api_contact_age_s"] is not None
        assert standby.statistics()["acks"] == 0
        standby.acks_when = lambda: True  # it takes the lead
        await wait_for(
            lambda: agent.statistics()["last_broker_contact_age_s"] is not None, 5, "contact"
        )
        assert standby.statistics()["acks"] > 0


async def test_stopping_agent_and_subscriber_on_a_partition_still_ends_promptly(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """SIGTERM on a cut-off node: the goodbye cannot reach the broker, and must not hang."""
    seen = Seen()
    async with TcpProxy("127.0.0.1", mosquitto.port, name="partition") as link:
        url = f"mqtt://127.0.0.1:{link.port}"
        agent = Agent(settings(url, tmp_path, fence_command=None))
        sub = subscriber(url, tmp_path, seen)
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(agent.run()), tg.create_task(sub.run())]
            await wait_for(lambda: seen.count("node-a") >= 2, 5, "heartbeats")
            link.set_mode(ProxyMode.BLACKHOLE)
            stop_at = time.monotonic()
            for task in tasks:
                task.cancel()
            async with asyncio.timeout(4):
                await asyncio.wait(tasks)
        took = time.monotonic() - stop_at
    assert all(t.cancelled() for t in tasks), "cancellation propagated, not swallowed"
    assert took < 2 * 1.0 + 0.5, f"stopping took {took:.2f}s"


async def test_agent_does_not_fence_while_the_api_says_healthy_even_with_the_broker_down(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    marker = tmp_path / "fenced"
    probe = Probe("Healthy")
    agent = Agent(
        settings(mosquitto, tmp_path, fence_command=fence_command(marker)), api_probe=probe
    )
    async with running(agent.run()):
        await wait_for(
            lambda: agent.statistics()["last_broker_contact_age_s"] is not None, 5, "contact"
        )
        mosquitto.stop()
        await stays(lambda: not marker.exists(), 2 * FENCE_AFTER_S, "not fenced")
        stats = agent.statistics()
        assert not stats["fenced"] and not stats["connected"]
        assert stats["last_api_contact_age_s"] < 3 * API_CHECK_S
        # The API goes too: now it is cut off, and fences after the limit.
        lost_api_at = time.monotonic()
        probe.phase = None
        await wait_for(marker.exists, FENCE_AFTER_S + 1.5, "fence marker")
        after = time.monotonic() - lost_api_at
        assert FENCE_AFTER_S - API_CHECK_S - 0.05 <= after <= FENCE_AFTER_S + 0.5


async def test_agent_fences_at_once_when_the_api_says_it_is_being_fenced(
    mosquitto: Mosquitto, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    marker = tmp_path / "fenced"
    seen = Seen()
    probe = Probe("Healthy")
    agent = Agent(
        settings(mosquitto, tmp_path, fence_command=fence_command(marker)), api_probe=probe
    )
    async with running(subscriber(mosquitto, tmp_path, seen).run(), agent.run()):
        await wait_for(lambda: seen.count("node-a") >= 3, 5, "heartbeats")
        declared_at = time.monotonic()
        probe.phase = "Fencing"  # the controller persisted FENCING on this node
        # With the broker fresh the API is asked every self_fence_after_s / 2 at the least.
        await wait_for(marker.exists, max(API_CHECK_S, FENCE_AFTER_S / 2) + 1, "fence marker")
        took = time.monotonic() - declared_at
        record_property("fence_after_api_says_fencing_s", round(took, 3))
        print(f"fenced {took * 1000:.0f} ms after the API said Fencing")
        async with asyncio.timeout(FENCE_BOUND_S + 1):
            outcome = await agent.wait_fenced()
        assert outcome.reason == "the API says this node is Fencing"
        # It stops heartbeating and says offline although the broker is fine.
        await wait_for(lambda: "node-a" in seen.offline_at, 3, "offline after the fence")
        last = seen.count("node-a")
        await stays(lambda: seen.count("node-a") == last, 5 * HEARTBEAT_S, "no heartbeats")
    assert await retained(mosquitto, status_topic(PREFIX, "node-a")) == b"offline"


class Wall:
    """This machine's wall clock, which an administrator or NTP may step."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class Kubelet:
    """This node's kubelet as its Lease shows it: renews `spec.renewTime` (stamped on the
    machine's wall clock) every `every_s` while `renewing` (the lease probe the runtime would
    inject reads it, like a quorum GET)."""

    def __init__(self, every_s: float, wall: Wall | None = None) -> None:
        self.every_s = every_s
        self.wall = wall or Wall()
        self.renewing = True
        self.renewed: float | None = self.wall()
        self.last_renewal_mono = time.monotonic()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            if self.renewing:
                self.renewed = self.wall()
                self.last_renewal_mono = time.monotonic()

    async def lease(self) -> float | None:
        return self.renewed


LEASE_S = 1.5  # the agent's self_fence_lease_s here; its kubelet renews every 0.5 s


@pytest.mark.parametrize("phase", ["Fencing", "Resetting"])
async def test_a_declared_node_whose_kubelet_renews_its_lease_is_not_fenced_until_it_stops(
    mosquitto: Mosquitto, tmp_path: Path, phase: str
) -> None:
    """Cut off from the broker (and its peers), declared Fencing on the peers' word, but still
    reaching the API, where its kubelet renews the Lease: the node is alive and must not reboot
    (the controller withdraws at the renewal and, until `lease_s` after the last renewal it saw,
    resets nothing). Once the renewals stop it fences `lease_s` after the last one. Twin: once
    the controller writes Resetting it has passed that gate: the agent fences within its grace,
    renewals or not."""
    marker = tmp_path / "fenced"
    probe = Probe("Healthy")
    kubelet = Kubelet(every_s=0.5)
    agent = Agent(
        settings(
            mosquitto, tmp_path, fence_command=fence_command(marker), self_fence_lease_s=LEASE_S
        ),
        api_probe=probe,
        lease_probe=kubelet.lease,
    )
    async with running(agent.run(), kubelet.run()):
        await wait_for(lambda: agent.armed, 5, "armed")
        assert agent.declaration.lease_s == LEASE_S  # promised in every heartbeat
        mosquitto.stop()
        declared_at = time.monotonic()
        probe.phase = phase
        if phase == "Resetting":
            await wait_for(marker.exists, agent.declared_grace_s + 3 * API_CHECK_S, "fenced")
            assert time.monotonic() - declared_at <= agent.declared_grace_s + 3 * API_CHECK_S
            return
        # Without its Lease the agent would fence within its grace (0.75 s) or its deadline.
        await stays(lambda: not marker.exists(), 3 * FENCE_AFTER_S, "not fenced")
        assert agent.statistics()["lease_renewed_age_s"] < 0.5 + 2 * API_CHECK_S
        kubelet.renewing = False  # the kubelet dies too: now it must fence, in time
        last = kubelet.last_renewal_mono
        await wait_for(marker.exists, LEASE_S + 1.0, "fenced once the renewals stopped")
        fenced_after = time.monotonic() - last
        # Not before lease_s after the last renewal (that is what it waited for), and not much
        # after it (the controller's gate is lease_s plus the fence's bound after it).
        assert LEASE_S - 0.1 <= fenced_after <= LEASE_S + 2 * API_CHECK_S, fenced_after


async def test_a_wall_clock_stepped_back_does_not_make_an_old_lease_renewal_count(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """The agent dates a renewal by the wall clock the kubelet stamped it with. Stepped back
    10 s just as the kubelet stops renewing, that clock would make the last renewal look
    current for 10 s more, and the agent fence long after the controller's Lease gate. A step
    voids the renewals read across it: the declared node fences at once. (Without a step it
    waits for lease_s after the last renewal: the test above.)"""
    marker = tmp_path / "fenced"
    probe = Probe("Healthy")
    wall = Wall()
    kubelet = Kubelet(every_s=0.5, wall=wall)
    agent = Agent(
        settings(
            mosquitto, tmp_path, fence_command=fence_command(marker), self_fence_lease_s=LEASE_S
        ),
        api_probe=probe,
        lease_probe=kubelet.lease,
        wall=wall,
    )
    async with running(agent.run(), kubelet.run()):
        await wait_for(lambda: agent.armed, 5, "armed")
        mosquitto.stop()
        probe.phase = "Fencing"
        await stays(lambda: not marker.exists(), 2 * FENCE_AFTER_S, "not fenced while renewing")
        kubelet.renewing = False
        wall.offset = -10.0
        stepped = time.monotonic()
        await wait_for(marker.exists, LEASE_S + 1.0, "fenced after the step")
        assert time.monotonic() - stepped < 4 * API_CHECK_S + 0.3


# --- one boot, several agent processes ------------------------------------------------------


async def test_an_agent_restarted_on_the_same_boot_is_heard_at_once_and_a_replay_is_refused(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """A rollout restarts every agent on the same boot: the controller must hear the new
    process at its first heartbeat (it would otherwise be unheard for as long as the old one
    ran: no withdrawal of a declaration, no evacuation), and a captured heartbeat of the old
    process must still be refused."""
    seen = Seen()
    captured: list[bytes] = []
    topic = heartbeat_topic(PREFIX, "node-a")
    marker = tmp_path / "fenced"
    async with (
        running(subscriber(mosquitto, tmp_path, seen).run()),
        aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="eavesdropper") as spy,
    ):
        await spy.subscribe(topic)

        async def capture() -> None:
            async for message in spy.messages:
                assert isinstance(message.payload, bytes)
                captured.append(message.payload)

        async with running(capture()):
            first = Agent(settings(mosquitto, tmp_path, fence_command=fence_command(marker)))
            # The first process runs long enough that a counter from 0 would stay below it.
            async with running(first.run()):
                await wait_for(lambda: seen.count("node-a") >= 10, 5, "first process heartbeats")
                await wait_for(lambda: len(captured) >= 10, 2, "captured heartbeats")
            heard = seen.count("node-a")
            restarted_at = time.monotonic()
            second = Agent(settings(mosquitto, tmp_path, fence_command=fence_command(marker)))
            async with running(second.run()):
                await wait_for(lambda: seen.count("node-a") > heard, 3, "the restarted agent")
                took = time.monotonic() - restarted_at
                assert seen.rejected[RejectReason.REPLAYED] == 0
                # The first process stopped deliberately and released its fence; this one arms
                # again at its own first contact, within a heartbeat or two.
                armed = FenceDeclaration(True, FENCE_AFTER_S, FENCE_BOUND_S)
                await wait_for(lambda: seen.book.nodes["node-a"].fence == armed, 2, "armed again")
                old = captured[len(captured) // 2]
                await spy.publish(topic, old)
                await wait_for(
                    lambda: seen.rejected[RejectReason.REPLAYED] == 1, 3, "the replay refused"
                )
                count = seen.count("node-a")
                await wait_for(lambda: seen.count("node-a") > count, 3, "the agent still heard")
    print(f"restarted agent heard {took * 1000:.0f} ms after its start")
    assert took < 1.0 + HEARTBEAT_S, "heard within one interval of its connection"
    assert not marker.exists(), "a restart with contact fences nothing"


async def test_an_agent_without_contact_in_this_boot_never_fences_and_arms_at_first_contact(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """A cluster starting from cold: broker and API come up long after the agents. An agent
    that has proven no contact in this boot neither fences nor declares an armed fence; at its
    first contact it arms, and from then on a cut fences on time."""
    marker = tmp_path / "fenced"
    seen = Seen()
    probe = Probe(None)  # the API server is not up yet
    async with TcpProxy("127.0.0.1", mosquitto.port, name="broker") as link:
        link.set_mode(ProxyMode.BLACKHOLE)  # nor is the broker
        agent = Agent(
            settings(
                f"mqtt://127.0.0.1:{link.port}", tmp_path, fence_command=fence_command(marker)
            ),
            api_probe=probe,
        )
        async with running(subscriber(mosquitto, tmp_path, seen).run(), agent.run()):
            await stays(lambda: not marker.exists(), 3 * FENCE_AFTER_S, "no fence at cold start")
            stats = agent.statistics()
            assert not stats["fence_armed"] and stats["fence_due_in_s"] is None
            assert probe.calls > 0, "it kept trying the API"
            link.set_mode(ProxyMode.PASS)  # the broker is up
            await wait_for(lambda: agent.statistics()["fence_armed"], 10, "armed at contact")
            await wait_for(
                lambda: (
                    seen.book.nodes.get("node-a") is not None
                    and seen.book.nodes["node-a"].fence is not None
                    and seen.book.nodes["node-a"].fence.armed
                ),
                5,
                "an armed declaration heard",
            )
            cut_at = time.monotonic()
            link.set_mode(ProxyMode.BLACKHOLE)
            await wait_for(marker.exists, FENCE_AFTER_S + 2, "fence marker")
            after = time.monotonic() - cut_at
    assert FENCE_AFTER_S - HEARTBEAT_S - 0.05 <= after <= FENCE_AFTER_S + 0.5


async def test_an_agent_restarted_during_a_partition_fences_at_its_first_deadline(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """A crash-looping agent on a partitioned node must not escape the fence the controller
    counts on: the restarted process fences at the deadline of the last contact of this boot,
    not `self_fence_after_s` after its own start (nor never, for lack of contact)."""
    marker = tmp_path / "fenced"
    after_s = 4.0  # long enough to restart mid-way (stopping on a partition takes ~1-2 s)
    async with TcpProxy("127.0.0.1", mosquitto.port, name="partition") as link:
        url = f"mqtt://127.0.0.1:{link.port}"

        def agent() -> Agent:
            return Agent(
                settings(
                    url, tmp_path, fence_command=fence_command(marker), self_fence_after_s=after_s
                )
            )

        first = agent()
        async with running(first.run()):
            await wait_for(lambda: first.statistics()["fence_armed"], 5, "armed")
            await wait_for(
                lambda: (first.statistics()["last_broker_contact_age_s"] or 9) < HEARTBEAT_S,
                5,
                "a fresh echo",
            )
            cut_at = time.monotonic()
            link.set_mode(ProxyMode.BLACKHOLE)
            await asyncio.sleep(0.5)  # then the process dies (a fault time, not a wait)
        second = agent()
        started = time.monotonic()
        assert started - cut_at < after_s - 1.0, "restarted mid-way (stopping was slow)"
        async with running(second.run()):
            await wait_for(marker.exists, after_s + 2, "fence marker")
            fenced = time.monotonic()
            assert second.statistics()["fence_armed"], "resumed armed, without any contact"
    after_cut, after_restart = fenced - cut_at, fenced - started
    print(f"fenced {after_cut:.2f}s after the cut, {after_restart:.2f}s after the restart")
    assert after_s - HEARTBEAT_S - 0.05 <= after_cut <= after_s + 0.5, "the deadline moved"
    assert after_restart < after_s - 0.5
    assert marker.read_text() == "fenced\n"


# --- hostile input ---------------------------------------------------------------------------


async def test_subscriber_rejects_and_counts_hostile_messages_and_keeps_accepting_the_agent(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    seen = Seen()
    sub = subscriber(mosquitto, tmp_path, seen)
    agent = Agent(settings(mosquitto, tmp_path))
    topic_a = heartbeat_topic(PREFIX, "node-a")
    async with (
        running(sub.run(), agent.run()),
        aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="attacker") as attacker,
    ):
        # Capture one real heartbeat of node-a to replay it.
        await attacker.subscribe(topic_a)
        async with asyncio.timeout(5):
            captured = await anext(aiter(attacker.messages))
        await attacker.unsubscribe(topic_a)
        assert isinstance(captured.payload, bytes)
        real = parse_heartbeat(topic_a, captured.payload, PREFIX)
        await wait_for(lambda: seen.seq("node-a") > real.seq, 5, "a newer heartbeat accepted")

        def forged(node: str) -> bytes:
            return encode_heartbeat(
                Heartbeat(node, "forged-boot", 10**6, 0.0, "x", FenceDeclaration(True, 1, 1))
            )

        hostile: list[tuple[str, bytes, RejectReason]] = [
            (topic_a, forged("node-b"), RejectReason.TOPIC_MISMATCH),  # node-b posing on a's topic
            (heartbeat_topic(PREFIX, "node-b"), captured.payload, RejectReason.TOPIC_MISMATCH),
            (f"{PREFIX}/heartbeat/", captured.payload, RejectReason.TOPIC_MISMATCH),
            (topic_a, b"{" + b" " * 4000 + b"}", RejectReason.OVERSIZED),
            (topic_a, b"\xff\xfe{not json", RejectReason.MALFORMED),
            (topic_a, b"[1, 2, 3]", RejectReason.MALFORMED),
            (topic_a, b'{"node": "node-a", "seq": "1"}', RejectReason.SCHEMA),
            (heartbeat_topic(PREFIX, "node-x"), forged("node-x"), RejectReason.UNKNOWN_NODE),
            (topic_a, captured.payload, RejectReason.REPLAYED),
            (status_topic(PREFIX, "node-a"), b"maybe", RejectReason.MALFORMED),
            (status_topic(PREFIX, "node-x"), b"offline", RejectReason.UNKNOWN_NODE),
        ]
        for topic, payload, _ in hostile:
            await attacker.publish(topic, payload, qos=1)
        want = collections.Counter(reason for _, _, reason in hostile)
        await wait_for(lambda: seen.rejected == want, 5, f"rejections {dict(want)}")
        stats = sub.statistics()
        assert stats["rejected"] == {r.value: n for r, n in want.items()}
        assert stats["connected"]
        # The real agent is still believed, and nothing hostile changed what we believe of it.
        seq = seen.book.nodes["node-a"].seq
        await wait_for(lambda: seen.book.nodes["node-a"].seq >= seq + 3, 3, "agent accepted")
        rec = seen.book.nodes["node-a"]
        assert rec.boot_id == real.boot_id and not rec.offline
        assert "node-x" not in seen.book.nodes and "node-b" not in seen.book.nodes


# --- backpressure ----------------------------------------------------------------------------


async def test_a_failure_handling_one_message_is_counted_and_the_next_ones_are_read(
    mosquitto: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Messages are handled inside the MQTT client's read callback, where an exception would
    end the connection and blind the controller to every node: a bug in handling one message
    must cost that message only."""
    seen = Seen()

    def fails_for_node_b(node: str) -> None:
        if node == "node-b":
            raise RuntimeError("a bug in handling node-b")
        seen.on_change(node)

    sub = HeartbeatSubscriber(
        settings(mosquitto, tmp_path, node="controller"),
        seen.book,
        on_change=fails_for_node_b,
        on_connection=seen.on_connection,
        on_reject=seen.on_reject,
    )
    fence = FenceDeclaration(True, FENCE_AFTER_S, FENCE_BOUND_S)
    async with (
        running(sub.run()),
        aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="pub") as publisher,
    ):
        await wait_for(lambda: sub.connected, 5, "the subscriber connected")
        for seq in range(1, 4):
            for node in ("node-b", "node-a"):
                hb = Heartbeat(node, "boot-1", seq, time.time(), "test", fence)
                await publisher.publish(heartbeat_topic(PREFIX, node), encode_heartbeat(hb))
        await wait_for(lambda: seen.seq("node-a") == 3, 10, "every heartbeat of node-a handled")
        stats = sub.statistics()
    assert stats["handler_errors"] == 3, "each failed message counted"
    assert stats["connects"] == 1, "the connection was never dropped"
    assert seen.seqs("node-a") == [1, 2, 3]
    assert "a bug in handling node-b" in caplog.text, "the failure is logged with its cause"


async def test_a_backlogged_subscriber_reports_its_own_ingest_lag_and_when_it_caught_up(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """A controller that consumes slower than heartbeats arrive must say that its heartbeat
    ages are its own backlog (the controller then treats them as UNKNOWN), and say when the
    backlog is gone: measured by an echo through the real broker on the same connection."""
    seen = Seen()
    lags: list[tuple[bool, float]] = []
    per_message_s = 0.02

    def slow_consumer(node: str) -> None:
        seen.on_change(node)
        time.sleep(per_message_s)  # an evaluation that blocks the loop, as under CPU starvation

    sub = HeartbeatSubscriber(
        settings(mosquitto, tmp_path, node="controller"),
        seen.book,
        on_change=slow_consumer,
        on_connection=seen.on_connection,
        on_reject=seen.on_reject,
        on_lag=lambda lagging, lag_s: lags.append((lagging, lag_s)),
        echo_interval_s=0.1,
        max_lag_s=0.5,
    )
    burst = 150  # 150 x 20 ms = 3 s of backlog
    fence = FenceDeclaration(True, FENCE_AFTER_S, FENCE_BOUND_S)

    async def publish_burst() -> None:
        async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="burst") as publisher:
            for seq in range(1, burst + 1):
                hb = Heartbeat("node-a", "boot-1", seq, time.time(), "test", fence)
                await publisher.publish(heartbeat_topic(PREFIX, "node-a"), encode_heartbeat(hb))

    async with running(sub.run()):
        await wait_for(lambda: sub.statistics()["echo_rtt_s"] is not None, 5, "a first echo")
        await stays(lambda: not sub.ingest_lagging(), 0.5, "no lag while idle")
        # From a thread of its own, as agents publish from their own machines: a publisher on
        # this event loop would be held up by the slow consumer and never get ahead of it.
        await asyncio.to_thread(asyncio.run, publish_burst())
        # Waits on what is asserted: the reports (the instant flag can rise and fall between
        # two polls of a loop that the slow consumer blocks, on a loaded machine).
        await wait_for(lambda: any(f for f, _ in lags), 30, "the subscriber to report its backlog")
        await wait_for(lambda: seen.seq("node-a") == burst, 30, "the whole burst consumed")
        await wait_for(lambda: lags and not lags[-1][0], 30, "the lag to clear")
    flags = [lagging for lagging, _ in lags]
    first = flags.index(True)
    assert not any(flags[:first]) and flags[-1] is False, "idle, then lagging, then caught up"
    assert max(lag for _, lag in lags) > 1.0, "a 3 s backlog measured as more than 1 s"
    assert sub.statistics()["lag_episodes"] >= 1
    assert seen.count("node-a") == burst, "nothing lost while lagging"


# --- TLS and authentication ------------------------------------------------------------------


def _tls_material(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 (cryptography is a dependency)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("test-ca"))
        .issuer_name(name("test-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("broker"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = tmp_path / "ca.pem", tmp_path / "broker.pem", tmp_path / "broker.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


async def test_agent_and_subscriber_use_tls_and_password_from_settings(
    make_mosquitto: Callable[..., Mosquitto], tmp_path: Path
) -> None:
    ca, cert, key = _tls_material(tmp_path)
    passwd = tmp_path / "passwd"
    passwd.touch()
    for user in ("node-a", "controller"):
        proc = await asyncio.create_subprocess_exec(
            "mosquitto_passwd", "-b", str(passwd), user, f"secret-{user}"
        )
        assert await proc.wait() == 0
    broker = make_mosquitto(
        scheme="mqtts",
        allow_anonymous=False,
        listener_options=f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\n",
        extra_config=f"password_file {passwd}\n",
    )
    for user in ("node-a", "controller"):
        (tmp_path / f"pw-{user}").write_text(f"secret-{user}\n")

    def creds(user: str, password_file: Path | None = None) -> dict[str, Any]:
        return {
            "mqtt": {
                "ca_file": ca,
                "username": user,
                "password_file": password_file or tmp_path / f"pw-{user}",
            }
        }

    seen = Seen()
    agent = Agent(settings(broker, tmp_path, **creds("node-a")))
    sub = subscriber(broker, tmp_path, seen, **creds("controller"))
    (tmp_path / "pw-wrong").write_text("wrong\n")
    intruder_seen = Seen()
    intruder = subscriber(
        broker, tmp_path, intruder_seen, **creds("controller", tmp_path / "pw-wrong")
    )
    async with running(sub.run(), agent.run(), intruder.run()):
        await wait_for(lambda: seen.count("node-a") >= 3, 8, "heartbeats over TLS")
        assert agent.statistics()["last_broker_contact_age_s"] is not None
        await wait_for(lambda: intruder.statistics()["reconnect_attempt"] >= 2, 5, "refusals")
        assert intruder_seen.ups() == [] and intruder_seen.count("node-a") == 0
    # Plain MQTT to a TLS listener does not get through either.
    plain = Seen()
    plain_url = f"mqtt://127.0.0.1:{broker.port}"
    async with running(subscriber(plain_url, tmp_path, plain, **creds("controller")).run()):
        await stays(lambda: plain.ups() == [], 1.0, "no plain-text connection")
