"""Benchmark 3, decide throughput: the pure state machine and the controller's tick, in-process.

Two measurements, CPU only (no I/O, no network, a frozen clock so no timer fires):

1. `decide()` evaluations per second over N nodes with realistic observations (healthy nodes
   with fresh heartbeats and Leases and `pods_per_node` launcher pods each; a slice of nodes
   SUSPECT), so the state machine's own cost is known.
2. The controller's tick: `NodeScheduler` + `Controller.evaluate` over a dict-backed
   `ClusterView` (O(1) per read, like the real cache's indexes) and a real `HeartbeatBook` and
   `Metrics`. One heartbeat arrives (one node marked dirty) and we time until it is evaluated;
   then every node changes at once. Work per tick proportional to what changed means: the
   1-changed-node tick costs the same at every cluster size, and the all-changed tick costs N
   times one node's evaluation. Both are measured at several cluster sizes.

Must not: touch the network or a real cluster.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import statistics
import time
from collections.abc import Awaitable, Iterable
from typing import Any

from watchdog.decide import actions as act
from watchdog.decide.config import DecideConfig, Policy
from watchdog.decide.heartbeats import Heartbeat, HeartbeatBook
from watchdog.decide.machine import Context, decide
from watchdog.decide.observations import (
    FenceDeclaration,
    LauncherPod,
    NodeObservation,
    SourceHealth,
)
from watchdog.decide.state import NodeState, Phase
from watchdog.metrics import Metrics
from watchdog.runtime.controller import Controller
from watchdog.runtime.scheduler import NodeScheduler

FENCE = FenceDeclaration(armed=True, after_s=8.0, bound_s=5.0)
T0 = 10_000.0  # the frozen monotonic clock


class DictView:
    """A `ClusterView` over plain dicts: what the real CacheView gives, at O(1) per read."""

    def __init__(self, nodes: int, pods_per_node: int) -> None:
        self.names: dict[str, None] = {f"node-{i}": None for i in range(1, nodes + 1)}
        self.pods: dict[str, tuple[LauncherPod, ...]] = {
            n: tuple(
                LauncherPod("default", f"virt-launcher-{n}-vm-{j}-abcde", f"{n}-vm-{j}", True)
                for j in range(pods_per_node)
            )
            for n in self.names
        }
        self.lease_at: dict[str, float] = dict.fromkeys(self.names, T0 - 1.0)

    def node_names(self) -> Iterable[str]:
        return self.names.keys()

    def node_ready(self, node: str) -> str | None:
        return "True" if node in self.names else None

    def node_annotation(self, node: str, key: str) -> str | None:
        return None

    def node_version(self, node: str) -> str | None:
        return "1" if node in self.names else None

    def node_has_taint(self, node: str, key: str, effect: str) -> bool:
        return False

    def lease_renewed_at(self, node: str) -> tuple[bool, float | None]:
        at = self.lease_at.get(node)
        return (at is not None, at)

    def launcher_pods(self, node: str) -> tuple[LauncherPod, ...]:
        return self.pods.get(node, ())

    def vm_run_strategy(self, namespace: str, vm: str) -> tuple[str | None, bool | None]:
        return ("RerunOnFailure", None)

    def vmi_location(self, namespace: str, name: str) -> tuple[str | None, str | None]:
        return (None, None)

    def harvester_policy(self) -> tuple[bool, str | None, str | None]:
        return (False, None, None)

    def node_maintenance(self, node: str) -> tuple[bool, str | None, int]:
        return False, None, 0

    def upgrade_running(self) -> bool:
        return False


# --- 1. decide() alone ------------------------------------------------------------------------


def bench_decide(nodes: int, pods_per_node: int, rounds: int) -> dict[str, Any]:
    cfg = DecideConfig()
    ctx = Context(SourceHealth(T0 - 600, T0 - 600), Policy())
    view = DictView(nodes, pods_per_node)
    cases: list[tuple[NodeState, NodeObservation]] = []
    for i, name in enumerate(view.names):
        suspect = i % 20 == 0  # 5 % of nodes mid-detection: the SUSPECT path is the busy one
        obs = NodeObservation(
            name=name,
            last_heartbeat_at=T0 - (3.5 if suspect else 0.4),
            heartbeats_received=100,
            boot_id="b-" + name,
            fence=FENCE,
            lease_seen=True,
            lease_renewed_at=T0 - 4.0,
            ready="True",
            launcher_pods=view.pods[name],
        )
        state = NodeState(name, entered_at=T0 - 3600)
        if suspect:
            state = NodeState(
                name, phase=Phase.SUSPECT, entered_at=T0 - 0.5, last_contact_at=T0 - 3.5
            )
        cases.append((state, obs))
    times: list[float] = []
    gc.collect()
    for _ in range(rounds):
        t = time.process_time()  # CPU time: the machine is shared, wall time is not ours
        for state, obs in cases:
            decide(state, obs, ctx, T0, cfg)
        times.append(time.process_time() - t)
    best = min(times)
    return {
        "nodes": nodes,
        "pods_per_node": pods_per_node,
        "rounds": rounds,
        "evaluations_per_s": round(nodes / best),
        "us_per_evaluation": round(best / nodes * 1e6, 2),
        "round_s_median": round(statistics.median(times), 4),
    }


# --- 2. the controller's tick -----------------------------------------------------------------


class _Tick:
    """Counts evaluations and wakes a waiter when a target count is reached."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.count = 0
        self.target = -1
        self.done = asyncio.Event()

    def evaluate(self, node: str) -> float | Awaitable[float | None] | None:
        # As the service runs it: inline when there is nothing to act on.
        result = self.controller.evaluate_now(node)
        if inspect.isawaitable(result):
            return self._then_count(result)
        self._counted()
        return result

    async def _then_count(self, pending: Awaitable[float | None]) -> float | None:
        wake = await pending
        self._counted()
        return wake

    def _counted(self) -> None:
        self.count += 1
        if self.count == self.target:
            self.done.set()

    async def wait(self, more: int) -> None:
        self.target = self.count + more
        self.done.clear()
        await self.done.wait()


async def _tick_costs(nodes: int, pods_per_node: int, single_ticks: int) -> dict[str, Any]:
    now = [T0]

    def clock() -> float:
        return now[0]

    view = DictView(nodes, pods_per_node)
    book = HeartbeatBook()
    book.set_known(set(view.names))
    seqs = dict.fromkeys(view.names, 0)

    def heartbeat(node: str) -> None:
        seqs[node] += 1
        book.accept(Heartbeat(node, "boot-" + node, seqs[node], 0.0, "bench", FENCE), now[0])

    for n in view.names:
        heartbeat(n)

    async def execute(action: act.Action, basis: act.Basis | None = None) -> str:
        return "success"

    controller = Controller(
        DecideConfig(),
        Policy(),
        ("node.kubernetes.io/out-of-service", "NoExecute"),
        view,
        book,
        execute,
        Metrics(),
        clock,
    )
    controller.broker_connection(True)
    controller.api_connection(True)
    controller.become_leader()
    tick = _Tick(controller)
    scheduler = NodeScheduler(tick.evaluate, clock)
    runner = asyncio.create_task(scheduler.run(), name="bench scheduler")
    try:
        # Settle: the first evaluation of every node (they all start dirty on takeover).
        scheduler.mark_all(list(view.names))
        await tick.wait(nodes)
        names = list(view.names)
        gc.collect()
        gc.disable()
        try:
            # One heartbeat, one node dirty: what a quiet cluster's tick costs.
            singles: list[float] = []
            for k in range(single_ticks):
                node = names[(k * 7919) % nodes]
                t = time.process_time()
                heartbeat(node)
                scheduler.mark(node)
                await tick.wait(1)
                singles.append(time.process_time() - t)
            # Every node changed at once (e.g. the broker came back): N evaluations.
            t = time.process_time()
            for n in names:
                heartbeat(n)
            scheduler.mark_all(names)
            await tick.wait(nodes)
            all_s = time.process_time() - t
        finally:
            gc.enable()
    finally:
        runner.cancel()
        try:
            await runner
        except asyncio.CancelledError:
            pass
    one = statistics.median(singles)
    return {
        "nodes": nodes,
        "pods_per_node": pods_per_node,
        "tick_1_changed_us": round(one * 1e6, 1),
        "tick_1_changed_us_p95": round(sorted(singles)[int(len(singles) * 0.95) - 1] * 1e6, 1),
        "tick_all_changed_ms": round(all_s * 1e3, 1),
        "per_node_in_all_changed_us": round(all_s / nodes * 1e6, 1),
        "all_over_one_ratio": round(all_s / one, 0) if one > 0 else None,
        "evaluations_per_s_controller": round(nodes / all_s) if all_s > 0 else None,
    }


def run(
    *,
    nodes: int = 5000,
    sizes: tuple[int, ...] = (500, 5000),
    pods_per_node: int = 20,
    rounds: int = 5,
    single_ticks: int = 200,
) -> dict[str, Any]:
    from chaos.bench.common import machine

    m = machine()
    pure = bench_decide(nodes, pods_per_node, rounds)
    ticks = [asyncio.run(_tick_costs(n, pods_per_node, single_ticks)) for n in sizes]
    return {"benchmark": "decide", "machine": m, "decide": pure, "ticks": ticks}


def render(report: dict[str, Any]) -> str:
    from chaos.bench.common import table

    d = report["decide"]
    lines = [
        f"decide(): {d['nodes']:,} nodes x {d['pods_per_node']} launcher pods, "
        f"best of {d['rounds']} rounds",
        table(
            ["evaluations/s", "µs/evaluation", "round (median)"],
            [[d["evaluations_per_s"], d["us_per_evaluation"], f"{d['round_s_median']} s"]],
        ),
        "",
        "controller tick (NodeScheduler + Controller.evaluate, dict-backed view, CPU time):",
        table(
            [
                "nodes",
                "1 changed: µs (p50)",
                "1 changed: µs (p95)",
                "all changed: ms",
                "µs/node (all)",
                "all/1",
                "evals/s",
            ],
            [
                [
                    t["nodes"],
                    t["tick_1_changed_us"],
                    t["tick_1_changed_us_p95"],
                    t["tick_all_changed_ms"],
                    t["per_node_in_all_changed_us"],
                    t["all_over_one_ratio"],
                    t["evaluations_per_s_controller"],
                ]
                for t in report["ticks"]
            ],
        ),
    ]
    return "\n".join(lines)
