"""The node agent: heartbeats with a Last Will over MQTT, and self-fencing (DESIGN §4, §5).

Owns one broker connection per process (client id `node-watchdog-agent-<node>`; a broker that
takes the client id from the certificate's name, as the shipped one does, makes it the node's
name) and these promises to the controller:

- retained `online` on `<prefix>/status/<node>` while connected; the broker publishes the Last
  Will `offline` (retained, QoS 1) when the connection dies; a clean stop publishes `offline`.
- a heartbeat every `heartbeat_interval_s` on a fixed cadence (QoS 0), its fencing parameters in
  every one (`fence: {armed, after_s, bound_s}`). `seq` is milliseconds on this boot's
  monotonic clock (strictly increasing within the process): an agent restarted on the same boot
  continues above its predecessor without storing anything, so the controller hears it at its
  first heartbeat, while a captured earlier heartbeat still reads as a replay.
- once armed in this boot (heartbeat/fence.py: first proven contact, recorded in the boot
  record), it fences itself when it has proven contact with neither the broker nor the API
  server for `self_fence_after_s`, counted from the latest contact of any agent process of this
  boot, and when the API says the controller is fencing it and the declaration is not withdrawn
  within a bounded grace; a fenced agent never heartbeats again. Before that first contact it
  declares `armed: false` and never fences.

Broker contact is one of its own heartbeats come back (`mqtt.broker_contact`, decide/acks.py):
read back from the broker (`echo`: it subscribes to its own topic, so the broker ACL lets an
agent read as well as write `<prefix>/heartbeat/<node>`), or acknowledged by the leading
controller on `<prefix>/ack/<node>` (`leader-ack`: a member of a clustered broker that takes
our heartbeats but no longer reaches the leader proves nothing; no leader, as between two
leaders of a controller rollout, means no broker contact, and the API's word keeps the agent
from fencing meanwhile). Each is stamped with when that heartbeat was sent; a connection that
the kernel still believes open proves nothing. API contact comes from `api_probe`, injected by the
runtime because this layer may not import the Kubernetes client.

With peer probes on (`peer_port` set and a probe address known), it also serves its probe
endpoint, announces that address in every heartbeat (`peer`), reads its probe list on
`<prefix>/probe/<node>` and publishes its verdicts on `<prefix>/peers/<node>` (heartbeat/peers.py),
in tasks of their own so that probing never delays a heartbeat. Peer verdicts are reported,
never acted on here.

It must not decide anything about other nodes, and must not import observe or runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import aiomqtt

import watchdog
from watchdog.decide.acks import AckRefused, BrokerContact, ack_topic, parse_ack
from watchdog.decide.heartbeats import (
    Heartbeat,
    HeartbeatRejected,
    encode_heartbeat,
    heartbeat_topic,
    parse_heartbeat,
    status_topic,
)
from watchdog.decide.mqtt_url import BrokerSettings, reconnect_delay_s
from watchdog.decide.observations import FenceDeclaration
from watchdog.decide.peer_probe import ProbeOutcome
from watchdog.decide.peer_reports import peers_topic
from watchdog.decide.peer_ring import parse_probe_list, probe_topic
from watchdog.decide.quorum import (
    cut_after_s,
    members_topic,
    parse_members,
    spare_valid_s,
    spared,
)
from watchdog.decide.roster import cut_peers_needed, parse_roster_shard, roster_filter
from watchdog.decide.state import UNREADABLE
from watchdog.heartbeat.boot_record import BootRecord, BootRecordError, BootRecordStore
from watchdog.heartbeat.device import DeviceError, Petter, WatchdogDevice
from watchdog.heartbeat.fence import (
    BootContact,
    FenceAction,
    FenceOutcome,
    declared_down,
    declared_grace_s,
    fence_at,
    fence_call,
)
from watchdog.heartbeat.peers import PeerEndpoint, PeerProber, SweepPlan
from watchdog.transport.mqtt import broker_connection

log = logging.getLogger(__name__)

ONLINE = b"online"
OFFLINE = b"offline"
# A deliberate stop (SIGTERM: a rollout, a drain): this agent releases its fence (device
# disarmed, boot record cleared), and the controller disarms the declaration on reading it.
STOPPED = b"stopped"
# Heartbeats awaiting the leader's acknowledgement; older ones are forgotten (their
# acknowledgement no longer matters once a later one came back, and a leader that acknowledges
# nothing must not grow this).
MAX_UNACKED = 256
# How long a clean stop may spend telling the broker `offline` and disconnecting.
GOODBYE_TIMEOUT_S = 1.0

ApiProbe = Callable[[], Awaitable[str | None]]
# The wall clock moved against the monotonic one by more than this between two looks: a step
# (NTP, an administrator). A renewTime read across a step says nothing about when it was
# written, so no Lease renewal counts until the step is older than any renewal we could read.
CLOCK_STEP_S = 0.5
# This node's Lease: its latest renewTime as Unix time (None: the node has no Lease).
LeaseProbe = Callable[[], Awaitable[float | None]]


class AgentSettings(Protocol):
    """What the agent reads of the runtime's `Settings` (satisfied structurally)."""

    @property
    def node_name(self) -> str | None: ...
    @property
    def boot_id_file(self) -> Path: ...
    @property
    def boot_state_dir(self) -> Path: ...
    @property
    def heartbeat_interval_s(self) -> float: ...
    @property
    def self_fence_after_s(self) -> float: ...
    @property
    def self_fence_lease_s(self) -> float: ...
    @property
    def fence_action_bound_s(self) -> float: ...
    @property
    def fence_command(self) -> str | None: ...
    @property
    def watchdog_device(self) -> Path | None: ...
    @property
    def watchdog_timeout_s(self) -> float: ...
    @property
    def api_check_interval_s(self) -> float: ...
    @property
    def mqtt(self) -> BrokerSettings: ...
    @property
    def peer_port(self) -> int: ...
    @property
    def peer_host(self) -> str: ...
    @property
    def peer_interval_s(self) -> float: ...
    def quorum_spare_off(self) -> str | None: ...
    @property
    def peer_probe_timeout_s(self) -> float: ...
    @property
    def peer_failures(self) -> int: ...
    @property
    def peer_refresh_s(self) -> float: ...
    def peer_address(self) -> str | None: ...
    def mqtt_password(self) -> str | None: ...


class Agent:
    """One node's agent. `run()` until cancelled; `statistics()` at any time."""

    def __init__(
        self,
        settings: AgentSettings,
        *,
        api_probe: ApiProbe | None = None,
        lease_probe: LeaseProbe | None = None,
        on_probe: Callable[[ProbeOutcome], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if not settings.node_name:
            raise ValueError("the agent needs node_name (WATCHDOG_NODE_NAME)")
        self._settings = settings
        self.node: str = settings.node_name
        self.client_id = f"node-watchdog-agent-{self.node}"
        prefix = settings.mqtt.topic_prefix
        self._prefix = prefix
        self._heartbeat_topic = heartbeat_topic(prefix, self.node)
        # What proves broker contact (decide/acks.py): our heartbeat read back, or the leader's
        # acknowledgement of it.
        self._contact = settings.mqtt.broker_contact
        self._contact_topic = (
            self._heartbeat_topic
            if self._contact is BrokerContact.ECHO
            else ack_topic(prefix, self.node)
        )
        self._status_topic = status_topic(prefix, self.node)
        self._api_probe = api_probe
        self._lease_probe = lease_probe
        # The latest renewal of this node's Lease that a quorum read showed, on our monotonic
        # clock (see `lease_deadline`); None: none read.
        self._lease_renewed: float | None = None
        # The wall clock's offset from the monotonic one at our last look, and when we last saw
        # it step (see CLOCK_STEP_S).
        self._wall_offset: float | None = None
        self._clock_stepped_at: float | None = None
        self._lease_error: str | None = None
        self._lease_read: asyncio.Task[None] | None = None
        self._on_probe = on_probe
        self._clock = clock
        self._wall = wall  # this machine's wall clock, on which the kubelet stamps renewTime
        self._peer_address = settings.peer_address()
        self._probe_topic = probe_topic(prefix, self.node)
        self._members_topic = members_topic(prefix)
        # The node count the leader published (decide/quorum.py); None: never told, so never
        # spared by peers.
        self._members: int | None = None
        # The roster the leader published (decide/roster.py): shard → {node: address}. Kept
        # across connections (a cut-off agent sweeps the one it knew); the newest per shard.
        self._roster_filter = roster_filter(prefix)
        self._roster_head = f"{prefix}/roster/"
        self._roster: dict[int, dict[str, str]] = {}
        # Quorum: when the latest probe round that spared us started (our clock), and how many
        # rounds have (statistics).
        self._spared_at: float | None = None
        self._spared_rounds = 0
        # Peers with contact in the last round; more of them than before while we are cut off
        # means the network is coming back: the broker and the API are tried again at once
        # rather than after a reconnect backoff, so that our contact returns before the spare
        # the peers' earlier `cut` gave us lapses.
        self._live_peers = 0
        self._retry_broker = asyncio.Event()
        self._beat_now = asyncio.Event()  # contact is back after a gap: heartbeat now
        self._retry_api = asyncio.Event()
        self._spare_valid_s = spare_valid_s(settings.peer_interval_s, settings.peer_probe_timeout_s)
        self._cut_after_s = cut_after_s(
            settings.self_fence_after_s,
            settings.peer_interval_s,
            settings.peer_probe_timeout_s,
            settings.heartbeat_interval_s,
        )
        # Why the quorum cannot be kept safe with these timings (then never spared), or None.
        self._quorum_off = settings.quorum_spare_off()
        self._peers_topic = peers_topic(prefix, self.node)
        self._client: aiomqtt.Client | None = None  # the live session's client, for reports
        self.prober: PeerProber | None = None
        self.endpoint: PeerEndpoint | None = None
        self._fence = FenceAction(settings.fence_command, settings.fence_action_bound_s)
        self._boot_store = BootRecordStore(settings.boot_state_dir)
        # This boot's contact, from the boot record and this process (no first contact: the
        # agent never fences).
        self._boot_contact = BootContact()
        # The first contact is in the boot record (or the fence is unarmed and has nothing to
        # record): only then is `armed` declared, and the fence deadline kept.
        self._durable = not self._fence.armed
        self._record_error: str | None = None  # why the boot record cannot be written
        self._record_unusable: str | None = None  # why the one found at start was unusable
        # The watchdog device, opened (armed) once the fence is armed in this boot.
        self._device: WatchdogDevice | None = None
        if self._fence.armed and settings.watchdog_device is not None:
            self._device = WatchdogDevice(settings.watchdog_device, settings.watchdog_timeout_s)
        self._petter: Petter | None = None
        self._device_error: str | None = None
        self._goodbye_delivered = False  # the clean stop's `offline` reached the broker
        self._boot_id: str | None = None
        self._next_seq = 0
        self._unacked: dict[int, float] = {}  # seq -> monotonic time it was handed to the broker
        self._connected = False
        self._connects = 0
        self._started_at: float | None = None
        self._last_broker_contact: float | None = None
        self._last_api_contact: float | None = None
        self._api_phase: str | None = None
        self._api_reachable: bool | None = None
        self._declared_down_phase: str | None = None
        self._declared_since: float | None = None  # when we first read this declaration
        self.declared_grace_s = declared_grace_s(
            settings.self_fence_after_s,
            settings.heartbeat_interval_s,
            settings.api_check_interval_s,
        )
        self._fence_reason: str | None = None
        self._fence_outcome: FenceOutcome | None = None
        self._would_fence_logged: str | None = None  # unarmed: the episode already reported
        # Set whenever contact (or a fence verdict) changes, so the fence timer re-arms.
        self._contact_changed = asyncio.Event()
        self._fencing = asyncio.Event()  # decided: no heartbeat may follow
        self._fenced = asyncio.Event()  # the fence action has run (whatever its result)

    # --- public ---------------------------------------------------------------------------------

    @property
    def declaration(self) -> FenceDeclaration:
        """What every heartbeat promises: armed only once contact in this boot is recorded."""
        device = self._device
        backed = self.armed and device is not None and device.is_open
        return FenceDeclaration(
            armed=self.armed,
            after_s=self._settings.self_fence_after_s,
            bound_s=self._settings.fence_action_bound_s,
            device=backed,
            watchdog_s=device.timeout_s if backed and device is not None else 0.0,
            lease_s=self._lease_s,
        )

    @property
    def _lease_s(self) -> float:
        return self._settings.self_fence_lease_s if self._lease_probe is not None else 0.0

    @property
    def armed(self) -> bool:
        return self._fence.armed and self._boot_contact.first is not None and self._durable

    async def run(self) -> None:
        """Heartbeat, probe and guard the fence until cancelled (a fenced agent stays silent)."""
        self._boot_id = read_boot_id(self._settings.boot_id_file)
        self._started_at = self._clock()
        self.resume_boot(self._boot_id, self._started_at)
        log.info(
            "agent %s starting: boot_id %s, broker %s, heartbeat every %.2fs, fence %s "
            "(after %.1fs without contact, bound %.1fs)",
            self.node,
            self._boot_id,
            self._settings.mqtt.url,
            self._settings.heartbeat_interval_s,
            ("armed" if self.armed else "armed at first contact")
            if self._fence.armed
            else "UNARMED",
            self.declaration.after_s,
            self.declaration.bound_s,
        )
        peers: list[asyncio.Task[None]] = []
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._broker_loop(), name=f"agent-broker:{self.node}")
                tg.create_task(self._fence_guard(), name=f"agent-fence:{self.node}")
                if self._api_probe is not None:
                    tg.create_task(self._api_loop(self._api_probe), name=f"agent-api:{self.node}")
                if self._peer_address is not None:
                    peers = self._start_peers(tg)
                    if self._quorum_off is not None:
                        log.warning(
                            "agent %s: no quorum before self-fencing with these timings (%s): "
                            "cut off from broker and API, it fences on its own deadline",
                            self.node,
                            self._quorum_off,
                        )
                await self._fencing.wait()
                for task in peers:  # a fencing node reports nothing more about others
                    task.cancel()
            # Fenced: every loop has ended. Stay alive and silent, so that a supervisor does
            # not restart us into heartbeating for a node the controller is resetting.
            await asyncio.Event().wait()
        finally:
            self._release_device()

    def _release_device(self) -> None:
        """Stop petting; release the fence only on a deliberate stop the broker was told about.

        Released: the device disarmed (magic close) and the boot record cleared, so the next
        agent of this boot is armed again only by its own first contact (a rollout whose new
        pod takes longer than `self_fence_after_s` to start must not fence the node), while
        the controller, reading `stopped`, no longer counts on this fence. A stop that could not
        say so (a partition, say) releases nothing: the controller may count on this fence, and
        only a successor agent that proves contact may pet the device again. A fencing agent
        never disarms it: it is the fallback of the fence.
        """
        if self._petter is not None:
            self._petter.halt()
        released = self._goodbye_delivered and not self._fencing.is_set()
        if released and self._fence.armed:
            try:
                self._boot_store.clear()
            except OSError as e:
                log.error("agent %s: boot record not cleared: %s", self.node, e)
        device = self._device
        if device is None or not device.is_open:
            return
        magic = released
        device.close(magic=magic)
        if magic:
            log.info("agent %s: watchdog device disarmed (clean stop)", self.node)
        else:
            log.warning(
                "agent %s: watchdog device left armed: it resets the node %.1fs after the last "
                "pet unless another agent of this boot proves contact",
                self.node,
                device.timeout_s,
            )

    def _start_peers(self, tg: asyncio.TaskGroup) -> list[asyncio.Task[None]]:
        assert self._boot_id is not None
        s = self._settings
        self.endpoint = PeerEndpoint(
            self.node, self._boot_id, s.peer_host, s.peer_port, cut_off=self.cut_off
        )
        self.prober = PeerProber(
            self.node,
            self._boot_id,
            interval_s=s.peer_interval_s,
            timeout_s=s.peer_probe_timeout_s,
            failures=s.peer_failures,
            refresh_s=s.peer_refresh_s,
            publish=self._publish_report,
            on_outcome=self._on_probe,
            on_round=self._probe_round,
            sweep_plan=self._sweep_plan,
            clock=self._clock,
        )
        log.info(
            "agent %s: peer probes on, endpoint %s:%d announced as %s",
            self.node,
            s.peer_host,
            s.peer_port,
            self._peer_address,
        )
        return [
            tg.create_task(self.endpoint.run(), name=f"agent-peer-endpoint:{self.node}"),
            tg.create_task(self.prober.run(), name=f"agent-peer-prober:{self.node}"),
        ]

    async def _publish_report(self, payload: bytes) -> bool:
        """Retained QoS 1 on our peers topic through the live session; False if there is none."""
        client = self._client
        if client is None or self._fencing.is_set():
            return False
        try:
            interval = self._settings.heartbeat_interval_s
            await client.publish(
                self._peers_topic, payload, qos=1, retain=True, timeout=max(1.0, 2 * interval)
            )
        except (aiomqtt.MqttError, TimeoutError) as e:
            log.warning("agent %s: peer report not published: %s", self.node, e)
            return False
        return True

    def statistics(self) -> dict[str, Any]:
        now = self._clock()
        deadline = self.deadline()
        return {
            "node": self.node,
            "boot_id": self._boot_id,
            "connected": self._connected,
            "connects": self._connects,
            "seq": self._next_seq - 1,  # last heartbeat handed to the broker; -1 before the first
            "last_broker_contact_age_s": _age(now, self._last_broker_contact),
            "last_api_contact_age_s": _age(now, self._last_api_contact),
            "api_reachable": self._api_reachable,
            "api_phase": self._api_phase,
            "fence_armed": self.armed,
            "fence_configured": self._fence.armed,
            "first_contact_age_s": _age(now, self._boot_contact.first),
            "boot_record_error": self._record_error or self._record_unusable,
            "watchdog_device": str(self._device.path) if self._device else None,
            "watchdog_armed": bool(self._device and self._device.is_open),
            "watchdog_pets": self._device.pets if self._device else 0,
            "watchdog_error": self._device_error,
            "lease_renewed_age_s": _age(now, self._lease_renewed),
            "fence_due_in_s": None
            if deadline is None or self._fencing.is_set()
            else deadline - now,
            "fencing": self._fencing.is_set(),
            "fenced": self.fenced,
            "fence_reason": self._fence_reason,
            "fence_result": self._fence_outcome.summary() if self._fence_outcome else None,
            "peer_address": self._peer_address,
            "members": self._members,
            "cut_off": self.cut_off(),
            "spared_rounds": self._spared_rounds,
            "roster": self.roster_size(),
            "sweeps": self.prober.sweeps if self.prober else 0,
            "last_sweep": {"asked": self.prober.last_sweep.asked, "cut": self.prober.last_sweep.cut}
            if self.prober is not None and self.prober.last_sweep is not None
            else None,
            "peer_targets": sorted(self.prober.targets) if self.prober else [],
            "peer_results": {t: v.value for t, v in self.prober.results().items()}
            if self.prober
            else {},
        }

    @property
    def fenced(self) -> bool:
        return self._fenced.is_set()

    async def wait_fenced(self) -> FenceOutcome:
        await self._fenced.wait()
        assert self._fence_outcome is not None
        return self._fence_outcome

    # --- broker -----------------------------------------------------------------------------

    async def _broker_loop(self) -> None:
        attempt = 0
        while not self._fencing.is_set():
            try:
                conn = broker_connection(self._settings.mqtt, self._settings.mqtt_password)
                client = aiomqtt.Client(
                    conn.address.host,
                    conn.address.port,
                    username=conn.username,
                    password=conn.password,
                    identifier=self.client_id,
                    keepalive=self._settings.mqtt.keepalive_s,
                    will=aiomqtt.Will(self._status_topic, OFFLINE, qos=1, retain=True),
                    tls_context=conn.tls_context,
                    timeout=float(self._settings.mqtt.keepalive_s),
                    socket_options=_socket_options(self._settings.mqtt.keepalive_s),
                )
                async with client:
                    attempt = 0
                    try:
                        await self._session(client)
                    except asyncio.CancelledError:
                        await self._goodbye(client, "stopping")
                        raise
                    await self._goodbye(client, "fenced")
                return
            except aiomqtt.MqttError as e:
                _reraise_cancellation(e)
                error = str(e) or type(e).__name__
            except (OSError, ValueError) as e:  # password/cert files, URL: retried, maybe fixed
                _reraise_cancellation(e)
                error = f"{type(e).__name__}: {e}"
            finally:
                self._connected = False
            if self._fencing.is_set():
                log.info("agent %s: fenced; the broker connection ended (%s)", self.node, error)
                return
            attempt += 1
            delay = reconnect_delay_s(attempt, random.random())
            log.warning(
                "agent %s: broker %s unreachable (%s); reconnect attempt %d in %.2fs",
                self.node,
                self._settings.mqtt.url,
                error,
                attempt,
                delay,
            )
            self._retry_broker.clear()
            await self._sleep_unless_fencing(delay, wake=self._retry_broker)

    async def _session(self, client: aiomqtt.Client) -> None:
        """One connection: returns only once fenced; raises MqttError when the broker is lost."""
        if self._fencing.is_set():
            return  # fenced while this connection was being made: not even `online`
        await client.subscribe(self._contact_topic, qos=0)
        if self.prober is not None:
            await client.subscribe(self._probe_topic, qos=1)  # retained: delivered at once
            await client.subscribe(self._members_topic, qos=1)
            await client.subscribe(self._roster_filter, qos=1)
        await client.publish(self._status_topic, ONLINE, qos=1, retain=True)
        self._connected = True
        self._client = client
        if self.prober is not None:
            # The broker may have restarted without our retained report: say it again.
            self.prober.republish()
        self._connects += 1
        log.info("agent %s: connected to %s", self.node, self._settings.mqtt.url)
        lost: aiomqtt.MqttError | None = None
        try:
            async with asyncio.TaskGroup() as tg:
                acks = tg.create_task(self._read_acks(client), name=f"agent-acks:{self.node}")
                await self._publish_heartbeats(client)
                acks.cancel()
        except* aiomqtt.MqttError as group:
            lost = group.exceptions[0]  # type: ignore[assignment]
        finally:
            self._client = None
        if lost is not None:
            raise lost

    async def _publish_heartbeats(self, client: aiomqtt.Client) -> None:
        """Fixed cadence from the session start: a slow publish does not shift later beats. One
        extra beat, off the cadence, when contact returns after a gap (`contact_proven`): the
        first heartbeat after a gap still reports the old contact, and the controller withdraws
        a declaration only at one that reports it fresh (decide/heartbeats.py, `contact_at`)."""
        interval = self._settings.heartbeat_interval_s
        next_at = self._clock()
        extra = False
        while not self._fencing.is_set():
            self._beat_now.clear()
            await self._publish_heartbeat(client, within_s=interval)
            if not extra:
                next_at += interval
            now = self._clock()
            if now >= next_at:  # the loop stalled past a slot: skip it, keep the phase
                skipped = int((now - next_at) // interval) + 1
                next_at += skipped * interval
                log.debug("agent %s: %d heartbeat slot(s) skipped", self.node, skipped)
            await self._sleep_unless_fencing(next_at - now, wake=self._beat_now)
            extra = self._beat_now.is_set() and self._clock() < next_at

    async def _publish_heartbeat(self, client: aiomqtt.Client, *, within_s: float) -> None:
        assert self._boot_id is not None
        # Milliseconds on this boot's monotonic clock, and never backwards within the process:
        # a restarted agent continues above its predecessor (see the module doc).
        seq = max(self._next_seq, int(self._clock() * 1000))
        self._next_seq = seq + 1  # consumed even if the publish fails: seq only moves forward
        payload = encode_heartbeat(
            Heartbeat(
                node=self.node,
                boot_id=self._boot_id,
                seq=seq,
                sent_at=time.time(),  # informational: the controller never compares clocks
                version=watchdog.__version__,
                fence=self.declaration,
                peer=self._peer_address,
                contact_age_s=self.contact_age(),
            )
        )
        self._unacked[seq] = self._clock()
        while len(self._unacked) > MAX_UNACKED:
            del self._unacked[next(iter(self._unacked))]
        await client.publish(self._heartbeat_topic, payload, qos=0, timeout=within_s)

    async def _read_acks(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            topic = message.topic.value
            if topic == self._probe_topic and self.prober is not None:
                self._probe_list(message.payload)
                continue
            if topic == self._members_topic:
                self._members_message(message.payload)
                continue
            if topic.startswith(self._roster_head):
                self._roster_message(topic, message.payload)
                continue
            if topic != self._contact_topic:
                continue
            try:
                if self._contact is BrokerContact.ECHO:
                    hb = parse_heartbeat(topic, message.payload, self._prefix)
                    boot_id, seq = hb.boot_id, hb.seq
                else:
                    ack = parse_ack(message.payload)
                    boot_id, seq = ack.boot_id, ack.seq
            except (HeartbeatRejected, AckRefused) as e:
                log.warning("agent %s: unreadable %s: %s", self.node, self._contact.value, e)
                continue
            if boot_id != self._boot_id:
                # An earlier boot's heartbeat proves nothing about this one (an echo of another
                # boot: another agent for this node, or a replay).
                log.warning("agent %s: %s of boot %s", self.node, self._contact.value, boot_id)
                continue
            self._acknowledged(seq)

    def _acknowledged(self, seq: int) -> None:
        """Our heartbeat `seq` came back (echo) or the leader heard it (leader-ack): broker
        contact, as of when we sent it."""
        sent_at = self._unacked.get(seq)
        if sent_at is None:
            return  # not ours (an earlier process of this boot), or already superseded
        for s in [s for s in self._unacked if s <= seq]:
            del self._unacked[s]
        # Stamped with the send time: the broker (or the leader) had it no earlier.
        if self._last_broker_contact is None or sent_at > self._last_broker_contact:
            self._last_broker_contact = sent_at
            self.contact_proven(sent_at)

    def _probe_list(self, payload: object) -> None:
        assert self.prober is not None
        if payload in (None, b""):
            self.prober.set_targets({})  # the list was withdrawn (our node was removed)
            return
        if not isinstance(payload, bytes):
            return
        try:
            probe_list = parse_probe_list(self._probe_topic, payload, self._prefix)
        except HeartbeatRejected as e:
            log.warning("agent %s: probe list refused: %s", self.node, e)
            return
        self.prober.set_targets(probe_list.targets)

    def _members_message(self, payload: object) -> None:
        if not isinstance(payload, bytes) or not payload:
            return  # withdrawn or not bytes: keep what we knew (a spare needs a majority of it)
        try:
            members = parse_members(payload).nodes
        except HeartbeatRejected as e:
            log.warning("agent %s: member count refused: %s", self.node, e)
            return
        if members != self._members:
            log.info("agent %s: %d nodes take part (for the quorum)", self.node, members)
        self._members = members

    def _roster_message(self, topic: str, payload: object) -> None:
        if not isinstance(payload, bytes) or not payload:
            return  # withdrawn or not bytes: keep what we knew
        try:
            shard = parse_roster_shard(topic, payload, self._prefix)
        except HeartbeatRejected as e:
            log.warning("agent %s: roster refused: %s", self.node, e)
            return
        self._roster[shard.shard] = shard.nodes

    def roster_size(self) -> int:
        return sum(len(nodes) for nodes in self._roster.values())

    def _sweep_plan(self) -> SweepPlan | None:
        """While cut off: every other node of the roster may be asked for `cut`, until a spare's
        worth answered (decide/roster.py). Not cut off, or never told the member count: no
        sweep (nothing it found could spare us)."""
        need = cut_peers_needed(self._members)
        if need is None or need == 0 or not self._roster or not self.cut_off():
            return None
        candidates = {
            name: address
            for nodes in self._roster.values()
            for name, address in nodes.items()
            if name != self.node
        }
        return SweepPlan(candidates, need)

    async def _goodbye(self, client: aiomqtt.Client, why: str) -> None:
        """Clean end of a connection, then the disconnect (no Will): retained `stopped` on a
        deliberate stop (the fence is released once the broker has it), `offline` once fenced."""
        status = STOPPED if why == "stopping" else OFFLINE
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            await client.publish(
                self._status_topic, status, qos=1, retain=True, timeout=GOODBYE_TIMEOUT_S
            )
            log.info("agent %s: published %s (%s)", self.node, status.decode(), why)
            self._goodbye_delivered = why == "stopping"
        client.timeout = GOODBYE_TIMEOUT_S  # bounds the DISCONNECT wait in __aexit__

    # --- API ---------------------------------------------------------------------------------

    async def _api_loop(self, probe: ApiProbe) -> None:
        try:
            await self._api_rounds(probe)
        finally:
            if self._lease_read is not None:
                self._lease_read.cancel()

    async def _api_rounds(self, probe: ApiProbe) -> None:
        interval = self._settings.api_check_interval_s
        next_at = self._clock()
        while not self._fencing.is_set():
            started = self._clock()
            if self._lease_s:
                self._watch_wall_clock()  # sampled every round, so a step is seen when it comes
            relaxed = max(interval, self._settings.self_fence_after_s / 2)
            declared = self._declared_down_phase is not None
            if (
                not declared
                and self._broker_fresh(started)
                and started < next_at - interval + relaxed
            ):
                # The broker just proved contact, so the API is asked only every
                # self_fence_after_s / 2 (not every interval: one GET per node per interval is
                # thousands per second on a large cluster). That still reads a FENCING
                # declaration well within the safe delay (with `echo` contact a clustered
                # broker can split so that our echo arrives but the controller hears nothing).
                await self._sleep_unless_fencing(interval)
                continue
            error: str | None = None
            phase: str | None = None
            try:
                async with asyncio.timeout(interval):
                    if self._lease_s and (declared or not self._broker_fresh(started)):
                        # At risk of fencing: read our kubelet's Lease too (`lease_deadline`),
                        # beside the Node and under a timeout of its own: a slow Lease read
                        # must not cost the Node read its contact.
                        self._spawn_lease_read(started, interval)
                    phase = await probe()
            except TimeoutError:
                error = f"no answer within {interval:.1f}s"
            except Exception as e:  # the probe's failure is an observation: API unreachable
                error = f"{type(e).__name__}: {e}"
            self._record_api(started, phase, error)
            # Declared down: look again every heartbeat interval, so that a withdrawal is seen
            # within the grace (the controller withdraws at the first heartbeat it hears that
            # reports fresh contact; we send one as soon as contact is back).
            step = interval
            if self._declared_down_phase is not None:
                step = min(interval, self._settings.heartbeat_interval_s)
            next_at += step
            now = self._clock()
            if now >= next_at:
                next_at = now + step
            self._retry_api.clear()
            await self._sleep_unless_fencing(next_at - now, wake=self._retry_api)
            if self._retry_api.is_set():
                next_at = self._clock()  # woken early: the next round counts from now

    def _spawn_lease_read(self, started: float, timeout_s: float) -> None:
        if self._lease_read is not None and not self._lease_read.done():
            return  # the previous one is still out: one at a time

        async def bounded() -> None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._read_lease(started)

        self._lease_read = asyncio.create_task(bounded(), name="lease read")

    async def _read_lease(self, started: float) -> None:
        assert self._lease_probe is not None
        self._watch_wall_clock()
        try:
            renewed_wall = await self._lease_probe()
        except Exception as e:  # unreadable: no renewal proven, the fence keeps its deadline
            if self._lease_error != str(e):
                log.warning("agent %s: cannot read this node's Lease: %s", self.node, e)
            self._lease_error = str(e)
            return
        self._lease_error = None
        if renewed_wall is None or self._watch_wall_clock():
            return
        # The renewal on our monotonic clock: as long ago as the wall clocks say (the kubelet
        # stamps renewTime on this machine's clock, which did not step meanwhile), never
        # after our request was sent.
        renewed = min(started, self._clock() - max(0.0, self._wall() - renewed_wall))
        if self._lease_renewed is None or renewed > self._lease_renewed:
            self._lease_renewed = renewed
            self._contact_changed.set()

    def _watch_wall_clock(self) -> bool:
        """True while a step of the wall clock is recent enough to lie between a renewal we
        could read and our reading of it; a step also voids the renewal already counted."""
        now = self._clock()
        offset = self._wall() - now
        if self._wall_offset is not None and abs(offset - self._wall_offset) > CLOCK_STEP_S:
            log.warning(
                "agent %s: the wall clock stepped by %.1fs: the kubelet's Lease renewals do not "
                "count for %.0fs",
                self.node,
                offset - self._wall_offset,
                self._lease_s + self._settings.self_fence_after_s,
            )
            self._clock_stepped_at = now
            self._lease_renewed = None
            self._contact_changed.set()
        self._wall_offset = offset
        stepped = self._clock_stepped_at
        # A renewal we read now was written at most lease_s + after_s ago if it still matters.
        return (
            stepped is not None
            and now - stepped < self._lease_s + self._settings.self_fence_after_s
        )

    def lease_deadline(self) -> float | None:
        """The fence may wait until then: `self_fence_lease_s` after the latest renewal of this
        node's Lease that we read. None: no renewal read (or the wait is off).

        Why: a node cut off from broker and peers but still reaching the API is alive; the
        controller declares it unreachable on the peers' word (its Lease is not stale yet),
        and withdraws at the kubelet's next renewal, up to 10 s later, after our grace.
        Waiting for it spares a healthy node its reboot.

        Why this is safe: the controller resets on our self-fence only `lease_s` plus our stop
        time after the latest renewal *it* saw (decide/safety.py, lease_gate). A renewal we
        read was written before we read it and before the controller's watch showed it, so
        we fence at the latest `lease_s` after the controller's renewal time, and the node is
        stopped before the gate ends, provided the controller's Lease watch is not far behind
        our reads, the wall clock did not step before we started, and the controller gates on
        the `lease_s` we declare: the schedules that break this are why the wait is an opt-in
        (docs/OPERATIONS.md, Self-fencing)."""
        if not self._lease_s or self._lease_renewed is None:
            return None
        return self._lease_renewed + self._lease_s

    def _broker_fresh(self, now: float) -> bool:
        last = self._last_broker_contact
        return last is not None and now - last < 2 * self._settings.heartbeat_interval_s

    def _record_api(self, started: float, phase: str | None, error: str | None) -> None:
        reachable = phase is not None
        if reachable != self._api_reachable:
            if reachable:
                log.info("agent %s: API reachable (phase %s)", self.node, phase)
            else:
                log.warning("agent %s: API unreachable: %s", self.node, error or "no phase")
        self._api_reachable = reachable
        if phase is None:
            return
        self._api_phase = phase
        if phase == UNREADABLE:
            # Reached, but it cannot tell us whether we were declared down: not contact.
            log.warning("agent %s: this node's state annotation is unreadable", self.node)
            return
        if declared_down(phase):
            if self._declared_down_phase != phase:
                if self._declared_down_phase is None:
                    self._declared_since = started
                    log.warning(
                        "agent %s: the API says this node is %s; fencing in %.1fs unless the "
                        "controller withdraws it (it does at our first heartbeat with fresh "
                        "contact)",
                        self.node,
                        phase,
                        self.declared_grace_s,
                    )
                self._declared_down_phase = phase
                self._contact_changed.set()
            return
        # Withdrawn within the grace (or unarmed: the controller may change its mind and we
        # stop reporting that we would fence).
        if self._declared_down_phase is not None:
            log.info("agent %s: the controller withdrew its declaration (%s)", self.node, phase)
        self._declared_down_phase = None
        self._declared_since = None
        # The controller does not consider us down: that is contact, as of the request's start.
        if self._last_api_contact is None or started > self._last_api_contact:
            self._last_api_contact = started
            self.contact_proven(started)

    # --- boot record ----------------------------------------------------------------------------

    def resume_boot(self, boot_id: str, now: float) -> None:
        """Continue this boot's contact from an earlier agent process, if there was one."""
        self._boot_id = boot_id
        if not self._fence.armed:
            return  # nothing promised, nothing to keep
        try:
            record = self._boot_store.load(boot_id, now)
        except BootRecordError as e:
            # We cannot tell whether an earlier process of this boot declared an armed fence.
            # Reading it as "never armed" could let a partitioned node escape a fence the
            # controller counts on; so: armed, deadline counted from now.
            log.critical(
                "agent %s: boot record unusable (%s): assuming an earlier agent of this boot "
                "was armed; fence deadline counted from now",
                self.node,
                e,
            )
            record = BootRecord(boot_id, now, now)
            self._record_unusable = str(e)
        if record is None:
            log.info("agent %s: no contact recorded in this boot yet: not armed", self.node)
            return
        self._boot_contact = BootContact(record.first_contact, record.last_contact)
        self._durable = True
        # Armed in this boot: the device too, at once (it is petted only until the deadline
        # that the record gives, so a restart without contact cannot keep the node alive).
        self._arm_device()
        log.warning(
            "agent %s: resuming this boot's fence: armed since %.1fs ago, last contact %.1fs "
            "ago (fence deadline unchanged by this restart)",
            self.node,
            now - record.first_contact,
            now - record.last_contact,
        )
        self._save_boot_record()  # rewrites an unusable record as a good one

    # --- quorum (decide/quorum.py) ----------------------------------------------------------

    def cut_off(self) -> bool:
        """What this agent answers its probers: it proved contact in this boot, and none with
        broker or API for `cut_after_s` (nor since this process started). None of its
        heartbeats reached the controller in that time either: the controller counts it silent
        (decide/quorum.py)."""
        if self._quorum_off is not None:
            return False  # nobody may count on what we would say
        age = self._since_contact()
        # No contact in this boot (None): unarmed, nothing to spare, and the controller may
        # never have heard this boot. Counting it would only hold others' resets for nothing.
        return age is not None and age >= self._cut_after_s

    def _since_contact(self) -> float | None:
        """Seconds since the latest proven contact in this boot, or since this process started
        if that is later (a restarted agent starts its count again); None: no contact yet."""
        last = self._boot_contact.last
        if last is None:
            return None
        marks = [t for t in (last, self._started_at) if t is not None]
        return self._clock() - max(marks)

    def contact_age(self) -> float | None:
        """What each heartbeat reports as `contact_age_s`: the age `cut_off` is judged on,
        rounded up to 10 ms (an older age only makes the controller count us silent sooner)
        and capped at the wire's 86,400 s."""
        age = self._since_contact()
        if age is None:
            return None
        return min(86_400.0, math.ceil(max(0.0, age) * 100) / 100)

    def _probe_round(self, started: float, cut_peers: int, live_peers: int = 0) -> None:
        """After a probe round: spared while it and the peers cut off too are a majority."""
        more_live, self._live_peers = live_peers > self._live_peers, live_peers
        cut = self.cut_off()
        if cut and more_live:
            log.info("agent %s: a peer has contact again: trying broker and API now", self.node)
            self._retry_broker.set()
            self._retry_api.set()
        if not cut or not spared(self._members, cut_peers):
            return
        if self._spared_at is None or self._spared_at + self._spare_valid_s < started:
            log.warning(
                "agent %s: cut off from broker and API, and so are %d of the peers it reached "
                "(%d nodes take part): a cluster-wide outage, not fencing while that lasts "
                "(the controller hears at most half of the nodes and holds every reset)",
                self.node,
                cut_peers,
                self._members or 0,
            )
        self._spared_at = started
        self._spared_rounds += 1
        self._contact_changed.set()

    def contact_proven(self, at: float) -> None:
        """Proven contact stamped `at`: arm at the first one, keep the latest in the record."""
        if self._boot_contact.first is None:
            log.info("agent %s: first contact in this boot", self.node)
        gap = self._since_contact()
        self._boot_contact = self._boot_contact.seen(at)
        if gap is not None and gap >= 2 * self._settings.heartbeat_interval_s:
            self._beat_now.set()  # say at once that contact is back (`_publish_heartbeats`)
        if self._fence.armed:
            self._save_boot_record()
            self._arm_device()
        self._contact_changed.set()

    def _arm_device(self) -> None:
        """Open (arm) the watchdog device once the fence is armed; retried at every contact."""
        device = self._device
        if device is None or device.is_open or not self.armed:
            return
        try:
            timeout = device.open()
        except DeviceError as e:
            if self._device_error != str(e):
                self._device_error = str(e)
                log.error(
                    "agent %s: watchdog device unavailable (%s): the fence is declared weak",
                    self.node,
                    e,
                )
            return
        self._device_error = None
        log.info(
            "agent %s: watchdog device %s armed, timeout %.1fs", self.node, device.path, timeout
        )
        if self._petter is None:
            self._petter = Petter(
                device,
                interval_s=min(self._settings.heartbeat_interval_s, timeout / 4),
                until=self.deadline,
                stopped=self._fencing.is_set,
                clock=self._clock,
            )
            self._petter.start()

    def _save_boot_record(self) -> None:
        assert self._boot_id is not None
        first, last = self._boot_contact.first, self._boot_contact.last
        assert first is not None and last is not None
        try:
            self._boot_store.save(BootRecord(self._boot_id, first, last))
        except OSError as e:
            if self._record_error != str(e):
                self._record_error = str(e)
                log.error(
                    "agent %s: cannot write the boot record %s (%s)%s",
                    self.node,
                    self._boot_store.path,
                    e,
                    "" if self._durable else ": the fence stays unarmed until it can",
                )
            return
        if not self._durable:
            log.info("agent %s: fence armed (contact recorded for this boot)", self.node)
        self._durable = True
        self._record_error = None

    # --- fence --------------------------------------------------------------------------------

    def deadline(self) -> float | None:
        """When to fence; None while not armed in this boot (the fence never runs then)."""
        if not self._durable:
            return None
        spared_at = self._spared_at
        # Spared by a majority of cut-off nodes: the deadline (and the device's petting) lasts
        # until the spare lapses, `spare_valid_s` after the round that granted it.
        return fence_at(
            self._boot_contact.deadline(self._settings.self_fence_after_s),
            None if spared_at is None else spared_at + self._spare_valid_s,
            self.lease_deadline(),
        )

    async def _fence_guard(self) -> None:
        while True:
            self._contact_changed.clear()
            now = self._clock()
            deadline = self.deadline()
            if deadline is None:
                # Not armed in this boot: no proven contact yet (or not yet recorded). The
                # controller cannot have received an armed declaration of this boot, so a fence
                # now would protect nothing; wait for contact.
                if self._declared_down_phase is not None and self._would_fence_logged != "cold":
                    self._would_fence_logged = "cold"
                    log.warning(
                        "agent %s: the API says this node is %s, but this boot has proven no "
                        "contact yet (not armed): not fencing",
                        self.node,
                        self._declared_down_phase,
                    )
                await self._contact_changed.wait()
                continue
            call = fence_call(
                now,
                deadline,
                declared_phase=self._declared_down_phase,
                declared_since=self._declared_since,
                grace_s=self.declared_grace_s,
                lease_deadline=self.lease_deadline(),
                last_contact=self._boot_contact.last,
                after_s=self.declaration.after_s,
            )
            if call.reason is not None:
                assert call.episode is not None
                if await self._fence_now(call.reason, call.episode):
                    return
                wait: float | None = None  # unarmed: nothing to do until contact changes
            else:
                assert call.wake_at is not None
                wait = call.wake_at - now
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._contact_changed.wait()

    async def _fence_now(self, reason: str, episode: str) -> bool:
        """Run the fence; True once fenced. Unarmed: log once per episode, False."""
        if not self._fence.armed:
            if self._would_fence_logged != episode:
                self._would_fence_logged = episode
                log.error(
                    "agent %s: WOULD FENCE NOW (%s) but the fence is unarmed (no fence_command)",
                    self.node,
                    reason,
                )
            return False
        log.critical(
            "agent %s: SELF-FENCING: %s; running %r", self.node, reason, self._fence.command
        )
        # Stop claiming to be alive before the action runs: no heartbeat may follow a fence.
        self._fence_reason = reason
        self._fencing.set()
        outcome = await self._fence.run_within_bound(reason, self._clock)
        self._fence_outcome = outcome
        self._fenced.set()
        if outcome.succeeded:
            log.critical("agent %s: fence action done in %.2fs", self.node, outcome.duration_s)
        else:
            device = self._device
            fallback = (
                f"the watchdog device resets the node within {device.timeout_s:.1f}s"
                if device is not None and device.is_open
                else "no watchdog device: this node may still run VMs that the controller "
                "will start elsewhere"
            )
            log.critical(
                "agent %s: FENCE ACTION FAILED (%s) after %d attempt(s); output: %s. %s.",
                self.node,
                outcome.summary(),
                outcome.attempts,
                outcome.output.strip() or "-",
                fallback,
            )
        return True

    async def _sleep_unless_fencing(
        self, seconds: float, *, wake: asyncio.Event | None = None
    ) -> None:
        """Sleep `seconds`, or less: until fencing, or until `wake` is set."""
        if seconds <= 0:
            return
        if wake is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._fencing.wait()
            return
        waits = [asyncio.ensure_future(self._fencing.wait()), asyncio.ensure_future(wake.wait())]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()


def read_boot_id(path: Path) -> str:
    """This boot's id (a new one proves a reboot); a missing file is a configuration error."""
    boot_id = path.read_text().strip()
    if not boot_id:
        raise ValueError(f"boot id file {path} is empty")
    return boot_id


def _reraise_cancellation(error: BaseException) -> None:
    """Keep a cancellation that a failing disconnect replaced (aiomqtt's `__aexit__` raises
    MqttError when the DISCONNECT times out, e.g. on a partition while we are stopping)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from error


def _socket_options(keepalive_s: int) -> tuple[tuple[int, int, int], ...]:
    """Linux: abort the connection when sent data stays unacknowledged for a keepalive.

    Without it, heartbeats queued in the kernel during a partition would be delivered when it
    heals, long after they were sent, and look fresh to the controller (it stamps arrival).
    """
    if not hasattr(socket, "TCP_USER_TIMEOUT"):
        return ()
    return ((socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, keepalive_s * 1000),)


def _age(now: float, then: float | None) -> float | None:
    return None if then is None else max(0.0, now - then)
