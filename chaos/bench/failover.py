"""Benchmark 4, failover: node power-off → its VMs Running elsewhere, over several trials, the
watchdog against the Harvester baselines, in one run, as p50/p95 and ratios.

It calls the chaos harness's runner (`chaos.harness.runner.run_scenario`) on the shipped
`power-off` scenario (4 nodes, 8 VMs, node-4 loses power: no FIN on any socket), with the
systems and repetitions asked for: one fresh test cluster per system and repetition, the
watchdog as it is deployed (a real agent on every node, `node-watchdog run` replicas on two
nodes, real Mosquitto) with its real-world defaults compressed by the time scale, Harvester
1.7 / pre-1.7 (`harvester-1.6`) with their default `vm-force-reset-policy`. The watchdog runs
alone, the two baselines side by side (they are cheap: no agents, no controllers).

Per VM, the harness's timeline (power-off → detected → reset → Running again, from the
ground-truth ledger and API watches) gives `running_s` in wall seconds; reported here in
real-world seconds (÷ time scale).

Bias to know: the kube-controller-manager's pod GC period (20 s) is hard-coded and not
compressed, and Harvester 1.7 waits for it after its out-of-service taint; at time scale 0.25
that can add up to (20 - 5) / 0.25 = 60 real-world seconds to the 1.7 baseline: the baseline
then looks slower than it is, and the ratios overstate the watchdog's advantage by up to that.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

from chaos.bench.common import machine, summary, table

SYSTEMS = ("watchdog", "harvester-1.7", "harvester-1.6")


# The watchdog's fence modes this benchmark can compare (`--fence`): `self` is the agent's
# self-fence (watchdog device + safe delay); `power` switches the node off through its BMC
# (fence_redfish against the test cluster's Redfish emulator) and resets once it reads off.
FENCES = ("self", "power")
POWER_LABEL = "watchdog (fence power)"


async def _run(
    systems: tuple[str, ...],
    trials: int,
    time_scale: float,
    nodes: int | None,
    vms: int | None,
    work_dir: Path,
    progress: Any,
    fence: str = "self",
    period_s: float | None = None,
) -> tuple[Any, Any]:
    from chaos.harness import scenario as scenarios
    from chaos.harness.runner import RunOptions, run_scenario
    from chaos.sim.binaries import ensure_binaries

    base = scenarios.load("power-off")
    cluster = base.cluster
    update: dict[str, Any] = {}
    if nodes is not None:
        update["nodes"] = nodes
    if vms is not None:
        update["vms"] = vms
    watchdog = base.watchdog
    if period_s is not None:
        watchdog = watchdog.model_copy(
            update={"settings": {**watchdog.settings, "policy.period_s": period_s}}
        )
    if fence == "power":
        update["bmcs"] = True
        watchdog = watchdog.model_copy(
            update={"settings": {**watchdog.settings, "fence_mode": "power"}}
        )
    scenario = base.model_copy(
        update={
            "systems": list(systems),
            "repetitions": trials,
            "time_scale": time_scale,
            "cluster": cluster.model_copy(update=update),
            "watchdog": watchdog,
        }
    )
    binaries = await asyncio.to_thread(ensure_binaries)
    opts = RunOptions(
        binaries=binaries,
        progress=progress,
        parallel="baselines",
        live=False,
        work_root=work_dir / fence,
    )
    return scenario, await run_scenario(scenario, "power-off", opts)


async def _run_all(
    systems: tuple[str, ...],
    fences: tuple[str, ...],
    trials: int,
    time_scale: float,
    nodes: int | None,
    vms: int | None,
    work_dir: Path,
    progress: Any,
    period_s: float | None = None,
) -> tuple[Any, list[tuple[str, str, Any]]]:
    """(scenario, [(label, system, result)]): the systems asked for as they are (the watchdog
    with its self-fence, when `self` is among the fences), then the watchdog alone with
    `fence_mode: power` on machines with BMCs, when `power` is."""
    first = systems if "self" in fences else tuple(s for s in systems if s != "watchdog")
    runs: list[tuple[str, tuple[str, ...]]] = [("self", first)] if first else []
    if "power" in fences and "watchdog" in systems:
        runs.append(("power", ("watchdog",)))
    out: list[tuple[str, str, Any]] = []
    scenario = None
    for fence, run_systems in runs:
        sc, result = await _run(
            run_systems, trials, time_scale, nodes, vms, work_dir, progress, fence, period_s
        )
        scenario = scenario or sc
        out += [(POWER_LABEL if fence == "power" else s, s, result) for s in run_systems]
    return scenario, out


def run(
    *,
    systems: tuple[str, ...] = SYSTEMS,
    fences: tuple[str, ...] = ("self",),
    trials: int = 5,
    time_scale: float = 0.25,
    nodes: int | None = None,
    vms: int | None = None,
    work_dir: Path | None = None,
    progress: Any = print,
    period_s: float | None = None,
) -> dict[str, Any]:
    m = machine()
    with tempfile.TemporaryDirectory(prefix="bench-failover-") as tmp:
        scenario, labelled = asyncio.run(
            _run_all(
                systems,
                fences,
                trials,
                time_scale,
                nodes,
                vms,
                work_dir or Path(tmp),
                progress,
                period_s,
            )
        )
    scale = scenario.time_scale
    out: list[dict[str, Any]] = []
    for label, system, result in labelled:
        runs = result.runs_of(system)
        running: list[float] = []
        detection: list[float] = []
        trials_out = []
        for r in runs:
            per_vm = {
                tl.vm: None if tl.running_s is None else round(tl.running_s / scale, 2)
                for tl in r.vms
                if tl.must_restart
            }
            running += [v for v in per_vm.values() if v is not None]
            detection += [tl.detection_s / scale for tl in r.vms if tl.detection_s is not None]
            trials_out.append(
                {
                    "trial": r.repetition,
                    "vms": len(per_vm),
                    "failover_s": per_vm,
                    "not_running": [vm for vm, v in per_vm.items() if v is None],
                    "timed_out": r.timed_out,
                    "crashed": r.crashed,
                    "error": r.error,
                    "invariants": r.invariants,
                    "failures": r.failures,
                    "fence_runs": _fence_runs(r.watchdog),
                }
            )
        out.append(
            {
                "system": label,
                "time_scale": scale,
                "trials": trials_out,
                "failover_s": summary(running, 2),
                "detection_s": summary(detection, 2),
                "lost": sum(len(t["not_running"]) for t in trials_out),
                "split_brain_s": max(
                    (float(t["invariants"].get("split_brain_s") or 0.0) for t in trials_out),
                    default=0.0,
                ),
            }
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
        "method": "chaos harness runner, scenario power-off (node-4 loses power), "
        f"{trials} repetitions per system, time scale {scale}; watchdog fence modes "
        f"{', '.join(fences)} (power: fence_redfish against a Redfish emulator per machine, "
        "which applies a power change 1 to 11 s after the request, not compressed by the "
        "time scale); the watchdog's reset period (policy.period_s) "
        + ("the shipped 15 s" if period_s is None else f"{period_s:g} s"),
        "cluster": {"nodes": scenario.cluster.nodes, "vms": scenario.cluster.vms},
        "watchdog_settings_notes": list(labelled[0][2].watchdog_settings.notes)
        if labelled and labelled[0][2].watchdog_settings
        else [],
        "systems": out,
        "ratios_vs_watchdog": ratios,
    }


def _fence_runs(watchdog: dict[str, Any] | None) -> dict[str, float]:
    """The controller replicas' fence runs (fence mode power: fence_redfish), by result, from
    their last /metrics: {"success": n, "failed": m}; empty for the self-fence."""
    runs: dict[str, float] = {}
    for replica in ((watchdog or {}).get("replicas") or {}).values():
        for key, n in (replica.get("actions") or {}).items():
            action, _, result = key.partition("/")
            if action == "RunFenceHook":
                runs[result] = runs.get(result, 0.0) + n
    return runs


def render(report: dict[str, Any]) -> str:
    rows = []
    for s in report["systems"]:
        f = s["failover_s"]
        d = s["detection_s"]
        r = report["ratios_vs_watchdog"].get(s["system"], {})
        rows.append(
            [
                s["system"],
                len(s["trials"]),
                f.get("n"),
                d.get("p50"),
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
            "detected p50 s",
            "running p50 s",
            "running p95 s",
            "max s",
            "p50 x watchdog",
            "p95 x watchdog",
            "split-brain s",
            "not running",
        ],
        rows,
    )
