"""The agent's side of peer probes: its probe endpoint, and probing the nodes it is assigned.

`PeerEndpoint` is a tiny TCP server: one `PING <node>` line in, one `PONG <node> <boot_id>` line
out (ending in ` cut` while its agent is cut off from broker and API: decide/quorum.py), close.
Bounded line length, bounded concurrency and a deadline per connection; nothing a client sends
can crash or stall the agent.

`PeerProber` probes every target of this node's probe list (set from the retained
`<prefix>/probe/<node>` the leader publishes) every `peer_interval_s`, all concurrently, each
with `peer_probe_timeout_s`, keeps a verdict per target (decide/peer_probe.py) and hands a
report to `publish` when a verdict changes, when the list changes, after a reconnection, and
every `peer_refresh_s` otherwise. It runs as its own task: a slow probe or publish never delays
a heartbeat.

Must not decide anything about the targets beyond its own verdicts (the controller weighs them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from watchdog.decide.peer_address import split_peer_address
from watchdog.decide.peer_probe import (
    MAX_LINE_BYTES,
    PeerView,
    ProbeOutcome,
    TargetState,
    classify,
    encode_ping,
    encode_pong,
    observe,
    parse_ping,
)
from watchdog.decide.peer_reports import PeerReport, encode_report

log = logging.getLogger(__name__)

# A client gets this long to send its PING and read the PONG; then it is cut off.
HANDLER_DEADLINE_S = 2.0
# More simultaneous probe connections than this are closed at once: each node has only
# peer_count observers, so anything beyond is not a prober.
MAX_CONNECTIONS = 64
# How long the endpoint waits before trying again to listen (port taken, address missing).
LISTEN_RETRY_S = 5.0

Publish = Callable[[bytes], Awaitable[bool]]


class PeerEndpoint:
    """Answers PINGs for `node` until closed; `run()` keeps trying to listen until cancelled."""

    def __init__(
        self,
        node: str,
        boot_id: str,
        host: str,
        port: int,
        cut_off: Callable[[], bool] = lambda: False,
    ) -> None:
        self.node = node
        self.boot_id = boot_id
        self.host = host
        self.port = port
        self.answered = 0
        self.refused = 0
        self._server: asyncio.Server | None = None
        self._active = 0
        self._pong = encode_pong(node, boot_id)
        self._pong_cut = encode_pong(node, boot_id, cut=True)
        self._cut_off = cut_off
        self.started = asyncio.Event()  # set once listening

    @property
    def listening(self) -> bool:
        return self._server is not None

    async def run(self) -> None:
        while True:
            try:
                self._server = await asyncio.start_server(
                    self._handle, self.host, self.port, limit=MAX_LINE_BYTES + 1
                )
                break
            except OSError as e:
                log.error(
                    "peer endpoint %s:%d cannot listen (%s); retrying in %.0fs",
                    self.host,
                    self.port,
                    e,
                    LISTEN_RETRY_S,
                )
                await asyncio.sleep(LISTEN_RETRY_S)
        log.info("peer endpoint listening on %s:%d", self.host, self.port)
        self.started.set()
        try:
            await asyncio.Event().wait()
        finally:
            self._server.close()
            self._server = None
            self.started.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._active >= MAX_CONNECTIONS:
            self.refused += 1
            writer.transport.abort()
            return
        self._active += 1
        try:
            async with asyncio.timeout(HANDLER_DEADLINE_S):
                line = await reader.readline()
                if parse_ping(line) is not None:
                    # Answered with our own name whatever node was asked for: the prober then
                    # sees a PONG from another node (a stale address), not a silent endpoint.
                    writer.write(self._pong_cut if self._cut_off() else self._pong)
                    await writer.drain()
                    self.answered += 1
        except (TimeoutError, ValueError, ConnectionError, OSError):
            pass  # an overlong line, a slow or vanished client: nothing to answer
        finally:
            self._active -= 1
            writer.close()


async def probe_once(expected: str, address: str, timeout_s: float) -> ProbeOutcome:
    """One attempt at `address`, which should answer for `expected`."""
    reply: bytes | None = None
    error: BaseException | None = None
    writer: asyncio.StreamWriter | None = None
    try:
        host, port = split_peer_address(address)
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port, limit=MAX_LINE_BYTES + 1)
            writer.write(encode_ping(expected))
            await writer.drain()
            reply = await reader.readline()
    except ValueError:
        reply = b"?"  # an overlong line, or an address we cannot use: not our agent
    except Exception as e:
        error = e
    finally:
        if writer is not None:
            writer.transport.abort()  # nothing more to say; never wait on a dead peer's window
    return classify(expected, reply, error)


class PeerProber:
    """Probes the assigned targets, keeps verdicts, publishes reports when they change."""

    def __init__(
        self,
        node: str,
        boot_id: str,
        *,
        interval_s: float,
        timeout_s: float,
        failures: int,
        refresh_s: float,
        publish: Publish,
        on_outcome: Callable[[ProbeOutcome], None] | None = None,
        on_round: Callable[[float, int, int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node = node
        self.boot_id = boot_id
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.failures = failures
        self.refresh_s = refresh_s
        self._publish = publish
        self._on_outcome = on_outcome
        # After each round: (when it started, how many targets answered `cut`, how many answered
        # a plain PONG: their agents have contact), for the agent's quorum (decide/quorum.py).
        self._on_round = on_round
        self._clock = clock
        self.targets: dict[str, str] = {}
        self.states: dict[str, TargetState] = {}
        # Reports must move forward across agent restarts on the same boot (the controller
        # refuses a seq it has seen for this boot_id): start from the wall clock in ms.
        self._seq = int(time.time() * 1000)
        self._dirty = True
        self._published_at: float | None = None
        self._changed = asyncio.Event()
        self.reports = 0

    def set_targets(self, targets: dict[str, str]) -> None:
        """A new probe list: verdicts kept for targets whose address did not change."""
        if targets == self.targets:
            return
        kept = {t: s for t, s in self.states.items() if self.targets.get(t) == targets.get(t, "")}
        self.targets = dict(targets)
        self.states = {t: kept.get(t, TargetState()) for t in targets}
        log.info("agent %s: probing %s", self.node, ", ".join(sorted(targets)) or "nobody")
        self._dirty = True
        self._changed.set()

    def republish(self) -> None:
        """Publish the current report again soon (e.g. after the broker connection came back)."""
        self._dirty = True
        self._changed.set()

    def results(self) -> dict[str, PeerView]:
        return {t: s.view for t, s in self.states.items()}

    async def run(self) -> None:
        next_at = self._clock()
        while True:
            if self.targets:
                await self._round()
            await self._maybe_publish()
            next_at += self.interval_s
            now = self._clock()
            if now >= next_at:  # a round ran long (timeouts): start the next one at once
                next_at = now
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_at - now)):
                    # A new list starts probing it at once; otherwise wait for the slot.
                    await self._changed.wait()
                    next_at = self._clock()

    async def _round(self) -> None:
        targets = dict(self.targets)
        started = self._clock()
        outcomes = await asyncio.gather(
            *(probe_once(t, a, self.timeout_s) for t, a in targets.items())
        )
        if self._on_round is not None:
            cut = sum(1 for o in outcomes if o is ProbeOutcome.CUT)
            self._on_round(started, cut, sum(1 for o in outcomes if o is ProbeOutcome.OK))
        for target, outcome in zip(targets, outcomes, strict=True):
            if self._on_outcome is not None:
                self._on_outcome(outcome)
            if self.targets.get(target) != targets[target]:
                continue  # the list changed while we probed
            before = self.states.get(target, TargetState())
            after = observe(before, outcome, self.failures)
            self.states[target] = after
            if after.view is not before.view:
                log.info(
                    "agent %s: peer %s is %s (%s)", self.node, target, after.view.value, outcome
                )
                self._dirty = True

    async def _maybe_publish(self) -> None:
        now = self._clock()
        due = self._published_at is None or now - self._published_at >= self.refresh_s
        if not (self._dirty or due):
            return
        self._seq += 1
        report = PeerReport(self.node, self.boot_id, self._seq, time.time(), self.results())
        if await self._publish(encode_report(report)):
            self._dirty = False
            self._published_at = now
            self.reports += 1
