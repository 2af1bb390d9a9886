"""Scenario files: what a chaos run does and what it must show.

Owns the schema of `chaos/scenarios/*.yaml` (pydantic, unknown keys refused), loading a file or a
shipped scenario by name, and the checks that need the whole file (a fault's node exists in the
cluster, a node action names a node, a cluster action names none, the watchdog settings exist).
Every problem is reported with the path of the offending field (`faults[1].node`), and the CLI
turns `ScenarioError` into exit 2.

Units: every time in a scenario is in real-world seconds. A run multiplies them by the
scenario's `time_scale` (Kubernetes, the simulated machines, Harvester and the watchdog alike),
and reports both the wall seconds measured and their real-world equivalents (÷ time_scale).

Must not: run anything (runner.py does) or know how results are computed (measure.py does).
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from chaos.harness.settings import scale_settings, unknown_settings
from chaos.sim.faults import CLUSTER_ACTIONS, NODE_ACTIONS
from watchdog.decide.state import Phase

SYSTEMS: tuple[str, ...] = ("watchdog", "harvester-1.7", "harvester-1.6", "kubernetes-only")
System = Literal["watchdog", "harvester-1.7", "harvester-1.6", "kubernetes-only"]
RunStrategy = Literal["Always", "RerunOnFailure", "Manual", "Halted", "Once"]
AccessMode = Literal["ReadWriteMany", "ReadWriteOnce"]
# `fence` is the node-local channel an agent uses, not something a scenario injects; the BMC
# faults need a cluster with BMCs (`cluster.bmcs`).
SCENARIO_NODE_ACTIONS: tuple[str, ...] = tuple(a for a in NODE_ACTIONS if a != "fence")
# Who can switch a simulated machine off as a fence (chaos/sim/faults.py, `fence ... by`).
FENCERS = ("fence-command", "watchdog-device", "bmc")
Fencer = Literal["fence-command", "watchdog-device", "bmc"]
SCENARIO_ACTIONS: tuple[str, ...] = SCENARIO_NODE_ACTIONS + CLUSTER_ACTIONS
PHASES: tuple[str, ...] = tuple(p.value for p in Phase)
# Actions after which a node's VMs may have to run elsewhere: they start a failover incident.
DISRUPTIVE_ACTIONS = frozenset(
    {"poweroff", "reboot", "partition", "nic-flap", "kubelet-stop", "mgmt-link-cut"}
)
# A fault target: the node whose controller replica is the acting leader (for the baselines,
# which elect none, the first of `watchdog.controllers`, so every system suffers the same fault).
LEADER = "leader"


class ScenarioError(Exception):
    """A scenario that cannot be used; `problems` are (field path, message) pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(
            "\n".join(f"{source}: {path or '(file)'}: {msg}" for path, msg in problems)
        )


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClusterShape(_Strict):
    """The test cluster: nodes node-1..N, VMs default/vm-1..M spread over them."""

    nodes: int = Field(4, ge=1, le=100, description="Number of nodes.")
    vms: int = Field(8, ge=0, le=2000, description="Number of VMs.")
    run_strategies: list[RunStrategy] = Field(["RerunOnFailure"], min_length=1)
    access_modes: list[AccessMode] = Field(["ReadWriteMany"], min_length=1)
    broker: Literal["amqtt", "mosquitto"] = Field(
        "amqtt", description="The MQTT broker: embedded amqtt or Debian's mosquitto."
    )
    bmcs: bool = Field(
        False,
        description="A Redfish BMC per machine (sushy-tools' emulator, wired to its power; "
        "its own power delay of 1 to 11 s is not compressed by time_scale); needed by "
        "fence_mode power and the bmc-* faults.",
    )
    bmc_protocol: Literal["redfish", "ipmi"] = Field(
        "redfish",
        description="What the BMCs speak: Redfish (fence_redfish) or IPMI 2.0 over LAN "
        "(fence_ipmilan; pyghmi's BMC server, no power delay of its own).",
    )


class WatchdogSetup(_Strict):
    """How the watchdog system runs: an agent per node, controllers on some nodes."""

    controllers: list[str] = Field(
        default_factory=lambda: ["node-1", "node-2"],
        min_length=1,
        description="Nodes that run `node-watchdog run` (agent + controller replica); the "
        "others run `node-watchdog agent`.",
    )
    settings: dict[str, Any] = Field(
        default_factory=dict,
        description="Watchdog settings in real-world units, dotted for nested ones "
        "(`policy.period_s`); durations are compressed by time_scale.",
    )
    devices: bool = Field(
        True,
        description="Each agent gets an emulated watchdog device; false: weak fences only.",
    )


class Fault(_Strict):
    at_s: float = Field(ge=0, description="Real-world seconds after the run starts.")
    action: str
    node: str | None = Field(None, description="node-N, or `leader` (the acting leader's node).")
    nodes: list[str] | None = Field(None, min_length=1)
    duration_s: float | None = Field(
        None, ge=0, description="Undo the fault after this many real-world seconds."
    )
    repeat: int = Field(1, ge=1, le=100, description="Inject it this many times ...")
    every_s: float | None = Field(None, gt=0, description="... this many seconds apart.")

    @field_validator("action")
    @classmethod
    def _known_action(cls, v: str) -> str:
        if v not in SCENARIO_ACTIONS:
            raise ValueError(f"unknown fault {v!r}; one of: {', '.join(SCENARIO_ACTIONS)}")
        return v

    def targets(self) -> list[str]:
        if self.nodes:
            return list(self.nodes)
        return [self.node] if self.node else []

    def times(self) -> list[float]:
        return [self.at_s + i * (self.every_s or 0.0) for i in range(self.repeat)]


class Expect(_Strict):
    """What must hold; checked for the systems in `systems` (the others are reported only)."""

    systems: list[System] = Field(["watchdog"])
    split_brain_s: float = Field(0.0, ge=0, description="Max VM-seconds with two copies.")
    lost: int = Field(0, ge=0, description="Max VMs running nowhere at the end.")
    false_resets: int = Field(0, ge=0, description="Max VMs killed on a healthy node.")
    resets: Literal["required", "none", "any"] = Field(
        "any",
        description="required: the affected VMs' pods must be force-deleted; none: no "
        "running VM's launcher pod may be deleted.",
    )
    fences: Literal["required", "none", "any"] = "any"
    fenced_by: list[Fencer] = Field(
        default_factory=list,
        description="When given: at least one fence, and every fence done by one of these "
        "(fence-command: the agent's own; watchdog-device; bmc: the controller's power fence).",
    )
    disruptions: Literal["none", "any"] = Field(
        "any", description="none: no VM copy may stop (live migration excepted)."
    )
    recovered: bool = Field(
        True, description="Every affected VM must run again before the run ends."
    )
    moved: bool = Field(
        False,
        description="Every VM on a faulted node must end up running again after the fault "
        "(restarted or live-migrated elsewhere), even one whose copy there kept running: a "
        "partitioned or degraded node's VMs must leave it. The run waits for it.",
    )
    leader_changed: bool = Field(
        False,
        description="watchdog only: another controller replica must have become the acting "
        "leader after the first fault.",
    )
    phases_entered: list[str] = Field(
        default_factory=list,
        description="watchdog only: phases (e.g. Maintenance) some controller replica must "
        "have moved a node into during the run (`watchdog_transitions_total`).",
    )
    phases_not_entered: list[str] = Field(
        default_factory=list,
        description="watchdog only: phases no replica may have moved any node into.",
    )
    held: list[str] = Field(
        default_factory=list,
        description="watchdog only: hold reasons (`watchdog_resets_held{reason}`, e.g. Storm, "
        "BrokerDown) its controllers must have reported during the run.",
    )

    @field_validator("phases_entered", "phases_not_entered")
    @classmethod
    def _known_phases(cls, v: list[str]) -> list[str]:
        unknown = [p for p in v if p not in PHASES]
        if unknown:
            raise ValueError(f"unknown phase {', '.join(unknown)}; one of: {', '.join(PHASES)}")
        return v


class Budget(_Strict):
    """Real-world seconds from the node's fault, p95 (and max) over the affected VMs."""

    detection_p95_s: float | None = Field(None, gt=0)
    reset_p95_s: float | None = Field(None, gt=0)
    running_p95_s: float | None = Field(None, gt=0)
    running_max_s: float | None = Field(None, gt=0)


class Scenario(_Strict):
    name: str = Field(min_length=1)
    description: str = ""
    time_scale: float = Field(
        0.25, gt=0, le=1, description="Every timing x this factor (0.25 = four times faster)."
    )
    min_time_scale: float = Field(
        0.0,
        ge=0,
        le=1,
        description="The smallest time scale at which this scenario is valid: where it "
        "restarts agent processes, whose start (about a second of Python imports) no factor "
        "compresses, the agent's self_fence_after_s must stay well above that.",
    )
    repetitions: int = Field(1, ge=1, le=50)
    systems: list[System] = Field(["watchdog"], min_length=1)
    cluster: ClusterShape = Field(default_factory=ClusterShape)  # type: ignore[arg-type]
    watchdog: WatchdogSetup = Field(default_factory=WatchdogSetup)  # type: ignore[arg-type]
    harvester_policy: dict[str, Any] | None = Field(
        None,
        description="vm-force-reset-policy value for the Harvester systems (their "
        "version's default when absent).",
    )
    faults: list[Fault] = Field(min_length=1)
    observe_s: float = Field(
        60.0, ge=0, description="Real-world seconds to watch after the first fault, at least."
    )
    settle_s: float = Field(
        10.0, ge=0, description="Real-world seconds to keep watching once everything recovered."
    )
    timeout_s: float = Field(
        600.0,
        gt=0,
        description="Real-world seconds after the first fault at which a run "
        "stops waiting for recovery.",
    )
    expect: Expect = Field(default_factory=Expect)  # type: ignore[arg-type]
    budgets: dict[System, Budget] = Field(default_factory=dict)
    budget_slack_s: float = Field(
        2.0,
        ge=0,
        description="Wall seconds a budget allows on top of budget x time_scale: "
        "API round trips and process scheduling are not compressed by any factor.",
    )

    @field_validator("systems")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("a system is listed twice")
        return v

    # --- derived -------------------------------------------------------------------------------

    def node_names(self) -> list[str]:
        return [f"node-{i}" for i in range(1, self.cluster.nodes + 1)]

    def last_fault_s(self) -> float:
        """Real-world seconds after the start at which the last fault (or its undo) happens."""
        end = 0.0
        for f in self.faults:
            for t in f.times():
                end = max(end, t + (f.duration_s or 0.0))
        return end

    def with_overrides(
        self,
        *,
        time_scale: float | None = None,
        systems: list[str] | None = None,
        repetitions: int | None = None,
    ) -> Scenario:
        data = self.model_dump()
        if time_scale is not None:
            # Never below the scale at which the scenario is valid.
            data["time_scale"] = max(time_scale, self.min_time_scale)
        if systems is not None:
            data["systems"] = systems
        if repetitions is not None:
            data["repetitions"] = repetitions
        return validate(data, f"{self.name} (with overrides)")


# --- loading -----------------------------------------------------------------------------------


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _cross_checks(s: Scenario) -> Iterator[tuple[str, str]]:
    names = s.node_names()
    shape = f"a {s.cluster.nodes}-node cluster (node-1..node-{s.cluster.nodes})"
    for i, ctl in enumerate(s.watchdog.controllers):
        if ctl not in names:
            yield f"watchdog.controllers[{i}]", f"no node {ctl!r} in {shape}"
    if len(set(s.watchdog.controllers)) != len(s.watchdog.controllers):
        yield "watchdog.controllers", "a node is listed twice"
    if s.time_scale < s.min_time_scale:
        yield (
            "time_scale",
            f"{s.time_scale:g} is below this scenario's min_time_scale {s.min_time_scale:g}: "
            "its runs would measure the test cluster's process starts, not the watchdog",
        )
    for key in unknown_settings(s.watchdog.settings):
        yield (
            f"watchdog.settings.{key}",
            "the watchdog has no such setting (see `node-watchdog config --schema`)",
        )
    if not unknown_settings(s.watchdog.settings):
        try:
            scale_settings(s.watchdog.settings, s.time_scale)
        except ValueError as e:
            yield "watchdog.settings", f"the watchdog refuses them: {e}"
    power = str(s.watchdog.settings.get("fence_mode", "")) == "power"
    if power and not s.cluster.bmcs:
        yield "watchdog.settings.fence_mode", "power needs machines with BMCs: cluster.bmcs: true"
    for i, f in enumerate(s.faults):
        where = f"faults[{i}]"
        if f.action.startswith("bmc-") and not s.cluster.bmcs:
            yield f"{where}.action", f"{f.action} needs machines with BMCs: cluster.bmcs: true"
        if f.node is not None and f.nodes is not None:
            yield f"{where}.nodes", "give either node or nodes, not both"
        targets = f.targets()
        if f.action in SCENARIO_NODE_ACTIONS:
            if not targets:
                yield f"{where}.node", f"fault {f.action} needs a node"
            for j, n in enumerate(targets):
                field = f"{where}.node" if f.nodes is None else f"{where}.nodes[{j}]"
                if n != LEADER and n not in names:
                    yield field, f"no node {n!r} in {shape}"
        elif targets:
            yield f"{where}.node", f"fault {f.action} is cluster-wide: it takes no node"
        if f.repeat > 1 and f.every_s is None:
            yield f"{where}.every_s", "needed when repeat > 1"
    for sys_name in s.budgets:
        if sys_name not in s.systems:
            yield f"budgets.{sys_name}", f"not among systems ({', '.join(s.systems)})"


def validate(data: Any, source: str) -> Scenario:
    if not isinstance(data, dict):
        raise ScenarioError(source, [("", "expected a mapping (YAML object) at the top level")])
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] in ("greater_than_equal", "greater_than") and "input" in err:
                msg = f"{err['input']!r}: {msg}"
            problems.append((_path(err["loc"]), msg))
        raise ScenarioError(source, problems) from None
    problems = list(_cross_checks(scenario))
    if problems:
        raise ScenarioError(source, problems)
    return scenario


def shipped_dir() -> Path:
    return Path(str(resources.files("chaos").joinpath("scenarios")))


def shipped() -> dict[str, Path]:
    """Shipped scenarios by name (file stem)."""
    return {p.stem: p for p in sorted(shipped_dir().glob("*.yaml"))}


def resolve(spec: str) -> Path:
    """A path, or the name of a shipped scenario (`power-off`)."""
    path = Path(spec)
    if path.exists() or path.suffix in (".yaml", ".yml") or "/" in spec:
        return path
    found = shipped().get(spec)
    if found is None:
        raise ScenarioError(
            spec, [("", f"no such file, and no shipped scenario {spec!r} ({', '.join(shipped())})")]
        )
    return found


def load(spec: str | Path) -> Scenario:
    path = resolve(str(spec))
    source = str(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ScenarioError(source, [("", f"cannot read: {e.strerror or e}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else ""
        raise ScenarioError(source, [(where, f"not valid YAML: {e}")]) from None
    return validate(data, source)
