"""The MQTT broker of the test cluster: an embedded amqtt, a real mosquitto, or an external one.

Owns: starting a broker on a loopback port, stopping it and starting it again on the same port
(a broker outage: clients lose their connections and must reconnect), and its URL.

- `EmbeddedBroker`: amqtt 0.12 in this process (no binary needed; delivers Wills).
- `MosquittoBroker`: Debian's `/usr/sbin/mosquitto` with a generated config file, as a child
  process that dies with us (tests use it: it is what deploy/ runs).
- `ExternalBroker`: a URL given by the user; it cannot be stopped from here.

Must not: know about nodes or agents; per-node links to the broker are proxies (cluster.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from chaos.sim.ports import free_port
from chaos.sim.procs import ManagedProcess, managed

log = logging.getLogger(__name__)

MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/bin/mosquitto")


class BrokerError(RuntimeError):
    pass


class MqttBroker(Protocol):
    host: str
    port: int

    @property
    def url(self) -> str: ...

    @property
    def running(self) -> bool: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def wait_port(host: str, port: int, timeout_s: float = 10.0) -> None:
    """Return once `host:port` accepts TCP connections."""
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                _, writer = await asyncio.open_connection(host, port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return


_AMQTT_PATCHED = False
SHUTDOWN_BOUND_S = 5.0


class _SnapshotDict(dict):  # type: ignore[type-arg]
    """A dict whose iteration walks a copy, so that it may change while being walked."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(super().keys()))

    def items(self):  # type: ignore[no-untyped-def]
        return list(super().items())


def _patch_amqtt() -> None:
    """Make amqtt 0.12 enforce keep-alive as MQTT requires (3.1.1 section 3.1.2.10).

    amqtt times out its read after `keep_alive` seconds of silence and then does nothing
    (`BrokerProtocolHandler.handle_read_timeout` is empty), so a client that goes silent without
    closing its socket (a powered-off machine) is never disconnected and its Will never sent;
    only a closed socket triggers it. A broker must disconnect after 1.5 x keep-alive and
    publish the Will: that is the behaviour the watchdog relies on, so the embedded broker gets
    it. Measured: without this, a black-holed client keeps its session forever.

    Also: a handler's `stop()` cancels its reader task once and waits for an Event that the
    reader sets as it ends. On Python 3.11 `asyncio.wait_for` (around each read) can swallow a
    cancellation that races with the read completing, and the reader reads on; `Broker.shutdown()`
    then hangs for good with the port still open. Measured: 2 shutdowns in 10 hung with six
    clients reconnecting (a broker-outage chaos run timed out on it); 0 in 30 with the reader
    cancelled until it has ended (amqtt's own wait is skipped for a reader that is done).
    """
    global _AMQTT_PATCHED
    if _AMQTT_PATCHED:
        return
    import math

    from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
    from amqtt.mqtt.protocol.handler import ProtocolHandler

    original_start = BrokerProtocolHandler.start

    async def start(self: BrokerProtocolHandler) -> None:
        session = self.session
        if session is not None and session.keep_alive and session.keep_alive > 0:
            session.keep_alive = math.ceil(1.5 * session.keep_alive)
        await original_start(self)

    pending: set[asyncio.Future[None]] = set()

    def handle_read_timeout(self: BrokerProtocolHandler) -> None:
        # An unclean disconnect: the broker's client loop then publishes the Will.
        fut = asyncio.ensure_future(self.handle_connection_closed())
        pending.add(fut)
        fut.add_done_callback(pending.discard)

    original_stop = ProtocolHandler.stop

    async def stop(self: ProtocolHandler) -> None:
        reader = self._reader_task
        if reader is not None and reader is not asyncio.current_task():
            for _ in range(50):  # a cancellation lost to the race is simply repeated
                if reader.done():
                    break
                reader.cancel()
                await asyncio.wait([reader], timeout=0.1)
        await original_stop(self)

    BrokerProtocolHandler.start = start
    ProtocolHandler.stop = stop
    BrokerProtocolHandler.handle_read_timeout = handle_read_timeout
    _AMQTT_PATCHED = True


class EmbeddedBroker:
    """amqtt in-process (keep-alive enforcement and shutdown fixed, see _patch_amqtt).

    Restarted as a fresh instance on the same port.
    """

    def __init__(self, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port or free_port()
        self._broker: object | None = None
        # Every client connection of the running instance (see stop()).
        self._connections: set[asyncio.Transport] = set()

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._broker is not None

    async def start(self) -> None:
        if self._broker is not None:
            return
        from amqtt.broker import Broker  # imported late: amqtt is heavy and only needed here

        _patch_amqtt()
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            },
        }
        connections = self._connections

        class TrackingBroker(Broker):  # type: ignore[misc]
            async def stream_connected(
                self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
            ) -> None:
                transport = writer.transport
                connections.add(transport)  # type: ignore[arg-type]
                try:
                    await super().stream_connected(reader, writer, listener_name)
                finally:
                    connections.discard(transport)

        broker = TrackingBroker(config)
        # amqtt 0.12 iterates its subscription table across awaits (a connecting session
        # publishes the retained messages of every filter; a broadcast walks every filter)
        # while other sessions subscribe: "dictionary changed size during iteration" then kills
        # the connecting client's session. Iterating a snapshot is what the broker means.
        broker._subscriptions = _SnapshotDict()
        await broker.start()
        self._broker = broker
        log.info("embedded amqtt broker on %s", self.url)

    async def stop(self) -> None:
        """Down as a crashed broker is: no new connection, every client's connection cut.

        amqtt's shutdown closes the sessions it knows when it starts and its listener only at
        the end: a client reconnecting in between stayed connected to the stopped instance and
        never came back (measured: 1-2 of 6 clients after 10 outages)."""
        broker, self._broker = self._broker, None
        if broker is None:
            return
        for server in broker._servers.values():  # type: ignore[attr-defined]
            server.instance.close()
        for transport in list(self._connections):
            transport.abort()
        # Down already (listener closed, every connection cut): the rest is amqtt's own
        # bookkeeping, which can wait on a session forever and swallow the cancellation meant
        # to end it (a stop under load hung a test for 180 s). It is given a bound, and left
        # behind, cancelled, past it: a restart binds the same port as a fresh instance.
        shutdown = asyncio.ensure_future(broker.shutdown())  # type: ignore[attr-defined]
        done, _ = await asyncio.wait({shutdown}, timeout=SHUTDOWN_BOUND_S)
        if not done:
            log.warning("amqtt shutdown unfinished after %.0fs; left behind", SHUTDOWN_BOUND_S)
            shutdown.cancel()
        elif not shutdown.cancelled() and shutdown.exception() is not None:
            log.warning("amqtt shutdown failed: %s", shutdown.exception())


class MosquittoBroker:
    """A real mosquitto on a loopback port, with a generated config file."""

    def __init__(
        self,
        work_dir: Path,
        port: int | None = None,
        host: str = "127.0.0.1",
        binary: str | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port()
        self.work_dir = work_dir
        found = (
            binary
            or next((p for p in MOSQUITTO_PATHS if os.path.exists(p)), None)
            or shutil.which("mosquitto")
        )
        if not found:
            raise BrokerError("mosquitto not found (apt-get install mosquitto)")
        self.binary = found
        self._proc: ManagedProcess | None = None

    @staticmethod
    def available() -> bool:
        return any(os.path.exists(p) for p in MOSQUITTO_PATHS) or bool(shutil.which("mosquitto"))

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.running

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.running else None

    def _write_config(self) -> Path:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        conf = self.work_dir / "mosquitto.conf"
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "persistence false",
            "log_dest stdout",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "connection_messages true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "set_tcp_nodelay true",
            "max_keepalive 65535",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to `mosquitto`, which cannot read our dir
        conf.write_text("\n".join(lines) + "\n")
        return conf

    async def start(self) -> None:
        if self.running:
            return
        conf = self._write_config()
        self._proc = managed(
            "mosquitto", [self.binary, "-c", str(conf)], self.work_dir / "mosquitto.log"
        )
        await self._proc.spawn()
        for port in self.listen_ports():
            try:
                await wait_port(self.host, port)
            except TimeoutError as e:
                tail = self._proc.log_tail()
                await self._proc.stop()
                raise BrokerError(f"mosquitto did not listen on {port}:\n{tail}") from e
        log.info("mosquitto on %s (pid %s)", self.url, self._proc.pid)

    def listen_ports(self) -> tuple[int, ...]:
        """Every port the configuration opens (the broker is up once each one listens)."""
        return (self.port,)

    async def stop(self) -> None:
        if self._proc is not None:
            await self._proc.stop(5.0)


class ExternalBroker:
    def __init__(self, url: str) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
            raise BrokerError(f"--broker: expected mqtt://host:port, got {url!r}")
        self.host = parsed.hostname
        self.port = parsed.port or (8883 if parsed.scheme == "mqtts" else 1883)
        self._url = url.rstrip("/")

    @property
    def url(self) -> str:
        return self._url

    @property
    def running(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        raise BrokerError("the broker is external (--broker): it cannot be stopped from here")


def make_broker(spec: str | None, work_dir: Path) -> MqttBroker | None:
    """`None`/"none" → no broker; "amqtt"/"embedded" → in-process; "mosquitto"; or a URL."""
    if spec in (None, "", "none"):
        return None
    if spec in ("amqtt", "embedded"):
        return EmbeddedBroker()
    if spec == "mosquitto":
        return MosquittoBroker(work_dir / "mosquitto")
    return ExternalBroker(spec)
