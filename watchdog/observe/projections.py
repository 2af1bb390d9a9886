"""Projections: each raw Kubernetes object the controller reads into its record
(observe/records.py), keeping only what a decision reads.

One projection per resource the cache watches (Nodes, `kube-node-lease` Leases, virt-launcher
Pods, VMIs, VMs, VirtualMachineInstanceMigrations, the KubeVirt CR, MigrationPolicies,
Namespaces, Harvester's Setting and Upgrades, VolumeAttachments), each the informer's
`Projection`: (raw object, the record stored under its key) → the new record, or None to drop
the object (outside the configured VM namespaces).

Pure: no I/O, no asyncio, no clock of its own. The Node and Lease projections are handed the
cache's clock and read it only at an object's first sight and when something they date changed.

Clocks: every `*_at` field is the controller's monotonic clock at the moment *this process
observed* a change, never a remote wall clock. A Lease's `renewed_at` is when its `renewTime`
was last seen to change; at first sight (startup, or a lease created later) it is the time of
that sight, which can only delay a "stale" verdict, never hasten it.

Must not: read the API, decide, or keep whole objects.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from watchdog.decide.evacuation import MigrationPolicyRef
from watchdog.decide.names import (
    EVACUATION_LABEL,
    EVACUATION_PRIORITY,
    LEGACY_EVACUATION_LABEL,
    LEGACY_EVACUATION_PRIORITY,
    MAINTAIN_STATUS_ANNOTATION,
    read_name,
    read_state_annotation,
)
from watchdog.observe.records import (
    KubeVirtRecord,
    MigrationRecord,
    NamespaceRecord,
    NodeLease,
    NodeRecord,
    PodRecord,
    PolicySetting,
    Taint,
    UpgradeRecord,
    VMIRecord,
    VMRecord,
    VolumeAttachmentRecord,
)

Obj = dict[str, Any]

# KubeVirt's names, as the projections read them (`kubevirt.io` is KubeVirt's domain).
VIRT_HANDLER_HEARTBEAT = "kubevirt.io/heartbeat"  # Node annotation virt-handler renews
VM_NAME_LABEL = "vm.kubevirt.io/name"
DOMAIN_LABEL = "kubevirt.io/domain"
CREATED_BY_LABEL = "kubevirt.io/created-by"  # on launcher pods: the VMI's UID (not its name)

_intern = sys.intern


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
            maintain_status=_s(annotations.get(MAINTAIN_STATUS_ANNOTATION)),
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
            or _s(labels.get(VM_NAME_LABEL))
            or _s(labels.get(DOMAIN_LABEL))
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
            vmi_uid=_s(labels.get(CREATED_BY_LABEL)),
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
            vm=_owner(obj, "VirtualMachine") or _s(_labels(obj).get(VM_NAME_LABEL)),
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
