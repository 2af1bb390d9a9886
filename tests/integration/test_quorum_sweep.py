"""The roster sweep of a cut-off agent (heartbeat/peers.py, decide/roster.py) on real loopback
sockets: many real probe endpoints, no cluster needed.

What an operator relies on: on a cluster larger than `2 * peer_count + 1` nodes, a control-plane
outage reboots no node (each cut-off agent finds a majority of cut-off peers beyond its own
probe list), while an agent cut off with only a minority of the nodes still fences (it cannot
count a majority, however many it asks); a sweep stops as soon as it can, and a round never
takes longer than one probe timeout, however many peers are silent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest

from chaos.sim.ports import free_port
from watchdog.decide.quorum import spared
from watchdog.decide.roster import cut_peers_needed
from watchdog.heartbeat.peers import (
    SWEEP_CONCURRENCY,
    PeerEndpoint,
    PeerProber,
    SweepPlan,
    SweepResult,
    sweep,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]
DEADLINE_S = 10.0


# How many PINGs each endpoint answered, filled in when `endpoints` ends.
answered: dict[str, int] = {}


@asynccontextmanager
async def endpoints(cut: dict[str, bool]) -> AsyncIterator[dict[str, str]]:
    """A real endpoint per node; each answers `cut` as `cut[node]` says. Yields the roster."""
    eps = [
        PeerEndpoint(n, f"boot-{n}", "127.0.0.1", free_port(), cut_off=lambda n=n: cut[n])
        for n in cut
    ]
    tasks = [asyncio.create_task(ep.run()) for ep in eps]
    try:
        async with asyncio.timeout(DEADLINE_S):
            for ep in eps:
                await ep.started.wait()
        yield {ep.node: f"127.0.0.1:{ep.port}" for ep in eps}
        answered.update({ep.node: ep.answered for ep in eps})
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@asynccontextmanager
async def silent_endpoints(n: int) -> AsyncIterator[dict[str, str]]:
    """`n` listeners that accept and never answer: machines behind a black hole, as a prober
    sees them (every probe there runs to its timeout)."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        held.append(w)

    servers = [await asyncio.start_server(hold, "127.0.0.1", 0) for _ in range(n)]
    try:
        yield {
            f"silent-{i}": f"127.0.0.1:{s.sockets[0].getsockname()[1]}"
            for i, s in enumerate(servers)
        }
    finally:
        for w in held:
            w.close()
        for s in servers:
            s.close()


def names(count: int, start: int = 0) -> Iterator[str]:
    return (f"node-{i:02d}" for i in range(start, start + count))


async def one_round(
    me: str, members: int, targets: dict[str, str], roster: dict[str, str], timeout_s: float
) -> tuple[int, int, float]:
    """One real round of `me`, cut off: (cut-off peers counted, peers asked, wall seconds)."""
    rounds: list[int] = []
    done = asyncio.Event()

    def on_round(_at: float, cut: int, _live: int) -> None:
        rounds.append(cut)
        done.set()

    async def publish(_: bytes) -> bool:
        return True

    prober = PeerProber(
        me,
        f"boot-{me}",
        interval_s=60.0,
        timeout_s=timeout_s,
        failures=2,
        refresh_s=60.0,
        publish=publish,
        on_round=on_round,
        sweep_plan=lambda: SweepPlan(roster, cut_peers_needed(members) or 0),
    )
    prober.set_targets(targets)
    task = asyncio.create_task(prober.run())
    started = time.monotonic()
    try:
        async with asyncio.timeout(DEADLINE_S):
            await done.wait()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    took = time.monotonic() - started
    assert prober.last_sweep is not None
    return rounds[0], prober.last_sweep.asked, took


async def test_a_cluster_wide_outage_spares_an_agent_of_a_large_cluster() -> None:
    """25 nodes, probe lists of 3: the three assigned peers alone can never make a majority of
    25 (the limit before the roster). All 24 others are cut off too: the sweep counts 12, and the
    agent is spared."""
    others = list(names(24, 1))
    async with endpoints(dict.fromkeys(others, True)) as roster:
        targets = {n: roster[n] for n in others[:3]}
        cut, asked, took = await one_round("node-00", 25, targets, roster, timeout_s=1.0)
    assert not spared(25, 3), "the assigned peers alone would spare it: no test of the sweep"
    assert spared(25, cut), f"only {cut} cut-off peers counted of 24 (asked {asked})"
    assert took < 1.0 + 0.5


async def test_an_agent_cut_off_with_a_minority_still_fences() -> None:
    """The must-not twin: 25 nodes, the agent and 11 peers cut off together (12 of 25, not a
    majority); the other 13 have contact (plain PONG). However many it asks, it is not spared:
    the controller hears 13 of 25 and does not hold, so it would reset this node's VMs."""
    others = list(names(24, 1))
    state = {n: i < 11 for i, n in enumerate(others)}
    async with endpoints(state) as roster:
        targets = {n: roster[n] for n in others[:3]}
        cut, asked, _ = await one_round("node-00", 25, targets, roster, timeout_s=1.0)
    assert asked > 0, "no sweep: the twin would pass for the wrong reason"
    assert cut <= 11
    assert not spared(25, cut)


async def test_silent_peers_end_the_sweep_at_one_probe_timeout() -> None:
    """A partition where most of the cluster is silent: every probe there runs to its timeout.
    More silent peers than the sweep has probes in flight (two waves of timeouts), yet the round
    ends within one timeout (the fence deadline's arithmetic counts on that), and what it found
    is no spare."""
    silent_count = 2 * SWEEP_CONCURRENCY
    async with (
        silent_endpoints(silent_count) as silent,
        endpoints(dict.fromkeys(names(3, 1), True)) as cut,
    ):
        roster = {**silent, **cut}
        members = silent_count + 4
        cut_count, _, took = await one_round("node-00", members, {}, roster, timeout_s=0.5)
    assert cut_count <= 3 and not spared(members, cut_count)
    assert took < 0.5 + 0.4, f"a round took {took:.2f}s with a 0.5s probe timeout"


async def test_a_sweep_stops_once_it_has_enough_or_can_no_longer_get_enough() -> None:
    async with endpoints(dict.fromkeys(names(40), True)) as all_cut:
        found = await sweep(all_cut, need=10, timeout_s=2.0, concurrency=4)
    assert found.cut >= 10 and found.asked <= 10 + 3  # the ones in flight when it had enough
    async with endpoints(dict.fromkeys(names(40), False)) as none_cut:
        found = await sweep(none_cut, need=30, timeout_s=2.0, concurrency=4)
    # 11 answers without `cut` leave 29 < 30 undecided: hopeless, stop.
    assert found.cut == 0 and found.asked <= 11 + 3


async def test_an_agent_that_is_not_cut_off_sweeps_nobody() -> None:
    """Outside an outage the roster costs nothing: no plan, no probe beyond the probe list."""
    others = list(names(10, 1))
    async with endpoints(dict.fromkeys(others, False)) as roster:
        done = asyncio.Event()

        async def publish(_: bytes) -> bool:
            return True

        prober = PeerProber(
            "node-00",
            "boot-node-00",
            interval_s=60.0,
            timeout_s=1.0,
            failures=2,
            refresh_s=60.0,
            publish=publish,
            on_round=lambda _at, _cut, _live: done.set(),
            sweep_plan=lambda: None,
        )
        prober.set_targets({n: roster[n] for n in others[:3]})
        task = asyncio.create_task(prober.run())
        async with asyncio.timeout(DEADLINE_S):
            await done.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert prober.sweeps == 0 and prober.last_sweep is None
    assert {n for n in others if answered[n]} == set(others[:3])


async def test_after_one_sweep_the_cut_off_peers_are_asked_first_and_the_silent_last() -> None:
    """Powered-off nodes stay in the roster, and each holds a probe slot for half a round: a
    sweep that meets many of them can run out of time before it counts enough. Each next round
    asks those that answered `cut` first and those that were silent last, so the agent is
    spared within the three rounds it has between answering `cut` (5 s) and its deadline (8 s)
    at the shipped timings, here with 13 % of the nodes silent and 8 probes in flight."""
    async with (
        silent_endpoints(40) as silent,
        endpoints(dict.fromkeys(names(259, 1), True)) as cut,
    ):
        roster = {**silent, **cut}
        need = cut_peers_needed(300) or 0
        rounds: list[SweepResult] = []
        last: SweepResult | None = None
        for _ in range(3):
            last = await sweep(roster, need, timeout_s=0.5, concurrency=8, last=last)
            rounds.append(last)
            assert last.cut_names <= set(cut) and last.silent_names <= set(silent)
            if last.cut >= need:
                break
    assert rounds[-1].cut >= need, [r.cut for r in rounds]
    if len(rounds) > 1:
        # Asked in the order learnt: every peer that answered `cut` before was asked again.
        assert rounds[-2].cut_names <= rounds[-1].cut_names, [r.cut for r in rounds]
