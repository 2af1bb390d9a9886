"""Per VM failover timelines, invariants and verdicts: the numbers a chaos report quotes.

Owns the definitions, all measured from the moment the harness injected the fault on the VM's
node (the node's death), in wall seconds of the compressed run:

- detected: the system concluded something is wrong with the node. watchdog: its persisted phase
  (Node annotation) became Unreachable/Fencing/Resetting/Reset, or Degraded for a kubelet-only
  failure; Harvester and Kubernetes alone: the node's Ready condition left True (what both act
  on). Seen through an API watch.
- reset: the VM's launcher pod on that node vanished from the API (force-deleted).
- running: ground truth (ledger): a new copy of the VM started (or migrated in) after the fault.
  A VM whose copy kept running through the fault was not interrupted: it is left out of the
  latencies and needs no recovery.

Invariants come from the ledger only: split-brain VM-seconds, VMs lost at the end, false resets.
Also counted: resets (launcher pods of Running VMs deleted after the first fault), fences (the
node-local fence channel was used), disruptions (VMs with a copy stopped for any reason but a
live-migration handover). `verdict` checks a run against the scenario's `expect`, `budget_checks`
the pooled latencies against its budgets (real-world seconds x time_scale + budget_slack_s).

Must not: run or observe anything itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from chaos.harness.recorder import WATCHDOG_DETECTED, Recorder
from chaos.harness.scenario import FENCERS, Budget, Expect
from chaos.sim.ledger import RESTARTING_STRATEGIES, Ledger, StartReason, StopReason

PHASES = ("detection", "reset", "running")


@dataclass
class Incident:
    """A disruptive fault on one node, and the VMs that ran there at that moment."""

    node: str
    action: str
    t: float  # monotonic
    vms: list[tuple[str, str, str]]  # (vm key, pod uid, run strategy)


@dataclass
class VmTimeline:
    vm: str
    node: str
    action: str
    run_strategy: str
    fault_at_s: float  # seconds after the run's start (wall)
    detection_s: float | None = None  # wall seconds after the fault
    reset_s: float | None = None
    running_s: float | None = None
    running_node: str | None = None
    downtime_s: float | None = None
    # Its copy on the node stopped (or moved) after the fault. A VM whose copy simply kept
    # running through the fault (a NIC flap, an outage) was not interrupted: it has no
    # failover to measure and nothing to recover.
    interrupted: bool = True

    @property
    def must_restart(self) -> bool:
        return self.run_strategy in RESTARTING_STRATEGIES and self.interrupted


@dataclass
class RunResult:
    """One system, one repetition."""

    system: str
    repetition: int
    time_scale: float
    started_at: str = ""
    wall_s: float = 0.0
    observed_s: float = 0.0  # wall seconds watched after the first fault
    timed_out: bool = False
    crashed: str | None = None  # a component died on its own: what and how
    error: str | None = None  # the run could not be carried out
    # Nodes whose agent fenced while the cluster started, before any fault: the product's
    # failure (a healthy node rebooted), never the harness's.
    startup_fences: list[str] = field(default_factory=list)
    vms: list[VmTimeline] = field(default_factory=list)
    invariants: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    faults: list[dict[str, Any]] = field(default_factory=list)
    skipped_faults: list[str] = field(default_factory=list)
    watchdog: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    startup: dict[str, float] = field(default_factory=dict)  # wall seconds of each start phase
    # The test cluster's own event-loop lag while it was watched (chaos/sim/loop_lag.py): a run
    # whose p99 exceeds 10 % of the smallest modelled interval is invalid, whatever it found.
    sim_lag: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # filled by verdict()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def detected_at(system: str, rec: Recorder, node: str, after: float) -> float | None:
    if system == "watchdog":
        return rec.first(node, "phase", WATCHDOG_DETECTED, after)
    return rec.first_not_ready(node, after)


def timelines(
    system: str,
    incidents: Sequence[Incident],
    ledger: Ledger,
    rec: Recorder,
    run_start: float,
) -> list[VmTimeline]:
    """Per affected VM (first incident that hit it), its failover timeline."""
    seen: set[str] = set()
    out: list[VmTimeline] = []
    for inc in incidents:
        det = detected_at(system, rec, inc.node, inc.t)
        for vm, uid, strategy in inc.vms:
            if vm in seen:
                continue
            seen.add(vm)
            tl = VmTimeline(
                vm=vm,
                node=inc.node,
                action=inc.action,
                run_strategy=strategy,
                fault_at_s=round(inc.t - run_start, 3),
                detection_s=_rel(det, inc.t),
            )
            pod = rec.pods.get(uid)
            if pod is not None and pod.deleted_at is not None and pod.deleted_at >= inc.t:
                tl.reset_s = _rel(pod.deleted_at, inc.t)
            vm_rec = ledger.vms.get(vm)
            if vm_rec is not None:
                again = [
                    c
                    for c in vm_rec.copies
                    if c.started_mono > inc.t
                    and c.start_reason in (StartReason.STARTED, StartReason.MIGRATED_IN)
                ]
                if again:
                    first = min(again, key=lambda c: c.started_mono)
                    tl.running_s = _rel(first.started_mono, inc.t)
                    tl.running_node = first.node
                old = next((c for c in vm_rec.copies if c.pod_uid == uid), None)
                tl.interrupted = old is None or old.stopped_mono is not None or bool(again)
                if old is not None and old.stopped_mono is not None and tl.running_s is not None:
                    tl.downtime_s = round(
                        max(0.0, first.started_mono - max(old.stopped_mono, inc.t)), 3
                    )
            out.append(tl)
    return out


def _rel(t: float | None, origin: float) -> float | None:
    return None if t is None else round(t - origin, 3)


def invariants(ledger: Ledger) -> dict[str, Any]:
    snap = ledger.snapshot(history=False)
    totals = snap["totals"]
    return {
        "split_brain_s": totals["split_brain_s"],
        "split_brain_vms": sorted(k for k, v in snap["vms"].items() if v["split_brain_s"] > 0),
        "lost": totals["lost"],
        "lost_vms": snap["lost"],
        "false_resets": totals["false_resets"],
        "false_reset_vms": sorted({c["vm"] for c in snap["false_resets"]}),
        "running": totals["running"],
        "vms": totals["vms"],
    }


def counts(
    ledger: Ledger, rec: Recorder, history: Sequence[dict[str, Any]], since: float
) -> dict[str, int]:
    disrupted = {
        c.vm
        for r in ledger.vms.values()
        for c in r.copies
        if c.stopped_mono is not None
        and c.stopped_mono >= since
        and c.stop_reason is not StopReason.MIGRATED_AWAY
    }
    return {
        "resets": len(rec.resets(since)),
        "fences": sum(1 for h in history if h.get("action") == "fence"),
        **{
            f"fences_by_{by}": sum(
                1 for h in history if h.get("action") == "fence" and h.get("by") == by
            )
            for by in FENCERS
        },
        "disrupted_vms": len(disrupted),
        "migrated_vms": len(
            {
                c.vm
                for r in ledger.vms.values()
                for c in r.copies
                if c.start_reason is StartReason.MIGRATED_IN and c.started_mono >= since
            }
        ),
    }


def verdict(run: RunResult, expect: Expect) -> list[str]:
    """What this run violated of `expect` (empty: it holds). Crashes always fail."""
    fails: list[str] = []
    if run.error:
        fails.append(f"run failed: {run.error}")
    if run.crashed:
        fails.append(f"crashed: {run.crashed}")
    if run.startup_fences:
        fails.append(
            f"healthy nodes fenced during cluster start-up, before any fault: "
            f"{', '.join(run.startup_fences)}"
        )
    if run.system not in expect.systems:
        return fails
    inv = run.invariants
    if not inv:
        return fails
    truth = inv.get("ground_truth", True)  # a real cluster has no ledger
    if truth and inv["split_brain_s"] > expect.split_brain_s + 1e-9:
        fails.append(
            f"split-brain {inv['split_brain_s']:g} VM-s > {expect.split_brain_s:g} "
            f"({', '.join(inv['split_brain_vms'])})"
        )
    if inv["lost"] > expect.lost:
        fails.append(f"{inv['lost']} VMs lost > {expect.lost} ({', '.join(inv['lost_vms'])})")
    if truth and inv["false_resets"] > expect.false_resets:
        fails.append(
            f"{inv['false_resets']} false resets > {expect.false_resets} "
            f"({', '.join(inv['false_reset_vms'])})"
        )
    c = run.counts
    restarting = [v for v in run.vms if v.must_restart]
    if expect.resets == "none" and c.get("resets", 0):
        fails.append(f"{c['resets']} launcher pods of running VMs deleted; expected no reset")
    if expect.resets == "required":
        missing = [v.vm for v in restarting if v.reset_s is None]
        if missing or not run.vms:
            fails.append(f"no reset of {', '.join(missing) or 'any VM'}; expected one")
    if expect.fences == "none" and c.get("fences", 0):
        fails.append(f"{c['fences']} fences; expected none")
    if expect.fences == "required" and not c.get("fences", 0):
        fails.append("no fence; expected the cut-off node to fence itself")
    if expect.fenced_by:
        others = {by: c.get(f"fences_by_{by}", 0) for by in FENCERS if by not in expect.fenced_by}
        if not sum(c.get(f"fences_by_{by}", 0) for by in expect.fenced_by):
            fails.append(f"no fence by {' or '.join(expect.fenced_by)}")
        if any(others.values()):
            done = ", ".join(f"{n} by {by}" for by, n in others.items() if n)
            fails.append(f"fences {done}; expected only by {' or '.join(expect.fenced_by)}")
    if expect.disruptions == "none" and c.get("disrupted_vms", 0):
        fails.append(f"{c['disrupted_vms']} VMs disrupted; expected none")
    if expect.leader_changed and run.system == "watchdog":
        leaders = list(run.watchdog.get("leaders_seen") or ())
        if len(leaders) < 2:
            fails.append(f"the acting leader never changed (leaders seen: {leaders or 'none'})")
    if (expect.phases_entered or expect.phases_not_entered) and run.system == "watchdog":
        entered = set(run.watchdog.get("phases_entered") or ())
        shown = ", ".join(sorted(entered)) or "none"
        missing_phases = [p for p in expect.phases_entered if p not in entered]
        if missing_phases:
            fails.append(f"no node entered {', '.join(missing_phases)} (entered: {shown})")
        forbidden = [p for p in expect.phases_not_entered if p in entered]
        if forbidden:
            fails.append(
                f"a node entered {', '.join(forbidden)}; expected never (entered: {shown})"
            )
    if expect.held and run.system == "watchdog":
        seen = set(run.watchdog.get("resets_held_seen") or ())
        missing_holds = [h for h in expect.held if h not in seen]
        if missing_holds:
            fails.append(
                f"the watchdog never reported holding resets for {', '.join(missing_holds)} "
                f"(seen: {', '.join(sorted(seen)) or 'none'})"
            )
    if expect.recovered:
        missing = [v.vm for v in restarting if v.running_s is None]
        if missing:
            fails.append(
                f"{len(missing)} VMs not running again within {run.observed_s:.1f}s "
                f"({', '.join(missing[:6])}{'…' if len(missing) > 6 else ''})"
            )
    return fails


# --- statistics ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]


@dataclass
class Stat:
    n: int  # VMs measured
    missing: int  # VMs that never reached this point within the run
    p50: float | None
    p95: float | None
    max: float | None
    cap_s: float  # observed window (wall): a missing value is "more than this"

    def to_json(self, time_scale: float) -> dict[str, Any]:
        def real(v: float | None) -> float | None:
            return None if v is None else round(v / time_scale, 2)

        return {
            "n": self.n,
            "missing": self.missing,
            "wall_s": {"p50": self.p50, "p95": self.p95, "max": self.max},
            "real_world_s": {"p50": real(self.p50), "p95": real(self.p95), "max": real(self.max)},
            "observed_wall_s": round(self.cap_s, 2),
        }


def stat(values: Sequence[float | None], cap_s: float) -> Stat:
    """p50/p95/max over VMs; a missing value counts as +infinity (it never happened)."""
    have = [v for v in values if v is not None]
    missing = len(values) - len(have)
    if not values:
        return Stat(0, 0, None, None, None, cap_s)
    inf = float("inf")
    full = have + [inf] * missing

    def cut(v: float) -> float | None:
        return None if v == inf else round(v, 3)

    return Stat(
        n=len(values),
        missing=missing,
        p50=cut(percentile(full, 50)),
        p95=cut(percentile(full, 95)),
        max=cut(max(full)),
        cap_s=cap_s,
    )


def system_stats(runs: Sequence[RunResult]) -> dict[str, Stat]:
    """Pooled over repetitions; only VMs that had to restart (restarting runStrategies)."""
    vms = [v for r in runs for v in r.vms if v.must_restart]
    cap = min((r.observed_s for r in runs), default=0.0)
    return {
        "detection": stat([v.detection_s for v in vms], cap),
        "reset": stat([v.reset_s for v in vms], cap),
        "running": stat([v.running_s for v in vms], cap),
    }


def budget_checks(
    system: str,
    stats: dict[str, Stat],
    budget: Budget | None,
    time_scale: float,
    slack_s: float,
) -> list[tuple[str, bool, str]]:
    """(name, met, explanation) per budget of `system`."""
    if budget is None:
        return []
    out: list[tuple[str, bool, str]] = []
    items = (
        ("detection p95", stats["detection"].p95, budget.detection_p95_s),
        ("reset p95", stats["reset"].p95, budget.reset_p95_s),
        ("running p95", stats["running"].p95, budget.running_p95_s),
        ("running max", stats["running"].max, budget.running_max_s),
    )
    for name, value, limit in items:
        if limit is None:
            continue
        allowed = limit * time_scale + slack_s
        key = name.split()[0]
        if stats[key].n == 0:
            out.append((name, False, f"{system} {name}: no VM measured (budget {limit:g}s)"))
            continue
        if value is None:
            out.append(
                (
                    name,
                    False,
                    f"{system} {name}: not reached within the run "
                    f"(budget {limit:g}s real-world = {allowed:.2f}s wall)",
                )
            )
            continue
        ok = value <= allowed
        out.append(
            (
                name,
                ok,
                f"{system} {name}: {value / time_scale:.1f}s real-world ({value:.2f}s wall) "
                f"{'≤' if ok else '>'} budget {limit:g}s real-world "
                f"({limit * time_scale:.2f}s + {slack_s:g}s slack wall)",
            )
        )
    return out
