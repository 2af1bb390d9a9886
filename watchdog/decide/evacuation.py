"""Evacuation of a degraded-but-alive node by live migration, within KubeVirt's limits (§6).

Priority order, stated once: higher `node-watchdog.io/evacuation-priority` first, then
smaller memory (moves faster, frees the node sooner), then namespace/name for determinism.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


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
