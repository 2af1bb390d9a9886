"""The controller's view of the cluster: typed, frozen projections and per-node indexes.

Owns one `Informer` per resource the controller reads (Nodes, `kube-node-lease` Leases,
virt-launcher Pods, VMIs, VMs, VirtualMachineInstanceMigrations, the KubeVirt CR, KubeVirt's
MigrationPolicies and the Namespaces' labels their `namespaceSelector` reads, Harvester's
`vm-force-reset-policy` Setting and Upgrades and, when VolumeAttachment deletion is enabled,
VolumeAttachments), the projection of each raw object into a small record, and indexes kept
current in O(1) per watch event (pods, VMIs, migrations and attachments by node).

Clocks: every `*_at` field is the controller's monotonic clock (`clock`, `time.monotonic` by
default, the clock asyncio's loop uses) at the moment *this process observed* a change, never
a remote wall clock. A Lease's `renewed_at` is when its `renewTime` was last seen to change; at
first sight (startup, or a lease created later) it is the time of that sight, which can only
delay a "stale" verdict, never hasten it.

Source health: each informer has its own `up`; in addition a cheap `/version` probe every
`probe_interval_s` notices a hung API server within seconds (an open watch on a frozen server
only times out after the watch timeout). `api_up` is true while the probe and every informer
are up; `api_up_since` is when that last became true.

CRDs the cluster does not serve (no KubeVirt, no Harvester) make their informer *absent*, never
an error: `harvester_present` is False then and the policy comes from configuration.

Must not: write to the API, decide, or keep whole objects.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol, TypeVar

from watchdog.decide.evacuation import EvacuationVMI, Limits, MigrationPolicyRef, select_policy
from watchdog.decide.names import (
    EVACUATION_LABEL,
    EVACUATION_PRIORITY,
    FINAL_MIGRATION_PHASES,
    LEGACY_EVACUATION_LABEL,
    LEGACY_EVACUATION_PRIORITY,
    NODE_LEASE_NAMESPACE,
    read_name,
    read_state_annotation,
)
from watchdog.decide.observations import LauncherPod
from watchdog.observe.errors import ApiStatusError, ApiUnreachable
from watchdog.observe.informer import EventKind, Informer, Resource, RestartCause
from watchdog.observe.kube import KubeApi

log = logging.getLogger(__name__)

Obj = dict[str, Any]
R = TypeVar("R")

LAUNCHER_SELECTOR = "kubevirt.io=virt-launcher"
VIRT_HANDLER_HEARTBEAT = "kubevirt.io/heartbeat"
# Node labels worth keeping (the rest are dropped to save memory).
DEFAULT_NODE_LABELS = (
    "kubevirt.io/schedulable",
    "node-role.kubernetes.io/control-plane",
    "topology.kubernetes.io/zone",
)

NODES = Resource("/api/v1", "nodes", namespaced=False)
LEASES = Resource("/apis/coordination.k8s.io/v1", "leases")
PODS = Resource("/api/v1", "pods")
VMIS = Resource("/apis/kubevirt.io/v1", "virtualmachineinstances")
VMS = Resource("/apis/kubevirt.io/v1", "virtualmachines")
MIGRATIONS = Resource("/apis/kubevirt.io/v1", "virtualmachineinstancemigrations")
KUBEVIRTS = Resource("/apis/kubevirt.io/v1", "kubevirts")
MIGRATION_POLICIES = Resource(
    "/apis/migrations.kubevirt.io/v1alpha1", "migrationpolicies", namespaced=False
)
NAMESPACES = Resource("/api/v1", "namespaces", namespaced=False)
HARVESTER_SETTINGS = Resource("/apis/harvesterhci.io/v1beta1", "settings", namespaced=False)
HARVESTER_UPGRADES = Resource("/apis/harvesterhci.io/v1beta1", "upgrades")
VOLUME_ATTACHMENTS = Resource("/apis/storage.k8s.io/v1", "volumeattachments", namespaced=False)

_intern = sys.intern


# -- records -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Taint:
    key: str
    value: str
    effect: str


@dataclass(frozen=True, slots=True)
class NodeRecord:
    name: str
    uid: str
    ready: str | None  # Ready condition status: "True", "False", "Unknown"; None = no condition
    ready_transition: str | None  # its lastTransitionTime, as the API wrote it (remote clock)
    ready_changed_at: float  # monotonic: when this process saw `ready` take its current value
    taints: tuple[Taint, ...]
    state_annotation: str | None  # node-watchdog.io/state (or its legacy name)
    virt_handler_heartbeat: str | None  # kubevirt.io/heartbeat annotation (remote clock)
    virt_handler_seen_at: float | None  # monotonic: when that annotation was last seen to change
    labels: tuple[tuple[str, str], ...]  # only the keys the cache was told to keep
    unschedulable: bool
    # The version this record was projected from: a decision's writes carry it as their
    # precondition (decide/actions.py, Basis). Not compared: a Node changed only in fields we
    # do not keep (the kubelet's status) wakes no evaluation.
    resource_version: str = field(default="", compare=False)

    def has_taint(self, key: str, effect: str | None = None) -> bool:
        return any(t.key == key and (effect is None or t.effect == effect) for t in self.taints)

    def label(self, key: str) -> str | None:
        return next((v for k, v in self.labels if k == key), None)


@dataclass(frozen=True, slots=True)
class NodeLease:
    name: str
    renew_time: str | None  # MicroTime string as written by the kubelet (remote clock)
    holder: str | None
    duration_s: int | None
    renewed_at: float  # monotonic: when renew_time was last seen to change (or first seen)


@dataclass(frozen=True, slots=True)
class PodRecord:
    """A virt-launcher pod."""

    namespace: str
    name: str
    uid: str
    node: str | None
    vmi: str  # VMI name: ownerReference, else label vm.kubevirt.io/name or kubevirt.io/domain
    vmi_uid: str | None  # label kubevirt.io/created-by holds the VMI's UID (not its name)
    ready: bool
    terminating: bool  # deletionTimestamp set
    phase: str | None
    claims: tuple[str, ...]  # PVC names of its volumes (same namespace)

    def launcher(self) -> LauncherPod:
        return LauncherPod(
            namespace=self.namespace,
            name=self.name,
            vmi=self.vmi,
            ready=self.ready,
            terminating=self.terminating,
        )


@dataclass(frozen=True, slots=True)
class VMIRecord:
    namespace: str
    name: str
    uid: str
    node: str | None
    phase: str | None
    ready: bool | None
    live_migratable: str | None  # condition status "True"/"False"; None = no condition
    live_migratable_reason: str | None
    live_migratable_message: str | None
    vm: str | None  # owner VirtualMachine
    labels: tuple[tuple[str, str], ...]  # without KubeVirt's own kubevirt.io/* bookkeeping
    memory_bytes: int
    priority: int  # annotation node-watchdog.io/evacuation-priority
    migrating: bool  # a migration is in flight (migrationState present, not completed)

    def evacuation(self) -> EvacuationVMI:
        return EvacuationVMI(
            namespace=self.namespace,
            name=self.name,
            live_migratable=self.live_migratable == "True",
            not_migratable_reason=(
                None
                if self.live_migratable == "True"
                else (self.live_migratable_reason or "NoLiveMigratableCondition")
            ),
            priority=self.priority,
            memory_bytes=self.memory_bytes,
            migrating=self.migrating,
            labels=dict(self.labels),
        )


@dataclass(frozen=True, slots=True)
class VMRecord:
    namespace: str
    name: str
    uid: str
    run_strategy: str | None  # spec.runStrategy, or Always/Halted from legacy spec.running
    ready: bool
    printable_status: str | None


@dataclass(frozen=True, slots=True)
class PolicySetting:
    """Harvester's `vm-force-reset-policy` Setting (value and default are JSON strings)."""

    name: str
    value: str | None
    default: str | None
    resource_version: str


@dataclass(frozen=True, slots=True)
class KubeVirtRecord:
    namespace: str
    name: str
    phase: str | None
    parallel_migrations_per_cluster: int | None
    parallel_outbound_migrations_per_node: int | None


@dataclass(frozen=True, slots=True)
class MigrationRecord:
    namespace: str
    name: str
    vmi: str
    phase: str | None
    source_node: str | None  # status.migrationState.sourceNode, once KubeVirt set it
    evacuation_node: str | None  # our label: which node's evacuation created it
    target_node: str | None

    @property
    def final(self) -> bool:
        return self.phase in FINAL_MIGRATION_PHASES

    @property
    def node(self) -> str | None:
        """The node it moves a VM away from (KubeVirt's word, else ours)."""
        return self.source_node or self.evacuation_node


@dataclass(frozen=True, slots=True)
class NamespaceRecord:
    """A Namespace's labels: what a MigrationPolicy's `namespaceSelector` matches."""

    name: str
    labels: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class VolumeAttachmentRecord:
    name: str
    node: str | None
    pv: str | None
    attacher: str
    attached: bool


# -- projections -------------------------------------------------------------------------------


def _s(value: Any) -> str | None:
    return _intern(value) if isinstance(value, str) and value else None


def _meta(obj: Obj) -> Obj:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _conditions(obj: Obj) -> Iterable[Obj]:
    status = obj.get("status") or {}
    return [c for c in status.get("conditions") or () if isinstance(c, dict)]


def _condition(obj: Obj, ctype: str) -> Obj | None:
    return next((c for c in _conditions(obj) if c.get("type") == ctype), None)


def _labels(obj: Obj) -> Mapping[str, str]:
    labels = _meta(obj).get("labels")
    return labels if isinstance(labels, dict) else {}


def _annotations(obj: Obj) -> Mapping[str, str]:
    ann = _meta(obj).get("annotations")
    return ann if isinstance(ann, dict) else {}


def _owner(obj: Obj, kind: str) -> str | None:
    for ref in _meta(obj).get("ownerReferences") or ():
        if isinstance(ref, dict) and ref.get("kind") == kind:
            return _s(ref.get("name"))
    return None


_QUANTITY_SUFFIXES = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
}


MAX_QUANTITY = 2**63 - 1  # int64, like resource.Quantity


def parse_quantity(value: Any) -> int:
    """Bytes of a Kubernetes quantity ("2Gi", "512M", "1e9", 1024); 0 when unreadable or
    outside int64, as the API server's own parser bounds it (`1e999999Ki` is refused before
    anything is multiplied: expanding it would take minutes)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not (isinstance(value, int) or math.isfinite(value)) or not 0 <= value <= MAX_QUANTITY:
            return 0
        return int(value)
    if not isinstance(value, str) or not value or len(value) > 64:
        return 0
    text = value.strip()
    for suffix in sorted(_QUANTITY_SUFFIXES, key=len, reverse=True):
        if text.endswith(suffix):
            number, factor = text[: -len(suffix)], _QUANTITY_SUFFIXES[suffix]
            break
    else:
        number, factor = text, 1
    try:
        amount = Decimal(number)
    except (InvalidOperation, ValueError):
        return 0
    if not amount.is_finite() or amount < 0 or amount.adjusted() > 19:
        return 0
    result = amount * factor
    return int(result) if result <= MAX_QUANTITY else 0


def project_node(
    keep_labels: Sequence[str], clock: Callable[[], float]
) -> Callable[[Obj, NodeRecord | None], NodeRecord]:
    def project(obj: Obj, old: NodeRecord | None) -> NodeRecord:
        meta = _meta(obj)
        spec = obj.get("spec") or {}
        ready = _condition(obj, "Ready")
        ready_status = _s(ready.get("status")) if ready else None
        annotations = _annotations(obj)
        heartbeat = _s(annotations.get(VIRT_HANDLER_HEARTBEAT))
        labels = _labels(obj)
        now: float | None = None

        def changed_at(previous: float | None, changed: bool) -> float:
            nonlocal now
            if previous is not None and not changed:
                return previous
            if now is None:
                now = clock()
            return now

        return NodeRecord(
            name=_intern(str(meta.get("name", ""))),
            uid=str(meta.get("uid", "")),
            ready=ready_status,
            ready_transition=_s(ready.get("lastTransitionTime")) if ready else None,
            ready_changed_at=changed_at(
                old.ready_changed_at if old else None,
                old is not None and old.ready != ready_status,
            ),
            taints=tuple(
                Taint(
                    key=_intern(str(t.get("key", ""))),
                    value=_intern(str(t.get("value") or "")),
                    effect=_intern(str(t.get("effect", ""))),
                )
                for t in spec.get("taints") or ()
                if isinstance(t, dict)
            ),
            state_annotation=read_state_annotation(annotations) or None,
            virt_handler_heartbeat=heartbeat,
            virt_handler_seen_at=(
                None
                if heartbeat is None
                else changed_at(
                    old.virt_handler_seen_at if old else None,
                    old is not None and old.virt_handler_heartbeat != heartbeat,
                )
            ),
            labels=tuple((_intern(k), _intern(str(labels[k]))) for k in keep_labels if k in labels),
            unschedulable=bool(spec.get("unschedulable", False)),
            resource_version=str(meta.get("resourceVersion") or ""),
        )

    return project


def project_lease(clock: Callable[[], float]) -> Callable[[Obj, NodeLease | None], NodeLease]:
    def project(obj: Obj, old: NodeLease | None) -> NodeLease:
        spec = obj.get("spec") or {}
        renew = _s(spec.get("renewTime"))
        duration = spec.get("leaseDurationSeconds")
        return NodeLease(
            name=_intern(str(_meta(obj).get("name", ""))),
            renew_time=renew,
            holder=_s(spec.get("holderIdentity")),
            duration_s=int(duration) if isinstance(duration, int) else None,
            # Never the remote renewTime itself: only *that* it changed, on our clock.
            renewed_at=(old.renewed_at if old is not None and old.renew_time == renew else clock()),
        )

    return project


def project_pod(namespaces: frozenset[str]) -> Callable[[Obj, PodRecord | None], PodRecord | None]:
    def project(obj: Obj, old: PodRecord | None) -> PodRecord | None:
        del old
        meta = _meta(obj)
        namespace = str(meta.get("namespace", ""))
        if namespaces and namespace not in namespaces:
            return None
        labels = _labels(obj)
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        ready = _condition(obj, "Ready")
        vmi = (
            _owner(obj, "VirtualMachineInstance")
            or _s(labels.get("vm.kubevirt.io/name"))
            or _s(labels.get("kubevirt.io/domain"))
            or ""
        )
        claims = tuple(
            _intern(str(v["persistentVolumeClaim"]["claimName"]))
            for v in spec.get("volumes") or ()
            if isinstance(v, dict)
            and isinstance(v.get("persistentVolumeClaim"), dict)
            and v["persistentVolumeClaim"].get("claimName")
        )
        return PodRecord(
            namespace=_intern(namespace),
            name=str(meta.get("name", "")),
            uid=str(meta.get("uid", "")),
            node=_s(spec.get("nodeName")),
            vmi=vmi,
            vmi_uid=_s(labels.get("kubevirt.io/created-by")),
            ready=bool(ready and ready.get("status") == "True"),
            terminating=bool(meta.get("deletionTimestamp")),
            phase=_s(status.get("phase")),
            claims=claims,
        )

    return project


def project_vmi(namespaces: frozenset[str]) -> Callable[[Obj, VMIRecord | None], VMIRecord | None]:
    def project(obj: Obj, old: VMIRecord | None) -> VMIRecord | None:
        del old
        meta = _meta(obj)
        namespace = str(meta.get("namespace", ""))
        if namespaces and namespace not in namespaces:
            return None
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        domain = spec.get("domain") or {}
        memory = parse_quantity((domain.get("memory") or {}).get("guest")) or parse_quantity(
            ((domain.get("resources") or {}).get("requests") or {}).get("memory")
        )
        ready = _condition(obj, "Ready")
        lm = _condition(obj, "LiveMigratable")
        migration = status.get("migrationState") or {}
        try:
            priority = int(
                read_name(_annotations(obj), EVACUATION_PRIORITY, LEGACY_EVACUATION_PRIORITY) or 0
            )
        except (TypeError, ValueError):
            priority = 0
        return VMIRecord(
            namespace=_intern(namespace),
            name=str(meta.get("name", "")),
            uid=str(meta.get("uid", "")),
            node=_s(status.get("nodeName")),
            phase=_s(status.get("phase")),
            ready=None if ready is None else ready.get("status") == "True",
            live_migratable=_s(lm.get("status")) if lm else None,
            live_migratable_reason=_s(lm.get("reason")) if lm else None,
            live_migratable_message=(lm.get("message") or None) if lm else None,
            vm=_owner(obj, "VirtualMachine") or _s(_labels(obj).get("vm.kubevirt.io/name")),
            labels=tuple(
                (_intern(k), _intern(str(v)))
                for k, v in sorted(_labels(obj).items())
                if not k.startswith("kubevirt.io/")
            ),
            memory_bytes=memory,
            priority=priority,
            migrating=bool(migration)
            and not migration.get("completed")
            and not migration.get("failed"),
        )

    return project


def project_vm(namespaces: frozenset[str]) -> Callable[[Obj, VMRecord | None], VMRecord | None]:
    def project(obj: Obj, old: VMRecord | None) -> VMRecord | None:
        del old
        meta = _meta(obj)
        namespace = str(meta.get("namespace", ""))
        if namespaces and namespace not in namespaces:
            return None
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        strategy = _s(spec.get("runStrategy"))
        if strategy is None and isinstance(spec.get("running"), bool):
            strategy = "Always" if spec["running"] else "Halted"
        return VMRecord(
            namespace=_intern(namespace),
            name=str(meta.get("name", "")),
            uid=str(meta.get("uid", "")),
            run_strategy=strategy,
            ready=bool(status.get("ready", False)),
            printable_status=_s(status.get("printableStatus")),
        )

    return project


def project_setting(obj: Obj, old: PolicySetting | None) -> PolicySetting:
    del old
    meta = _meta(obj)
    value, default = obj.get("value"), obj.get("default")
    return PolicySetting(
        name=str(meta.get("name", "")),
        value=value if isinstance(value, str) and value else None,
        default=default if isinstance(default, str) and default else None,
        resource_version=str(meta.get("resourceVersion", "")),
    )


@dataclass(frozen=True, slots=True)
class UpgradeRecord:
    namespace: str
    name: str
    running: bool


def project_upgrade(obj: Obj, old: UpgradeRecord | None) -> UpgradeRecord:
    """A Harvester Upgrade runs until its `Completed` condition says True (succeeded) or False
    (failed). An Upgrade without that condition, or with it Unknown, still runs: an upgrade
    drains and reboots nodes one by one, and a reset in the middle of that would fight it
    (Harvester's own node-down controller skips its work for the same reason)."""
    del old
    meta = _meta(obj)
    conditions = (obj.get("status") or {}).get("conditions") or []
    completed = next(
        (
            c.get("status")
            for c in conditions
            if isinstance(c, dict) and c.get("type") == "Completed"
        ),
        None,
    )
    return UpgradeRecord(
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        running=completed not in ("True", "False") and not meta.get("deletionTimestamp"),
    )


def project_kubevirt(obj: Obj, old: KubeVirtRecord | None) -> KubeVirtRecord:
    del old
    meta = _meta(obj)
    migrations = ((obj.get("spec") or {}).get("configuration") or {}).get("migrations") or {}

    def positive(name: str) -> int | None:
        value = migrations.get(name)
        return value if isinstance(value, int) and value > 0 else None

    return KubeVirtRecord(
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        phase=_s((obj.get("status") or {}).get("phase")),
        parallel_migrations_per_cluster=positive("parallelMigrationsPerCluster"),
        parallel_outbound_migrations_per_node=positive("parallelOutboundMigrationsPerNode"),
    )


def project_migration(obj: Obj, old: MigrationRecord | None) -> MigrationRecord:
    del old
    meta = _meta(obj)
    status = obj.get("status") or {}
    state = status.get("migrationState") or {}
    return MigrationRecord(
        namespace=_intern(str(meta.get("namespace", ""))),
        name=str(meta.get("name", "")),
        vmi=str((obj.get("spec") or {}).get("vmiName", "")),
        phase=_s(status.get("phase")),
        source_node=_s(state.get("sourceNode")),
        evacuation_node=_s(read_name(_labels(obj), EVACUATION_LABEL, LEGACY_EVACUATION_LABEL)),
        target_node=_s(state.get("targetNode")),
    )


def project_namespace(
    namespaces: frozenset[str],
) -> Callable[[Obj, NamespaceRecord | None], NamespaceRecord | None]:
    def project(obj: Obj, old: NamespaceRecord | None) -> NamespaceRecord | None:
        del old
        name = str(_meta(obj).get("name", ""))
        if namespaces and name not in namespaces:
            return None
        labels = _labels(obj)
        return NamespaceRecord(
            name=_intern(name),
            labels=tuple((_intern(k), _intern(str(v))) for k, v in sorted(labels.items())),
        )

    return project


def project_migration_policy(obj: Obj, old: MigrationPolicyRef | None) -> MigrationPolicyRef:
    """Selectors and the four overrides; a malformed field reads as absent (KubeVirt's own
    validation rejects such policies, so they never reach a migration either)."""
    del old
    spec = obj.get("spec") or {}
    selectors = spec.get("selectors")

    def label_map(value: Any) -> dict[str, str]:
        if not isinstance(value, dict):
            return {}
        return {_intern(str(k)): _intern(str(v)) for k, v in value.items()}

    def flag(name: str) -> bool | None:
        value = spec.get(name)
        return value if isinstance(value, bool) else None

    timeout = spec.get("completionTimeoutPerGiB")
    bandwidth = spec.get("bandwidthPerMigration")
    return MigrationPolicyRef(
        name=str(_meta(obj).get("name", "")),
        namespace_selector=label_map((selectors or {}).get("namespaceSelector")),
        vmi_selector=label_map((selectors or {}).get("virtualMachineInstanceSelector")),
        allow_post_copy=flag("allowPostCopy"),
        allow_auto_converge=flag("allowAutoConverge"),
        completion_timeout_per_gib=(
            timeout if isinstance(timeout, int) and not isinstance(timeout, bool) else None
        ),
        bandwidth_per_migration=(
            str(bandwidth) if isinstance(bandwidth, str | int) and bandwidth != "" else None
        ),
        has_selectors=isinstance(selectors, dict),
    )


def project_volume_attachment(
    obj: Obj, old: VolumeAttachmentRecord | None
) -> VolumeAttachmentRecord:
    del old
    spec = obj.get("spec") or {}
    return VolumeAttachmentRecord(
        name=str(_meta(obj).get("name", "")),
        node=_s(spec.get("nodeName")),
        pv=_s((spec.get("source") or {}).get("persistentVolumeName")),
        attacher=_intern(str(spec.get("attacher", ""))),
        attached=bool((obj.get("status") or {}).get("attached", False)),
    )


# -- the cache ---------------------------------------------------------------------------------


class CacheSettings(Protocol):
    """What the cache reads from the runtime's Settings (structural: observe must not import
    the runtime layer)."""

    @property
    def vm_namespaces(self) -> list[str]: ...

    @property
    def harvester_setting(self) -> str: ...

    @property
    def out_of_service_taint(self) -> str: ...

    @property
    def delete_volume_attachments(self) -> bool: ...

    @property
    def parallel_migrations_per_cluster(self) -> int: ...

    @property
    def parallel_outbound_migrations_per_node(self) -> int: ...


# (resource, kind, key, old, new), e.g. ("pods", ADDED, "ns/virt-launcher-x", None, PodRecord)
CacheEventHandler = Callable[[str, EventKind, str, Any, Any], None]


@dataclass
class CacheStatistics:
    api_up: bool
    api_up_since: float | None
    synced: bool
    harvester: str  # "present", "absent (policy from config)", "unknown"
    kubevirt: str
    informers: dict[str, Any]


class _NodeIndex:
    """node name → {key: record}: O(1) per change, O(records on the node) per read."""

    def __init__(self, node_of: Callable[[Any], str | None]) -> None:
        self._node_of = node_of
        self._by_node: dict[str, dict[str, Any]] = {}

    def update(self, key: str, old: Any, new: Any) -> None:
        old_node = self._node_of(old) if old is not None else None
        new_node = self._node_of(new) if new is not None else None
        if old_node is not None and old_node != new_node:
            bucket = self._by_node.get(old_node)
            if bucket is not None:
                bucket.pop(key, None)
                if not bucket:
                    del self._by_node[old_node]
        if new_node is not None:
            self._by_node.setdefault(new_node, {})[key] = new

    def on(self, node: str) -> tuple[Any, ...]:
        bucket = self._by_node.get(node)
        return tuple(bucket.values()) if bucket else ()

    def count(self, node: str) -> int:
        return len(self._by_node.get(node) or ())


class ClusterCache:
    """All informers of the controller, their indexes and source health. Run `run()` once."""

    def __init__(
        self,
        api: KubeApi,
        settings: CacheSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_event: CacheEventHandler | None = None,
        on_restart: Callable[[str, RestartCause], None] | None = None,
        on_health: Callable[[bool], None] | None = None,
        on_api_answer: Callable[[], None] | None = None,
        node_labels: Sequence[str] = DEFAULT_NODE_LABELS,
        probe_interval_s: float | None = 2.0,
        absent_retry_s: float = 60.0,
        backoff_max_s: float = 5.0,
        page_size: int = 500,
    ) -> None:
        self.api = api
        self._settings = settings
        self._clock = clock
        self._on_event = on_event
        self._on_restart = on_restart
        self._on_health = on_health
        self._on_api_answer = on_api_answer
        self._probe_interval_s = probe_interval_s
        self._probe_up = True
        self._api_up = False
        self.api_up_since: float | None = None
        # When the latest probe that the API answered was sent (None without a probe): the API
        # server was serving us at some instant after it (decide/signals.py, lease_signal).
        self.api_answered_at: float | None = None
        # Set by `probe_soon`: a decision waits for an API answer sent after a Lease deadline.
        self._probe_wake = asyncio.Event()
        key, _, rest = settings.out_of_service_taint.partition("=")
        if ":" in key:  # "key:effect" without a value
            key, _, rest = key.partition(":")
        self._oos_key, self._oos_effect = key, rest.rpartition(":")[2]
        namespaces = frozenset(settings.vm_namespaces)

        common: dict[str, Any] = {
            "on_restart": self._restart,
            "on_health": self._informer_health,
            "absent_retry_s": absent_retry_s,
            "backoff_max_s": backoff_max_s,
            "page_size": page_size,
        }
        self.nodes: Informer[NodeRecord] = Informer(
            api, NODES, project_node(tuple(node_labels), clock), **common
        )
        self.leases: Informer[NodeLease] = Informer(
            api, LEASES, project_lease(clock), namespace=NODE_LEASE_NAMESPACE, **common
        )
        self.pods: Informer[PodRecord] = Informer(
            api, PODS, project_pod(namespaces), label_selector=LAUNCHER_SELECTOR, **common
        )
        self.vmis: Informer[VMIRecord] = Informer(api, VMIS, project_vmi(namespaces), **common)
        self.vms: Informer[VMRecord] = Informer(api, VMS, project_vm(namespaces), **common)
        self.migrations: Informer[MigrationRecord] = Informer(
            api, MIGRATIONS, project_migration, **common
        )
        self.kubevirts: Informer[KubeVirtRecord] = Informer(
            api, KUBEVIRTS, project_kubevirt, **common
        )
        # Cluster-scoped and few; absent (CRD not installed) on KubeVirt before v0.55.
        self.migration_policies: Informer[MigrationPolicyRef] = Informer(
            api, MIGRATION_POLICIES, project_migration_policy, **common
        )
        # Only for the policies' namespaceSelector: a name and its labels per namespace.
        self.namespaces: Informer[NamespaceRecord] = Informer(
            api, NAMESPACES, project_namespace(namespaces), **common
        )
        self.harvester_settings: Informer[PolicySetting] = Informer(
            api,
            HARVESTER_SETTINGS,
            project_setting,
            field_selector=f"metadata.name={settings.harvester_setting}",
            **common,
        )
        self.harvester_upgrades: Informer[UpgradeRecord] = Informer(
            api, HARVESTER_UPGRADES, project_upgrade, **common
        )
        self.volume_attachments: Informer[VolumeAttachmentRecord] | None = (
            Informer(api, VOLUME_ATTACHMENTS, project_volume_attachment, **common)
            if settings.delete_volume_attachments
            else None
        )
        self._pods_by_node = _NodeIndex(lambda p: p.node)
        self._vmis_by_node = _NodeIndex(lambda v: v.node)
        self._migrations_by_node = _NodeIndex(lambda m: None if m.final else m.node)
        self._attachments_by_node = _NodeIndex(lambda a: a.node)
        self._active_migrations: set[str] = set()
        self._wire(self.pods, self._pods_by_node)
        self._wire(self.vmis, self._vmis_by_node)
        self._wire(self.migrations, self._migrations_by_node, self._track_active)
        if self.volume_attachments is not None:
            self._wire(self.volume_attachments, self._attachments_by_node)
        for informer in (
            self.nodes,
            self.leases,
            self.vms,
            self.kubevirts,
            self.migration_policies,
            self.namespaces,
        ):
            self._wire(informer, None)
        self._wire(self.harvester_settings, None)
        self._running_upgrades: set[str] = set()
        self._wire(self.harvester_upgrades, None, self._track_upgrade)

    @property
    def informers(self) -> tuple[Informer[Any], ...]:
        base: tuple[Informer[Any], ...] = (
            self.nodes,
            self.leases,
            self.pods,
            self.vmis,
            self.vms,
            self.migrations,
            self.kubevirts,
            self.migration_policies,
            self.namespaces,
            self.harvester_settings,
            self.harvester_upgrades,
        )
        return base if self.volume_attachments is None else (*base, self.volume_attachments)

    def _wire(
        self,
        informer: Informer[Any],
        index: _NodeIndex | None,
        extra: Callable[[str, Any, Any], None] | None = None,
    ) -> None:
        resource = informer.name

        def handler(kind: EventKind, key: str, old: Any, new: Any) -> None:
            if index is not None:
                index.update(key, old, new)
            if extra is not None:
                extra(key, old, new)
            if self._on_event is not None:
                self._on_event(resource, kind, key, old, new)

        informer.add_handler(handler)

    def _track_active(
        self, key: str, old: MigrationRecord | None, new: MigrationRecord | None
    ) -> None:
        if new is not None and not new.final:
            self._active_migrations.add(key)
        else:
            self._active_migrations.discard(key)

    def _track_upgrade(
        self, key: str, old: UpgradeRecord | None, new: UpgradeRecord | None
    ) -> None:
        # Kept as a set so the hold check on every evaluation is O(1).
        if new is not None and new.running:
            self._running_upgrades.add(key)
        else:
            self._running_upgrades.discard(key)

    # -- running -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Every informer and the API probe, as named tasks of one TaskGroup, until cancelled."""
        async with asyncio.TaskGroup() as tg:
            for informer in self.informers:
                tg.create_task(informer.run(), name=f"informer {informer.name}")
            if self._probe_interval_s:
                tg.create_task(self._probe(self._probe_interval_s), name="API probe")

    async def wait_synced(self, timeout_s: float | None = None) -> None:
        """Until every informer listed once (or found its resource absent)."""
        async with asyncio.timeout(timeout_s):
            for informer in self.informers:
                await informer.synced.wait()

    @property
    def synced(self) -> bool:
        return all(i.synced.is_set() for i in self.informers)

    @property
    def api_up(self) -> bool:
        return self._api_up

    def _informer_health(self, resource: str, up: bool) -> None:
        del resource
        self._update_health()

    def _update_health(self) -> None:
        up = self._probe_up and all(i.up for i in self.informers)
        if up == self._api_up:
            return
        self._api_up = up
        self.api_up_since = self._clock() if up else None
        if self._on_health is not None:
            try:
                self._on_health(up)
            except Exception:
                log.exception("cache health callback failed")

    def _restart(self, resource: str, cause: RestartCause) -> None:
        if self._on_restart is not None:
            self._on_restart(resource, cause)

    async def _probe(self, interval_s: float) -> None:
        # A frozen API server keeps open watches silent until their timeout; this notices in
        # about `interval_s` plus the probe's own timeout.
        timeout_s = min(self.api.request_timeout_s, max(1.0, interval_s))
        while True:
            self._probe_wake.clear()  # a request from here on is answered by this probe
            sent = self._clock()
            try:
                await self.api.request("GET", "/version", timeout_s=timeout_s)
                up = True
            except ApiUnreachable as e:
                if self._probe_up:
                    log.warning("Kubernetes API unreachable: %s", e)
                up = False
            except ApiStatusError:
                up = True  # it answered
            if up:
                self.api_answered_at = sent
            if up != self._probe_up:
                self._probe_up = up
                self._update_health()
            if up and self._on_api_answer is not None:
                try:
                    self._on_api_answer()
                except Exception:
                    log.exception("API answer callback failed")
            try:
                await asyncio.wait_for(
                    self._probe_wake.wait(), interval_s * random.uniform(0.9, 1.1)
                )
            except TimeoutError:
                continue
            # Asked for early: still at most ten probes a second, whatever asks.
            await asyncio.sleep(min(0.1, interval_s))

    def probe_soon(self) -> None:
        """Probe the API now instead of at the next interval: a node's Lease passed its deadline
        and its staleness waits for an answer to a probe sent after it (decide/signals.py,
        `lease_pending`). Wakes the probe loop; a request made while a probe is out sends one
        more right after it (that one's send time is after the deadline), so calls never pile up
        more than one probe."""
        self._probe_wake.set()

    # -- queries -----------------------------------------------------------------------------

    def node(self, name: str) -> NodeRecord | None:
        return self.nodes.get(name)

    def node_names(self) -> tuple[str, ...]:
        return tuple(self.nodes.items)

    def lease(self, node: str) -> NodeLease | None:
        return self.leases.get(f"{NODE_LEASE_NAMESPACE}/{node}")

    def out_of_service_tainted(self, node: str) -> bool:
        record = self.nodes.get(node)
        return record is not None and record.has_taint(self._oos_key, self._oos_effect)

    def pods_on(self, node: str) -> tuple[PodRecord, ...]:
        return self._pods_by_node.on(node)

    def launcher_pods(self, node: str) -> tuple[LauncherPod, ...]:
        """The decide core's view of the virt-launcher pods bound to `node`."""
        return tuple(p.launcher() for p in self._pods_by_node.on(node))

    def pod(self, namespace: str, name: str) -> PodRecord | None:
        return self.pods.get(f"{namespace}/{name}")

    def vmis_on(self, node: str) -> tuple[VMIRecord, ...]:
        return self._vmis_by_node.on(node)

    def vmi(self, namespace: str, name: str) -> VMIRecord | None:
        return self.vmis.get(f"{namespace}/{name}")

    def vm(self, namespace: str, name: str) -> VMRecord | None:
        return self.vms.get(f"{namespace}/{name}")

    def migrations_from(self, node: str) -> tuple[MigrationRecord, ...]:
        """Migrations not yet finished that move VMs away from `node`."""
        return self._migrations_by_node.on(node)

    def active_migrations(self) -> int:
        return len(self._active_migrations)

    def volume_attachments_on(self, node: str) -> tuple[VolumeAttachmentRecord, ...]:
        return self._attachments_by_node.on(node)

    @property
    def harvester_present(self) -> bool | None:
        """True/False once known; None before the Setting informer's first answer."""
        informer = self.harvester_settings
        if not informer.synced.is_set():
            return None
        return not informer.absent

    def harvester_policy(self) -> PolicySetting | None:
        """The `vm-force-reset-policy` Setting, or None (no Harvester, or no such Setting)."""
        return self.harvester_settings.get(self._settings.harvester_setting)

    def upgrade_running(self) -> str | None:
        """The name of a Harvester Upgrade still running, or None (none, or no Harvester)."""
        return min(self._running_upgrades) if self._running_upgrades else None

    def kubevirt(self) -> KubeVirtRecord | None:
        return next(iter(self.kubevirts.items.values()), None)

    def migration_limits(self) -> Limits:
        """KubeVirt's migration limits from its CR, else the configured defaults."""
        cr = self.kubevirt()
        per_cluster = cr.parallel_migrations_per_cluster if cr else None
        per_node = cr.parallel_outbound_migrations_per_node if cr else None
        return Limits(
            per_cluster=per_cluster or self._settings.parallel_migrations_per_cluster,
            outbound_per_node=per_node or self._settings.parallel_outbound_migrations_per_node,
        )

    def migration_policy(self, vmi: VMIRecord) -> MigrationPolicyRef | None:
        """The MigrationPolicy KubeVirt applies to `vmi`'s migrations (None: none selects it,
        or the cluster has no MigrationPolicy CRD). O(policies): there are a handful.

        The VMI's labels are those the record keeps (KubeVirt's own `kubevirt.io/*` are
        dropped), so a policy selecting on those is not seen to apply.
        """
        policies = self.migration_policies.items.values()
        if not policies:
            return None
        ns = self.namespaces.get(vmi.namespace)
        return select_policy(policies, dict(ns.labels) if ns else {}, dict(vmi.labels))

    def statistics(self) -> CacheStatistics:
        def presence(informer: Informer[Any], absent_means: str) -> str:
            if not informer.synced.is_set():
                return "unknown"
            return f"absent ({absent_means})" if informer.absent else "present"

        return CacheStatistics(
            api_up=self._api_up,
            api_up_since=self.api_up_since,
            synced=self.synced,
            harvester=presence(self.harvester_settings, "no Harvester: policy from config"),
            kubevirt=presence(self.vmis, "no KubeVirt: no VMs to protect"),
            informers={i.name: i.statistics() for i in self.informers},
        )


__all__ = [
    "DEFAULT_NODE_LABELS",
    "EVACUATION_LABEL",
    "EVACUATION_PRIORITY",
    "LAUNCHER_SELECTOR",
    "NODE_LEASE_NAMESPACE",
    "CacheEventHandler",
    "CacheSettings",
    "CacheStatistics",
    "ClusterCache",
    "KubeVirtRecord",
    "MigrationRecord",
    "NamespaceRecord",
    "NodeLease",
    "NodeRecord",
    "PodRecord",
    "PolicySetting",
    "Taint",
    "UpgradeRecord",
    "VMIRecord",
    "VMRecord",
    "VolumeAttachmentRecord",
    "parse_quantity",
]
