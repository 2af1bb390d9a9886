"""Benchmark: the roster sweep of a cut-off agent (decide/roster.py, heartbeat/peers.py).

What a cluster-wide outage costs each node: its agent sweeps the roster for `members // 2`
cut-off peers every probe round, and its endpoint answers the other agents' sweeps. Measured
on loopback with real code on both sides: N-1 real `PeerEndpoint`s, every one cut off, in a
child process (the peers), and the real `sweep()` in this one (the agent), round after round.

Reported per cluster size: the probes one round made, its wall time against the probe timeout
it must end within, the sweeping agent's CPU per round, and the peers' CPU per round — all the
answers one round needed, which is about what each node spends answering the others' sweeps
in a real outage (every node sweeps about as many as it is asked).

Must not: touch the network beyond loopback.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from chaos.bench.common import ProcStat, self_cpu_s

PROBE_TIMEOUT_S = 1.0  # the shipped peer_probe_timeout_s: a round must end within it


async def _serve(n: int) -> None:
    """The child: n-1 cut-off endpoints; prints the roster as one JSON line, then serves."""
    from watchdog.heartbeat.peers import LISTEN_BACKLOG, PeerEndpoint

    roster: dict[str, str] = {}
    servers = []
    for i in range(1, n):
        ep = PeerEndpoint(f"node-{i}", f"boot-{i}", "127.0.0.1", 0, cut_off=lambda: True)
        server = await asyncio.start_server(ep._handle, "127.0.0.1", 0, backlog=LISTEN_BACKLOG)
        servers.append(server)
        roster[ep.node] = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    print(json.dumps(roster), flush=True)
    await asyncio.Event().wait()


def _measure(n: int, rounds: int) -> dict[str, Any]:
    from watchdog.decide.roster import cut_peers_needed
    from watchdog.heartbeat.peers import sweep

    serve = f"import asyncio, chaos.bench.sweep as s; asyncio.run(s._serve({n}))"
    child = subprocess.Popen(
        [sys.executable, "-c", serve],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        roster: dict[str, str] = json.loads(child.stdout.readline())
        need = cut_peers_needed(n) or 0
        walls: list[float] = []
        mine: list[float] = []
        theirs: list[float] = []
        asked: list[int] = []
        counted: list[int] = []

        async def run() -> None:
            for _ in range(rounds):
                peer0 = ProcStat.read(child.pid)
                cpu0, t0 = self_cpu_s(), time.monotonic()
                found = await sweep(roster, need, PROBE_TIMEOUT_S)
                walls.append(time.monotonic() - t0)
                mine.append(self_cpu_s() - cpu0)
                peer1 = ProcStat.read(child.pid)
                if peer0 is not None and peer1 is not None:
                    theirs.append(peer1.cpu_s - peer0.cpu_s)
                asked.append(found.asked)
                counted.append(found.cut)
                await asyncio.sleep(0.2)  # let the peers' side finish its closes

        asyncio.run(run())
    finally:
        child.kill()
        child.wait()
    return {
        "nodes": n,
        "need": need,
        "rounds": rounds,
        "asked_median": statistics.median(asked),
        "cut_min": min(counted),
        "spared_every_round": min(counted) >= need,
        "wall_s_median": round(statistics.median(walls), 3),
        "wall_s_max": round(max(walls), 3),
        "probe_timeout_s": PROBE_TIMEOUT_S,
        "agent_cpu_s_median": round(statistics.median(mine), 3),
        "peers_cpu_s_median": round(statistics.median(theirs), 3) if theirs else None,
    }


def run(sizes: tuple[int, ...] = (100, 1000, 5000), rounds: int = 5) -> dict[str, Any]:
    from chaos.bench.common import machine

    m = machine()
    return {"benchmark": "sweep", "machine": m, "sweep": [_measure(n, rounds) for n in sizes]}


def render(report: dict[str, Any]) -> str:
    from chaos.bench.common import table

    rows = [
        [
            r["nodes"],
            r["need"],
            r["asked_median"],
            "yes" if r["spared_every_round"] else f"no (min {r['cut_min']})",
            f"{r['wall_s_median']} / {r['wall_s_max']} (of {r['probe_timeout_s']})",
            r["agent_cpu_s_median"],
            r["peers_cpu_s_median"],
        ]
        for r in report["sweep"]
    ]
    return "\n".join(
        [
            "roster sweep of one cut-off agent, every peer cut off (loopback, real endpoints):",
            table(
                [
                    "nodes",
                    "cut needed",
                    "probes/round",
                    "spared",
                    "round wall s p50 / max",
                    "agent CPU s/round",
                    "peers' CPU s/round",
                ],
                rows,
            ),
        ]
    )
