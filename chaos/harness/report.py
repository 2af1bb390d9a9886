"""What a chaos run says: the verdict, report.md, results.json, timeline.png, the terminal table.

Owns: the overall verdict of a scenario (every run's `expect` violations, crashes and budget
misses), the side-by-side table (p50/p95/max per system of detection, reset and VM running
again, in real-world equivalents and in wall seconds, with the ratio to the watchdog), and the
three files of a report directory. The first lines of report.md are the ledger's invariants.

Must not: run or measure anything.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from chaos.harness import measure
from chaos.harness.measure import Stat
from chaos.harness.runner import ScenarioResult

CAVEATS = (
    "Processing latencies (API round trips, process scheduling, Python event loops) are not "
    "compressed by any factor: real-world equivalents of small wall times are pessimistic, for "
    "every system alike.",
    "kube-controller-manager's pod GC runs every 20 s whatever the time scale (hard-coded): the "
    "out-of-service path (Harvester 1.7, Kubernetes' non-graceful shutdown) can wait up to 20 s "
    "wall for it, which a small time scale turns into minutes of real-world equivalent — an "
    "upper bound for those systems, not a measurement of them.",
)


@dataclass
class Verdict:
    ok: bool
    failures: list[str] = field(default_factory=list)
    budgets: list[tuple[str, bool, str]] = field(default_factory=list)


def verdict(result: ScenarioResult) -> Verdict:
    sc = result.scenario
    failures: list[str] = []
    for run in result.runs:
        failures.extend(f"{run.system}#{run.repetition}: {f}" for f in run.failures)
    budgets: list[tuple[str, bool, str]] = []
    for system in sc.systems:
        runs = result.runs_of(system)
        if not runs:
            continue
        stats = measure.system_stats(runs)
        checks = measure.budget_checks(
            system, stats, sc.budgets.get(system), sc.time_scale, sc.budget_slack_s
        )
        budgets.extend(checks)
        failures.extend(f"budget {text}" for _, ok, text in checks if not ok)
    return Verdict(ok=not failures and bool(result.runs), failures=failures, budgets=budgets)


# --- the side-by-side table ---------------------------------------------------------------------


def _cell(s: Stat, scale: float) -> str:
    if s.n == 0:
        return "—"
    if s.missing == s.n:
        return f"none within {s.cap_s / scale:.0f}"

    def one(v: float | None) -> str:
        if v is None:
            return f">{s.cap_s / scale:.0f}"
        return f"{v / scale:.1f}" if v / scale < 10 else f"{v / scale:.0f}"

    return " / ".join(one(v) for v in (s.p50, s.p95, s.max))


def _wall_cell(s: Stat) -> str:
    if s.n == 0:
        return "—"
    if s.missing == s.n:
        return f"none within {s.cap_s:.1f}"

    def one(v: float | None) -> str:
        return f">{s.cap_s:.1f}" if v is None else f"{v:.2f}"

    return " / ".join(one(v) for v in (s.p50, s.p95, s.max))


def _ratio(s: Stat, ref: Stat | None) -> str:
    if ref is None or ref.p50 is None or ref.p50 <= 0 or s.n == 0:
        return "—"
    if s.p50 is None:
        return f"> {s.cap_s / ref.p50:.1f}x"
    return f"{s.p50 / ref.p50:.1f}x"


def table_rows(result: ScenarioResult) -> list[dict[str, Any]]:
    rows = []
    ref_stats = (
        measure.system_stats(result.runs_of("watchdog")) if result.runs_of("watchdog") else None
    )
    for system in result.scenario.systems:
        runs = result.runs_of(system)
        if not runs:
            continue
        stats = measure.system_stats(runs)
        rows.append(
            {
                "system": system,
                "stats": stats,
                "vms": stats["running"].n,
                "ratio": {
                    k: _ratio(stats[k], ref_stats[k] if ref_stats else None) for k in measure.PHASES
                },
                "crashed": "CRASHED"
                if any(r.crashed for r in runs)
                else "FAILED"
                if any(r.error for r in runs)
                else "",
            }
        )
    return rows


def side_by_side(result: ScenarioResult, *, markdown: bool = False) -> str:
    scale = result.scenario.time_scale
    rows = table_rows(result)
    head = [
        "system",
        "VMs",
        "detection p50/p95/max",
        "reset p50/p95/max",
        "running again p50/p95/max",
        "running p50 ÷ watchdog",
    ]
    body = []
    for r in rows:
        st = r["stats"]
        body.append(
            [
                r["system"] + (f" ({r['crashed']})" if r["crashed"] else ""),
                str(r["vms"]),
                _cell(st["detection"], scale),
                _cell(st["reset"], scale),
                _cell(st["running"], scale),
                r["ratio"]["running"],
            ]
        )
    wall_head = ["system", "detection", "reset", "running again"]
    wall_body = [
        [
            r["system"],
            _wall_cell(r["stats"]["detection"]),
            _wall_cell(r["stats"]["reset"]),
            _wall_cell(r["stats"]["running"]),
        ]
        for r in rows
    ]
    title = (
        f"Real-world equivalent seconds from the node's fault (wall ÷ time scale {scale:g}); "
        "'>N': not reached within the N s observed"
    )
    wall_title = f"Wall seconds measured at time scale {scale:g} (p50 / p95 / max)"
    if markdown:
        return "\n".join(
            [
                f"{title}:",
                "",
                *_md(head, body),
                "",
                f"{wall_title}:",
                "",
                *_md(wall_head, wall_body),
            ]
        )
    return "\n".join(
        [title + ":", *_plain(head, body), "", wall_title + ":", *_plain(wall_head, wall_body)]
    )


def _md(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _plain(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [
        fmt.format(*r) for r in rows
    ]


# --- invariants lines ---------------------------------------------------------------------------


def invariant_lines(result: ScenarioResult) -> list[str]:
    lines = []
    asserted = set(result.scenario.expect.systems)
    for run in result.runs:
        inv = run.invariants
        tag = f"{run.system}" + (f"#{run.repetition}" if result.scenario.repetitions > 1 else "")
        if not inv:
            lines.append(f"- {tag}: no ledger (run did not complete: {run.crashed or run.error})")
            continue
        held = not any(
            f.startswith(("split-brain", "crashed")) or "lost" in f or "false resets" in f
            for f in run.failures
        )
        mark = ("held" if held else "VIOLATED") if run.system in asserted else "reported only"
        if inv.get("ground_truth") is False:
            lines.append(
                f"- {tag} (real cluster): split-brain and false resets not measurable from the "
                f"API (no ground truth) · lost VMs {inv['lost']} — {mark}"
            )
            continue
        lines.append(
            f"- {tag}: split-brain {inv['split_brain_s']:g} VM-s · lost VMs {inv['lost']} · "
            f"false resets {inv['false_resets']} — {mark}"
            + (f" · CRASHED: {run.crashed.splitlines()[0]}" if run.crashed else "")
            + (f" · RUN FAILED: {run.error}" if run.error else "")
        )
    return lines


# --- files --------------------------------------------------------------------------------------


def results_json(result: ScenarioResult, v: Verdict) -> dict[str, Any]:
    sc = result.scenario
    scaled = result.watchdog_settings
    return {
        "scenario": sc.model_dump(),
        "source": result.source,
        "time_scale": sc.time_scale,
        "started_at": result.started_at,
        "wall_s": result.wall_s,
        "verdict": {"ok": v.ok, "failures": v.failures},
        "budgets": [{"name": n, "met": ok, "detail": d} for n, ok, d in v.budgets],
        "watchdog_settings": {
            "real_world_s": scaled.real_world,
            "scaled_s": scaled.scaled,
            "env": scaled.env,
            "notes": scaled.notes,
        }
        if scaled
        else None,
        "systems": {
            system: {
                "stats": {
                    k: s.to_json(sc.time_scale)
                    for k, s in measure.system_stats(result.runs_of(system)).items()
                },
                "runs": [r.to_json() for r in result.runs_of(system)],
            }
            for system in sc.systems
            if result.runs_of(system)
        },
        "caveats": list(CAVEATS),
    }


def validity_line(result: ScenarioResult) -> str:
    """Whether the runs measured the systems or the test cluster's own lag (loop_lag.py)."""
    invalid = [
        f"{r.system} #{r.repetition} (p99 {r.sim_lag['p99_ms']:g} ms > {r.sim_lag['bound_ms']:g})"
        for r in result.runs
        if r.sim_lag and not r.sim_lag["valid"]
    ]
    if invalid:
        return (
            "Validity: **INVALID** — the test cluster's own event loop lagged more than 10 % of "
            "the smallest modelled interval (p99) in " + ", ".join(invalid) + ": its numbers "
            "measure the test cluster, not the systems; rerun at a larger time scale."
        )
    if any(not r.sim_lag for r in result.runs):
        return "Validity: not measured for every run (a run that never got to its faults)."
    return (
        "Validity: **valid** — the test cluster's own event-loop lag stayed within 10 % of the "
        "smallest modelled interval (p99) in every run."
    )


def report_md(result: ScenarioResult, v: Verdict, png: str | None) -> str:
    sc = result.scenario
    scale = sc.time_scale
    out = [
        f"# Chaos run `{sc.name}`: {'PASS' if v.ok else 'FAIL'}",
        "",
        "Invariants from the ground-truth ledger (asserted for "
        f"{', '.join(sc.expect.systems)}; other systems are reported only):",
        "",
        *invariant_lines(result),
        "",
    ]
    if v.ok:
        out.append("Verdict: **PASS** — every invariant and expectation held, every budget met.")
    else:
        out.append("Verdict: **FAIL**")
        out += [f"- {f}" for f in v.failures]
    out += ["", validity_line(result)]
    out += [
        "",
        f"Time scale **{scale:g}**: every timing of every system (Kubernetes, the simulated "
        "machines, Harvester, the watchdog) ran x"
        f"{scale:g}; real-world equivalents are wall seconds ÷ {scale:g}. Scenario "
        f"`{result.source}`, started {result.started_at}, {result.wall_s:.0f}s wall, "
        f"{sc.repetitions} repetition(s).",
        "",
        f"{sc.description.strip()}",
        "",
        "## Side by side",
        "",
        side_by_side(result, markdown=True),
        "",
        "Detection: the watchdog's phase became Unreachable/Fencing/Degraded (Node annotation); "
        "for Harvester and Kubernetes alone, Ready left True. Reset: the VM's launcher pod was "
        "deleted from the API. Running again: ground truth, the VM's new copy started.",
        "",
    ]
    if png:
        out += [f"![timeline]({png})", ""]
    if v.budgets:
        out += ["## Budgets", ""]
        out += [f"- {'met' if ok else '**missed**'}: {d}" for _, ok, d in v.budgets]
        out.append("")
    out += ["## Runs", ""]
    for run in result.runs:
        c = run.counts
        out.append(
            f"### {run.system} #{run.repetition}: "
            + ("CRASHED" if run.crashed else "ERROR" if run.error else "completed")
        )
        out.append("")
        out.append(
            f"- {run.wall_s:.1f}s wall, watched {run.observed_s:.1f}s "
            f"({run.observed_s / scale:.0f}s real-world) after the first fault"
            + (", stopped at the timeout" if run.timed_out else "")
        )
        if run.sim_lag:
            lag = run.sim_lag
            out.append(
                f"- {'valid' if lag['valid'] else '**invalid**'}: test-cluster loop lag p50 "
                f"{lag['p50_ms']:g} ms, p99 {lag['p99_ms']:g} ms, max {lag['max_ms']:g} ms, "
                f"{lag['stalls_over_bound']} of {lag['samples']} wake-ups over the bound of "
                f"{lag['bound_ms']:g} ms"
            )
        if run.crashed:
            out += ["- crashed component:", "", "```", run.crashed, "```", ""]
        if run.error:
            out.append(f"- error: {run.error}")
        if c:
            out.append(
                f"- resets {c.get('resets', 0)} · fences {c.get('fences', 0)} · disrupted VMs "
                f"{c.get('disrupted_vms', 0)} · live-migrated VMs {c.get('migrated_vms', 0)}"
            )
        out += [f"- fault skipped: {s}" for s in run.skipped_faults]
        for f in run.failures:
            out.append(f"- **failed**: {f}")
        for n in run.notes:
            out.append(f"- {n}")
        if run.watchdog:
            leaders = ", ".join(run.watchdog.get("leaders_seen") or []) or "-"
            holds = ", ".join(run.watchdog.get("resets_held_seen") or []) or "none"
            out.append(f"- watchdog leaders seen: {leaders}; reset holds seen: {holds}")
            for node, s in (run.watchdog.get("replicas") or {}).items():
                hist = ", ".join(
                    f"{k} {int(s[k]['count'])} in {s[k]['sum_s']:.2f}s"
                    for k in ("detection", "reset", "reschedule", "failover")
                    if s.get(k, {}).get("count")
                )
                out.append(f"- replica on {node} (last /metrics): {hist or 'no failover recorded'}")
        if run.vms:
            out += [
                "",
                "| VM | node | fault | detected | reset | running again | on | strategy |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for tl in run.vms:
                out.append(
                    f"| {tl.vm} | {tl.node} | {tl.action} @ {tl.fault_at_s:.2f}s | "
                    f"{_both(tl.detection_s, scale)} | {_both(tl.reset_s, scale)} | "
                    f"{_both(tl.running_s, scale)} | {tl.running_node or '-'} | {tl.run_strategy} |"
                )
        out.append("")
    scaled = result.watchdog_settings
    if scaled and "watchdog" in sc.systems:
        out += [
            "## Watchdog settings",
            "",
            "| setting | real-world | passed (scaled) |",
            "|---|---|---|",
        ]
        for k, real in scaled.real_world.items():
            out.append(f"| {k} | {real:g}s | {scaled.scaled[k]}s |")
        out += [f"- note: {n}" for n in scaled.notes]
        out.append("")
    out += ["## Caveats", ""] + [f"- {c}" for c in CAVEATS] + [""]
    out += [
        "## Scenario",
        "",
        "```yaml",
        yaml.safe_dump(sc.model_dump(), sort_keys=False),
        "```",
        "",
    ]
    return "\n".join(out)


def _both(v: float | None, scale: float) -> str:
    return "—" if v is None else f"{v / scale:.1f}s ({v:.2f}s wall)"


def timeline_png(result: ScenarioResult, path: Path) -> bool:
    """One lane per system: per VM, its node's death, detection, reset and running again."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sc = result.scenario
    scale = sc.time_scale
    lanes = [(s, [v for r in result.runs_of(s) for v in r.vms]) for s in sc.systems]
    lanes = [(s, vms) for s, vms in lanes if result.runs_of(s)]
    if not lanes:
        return False
    heights = [max(1, len(vms)) for _, vms in lanes]
    fig, axes = plt.subplots(
        len(lanes),
        1,
        sharex=True,
        figsize=(11, 1.2 + 0.28 * sum(heights) + 0.6 * len(lanes)),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    cap = max(
        [r.observed_s / scale for r in result.runs] + [1.0],
    )
    for ax, (system, vms) in zip(axes[:, 0], lanes, strict=True):
        ax.set_title(system, loc="left", fontsize=10, fontweight="bold")
        if not vms:
            ax.text(0.01, 0.5, "no VM was affected", transform=ax.transAxes, va="center")
            ax.set_yticks([])
            continue
        labels = []
        for i, tl in enumerate(vms):
            labels.append(f"{tl.vm.split('/', 1)[-1]} ({tl.node})")
            end = tl.running_s / scale if tl.running_s is not None else cap
            ax.plot([0, end], [i, i], color="#c9c9c9", lw=3, solid_capstyle="butt", zorder=1)
            ax.scatter([0], [i], marker="x", color="black", zorder=3)
            if tl.detection_s is not None:
                ax.scatter([tl.detection_s / scale], [i], marker="^", color="#f0a30a", zorder=3)
            if tl.reset_s is not None:
                ax.scatter([tl.reset_s / scale], [i], marker="s", color="#d62728", zorder=3)
            if tl.running_s is not None:
                ax.scatter([tl.running_s / scale], [i], marker="o", color="#2ca02c", zorder=3)
            else:
                ax.annotate(
                    "not running again",
                    (cap, i),
                    xytext=(-4, 0),
                    textcoords="offset points",
                    ha="right",
                    va="center",
                    fontsize=7,
                    color="#d62728",
                )
        ax.set_yticks(range(len(vms)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.grid(axis="x", color="#eeeeee")
    last = axes[-1, 0]
    last.set_xlabel(
        f"real-world seconds after the node's fault (wall ÷ {scale:g}); "
        "x died  ▲ detected  ■ reset  ● running again"
    )
    last.set_xlim(left=-0.02 * cap, right=cap * 1.02 if math.isfinite(cap) else None)
    fig.suptitle(f"{sc.name}: failover timeline per VM, one lane per system", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(result: ScenarioResult, directory: Path) -> Verdict:
    directory.mkdir(parents=True, exist_ok=True)
    v = verdict(result)
    (directory / "results.json").write_text(
        json.dumps(results_json(result, v), indent=2, default=str) + "\n"
    )
    png = "timeline.png"
    try:
        drawn = timeline_png(result, directory / png)
    except Exception as e:  # a report without its picture is still a report
        drawn = False
        png = f"(timeline.png not drawn: {e})"
    (directory / "report.md").write_text(report_md(result, v, png if drawn else None))
    return v
