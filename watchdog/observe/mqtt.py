"""The controller's MQTT subscriber: agents' heartbeats and status into the HeartbeatBook.

Owns two broker connections, made and lost together: the ingest link (transport/mqtt_link.py,
client id `watchdog_controller_<host>_<pid>_ingest`) subscribed to `<prefix>/heartbeat/+`
(QoS 0), `<prefix>/status/+` (QoS 1, retained `online` / Will `offline`: on the same connection
as the heartbeats, so that the broker's order between an agent's heartbeats and its status is
the order they are handled in) and its own echo topic, and an aiomqtt client (client id
`watchdog_controller_<host>_<pid>`) subscribed to `<prefix>/peers/+` (QoS 1, retained peer
reports, into the PeerBook), which also carries the leader's retained publishes. The
ids are unique per process, so two replicas never take over each other's session, and never a
node name, the client id the broker gives each agent, so no agent can take them over. Every
message is validated (decide/heartbeats.py, decide/peer_reports.py, DESIGN §9); a rejection is
counted and reported through `on_reject` / `on_peer_reject`, never raised. It also carries the
leader's retained probe lists out (`publish_retained`: latest per topic wins, re-sent by the
caller after a reconnection), and, while `acks_when()` says so (the runtime: while this replica
holds the leader Lease), acknowledges every heartbeat it accepted on `<prefix>/ack/<node>`:
that acknowledgement is the agent's only proof of broker contact (decide/acks.py). The state
of the connection itself is
reported through `on_connection`: the controller turns "down" into UNKNOWN heartbeats and holds
resets (a lost broker is not evidence that nodes died).

Ingest lag: every `echo_interval_s` the subscriber publishes a probe to
`<prefix>/echo/<ingest client id>` and reads it back on the ingest link (decide/ingest_lag.py).
While the oldest unanswered probe is older than `max_lag_s`, heartbeats wait in our own backlog
and their ages say nothing about the nodes: `on_lag(True)` tells the controller to treat them
as UNKNOWN until the echo is prompt again (`on_lag(False)`).

Ingest path: every heartbeat and status is handled where the ingest link parses it, many per
socket read, in slices, and the acknowledgements of a slice go out in one write; peer reports
are handled where paho-mqtt parses them (`_Dispatch`, given to aiomqtt as its queue type, hands
each message to `_handle` synchronously instead of queueing it for a task). No task, future or
queue entry per message; what the link has read but not yet handled (at most one socket read)
waits in its backlog, and its age counts toward the ingest lag. Backpressure is therefore the
connections' own: a subscriber that reads slower than heartbeats arrive leaves them in the
socket and the broker, in order, where the echo above measures it.
It must not decide anything: it records what it saw, when it saw it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiomqtt

from watchdog.decide.acks import encode_ack
from watchdog.decide.heartbeats import (
    Heartbeat,
    HeartbeatBook,
    HeartbeatRejected,
    RejectReason,
    parse_heartbeat,
)
from watchdog.decide.ingest_lag import EchoBook
from watchdog.decide.mqtt_url import BrokerSettings, reconnect_delay_s
from watchdog.decide.peer_reports import PeerBook, parse_report
from watchdog.transport.mqtt import broker_connection
from watchdog.transport.mqtt_link import IngestLink, LinkError, encode_publish

log = logging.getLogger(__name__)

ONLINE = b"online"
OFFLINE = b"offline"
STOPPED = b"stopped"  # an agent's deliberate stop: it released its fence
# How long a stopping subscriber waits for the broker to take its DISCONNECT.
GOODBYE_TIMEOUT_S = 1.0
# At most one log line per rejection reason (and one for queue overflow) per this many seconds.
LOG_EVERY_S = 10.0


class SubscriberSettings(Protocol):
    """What the subscriber reads of the runtime's `Settings` (satisfied structurally)."""

    @property
    def mqtt(self) -> BrokerSettings: ...
    def mqtt_password(self) -> str | None: ...


class _Dispatch(asyncio.Queue[aiomqtt.Message]):
    """aiomqtt's `queue_type`: `put_nowait` (called by aiomqtt for every message, from paho's
    read callback on the event loop) hands the message straight to `handler`; nothing is ever
    queued, so aiomqtt's message iterator only ever ends, on a lost connection. Subclassed per
    subscriber with `handler` set (see `_dispatch_to`)."""

    handler: Callable[[aiomqtt.Message], None]

    def put_nowait(self, item: aiomqtt.Message) -> None:
        type(self).handler(item)


def _dispatch_to(
    handler: Callable[[aiomqtt.Message], None],
) -> type[asyncio.Queue[aiomqtt.Message]]:
    class _Queue(_Dispatch):
        pass

    _Queue.handler = staticmethod(handler)
    return _Queue


@dataclass(slots=True)
class _RateLimitedLog:
    """One line per key per window, saying how many were not logged in between."""

    every_s: float
    last: dict[str, float] = field(default_factory=dict)
    suppressed: collections.Counter[str] = field(default_factory=collections.Counter)

    def __call__(
        self, key: str, now: float, level: int, msg: str, *args: object, exc_info: bool = False
    ) -> None:
        if now - self.last.get(key, -self.every_s) < self.every_s:
            self.suppressed[key] += 1
            return
        self.last[key] = now
        more = self.suppressed.pop(key, 0)
        if more:
            msg += " (and %d more since the last report)"
            args = (*args, more)
        log.log(level, msg, *args, exc_info=exc_info)


class HeartbeatSubscriber:
    """Feeds a HeartbeatBook from the broker; `run()` until cancelled, `statistics()` any time."""

    def __init__(
        self,
        settings: SubscriberSettings,
        book: HeartbeatBook,
        *,
        on_change: Callable[[str], None],
        on_connection: Callable[[bool], None],
        on_reject: Callable[[RejectReason], None],
        on_lag: Callable[[bool, float], None] | None = None,
        echo_interval_s: float = 0.5,
        max_lag_s: float = 1.0,
        peers: PeerBook | None = None,
        on_peers: Callable[[str, set[str]], None] | None = None,
        on_peer_reject: Callable[[RejectReason], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._book = book
        self._peers = peers
        self._on_peers = on_peers
        self._on_peer_reject = on_peer_reject
        self._outbox: dict[str, bytes] = {}  # topic → latest payload to publish, retained
        self._outbox_ready = asyncio.Event()
        self._peer_reports = 0
        self._on_change = on_change
        self._on_connection = on_connection
        self._on_reject = on_reject
        self._clock = clock
        prefix = settings.mqtt.topic_prefix
        self._prefix = prefix
        self._heartbeat_head = f"{prefix}/heartbeat/"
        self._status_head = f"{prefix}/status/"
        self._peers_head = f"{prefix}/peers/"
        self._ack_head = f"{prefix}/ack/"
        # Whether this replica acknowledges the heartbeats it accepts (decide/acks.py): set by
        # the runtime to "holds the leader Lease", so that only the leader's hearing counts as
        # an agent's broker contact. None: never (a standby, a test of ingest alone).
        self.acks_when: Callable[[], bool] | None = None
        self._link: IngestLink | None = None
        self._acks_pending: list[bytes] = []  # encoded PUBLISH packets of this read
        self._acks = 0
        self._acks_unsent = 0
        self.client_id = f"watchdog_controller_{socket.gethostname()}_{os.getpid()}"
        self.ingest_id = f"{self.client_id}_ingest"
        # The ACL lets every client write echo/<its client id> (deploy/base/broker/acl).
        self._echo_topic = f"{prefix}/echo/{self.ingest_id}"
        self._on_lag = on_lag
        self._echo_interval_s = echo_interval_s
        self._max_lag_s = max_lag_s
        self._echoes = EchoBook(max_lag_s)
        self._lagging = False
        self._lag_episodes = 0
        self._queue_type = _dispatch_to(self._dispatch)
        self._client: aiomqtt.Client | None = None
        self._connected = False
        self._connected_since: float | None = None
        self._connects = 0
        self._attempt = 0
        self._messages = 0
        self._handler_errors = 0
        self._accepted = 0
        self._statuses = 0
        self._rejected: collections.Counter[RejectReason] = collections.Counter()
        self._log_limited = _RateLimitedLog(LOG_EVERY_S)

    # --- public ---------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            while True:
                error = await self._connection()
                self._set_connected(False)  # before any reconnect attempt: heartbeats UNKNOWN
                self._attempt += 1
                delay = reconnect_delay_s(self._attempt, random.random())
                log.warning(
                    "heartbeat subscriber: broker %s unreachable (%s); reconnect attempt %d "
                    "in %.2fs",
                    self._settings.mqtt.url,
                    error,
                    self._attempt,
                    delay,
                )
                await asyncio.sleep(delay)
        finally:
            self._set_connected(False)

    def statistics(self) -> dict[str, Any]:
        now = self._clock()
        return {
            "client_id": self.client_id,
            "ingest_id": self.ingest_id,
            "ingest_reads": self._link.reads if self._link is not None else None,
            "connected": self._connected,
            "connected_for_s": None
            if self._connected_since is None
            else now - self._connected_since,
            "connects": self._connects,
            "reconnect_attempt": self._attempt,
            "messages": self._messages,
            "accepted": self._accepted,
            "statuses": self._statuses,
            "rejected": {reason.value: n for reason, n in self._rejected.items()},
            "rejected_total": sum(self._rejected.values()),
            "peer_reports": self._peer_reports,
            "acks": self._acks,
            "acks_unsent": self._acks_unsent,
            "outbox": len(self._outbox),
            "handler_errors": self._handler_errors,
            "ingest_lag_s": self._echoes.lag_s(now),
            "lagging": self._lagging,
            "lag_episodes": self._lag_episodes,
            "echo_rtt_s": self._echoes.last_rtt_s,
            "echoes_lost": self._echoes.lost,
        }

    @property
    def connected(self) -> bool:
        return self._connected

    def publish_retained(self, topic: str, payload: bytes) -> None:
        """Queue a retained QoS 1 publish; a later one for the same topic replaces it. Sent
        while connected; kept (not re-sent) across a reconnection: the caller decides."""
        self._outbox[topic] = payload
        self._outbox_ready.set()

    def clear_outbox(self) -> None:
        self._outbox.clear()

    # --- connection ------------------------------------------------------------------------------

    async def _connection(self) -> str:
        """One pair of connections, until either fails; returns why."""
        try:
            conn = broker_connection(self._settings.mqtt, self._settings.mqtt_password)
            keepalive = self._settings.mqtt.keepalive_s
            client = aiomqtt.Client(
                conn.address.host,
                conn.address.port,
                username=conn.username,
                password=conn.password,
                identifier=self.client_id,
                keepalive=keepalive,
                tls_context=conn.tls_context,
                timeout=float(keepalive),
                queue_type=self._queue_type,
            )
            async with client:
                if self._peers is not None:
                    await client.subscribe(self._peers_head + "+", qos=1)
                link = IngestLink(
                    host=conn.address.host,
                    port=conn.address.port,
                    tls=conn.tls_context,
                    client_id=self.ingest_id,
                    username=conn.username,
                    password=conn.password,
                    keepalive_s=keepalive,
                    # Status with the heartbeats, on one connection: the broker keeps their
                    # order, so an agent's last heartbeat can never be handled after its
                    # `stopped` or its Will (which would declare a released fence again).
                    filters=[
                        (self._heartbeat_head + "+", 0),
                        (self._status_head + "+", 1),
                        (self._echo_topic, 0),
                    ],
                    on_message=self._guarded,
                    on_batch_end=self._batch_end,
                    clock=self._clock,
                )
                try:
                    await link.open()
                    return await self._connected_pair(client, link)
                finally:
                    link.close()
        except aiomqtt.MqttError as e:
            _reraise_cancellation(e)
            return str(e) or type(e).__name__
        except LinkError as e:
            return f"ingest link: {e}"
        except (OSError, ValueError) as e:  # password/cert files, URL: retried, maybe fixed
            _reraise_cancellation(e)
            return f"{type(e).__name__}: {e}"
        finally:
            self._client = None
            self._link = None
            self._flush_acks()  # counted as unsent: no acknowledgement outlives its connection

    async def _connected_pair(self, client: aiomqtt.Client, link: IngestLink) -> str:
        self._client = client
        self._link = link
        self._attempt = 0
        self._echoes = EchoBook(self._max_lag_s)
        self._set_connected(True)
        echo = asyncio.create_task(self._echo_loop(link), name="ingest echo")
        sender = asyncio.create_task(self._send_outbox(client), name="probe lists out")
        # Status and peer reports are handled as they are read (_dispatch): the iterator
        # yields nothing and ends (raises) with the connection.
        reader = asyncio.create_task(self._drain(client), name="peer reports in")
        try:
            either: set[asyncio.Future[Any]] = {reader, link.closed}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if reader.done():
                reader.result()  # raises the MqttError that ended it
                return "message stream ended"  # pragma: no cover - aiomqtt raises instead
            return f"ingest link: {link.closed.result()}"
        except asyncio.CancelledError:
            client.timeout = GOODBYE_TIMEOUT_S  # bounds the DISCONNECT wait on the way out
            raise
        finally:
            echo.cancel()
            reader.cancel()
            self._set_lagging(False, 0.0)  # a new connection measures afresh
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await sender
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await reader

    async def _drain(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            self._dispatch(message)  # pragma: no cover - _Dispatch queues nothing

    async def _send_outbox(self, client: aiomqtt.Client) -> None:
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            while self._outbox:
                topic = next(iter(self._outbox))
                payload = self._outbox.pop(topic)
                try:
                    await client.publish(topic, payload, qos=1, retain=True)
                except aiomqtt.MqttError:
                    # Lost connection: the message loop notices too. Keep it unless replaced.
                    self._outbox.setdefault(topic, payload)
                    return

    def _set_connected(self, up: bool) -> None:
        if up == self._connected:
            return
        self._connected = up
        if up:
            self._connects += 1
            self._connected_since = self._clock()
            url = self._settings.mqtt.url
            log.info("heartbeat subscriber: connected to %s as %s", url, self.client_id)
        else:
            self._connected_since = None
            log.warning("heartbeat subscriber: broker connection lost: heartbeats are UNKNOWN")
        self._on_connection(up)

    # --- messages --------------------------------------------------------------------------------

    def _dispatch(self, message: aiomqtt.Message) -> None:
        """Called inside paho's read callback (peer reports)."""
        payload = message.payload
        if not isinstance(payload, bytes):  # paho delivers bytes; anything else is not ours
            payload = b"" if payload is None else str(payload).encode()
        self._guarded(message.topic.value, payload)

    def _guarded(self, topic: str, payload: bytes) -> None:
        """Called inside a connection's read callback: an exception here would end the
        connection, so a bug in handling one message is logged and counted, and the next one is
        read."""
        try:
            self._handle(topic, payload)
        except Exception:
            self._handler_errors += 1
            self._log_limited(
                "handler-error",
                self._clock(),
                logging.ERROR,
                "heartbeat subscriber: handling a message on %r failed",
                topic[:160],
                exc_info=True,
            )

    def _handle(self, topic: str, payload: bytes) -> None:
        self._messages += 1
        now = self._clock()
        if topic.startswith(self._heartbeat_head):
            try:
                hb = parse_heartbeat(topic, payload, self._prefix)
                self._book.accept(hb, now)
            except HeartbeatRejected as e:
                self._reject(e.reason, e.detail, topic, now)
                return
            self._accepted += 1
            self._on_change(hb.node)
            if self.acks_when is not None and self.acks_when():
                self._ack(hb)
        elif topic.startswith(self._status_head):
            self._handle_status(topic[len(self._status_head) :], payload, topic, now)
        elif topic == self._echo_topic:
            try:
                self._echoes.answer(int(payload[:20]), now)
            except ValueError:
                return
            self._check_lag(now)
        elif topic.startswith(self._peers_head) and self._peers is not None:
            self._handle_peers(topic, payload, now)
        else:  # our subscriptions cannot deliver this; a broker bug is still not trusted
            self._reject(RejectReason.TOPIC_MISMATCH, "unexpected topic", topic, now)

    def _ack(self, hb: Heartbeat) -> None:
        """Tell the agent its heartbeat was heard (QoS 0; a lost one costs it one interval of
        contact, which the quorum timings allow for). The acknowledgements of one socket read
        go out in one write at its end (`_flush_acks`, the link's `on_batch_end`)."""
        ack = encode_ack(hb.seq, hb.boot_id)
        self._acks_pending.append(encode_publish(self._ack_head + hb.node, ack))

    def _batch_end(self) -> None:
        """After each slice the link handled: its acknowledgements out in one write, and the
        lag of what it read but has not handled yet looked at (`IngestLink.pending_age`)."""
        self._flush_acks()
        if self._link is not None and self._link.pending_age(self._clock()) > 0.0:
            self._check_lag(self._clock())

    def _flush_acks(self) -> None:
        pending, self._acks_pending = self._acks_pending, []
        if not pending:
            return
        link = self._link
        if link is not None and link.publish(b"".join(pending)):
            self._acks += len(pending)
        else:  # the connection went: these agents hear nothing, as they should not
            self._acks_unsent += len(pending)

    # --- ingest lag ------------------------------------------------------------------------------

    async def _echo_loop(self, link: IngestLink) -> None:
        warned = False
        while True:
            now = self._clock()
            seq = self._echoes.sent(now)
            if not link.publish(encode_publish(self._echo_topic, str(seq).encode())):
                return  # the connection is going down; its reader reports it
            self._check_lag(now)
            if not warned and self._echoes.unsupported(now):
                warned = True
                log.warning(
                    "heartbeat subscriber: no echo came back on %s in %.0fs: ingest lag is not "
                    "measured (does the broker ACL let this client write it?)",
                    self._echo_topic,
                    self._echoes.unsupported_after_s,
                )
            await asyncio.sleep(self._echo_interval_s)

    def _check_lag(self, now: float) -> None:
        link = self._link
        lag = max(self._echoes.lag_s(now), link.pending_age(now) if link is not None else 0.0)
        # Hysteresis: lagging above the bound, caught up only below half of it. A probe the
        # broker dropped means it drops heartbeats too: blind for a while (decide/ingest_lag.py).
        lagging = (
            lag > self._max_lag_s
            or (self._lagging and lag > self._max_lag_s / 2)
            or self._echoes.dropping(now)
        )
        self._set_lagging(lagging, lag)

    def ingest_lagging(self) -> bool:
        """Now, from the clock: the controller asks before every decision, because after a
        stall of the event loop its timers can run before this subscriber sees any echo."""
        if not self._connected:
            return False  # a lost connection is reported as such (on_connection)
        now = self._clock()
        link = self._link
        pending = link.pending_age(now) if link is not None else 0.0
        return self._lagging or self._echoes.lagging(now) or pending > self._max_lag_s

    def _set_lagging(self, lagging: bool, lag_s: float) -> None:
        if self._on_lag is not None:
            self._on_lag(lagging, lag_s)
        if lagging == self._lagging:
            return
        self._lagging = lagging
        if lagging:
            self._lag_episodes += 1
            if self._echoes.dropping(self._clock()):
                log.warning(
                    "heartbeat subscriber: the broker dropped messages to this subscriber (an "
                    "echo probe was lost; %d so far): heartbeats are UNKNOWN for %.0fs after the "
                    "last loss",
                    self._echoes.lost,
                    self._echoes.loss_blind_s,
                )
            else:
                log.warning(
                    "heartbeat subscriber: ingest %.1fs behind the broker (over %.1fs): "
                    "heartbeats are UNKNOWN until it catches up",
                    lag_s,
                    self._max_lag_s,
                )
        else:
            log.info("heartbeat subscriber: ingest caught up with the broker")

    @property
    def lagging(self) -> bool:
        return self._lagging

    def _handle_status(self, node: str, payload: bytes, topic: str, now: float) -> None:
        if payload == b"":
            return  # a retained status being cleared: a statement about nothing
        if payload not in (ONLINE, OFFLINE, STOPPED):
            self._reject(RejectReason.MALFORMED, f"status {payload[:32]!r}", topic, now)
            return
        released = payload == STOPPED
        if self._book.status(node, payload == ONLINE, self._clock(), released=released) is None:
            self._reject(RejectReason.UNKNOWN_NODE, f"status of {node[:64]!r}", topic, now)
            return
        self._statuses += 1
        self._on_change(node)

    def _handle_peers(self, topic: str, payload: bytes, now: float) -> None:
        assert self._peers is not None
        if payload == b"":
            return  # a retained report being cleared
        try:
            report = parse_report(topic, payload, self._prefix)
            targets = self._peers.accept(report, now, self._book.known)
        except HeartbeatRejected as e:
            if self._on_peer_reject is not None:
                self._on_peer_reject(e.reason)
            self._log_limited(
                f"peers-{e.reason.value}",
                now,
                logging.WARNING,
                "heartbeat subscriber: rejected peer report on %r: %s: %s",
                topic[:160],
                e.reason.value,
                e.detail[:160],
            )
            return
        if targets is None:
            return  # the retained copy of a report we already have
        self._peer_reports += 1
        if self._on_peers is not None:
            self._on_peers(report.node, targets)

    def _reject(self, reason: RejectReason, detail: str, topic: str, now: float) -> None:
        self._rejected[reason] += 1
        self._on_reject(reason)
        self._log_limited(
            reason.value,
            now,
            logging.WARNING,
            "heartbeat subscriber: rejected message on %r: %s: %s",
            topic[:160],
            reason.value,
            detail[:160],
        )


def _reraise_cancellation(error: BaseException) -> None:
    """Keep a cancellation that a failing disconnect replaced (aiomqtt's `__aexit__` raises
    MqttError when the DISCONNECT times out, e.g. on a partition while we are stopping)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from error
