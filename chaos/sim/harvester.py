"""Harvester, simulated as API clients: its `vm-force-reset-policy` Setting, its node-down
controller in both algorithms, and Longhorn's volume attachments.

Owns:

- The `settings.harvesterhci.io/v1beta1` Setting `vm-force-reset-policy` (cluster-scoped; the
  policy is a JSON string in `.value`, empty → `.default`), created with the defaults of the
  chosen version and read live (a changed setting re-examines every not-Ready node).
- `NodeDownController`, switchable (`none`, `1.6`, `1.7`), every period x time_scale:
  - 1.7+ (harvester pkg/controller/master/node/node_down_controller.go): only on Ready=Unknown;
    after Ready's lastTransitionTime + period, the `kubevirt.io/drain:NoSchedule` taint (KubeVirt
    then evacuates migratable VMIs) and node condition `Drained=False`; after the Drained
    condition's lastTransitionTime + vmMigrationTimeout (0 means 180), the
    `node.kubernetes.io/out-of-service:NoExecute` taint (no value, as Harvester writes it) and
    `Drained=True`; on Ready=True both taints and the condition go. Ready=False: nothing. No
    fencing.
  - pre-1.7: Ready not True for `period` → force-delete (grace 0) the `kubevirt.io=virt-launcher`
    pods on the node, delete the `driver.longhorn.io` VolumeAttachments of their volumes on that
    node, backdate the node's `kubevirt.io/heartbeat` so virt-controller sees it unresponsive.
- `Longhorn`: a PV + pre-bound PVC per VM disk (CSI driver `driver.longhorn.io`), and the
  attach/detach path a kubelet start or stop implies (VolumeAttachment `csi-<sha256>` named as
  the CSI attacher names it, `status.attached` set as the external-attacher would). A
  ReadWriteOnce volume still attached to another node blocks a pod's start (a Multi-Attach
  error), until the attachment is removed: by the kubelet's detach, by whoever deletes it (the
  1.6 controller, the watchdog), or by the attach-detach controller's rule — 6 min (scaled)
  after its node lost its pods, at once when the node has the out-of-service taint.

Must not: fence, or know about the watchdog.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Literal

from chaos.sim.informer import (
    NODES,
    PODS,
    PVCS,
    PVS,
    SETTINGS,
    STORAGE_CLASSES,
    STRATEGIC_PATCH,
    VOLUME_ATTACHMENTS,
    ApiError,
    Clock,
    Informer,
    Kube,
    Obj,
    WorkQueue,
    condition,
    has_taint,
    now_rfc3339,
    parse_time,
)
from chaos.sim.kubelet import HEARTBEAT_ANNOTATION, is_launcher

log = logging.getLogger(__name__)

HarvesterMode = Literal["none", "1.6", "1.7"]
HARVESTER_MODES: tuple[str, ...] = ("none", "1.6", "1.7")
POLICY_SETTING = "vm-force-reset-policy"
UPGRADE_NAMESPACE = "harvester-system"
LATEST_UPGRADE_LABEL = "harvesterhci.io/latestUpgrade"
DEFAULT_POLICY: dict[str, dict[str, object]] = {
    "1.6": {"enable": True, "period": 300},
    "1.7": {"enable": True, "period": 15, "vmMigrationTimeout": 180},
}
DRAIN_TAINT = "kubevirt.io/drain"
OUT_OF_SERVICE_TAINT = "node.kubernetes.io/out-of-service"
DRAINED_CONDITION = "Drained"
DRAINED_MSG = "Node is draining due to kubelet/node not ready."
LONGHORN_DRIVER = "driver.longhorn.io"
MAX_WAIT_FOR_UNMOUNT_S = 360.0  # attach-detach controller's maxWaitForUnmountDuration


@dataclass(frozen=True)
class ForceResetPolicy:
    enable: bool = True
    period_s: float = 15.0
    vm_migration_timeout_s: float = 180.0


def parse_policy(setting: Obj | None) -> ForceResetPolicy | None:
    """The policy a Setting holds (value, else default); None when absent or invalid."""
    if setting is None:
        return None
    raw = setting.get("value") or setting.get("default") or ""
    try:
        data = json.loads(raw)
        period = float(data.get("period", 0))
        timeout = float(data.get("vmMigrationTimeout", 0) or 180)
        if period <= 0 or timeout < 0:
            raise ValueError(f"period {period}, vmMigrationTimeout {timeout}")
        return ForceResetPolicy(bool(data.get("enable", False)), period, timeout)
    except (ValueError, TypeError, AttributeError) as e:
        log.warning("invalid %s setting %r: %s", POLICY_SETTING, raw, e)
        return None


def setting_manifest(mode: str, value: dict[str, object] | None = None) -> Obj:
    default = DEFAULT_POLICY.get(mode, DEFAULT_POLICY["1.7"])
    return {
        "apiVersion": "harvesterhci.io/v1beta1",
        "kind": "Setting",
        "metadata": {"name": POLICY_SETTING},
        "default": json.dumps(default, separators=(",", ":")),
        "value": json.dumps(value, separators=(",", ":")) if value else "",
    }


def upgrade_manifest(name: str, version: str = "v1.7.1") -> Obj:
    """A Harvester Upgrade as the UI creates it: the latest one, not completed yet."""
    return {
        "apiVersion": "harvesterhci.io/v1beta1",
        "kind": "Upgrade",
        "metadata": {
            "name": name,
            "namespace": UPGRADE_NAMESPACE,
            "labels": {LATEST_UPGRADE_LABEL: "true"},
        },
        "spec": {"version": version},
        "status": {},
    }


def upgrade_completed(succeeded: bool = True) -> Obj:
    """The status patch with which Harvester's upgrade controller ends an upgrade."""
    return {
        "status": {
            "conditions": [
                {
                    "type": "Completed",
                    "status": "True" if succeeded else "False",
                    "reason": "" if succeeded else "UpgradeFailed",
                    "lastUpdateTime": now_rfc3339(),
                }
            ]
        }
    }


def attachment_name(volume_handle: str, node: str, driver: str = LONGHORN_DRIVER) -> str:
    """Named as the CSI attacher names VolumeAttachments (k8s pkg/volume/csi)."""
    digest = hashlib.sha256(f"{volume_handle}{driver}{node}".encode()).hexdigest()
    return f"csi-{digest}"


class Longhorn:
    """Volumes of the VMs and their attachments to nodes (Longhorn CSI + attach-detach)."""

    def __init__(
        self,
        kube: Kube,
        clock: Clock,
        *,
        pvcs: Informer,
        vas: Informer,
        pods: Informer,
        nodes: Informer,
    ) -> None:
        self.kube, self.clock = kube, clock
        self.pvcs, self.vas, self.pods, self.nodes = pvcs, vas, pods, nodes
        vas.add_index(
            "pv",
            lambda va: (
                [pv]
                if (pv := va.get("spec", {}).get("source", {}).get("persistentVolumeName"))
                else []
            ),
        )
        self._orphaned_since: dict[str, float] = {}

    async def provision(
        self,
        namespace: str,
        claim: str,
        *,
        access_mode: str = "ReadWriteMany",
        size: str = "10Gi",
        volume_mode: str = "Block",
    ) -> None:
        """A PV and a PVC bound to it (as Longhorn's provisioner plus the binder leave them)."""
        pv_name = f"pvc-{hashlib.sha256(f'{namespace}/{claim}'.encode()).hexdigest()[:32]}"
        pv = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {
                "name": pv_name,
                "annotations": {"pv.kubernetes.io/provisioned-by": LONGHORN_DRIVER},
            },
            "spec": {
                "capacity": {"storage": size},
                "accessModes": [access_mode],
                "volumeMode": volume_mode,
                "persistentVolumeReclaimPolicy": "Delete",
                "storageClassName": "longhorn",
                "csi": {"driver": LONGHORN_DRIVER, "volumeHandle": pv_name, "fsType": "ext4"},
                "claimRef": {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "namespace": namespace,
                    "name": claim,
                },
            },
        }
        pvc = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {
                "name": claim,
                "namespace": namespace,
                "annotations": {
                    # The binder's own marks: the scheduler treats the claim as bound at once,
                    # without waiting for the PV controller (5 bindings/s at its default QPS
                    # would take 100 min for 30,000 VMs). The binder still syncs the phases.
                    "pv.kubernetes.io/bind-completed": "yes",
                    "pv.kubernetes.io/bound-by-controller": "yes",
                    "volume.kubernetes.io/storage-provisioner": LONGHORN_DRIVER,
                },
            },
            "spec": {
                "accessModes": [access_mode],
                "volumeMode": volume_mode,
                "storageClassName": "longhorn",
                "volumeName": pv_name,
                "resources": {"requests": {"storage": size}},
            },
        }
        # The claim first, then its PV pointing back at the claim's uid: the binder then only
        # finishes a binding both sides agree on (a claimRef without a uid is misbound: Lost).
        try:
            created = await self.kube.create(PVCS, pvc)
        except ApiError as e:
            if e.status != 409:
                raise
            created = await self.kube.get(PVCS, claim, namespace)
        pv["spec"]["claimRef"]["uid"] = created["metadata"]["uid"]  # type: ignore[index]
        try:
            await self.kube.create(PVS, pv)
        except ApiError as e:
            if e.status != 409:
                raise

    async def ensure_storage_class(self) -> None:
        body = {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {
                "name": "longhorn",
                "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
            },
            "provisioner": LONGHORN_DRIVER,
            "allowVolumeExpansion": True,
            "reclaimPolicy": "Delete",
            "volumeBindingMode": "Immediate",
            "parameters": {"numberOfReplicas": "3", "migratable": "true"},
        }
        try:
            await self.kube.create(STORAGE_CLASSES, body)
        except ApiError as e:
            if e.status != 409:
                raise

    def _volumes(self, pod: Obj) -> list[tuple[str, str]]:
        """(PV name, access mode) of every Longhorn PVC the pod mounts."""
        out = []
        ns = pod["metadata"]["namespace"]
        for v in pod["spec"].get("volumes") or ():
            claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
            pvc = self.pvcs.get(f"{ns}/{claim}") if claim else None
            if pvc is None:
                continue
            pv = pvc["spec"].get("volumeName")
            if pv:
                modes = pvc["spec"].get("accessModes") or ["ReadWriteOnce"]
                out.append((pv, modes[0]))
        return out

    def blocked_by(self, pod: Obj, node: str) -> str | None:
        """A Multi-Attach conflict: an RWO volume of `pod` still attached to another node."""
        for pv, mode in self._volumes(pod):
            if mode == "ReadWriteMany":
                continue
            for va in self.vas.by("pv", pv):
                other = va["spec"].get("nodeName")
                if other != node:
                    return f"volume {pv} is still attached to {other}"
        return None

    async def attach(self, pod: Obj, node: str) -> list[str]:
        """Attach `pod`'s Longhorn volumes to `node`; returns their PV names."""
        pvs = []
        for pv, _mode in self._volumes(pod):
            pvs.append(pv)
            name = attachment_name(pv, node)
            if self.vas.get(name) is not None:
                continue
            body = {
                "apiVersion": "storage.k8s.io/v1",
                "kind": "VolumeAttachment",
                "metadata": {"name": name},
                "spec": {
                    "attacher": LONGHORN_DRIVER,
                    "nodeName": node,
                    "source": {"persistentVolumeName": pv},
                },
            }
            try:
                await self.kube.create(VOLUME_ATTACHMENTS, body)
            except ApiError as e:
                if e.status != 409:
                    raise
            await self.kube.patch(
                VOLUME_ATTACHMENTS, name, {"status": {"attached": True}}, sub="status"
            )
        return pvs

    async def detach(self, pvs: list[str], node: str, *, except_uid: str) -> None:
        """After the kubelet unmounted a pod's volumes; keeps those other pods there still use."""
        used = {
            pv
            for other in self.pods.by("node", node)
            if other["metadata"]["uid"] != except_uid
            and other.get("status", {}).get("phase") not in ("Succeeded", "Failed")
            for pv, _ in self._volumes(other)
        }
        for pv in pvs:
            if pv not in used:
                await self.kube.delete(VOLUME_ATTACHMENTS, attachment_name(pv, node))

    async def delete_attachments(self, pvs: set[str], node: str) -> int:
        n = 0
        for pv in pvs:
            for va in self.vas.by("pv", pv):
                if (
                    va["spec"].get("nodeName") == node
                    and va["spec"].get("attacher") == LONGHORN_DRIVER
                ):
                    n += await self.kube.delete(VOLUME_ATTACHMENTS, va["metadata"]["name"])
        return n

    async def run(self) -> None:
        """The attach-detach controller's forced detach of volumes of pods gone from a node."""
        while True:
            await asyncio.sleep(max(1.0, self.clock.scaled(10.0)))
            try:
                await self.reap_orphans()
            except ApiError as e:
                log.debug("longhorn: %s", e)
            except Exception:
                log.exception("longhorn: reaping orphaned attachments failed")

    async def reap_orphans(self) -> None:
        now = Clock.mono()
        seen = set()
        nodes_with_vas = {va["spec"].get("nodeName", "") for va in self.vas.values()}
        # One pass over the pods of those nodes (not one per attachment): O(pods) per period.
        in_use = {
            (node, pv)
            for node in nodes_with_vas
            for pod in self.pods.by("node", node)
            if pod.get("status", {}).get("phase") not in ("Succeeded", "Failed")
            for pv, _ in self._volumes(pod)
        }
        for va in self.vas.values():
            name = va["metadata"]["name"]
            node = va["spec"].get("nodeName", "")
            pv = va["spec"].get("source", {}).get("persistentVolumeName")
            if (node, pv) in in_use:
                continue
            seen.add(name)
            since = self._orphaned_since.setdefault(name, now)
            node_obj = self.nodes.get(node)
            oos = node_obj is not None and has_taint(node_obj, OUT_OF_SERVICE_TAINT)
            ready = condition(node_obj, "Ready")
            # A Ready node's kubelet reports the volume unmounted: detach at once. An
            # unreachable node's volumes wait maxWaitForUnmountDuration, unless out-of-service.
            if (ready or {}).get("status") == "True" and now - since > self.clock.scaled(20.0):
                await self.kube.delete(VOLUME_ATTACHMENTS, name)
            elif (
                oos or node_obj is None or now - since >= self.clock.scaled(MAX_WAIT_FOR_UNMOUNT_S)
            ):
                await self.kube.delete(VOLUME_ATTACHMENTS, name)
        for name in list(self._orphaned_since):
            if name not in seen:
                del self._orphaned_since[name]

    def pvs_of(self, pods: list[Obj]) -> set[str]:
        return {pv for pod in pods for pv, _ in self._volumes(pod)}


class NodeDownController:
    """Harvester's node-down controller, as of 1.6 or 1.7 (`mode`), or nothing (`none`)."""

    def __init__(
        self,
        kube: Kube,
        clock: Clock,
        mode: str,
        *,
        nodes: Informer,
        pods: Informer,
        settings: Informer,
        longhorn: Longhorn | None,
        handler_stale_s: float = 300.0,
    ) -> None:
        if mode not in HARVESTER_MODES:
            raise ValueError(f"harvester mode must be one of {HARVESTER_MODES}, got {mode!r}")
        self.kube, self.clock, self.mode = kube, clock, mode
        self.nodes, self.pods, self.settings = nodes, pods, settings
        self.longhorn = longhorn
        self.handler_stale_s = handler_stale_s
        self.queue = WorkQueue(f"harvester-{mode}-node-down")
        self._reset_done: dict[str, str] = {}  # node → Ready lastTransitionTime handled (1.6)
        self.actions: list[dict[str, object]] = []  # what it did, for reports and tests
        if mode != "none":
            nodes.add_handler(lambda key, new, old: self.queue.add(key))
            settings.add_handler(self._on_setting)

    def _on_setting(self, key: str, new: Obj | None, old: Obj | None) -> None:
        if key == POLICY_SETTING:
            for node in self.nodes.values():
                self.queue.add(node["metadata"]["name"])

    def policy(self) -> ForceResetPolicy | None:
        return parse_policy(self.settings.get(POLICY_SETTING))

    def _record(self, node: str, action: str, **extra: object) -> None:
        entry = {
            "node": node,
            "action": action,
            "at": now_rfc3339(),
            "wall": time.time(),
            "mono": Clock.mono(),
            **extra,
        }
        self.actions.append(entry)
        log.info("harvester %s: %s %s %s", self.mode, node, action, extra or "")

    async def run(self) -> None:
        if self.mode == "none":
            await asyncio.Event().wait()
        await self.queue.run_workers(1, self.reconcile)

    async def reconcile(self, name: str) -> None:
        node = self.nodes.get(name)
        if node is None or node["metadata"].get("deletionTimestamp"):
            return
        ready = condition(node, "Ready")
        if ready is None:
            return
        if self.mode == "1.7":
            await self._reconcile_17(node, ready)
        elif self.mode == "1.6":
            await self._reconcile_16(node, ready)

    def _wait(self, name: str, since: str | None, seconds: float) -> bool:
        """True once `seconds` (unscaled) have passed since `since`; else requeue for then."""
        start = parse_time(since) or time.time()
        remaining = start + self.clock.scaled(seconds) - time.time()
        if remaining > 0:
            self.queue.add_after(name, remaining + 0.01)
            return False
        return True

    # --- 1.7+ ----------------------------------------------------------------------------------

    async def _reconcile_17(self, node: Obj, ready: Obj) -> None:
        name = node["metadata"]["name"]
        status = ready.get("status")
        if status == "Unknown":
            policy = self.policy()
            if policy is None or not policy.enable:
                return
            if has_taint(node, DRAIN_TAINT) and has_taint(node, OUT_OF_SERVICE_TAINT):
                return
            if not has_taint(node, DRAIN_TAINT):
                if not self._wait(name, ready.get("lastTransitionTime"), policy.period_s):
                    return
                node = await self._add_taint(node, {"key": DRAIN_TAINT, "effect": "NoSchedule"})
                self._record(name, "drain-taint")
            node = await self._set_drained(node, "False", "HarvesterNodeIsDraining")
            drained = condition(node, DRAINED_CONDITION)
            if not has_taint(node, OUT_OF_SERVICE_TAINT):
                if not self._wait(
                    name, (drained or {}).get("lastTransitionTime"), policy.vm_migration_timeout_s
                ):
                    return
                node = await self._add_taint(
                    node, {"key": OUT_OF_SERVICE_TAINT, "effect": "NoExecute"}
                )
                self._record(name, "out-of-service-taint")
            await self._set_drained(node, "True", "HarvesterNodeIsDrained")
        elif status == "True":
            if has_taint(node, DRAIN_TAINT) or has_taint(node, OUT_OF_SERVICE_TAINT):
                await self._remove_taints(node, {DRAIN_TAINT, OUT_OF_SERVICE_TAINT})
                self._record(name, "taints-removed")
            if condition(node, DRAINED_CONDITION) is not None:
                await self.kube.patch(
                    NODES,
                    name,
                    {"status": {"conditions": [{"type": DRAINED_CONDITION, "$patch": "delete"}]}},
                    sub="status",
                    content_type=STRATEGIC_PATCH,
                )

    async def _add_taint(self, node: Obj, taint: Obj) -> Obj:
        meta = node["metadata"]
        taints = [*(node["spec"].get("taints") or ()), {**taint, "timeAdded": now_rfc3339()}]
        # An Update with the resourceVersion read, like Harvester's: a conflict retries.
        return await self.kube.patch(
            NODES,
            meta["name"],
            {"metadata": {"resourceVersion": meta["resourceVersion"]}, "spec": {"taints": taints}},
        )

    async def _remove_taints(self, node: Obj, keys: set[str]) -> Obj:
        meta = node["metadata"]
        taints = [t for t in node["spec"].get("taints") or () if t.get("key") not in keys]
        return await self.kube.patch(
            NODES,
            meta["name"],
            {
                "metadata": {"resourceVersion": meta["resourceVersion"]},
                "spec": {"taints": taints or None},
            },
        )

    async def _set_drained(self, node: Obj, status: str, reason: str) -> Obj:
        old = condition(node, DRAINED_CONDITION)
        if old is not None and old.get("status") == status and old.get("reason") == reason:
            return node
        now = now_rfc3339()
        ltt = old["lastTransitionTime"] if old and old.get("status") == status else now
        cond = {
            "type": DRAINED_CONDITION,
            "status": status,
            "reason": reason,
            "message": DRAINED_MSG,
            "lastHeartbeatTime": now,
            "lastTransitionTime": ltt,
        }
        return await self.kube.patch(
            NODES,
            node["metadata"]["name"],
            {"status": {"conditions": [cond]}},
            sub="status",
            content_type=STRATEGIC_PATCH,
        )

    # --- pre-1.7 -------------------------------------------------------------------------------

    async def _reconcile_16(self, node: Obj, ready: Obj) -> None:
        name = node["metadata"]["name"]
        if ready.get("status") == "True":
            self._reset_done.pop(name, None)
            return
        policy = self.policy()
        if policy is None or not policy.enable:
            return
        ltt = ready.get("lastTransitionTime") or ""
        if not self._wait(name, ltt, policy.period_s):
            return
        pods = [p for p in self.pods.by("node", name) if is_launcher(p)]
        for pod in pods:
            meta = pod["metadata"]
            if await self.kube.delete(PODS, meta["name"], meta["namespace"], grace_period_s=0):
                self._record(name, "force-delete-pod", pod=f"{meta['namespace']}/{meta['name']}")
        if self._reset_done.get(name) == ltt:
            return
        if self.longhorn is not None:
            n = await self.longhorn.delete_attachments(self.longhorn.pvs_of(pods), name)
            if n:
                self._record(name, "delete-volume-attachments", count=n)
        # Backdate virt-handler's heartbeat: virt-controller then treats the node as
        # unresponsive at once instead of after its 5 minutes.
        stale = time.time() - self.clock.scaled(self.handler_stale_s) - 60
        await self.kube.patch(
            NODES,
            name,
            {
                "metadata": {
                    "annotations": {
                        HEARTBEAT_ANNOTATION: time.strftime(
                            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(stale)
                        )
                    }
                }
            },
        )
        self._record(name, "backdate-heartbeat")
        self._reset_done[name] = ltt


async def ensure_setting(kube: Kube, mode: str, value: dict[str, object] | None) -> None:
    """Create (or reset) the vm-force-reset-policy Setting for Harvester `mode`."""
    body = setting_manifest(mode, value)
    current = await kube.get_or_none(SETTINGS, POLICY_SETTING)
    if current is None:
        await kube.create(SETTINGS, body)
    else:
        await kube.patch(
            SETTINGS, POLICY_SETTING, {"default": body["default"], "value": body["value"]}
        )
