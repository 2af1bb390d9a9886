"""The controller's heartbeat ingest connection: a minimal MQTT 3.1.1 client that reads many
packets per socket read.

Why not paho-mqtt here: paho reads a packet's fixed header a byte per `recv`, builds an
`MQTTMessage` and walks its callbacks for every packet, which at 5,000 heartbeats/s was most of
the controller's CPU (docs/PERFORMANCE.md, "Ingest link"). This link is an asyncio `Protocol`:
each `data_received` chunk is split into packets in one pass, and the PUBLISH packets are handed
to `on_message` synchronously, `SLICE` at a time: between two slices the link stops reading and
lets the event loop run (timers, the scheduler, the ingest-lag echo, which a long slice of a
busy read would otherwise hold up), then goes on. The acknowledgements and echoes it sends are
QoS 0 PUBLISH packets written in batches (`on_batch_end` after each slice). Everything else
(peer reports, retained probe lists, QoS 1 publishes) stays on the aiomqtt connection, where its
features are needed.

What it does: CONNECT (client id, clean session, keepalive, username/password, TLS through the
event loop's ssl), one SUBSCRIBE of filters of QoS 0 or 1 (a refused filter is an error),
PINGREQ every half keepalive, and a close when nothing at all arrived for 1.5 x keepalive (a
black-holed broker). It accepts PUBLISH of QoS 0 and 1 (acknowledged), also between SUBSCRIBE
and SUBACK as MQTT allows, PINGRESP, and nothing else. A packet above
`MAX_PACKET_BYTES` or one it cannot parse closes the connection (the caller reconnects).

Backpressure is the socket's: reading pauses while a read's messages are being handled, so a
controller that handles slower than heartbeats arrive leaves them in the kernel and the broker,
in order, where the ingest-lag echo measures it (decide/ingest_lag.py). Must not decide
anything.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
import struct
from collections.abc import Callable, Iterable

# The shipped broker's max_packet_size (deploy/base/broker/mosquitto.conf): nothing larger can
# come from it, so anything larger is not a packet of ours.
MAX_PACKET_BYTES = 65_536

# Messages handled before the link lets the event loop run again: about 5 ms of handling at the
# controller's cost per heartbeat, so the loop's other work waits no longer than that.
SLICE = 64

_CONNECT, _CONNACK, _PUBLISH, _PUBACK = 0x10, 0x20, 0x30, 0x40
_SUBSCRIBE, _SUBACK, _PINGREQ, _PINGRESP, _DISCONNECT = 0x82, 0x90, 0xC0, 0xD0, 0xE0
_CONNACK_REASONS = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}


class LinkError(Exception):
    """The connection failed or was refused; the message says why."""


def _utf8(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    if len(data) > 65_535:
        raise ValueError("MQTT string longer than 65,535 bytes")
    return struct.pack("!H", len(data)) + data


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def encode_publish(topic: str | bytes, payload: bytes, *, retain: bool = False) -> bytes:
    """A QoS 0 PUBLISH packet (the topic may come encoded already)."""
    body = _utf8(topic) + payload
    return bytes((_PUBLISH | (0x01 if retain else 0),)) + _remaining_length(len(body)) + body


def encode_connect(
    client_id: str, keepalive_s: int, username: str | None, password: str | None
) -> bytes:
    flags = 0x02  # clean session
    payload = _utf8(client_id)
    if username is not None:
        flags |= 0x80
        payload += _utf8(username)
        if password is not None:
            flags |= 0x40
            payload += _utf8(password)
    body = _utf8("MQTT") + bytes((4, flags)) + struct.pack("!H", keepalive_s) + payload
    return bytes((_CONNECT,)) + _remaining_length(len(body)) + body


def encode_subscribe(packet_id: int, filters: Iterable[tuple[str, int]]) -> bytes:
    """SUBSCRIBE to (filter, QoS 0 or 1) pairs."""
    body = struct.pack("!H", packet_id) + b"".join(_utf8(f) + bytes((q,)) for f, q in filters)
    return bytes((_SUBSCRIBE,)) + _remaining_length(len(body)) + body


class PacketReader:
    """Splits a byte stream into MQTT packets: `feed(data)` returns every complete packet as
    (first byte, body); what is incomplete is kept for the next call. Raises LinkError for a
    malformed length or a packet above MAX_PACKET_BYTES."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buffer + data if self._buffer else data
        packets = []
        pos, end = 0, len(buf)
        while pos + 1 < end:
            i, length, shift, complete = pos + 1, 0, 0, False
            while i < end:
                byte = buf[i]
                i += 1
                length |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    complete = True
                    break
                shift += 7
                if shift > 21:
                    raise LinkError("malformed remaining length")
            if not complete:
                break  # the length itself is not all here yet
            if length > MAX_PACKET_BYTES:
                raise LinkError(f"packet of {length} bytes exceeds {MAX_PACKET_BYTES}")
            if end - i < length:
                break
            packets.append((buf[pos], buf[i : i + length]))
            pos = i + length
        self._buffer = buf[pos:]
        return packets


class _LinkProtocol(asyncio.Protocol):
    def __init__(self, link: IngestLink) -> None:
        self._link = link

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._link._made(transport)

    def data_received(self, data: bytes) -> None:
        self._link._received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._link._lost(exc)


class IngestLink:
    """One connection: `await open()`, then messages reach `on_message(topic, payload)` until
    `closed` is done (its result says why); `publish()` sends QoS 0 from any callback."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        tls: ssl.SSLContext | None,
        client_id: str,
        username: str | None,
        password: str | None,
        keepalive_s: int,
        filters: list[tuple[str, int]],
        on_message: Callable[[str, bytes], None],
        on_batch_end: Callable[[], None] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._host, self._port, self._tls = host, port, tls
        self._client_id, self._username, self._password = client_id, username, password
        self._keepalive_s = keepalive_s
        self._filters = filters
        self._on_message = on_message
        self._on_batch_end = on_batch_end
        self._transport: asyncio.Transport | None = None
        self._reader = PacketReader()
        self._state = "connecting"  # → "subscribing" → "open"; "closed" from any
        self._ready: asyncio.Future[None] | None = None
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pinger: asyncio.Task[None] | None = None
        self._clock = clock or asyncio.get_running_loop().time
        self._heard_at = self._clock()
        self.messages = 0
        self.reads = 0
        self._backlog: collections.deque[tuple[int, bytes]] = collections.deque()
        self._backlog_since: float | None = None  # when the oldest unhandled packet was read
        self._paused = False

    async def open(self) -> None:
        """Connect, CONNECT and SUBSCRIBE within `keepalive_s`; LinkError (or OSError) if not."""
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        try:
            async with asyncio.timeout(float(self._keepalive_s)):
                await loop.create_connection(
                    lambda: _LinkProtocol(self),
                    self._host,
                    self._port,
                    ssl=self._tls,
                    server_hostname=self._host if self._tls is not None else None,
                )
                await asyncio.shield(self._ready)
        except TimeoutError:
            self.close("no CONNACK or SUBACK in time")
            raise LinkError("broker did not answer CONNECT/SUBSCRIBE in time") from None
        except BaseException:
            self.close("open failed")
            raise
        if self._state != "open":  # lost between the SUBACK and here
            raise LinkError(self.closed.result() if self.closed.done() else "closed")
        self._pinger = loop.create_task(self._ping(), name="ingest link keepalive")

    def publish(self, packets: bytes) -> bool:
        """Write pre-encoded QoS 0 PUBLISH packets (`encode_publish`, joined); False when the
        connection is not open."""
        transport = self._transport
        if transport is None or self._state != "open" or transport.is_closing():
            return False
        transport.write(packets)
        return True

    def close(self, why: str = "closed") -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            if self._state == "open":
                with contextlib.suppress(Exception):
                    transport.write(bytes((_DISCONNECT, 0)))
            transport.close()
        self._finish(why)

    # --- protocol callbacks -------------------------------------------------------------------

    def _made(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        transport.write(
            encode_connect(self._client_id, self._keepalive_s, self._username, self._password)
        )

    def _received(self, data: bytes) -> None:
        self._heard_at = self._clock()
        self.reads += 1
        try:
            packets = self._reader.feed(data)
        except LinkError as e:
            self.close(str(e))
            return
        if packets and not self._backlog:
            self._backlog_since = self._heard_at
        self._backlog.extend(packets)
        self._handle_slice()

    def pending_age(self, now: float) -> float:
        """How long the oldest packet read but not yet handled has waited in this process: the
        part of the ingest lag an echo sent meanwhile cannot see (it queues behind what is still
        in the socket, not behind what was read already)."""
        since = self._backlog_since
        return 0.0 if since is None or not self._backlog else max(0.0, now - since)

    def _handle_slice(self) -> None:
        """Handle up to SLICE packets; if more are waiting, stop reading and go on after the
        event loop has run once (`call_soon`)."""
        backlog = self._backlog
        if self._state == "closed":
            backlog.clear()  # nothing is handled after the link is reported closed
            return
        # Busy with what was read, not waiting on a silent broker (see `_ping`).
        self._heard_at = self._clock()
        try:
            for _ in range(min(SLICE, len(backlog))):
                header, body = backlog.popleft()
                # A broker may send matching messages before its SUBACK (MQTT 3.1.1 §3.8.4).
                if header & 0xF0 == _PUBLISH and self._state in ("open", "subscribing"):
                    self._publish_in(header, body)
                else:
                    self._control(header, body)
        except LinkError as e:
            self.close(str(e))
            return
        finally:
            if self._on_batch_end is not None and self._state == "open":
                self._on_batch_end()
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if backlog:
            if not self._paused:
                self._paused = True
                transport.pause_reading()
            asyncio.get_running_loop().call_soon(self._handle_slice)
        else:
            self._backlog_since = None
            if self._paused:
                self._paused = False
                transport.resume_reading()

    def _publish_in(self, header: int, body: bytes) -> None:
        if len(body) < 2:
            raise LinkError("PUBLISH too short")
        n = (body[0] << 8) | body[1]
        qos = (header >> 1) & 0x03
        start = 2 + n + (2 if qos else 0)
        if start > len(body) or qos > 1:
            raise LinkError("malformed PUBLISH")
        try:
            topic = body[2 : 2 + n].decode()
        except UnicodeDecodeError:
            raise LinkError("PUBLISH topic is not UTF-8") from None
        if qos == 1 and self._transport is not None:
            self._transport.write(bytes((_PUBACK, 2)) + body[2 + n : 4 + n])
        self.messages += 1
        self._on_message(topic, body[start:])

    def _control(self, header: int, body: bytes) -> None:
        kind = header & 0xF0
        if self._state == "connecting":
            if header != _CONNACK or len(body) != 2:
                raise LinkError(f"expected CONNACK, got packet type {header >> 4}")
            if body[1] != 0:
                reason = _CONNACK_REASONS.get(body[1], f"code {body[1]}")
                raise LinkError(f"broker refused the connection: {reason}")
            self._state = "subscribing"
            assert self._transport is not None
            self._transport.write(encode_subscribe(1, self._filters))
        elif self._state == "subscribing":
            if header != _SUBACK or len(body) != 2 + len(self._filters) or body[:2] != b"\x00\x01":
                raise LinkError(f"expected SUBACK, got packet type {header >> 4}")
            if any(code == 0x80 for code in body[2:]):
                refused = [
                    f for (f, _), code in zip(self._filters, body[2:], strict=True) if code == 0x80
                ]
                raise LinkError(f"broker refused the subscription to {refused}")
            self._state = "open"
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
        elif kind == _PINGRESP:
            pass  # `_heard_at` moved already
        else:
            raise LinkError(f"unexpected packet type {header >> 4}")

    def _lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._backlog.clear()  # what the connection left unhandled goes with it
        self._finish(f"connection lost: {exc}" if exc else "connection closed by the broker")

    def _finish(self, why: str) -> None:
        self._state = "closed"
        if self._pinger is not None:
            self._pinger.cancel()
            self._pinger = None
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(LinkError(why))
            self._ready.exception()  # retrieved: `open` re-raises through its own path
        if not self.closed.done():
            self.closed.set_result(why)

    async def _ping(self) -> None:
        """PINGREQ every keepalive; closed when nothing arrived for 1.5 x keepalive (the
        broker's own rule for its clients, MQTT 3.1.1 §3.1.2.10)."""
        interval = float(self._keepalive_s)
        while True:
            await asyncio.sleep(interval / 2)
            if self._clock() - self._heard_at > 1.5 * interval:
                self.close(f"nothing from the broker in {1.5 * interval:g}s")
                return
            if self._transport is not None and not self._transport.is_closing():
                self._transport.write(bytes((_PINGREQ, 0)))
