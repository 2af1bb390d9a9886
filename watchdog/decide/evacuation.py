"""Evacuation of a degraded-but-alive node by live migration, within KubeVirt's limits (§6).

Priority order, stated once: higher `node-watchdog.io/evacuation-priority` first, then
smaller memory (moves faster, frees the node sooner), then namespace/name for determinism.

`evacuation_step` decides one look at a node's evacuation: what to report, what to start
migrating, whether it finished or ran past its time limit. It returns the next state and the
effects as data; the runtime reads the cache and the clock, carries the effects out and keeps
the state. `migration_ended` counts a failed migration against its VMI.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace


@dataclass(frozen=True, slots=True)
class EvacuationVMI:
    namespace: str
    name: str
    live_migratable: bool
    not_migratable_reason: str | None = None
    priority: int = 0
    memory_bytes: int = 0
    migrating: bool = False
    labels: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    per_cluster: int = 5
    outbound_per_node: int = 2


@dataclass(frozen=True, slots=True)
class EvacuationPlan:
    start: tuple[EvacuationVMI, ...]
    waiting: tuple[EvacuationVMI, ...]
    not_migratable: tuple[EvacuationVMI, ...]


def plan_evacuation(
    vmis: Iterable[EvacuationVMI],
    running_in_cluster: int,
    running_from_node: int,
    limits: Limits,
) -> EvacuationPlan:
    """Which VMIs to start migrating now without exceeding either KubeVirt limit."""
    candidates = [v for v in vmis if not v.migrating]
    movable = sorted(
        (v for v in candidates if v.live_migratable),
        key=lambda v: (-v.priority, v.memory_bytes, v.namespace, v.name),
    )
    stuck = tuple(v for v in candidates if not v.live_migratable)
    room = max(
        0,
        min(limits.per_cluster - running_in_cluster, limits.outbound_per_node - running_from_node),
    )
    return EvacuationPlan(
        start=tuple(movable[:room]), waiting=tuple(movable[room:]), not_migratable=stuck
    )


VMIKey = tuple[str, str]  # (namespace, name)

MAX_ATTEMPTS = 2  # a VMI whose migration failed twice is reported and left running where it is


@dataclass(frozen=True, slots=True)
class EvacuationState:
    """What one node's evacuation remembers between two steps (never mutated: each step and
    each ended migration makes a new one)."""

    node: str
    started_at: float
    attempts: Mapping[VMIKey, int] = field(default_factory=dict)  # failed migrations per VMI
    given_up: frozenset[VMIKey] = frozenset()
    reported: frozenset[VMIKey] = frozenset()  # not live-migratable, its Event sent
    timed_out: bool = False
    finished: bool = False


@dataclass(frozen=True, slots=True)
class EvacuationEvent:
    """An Event on the node, and the `watchdog_migrations_total` result it counts (if any)."""

    event: str
    message: str
    warning: bool = False
    result: str | None = None


@dataclass(frozen=True, slots=True)
class EvacuationEffects:
    """What a step asks for, in the order it is carried out: `reports` (VMIs that cannot or
    will no more be moved), then the migrations of `migrate` (counted `started`), then `end`
    (finished, or past the time limit)."""

    reports: tuple[EvacuationEvent, ...] = ()
    migrate: tuple[VMIKey, ...] = ()
    end: EvacuationEvent | None = None

    @property
    def events(self) -> tuple[EvacuationEvent, ...]:
        return self.reports if self.end is None else (*self.reports, self.end)

    @property
    def counts(self) -> dict[str, int]:
        """Increments of `watchdog_migrations_total` by result label."""
        counts: dict[str, int] = {}
        for e in self.events:
            if e.result is not None:
                counts[e.result] = counts.get(e.result, 0) + 1
        if self.migrate:
            counts["started"] = counts.get("started", 0) + len(self.migrate)
        return counts


def evacuation_step(
    state: EvacuationState,
    vmis: Iterable[EvacuationVMI],
    active_migrations: int,
    running_here: int,
    limits: Limits,
    now: float,
    timeout_s: float,
) -> tuple[EvacuationState, EvacuationEffects]:
    """One look at `state.node`'s evacuation, given the VMIs on the node, the migrations not
    yet finished in the cluster and from this node, and KubeVirt's limits.

    Each not live-migratable VMI is reported once. A VMI the plan would start after
    `MAX_ATTEMPTS` failed migrations is given up instead (it keeps its place in this step's
    plan, so it takes the slot it was given) and is never planned again. The evacuation
    finishes once no live-migratable VMI is left on the node and none of its migrations runs;
    until then it is reported once as timed out when more than `timeout_s` has passed since it
    started. Nothing here resets anything: the VMs are alive.
    """
    node = state.node
    movable = [v for v in vmis if (v.namespace, v.name) not in state.given_up]
    plan = plan_evacuation(movable, active_migrations, running_here, limits)
    reported = set(state.reported)
    given_up = set(state.given_up)
    reports: list[EvacuationEvent] = []
    for v in plan.not_migratable:
        key = (v.namespace, v.name)
        if key not in reported:
            reported.add(key)
            reports.append(
                EvacuationEvent(
                    "VMNotMigratable",
                    f"{v.namespace}/{v.name} cannot live-migrate ({v.not_migratable_reason}); "
                    "it keeps running on the degraded node",
                    warning=True,
                    result="not_migratable",
                )
            )
    chosen: list[VMIKey] = []
    for v in plan.start:
        key = (v.namespace, v.name)
        n = state.attempts.get(key, 0)
        if n >= MAX_ATTEMPTS:
            given_up.add(key)
            reports.append(
                EvacuationEvent(
                    "VMNotMigratable",
                    f"{v.namespace}/{v.name}: {n} migrations failed; not retrying",
                    warning=True,
                    result="given_up",
                )
            )
            continue
        chosen.append(key)
    # Counted from the VMIs before this step gave any up: one given up now is left on the node,
    # so the evacuation finishes at the earliest on the next step.
    left = sum(1 for v in movable if v.live_migratable)
    running = running_here + len(chosen)
    finished, timed_out = state.finished, state.timed_out
    end: EvacuationEvent | None = None
    if not left and running == 0 and not finished:
        finished = True
        end = EvacuationEvent(
            "EvacuationFinished",
            f"every live-migratable VMI left {node} "
            f"({len(reported)} not migratable, {len(given_up)} given up)",
        )
    elif not timed_out and (left or running) and now - state.started_at > timeout_s:
        # Only what is still unfinished times out: a node that kept no live-migratable VMI
        # (finished earlier, still DEGRADED) has nothing left to report as stuck.
        timed_out = True
        end = EvacuationEvent(
            "EvacuationTimeout",
            f"evacuation of {node} still unfinished after {timeout_s:.0f}s "
            f"({left} VMIs left); VMs keep running, nothing is reset",
            warning=True,
            result="timeout",
        )
    new = replace(
        state,
        given_up=frozenset(given_up),
        reported=frozenset(reported),
        timed_out=timed_out,
        finished=finished,
    )
    return new, EvacuationEffects(tuple(reports), tuple(chosen), end)


# A look at an evacuation due for time alone comes this long after its time limit: the timeout
# is reported once more than `timeout_s` has passed, and a look exactly at the limit would
# find it not yet passed and ask for the same moment again.
TIMEOUT_LOOK_AFTER_S = 0.01


def evacuation_wake_at(state: EvacuationState, timeout_s: float) -> float | None:
    """When `state`'s evacuation needs a look for time alone: just past its time limit, while
    it is neither finished nor timed out; None otherwise. Every other look comes from a change:
    the node's VMIs, any migration ending (a slot frees up), the policy (its time limit)."""
    if state.finished or state.timed_out:
        return None
    return state.started_at + timeout_s + TIMEOUT_LOOK_AFTER_S


def migration_result(phase: str | None) -> str:
    """The `watchdog_migrations_total` result of a migration in a final phase: anything but
    KubeVirt's `Succeeded` failed."""
    return "succeeded" if phase == "Succeeded" else "failed"


def migration_ended(state: EvacuationState, vmi: VMIKey, result: str) -> EvacuationState:
    """`state` after one of its migrations of `vmi` ended with `result` (`migration_result`):
    a failure counts one attempt; a success changes nothing."""
    if result != "failed":
        return state
    return replace(state, attempts={**state.attempts, vmi: state.attempts.get(vmi, 0) + 1})


@dataclass(frozen=True, slots=True)
class MigrationPolicyRef:
    """A KubeVirt `MigrationPolicy` (migrations.kubevirt.io/v1alpha1): its selectors and the
    cluster-wide migration settings it overrides (None: not overridden)."""

    name: str
    namespace_selector: Mapping[str, str]
    vmi_selector: Mapping[str, str]
    allow_post_copy: bool | None = None
    allow_auto_converge: bool | None = None
    completion_timeout_per_gib: int | None = None
    bandwidth_per_migration: str | None = None  # a quantity, as written ("64Mi")
    has_selectors: bool = True  # `spec.selectors` present: without it KubeVirt matches nothing

    def overrides(self) -> str:
        """What it changes, in the policy's own field names ("" when nothing)."""
        fields = (
            ("allowPostCopy", self.allow_post_copy),
            ("allowAutoConverge", self.allow_auto_converge),
            ("completionTimeoutPerGiB", self.completion_timeout_per_gib),
            ("bandwidthPerMigration", self.bandwidth_per_migration),
        )
        return ", ".join(
            f"{k}={str(v).lower() if isinstance(v, bool) else v}"
            for k, v in fields
            if v is not None
        )


def select_policy(
    policies: Iterable[MigrationPolicyRef],
    namespace_labels: Mapping[str, str],
    vmi_labels: Mapping[str, str],
) -> MigrationPolicyRef | None:
    """The policy KubeVirt's migration controller applies to a VMI (its `matchPolicy`).

    A policy applies when every label of both its selectors matches (an empty selector matches
    everything). Among those, the one with the most matching labels wins; at equal totals, the
    one matching more VMI labels; at a full tie, the lexicographically first name.
    """
    best: tuple[int, int, str] | None = None  # (total, vmi labels, name)
    chosen: MigrationPolicyRef | None = None
    for p in policies:
        if not p.has_selectors:
            continue
        ns_ok = all(namespace_labels.get(k) == v for k, v in p.namespace_selector.items())
        vmi_ok = all(vmi_labels.get(k) == v for k, v in p.vmi_selector.items())
        if not (ns_ok and vmi_ok):
            continue
        n_vmi = len(p.vmi_selector)
        total = len(p.namespace_selector) + n_vmi
        if (
            best is None
            or (total, n_vmi) > best[:2]
            or ((total, n_vmi) == best[:2] and p.name < best[2])
        ):
            best, chosen = (total, n_vmi, p.name), p
    return chosen


def matching_policy(
    policies: Iterable[MigrationPolicyRef],
    namespace_labels: Mapping[str, str],
    vmi_labels: Mapping[str, str],
) -> str | None:
    """The name of `select_policy`'s choice, or None when no policy applies."""
    chosen = select_policy(policies, namespace_labels, vmi_labels)
    return None if chosen is None else chosen.name


def describe_policy(policy: MigrationPolicyRef | None) -> str:
    """For Events and logs: which policy KubeVirt will apply to a migration, and what it sets."""
    if policy is None:
        return "no MigrationPolicy selects it: the KubeVirt CR's migration settings apply"
    changes = policy.overrides()
    return f"MigrationPolicy {policy.name}" + (f" ({changes})" if changes else " (no overrides)")
