"""The agent's probe endpoint and prober on real loopback sockets (no cluster needed).

What an operator relies on: a running agent answers for its own node only; a closed port reads
as `refused` (the machine is up) and a silent one as `timeout`; hostile input never takes the
endpoint down; and the prober reports a dead target once, after `failures` timeouts in a row,
not on every round.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from chaos.sim.ports import free_port
from watchdog.decide.peer_probe import PeerView, ProbeOutcome
from watchdog.heartbeat.peers import PeerEndpoint, PeerProber, probe_once

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]
DEADLINE_S = 10.0


@pytest_asyncio.fixture
async def endpoint() -> AsyncIterator[PeerEndpoint]:
    ep = PeerEndpoint("node-a", "boot-a", "127.0.0.1", free_port())
    task = asyncio.create_task(ep.run())
    async with asyncio.timeout(DEADLINE_S):
        await ep.started.wait()
    assert ep.listening
    yield ep
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest_asyncio.fixture
async def silent() -> AsyncIterator[str]:
    """A port whose listener accepts and never says a word (a black hole, seen from a client)."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        held.append(w)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    for w in held:
        w.close()
    server.close()


async def test_outcomes_of_one_probe(endpoint: PeerEndpoint, silent: str) -> None:
    address = f"127.0.0.1:{endpoint.port}"
    assert await probe_once("node-a", address, 2.0) is ProbeOutcome.OK
    # Someone else's address (a stale list): a PONG, but from another node.
    assert await probe_once("node-b", address, 2.0) is ProbeOutcome.MISMATCH
    # Nothing listens: the kernel refuses, i.e. the machine is alive.
    assert await probe_once("node-a", f"127.0.0.1:{free_port()}", 2.0) is ProbeOutcome.REFUSED
    assert await probe_once("node-a", silent, 0.3) is ProbeOutcome.TIMEOUT


async def test_an_agent_cut_off_says_so_and_a_round_counts_the_peers_that_did() -> None:
    """What the quorum before self-fencing reads (decide/quorum.py): `PONG ... cut` while the
    answering agent is cut off from broker and API, and the prober's count of such answers."""
    cut = [False]
    ep = PeerEndpoint("node-a", "boot-a", "127.0.0.1", free_port(), cut_off=lambda: cut[0])
    task = asyncio.create_task(ep.run())
    async with asyncio.timeout(DEADLINE_S):
        await ep.started.wait()
    address = f"127.0.0.1:{ep.port}"
    assert await probe_once("node-a", address, 2.0) is ProbeOutcome.OK
    cut[0] = True
    assert await probe_once("node-a", address, 2.0) is ProbeOutcome.CUT
    rounds: list[tuple[float, int, int]] = []
    one_round = asyncio.Event()

    def on_round(at: float, cut_peers: int, live_peers: int) -> None:
        rounds.append((at, cut_peers, live_peers))
        one_round.set()

    async def publish(payload: bytes) -> bool:
        return False  # the broker is gone too

    prober = PeerProber(
        "node-b", "boot-b", interval_s=0.05, timeout_s=1.0, failures=2, refresh_s=30.0,
        publish=publish, on_round=on_round,
    )  # fmt: skip
    prober.set_targets({"node-a": address, "node-c": f"127.0.0.1:{free_port()}"})
    probing = asyncio.create_task(prober.run())
    async with asyncio.timeout(DEADLINE_S):
        await one_round.wait()
    # node-a cut off; node-c refused (its agent is not running): neither has contact.
    assert rounds[0][1:] == (1, 0)
    assert prober.results()["node-a"] is PeerView.REACHABLE  # cut off, but alive
    for t in (probing, task):
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t


async def test_hostile_clients_do_not_take_the_endpoint_down(endpoint: PeerEndpoint) -> None:
    for junk in (b"x" * 5000 + b"\n", b"PING\n", b"\xff\xfe\n", b"PING node-a"):
        reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
        writer.write(junk)
        if not junk.endswith(b"\n"):
            writer.write_eof()
        async with asyncio.timeout(DEADLINE_S):
            assert await reader.read() == b""  # closed without an answer
        writer.close()
    assert await probe_once("node-a", f"127.0.0.1:{endpoint.port}", 2.0) is ProbeOutcome.OK


async def test_the_prober_reports_on_change_and_a_dead_target_after_two_timeouts(
    endpoint: PeerEndpoint, silent: str
) -> None:
    reports: list[dict[str, str]] = []
    published = asyncio.Event()

    async def publish(payload: bytes) -> bool:
        reports.append(json.loads(payload)["results"])
        published.set()
        return True

    outcomes: list[ProbeOutcome] = []
    six_timeouts = asyncio.Event()

    def on_outcome(outcome: ProbeOutcome) -> None:
        outcomes.append(outcome)
        if outcomes.count(ProbeOutcome.TIMEOUT) >= 6:
            six_timeouts.set()

    prober = PeerProber(
        "node-z",
        "boot-z",
        interval_s=0.05,
        timeout_s=0.2,
        failures=2,
        refresh_s=3600,
        publish=publish,
        on_outcome=on_outcome,
    )
    task = asyncio.create_task(prober.run())
    try:
        prober.set_targets({"node-a": f"127.0.0.1:{endpoint.port}", "node-d": silent})
        want = {"node-a": "reachable", "node-d": "unreachable"}
        async with asyncio.timeout(DEADLINE_S):
            while not reports or reports[-1] != want:
                published.clear()
                await published.wait()
            # Keep probing for a while: nothing changes, so nothing more is published.
            await six_timeouts.wait()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert reports[-1] == want
    assert want not in reports[:-1]
    # Reports only on change: the first (unknown), node-a reachable, node-d unreachable.
    assert len(reports) <= 3, reports
    assert ProbeOutcome.OK in outcomes
