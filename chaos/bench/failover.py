"""Benchmark 4, failover: node power-off → every VM of that node Running elsewhere, over several
trials, the watchdog against the Harvester baselines, in one run, as p50/p95 and ratios.

A minimal loop on `SimCluster` (the chaos harness's runner did not exist when this was
written; `chaos/harness` is the place for richer scenarios). One test cluster per system, all
at the same `time_scale`:

- `watchdog`: real Mosquitto, one real `node-watchdog agent` per node, one real
  `node-watchdog controller`; no Harvester controller. The watchdog's settings are its
  real-world defaults compressed by the time scale (`chaos.harness.settings.scale_settings`,
  the same compression the harness uses; MQTT keepalive cannot go below 2 s).
- `harvester-1.7` / `harvester-1.6`: the simulated Harvester node-down controller with that
  version's default `vm-force-reset-policy` (1.7: period 15 s + vmMigrationTimeout 180 s; 1.6:
  period 300 s), no watchdog.

Per trial: power off a node that runs VMs (no TCP FIN, as a real power loss), time until each
of its VMs has a new copy started on another node (the ground-truth ledger, not a metric),
power the node back on and wait until the cluster is back to its baseline. Times are reported
in real-world seconds (measured ÷ time_scale).

Bias to know: the kube-controller-manager's pod GC period (20 s) is hard-coded and not
compressed, and Harvester 1.7 waits for it after its out-of-service taint; at time_scale 0.25
that can add up to (20 - 5) / 0.25 = 60 real-world seconds to the 1.7 baseline: the baseline
then looks slower than it is, and the ratios overstate the watchdog's advantage by up to that.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from chaos.bench.common import machine, summary, table
from chaos.bench.service import CONTROLLER_NAMESPACE, ControllerProcess
from chaos.sim.cluster import SimCluster, SimConfig
from chaos.sim.informer import NAMESPACES, ApiError, has_taint
from chaos.sim.ledger import StartReason

SYSTEMS = ("watchdog", "harvester-1.7", "harvester-1.6")
STATE_ANNOTATION = "node-watchdog.kubevirt.io/state"
OUT_OF_SERVICE = "node.kubernetes.io/out-of-service"
DRAIN = "kubevirt.io/drain"
# Real-world upper bound of one failover, for the wait: 1.6 defaults are ~50 s + 300 s + restart.
REAL_WORLD_TIMEOUT_S = 600.0


def watchdog_env(time_scale: float) -> tuple[dict[str, str], list[str]]:
    from chaos.harness.settings import scale_settings

    scaled = scale_settings({}, time_scale)
    return dict(scaled.env), list(scaled.notes)


def _phase(cluster: SimCluster, node: str) -> str:
    obj = cluster.node(node) or {}
    raw = ((obj.get("metadata") or {}).get("annotations") or {}).get(STATE_ANNOTATION)
    if not raw:
        return "Healthy"
    try:
        return str(json.loads(raw).get("phase") or "Healthy")
    except ValueError:
        return "?"


def _restarted_elsewhere(cluster: SimCluster, vm: str, node: str, after: float) -> float | None:
    rec = cluster.ledger.vms.get(f"{cluster.config.vm_namespace}/{vm}")
    for c in rec.copies if rec else ():
        if c.node != node and c.start_reason is StartReason.STARTED and c.started_mono >= after:
            return c.started_mono
    return None


async def _wait(predicate: Any, timeout_s: float, what: str, poll_s: float = 0.1) -> float:
    t0 = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f}s")
        await asyncio.sleep(poll_s)


async def _trials(
    system: str,
    cluster: SimCluster,
    trials: int,
    scale: float,
    ctl: ControllerProcess | None,
    progress: Any,
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    nodes = list(cluster.fleet.members)
    k = 0
    for trial in range(trials):
        victim = None
        for _ in range(len(nodes)):
            cand = nodes[k % len(nodes)]
            k += 1
            if cluster.vms_on(cand):
                victim = cand
                break
        if victim is None:
            raise RuntimeError("no node runs a VM")
        vms = cluster.vms_on(victim)
        t0 = time.monotonic()
        await cluster.faults.apply("poweroff", victim)
        timeout = REAL_WORLD_TIMEOUT_S * scale + 60
        await _wait(
            lambda vms=vms, victim=victim, t0=t0: all(
                _restarted_elsewhere(cluster, vm, victim, t0) for vm in vms
            ),
            timeout,
            f"{system} trial {trial + 1}: VMs of {victim} running elsewhere",
        )
        per_vm = {
            vm: round(((_restarted_elsewhere(cluster, vm, victim, t0) or t0) - t0) / scale, 2)
            for vm in vms
        }
        totals = cluster.ledger.totals()
        results.append(
            {
                "trial": trial + 1,
                "node": victim,
                "vms": len(vms),
                "failover_s": per_vm,
                "split_brain_s": totals.get("split_brain_s"),
                "lost": totals.get("lost"),
            }
        )
        worst = max(per_vm.values())
        progress(f"  {system} trial {trial + 1}: {victim}, {len(vms)} VMs, worst {worst:.1f}s")
        # Back to the baseline: node on, Ready, untainted (and Healthy for the watchdog).
        await cluster.faults.apply("poweron", victim)
        await _wait(
            lambda victim=victim: (
                cluster.node_ready(victim) == "True"
                and not has_taint(cluster.node(victim) or {}, OUT_OF_SERVICE)
                and not has_taint(cluster.node(victim) or {}, DRAIN)
                and (ctl is None or _phase(cluster, victim) == "Healthy")
                and cluster.all_running()
            ),
            REAL_WORLD_TIMEOUT_S * scale + 120,
            f"{system}: {victim} back to baseline",
        )
        await asyncio.sleep(2.0)
    return results


async def _one_system(
    system: str,
    *,
    trials: int,
    time_scale: float,
    nodes: int,
    vms: int,
    work_dir: Path,
    progress: Any,
) -> dict[str, Any]:
    notes: list[str] = []
    if system == "watchdog":
        env, notes = watchdog_env(time_scale)
        config = SimConfig(
            nodes=nodes,
            vms=vms,
            time_scale=time_scale,
            broker="mosquitto",
            agents=True,
            agent_env=env,
            harvester="none",
            work_dir=work_dir / system,
        )
    else:
        env = {}
        config = SimConfig(
            nodes=nodes,
            vms=vms,
            time_scale=time_scale,
            harvester=system.removeprefix("harvester-"),
            work_dir=work_dir / system,
        )
    t0 = time.monotonic()
    ctl: ControllerProcess | None = None
    async with SimCluster(config, progress=lambda _l: None) as cluster:
        await cluster.wait_ready(180)
        if system == "watchdog":
            assert cluster.broker is not None
            with contextlib.suppress(ApiError):
                await cluster.kube.create(
                    NAMESPACES,
                    {
                        "apiVersion": "v1",
                        "kind": "Namespace",
                        "metadata": {"name": CONTROLLER_NAMESPACE},
                    },
                )
            ctl = ControllerProcess(
                work_dir / system,
                {
                    **env,
                    "KUBECONFIG": str(cluster.kubeconfig),
                    "WATCHDOG_MQTT__URL": cluster.broker.url,
                },
            )
            await ctl.start()
        try:
            if ctl is not None:
                await ctl.wait("leading", "leader", 120)
                await asyncio.sleep(3.0)  # every agent heard
            ready_s = time.monotonic() - t0
            progress(f"failover: {system} cluster ready in {ready_s:.0f}s")
            results = await _trials(system, cluster, trials, time_scale, ctl, progress)
        finally:
            if ctl is not None:
                await ctl.stop()
    values = [v for r in results for v in r["failover_s"].values()]
    return {
        "system": system,
        "time_scale": time_scale,
        "trials": results,
        "failover_s": summary(values, 2),
        "split_brain_s": max((r["split_brain_s"] or 0) for r in results) if results else None,
        "lost": max((r["lost"] or 0) for r in results) if results else None,
        "notes": notes,
    }


def run(
    *,
    systems: tuple[str, ...] = SYSTEMS,
    trials: int = 5,
    time_scale: float = 0.25,
    nodes: int = 4,
    vms: int = 8,
    work_dir: Path | None = None,
    progress: Any = print,
) -> dict[str, Any]:
    m = machine()
    out = []
    with tempfile.TemporaryDirectory(prefix="bench-failover-") as tmp:
        for system in systems:
            out.append(
                asyncio.run(
                    _one_system(
                        system,
                        trials=trials,
                        time_scale=time_scale,
                        nodes=nodes,
                        vms=vms,
                        work_dir=work_dir or Path(tmp),
                        progress=progress,
                    )
                )
            )
    base = next((s for s in out if s["system"] == "watchdog"), None)
    ratios: dict[str, dict[str, float | None]] = {}
    if base is not None and base["failover_s"].get("n"):
        for s in out:
            if s is base or not s["failover_s"].get("n"):
                continue
            ratios[s["system"]] = {
                p: round(s["failover_s"][p] / base["failover_s"][p], 1)
                if base["failover_s"][p]
                else None
                for p in ("p50", "p95")
            }
    return {
        "benchmark": "failover",
        "machine": m,
        "method": "minimal SimCluster loop (chaos/bench/failover.py), power-off, ledger truth",
        "systems": out,
        "ratios_vs_watchdog": ratios,
    }


def render(report: dict[str, Any]) -> str:
    rows = []
    for s in report["systems"]:
        f = s["failover_s"]
        r = report["ratios_vs_watchdog"].get(s["system"], {})
        rows.append(
            [
                s["system"],
                len(s["trials"]),
                f.get("n"),
                f.get("p50"),
                f.get("p95"),
                f.get("max"),
                "1.0" if s["system"] == "watchdog" else r.get("p50"),
                "1.0" if s["system"] == "watchdog" else r.get("p95"),
                s.get("split_brain_s"),
                s.get("lost"),
            ]
        )
    scale = report["systems"][0]["time_scale"] if report["systems"] else "?"
    return f"power-off → VM Running elsewhere, real-world seconds (time scale {scale}):\n" + table(
        [
            "system",
            "trials",
            "VMs",
            "p50 s",
            "p95 s",
            "max s",
            "p50 x watchdog",
            "p95 x watchdog",
            "split-brain s",
            "lost",
        ],
        rows,
    )
