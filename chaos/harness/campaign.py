"""A fault campaign: random fault schedules on the test cluster, checked against the ledger.

Owns: the fault vocabulary a campaign draws from, drawing one schedule per trial from a seed
(the same seed draws the same schedules), running the trials (each a scenario on a fresh test
cluster, through runner.py), what a trial must show whatever its faults (no split-brain, no
lost VM, no false reset, no fence of a node no fault touched, every interrupted VM running
again), telling a known hole from a new one, shrinking a failing schedule, and the summary.

Every trial's schedule is saved as a scenario file, so `watchdog-chaos run FILE` replays it.

Must not: inject faults or measure (runner.py and measure.py do), print (the CLI does).
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from chaos.harness import measure, report
from chaos.harness.runner import RunOptions, run_scenario
from chaos.harness.scenario import LEADER, Fault, Scenario, validate

Scope = Literal["node", "leader", "cluster"]


@dataclass(frozen=True)
class FaultKind:
    action: str
    scope: Scope
    undone: bool  # takes a duration, after which its inverse undoes it
    max_s: float | None = None  # a shorter ceiling than the campaign's (a flap is short)
    # Restarting an agent process takes about a second of Python imports that no time scale
    # compresses: below this scale its start would outlast self_fence_after_s, and the trial
    # would measure the test cluster, not the watchdog (the shipped agent-crash scenario's).
    min_time_scale: float = 0.0


# Everything the test cluster can do to a cluster with no BMCs, by the name a campaign uses.
KINDS: dict[str, FaultKind] = {
    "power-off": FaultKind("poweroff", "node", True),
    "reboot": FaultKind("reboot", "node", False),
    "partition": FaultKind("partition", "node", True),
    "nic-flap": FaultKind("nic-flap", "node", True, max_s=8.0),
    "kubelet-stop": FaultKind("kubelet-stop", "node", True),
    "agent-kill": FaultKind("agent-kill", "node", True, min_time_scale=0.5),
    "agent-freeze": FaultKind("agent-freeze", "node", True),
    "agent-restart": FaultKind("agent-restart", "node", False, min_time_scale=0.5),
    "fence-fails": FaultKind("fence-fails", "node", True),
    "broker-link-cut": FaultKind("broker-link-cut", "node", True),
    "mgmt-link-cut": FaultKind("mgmt-link-cut", "node", True),
    "api-link-cut": FaultKind("api-link-cut", "node", True),
    "leader-power-off": FaultKind("poweroff", "leader", True),
    "leader-api-cut": FaultKind("api-link-cut", "leader", True),
    "api-outage": FaultKind("api-outage", "cluster", True),
    "broker-outage": FaultKind("broker-outage", "cluster", True),
    "controller-manager-stop": FaultKind("controller-manager-stop", "cluster", True),
    "compact": FaultKind("compact", "cluster", False),
}
MIN_FAULT_S = 5.0
LATEST_START_S = 30.0  # faults start within the first 30 real-world seconds, so they overlap


@dataclass(frozen=True)
class CampaignSpec:
    trials: int = 10
    seed: int = 1
    nodes: int = 4
    vms: int = 8
    time_scale: float = 0.25
    faults: tuple[str, ...] = tuple(KINDS)
    max_faults: int = 4
    duration_s: float = 90.0  # the longest a fault lasts, real-world seconds
    controllers: tuple[str, ...] = ("node-1", "node-2")

    def problems(self) -> list[str]:
        out = [f"--faults: unknown fault {f!r}" for f in self.faults if f not in KINDS]
        if not self.faults:
            out.append("--faults: at least one fault kind")
        if self.nodes < 3:
            out.append(f"--nodes {self.nodes}: at least 3 (two controllers and a node to fault)")
        if self.duration_s < MIN_FAULT_S:
            out.append(f"--duration {self.duration_s:g}: at least {MIN_FAULT_S:g} s")
        if not 1 <= self.max_faults <= 8:
            out.append(f"--max-faults {self.max_faults}: between 1 and 8")
        return out


def known_kinds() -> str:
    return ", ".join(KINDS)


# --- drawing ----------------------------------------------------------------------------------


def trial_seed(seed: int, trial: int) -> str:
    return f"{seed}:{trial}"


def draw(spec: CampaignSpec, trial: int) -> Scenario:
    """Trial `trial`'s schedule: 1 to `max_faults` faults drawn from `spec.faults`, each on a
    random node (or the leader's, or the whole cluster), starting in the first 30 s. A string
    seed is hashed (SHA-512) by `random`, so the draw is the same on every machine."""
    rng = random.Random(trial_seed(spec.seed, trial))
    names = [f"node-{i}" for i in range(1, spec.nodes + 1)]
    faults: list[dict[str, Any]] = []
    for _ in range(rng.randint(1, spec.max_faults)):
        kind_name = rng.choice(spec.faults)
        kind = KINDS[kind_name]
        fault: dict[str, Any] = {"at_s": round(rng.uniform(0, LATEST_START_S), 1)}
        fault["action"] = kind.action
        if kind.scope == "node":
            fault["node"] = rng.choice(names)
        elif kind.scope == "leader":
            fault["node"] = LEADER
        if kind.undone:
            ceiling = min(spec.duration_s, kind.max_s or spec.duration_s)
            fault["duration_s"] = round(rng.uniform(min(MIN_FAULT_S, ceiling), ceiling), 1)
        faults.append(fault)
    faults.sort(key=lambda f: f["at_s"])
    return scenario_for(spec, f"campaign-{spec.seed}-{trial}", _merged(faults))


def _merged(faults: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Two overlapping faults of the whole cluster of one kind are one outage, from the first's
    start to the later end (the test cluster has one API server and one broker: a second outage
    of one already out is no fault, and it refuses one)."""
    out: list[dict[str, Any]] = []
    for f in faults:  # sorted by start
        same = next(
            (
                g
                for g in out
                if "node" not in f
                and "node" not in g
                and g["action"] == f["action"]
                and "duration_s" in f
                and "duration_s" in g
                and f["at_s"] <= g["at_s"] + g["duration_s"]
            ),
            None,
        )
        if same is None:
            out.append(dict(f))
            continue
        end = max(same["at_s"] + same["duration_s"], f["at_s"] + f["duration_s"])
        same["duration_s"] = round(end - same["at_s"], 1)
    return out


def scenario_for(spec: CampaignSpec, name: str, faults: list[dict[str, Any]]) -> Scenario:
    floor = max(k.min_time_scale for k in KINDS.values() if k.action in _actions(faults))
    data = {
        "name": name,
        "description": f"Fault schedule {name} of `watchdog-chaos campaign --seed {spec.seed}`.",
        "time_scale": max(spec.time_scale, floor),
        "min_time_scale": floor,
        "systems": ["watchdog"],
        "cluster": {"nodes": spec.nodes, "vms": spec.vms},
        "watchdog": {"controllers": list(spec.controllers)},
        "faults": faults,
        "observe_s": 60,
        "settle_s": 10,
        "timeout_s": 600,
        # What any schedule must show; budgets are for hand-made scenarios.
        "expect": {"systems": ["watchdog"], "resets": "any", "fences": "any", "recovered": True},
    }
    return validate(data, name)


def _actions(faults: list[dict[str, Any]]) -> set[str]:
    return {str(f["action"]) for f in faults}


def fault_dicts(sc: Scenario) -> list[dict[str, Any]]:
    return [f.model_dump(exclude_defaults=True) for f in sc.faults]


def save(sc: Scenario, path: Path) -> Path:
    """The schedule as a scenario file `watchdog-chaos run` replays."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = sc.model_dump(mode="json", exclude_defaults=True)
    data["faults"] = fault_dicts(sc)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def kind_of(fault: Fault) -> str:
    for name, kind in KINDS.items():
        leader = fault.node == LEADER
        if kind.action == fault.action and (kind.scope == "leader") == leader:
            return name
    return fault.action


def describe(sc: Scenario) -> str:
    parts = []
    for f in sc.faults:
        where = f" {f.node}" if f.node else ""
        lasting = f" {f.duration_s:g}s" if f.duration_s else ""
        parts.append(f"{kind_of(f)}{where} @{f.at_s:g}s{lasting}")
    return ", ".join(parts)


# --- what every trial must show ---------------------------------------------------------------


def fenced_untouched(run: measure.RunResult) -> list[str]:
    """Nodes that were fenced although no fault targeted them and nothing cluster-wide happened:
    a healthy node rebooted."""
    injected = [f for f in run.faults if f.get("action") != "fence"]
    if any(not f.get("node") for f in injected):
        return []  # a cluster-wide fault: every node was touched
    touched = {f.get("node") for f in injected}
    return sorted({str(f["node"]) for f in run.faults if f.get("action") == "fence"} - touched)


Hole = tuple[str, Callable[[Scenario], bool]]

# Holes found and still open, each named with the shipped scenario that shows it: a trial that
# falls into one is reported as known, not as a new finding. (name, test on the schedule) None
# open: the last one (API server and broker lost together rebooted every armed node) is closed
# by the quorum before self-fencing (scenario control-plane-loss).
KNOWN_HOLES: tuple[Hole, ...] = ()


def overlap(sc: Scenario, a: str, b: str) -> bool:
    """Whether faults `a` and `b` are in force at the same time somewhere in the schedule."""

    def spans(action: str) -> list[tuple[float, float]]:
        return [
            (t, t + (f.duration_s or 0.0))
            for f in sc.faults
            if f.action == action
            for t in f.times()
        ]

    return any(s1 < e2 and s2 < e1 for s1, e1 in spans(a) for s2, e2 in spans(b))


def known_hole(sc: Scenario, holes: tuple[Hole, ...] = KNOWN_HOLES) -> str | None:
    return next((name for name, test in holes if test(sc)), None)


# Holds that the configuration asks for: with `storm_max_fraction` 0.5, two of four nodes down
# at once is a storm, and their VMs stay down by design (a partition around the controller
# looks the same). A trial whose only failures are VMs kept down while one of these was
# reported, every safety invariant intact, shows the configuration at work, not a hole.
CONFIGURED_HOLDS = ("Storm",)


def configured_hold(run: measure.RunResult, sc: Scenario) -> str | None:
    """The configured hold that explains every failure of `run`, or None."""
    inv = run.invariants
    if run.system != "watchdog" or not inv or fenced_untouched(run):
        return None
    relaxed = sc.expect.model_copy(update={"lost": 10**6, "recovered": False})
    if measure.verdict(run, relaxed):  # anything else failed: a crash, split-brain, a reset…
        return None
    seen = set(run.watchdog.get("resets_held_seen") or ())
    return next((h for h in CONFIGURED_HOLDS if h in seen), None)


# --- running ----------------------------------------------------------------------------------


@dataclass
class Trial:
    number: int
    seed: str
    scenario: Scenario
    file: Path
    failures: list[str] = field(default_factory=list)
    known: str | None = None
    wall_s: float = 0.0
    running_s: list[float] = field(default_factory=list)  # real-world, per restarted VM
    minimal: Path | None = None  # the shrunk schedule that still fails
    report: Path | None = None  # the failing run's report (report.md, timeline.png)

    held: str | None = None  # the configured hold that explains every failure

    @property
    def verdict(self) -> str:
        if not self.failures:
            return "PASS"
        if self.held:
            return "HELD"
        return "KNOWN" if self.known else "FAIL"

    def to_json(self) -> dict[str, Any]:
        return {
            "trial": self.number,
            "seed": self.seed,
            "verdict": self.verdict,
            "faults": fault_dicts(self.scenario),
            "file": str(self.file),
            "failures": self.failures,
            "known_hole": self.known,
            "configured_hold": self.held,
            "wall_s": round(self.wall_s, 1),
            "running_again_s": [round(v, 2) for v in self.running_s],
            "minimal_schedule": str(self.minimal) if self.minimal else None,
            "report": str(self.report) if self.report else None,
        }


@dataclass
class TrialRun:
    """What running one schedule showed."""

    failures: list[str]
    wall_s: float
    running_s: list[float]  # running-again real-world seconds per restarted VM
    held: str | None = None  # `configured_hold` of its run


# Runs one schedule, writing its run report under the directory when it fails.
RunOne = Callable[[Scenario, Path], Awaitable[TrialRun]]


def runner_for(opts: RunOptions) -> RunOne:
    """Runs one schedule on a fresh test cluster (runner.py)."""

    async def run_one(sc: Scenario, report_dir: Path) -> TrialRun:
        t0 = time.monotonic()
        result = await run_scenario(sc, sc.name, opts)
        failures: list[str] = []
        running: list[float] = []
        held: list[str | None] = []
        for run in result.runs:
            failures.extend(run.failures)
            untouched = fenced_untouched(run)
            if untouched:
                failures.append(f"nodes no fault touched were fenced: {', '.join(untouched)}")
            running.extend(v.running_s / sc.time_scale for v in run.vms if v.running_s is not None)
            held.append(configured_hold(run, sc) if run.failures else None)
        if failures:  # its timeline, ledger and fault log, to see what happened
            report.write(result, report_dir)
        failed = [h for h, run in zip(held, result.runs, strict=True) if run.failures]
        explained = failed[0] if failed and all(h == failed[0] for h in failed) else None
        return TrialRun(failures, time.monotonic() - t0, running, explained)

    return run_one


async def shrink(
    sc: Scenario, still_fails: Callable[[Scenario], Awaitable[bool]], spec: CampaignSpec
) -> Scenario:
    """A smaller schedule that still fails: drop one fault at a time while it still fails,
    then halve each remaining duration while it still fails (greedy, one pass each)."""
    faults = fault_dicts(sc)
    i = 0
    while len(faults) > 1 and i < len(faults):
        candidate = faults[:i] + faults[i + 1 :]
        if await still_fails(scenario_for(spec, f"{sc.name}-min", candidate)):
            faults = candidate
        else:
            i += 1
    for j, f in enumerate(faults):
        if f.get("duration_s", 0) >= 2 * MIN_FAULT_S:
            candidate = [dict(x) for x in faults]
            candidate[j]["duration_s"] = round(f["duration_s"] / 2, 1)
            if await still_fails(scenario_for(spec, f"{sc.name}-min", candidate)):
                faults = candidate
    return scenario_for(spec, f"{sc.name}-min", faults)


def _fails_in(
    run_one: RunOne, directory: Path, trial: int
) -> Callable[[Scenario], Awaitable[bool]]:
    tries = iter(range(1, 10_000))

    async def fails(candidate: Scenario) -> bool:
        ran = await run_one(candidate, directory / f"trial-{trial}-shrink-{next(tries)}")
        return bool(ran.failures) and not ran.held  # still a hole, not a configured hold

    return fails


async def run_campaign(
    spec: CampaignSpec,
    directory: Path,
    run_one: RunOne,
    *,
    shrink_failures: bool = False,
    progress: Callable[[str], None] = print,
) -> list[Trial]:
    trials: list[Trial] = []
    t0 = time.monotonic()
    for k in range(1, spec.trials + 1):
        sc = draw(spec, k)
        trial = Trial(k, trial_seed(spec.seed, k), sc, save(sc, directory / f"trial-{k}.yaml"))
        progress(f"trial {k}/{spec.trials} (seed {trial.seed}): {describe(sc)}")
        run_dir = directory / f"trial-{k}"
        ran = await run_one(sc, run_dir)
        trial.failures, trial.wall_s, trial.running_s = ran.failures, ran.wall_s, ran.running_s
        trial.held = ran.held if ran.failures else None
        trial.report = run_dir if trial.failures else None
        trial.known = known_hole(sc) if trial.failures else None
        if trial.verdict == "FAIL" and shrink_failures:
            progress(f"trial {k}: shrinking the schedule")
            minimal = await shrink(sc, _fails_in(run_one, directory, k), spec)
            trial.minimal = save(minimal, directory / f"trial-{k}-min.yaml")
        trials.append(trial)
        elapsed = time.monotonic() - t0
        eta = elapsed / k * (spec.trials - k)
        progress(
            f"trial {k}/{spec.trials}: {trial.verdict} in {trial.wall_s:.0f}s"
            + "".join(f"\n  - {f}" for f in trial.failures)
            + (f"\n  known hole: {trial.known}" if trial.known else "")
            + (f"\n  held as configured: {trial.held}" if trial.held else "")
            + (f" · about {eta / 60:.0f} min left" if k < spec.trials else "")
        )
    return trials


# --- summary ----------------------------------------------------------------------------------


def per_kind(trials: Sequence[Trial]) -> dict[str, dict[str, Any]]:
    """Per fault kind: trials that drew it, how they ended, running-again p50/p95."""
    table: dict[str, dict[str, Any]] = {}
    for t in trials:
        for kind in sorted({kind_of(f) for f in t.scenario.faults}):
            row = table.setdefault(
                kind, {"trials": 0, "failed": 0, "held": 0, "known": 0, "running_again_s": []}
            )
            row["trials"] += 1
            row["failed"] += t.verdict == "FAIL"
            row["held"] += t.verdict == "HELD"
            row["known"] += t.verdict == "KNOWN"
            row["running_again_s"].extend(t.running_s)
    for row in table.values():
        values = row.pop("running_again_s")
        row["running_again_p50_s"] = round(measure.percentile(values, 50), 1) if values else None
        row["running_again_p95_s"] = round(measure.percentile(values, 95), 1) if values else None
    return table


def summary_lines(spec: CampaignSpec, trials: Iterable[Trial]) -> list[str]:
    trials = list(trials)
    counts = {v: sum(t.verdict == v for t in trials) for v in ("PASS", "HELD", "KNOWN", "FAIL")}
    lines = [
        f"{len(trials)} trials, seed {spec.seed}, time scale {spec.time_scale:g}: "
        f"{counts['PASS']} passed, {counts['HELD']} held as configured, "
        f"{counts['KNOWN']} fell into a known hole, {counts['FAIL']} failed",
        "",
        f"{'fault':<24} {'trials':>6} {'failed':>6} {'held':>6} {'known':>6} "
        f"{'running again p50/p95 s':>24}",
    ]
    for kind, row in sorted(per_kind(trials).items()):
        p50, p95 = row["running_again_p50_s"], row["running_again_p95_s"]
        timing = "-" if p50 is None else f"{p50:g} / {p95:g}"
        lines.append(
            f"{kind:<24} {row['trials']:>6} {row['failed']:>6} {row['held']:>6} "
            f"{row['known']:>6} {timing:>24}"
        )
    for t in trials:
        if t.verdict == "FAIL":
            replay = t.minimal or t.file
            lines.append(
                f"FAILED trial {t.number}: report {t.report}/report.md; replay with "
                f"`watchdog-chaos run {replay}`"
            )
    return lines


def results_json(spec: CampaignSpec, trials: Sequence[Trial]) -> dict[str, Any]:
    return {
        "campaign": {
            "seed": spec.seed,
            "trials": spec.trials,
            "nodes": spec.nodes,
            "vms": spec.vms,
            "time_scale": spec.time_scale,
            "faults": list(spec.faults),
            "max_faults": spec.max_faults,
            "duration_s": spec.duration_s,
        },
        "per_fault": per_kind(trials),
        "trials": [t.to_json() for t in trials],
    }


__all__ = [
    "CONFIGURED_HOLDS",
    "KINDS",
    "CampaignSpec",
    "Trial",
    "TrialRun",
    "configured_hold",
    "draw",
    "fenced_untouched",
    "known_hole",
    "overlap",
    "results_json",
    "run_campaign",
    "runner_for",
    "save",
    "shrink",
    "summary_lines",
]
