"""A loopback TCP proxy whose links the harness can cut, the way a network fault looks to peers.

Owns: one listening port forwarding to one target, and the mode of all its connections:

- `PASS`: bytes flow both ways; half-closes (FIN) are forwarded.
- `BLACKHOLE`: both sockets of every connection stay open but nothing is read or forwarded in
  either direction, FINs included. Peers see no FIN and no RST: their writes fill the socket
  buffers and then block, their reads never return, exactly as with a powered-off machine or a
  partition, so they notice only by their own timeouts and keepalives. A connection accepted
  while black-holed is held without connecting upstream (the kernel completes the handshake
  for us, so unlike a real partition the client's connect itself succeeds; nothing flows after).
  Switching back to `PASS` resumes the held connections where they stopped, like a healed
  partition before either side timed out.
- `TO_TARGET`: bytes flow from clients to the target only; the target's bytes to its clients
  are held as in `BLACKHOLE` (a one-way path: what a client sends arrives, nothing comes back,
  e.g. a broker that stopped sending to a subscriber, or a half-broken route).
- `RESET`: every open connection is aborted with an RST on both sides, and new connections are
  reset as soon as they are accepted, like a peer whose process died (or a REJECT firewall).

Must not: parse the bytes, or decide when to cut: the fault injector does that.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType

_CHUNK = 64 * 1024


class ProxyMode(StrEnum):
    PASS = "pass"
    BLACKHOLE = "blackhole"
    TO_TARGET = "to-target"
    RESET = "reset"


@dataclass
class ProxyStatistics:
    accepted: int = 0
    active: int = 0
    reset: int = 0
    bytes_to_target: int = 0
    bytes_to_client: int = 0


@dataclass(eq=False)
class _Link:
    """One client connection and, once connected, its upstream twin."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    handler: asyncio.Task[None] | None = None
    aborted: bool = False
    # Set whenever the mode changes or the link is aborted: wakes whatever waits on the gate.
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def abort(self) -> None:
        self.aborted = True
        for writer in (self.client, self.upstream):
            if writer is not None:
                _abort_with_rst(writer)
        self.wake.set()

    def close(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.close()


class TcpProxy:
    """`async with TcpProxy("127.0.0.1", 6443) as p:` then clients connect to `p.port`."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        name: str = "proxy",
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self.name = name
        self._mode = ProxyMode.PASS
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._stats = ProxyStatistics()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError(f"{self.name} is not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.port}"

    @property
    def mode(self) -> ProxyMode:
        return self._mode

    def set_mode(self, mode: ProxyMode | str) -> None:
        """Switch every current and future connection to `mode`, effective immediately."""
        self._mode = ProxyMode(mode)
        for link in list(self._links):
            if self._mode is ProxyMode.RESET:
                self._stats.reset += 1
                link.abort()
            link.wake.set()

    def statistics(self) -> ProxyStatistics:
        return ProxyStatistics(**{**self._stats.__dict__, "active": len(self._links)})

    async def start(self, port: int = 0) -> None:
        """Listen on `port` (0: a free one, see `.port`)."""
        self._server = await asyncio.start_server(self._handle, self.listen_host, port)

    async def close(self) -> None:
        """Stop listening and abort every connection; returns once their handlers ended."""
        if self._server is not None:
            self._server.close()
        handlers = [link.handler for link in self._links if link.handler is not None]
        for link in list(self._links):
            link.abort()
        if handlers:
            await asyncio.gather(*handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._stats.accepted += 1
        if self._mode is ProxyMode.RESET:
            self._stats.reset += 1
            _abort_with_rst(writer)
            return
        link = _Link(client=writer, handler=asyncio.current_task())
        self._links.add(link)
        try:
            await self._serve(link, reader)
        finally:
            self._links.discard(link)
            if not link.aborted:
                link.close()

    async def _serve(self, link: _Link, client_reader: asyncio.StreamReader) -> None:
        # Do not connect upstream while cut: the target must not learn of a client it cannot
        # reach yet.
        if not await self._gate(link, "bytes_to_target"):
            return  # reset while it was held
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            # The target refuses (its process is gone, the machine is up): the client gets an
            # RST at once, as a direct connect would, never a silent hang that looks like a
            # dead machine to a peer prober.
            self._stats.reset += 1
            link.abort()
            return
        link.upstream = up_writer
        if self._mode is ProxyMode.RESET or link.aborted:
            link.abort()  # reset while we were connecting
            return
        async with asyncio.TaskGroup() as tg:
            tg.create_task(
                self._pump(client_reader, up_writer, "bytes_to_target", link),
                name=f"{self.name}: client→target",
            )
            tg.create_task(
                self._pump(up_reader, link.client, "bytes_to_client", link),
                name=f"{self.name}: target→client",
            )

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        counter: str,
        link: _Link,
    ) -> None:
        try:
            while True:
                if not await self._gate(link, counter):
                    return
                data = await reader.read(_CHUNK)
                # Data read just before a cut is held, not forwarded, until the link heals.
                if not await self._gate(link, counter):
                    return
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                setattr(self._stats, counter, getattr(self._stats, counter) + len(data))
                await writer.drain()
        except (ConnectionError, OSError):
            link.abort()

    def _flows(self, direction: str) -> bool:
        mode = self._mode
        return mode is ProxyMode.PASS or (
            mode is ProxyMode.TO_TARGET and direction == "bytes_to_target"
        )

    async def _gate(self, link: _Link, direction: str) -> bool:
        """Wait until bytes may flow on `link` in `direction` (the statistics counter's name);
        False once it is aborted."""
        while not self._flows(direction) and not link.aborted:
            link.wake.clear()
            await link.wake.wait()
        return not link.aborted


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    """Close so the peer gets an RST rather than a FIN: linger on, timeout 0."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
