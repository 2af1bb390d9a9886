"""The records the controller keeps of Kubernetes objects: small, frozen, typed.

One record per object the cache holds (observe/cluster_cache.py), made from the raw object by
its projection (observe/projections.py), with only the fields a decision reads: the raw object
is dropped as soon as it is projected, which is what lets 100,000 pods fit in memory.

Clocks: every `*_at` field is the controller's monotonic clock at the moment *this process
observed* a change, never a remote wall clock; the remote times (`ready_transition`,
`renew_time`, `virt_handler_heartbeat`) are kept as the strings the API wrote, never taken for
our own time.

Must not: read the API or a clock, or keep whole objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from watchdog.decide.evacuation import EvacuationVMI
from watchdog.decide.names import FINAL_MIGRATION_PHASES
from watchdog.decide.observations import LauncherPod


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
    # Harvester's maintenance status (harvesterhci.io/maintain-status), None when not set.
    maintain_status: str | None = None
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
class UpgradeRecord:
    namespace: str
    name: str
    running: bool


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
