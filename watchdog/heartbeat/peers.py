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

While its agent is cut off, each round also sweeps the roster (decide/roster.py) for cut-off
peers, alongside the assigned probes and within the same `peer_probe_timeout_s`: in random
order, at most `SWEEP_CONCURRENCY` at a time, until it has counted the peers a spare needs or
too few are left to reach them. Only a round's count of `cut` answers comes of it (for the
quorum, decide/quorum.py); the sweep's targets get no verdicts and no reports.

Must not decide anything about the targets beyond its own verdicts (the controller weighs them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

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
# More simultaneous probe connections than this are closed at once. A node has peer_count
# observers, but in a cluster-wide outage every cut-off agent may sweep it too (up to
# SWEEP_CONCURRENCY each at a time, spread over the round by their random orders); a refused
# sweep probe counts as no `cut`, so a limit too low would turn a spare into a fence.
MAX_CONNECTIONS = 1024
# The listen backlog: connections the kernel queues before we accept them (a burst of sweeps).
LISTEN_BACKLOG = 1024
# How many sweep probes one agent has in flight at once (file descriptors, and the peers' load).
SWEEP_CONCURRENCY = 128
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
                    self._handle,
                    self.host,
                    self.port,
                    limit=MAX_LINE_BYTES + 1,
                    backlog=LISTEN_BACKLOG,
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


@dataclass(frozen=True, slots=True)
class SweepPlan:
    """Whom a cut-off agent may ask besides its targets (the roster: name → address), and how
    many `cut` answers in one round spare it (decide/roster.py, `cut_peers_needed`)."""

    candidates: Mapping[str, str]
    need: int


@dataclass(frozen=True, slots=True)
class SweepResult:
    asked: int = 0
    cut: int = 0
    # Who answered `cut`, and who timed out: the next sweep asks the first ones first and the
    # others last (`sweep_order`).
    cut_names: frozenset[str] = frozenset()
    silent_names: frozenset[str] = frozenset()


def sweep_order(candidates: Mapping[str, str], last: SweepResult | None) -> list[tuple[str, str]]:
    """Those that answered `cut` in the last sweep first, those that timed out last, each group
    in random order: a powered-off node holds a probe slot for a whole timeout, so a sweep that
    met many of them once starts the next one where the answers were. Random within a group:
    every agent of a cut-off majority sweeps at once, and the same order everywhere would send
    all of them to the same peer first."""
    first: list[tuple[str, str]] = []
    middle: list[tuple[str, str]] = []
    end: list[tuple[str, str]] = []
    for item in candidates.items():
        if last is not None and item[0] in last.cut_names:
            first.append(item)
        elif last is not None and item[0] in last.silent_names:
            end.append(item)
        else:
            middle.append(item)
    for group in (first, middle, end):
        random.shuffle(group)
    return first + middle + end


async def sweep(
    candidates: Mapping[str, str],
    need: int,
    timeout_s: float,
    concurrency: int = SWEEP_CONCURRENCY,
    last: SweepResult | None = None,
) -> SweepResult:
    """Probe `candidates` (in `sweep_order`) for `cut` answers until `need` of them said so,
    until fewer are left unasked than still needed, or until `timeout_s` is over (what was
    counted by then stands)."""
    order = sweep_order(candidates, last)
    pending = iter(order)
    undecided = len(order)  # not yet answered: asked and in flight, or not yet asked
    counted = SweepResult()
    cut_names: set[str] = set()
    silent_names: set[str] = set()  # timed out, or still unanswered at the deadline
    answered: set[str] = set()

    async def worker() -> None:
        nonlocal undecided, counted
        for name, address in pending:
            if counted.cut >= need or counted.cut + undecided < need:
                return
            silent_names.add(name)  # until it answers
            # Half the round's time each: a powered-off peer (no answer at all) holds a slot
            # for that long, a live one answers within milliseconds even when busy.
            outcome = await probe_once(name, address, timeout_s / 2)
            undecided -= 1
            cut = outcome is ProbeOutcome.CUT
            if cut:
                cut_names.add(name)
            if outcome is not ProbeOutcome.TIMEOUT:
                answered.add(name)
            counted = SweepResult(counted.asked + 1, counted.cut + cut)

    if need <= 0 or not order:
        return counted
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*(worker() for _ in range(min(concurrency, len(order)))))
    return SweepResult(
        counted.asked, counted.cut, frozenset(cut_names), frozenset(silent_names - answered)
    )


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
        sweep_plan: Callable[[], SweepPlan | None] | None = None,
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
        # While the agent is cut off: whom else to ask for `cut` this round (None: nobody).
        self._sweep_plan = sweep_plan
        self.last_sweep: SweepResult | None = None
        self.sweeps = 0
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
            plan = self._sweep_plan() if self._sweep_plan is not None else None
            if self.targets or plan is not None:
                await self._round(plan)
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

    async def _round(self, plan: SweepPlan | None = None) -> None:
        targets = dict(self.targets)
        started = self._clock()
        assigned = asyncio.gather(*(probe_once(t, a, self.timeout_s) for t, a in targets.items()))
        swept = SweepResult()
        if plan is None:
            outcomes = await assigned
        else:
            others = {
                n: a for n, a in plan.candidates.items() if n not in targets and n != self.node
            }
            # Alongside the assigned probes, for the same timeout: the round takes no longer.
            # The sweep aims at the whole need, as if no assigned target were cut: a few probes
            # more, for a round no longer than before.
            outcomes, swept = await asyncio.gather(
                assigned, sweep(others, plan.need, self.timeout_s, last=self.last_sweep)
            )
            self.last_sweep = swept
            self.sweeps += 1
        if self._on_round is not None:
            cut = sum(1 for o in outcomes if o is ProbeOutcome.CUT) + swept.cut
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
