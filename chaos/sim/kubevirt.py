"""KubeVirt's cluster-side controllers (virt-controller), simulated as API clients.

Owns, through the real API server:

- VM controller: one VMI per VM (same name, owned by the VM) by runStrategy — `Always` restarts
  on any end, `RerunOnFailure` on `Failed` (not on `Succeeded`), `Once` starts a VM a single
  time, `Manual` never acts on its own, `Halted` deletes a running VMI — and the VM's status
  (`printableStatus`, `ready`, `created`).
- VMI controller: the virt-launcher pod (label `kubevirt.io=virt-launcher`, `kubevirt.io/created-by`
  = VMI uid, readiness gate `kubevirt.io/virtual-machine-unpaused`, owner VMI, nodeSelector
  `kubevirt.io/schedulable=true`, no node chosen: the real scheduler places it), and the VMI's
  status from that pod: phase Pending → Scheduling → Scheduled → Running (Running once
  virt-handler set the pod's gate, i.e. the domain runs), `nodeName` and label
  `kubevirt.io/nodeName`, conditions `Ready` (mirrors the pod; False/`PodTerminating` once the
  pod has a deletionTimestamp) and `LiveMigratable` (True iff every PVC is ReadWriteMany, else
  False/`DisksNotLiveMigratable`). A running VMI fails ONLY once its pod object is gone (or the
  pod Failed): a Terminating pod on a dead node keeps it Running, as in KubeVirt.
- Evacuation: VMIs on a node tainted `kubevirt.io/drain` get a VirtualMachineInstanceMigration
  when live-migratable and their evictionStrategy asks for it (retried with backoff).
- Migration controller: Pending → Scheduling → Scheduled → PreparingTarget → TargetReady →
  Running → Succeeded/Failed, honouring `parallelMigrationsPerCluster` and
  `parallelOutboundMigrationsPerNode` from the KubeVirt CR; a target launcher pod placed by the
  scheduler away from the source; the handover moves the domain in the ledger atomically (via the
  fleet: both machines must be up and reachable); a non-migratable VMI or an unreachable source
  fails the migration. The memory copy takes `KubeVirtTimings.migration_s`, or for one VMI the
  (unscaled) seconds of its annotation `MIGRATION_SECONDS_ANNOTATION`: a guest that dirties
  memory faster than the link copies it, whose migration runs on and on.
- virt-controller's node check: a node whose `kubevirt.io/heartbeat` is older than 5 min
  (scaled) is labelled `kubevirt.io/schedulable=false`, and its VMIs without a running launcher
  pod fail (`NodeUnresponsive`).

Must not: run pods or domains (kubelet.py does, as the node's kubelet and virt-handler), or
read machine state except through `Fleet.handover` (the migration's data path).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from dataclasses import dataclass, field
from typing import Any

from chaos.sim.informer import (
    NODES,
    PODS,
    VMIMS,
    VMIS,
    VMS,
    ApiError,
    Clock,
    Informer,
    Kube,
    Obj,
    WorkQueue,
    condition,
    has_taint,
    key_of,
    now_rfc3339,
    parse_time,
    split_key,
)
from chaos.sim.kubelet import (
    HEARTBEAT_ANNOTATION,
    LAUNCHER_LABEL,
    LAUNCHER_VALUE,
    MIGRATION_JOB_LABEL,
    SCHEDULABLE_LABEL,
    UNPAUSED_GATE,
    VM_NAME_LABEL,
    Fleet,
    is_migration_target,
)
from chaos.sim.ledger import Ledger

log = logging.getLogger(__name__)

CREATED_BY_LABEL = "kubevirt.io/created-by"
NODE_NAME_LABEL = "kubevirt.io/nodeName"
VMI_NAME_LABEL = "kubevirt.io/vmi-name"
EVACUATION_ANNOTATION = "kubevirt.io/evacuationMigration"
# Test-cluster knob, not KubeVirt's: unscaled seconds the memory copy of this VMI takes.
MIGRATION_SECONDS_ANNOTATION = "sim.watchdog-chaos/migration-seconds"
VMI_FINALIZER = "foregroundDeleteVirtualMachine"
DRAIN_TAINT = "kubevirt.io/drain"
LAUNCHER_IMAGE = "quay.io/kubevirt/virt-launcher:v1.6.0"
RWX = "ReadWriteMany"

PHASE_ORDER = {
    "": 0,
    "Pending": 1,
    "Scheduling": 2,
    "Scheduled": 3,
    "Running": 4,
    "Succeeded": 5,
    "Failed": 5,
}
ACTIVE_MIGRATION_PHASES = ("Scheduling", "Scheduled", "PreparingTarget", "TargetReady", "Running")
MIGRATION_PHASES = ("Pending", *ACTIVE_MIGRATION_PHASES, "Succeeded", "Failed")


@dataclass
class KubeVirtTimings:
    """Unscaled seconds."""

    migration_s: float = 10.0  # TargetReady → handover: copying the guest's memory
    migration_step_s: float = 1.0  # each preparatory phase (domain prepared, target ready)
    target_pending_timeout_s: float = 300.0  # unschedulable target pod: migration fails
    evacuation_backoff_s: float = 20.0  # first retry after a failed evacuation migration
    evacuation_backoff_max_s: float = 300.0
    handler_stale_s: float = 300.0  # virt-controller: node unresponsive without heartbeat
    node_check_s: float = 30.0


@dataclass
class MigrationLimits:
    per_cluster: int = 5
    outbound_per_node: int = 2


def run_strategy(vm: Obj) -> str:
    spec = vm.get("spec", {})
    if spec.get("runStrategy"):
        return str(spec["runStrategy"])
    if "running" in spec:
        return "Always" if spec["running"] else "Halted"
    return "Halted"


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:5]


def launcher_pod_name(vmi_name: str, salt: str) -> str:
    # Deterministic (instead of generateName) so that a retried create after a stale cache is
    # an AlreadyExists, never a second launcher pod.
    return f"virt-launcher-{vmi_name}-{_short_hash(salt)}"[:63]


def _ready_cond(
    status: bool,
    reason: str | None,
    old: Obj | None,
    now: str,
    ctype: str = "Ready",
    message: str | None = None,
) -> Obj:
    s = "True" if status else "False"
    ltt = old.get("lastTransitionTime") if old and old.get("status") == s else now
    cond: Obj = {"type": ctype, "status": s, "lastProbeTime": None, "lastTransitionTime": ltt}
    if reason:
        cond["reason"] = reason
    if message:
        cond["message"] = message
    return cond


@dataclass
class _Migration:
    """The migration controller's own record (the API status lags behind its decisions)."""

    uid: str
    key: str
    vmi: str
    phase: str = "Pending"
    entered: float = 0.0
    created: float = 0.0
    source_node: str | None = None
    source_pod: str | None = None
    target_pod: str | None = None
    target_node: str | None = None
    reason: str | None = None
    evacuation: bool = False
    written_phase: str | None = None
    transitions: list[Obj] = field(default_factory=list)


class KubeVirtSim:
    """virt-controller: VM, VMI, evacuation and migration controllers and the node check."""

    def __init__(
        self,
        kube: Kube,
        clock: Clock,
        fleet: Fleet,
        ledger: Ledger,
        *,
        pods: Informer,
        nodes: Informer,
        pvcs: Informer,
        vms: Informer,
        vmis: Informer,
        vmims: Informer,
        kubevirts: Informer,
        timings: KubeVirtTimings | None = None,
        workers: int = 4,
    ) -> None:
        self.kube = kube
        self.clock = clock
        self.fleet = fleet
        self.ledger = ledger
        self.pods, self.nodes, self.pvcs = pods, nodes, pvcs
        self.vms, self.vmis, self.vmims, self.kubevirts = vms, vmis, vmims, kubevirts
        self.timings = timings or KubeVirtTimings()
        self.workers = workers
        self.vm_queue = WorkQueue("vm-controller")
        self.vmi_queue = WorkQueue("vmi-controller")
        self.migration_queue = WorkQueue("migration-controller")
        self.evacuation_queue = WorkQueue("evacuation-controller")
        self._migrations: dict[str, _Migration] = {}
        self._once_started: set[str] = set()
        self._evac_failures: dict[str, int] = {}
        self._evac_not_before: dict[str, float] = {}

        pods.add_index(
            "vmi-uid",
            lambda p: [u] if (u := p["metadata"].get("labels", {}).get(CREATED_BY_LABEL)) else [],
        )
        vmis.add_index("node", lambda v: [n] if (n := v.get("status", {}).get("nodeName")) else [])
        vmims.add_index(
            "vmi",
            lambda m: [f"{m['metadata']['namespace']}/{m.get('spec', {}).get('vmiName', '')}"],
        )
        vms.add_handler(self._on_vm)
        vmis.add_handler(self._on_vmi)
        pods.add_handler(self._on_pod)
        vmims.add_handler(self._on_vmim)
        nodes.add_handler(self._on_node)

    # --- event routing -------------------------------------------------------------------------

    def _on_vm(self, key: str, new: Obj | None, old: Obj | None) -> None:
        if new is None:
            self.ledger.forget_vm(key)
        else:
            self.ledger.register_vm(key, run_strategy(new))
        self.vm_queue.add(key)

    def _on_vmi(self, key: str, new: Obj | None, old: Obj | None) -> None:
        self.vmi_queue.add(key)
        self.vm_queue.add(key)
        for m in self.vmims.keys_by("vmi", key):
            self.migration_queue.add(m)

    def _on_pod(self, key: str, new: Obj | None, old: Obj | None) -> None:
        obj = new or old
        assert obj is not None
        labels = obj["metadata"].get("labels", {})
        if labels.get(LAUNCHER_LABEL) != LAUNCHER_VALUE:
            return
        vmi = _owner_vmi(obj)
        if vmi:
            self.vmi_queue.add(vmi)
        job = labels.get(MIGRATION_JOB_LABEL)
        mig = self._migrations.get(job) if job else None
        if mig is not None:
            self.migration_queue.add(mig.key)

    def _on_vmim(self, key: str, new: Obj | None, old: Obj | None) -> None:
        self.migration_queue.add(key)

    def _on_node(self, key: str, new: Obj | None, old: Obj | None) -> None:
        if new is not None and has_taint(new, DRAIN_TAINT):
            if old is None or not has_taint(old, DRAIN_TAINT):
                self.evacuation_queue.add(key)

    # --- running -------------------------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(
                self.vm_queue.run_workers(self.workers, self.reconcile_vm), name="vm-controller"
            )
            tg.create_task(
                self.vmi_queue.run_workers(self.workers, self.reconcile_vmi), name="vmi-controller"
            )
            tg.create_task(
                self.migration_queue.run_workers(2, self.reconcile_migration),
                name="migration-controller",
            )
            tg.create_task(
                self.evacuation_queue.run_workers(1, self.reconcile_evacuation),
                name="evacuation-controller",
            )
            tg.create_task(self._node_check_loop(), name="virt-controller node check")

    def close(self) -> None:
        for q in (self.vm_queue, self.vmi_queue, self.migration_queue, self.evacuation_queue):
            q.close()

    def limits(self) -> MigrationLimits:
        kv = self.kubevirts.get("kubevirt/kubevirt") or {}
        m = kv.get("spec", {}).get("configuration", {}).get("migrations", {}) or {}
        return MigrationLimits(
            per_cluster=int(m.get("parallelMigrationsPerCluster", 5)),
            outbound_per_node=int(m.get("parallelOutboundMigrationsPerNode", 2)),
        )

    def _default_eviction_strategy(self) -> str | None:
        kv = self.kubevirts.get("kubevirt/kubevirt") or {}
        strategy = kv.get("spec", {}).get("configuration", {}).get("evictionStrategy")
        return str(strategy) if strategy else None

    # --- VM controller -------------------------------------------------------------------------

    async def reconcile_vm(self, key: str) -> None:
        vm = self.vms.get(key)
        if vm is None or vm["metadata"].get("deletionTimestamp"):
            return
        ns, name = split_key(key)
        assert ns is not None
        vmi = self.vmis.get(key)
        if vmi is not None and not _owned_by(vmi, vm["metadata"]["uid"]):
            vmi = None  # a leftover of an earlier VM with this name; GC removes it
            return
        strategy = run_strategy(vm)
        phase = (vmi or {}).get("status", {}).get("phase", "")
        deleting = bool(vmi and vmi["metadata"].get("deletionTimestamp"))
        ended = phase in ("Succeeded", "Failed")
        uid = vm["metadata"]["uid"]
        if strategy in ("Always", "RerunOnFailure"):
            restart_on = ("Succeeded", "Failed") if strategy == "Always" else ("Failed",)
            if vmi is None:
                await self._create_vmi(vm)
            elif phase in restart_on and not deleting:
                # Delete the ended VMI; once it is gone (next event) a new one is created.
                await self.kube.delete(VMIS, name, ns, uid=vmi["metadata"]["uid"])
        elif strategy == "Once":
            if vmi is None and uid not in self._once_started:
                self._once_started.add(uid)
                await self._create_vmi(vm)
            elif vmi is not None:
                self._once_started.add(uid)
        elif strategy == "Halted":
            if vmi is not None and not deleting and not ended:
                await self.kube.delete(VMIS, name, ns, uid=vmi["metadata"]["uid"])
        # Manual: only a user's start/stop acts (virtctl), never the controller.
        await self._update_vm_status(vm, vmi, deleting, ended)

    async def _create_vmi(self, vm: Obj) -> None:
        meta = vm["metadata"]
        template = vm["spec"].get("template", {})
        tmeta = template.get("metadata", {})
        body = {
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstance",
            "metadata": {
                "name": meta["name"],
                "namespace": meta["namespace"],
                "labels": {**(tmeta.get("labels") or {}), "kubevirt.io/vm": meta["name"]},
                "annotations": dict(tmeta.get("annotations") or {}),
                "ownerReferences": [
                    {
                        "apiVersion": "kubevirt.io/v1",
                        "kind": "VirtualMachine",
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
                "finalizers": [VMI_FINALIZER],
            },
            "spec": template.get("spec", {}),
        }
        try:
            await self.kube.create(VMIS, body)
            log.debug("created VMI %s/%s", meta["namespace"], meta["name"])
        except ApiError as e:
            if e.status != 409:
                raise

    async def _update_vm_status(
        self, vm: Obj, vmi: Obj | None, deleting: bool, ended: bool
    ) -> None:
        phase = (vmi or {}).get("status", {}).get("phase", "")
        if vmi is None or ended:
            printable = "Stopped"
        elif deleting:
            printable = "Stopping"
        elif phase == "Running":
            mstate = vmi.get("status", {}).get("migrationState") or {}
            migrating = mstate and not mstate.get("completed") and not mstate.get("failed")
            printable = "Migrating" if migrating else "Running"
        elif phase == "Scheduling" and _unschedulable(vmi):
            printable = "ErrorUnschedulable"
        else:
            printable = "Starting"
        vmi_ready = condition(vmi, "Ready") if vmi else None
        ready = bool(vmi_ready and vmi_ready.get("status") == "True")
        status = vm.get("status", {})
        if (
            status.get("printableStatus") == printable
            and status.get("ready", False) == ready
            and status.get("created", False) == (vmi is not None)
        ):
            return
        now = now_rfc3339()
        body = {
            "status": {
                "printableStatus": printable,
                "ready": ready,
                "created": vmi is not None,
                "runStrategy": run_strategy(vm),
                "conditions": [
                    _ready_cond(
                        ready, None if ready else "VMINotReady", condition(vm, "Ready"), now
                    )
                ],
            }
        }
        meta = vm["metadata"]
        await self.kube.patch(VMS, meta["name"], body, meta["namespace"], sub="status")

    # --- VMI controller ------------------------------------------------------------------------

    def pods_of(self, vmi: Obj) -> list[Obj]:
        return self.pods.by("vmi-uid", vmi["metadata"]["uid"])

    async def reconcile_vmi(self, key: str) -> None:
        vmi = self.vmis.get(key)
        if vmi is None:
            return
        meta = vmi["metadata"]
        status = vmi.get("status", {})
        phase = status.get("phase", "")
        pods = self.pods_of(vmi)
        if meta.get("deletionTimestamp"):
            await self._finalize_vmi(vmi, pods)
            return
        if phase in ("Succeeded", "Failed"):
            return
        if VMI_FINALIZER not in (meta.get("finalizers") or ()):
            await self.kube.patch(
                VMIS,
                meta["name"],
                {
                    "metadata": {
                        "finalizers": [*(meta.get("finalizers") or ()), VMI_FINALIZER],
                        "resourceVersion": meta["resourceVersion"],
                    }
                },
                meta["namespace"],
            )
            return
        pod = self._current_pod(vmi, pods)
        if pod is None and phase in ("", "Pending"):
            await self._create_launcher_pod(vmi)
            await self._write_vmi_status(vmi, "Scheduling", None)
            return
        if pod is None:
            # The launcher pod object is gone: only now is the VMI Failed (a Terminating pod
            # on a dead node would have kept it Running).
            await self._write_vmi_status(vmi, "Failed", None, reason="PodNotExists")
            return
        pod_phase = pod.get("status", {}).get("phase")
        if pod_phase == "Failed":
            await self._write_vmi_status(vmi, "Failed", pod, reason="PodFailed")
            return
        if pod_phase == "Succeeded":
            if self._migrated_away(vmi, pod):
                return  # the handover's VMI update is on its way
            await self._write_vmi_status(vmi, "Succeeded", pod)
            return
        if not pod["spec"].get("nodeName"):
            new_phase = "Scheduling"
        elif pod_phase == "Running" and _gate_true(pod):
            new_phase = "Running"
        else:
            new_phase = "Scheduled"
        await self._write_vmi_status(vmi, new_phase, pod)

    def _current_pod(self, vmi: Obj, pods: list[Obj]) -> Obj | None:
        node = vmi.get("status", {}).get("nodeName")
        if node:
            mine = [p for p in pods if p["spec"].get("nodeName") == node]
            # A node can hold a finished migration source and a newer pod: prefer the live one.
            mine.sort(key=lambda p: p.get("status", {}).get("phase") == "Succeeded")
            return mine[0] if mine else None
        candidates = [p for p in pods if not is_migration_target(p)]
        return candidates[0] if candidates else None

    def _migrated_away(self, vmi: Obj, pod: Obj) -> bool:
        mstate = vmi.get("status", {}).get("migrationState") or {}
        return (
            bool(mstate)
            and not mstate.get("failed")
            and mstate.get("sourceNode") == pod["spec"].get("nodeName")
            and mstate.get("targetPod") not in (None, pod["metadata"]["name"])
        )

    async def _finalize_vmi(self, vmi: Obj, pods: list[Obj]) -> None:
        meta = vmi["metadata"]
        for pod in pods:
            pmeta = pod["metadata"]
            if not pmeta.get("deletionTimestamp") and pod.get("status", {}).get("phase") not in (
                "Succeeded",
                "Failed",
            ):
                await self.kube.delete(PODS, pmeta["name"], pmeta["namespace"], uid=pmeta["uid"])
        live = [p for p in pods if p.get("status", {}).get("phase") not in ("Succeeded", "Failed")]
        if live or VMI_FINALIZER not in (meta.get("finalizers") or ()):
            return
        finalizers = [f for f in meta["finalizers"] if f != VMI_FINALIZER]
        try:
            await self.kube.patch(
                VMIS,
                meta["name"],
                {
                    "metadata": {
                        "finalizers": finalizers,
                        "resourceVersion": meta["resourceVersion"],
                    }
                },
                meta["namespace"],
            )
        except ApiError as e:
            if e.status != 404:
                raise

    async def _create_launcher_pod(self, vmi: Obj, *, migration: _Migration | None = None) -> str:
        meta = vmi["metadata"]
        spec = vmi.get("spec", {})
        salt = migration.uid if migration else meta["uid"]
        name = launcher_pod_name(meta["name"], salt)
        domain = spec.get("domain", {})
        requests = dict((domain.get("resources") or {}).get("requests") or {})
        requests.setdefault("memory", (domain.get("memory") or {}).get("guest", "1Gi"))
        # KubeVirt's cpuAllocationRatio of 10: a vCPU asks the scheduler for 100m.
        cores = int((domain.get("cpu") or {}).get("cores", 1))
        requests.setdefault("cpu", f"{100 * cores}m")
        volumes = []
        for v in spec.get("volumes") or ():
            claim = (v.get("persistentVolumeClaim") or {}).get("claimName") or (
                v.get("dataVolume") or {}
            ).get("name")
            if claim:
                volumes.append({"name": v["name"], "persistentVolumeClaim": {"claimName": claim}})
        labels = {
            **(meta.get("labels") or {}),
            LAUNCHER_LABEL: LAUNCHER_VALUE,
            CREATED_BY_LABEL: meta["uid"],
            VM_NAME_LABEL: meta["name"],
        }
        labels.pop(NODE_NAME_LABEL, None)
        affinity = dict(spec.get("affinity") or {})
        if migration is not None:
            labels[MIGRATION_JOB_LABEL] = migration.uid
            # The target must land on another node than the source.
            affinity = _exclude_node(affinity, migration.source_node or "")
        pod_spec: Obj = {
            "containers": [
                {
                    "name": "compute",
                    "image": LAUNCHER_IMAGE,
                    "command": ["/usr/bin/virt-launcher-monitor"],
                    "resources": {"requests": requests},
                }
            ],
            "restartPolicy": "Never",
            "readinessGates": [{"conditionType": UNPAUSED_GATE}],
            "nodeSelector": {**(spec.get("nodeSelector") or {}), SCHEDULABLE_LABEL: "true"},
            "terminationGracePeriodSeconds": int(spec.get("terminationGracePeriodSeconds", 30))
            + 15,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "hostname": meta["name"],
            "volumes": volumes,
        }
        if affinity:
            pod_spec["affinity"] = affinity
        if spec.get("tolerations"):
            pod_spec["tolerations"] = spec["tolerations"]
        if spec.get("topologySpreadConstraints"):
            pod_spec["topologySpreadConstraints"] = spec["topologySpreadConstraints"]
        if spec.get("priorityClassName"):
            pod_spec["priorityClassName"] = spec["priorityClassName"]
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": meta["namespace"],
                "labels": labels,
                "annotations": {
                    "kubevirt.io/domain": meta["name"],
                    "kubectl.kubernetes.io/default-container": "compute",
                },
                "ownerReferences": [
                    {
                        "apiVersion": "kubevirt.io/v1",
                        "kind": "VirtualMachineInstance",
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": pod_spec,
        }
        try:
            await self.kube.create(PODS, body)
        except ApiError as e:
            if e.status != 409:
                raise
        return name

    def live_migratable(self, vmi: Obj) -> tuple[bool, str | None]:
        ns = vmi["metadata"]["namespace"]
        for v in vmi.get("spec", {}).get("volumes") or ():
            claim = (v.get("persistentVolumeClaim") or {}).get("claimName") or (
                v.get("dataVolume") or {}
            ).get("name")
            if not claim:
                continue
            pvc = self.pvcs.get(f"{ns}/{claim}")
            modes = (pvc or {}).get("spec", {}).get("accessModes") or ()
            if RWX not in modes:
                return False, (
                    f"cannot migrate VMI: PVC {claim} is not shared, live migration "
                    "requires that all PVCs must be shared (using ReadWriteMany "
                    "access mode)"
                )
        return True, None

    async def _write_vmi_status(
        self, vmi: Obj, phase: str, pod: Obj | None, *, reason: str | None = None
    ) -> None:
        meta = vmi["metadata"]
        status = vmi.get("status", {})
        old_phase = status.get("phase", "")
        if PHASE_ORDER.get(phase, 0) < PHASE_ORDER.get(old_phase, 0):
            phase = old_phase  # a stale cache must never move a VMI backwards
        now = now_rfc3339()
        new: Obj = {"phase": phase}
        if phase != old_phase:
            new["phaseTransitionTimestamps"] = [
                *(status.get("phaseTransitionTimestamps") or ()),
                {"phase": phase, "phaseTransitionTimestamp": now},
            ]
            if reason:
                new["reason"] = reason
        node = pod["spec"].get("nodeName") if pod else None
        if node and not status.get("nodeName"):
            new["nodeName"] = node
        # Ready mirrors the launcher pod, and is False (PodTerminating) once it is deleted.
        old_ready = condition(vmi, "Ready")
        if pod is not None and pod["metadata"].get("deletionTimestamp"):
            ready = _ready_cond(False, "PodTerminating", old_ready, now)
        elif pod is not None and phase == "Running":
            pod_ready_cond = condition(pod, "Ready")
            ok = bool(pod_ready_cond and pod_ready_cond.get("status") == "True")
            ready = _ready_cond(ok, None if ok else "PodNotReady", old_ready, now)
        elif pod is None and phase not in ("Scheduling", ""):
            ready = _ready_cond(False, "PodNotExists", old_ready, now)
        else:
            ready = _ready_cond(False, "PodNotReady" if pod else "PodNotExists", old_ready, now)
        migratable, message = self.live_migratable(vmi)
        lm = _ready_cond(
            migratable,
            None if migratable else "DisksNotLiveMigratable",
            condition(vmi, "LiveMigratable"),
            now,
            "LiveMigratable",
            message,
        )
        new["conditions"] = [ready, lm]
        scheduled = condition(pod, "PodScheduled") if pod is not None else None
        if scheduled and scheduled.get("status") == "False":
            # virt-controller copies the pod's scheduling failure: the VM shows
            # ErrorUnschedulable.
            new["conditions"].append(
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": scheduled.get("reason"),
                    "message": scheduled.get("message"),
                    "lastProbeTime": None,
                    "lastTransitionTime": scheduled.get("lastTransitionTime") or now,
                }
            )
        if pod is not None and phase in ("Scheduled", "Running"):
            new["activePods"] = {
                **(status.get("activePods") or {}),
                pod["metadata"]["uid"]: pod["spec"].get("nodeName"),
            }
        if phase in ("Scheduled", "Running") and "launcherContainerImageVersion" not in status:
            new["launcherContainerImageVersion"] = LAUNCHER_IMAGE
            new["qosClass"] = "Burstable"
        if _status_unchanged(status, new):
            pass
        else:
            await self.kube.patch(
                VMIS, meta["name"], {"status": new}, meta["namespace"], sub="status"
            )
        label_node = status.get("nodeName") or new.get("nodeName")
        if label_node and meta.get("labels", {}).get(NODE_NAME_LABEL) != label_node:
            await self.kube.patch(
                VMIS,
                meta["name"],
                {"metadata": {"labels": {NODE_NAME_LABEL: label_node}}},
                meta["namespace"],
            )

    # --- evacuation ----------------------------------------------------------------------------

    async def reconcile_evacuation(self, node_name: str) -> None:
        node = self.nodes.get(node_name)
        if node is None or not has_taint(node, DRAIN_TAINT):
            return
        default_strategy = self._default_eviction_strategy()
        pending = False
        now = Clock.mono()
        for vmi in self.vmis.by("node", node_name):
            key = key_of(vmi)
            status = vmi.get("status", {})
            if status.get("phase") != "Running" or vmi["metadata"].get("deletionTimestamp"):
                continue
            strategy = vmi.get("spec", {}).get("evictionStrategy") or default_strategy
            if strategy not in ("LiveMigrate", "LiveMigrateIfPossible"):
                continue
            lm = condition(vmi, "LiveMigratable")
            if not lm or lm.get("status") != "True":
                continue
            if any(
                m.phase not in ("Succeeded", "Failed")
                for m in self._migrations.values()
                if m.vmi == key
            ) or any(
                (o.get("status", {}).get("phase") or "Pending") not in ("Succeeded", "Failed")
                for o in self.vmims.by("vmi", key)
            ):
                pending = True
                continue
            not_before = self._evac_not_before.get(key, 0.0)
            if now < not_before:
                pending = True
                continue
            ns, name = split_key(key)
            body = {
                "apiVersion": "kubevirt.io/v1",
                "kind": "VirtualMachineInstanceMigration",
                "metadata": {
                    "name": f"kubevirt-evacuation-{_short_hash(f'{key}{random.random()}')}",
                    "namespace": ns,
                    "labels": {VMI_NAME_LABEL: name},
                    "annotations": {EVACUATION_ANNOTATION: node_name},
                },
                "spec": {"vmiName": name},
            }
            await self.kube.create(VMIMS, body)
            pending = True
        if pending:
            self.evacuation_queue.add_after(node_name, self.clock.scaled(5.0))

    def _evacuation_failed(self, vmi_key: str) -> None:
        n = self._evac_failures.get(vmi_key, 0) + 1
        self._evac_failures[vmi_key] = n
        t = self.timings
        delay = min(t.evacuation_backoff_s * 2 ** (n - 1), t.evacuation_backoff_max_s)
        self._evac_not_before[vmi_key] = Clock.mono() + self.clock.scaled(delay)

    # --- migration controller ------------------------------------------------------------------

    def _active(self) -> list[_Migration]:
        # A migration holds its slot until its end is written, so that nobody reading the API
        # ever sees more migrations running than the limits allow.
        return [
            m
            for m in self._migrations.values()
            if m.phase in ACTIVE_MIGRATION_PHASES or m.written_phase in ACTIVE_MIGRATION_PHASES
        ]

    async def reconcile_migration(self, key: str) -> None:
        obj = self.vmims.get(key)
        if obj is None:
            mig = next((m for m in self._migrations.values() if m.key == key), None)
            if mig is not None and mig.phase not in ("Succeeded", "Failed"):
                await self._fail(mig, "migration object deleted", write=False)
            return
        uid = obj["metadata"]["uid"]
        mig = self._migrations.get(uid)
        if mig is None:
            ns = obj["metadata"]["namespace"]
            api_phase = obj.get("status", {}).get("phase")
            mig = _Migration(
                uid=uid,
                key=key,
                vmi=f"{ns}/{obj['spec'].get('vmiName', '')}",
                entered=Clock.mono(),
                created=Clock.mono(),
                evacuation=EVACUATION_ANNOTATION in (obj["metadata"].get("annotations") or {}),
            )
            if api_phase in ("Succeeded", "Failed"):
                mig.phase = mig.written_phase = api_phase
            self._migrations[uid] = mig
        await self._step(mig)
        await self._write_migration_status(mig)

    def _enter(self, mig: _Migration, phase: str, reason: str | None = None) -> None:
        mig.phase = phase
        mig.entered = Clock.mono()
        if reason:
            mig.reason = reason
        mig.transitions.append({"phase": phase, "phaseTransitionTimestamp": now_rfc3339()})
        log.info(
            "migration %s of %s: %s%s", mig.key, mig.vmi, phase, f" ({reason})" if reason else ""
        )
        self.migration_queue.add(mig.key)

    async def _step(self, mig: _Migration) -> None:
        t = self.timings
        now = Clock.mono()
        step_s = self.clock.scaled(t.migration_step_s)
        if mig.phase in ("Succeeded", "Failed"):
            return
        vmi = self.vmis.get(mig.vmi)
        vmi_ok = (
            vmi is not None
            and vmi.get("status", {}).get("phase") == "Running"
            and not vmi["metadata"].get("deletionTimestamp")
        )
        if not vmi_ok:
            await self._fail(mig, "VMI is not running")
            return
        assert vmi is not None
        if mig.phase == "Pending":
            if not mig.transitions:
                mig.transitions.append(
                    {"phase": "Pending", "phaseTransitionTimestamp": now_rfc3339()}
                )
            migratable, message = self.live_migratable(vmi)
            if not migratable:
                await self._fail(mig, message or "VMI is not live-migratable")
                return
            limits = self.limits()
            source = vmi["status"].get("nodeName")
            active = self._active()
            outbound = sum(1 for m in active if m.source_node == source)
            if len(active) >= limits.per_cluster or outbound >= limits.outbound_per_node:
                self.migration_queue.add_after(mig.key, max(0.2, step_s))
                return
            # Take the slot before any await: two workers must not both fit under a limit.
            mig.source_node = source
            mig.source_pod = self._source_pod_name(vmi)
            mig.target_pod = launcher_pod_name(vmi["metadata"]["name"], mig.uid)
            self._enter(mig, "Scheduling")
            await self._create_launcher_pod(vmi, migration=mig)
            await self._patch_vmi_migration_state(vmi, mig)
            return
        target = self.pods.get(f"{vmi['metadata']['namespace']}/{mig.target_pod}")
        if mig.phase == "Scheduling":
            if target is None:
                if now - mig.entered > self.clock.scaled(1.0):
                    await self._create_launcher_pod(vmi, migration=mig)  # idempotent by name
                self.migration_queue.add_after(mig.key, self.clock.scaled(1.0))
                return
            if not target["spec"].get("nodeName"):
                if now - mig.entered > self.clock.scaled(t.target_pending_timeout_s):
                    await self._fail(mig, "target pod could not be scheduled in time")
                else:
                    self.migration_queue.add_after(mig.key, self.clock.scaled(5.0))
                return
            mig.target_node = target["spec"]["nodeName"]
            await self._patch_vmi_migration_state(vmi, mig)
            self._enter(mig, "Scheduled")
            return
        if target is None:
            await self._fail(mig, "target pod disappeared")
            return
        assert target is not None
        if mig.phase == "Scheduled":
            if target.get("status", {}).get("phase") != "Running":
                return  # the target's kubelet is still starting it: its update wakes us
            self._enter(mig, "PreparingTarget")
            return
        src = self.fleet.members.get(mig.source_node or "")
        dst = self.fleet.members.get(mig.target_node or "")
        if src is None or not src.handler_alive:
            # virt-handler on the source must drive the migration; a dead or cut-off machine
            # cannot send its memory.
            await self._fail(mig, f"source node {mig.source_node} is unreachable")
            return
        if dst is None or not dst.handler_alive:
            await self._fail(mig, f"target node {mig.target_node} is unreachable")
            return
        phase_s = self._copy_s(vmi) if mig.phase == "Running" else step_s
        if now - mig.entered < phase_s:
            self.migration_queue.add_after(mig.key, mig.entered + phase_s - now)
            return
        if mig.phase == "PreparingTarget":
            self._enter(mig, "TargetReady")
            return
        if mig.phase == "TargetReady":
            self._enter(mig, "Running")
            return
        if mig.phase == "Running":
            ns = vmi["metadata"]["namespace"]
            source_key = self.fleet.vm_running_on(mig.source_node or "", mig.vmi)
            if source_key is None or not self.fleet.handover(
                mig.vmi,
                mig.source_node or "",
                source_key,
                mig.target_node or "",
                f"{ns}/{mig.target_pod}",
            ):
                await self._fail(mig, "handover failed: the domain is not running on the source")
                return
            mig.source_pod = split_key(source_key)[1]
            # As virt-handler does: the VMI moves to the target before the source pod ends.
            await self._patch_vmi_migration_state(vmi, mig, completed=True)
            self.fleet.complete_source(mig.source_node or "", source_key)
            self._evac_failures.pop(mig.vmi, None)
            self._enter(mig, "Succeeded")

    def _copy_s(self, vmi: Obj) -> float:
        """Scaled seconds the memory copy takes: the VMI's annotation, else the default."""
        raw = (vmi["metadata"].get("annotations") or {}).get(MIGRATION_SECONDS_ANNOTATION)
        try:
            seconds = float(raw) if raw is not None else self.timings.migration_s
        except ValueError:
            seconds = self.timings.migration_s
        return self.clock.scaled(max(0.0, seconds))

    def _source_pod_name(self, vmi: Obj) -> str | None:
        pod = self._current_pod(vmi, self.pods_of(vmi))
        return pod["metadata"]["name"] if pod else None

    async def _fail(self, mig: _Migration, reason: str, *, write: bool = True) -> None:
        self._enter(mig, "Failed", reason)
        if not write:
            # Deleted mid-flight: nothing left to write, and it must not hold a parallel slot.
            mig.written_phase = mig.phase
        if mig.evacuation:
            self._evacuation_failed(mig.vmi)
            node = mig.source_node
            if node:
                self.evacuation_queue.add(node)
        ns, _ = split_key(mig.vmi)
        if mig.target_pod:
            await self.kube.delete(PODS, mig.target_pod, ns)
        vmi = self.vmis.get(mig.vmi)
        if vmi is not None and mig.target_pod and not vmi["metadata"].get("deletionTimestamp"):
            mstate = vmi.get("status", {}).get("migrationState") or {}
            if mstate.get("migrationUid") == mig.uid:
                await self._patch_vmi_migration_state(vmi, mig, failed=True)

    async def _patch_vmi_migration_state(
        self, vmi: Obj, mig: _Migration, *, completed: bool = False, failed: bool = False
    ) -> None:
        now = now_rfc3339()
        state: Obj = {
            "migrationUid": mig.uid,
            "sourceNode": mig.source_node,
            "sourcePod": mig.source_pod,
            "targetPod": mig.target_pod,
            "targetNode": mig.target_node,
            "mode": "PreCopy",
            "completed": completed,
            "failed": failed,
        }
        old = vmi.get("status", {}).get("migrationState") or {}
        state["startTimestamp"] = (
            old.get("startTimestamp")
            if old.get("migrationUid") == mig.uid and old.get("startTimestamp")
            else now
        )
        if completed or failed:
            state["endTimestamp"] = now
        body: Obj = {"status": {"migrationState": state}}
        meta = vmi["metadata"]
        if completed:
            body["status"]["nodeName"] = mig.target_node
            body["status"]["activePods"] = {}
        await self.kube.patch(VMIS, meta["name"], body, meta["namespace"], sub="status")
        if completed:
            await self.kube.patch(
                VMIS,
                meta["name"],
                {"metadata": {"labels": {NODE_NAME_LABEL: mig.target_node}}},
                meta["namespace"],
            )

    async def _write_migration_status(self, mig: _Migration) -> None:
        if mig.written_phase == mig.phase:
            return
        ns, name = split_key(mig.key)
        state: Obj = {
            "sourceNode": mig.source_node,
            "targetNode": mig.target_node,
            "targetPod": mig.target_pod,
            "completed": mig.phase == "Succeeded",
            "failed": mig.phase == "Failed",
        }
        if mig.reason and mig.phase == "Failed":
            state["failureReason"] = mig.reason
        body = {
            "status": {
                "phase": mig.phase,
                "phaseTransitionTimestamps": mig.transitions,
                "migrationState": state,
            }
        }
        try:
            await self.kube.patch(VMIMS, name, body, ns, sub="status")
        except ApiError as e:
            if e.status != 404:
                raise
        mig.written_phase = mig.phase

    # --- virt-controller node check ------------------------------------------------------------

    async def _node_check_loop(self) -> None:
        while True:
            await asyncio.sleep(self.clock.scaled(self.timings.node_check_s))
            try:
                await self.check_nodes()
            except ApiError as e:
                log.debug("node check: %s", e)
            except Exception:
                log.exception("virt-controller node check failed")

    async def check_nodes(self) -> None:
        stale_s = self.clock.scaled(self.timings.handler_stale_s)
        now = parse_time(now_rfc3339()) or 0.0
        for node in self.nodes.values():
            meta = node["metadata"]
            beat = parse_time((meta.get("annotations") or {}).get(HEARTBEAT_ANNOTATION))
            if beat is None or now - beat < stale_s:
                continue
            if meta.get("labels", {}).get(SCHEDULABLE_LABEL) != "false":
                await self.kube.patch(
                    NODES, meta["name"], {"metadata": {"labels": {SCHEDULABLE_LABEL: "false"}}}
                )
            for vmi in self.vmis.by("node", meta["name"]):
                if vmi.get("status", {}).get("phase") not in ("Scheduled", "Running"):
                    continue
                running = [
                    p
                    for p in self.pods_of(vmi)
                    if p["spec"].get("nodeName") == meta["name"]
                    and p.get("status", {}).get("phase") == "Running"
                ]
                if not running:
                    await self._write_vmi_status(vmi, "Failed", None, reason="NodeUnresponsive")


def _status_unchanged(status: Obj, new: Obj) -> bool:
    for k, v in new.items():
        if k == "conditions":
            old = {
                c["type"]: (c.get("status"), c.get("reason"))
                for c in status.get("conditions") or ()
            }
            if len(old) != len(v) or any(
                old.get(c["type"]) != (c.get("status"), c.get("reason")) for c in v
            ):
                return False
        elif status.get(k) != v:
            return False
    return True


def _gate_true(pod: Obj) -> bool:
    c = condition(pod, UNPAUSED_GATE)
    return bool(c and c.get("status") == "True")


def _unschedulable(vmi: Obj) -> bool:
    cond = condition(vmi, "PodScheduled")
    return bool(cond and cond.get("status") == "False" and cond.get("reason") == "Unschedulable")


def _owner_vmi(pod: Obj) -> str | None:
    for ref in pod["metadata"].get("ownerReferences") or ():
        if ref.get("kind") == "VirtualMachineInstance":
            return f"{pod['metadata']['namespace']}/{ref['name']}"
    return None


def _owned_by(obj: Obj, uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or ())


def _exclude_node(affinity: Obj, node: str) -> Obj:
    """Add a required node-affinity term keeping a migration target off its source node."""
    affinity = dict(affinity)
    node_aff = dict(affinity.get("nodeAffinity") or {})
    required = dict(node_aff.get("requiredDuringSchedulingIgnoredDuringExecution") or {})
    expr = {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": [node]}
    terms = [dict(t) for t in required.get("nodeSelectorTerms") or ()] or [{}]
    for term in terms:
        term["matchExpressions"] = [*(term.get("matchExpressions") or ()), expr]
    required["nodeSelectorTerms"] = terms
    node_aff["requiredDuringSchedulingIgnoredDuringExecution"] = required
    affinity["nodeAffinity"] = node_aff
    return affinity


def vm_manifest(
    name: str,
    namespace: str = "default",
    *,
    run_strategy: str = "RerunOnFailure",
    claim: str | None = None,
    memory: str = "1Gi",
    cores: int = 1,
    eviction_strategy: str = "LiveMigrateIfPossible",
    spread: bool = True,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> Obj:
    """A Harvester-like VirtualMachine: root disk on a PVC, spread over nodes by the scheduler."""
    template_labels = {"harvesterhci.io/vmName": name, **(labels or {})}
    spec: Obj = {
        "evictionStrategy": eviction_strategy,
        "terminationGracePeriodSeconds": 120,
        "domain": {
            "cpu": {"cores": cores, "sockets": 1, "threads": 1},
            "resources": {"requests": {"memory": memory}, "limits": {"memory": memory}},
            "devices": {
                "disks": [{"name": "rootdisk", "disk": {"bus": "virtio"}}],
                "interfaces": [{"name": "default", "masquerade": {}}],
            },
            "machine": {"type": "q35"},
        },
        "networks": [{"name": "default", "pod": {}}],
        "volumes": [
            {
                "name": "rootdisk",
                "persistentVolumeClaim": {"claimName": claim or f"{name}-rootdisk"},
            }
        ],
    }
    if spread:
        # Soft spreading: the scheduler prefers an even spread but can still restart VMs on
        # the survivors when a node dies (DoNotSchedule would count the dead node's pods).
        spec["topologySpreadConstraints"] = [
            {
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": {LAUNCHER_LABEL: LAUNCHER_VALUE}},
            }
        ]
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {})},
        "spec": {
            "runStrategy": run_strategy,
            "template": {
                "metadata": {"labels": template_labels, "annotations": dict(annotations or {})},
                "spec": spec,
            },
        },
    }


def kubevirt_cr(limits: MigrationLimits | None = None) -> Obj:
    limits = limits or MigrationLimits()
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "KubeVirt",
        "metadata": {"name": "kubevirt", "namespace": "kubevirt"},
        "spec": {
            "configuration": {
                "evictionStrategy": "LiveMigrateIfPossible",
                "migrations": {
                    "parallelMigrationsPerCluster": limits.per_cluster,
                    "parallelOutboundMigrationsPerNode": limits.outbound_per_node,
                    "completionTimeoutPerGiB": 150,
                    "progressTimeout": 150,
                    "allowAutoConverge": False,
                    "allowPostCopy": False,
                },
            }
        },
    }


__all__: list[Any] = [
    "MIGRATION_SECONDS_ANNOTATION",
    "KubeVirtSim",
    "KubeVirtTimings",
    "MigrationLimits",
    "kubevirt_cr",
    "launcher_pod_name",
    "run_strategy",
    "vm_manifest",
]
