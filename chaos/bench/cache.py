"""Benchmark 2, cache scale: VMIs and virt-launcher pods in the test cluster's real control
plane, and one real `node-watchdog controller` following them.

One control plane (etcd + kube-apiserver with the KubeVirt CRDs; the controller-manager and
scheduler stopped once ready: without kubelets the node lifecycle controller would mark every
node NotReady and evict the pods, and the pods are created bound). `nodes` Nodes, Ready, each
with a simulated agent heartbeating at 1 Hz over a real Mosquitto (`mqttload`), so the
controller is an ordinary leader with healthy nodes. VMIs (status: Running on their node,
Ready, LiveMigratable) and their launcher pods are added in steps up to each size; at each
size a fresh controller process is started and measured:

- sync: spawn → /readyz (every informer listed) and → leader; CPU seconds spent; RSS after;
- quiet: CPU rate with nothing but heartbeats (the baseline subtracted below);
- per event: `events` launcher pods change their Ready condition, then `events` VMIs change a
  condition, as fast as the API takes them; controller CPU above the baseline / events;
- relist after 410: etcd compacted (`ControlPlane.compact()`) with short watch timeouts
  (`WATCHDOG_WATCH_TIMEOUT_S=20`), so every informer's next watch gets a real 410 Gone and
  lists again; time until the pods and VMIs informers counted their `gone` restart, CPU and
  peak RSS meanwhile, and whether anything changed phase (it must not).

What this does not create: VirtualMachines, PVCs and the pods' status (the controller keeps a
pod's Ready bit, not the status's bulk); the sizes say how far one apiserver on this machine
got in the time allowed, and the table extrapolates to 100,000 linearly from the largest.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chaos.bench.common import ProcSampler, machine, summary, table
from chaos.bench.kubeload import (
    KubeClient,
    background,
    create_many,
    launcher_pod_body,
    node_body,
    vmi_body,
)
from chaos.bench.mqttload import AgentFleet
from chaos.bench.service import CONTROLLER_NAMESPACE, ControllerProcess, control_plane, mosquitto
from chaos.sim.cluster import crd_documents

NAMESPACE = "default"
VMI_PATH = f"/apis/kubevirt.io/v1/namespaces/{NAMESPACE}/virtualmachineinstances"
POD_PATH = f"/api/v1/namespaces/{NAMESPACE}/pods"
CRD_PATH = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"


def _vmi_name(i: int) -> str:
    return f"vm-{i}"


def _pod_name(i: int) -> str:
    return str(launcher_pod_body(NAMESPACE, _vmi_name(i), "", i)["metadata"]["name"])


def _node_of(i: int, nodes: int) -> str:
    return f"node-{i % nodes + 1}"


def _vmi_status(node: str, flip: bool = False) -> dict[str, Any]:
    return {
        "status": {
            "phase": "Running",
            "nodeName": node,
            "conditions": [
                {"type": "Ready", "status": "True"},
                {
                    "type": "LiveMigratable",
                    "status": "False" if flip else "True",
                    "reason": "DisksNotLiveMigratable" if flip else "",
                },
            ],
        }
    }


def _pod_status(ready: bool) -> dict[str, Any]:
    return {
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        }
    }


async def _patch_many(
    client: KubeClient, items: list[tuple[str, dict[str, Any]]], concurrency: int = 48
) -> float:
    queue: asyncio.Queue[tuple[str, dict[str, Any]] | None] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    for _ in range(concurrency):
        queue.put_nowait(None)
    t0 = time.monotonic()

    async def worker() -> None:
        while (item := await queue.get()) is not None:
            await client.request(
                "PATCH", item[0], item[1], content_type="application/merge-patch+json"
            )

    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(worker())
    return time.monotonic() - t0


@dataclass(frozen=True)
class Pace:
    """The benchmark's waits: long enough for steady numbers at full size; the smoke run
    shortens them, since it checks that the numbers are produced, not what they are."""

    settle_s: float = 5.0  # after the leader starts: its first evaluations
    quiet_s: float = 10.0  # the quiet baseline (heartbeats only) that events are measured on
    watch_timeout_s: int = 20  # the controller's watch timeout: a 410 is met at the next watch


async def _install_crds(client: KubeClient) -> None:
    for doc in crd_documents():
        await client.create(CRD_PATH, doc)
    names = [d["metadata"]["name"] for d in crd_documents()]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pending = 0
        for name in names:
            crd = await client.request("GET", f"{CRD_PATH}/{name}")
            conds = (crd.get("status") or {}).get("conditions") or []
            if not any(c.get("type") == "Established" and c.get("status") == "True" for c in conds):
                pending += 1
        if not pending:
            return
        await asyncio.sleep(0.5)
    raise TimeoutError("KubeVirt CRDs not established within 60s")


async def _grow(
    client: KubeClient, have: int, want: int, nodes: int, progress: Any
) -> dict[str, Any]:
    """Create VMIs (with their status) and launcher pods have+1..want."""
    idx = range(have + 1, want + 1)
    t0 = time.monotonic()
    vmis = await create_many(
        client,
        ((VMI_PATH, vmi_body(NAMESPACE, _vmi_name(i), _node_of(i, nodes))) for i in idx),
        progress=lambda k: progress(f"    {have + k:,} VMIs") if k % 10000 == 0 else None,
    )
    status_s = await _patch_many(
        client,
        [(f"{VMI_PATH}/{_vmi_name(i)}/status", _vmi_status(_node_of(i, nodes))) for i in idx],
    )
    pods = await create_many(
        client,
        (
            (POD_PATH, launcher_pod_body(NAMESPACE, _vmi_name(i), _node_of(i, nodes), i))
            for i in idx
        ),
        progress=lambda k: progress(f"    {have + k:,} pods") if k % 10000 == 0 else None,
    )
    total = time.monotonic() - t0
    return {
        "vmis": vmis,
        "vmi_status_s": round(status_s, 1),
        "pods": pods,
        "seconds": round(total, 1),
        "objects_per_s": round(2 * len(idx) / total, 1) if total else None,
    }


async def _measure(
    cp: Any,
    client: KubeClient,
    broker: Any,
    size: int,
    nodes: int,
    events: int,
    work_dir: Path,
    controller_source: Path | None,
    progress: Any,
    pace: Pace,
) -> dict[str, Any]:
    env = {
        "KUBECONFIG": str(cp.admin_kubeconfig),
        "WATCHDOG_MQTT__URL": broker.url,
        "WATCHDOG_WATCH_TIMEOUT_S": str(pace.watch_timeout_s),
    }
    ctl = ControllerProcess(work_dir, env, name=f"controller-{size}", source=controller_source)
    out: dict[str, Any] = {"vmis": size, "pods": size, "nodes": nodes}
    await ctl.start()
    try:
        pids = {"controller": ctl.pid or 0, **cp.pids()}
        sampler = ProcSampler(pids, interval_s=0.5)
        async with background({"sampler": sampler.run()}):
            t_spawn = time.monotonic()
            out["sync_s"] = round(await ctl.wait("ready", "ready", 900), 2)
            out["leader_s"] = round(await ctl.wait("leading", "leader", 300), 2)
            t_sync = time.monotonic()
            sampler.sample()
            sync = sampler.window("controller", t_spawn, t_sync) or {}
            out["sync_cpu_s"] = sync.get("cpu_s")
            out["sync_rss_mib_max"] = sync.get("rss_mib_max")
            progress(f"  {size:,}: synced in {out['sync_s']}s, RSS {sync.get('rss_mib_max')} MiB")
            await asyncio.sleep(pace.settle_s)  # the leader's first evaluations, then quiet
            # quiet baseline (heartbeats only)
            q0 = time.monotonic()
            sampler.sample()
            await asyncio.sleep(pace.quiet_s)
            sampler.sample()
            q1 = time.monotonic()
            quiet = sampler.window("controller", q0, q1) or {}
            base_rate = quiet.get("cpu_cores", 0.0)
            out["quiet"] = quiet
            out["rss_mib_steady"] = quiet.get("rss_mib_last")
            m0 = await ctl.metrics()
            # per-event: pods, then VMIs
            step = max(1, size // events)
            picks = list(range(1, size + 1, step))[:events]
            out["pod_events"] = await _burst(
                sampler,
                base_rate,
                [
                    (
                        f"{POD_PATH}/{_pod_name(i)}/status",
                        _pod_status(True),
                    )
                    for i in picks
                ],
                client,
            )
            out["vmi_events"] = await _burst(
                sampler,
                base_rate,
                [
                    (
                        f"{VMI_PATH}/{_vmi_name(i)}/status",
                        _vmi_status(_node_of(i, nodes), flip=True),
                    )
                    for i in picks
                ],
                client,
            )
            progress(
                f"  {size:,}: per pod event {out['pod_events']['cpu_us_per_event']} µs, "
                f"per VMI event {out['vmi_events']['cpu_us_per_event']} µs"
            )
            # relist after 410
            out["relist"] = await _relist(cp, ctl, sampler, pace)
            m1 = await ctl.metrics()
            before = m0.by("watchdog_transitions_total", "to")
            after = m1.by("watchdog_transitions_total", "to")
            out["transitions_during"] = {
                k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)
            }
            out["nodes_by_phase"] = {k: v for k, v in m1.by("watchdog_nodes", "phase").items() if v}
            progress(
                f"  {size:,}: relist after 410 in {out['relist'].get('seconds')}s, "
                f"peak RSS {out['relist'].get('rss_mib_max')} MiB"
            )
            end = ctl.stat()
            out["rss_mib_end"] = round(end.rss_bytes / 2**20, 1) if end else None
    finally:
        await ctl.stop()
    return out


async def _burst(
    sampler: ProcSampler,
    base_rate: float,
    items: list[tuple[str, dict[str, Any]]],
    client: KubeClient,
) -> dict[str, Any]:
    sampler.sample()
    t0 = time.monotonic()
    api_s = await _patch_many(client, items)
    await asyncio.sleep(3.0)  # the watch delivers the last ones; the scheduler evaluates them
    sampler.sample()
    t1 = time.monotonic()
    w = sampler.window("controller", t0, t1) or {}
    extra = max(0.0, w.get("cpu_s", 0.0) - base_rate * (t1 - t0))
    return {
        "events": len(items),
        "api_seconds": round(api_s, 2),
        "events_per_s_offered": round(len(items) / api_s, 1) if api_s else None,
        "controller_cpu_s": w.get("cpu_s"),
        "cpu_us_per_event": round(extra / len(items) * 1e6, 1) if items else None,
        "rss_mib_max": w.get("rss_mib_max"),
    }


async def _relist(
    cp: Any, ctl: ControllerProcess, sampler: ProcSampler, pace: Pace
) -> dict[str, Any]:
    def gone(m: Any, resource: str) -> float:
        return float(m.get("watchdog_watch_restarts_total", resource=resource, cause="gone"))

    m0 = await ctl.metrics()
    wanted = ("pods", "virtualmachineinstances.kubevirt.io")
    before = {r: gone(m0, r) for r in wanted}
    sampler.sample()
    t0 = time.monotonic()
    revision = await cp.compact()
    done_at: dict[str, float] = {}
    deadline = t0 + 180
    while time.monotonic() < deadline and len(done_at) < len(wanted):
        await asyncio.sleep(0.5)
        m = await ctl.metrics()
        for r in wanted:
            if r not in done_at and gone(m, r) > before[r]:
                done_at[r] = time.monotonic() - t0
    await asyncio.sleep(1.0)
    sampler.sample()
    t1 = time.monotonic()
    w = sampler.window("controller", t0, t1) or {}
    m1 = await ctl.metrics()
    return {
        "compacted_revision": revision,
        "seconds": round(max(done_at.values()), 1) if len(done_at) == len(wanted) else None,
        "relisted_after_s": {r: round(s, 1) for r, s in done_at.items()},
        "note": (
            "includes waiting for each watch's next restart "
            f"(timeout {0.8 * pace.watch_timeout_s:g}-{pace.watch_timeout_s} s)"
        ),
        "restarts_gone": {
            k: v for k, v in m1.by("watchdog_watch_restarts_total", "resource").items()
        },
        "cpu_s": w.get("cpu_s"),
        "rss_mib_max": w.get("rss_mib_max"),
    }


async def _run(
    sizes: tuple[int, ...],
    nodes: int,
    events: int,
    work_dir: Path,
    controller_source: Path | None,
    progress: Any,
    pace: Pace,
) -> dict[str, Any]:
    out: dict[str, Any] = {"steps": [], "creates": []}
    async with control_plane(work_dir, time_scale=1.0) as cp:
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
            await _install_crds(client)
            names = [f"node-{i}" for i in range(1, nodes + 1)]
            await create_many(client, (("/api/v1/nodes", node_body(n)) for n in names))
            async with mosquitto(work_dir) as broker:
                fleet = AgentFleet(broker.url, names, connections=max(1, nodes // 500))
                async with background({"agents": fleet.run()}):
                    have = 0
                    for size in sorted(sizes):
                        progress(f"cache: growing to {size:,} VMIs + {size:,} launcher pods")
                        grown = await _grow(client, have, size, nodes, progress)
                        grown["to"] = size
                        out["creates"].append(grown)
                        progress(
                            f"  created {size - have:,} pairs in {grown['seconds']}s "
                            f"({grown['objects_per_s']} objects/s)"
                        )
                        have = size
                        step = await _measure(
                            cp,
                            client,
                            broker,
                            size,
                            nodes,
                            events,
                            work_dir,
                            controller_source,
                            progress,
                            pace,
                        )
                        step["apiserver_rss_mib"] = _rss(cp.pids().get("kube-apiserver"))
                        step["etcd_rss_mib"] = _rss(cp.pids().get("etcd"))
                        step["load"] = [round(x, 2) for x in os.getloadavg()]
                        out["steps"].append(step)
        finally:
            await client.close()
    return out


def _rss(pid: int | None) -> float | None:
    from chaos.bench.common import ProcStat

    s = ProcStat.read(pid) if pid else None
    return round(s.rss_bytes / 2**20, 1) if s else None


def extrapolate(steps: list[dict[str, Any]], target: int = 100_000) -> dict[str, Any]:
    """Linear fit (least squares) of sync time and RSS against size, evaluated at `target`."""
    pts = [(s["vmis"], s) for s in steps]
    if len(pts) < 2:
        return {}

    def fit(key: str) -> float | None:
        xs = [x for x, s in pts if s.get(key) is not None]
        ys = [s[key] for _, s in pts if s.get(key) is not None]
        if len(xs) < 2:
            return None
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        den = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0
        return float(round(my + slope * (target - mx), 1))

    return {
        "target_vmis": target,
        "sync_s": fit("sync_s"),
        "rss_mib_steady": fit("rss_mib_steady"),
        "sync_rss_mib_max": fit("sync_rss_mib_max"),
        "method": "least-squares line through the measured sizes",
    }


def run(
    *,
    sizes: tuple[int, ...] = (10_000, 20_000, 50_000),
    nodes: int = 1000,
    events: int = 5000,
    work_dir: Path | None = None,
    controller_source: Path | None = None,
    progress: Any = print,
    pace: Pace | None = None,
) -> dict[str, Any]:
    m = machine()
    pace = pace or Pace()
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        result = asyncio.run(
            _run(sizes, nodes, events, work_dir or Path(tmp), controller_source, progress, pace)
        )
    result["extrapolated"] = extrapolate(result["steps"])
    return {"benchmark": "cache", "machine": m, **result}


def render(report: dict[str, Any]) -> str:
    rows = []
    for s in report["steps"]:
        rows.append(
            [
                s["vmis"],
                s["nodes"],
                s.get("sync_s"),
                s.get("sync_cpu_s"),
                s.get("sync_rss_mib_max"),
                s.get("rss_mib_steady"),
                s["pod_events"].get("cpu_us_per_event"),
                s["vmi_events"].get("cpu_us_per_event"),
                s["relist"].get("seconds"),
                s["relist"].get("rss_mib_max"),
                sum(s.get("transitions_during", {}).values()),
                s.get("apiserver_rss_mib"),
                s.get("etcd_rss_mib"),
                str(s.get("load")),
            ]
        )
    out = [
        table(
            [
                "VMIs+pods",
                "nodes",
                "sync s",
                "sync CPU s",
                "sync RSS max MiB",
                "steady RSS MiB",
                "µs/pod event",
                "µs/VMI event",
                "410 relist s",
                "relist RSS MiB",
                "transitions",
                "apiserver MiB",
                "etcd MiB",
                "load",
            ],
            rows,
        )
    ]
    creates = report.get("creates") or []
    if creates:
        out.append("")
        out.append(
            table(
                ["to", "created pairs", "seconds", "objects/s"],
                [[c["to"], c["pods"]["count"], c["seconds"], c["objects_per_s"]] for c in creates],
            )
        )
    ex = report.get("extrapolated") or {}
    if ex:
        out.append(
            f"\nextrapolated to {ex['target_vmis']:,} VMIs+pods ({ex['method']}): sync "
            f"{ex['sync_s']} s, steady RSS {ex['rss_mib_steady']} MiB, sync peak RSS "
            f"{ex['sync_rss_mib_max']} MiB"
        )
    return "\n".join(out)


__all__ = ["extrapolate", "render", "run", "summary"]
