"""Simulated agents for the ingest benchmark: raw MQTT 3.1.1 publishers, many nodes per
connection.

A real agent is one aiomqtt client per node. Thousands of those in one benchmark process would
measure paho's Python per-message cost in the *load generator*, on the same two cores as the
controller under test. So the load is generated the cheap way: a few TCP connections speaking
MQTT 3.1.1 directly (CONNECT, QoS 0 PUBLISH, PINGREQ), each carrying the heartbeats of many
nodes on their own topics (`<prefix>/heartbeat/<node>`) plus each node's retained `online`
status, with the heartbeats of one 10 ms slot written in one `write()`. Payloads come from
`encode_heartbeat` (a template with the sequence number and send time substituted), so the
controller parses and validates exactly what a real agent sends.

What this does not model: one connection, Last Will and keepalive per agent (a killed node
here simply stops publishing, as after a power-off before the broker's keepalive expires; the
Will path is covered by the service tests), TLS and per-agent ACLs.

Must not: import the controller's runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from watchdog.decide.heartbeats import Heartbeat, encode_heartbeat, heartbeat_topic, status_topic
from watchdog.decide.observations import FenceDeclaration
from watchdog.decide.peer_probe import PeerView
from watchdog.decide.peer_reports import PeerReport, encode_report, peers_topic
from watchdog.transport.mqtt_link import encode_connect, encode_publish

log = logging.getLogger(__name__)

SLOTS_PER_SECOND = 100  # heartbeats of one second are spread over 100 writes
_SEQ_MARK = 987654321987
_SENT_MARK = 1234567.25


PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"


def _peer_address(node: str) -> str:
    return f"127.0.0.1:{20000 + zlib.crc32(node.encode()) % 40000}"


class HeartbeatTemplate:
    """`encode_heartbeat` of one node with the seq and sent_at fields left to fill in."""

    def __init__(
        self,
        node: str,
        boot_id: str,
        fence: FenceDeclaration,
        version: str,
        peer: str | None = None,
    ) -> None:
        doc = encode_heartbeat(
            Heartbeat(node, boot_id, _SEQ_MARK, _SENT_MARK, version, fence, peer=peer)
        )
        head, rest = doc.split(str(_SEQ_MARK).encode(), 1)
        middle, tail = rest.split(repr(_SENT_MARK).encode(), 1)
        self._head, self._middle, self._tail = head, middle, tail

    def payload(self, seq: int, sent_at: float) -> bytes:
        return b"%s%d%s%.3f%s" % (self._head, seq, self._middle, sent_at, self._tail)


@dataclass
class _Node:
    name: str
    topic: bytes
    template: HeartbeatTemplate
    seq: int = 0
    last_sent: float | None = None  # monotonic


@dataclass
class LoadStats:
    published: int = 0
    ticks: int = 0
    late_ticks: int = 0  # ticks that ran more than one slot late
    max_lag_s: float = 0.0
    lags: list[float] = field(default_factory=list)  # per late tick


class Publisher:
    """One MQTT connection publishing 1 Hz heartbeats for `nodes` until `stop()`.

    `kill(node)` stops that node's heartbeats for good (its last send time is kept).
    """

    def __init__(
        self,
        host: str,
        port: int,
        nodes: Sequence[str],
        *,
        index: int,
        prefix: str,
        fence: FenceDeclaration,
        interval_s: float = 1.0,
        keepalive_s: int = 60,
    ) -> None:
        self.host, self.port = host, port
        self.index = index
        self.prefix = prefix
        self.interval_s = interval_s
        self.keepalive_s = keepalive_s
        self.nodes = {
            n: _Node(
                n,
                heartbeat_topic(prefix, n).encode(),
                # A probe address, as a real agent announces it: the leader builds its probe
                # ring from these (nothing listens there; the simulated peers report instead).
                HeartbeatTemplate(n, str(uuid.uuid4()), fence, "bench", _peer_address(n)),
            )
            for n in nodes
        }
        # Node i of this connection sends in slot (hash of its position) of every interval.
        self._slots: list[list[_Node]] = [[] for _ in range(SLOTS_PER_SECOND)]
        for i, node in enumerate(self.nodes.values()):
            self._slots[(i * 37 + index * 13) % SLOTS_PER_SECOND].append(node)
        self.killed: set[str] = set()
        self.stats = LoadStats()
        self._writer: asyncio.StreamWriter | None = None

    def kill(self, node: str) -> float | None:
        """Stop `node`'s heartbeats; returns the monotonic time of its last one."""
        self.killed.add(node)
        return self.nodes[node].last_sent

    def inject(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """One extra message on this connection, now (between heartbeat ticks)."""
        if self._writer is not None:
            self._writer.write(encode_publish(topic.encode(), payload, retain=retain))

    def last_sent(self, node: str) -> float | None:
        return self.nodes[node].last_sent

    async def run(self) -> None:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        self._writer = writer
        writer.write(
            encode_connect(f"bench-agents-{self.index}-{uuid.uuid4().hex[:6]}", 60, None, None)
        )
        await writer.drain()
        connack = await reader.readexactly(4)
        if connack[0] != 0x20 or connack[3] != 0:
            raise ConnectionError(f"broker refused the connection: {connack!r}")
        status = bytearray()
        for n in self.nodes:
            status += encode_publish(status_topic(self.prefix, n).encode(), b"online", retain=True)
        writer.write(bytes(status))
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(_discard(reader), name=f"publisher {self.index} reader")
                await self._publish(writer)
        finally:
            with contextlib.suppress(Exception):
                writer.write(DISCONNECT)
                writer.close()

    async def _publish(self, writer: asyncio.StreamWriter) -> None:
        slot_s = self.interval_s / SLOTS_PER_SECOND
        start = time.monotonic()
        tick = 0
        last_ping = start
        while True:
            due = start + tick * slot_s
            now = time.monotonic()
            if due > now:
                await asyncio.sleep(due - now)
                now = time.monotonic()
            lag = now - due
            if lag > slot_s:
                self.stats.late_ticks += 1
                self.stats.lags.append(lag)
                self.stats.max_lag_s = max(self.stats.max_lag_s, lag)
            wall = time.time()
            buf = bytearray()
            for node in self._slots[tick % SLOTS_PER_SECOND]:
                if node.name in self.killed:
                    continue
                node.seq += 1
                buf += encode_publish(node.topic, node.template.payload(node.seq, wall))
                node.last_sent = now
                self.stats.published += 1
            if now - last_ping > self.keepalive_s / 2:
                buf += PINGREQ
                last_ping = now
            if buf:
                writer.write(bytes(buf))
                await writer.drain()
            self.stats.ticks += 1
            tick += 1


async def _discard(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


class AgentFleet:
    """N simulated agents over `connections` publishers. `run()` until cancelled."""

    def __init__(
        self,
        broker_url: str,
        nodes: Sequence[str],
        *,
        connections: int,
        prefix: str = "node-watchdog/v1",
        fence: FenceDeclaration | None = None,
        interval_s: float = 1.0,
    ) -> None:
        hostport = broker_url.split("://", 1)[1].rstrip("/")
        host, _, port = hostport.rpartition(":")
        fence = fence or FenceDeclaration(armed=True, after_s=8.0, bound_s=5.0)
        connections = max(1, min(connections, len(nodes)))
        self.publishers = [
            Publisher(
                host,
                int(port),
                nodes[i::connections],
                index=i,
                prefix=prefix,
                fence=fence,
                interval_s=interval_s,
            )
            for i in range(connections)
        ]
        self._by_node = {n: p for p in self.publishers for n in p.nodes}
        self.prefix = prefix
        # Peer reports the simulated agents published: observer → (boot id, seq, results).
        self._reports: dict[str, tuple[str, int, dict[str, PeerView]]] = {}

    def report_peer(self, observer: str, target: str, view: PeerView) -> None:
        """What the real prober publishes (heartbeat/peers.py) when a verdict changes: the
        observer's whole result set, retained, on its own topic."""
        boot_id, seq, results = self._reports.get(observer, (str(uuid.uuid4()), 0, {}))
        results = {**results, target: view}
        seq += 1
        self._reports[observer] = (boot_id, seq, results)
        report = PeerReport(observer, boot_id, seq, time.time(), results)
        self._by_node[observer].inject(
            peers_topic(self.prefix, observer), encode_report(report), retain=True
        )

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for p in self.publishers:
                tg.create_task(p.run(), name=f"publisher {p.index}")

    def kill(self, node: str) -> float | None:
        return self._by_node[node].kill(node)

    def last_sent(self, node: str) -> float | None:
        return self._by_node[node].last_sent(node)

    @property
    def published(self) -> int:
        return sum(p.stats.published for p in self.publishers)

    def lag_summary(self) -> dict[str, float]:
        late = sum(p.stats.late_ticks for p in self.publishers)
        ticks = sum(p.stats.ticks for p in self.publishers)
        return {
            "ticks": ticks,
            "late_ticks": late,
            "late_fraction": round(late / ticks, 4) if ticks else 0.0,
            "max_lag_s": round(max((p.stats.max_lag_s for p in self.publishers), default=0.0), 3),
        }
