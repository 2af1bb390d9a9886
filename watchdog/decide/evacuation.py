"""Evacuation of a degraded-but-alive node by live migration, within KubeVirt's limits (§6).

Priority order, stated once: higher `node-watchdog.kubevirt.io/evacuation-priority` first, then
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
    name: str
    namespace_selector: Mapping[str, str]
    vmi_selector: Mapping[str, str]


def matching_policy(
    policies: Iterable[MigrationPolicyRef],
    namespace_labels: Mapping[str, str],
    vmi_labels: Mapping[str, str],
) -> str | None:
    """KubeVirt's rule: a policy applies when all its selector labels match; the one with the
    most matching labels wins (ties: lexicographically first name, for determinism)."""
    best: tuple[int, str] | None = None
    for p in policies:
        ns_ok = all(namespace_labels.get(k) == v for k, v in p.namespace_selector.items())
        vmi_ok = all(vmi_labels.get(k) == v for k, v in p.vmi_selector.items())
        if not (ns_ok and vmi_ok):
            continue
        score = len(p.namespace_selector) + len(p.vmi_selector)
        if best is None or score > best[0] or (score == best[0] and p.name < best[1]):
            best = (score, p.name)
    return None if best is None else best[1]
