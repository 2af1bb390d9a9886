"""Benchmark 1, heartbeat ingest: N agents at 1 Hz through a real Mosquitto into one real
`node-watchdog controller` process, on the test cluster's real control plane.

Per N: a fresh control plane (etcd + kube-apiserver; the controller-manager and scheduler are
stopped once it is ready, so their CPU goes to what is measured: nothing here needs them, and
without kubelets the node lifecycle controller would only mark nodes NotReady later), N Nodes
created Ready with their Leases, a `LeaseRenewer` renewing every Lease at the kubelet's cadence,
a real Mosquitto, N simulated agents (`mqttload`: raw MQTT, a few connections multiplexing the
node topics), and the controller with default timings. Then:

0. floor: before the controller starts, two bare subscribers (chaos/bench/floor.py, only
   receiving and JSON-decoding each heartbeat) are measured under the same load, one with the
   controller's own ingest link, one with aiomqtt over paho-mqtt; the controller's CPU per
   heartbeat is reported as a ratio to each (`steady.ratio_to_floor`, the link's;
   `steady.ratio_to_paho_floor`), so a machine's speed cancels out;
1. steady window: controller CPU seconds and RSS from /proc, heartbeats it accepted (its own
   `watchdog_heartbeats_total`), Lease events it received, and the load generators' lag;
2. optional py-spy profile of the controller (a separate window, so the numbers above are
   clean);
3. kills: `kill` nodes stop heartbeating and renewing their Lease (a power-off), a few seconds
   apart; detection delay = last heartbeat sent → the controller's `Unreachable` annotation
   seen through a watch (also → `Suspect`), and the controller's own
   `watchdog_detection_seconds`; every other node must stay Healthy (false SUSPECT /
   UNREACHABLE are counted, the target is zero).

At defaults a node becomes UNREACHABLE only when its heartbeat is older than
`unreachable_after_s` (4 s) AND a second source agrees: its peers, or the Lease (stale
`lease_stale_after_s`, 15 s, after its last renewal was seen; renewals every 10 s). With
`peers` on (the default, as on a real cluster) the simulated agents also play the killed
node's three ring predecessors: each reports it unreachable, as the real prober does after two
consecutive 1 s probe timeouts, 2-3 s after the kill (uniformly spread: the probes' phase is
random). The controller's handling of those reports (validation, quorum, wake-ups) is the real
one; the probing itself is exercised on real sockets by tests/integration/test_peer_probes.py
and test_service_peers.py. With `peers` off the Lease arithmetic bounds detection; the
`Suspect` delay (heartbeat only, 3 s) shows what ingest alone adds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from chaos.bench.common import ProcSampler, machine, self_cpu_s, summary, table
from chaos.bench.kubeload import (
    KubeClient,
    LeaseRenewer,
    PhaseWatch,
    background,
    create_many,
    lease_body,
    node_body,
    wait_until,
)
from chaos.bench.mqttload import AgentFleet
from chaos.bench.service import (
    CONTROLLER_NAMESPACE,
    ControllerProcess,
    control_plane,
    mosquitto,
    set_autogroup_nice,
)
from watchdog.decide.peer_probe import PeerView

log = logging.getLogger(__name__)

DOWN = ("Unreachable", "Fencing", "Resetting", "Reset")


async def run_one(
    n: int,
    *,
    window_s: float,
    kill: int,
    kill_gap_s: float,
    connections: int,
    lease_renew_s: float,
    controller_env: dict[str, str],
    peers: bool = True,
    profile_s: float,
    work_dir: Path,
    floor_s: float = 0.0,
    controller_source: Path | None = None,
    profile_dir: Path | None = None,
    controller_nice: int | None = None,
    progress: Any = print,
) -> dict[str, Any]:
    nodes = [f"node-{i}" for i in range(1, n + 1)]
    result: dict[str, Any] = {
        "nodes": n,
        "lease_renew_s": lease_renew_s,
        "controller_env": controller_env,
        "load_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    async with control_plane(work_dir / f"n{n}", time_scale=1.0) as cp:
        await cp.controller_manager_stop()
        await cp.scheduler_stop()
        client = KubeClient.for_control_plane(cp, pool=96)
        try:
            await client.create(
                "/api/v1/namespaces",
                {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": CONTROLLER_NAMESPACE},
                },
            )
            progress(f"  creating {n:,} Nodes and Leases")
            created_nodes = await create_many(
                client, (("/api/v1/nodes", node_body(x)) for x in nodes)
            )
            lease_path = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"
            created_leases = await create_many(client, ((lease_path, lease_body(x)) for x in nodes))
            result["create"] = {"nodes": created_nodes, "leases": created_leases}
            async with mosquitto(work_dir / f"n{n}") as broker:
                result.update(
                    await _measure(
                        cp,
                        client,
                        broker,
                        nodes,
                        window_s=window_s,
                        kill=kill,
                        kill_gap_s=kill_gap_s,
                        connections=connections,
                        lease_renew_s=lease_renew_s,
                        controller_env=controller_env,
                        peers=peers,
                        profile_s=profile_s,
                        floor_s=floor_s,
                        work_dir=work_dir / f"n{n}",
                        controller_source=controller_source,
                        profile_dir=profile_dir,
                        controller_nice=controller_nice,
                        progress=progress,
                    )
                )
        finally:
            await client.close()
    result["load_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


async def _measure(
    cp: Any,
    client: KubeClient,
    broker: Any,
    nodes: list[str],
    *,
    window_s: float,
    kill: int,
    kill_gap_s: float,
    connections: int,
    lease_renew_s: float,
    controller_env: dict[str, str],
    peers: bool = True,
    profile_s: float,
    work_dir: Path,
    controller_source: Path | None,
    profile_dir: Path | None,
    controller_nice: int | None,
    progress: Any,
    floor_s: float = 0.0,
) -> dict[str, Any]:
    fleet = AgentFleet(broker.url, nodes, connections=connections)
    renewer = LeaseRenewer(client, nodes, interval_s=lease_renew_s, concurrency=80)
    watch = PhaseWatch(client)
    env = {
        "KUBECONFIG": str(cp.admin_kubeconfig),
        "WATCHDOG_MQTT__URL": broker.url,
        **controller_env,
    }
    ctl = ControllerProcess(work_dir, env, source=controller_source, nice=controller_nice)
    out: dict[str, Any] = {}
    async with background(
        {"agents": fleet.run(), "lease renewer": renewer.run(), "phase watch": watch.run()}
    ) as tasks:
        await asyncio.wait_for(watch.synced.wait(), 60)
        await asyncio.sleep(2.0)  # every agent has published at least once
        if floor_s > 0:
            progress(f"  floor: a bare subscriber for {floor_s:.0f}s (the ingest link)")
            out["floor"] = await measure_floor(
                broker.url, fleet.prefix, floor_s, work_dir, controller_nice, client="link"
            )
            _check(tasks)
            progress(f"  floor: a bare subscriber for {floor_s:.0f}s (aiomqtt over paho)")
            out["floor_paho"] = await measure_floor(
                broker.url, fleet.prefix, floor_s, work_dir, controller_nice, client="paho"
            )
            _check(tasks)
        await ctl.start()
        try:
            out["controller_ready_s"] = round(await ctl.wait("ready", "ready", 300), 2)
            out["controller_leader_s"] = round(await ctl.wait("leading", "leader", 120), 2)
            progress(f"  controller ready in {out['controller_ready_s']}s, leading")
            pids = {"controller": ctl.pid or 0, "mosquitto": broker.pid or 0, **cp.pids()}
            sampler = ProcSampler(pids, interval_s=1.0)
            async with background({"sampler": sampler.run()}):
                await asyncio.sleep(min(10.0, window_s))  # warm-up: first evaluations, GC
                _check(tasks)
                # 1. steady window
                m0 = await ctl.metrics()
                t0, pub0, ren0, self0 = (
                    time.monotonic(),
                    fleet.published,
                    renewer.stats.renewed,
                    self_cpu_s(),
                )
                sampler.sample()
                await asyncio.sleep(window_s)
                sampler.sample()
                t1 = time.monotonic()
                m1 = await ctl.metrics()
                _check(tasks)
                accepted = m1.get("watchdog_heartbeats_total") - m0.get("watchdog_heartbeats_total")
                cw = sampler.window("controller", t0, t1) or {}
                out["steady"] = {
                    "seconds": round(t1 - t0, 1),
                    "heartbeats_published": fleet.published - pub0,
                    "heartbeats_accepted": int(accepted),
                    "heartbeats_per_s": round(accepted / (t1 - t0), 1),
                    "lease_renewals": renewer.stats.renewed - ren0,
                    "lease_renewals_per_s": round((renewer.stats.renewed - ren0) / (t1 - t0), 1),
                    "controller": cw,
                    "cpu_s_per_1000_heartbeats": (
                        round(cw["cpu_s"] / accepted * 1000, 4) if cw and accepted else None
                    ),
                    "others": {
                        name: sampler.window(name, t0, t1) for name in pids if name != "controller"
                    },
                    "bench_process_cpu_cores": round((self_cpu_s() - self0) / (t1 - t0), 3),
                    "rejected": {
                        k: v - m0.by("watchdog_heartbeats_rejected_total", "reason").get(k, 0.0)
                        for k, v in m1.by("watchdog_heartbeats_rejected_total", "reason").items()
                    },
                    "dirty_queue": m1.get("watchdog_queue_depth", queue="dirty_nodes"),
                }
                floor = out.get("floor") or {}
                if floor.get("cpu_s_per_1000") and out["steady"]["cpu_s_per_1000_heartbeats"]:
                    out["steady"]["ratio_to_floor"] = round(
                        out["steady"]["cpu_s_per_1000_heartbeats"] / floor["cpu_s_per_1000"], 2
                    )
                paho = out.get("floor_paho") or {}
                if paho.get("cpu_s_per_1000") and out["steady"]["cpu_s_per_1000_heartbeats"]:
                    out["steady"]["ratio_to_paho_floor"] = round(
                        out["steady"]["cpu_s_per_1000_heartbeats"] / paho["cpu_s_per_1000"], 2
                    )
                out["agents_lag"] = fleet.lag_summary()
                out["lease_renewer"] = {
                    "errors": renewer.stats.errors,
                    "late": renewer.stats.late,
                    "latency_s": summary(renewer.stats.latencies[-20000:]),
                }
                s = out["steady"]
                progress(
                    f"  steady {s['seconds']}s: {s['heartbeats_per_s']:,} hb/s accepted, "
                    f"controller {cw.get('cpu_cores')} cores, RSS {cw.get('rss_mib_max')} MiB"
                )
                # 2. profile (its own window)
                if profile_s > 0:
                    progress(f"  py-spy on the controller for {profile_s:.0f}s")
                    out["profile"] = await ctl.profile(
                        profile_s, (profile_dir or work_dir) / f"ingest-{len(nodes)}-profile"
                    )
                # 3. kills
                out["kills"] = await _kills(
                    fleet, renewer, watch, nodes, kill, kill_gap_s, progress, peers
                )
                out["peers"] = peers
                _check(tasks)
                m2 = await ctl.metrics()
                out["false_suspect"] = sorted(
                    x for x in watch.nodes_in(("Suspect",)) if x not in out["kills"]["killed"]
                )
                out["false_unreachable"] = sorted(
                    x for x in watch.nodes_in(DOWN) if x not in out["kills"]["killed"]
                )
                out["transitions_to"] = m2.by("watchdog_transitions_total", "to")
                count = m2.get("watchdog_detection_seconds_count")
                out["controller_detection"] = {
                    "count": int(count),
                    "mean_s": round(m2.get("watchdog_detection_seconds_sum") / count, 3)
                    if count
                    else None,
                }
                out["queue_overflow_log_lines"] = ctl.log_count("inbound queue full")
                end = ctl.stat()
                out["controller_rss_mib_end"] = round(end.rss_bytes / 2**20, 1) if end else None
        finally:
            await ctl.stop()
    return out


async def measure_floor(
    url: str,
    prefix: str,
    seconds: float,
    work_dir: Path,
    nice: int | None = None,
    client: str = "link",
) -> dict[str, Any]:
    """The bare subscriber (chaos/bench/floor.py) as its own process, under the same load and
    with the controller's priority (`nice`), so the two are compared on equal terms."""
    argv = [] if nice is None else ["nice", "-n", str(nice)]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        sys.executable,
        "-m",
        "chaos.bench.floor",
        url,
        prefix,
        "--warmup",
        str(min(3.0, seconds)),
        "--seconds",
        str(seconds),
        "--client",
        client,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=str(work_dir),
    )
    if nice is not None:
        set_autogroup_nice(proc.pid, nice)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), seconds + 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError("the floor subscriber did not finish") from None
    if proc.returncode != 0:
        raise RuntimeError(f"the floor subscriber failed: {err.decode(errors='replace')[-400:]}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


def _check(tasks: dict[str, asyncio.Task[Any]]) -> None:
    for name, task in tasks.items():
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise RuntimeError(f"{name} failed") from task.exception()


# The real prober: probes every 1 s, 1 s timeout, unreachable after 2 timeouts in a row.
PEER_REPORT_AFTER_S = (2.0, 3.0)
PEER_OBSERVERS = 3


async def _peers_report(fleet: AgentFleet, observers: list[str], victim: str, rng: Any) -> None:
    delays = sorted(rng.uniform(*PEER_REPORT_AFTER_S) for _ in observers)
    start = time.monotonic()
    for observer, delay in zip(observers, delays, strict=True):
        await asyncio.sleep(max(0.0, start + delay - time.monotonic()))
        fleet.report_peer(observer, victim, PeerView.UNREACHABLE)


async def _kills(
    fleet: AgentFleet,
    renewer: LeaseRenewer,
    watch: PhaseWatch,
    nodes: list[str],
    kill: int,
    gap_s: float,
    progress: Any,
    peers: bool = True,
) -> dict[str, Any]:
    rng = random.Random(8)
    victims = rng.sample(nodes, min(kill, len(nodes)))
    last_contact: dict[str, float] = {}
    killed_at: dict[str, float] = {}
    ring = sorted(nodes)
    reporters: list[asyncio.Task[None]] = []
    for i, node in enumerate(victims):
        if i:
            await asyncio.sleep(gap_s * rng.uniform(0.7, 1.3))
        killed_at[node] = time.monotonic()
        renewer.stop(node)
        last = fleet.kill(node)
        last_contact[node] = last if last is not None else killed_at[node]
        if peers:
            # Its ring predecessors probe it (decide/peer_ring.py: each node probes its k
            # successors in name order); the dead among them report nothing.
            at = ring.index(node)
            observers = [
                o
                for o in (ring[(at - k) % len(ring)] for k in range(1, PEER_OBSERVERS + 1))
                if o not in killed_at
            ]
            reporters.append(asyncio.create_task(_peers_report(fleet, observers, node, rng)))
    progress(f"  killed {len(victims)} nodes; waiting for UNREACHABLE")
    timeout = 120.0
    with contextlib.suppress(TimeoutError):
        await wait_until(
            lambda: all(any(watch.first(v, p, killed_at[v]) for p in DOWN) for v in victims),
            timeout,
            "every killed node UNREACHABLE",
        )
    await asyncio.sleep(3.0)  # anyone else going down right after would be a false positive
    for task in reporters:
        task.cancel()
    await asyncio.gather(*reporters, return_exceptions=True)
    detect: list[float] = []
    suspect: list[float] = []
    missed: list[str] = []
    per_node: dict[str, dict[str, float | None]] = {}
    for v in victims:
        after = killed_at[v]
        down_at = min(
            (t for p in DOWN if (t := watch.first(v, p, after)) is not None), default=None
        )
        sus_at = watch.first(v, "Suspect", after)
        per_node[v] = {
            "suspect_s": None if sus_at is None else round(sus_at - last_contact[v], 3),
            "unreachable_s": None if down_at is None else round(down_at - last_contact[v], 3),
        }
        if down_at is None:
            missed.append(v)
        else:
            detect.append(down_at - last_contact[v])
        if sus_at is not None:
            suspect.append(sus_at - last_contact[v])
    return {
        "killed": victims,
        "detection_s": summary(detect),
        "suspect_s": summary(suspect),
        "not_detected": missed,
        "per_node": per_node,
    }


def run(
    *,
    sizes: tuple[int, ...] = (1000, 5000),
    window_s: float = 60.0,
    kill: int = 5,
    kill_gap_s: float = 4.0,
    connections: int = 0,
    lease_renew_s: float = 10.0,
    controller_env: dict[str, str] | None = None,
    peers: bool = True,
    profile_s: float = 0.0,
    floor_s: float = 20.0,
    work_dir: Path | None = None,
    controller_source: Path | None = None,
    profile_dir: Path | None = None,
    controller_nice: int | None = None,
    progress: Any = print,
) -> dict[str, Any]:
    env = dict(controller_env or {})
    m = machine()
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        base = work_dir or Path(tmp)
        for n in sizes:
            progress(f"ingest: {n:,} agents")
            conns = connections or max(1, min(16, n // 500))
            runs.append(
                asyncio.run(
                    run_one(
                        n,
                        window_s=window_s,
                        kill=kill,
                        kill_gap_s=kill_gap_s,
                        connections=conns,
                        lease_renew_s=lease_renew_s,
                        controller_env=env,
                        peers=peers,
                        profile_s=profile_s,
                        floor_s=floor_s,
                        work_dir=base,
                        controller_source=controller_source,
                        profile_dir=profile_dir,
                        controller_nice=controller_nice,
                        progress=progress,
                    )
                )
            )
    return {
        "benchmark": "ingest",
        "machine": m,
        "load_generator": "raw MQTT 3.1.1, QoS 0, few connections multiplexing node topics",
        "controller_source": str(controller_source) if controller_source else "installed",
        "controller_nice": controller_nice,
        "runs": runs,
    }


def render(report: dict[str, Any]) -> str:
    rows = []
    for r in report["runs"]:
        s = r.get("steady", {})
        c = s.get("controller", {})
        k = r.get("kills", {})
        d = k.get("detection_s", {})
        sus = k.get("suspect_s", {})
        rows.append(
            [
                r["nodes"],
                s.get("heartbeats_per_s"),
                s.get("lease_renewals_per_s"),
                c.get("cpu_cores"),
                c.get("runqueue_wait_per_s"),
                s.get("cpu_s_per_1000_heartbeats"),
                (r.get("floor") or {}).get("cpu_s_per_1000"),
                s.get("ratio_to_floor"),
                (r.get("floor_paho") or {}).get("cpu_s_per_1000"),
                s.get("ratio_to_paho_floor"),
                c.get("rss_mib_max"),
                f"{sus.get('p50')}/{sus.get('p95')}",
                f"{d.get('p50')}/{d.get('p95')}/{d.get('max')}",
                f"{len(k.get('killed', []))}-{len(k.get('not_detected', []))}",
                len(r.get("false_suspect", [])),
                len(r.get("false_unreachable", [])),
                f"{r.get('load_at_start')}",
            ]
        )
    return table(
        [
            "nodes",
            "hb/s",
            "lease/s",
            "ctl cores",
            "ctl run-queue wait s/s",
            "CPU s/1k hb",
            "floor CPU s/1k (link)",
            "ratio",
            "floor CPU s/1k (paho)",
            "ratio (paho)",
            "RSS MiB",
            "suspect p50/p95 s",
            "unreach. p50/p95/max s",
            "killed-missed",
            "false SUSPECT",
            "false UNREACH.",
            "load 1/5/15",
        ],
        rows,
    )
