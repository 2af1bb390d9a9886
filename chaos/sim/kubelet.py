"""Simulated machines: a kubelet and a virt-handler per node, and the node's local runtime.

Owns, per node (`SimNode`), the machine's own truth — powered or not, its boot id, whether its
kubelet runs, whether its network is up, which pods and VM domains really run on it — and what
its kubelet and virt-handler write to the API through the shared client:

- kubelet: registers the Node (capacity, `kubernetes.io/hostname`, `kubevirt.io/schedulable`),
  renews `kube-node-lease/<node>`, posts node status (Ready, bootID) when it drifts and every
  report period, runs pods the real scheduler bound to it (Running and Ready after a start
  delay, readiness gates honoured), finishes graceful deletions (stop, then delete with grace 0
  and a uid precondition), kills pods whose objects vanished. After a reboot, pods that had run
  before and still exist are restarted if their restartPolicy allows, else marked Failed — as a
  real kubelet does with `restartPolicy: Never` virt-launcher pods.
- virt-handler: the `kubevirt.io/heartbeat` annotation every 60 s (scaled), and the readiness
  gate `kubevirt.io/virtual-machine-unpaused` on launcher pods whose domain runs here.

Failure model: power-off stops everything at once and silently (no status, no lease, no
deletes); a partition cuts the node's API access (its kubelet and virt-handler do nothing, its
VMs keep running); a kubelet-only death leaves the VMs and virt-handler running. Every such
change cancels the node's task mid-request, and a (re)connecting kubelet resyncs from the
shared pod cache, reaping pods deleted while it was away.

`Fleet` owns all nodes: it routes events of the shared pod informer to the node the pod is bound
to, so the cost of a node is one asyncio task that sleeps until it has something to do.

Must not: write VMI or migration state (kubevirt.py), decide anything for the watchdog, or touch
the machine's agent process or proxies (faults.py/cluster.py do that around power changes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import uuid
from dataclasses import dataclass, field
from typing import Protocol

from chaos.sim.informer import (
    LEASES,
    NODES,
    PODS,
    STRATEGIC_PATCH,
    ApiError,
    Clock,
    Informer,
    Kube,
    Obj,
    condition,
    now_micro,
    now_rfc3339,
)
from chaos.sim.ledger import Ledger, StartReason, StopReason

log = logging.getLogger(__name__)

LAUNCHER_LABEL = "kubevirt.io"
LAUNCHER_VALUE = "virt-launcher"
MIGRATION_JOB_LABEL = "kubevirt.io/migrationJobUID"
VM_NAME_LABEL = "vm.kubevirt.io/name"
UNPAUSED_GATE = "kubevirt.io/virtual-machine-unpaused"
HEARTBEAT_ANNOTATION = "kubevirt.io/heartbeat"
SCHEDULABLE_LABEL = "kubevirt.io/schedulable"
KUBELET_VERSION = "v1.37.2"


@dataclass
class NodeTimings:
    """Unscaled seconds (real-world values); `Clock.scaled` compresses them."""

    lease_duration_s: float = 40.0  # kubelet default
    lease_renew_s: float = 10.0  # kubelet renews every 10 s (25 % of the duration)
    status_update_s: float = 10.0  # nodeStatusUpdateFrequency: post status if it drifted
    status_report_s: float = 300.0  # nodeStatusReportFrequency: post status anyway
    handler_heartbeat_s: float = 60.0  # virt-handler heartbeat annotation
    pod_start_s: float = 3.0  # bound → containers running, domain booted
    pod_stop_s: float = 1.0  # deletionTimestamp → containers stopped (capped by grace)
    boot_s: float = 10.0  # power-on → kubelet up


@dataclass
class NodeCapacity:
    cpu: str = "32"
    memory: str = "128Gi"
    pods: str = "110"
    ephemeral_storage: str = "200Gi"


@dataclass
class LocalPod:
    """A pod as the machine runs it, whatever the API says."""

    key: str
    uid: str
    vm: str | None  # "ns/name" of the VM when this is a virt-launcher pod
    domain: bool = False  # the VM's domain runs in this pod (a migration target: not yet)
    completed: bool = False  # the domain left (migrated away): the pod has Succeeded
    reported: bool = False  # our last status patch for the current state went through
    stopping_at: float | None = None
    volumes: list[str] = field(default_factory=list)  # attached PVs


class VolumeHooks(Protocol):
    """The storage stack as the kubelet meets it (attach before start, detach after stop)."""

    def blocked_by(self, pod: Obj, node: str) -> str | None: ...

    async def attach(self, pod: Obj, node: str) -> list[str]: ...

    async def detach(self, pvs: list[str], node: str, *, except_uid: str) -> None: ...


def is_launcher(pod: Obj) -> bool:
    return bool(pod["metadata"].get("labels", {}).get(LAUNCHER_LABEL) == LAUNCHER_VALUE)


def vm_of(pod: Obj) -> str | None:
    """The VM ("ns/name") a launcher pod runs; the VMI shares the VM's name in KubeVirt."""
    if not is_launcher(pod):
        return None
    meta = pod["metadata"]
    name = meta.get("labels", {}).get(VM_NAME_LABEL)
    if not name:
        for ref in meta.get("ownerReferences") or ():
            if ref.get("kind") == "VirtualMachineInstance":
                name = ref["name"]
    return f"{meta['namespace']}/{name}" if name else None


def is_migration_target(pod: Obj) -> bool:
    return MIGRATION_JOB_LABEL in pod["metadata"].get("labels", {})


def pod_ready(pod: Obj, extra_conditions: list[Obj], containers_ready: bool) -> bool:
    """kubelet's rule: Ready iff containers are ready and every readiness gate is True."""
    conds = {c["type"]: c for c in pod.get("status", {}).get("conditions") or ()}
    conds.update({c["type"]: c for c in extra_conditions})
    for gate in pod["spec"].get("readinessGates") or ():
        cond = conds.get(gate.get("conditionType"))
        if cond is None or cond.get("status") != "True":
            return False
    return containers_ready


def _cond(ctype: str, status: bool, now: str, reason: str | None = None) -> Obj:
    c: Obj = {
        "type": ctype,
        "status": "True" if status else "False",
        "lastProbeTime": None,
        "lastTransitionTime": now,
    }
    if reason:
        c["reason"] = reason
    return c


class SimNode:
    """One simulated machine. Its single task does all of its kubelet's and handler's I/O."""

    def __init__(self, fleet: Fleet, name: str, index: int) -> None:
        self.fleet = fleet
        self.name = name
        self.index = index
        self.boot_id = str(uuid.uuid4())
        self.powered = False
        self.kubelet_running = False
        self.network_up = True
        # The `api-link-cut` fault: only the machine's path to the API server is down (its
        # kubelet and virt-handler cannot reach it; broker and peer paths stay up).
        self.api_cut = False
        self.pods: dict[str, LocalPod] = {}
        self.node_uid: str | None = None
        self._dirty: set[str] = set()
        self._resync: set[str] = set()
        self._pending_start: dict[str, float] = {}
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lease: Obj | None = None
        self._registered = False
        self._next_lease = 0.0
        self._next_status = 0.0
        self._last_report = 0.0
        self._next_heartbeat = 0.0
        self._ip_counter = 1
        self._boot_at = 0.0
        self.host_ip = f"10.0.{index // 250}.{index % 250 + 1}"

    # --- state seen by others ------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Its processes can reach the API (powered, network up, API path not cut)."""
        return self.powered and self.network_up and not self.api_cut

    @property
    def networked(self) -> bool:
        """Its network carries traffic at all (powered and network up)."""
        return self.powered and self.network_up

    @property
    def healthy(self) -> bool:
        return self.connected and self.kubelet_running

    @property
    def handler_alive(self) -> bool:
        """virt-handler runs and reaches the API: it can take part in a migration."""
        return self.connected and self._boot_at <= Clock.mono()

    def state(self) -> dict[str, object]:
        return {
            "powered": self.powered,
            "kubelet": self.kubelet_running,
            "network": self.network_up,
            "api_cut": self.api_cut,
            "boot_id": self.boot_id,
            "pods": len(self.pods),
            "domains": sorted(p.vm for p in self.pods.values() if p.domain and p.vm),
        }

    # --- faults (synchronous: the machine changes state at one instant) -----------------------

    def power_on(self, *, boot_delay_s: float | None = None) -> None:
        if self.powered:
            return
        self.powered = True
        self.kubelet_running = True
        self.boot_id = str(uuid.uuid4())
        delay = (
            self.fleet.clock.scaled(self.fleet.timings.boot_s)
            if boot_delay_s is None
            else boot_delay_s
        )
        self._boot_at = Clock.mono() + delay
        self._registered = False
        self._lease = None
        self._restart_task()

    def power_off(self, reason: StopReason = StopReason.POWEROFF) -> list[str]:
        """Cut the power: every domain stops now, nothing more is said to the API."""
        if not self.powered:
            return []
        self.powered = False
        self.kubelet_running = False
        stopped = []
        for local in self.pods.values():
            if local.domain and local.vm:
                self.fleet.ledger.stop(local.vm, local.uid, reason)
                stopped.append(local.vm)
        self.pods.clear()
        self._pending_start.clear()
        self._dirty.clear()
        self._resync.clear()
        self._restart_task()
        return stopped

    def partition(self) -> None:
        if not self.network_up:
            return
        self.network_up = False
        self._restart_task()

    def heal(self) -> None:
        if self.network_up:
            return
        self.network_up = True
        self._restart_task()

    def cut_api(self, cut: bool) -> None:
        if self.api_cut == cut:
            return
        self.api_cut = cut
        self._restart_task()

    def kubelet_stop(self) -> None:
        if not self.kubelet_running:
            return
        self.kubelet_running = False
        self._restart_task()

    def kubelet_start(self) -> None:
        if self.kubelet_running or not self.powered:
            return
        self.kubelet_running = True
        self._restart_task()

    def _restart_task(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._pending_start.clear()
        if self.powered:
            # A (re)connecting or restarted kubelet relists everything bound to it.
            self._resync = set(self.fleet.pods.keys_by("node", self.name)) | set(self.pods)
            self._dirty |= self._resync
            self._task = self.fleet.spawn(self._run(), f"node {self.name}")

    def mark(self, key: str) -> None:
        self._dirty.add(key)
        self._kick.set()

    # --- the node's task -----------------------------------------------------------------------

    async def _run(self) -> None:
        t = self.fleet.timings
        clock = self.fleet.clock
        wait = self._boot_at - Clock.mono()
        if wait > 0:
            await asyncio.sleep(wait)
        while True:
            self._kick.clear()
            now = Clock.mono()
            if self.connected:
                try:
                    if self.kubelet_running:
                        if not self._registered:
                            await self._register()
                        if now >= self._next_lease:
                            await self._renew_lease()
                            self._next_lease = now + clock.scaled(t.lease_renew_s)
                        if now >= self._next_status:
                            await self._update_status(now)
                            self._next_status = now + clock.scaled(t.status_update_s)
                    if now >= self._next_heartbeat:
                        await self._handler_heartbeat()
                        self._next_heartbeat = now + clock.scaled(t.handler_heartbeat_s)
                    await self._process_pods()
                except ApiError as e:
                    log.debug("%s: %s", self.name, e)
                    await asyncio.sleep(min(1.0, clock.scaled(2.0)))
                    continue
                except Exception:
                    # A simulator bug must not take the whole fleet down: log, back off, go on.
                    log.exception("%s: node loop failed", self.name)
                    await asyncio.sleep(1.0)
                    continue
            wake = self._next_wake()
            timeout = max(0.0, wake - Clock.mono()) if wake is not None else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), timeout)

    def _next_wake(self) -> float | None:
        if not self.connected:
            return None
        times = [self._next_heartbeat]
        if self.kubelet_running:
            times += [self._next_lease, self._next_status]
            times += self._pending_start.values()
            times += [p.stopping_at for p in self.pods.values() if p.stopping_at is not None]
        return min(times)

    # --- kubelet: node object and lease --------------------------------------------------------

    def _node_status(self, current: Obj | None) -> Obj:
        now = now_rfc3339()
        cap = self.fleet.capacity
        resources = {
            "cpu": cap.cpu,
            "memory": cap.memory,
            "pods": cap.pods,
            "ephemeral-storage": cap.ephemeral_storage,
        }

        def cond(ctype: str, status: str, reason: str, message: str) -> Obj:
            old = condition(current, ctype)
            same = old is not None and old.get("status") == status
            return {
                "type": ctype,
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": now,
                "lastTransitionTime": old["lastTransitionTime"] if same and old else now,
            }

        return {
            "capacity": resources,
            "allocatable": resources,
            "conditions": [
                cond(
                    "MemoryPressure",
                    "False",
                    "KubeletHasSufficientMemory",
                    "kubelet has sufficient memory available",
                ),
                cond(
                    "DiskPressure",
                    "False",
                    "KubeletHasNoDiskPressure",
                    "kubelet has no disk pressure",
                ),
                cond(
                    "PIDPressure",
                    "False",
                    "KubeletHasSufficientPID",
                    "kubelet has sufficient PID available",
                ),
                cond("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": self.host_ip},
                {"type": "Hostname", "address": self.name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "bootID": self.boot_id,
                "machineID": f"{self.index:032x}",
                "systemUUID": str(uuid.UUID(int=self.index)),
                "kernelVersion": "6.4.0-sim",
                "osImage": "chaos-sim",
                "containerRuntimeVersion": "containerd://1.7.0-sim",
                "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": KUBELET_VERSION,
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }

    async def _register(self) -> None:
        kube = self.fleet.kube
        current = self.fleet.nodes.get(self.name)
        if current is None:
            body = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": self.name,
                    "labels": {
                        "kubernetes.io/hostname": self.name,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                        SCHEDULABLE_LABEL: "true",
                        **self.fleet.node_labels,
                    },
                    "annotations": {HEARTBEAT_ANNOTATION: now_rfc3339()},
                },
                "spec": {},
                "status": self._node_status(None),
            }
            try:
                current = await kube.create(NODES, body)
            except ApiError as e:
                if e.status != 409:
                    raise
                current = await kube.get(NODES, self.name)
        self.node_uid = current["metadata"]["uid"]
        await self._post_status(current)
        self._registered = True
        now = Clock.mono()
        self._next_lease = self._next_status = self._next_heartbeat = now

    async def _post_status(self, current: Obj | None) -> None:
        await self.fleet.kube.patch(
            NODES,
            self.name,
            {"status": self._node_status(current)},
            sub="status",
            content_type=STRATEGIC_PATCH,
        )
        self._last_report = Clock.mono()

    async def _update_status(self, now: float) -> None:
        current = self.fleet.nodes.get(self.name)
        ready = condition(current, "Ready")
        boot = (current or {}).get("status", {}).get("nodeInfo", {}).get("bootID")
        report_due = now - self._last_report >= self.fleet.clock.scaled(
            self.fleet.timings.status_report_s
        )
        if current is None:
            self._registered = False  # the Node object was deleted: register again
            return
        if report_due or ready is None or ready.get("status") != "True" or boot != self.boot_id:
            await self._post_status(current)

    async def _renew_lease(self) -> None:
        kube = self.fleet.kube
        t = self.fleet.timings
        spec = {
            "holderIdentity": self.name,
            "leaseDurationSeconds": max(1, round(self.fleet.clock.scaled(t.lease_duration_s))),
            "renewTime": now_micro(),
        }
        if self._lease is None:
            self._lease = await kube.get_or_none(LEASES, self.name, "kube-node-lease")
        if self._lease is None:
            body: Obj = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": "kube-node-lease"},
                "spec": spec,
            }
            if self.node_uid:
                body["metadata"]["ownerReferences"] = [
                    {"apiVersion": "v1", "kind": "Node", "name": self.name, "uid": self.node_uid}
                ]
            try:
                self._lease = await kube.create(LEASES, body)
            except ApiError as e:
                if e.status == 409:
                    self._lease = None
                raise
            return
        lease = dict(self._lease)
        lease["spec"] = {**lease.get("spec", {}), **spec}
        try:
            # PUT with the resourceVersion we hold, like the kubelet: optimistic concurrency.
            self._lease = await kube.replace(LEASES, lease)
        except ApiError as e:
            if e.status in (404, 409):
                self._lease = None
            raise

    # --- virt-handler --------------------------------------------------------------------------

    async def _handler_heartbeat(self) -> None:
        if self.fleet.nodes.get(self.name) is None:
            return  # not registered yet
        await self.fleet.kube.patch(
            NODES,
            self.name,
            {
                "metadata": {
                    "annotations": {HEARTBEAT_ANNOTATION: now_rfc3339()},
                    "labels": {SCHEDULABLE_LABEL: "true"},
                }
            },
        )

    # --- pods ----------------------------------------------------------------------------------

    async def _process_pods(self) -> None:
        now = Clock.mono()
        due = [k for k, at in self._pending_start.items() if at <= now]
        stopping = [
            p.key for p in self.pods.values() if p.stopping_at is not None and p.stopping_at <= now
        ]
        keys = self._dirty | set(due) | set(stopping)
        self._dirty = set()
        failed: list[ApiError] = []
        for key in keys:
            try:
                await self._sync_pod(key, now)
            except ApiError as e:
                # Retry this pod later; the others of this pass still get their turn.
                self._dirty.add(key)
                failed.append(e)
        self._resync -= keys - self._dirty
        if failed:
            raise failed[0]

    async def _sync_pod(self, key: str, now: float) -> None:
        pod = self.fleet.pods.get(key)
        local = self.pods.get(key)
        if pod is not None and pod["spec"].get("nodeName") != self.name:
            pod = None  # not ours (any more)
        uid = pod["metadata"]["uid"] if pod else None
        if not self.kubelet_running:
            # Only the kubelet starts or kills containers; virt-handler still tends its gates.
            if pod is not None and local is not None and local.uid == uid:
                await self._handler_sync(pod, local)
            return  # the kubelet resyncs everything when it starts again
        if local is not None and local.uid != uid:
            # The object vanished (or was replaced) while our container ran: kill it. Seen
            # live by a healthy kubelet, that was a force delete; found on a resync after a
            # partition or a kubelet restart, it is a stale copy being reaped.
            await self._kill(local, reaped=key in self._resync)
            local = None
        if pod is None:
            self._pending_start.pop(key, None)
            return
        if await self._kubelet_sync(key, pod, local, now):
            return  # wrote the pod: virt-handler looks again when the update comes back
        local = self.pods.get(key)
        if local is not None and self.pods.get(key) is local:
            await self._handler_sync(pod, local)

    async def _kill(self, local: LocalPod, *, reaped: bool) -> None:
        self.pods.pop(local.key, None)
        if local.domain and local.vm:
            reason = StopReason.REAPED if reaped else StopReason.FORCE_DELETED
            self.fleet.ledger.stop(
                local.vm, local.uid, reason, false_reset=not reaped and self.healthy
            )
            log.info("%s: %s of %s stopped (%s)", self.name, local.key, local.vm, reason)
        if self.fleet.storage is not None and local.volumes:
            await self.fleet.storage.detach(local.volumes, self.name, except_uid=local.uid)

    async def _kubelet_sync(self, key: str, pod: Obj, local: LocalPod | None, now: float) -> bool:
        """The kubelet's pass over one pod; True if it wrote to the API."""
        meta = pod["metadata"]
        status = pod.get("status", {})
        t = self.fleet.timings
        if meta.get("deletionTimestamp"):
            self._pending_start.pop(key, None)
            if local is not None and local.stopping_at is None:
                grace = meta.get("deletionGracePeriodSeconds")
                stop_s = self.fleet.clock.scaled(t.pod_stop_s)
                if grace is not None:
                    stop_s = min(stop_s, float(grace))
                local.stopping_at = now + stop_s
                return False
            if local is not None and local.stopping_at is not None and now < local.stopping_at:
                return False
            if local is not None:
                self.pods.pop(key, None)
                if local.domain and local.vm:
                    self.fleet.ledger.stop(local.vm, local.uid, StopReason.DELETED)
                if self.fleet.storage is not None and local.volumes:
                    await self.fleet.storage.detach(local.volumes, self.name, except_uid=local.uid)
            # Containers are gone: confirm the deletion, as the kubelet's status manager does.
            await self.fleet.kube.delete(
                PODS, meta["name"], meta["namespace"], grace_period_s=0, uid=meta["uid"]
            )
            return True
        phase = status.get("phase")
        if local is not None:
            if local.completed and phase != "Succeeded":
                await self._patch_pod_terminal(pod, "Succeeded", "Completed", 0)
                return True
            if not local.completed and not local.reported:
                await self._patch_pod_running(pod, local)
                return True
            return False
        if phase in ("Succeeded", "Failed"):
            return False
        if phase == "Running" or status.get("startTime"):
            # It ran here before this boot; its containers died with the machine.
            if pod["spec"].get("restartPolicy", "Always") == "Never":
                await self._patch_pod_terminal(pod, "Failed", "ContainerStatusUnknown", 137)
                return True
        at = self._pending_start.get(key)
        if at is None:
            self._pending_start[key] = now + self.fleet.clock.scaled(t.pod_start_s)
            return False
        if at > now:
            return False
        storage = self.fleet.storage
        if storage is not None:
            blocker = storage.blocked_by(pod, self.name)
            if blocker is not None:
                # Multi-Attach: the pod stays ContainerCreating until the volume is free.
                log.debug("%s: %s waits: %s", self.name, key, blocker)
                self._pending_start[key] = now + self.fleet.clock.scaled(t.pod_start_s)
                return False
        del self._pending_start[key]
        volumes = await storage.attach(pod, self.name) if storage is not None else []
        vm = vm_of(pod)
        local = LocalPod(key=key, uid=meta["uid"], vm=vm, volumes=volumes)
        if vm is not None and not is_migration_target(pod):
            # virt-handler starts the domain once the launcher's containers run.
            local.domain = True
            self.fleet.ledger.start(vm, self.name, local.uid, self.boot_id, StartReason.STARTED)
        self.pods[key] = local
        await self._patch_pod_running(pod, local)
        return True

    def _pod_ip(self) -> str:
        self._ip_counter += 1
        n = self._ip_counter
        return f"10.{128 + self.index // 250}.{self.index % 250}.{n % 250 + 2}"

    async def _patch_pod_running(self, pod: Obj, local: LocalPod) -> None:
        now = now_rfc3339()
        status = pod.get("status", {})
        extra = []
        if local.domain and UNPAUSED_GATE in _gates(pod):
            extra.append(_cond(UNPAUSED_GATE, True, now))
        ready = pod_ready(pod, extra, containers_ready=True)
        pod_ip = status.get("podIP") or self._pod_ip()
        containers = []
        for c in pod["spec"].get("containers", []):
            containers.append(
                {
                    "name": c["name"],
                    "ready": True,
                    "started": True,
                    "restartCount": 0,
                    "image": c.get("image", ""),
                    "imageID": c.get("image", ""),
                    "containerID": f"containerd://{secrets.token_hex(32)}",
                    "state": {"running": {"startedAt": now}},
                }
            )
        body = {
            "status": {
                "phase": "Running",
                "hostIP": self.host_ip,
                "hostIPs": [{"ip": self.host_ip}],
                "podIP": pod_ip,
                "podIPs": [{"ip": pod_ip}],
                "startTime": status.get("startTime") or now,
                "conditions": [
                    _cond("PodReadyToStartContainers", True, now),
                    _cond("Initialized", True, now),
                    _cond("ContainersReady", True, now),
                    _cond("Ready", ready, now, None if ready else "ReadinessGatesNotReady"),
                    *extra,
                ],
                "containerStatuses": containers,
            }
        }
        meta = pod["metadata"]
        await self.fleet.kube.patch(
            PODS, meta["name"], body, meta["namespace"], sub="status", content_type=STRATEGIC_PATCH
        )
        local.reported = True

    async def _patch_pod_terminal(self, pod: Obj, phase: str, reason: str, code: int) -> None:
        now = now_rfc3339()
        containers = [
            {
                "name": c["name"],
                "ready": False,
                "started": False,
                "restartCount": 0,
                "image": c.get("image", ""),
                "imageID": c.get("image", ""),
                "state": {"terminated": {"exitCode": code, "reason": reason, "finishedAt": now}},
            }
            for c in pod["spec"].get("containers", [])
        ]
        body = {
            "status": {
                "phase": phase,
                "conditions": [
                    _cond("ContainersReady", False, now, "PodCompleted"),
                    _cond("Ready", False, now, "PodCompleted"),
                ],
                "containerStatuses": containers,
            }
        }
        meta = pod["metadata"]
        await self.fleet.kube.patch(
            PODS, meta["name"], body, meta["namespace"], sub="status", content_type=STRATEGIC_PATCH
        )

    async def _handler_sync(self, pod: Obj, local: LocalPod) -> None:
        """virt-handler: the unpaused gate is True on launcher pods whose domain runs here."""
        if not local.domain or local.completed or UNPAUSED_GATE not in _gates(pod):
            return
        gate = condition(pod, UNPAUSED_GATE)
        if gate is not None and gate.get("status") == "True":
            return
        now = now_rfc3339()
        conds = [_cond(UNPAUSED_GATE, True, now)]
        if self.kubelet_running:
            # The kubelet's status manager recomputes Ready as soon as a gate changes; it knows
            # its containers run (reported) without trusting a possibly stale cached status.
            ready = pod_ready(pod, conds, containers_ready=local.reported)
            conds.append(_cond("Ready", ready, now))
        meta = pod["metadata"]
        await self.fleet.kube.patch(
            PODS,
            meta["name"],
            {"status": {"conditions": conds}},
            meta["namespace"],
            sub="status",
            content_type=STRATEGIC_PATCH,
        )

    # --- live migration (called by the migration controller) ---------------------------------

    def local_pod(self, key: str) -> LocalPod | None:
        return self.pods.get(key)


def _gates(pod: Obj) -> set[str]:
    return {g.get("conditionType") for g in pod["spec"].get("readinessGates") or ()}


@dataclass
class Fleet:
    """All simulated machines, sharing one client and the pod and node informers."""

    kube: Kube
    clock: Clock
    ledger: Ledger
    pods: Informer
    nodes: Informer
    timings: NodeTimings = field(default_factory=NodeTimings)
    capacity: NodeCapacity = field(default_factory=NodeCapacity)
    node_labels: dict[str, str] = field(default_factory=dict)
    storage: VolumeHooks | None = None
    members: dict[str, SimNode] = field(default_factory=dict)
    _tg: asyncio.TaskGroup | None = None
    _started: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.pods.add_index("node", lambda p: [n] if (n := p["spec"].get("nodeName")) else [])
        self.pods.add_handler(self._on_pod)

    def add(self, name: str) -> SimNode:
        node = SimNode(self, name, len(self.members) + 1)
        self.members[name] = node
        return node

    def __getitem__(self, name: str) -> SimNode:
        try:
            return self.members[name]
        except KeyError:
            raise KeyError(
                f"no simulated node {name!r} (have: {', '.join(self.members)})"
            ) from None

    def _on_pod(self, key: str, new: Obj | None, old: Obj | None) -> None:
        for obj in (new, old):
            if obj is None:
                continue
            node = self.members.get(obj["spec"].get("nodeName") or "")
            if node is not None and node.powered:
                node.mark(key)

    def spawn(self, coro: object, name: str) -> asyncio.Task[None]:
        if self._tg is None:
            raise RuntimeError("the fleet is not running")
        return self._tg.create_task(coro, name=name)  # type: ignore[arg-type]

    async def run(self, *, boot: bool = True) -> None:
        """Run every node's task until cancelled; nodes boot at once (no boot delay)."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            try:
                if boot:
                    for node in self.members.values():
                        node.power_on(boot_delay_s=0)
                self._started.set()
                await asyncio.Event().wait()
            finally:
                for node in self.members.values():
                    if node._task is not None:
                        node._task.cancel()
                self._tg = None

    async def wait_started(self) -> None:
        await self._started.wait()

    # --- migration handover ------------------------------------------------------------------

    def handover(self, vm: str, source: str, source_pod: str, target: str, target_pod: str) -> bool:
        """Move `vm`'s domain from its source pod to the target pod, atomically.

        Both machines must be up and reachable to each other (a partitioned or dead source
        cannot send its memory). Returns False, changing nothing, when they are not.
        """
        src, dst = self.members.get(source), self.members.get(target)
        if src is None or dst is None or not src.handler_alive or not dst.handler_alive:
            return False
        s, d = src.pods.get(source_pod), dst.pods.get(target_pod)
        if s is None or d is None or not s.domain or d.domain:
            return False
        if self.ledger.move(vm, s.uid, target, d.uid, dst.boot_id) is None:
            return False
        # The source pod is not reported Succeeded yet: the VMI must first be moved to the
        # target (complete_source), as virt-handler updates the VMI before the source exits.
        s.domain = False
        d.domain = True
        dst.mark(target_pod)
        return True

    def complete_source(self, source: str, source_pod: str) -> None:
        """The migrated-away source launcher exits: its kubelet reports the pod Succeeded."""
        src = self.members.get(source)
        local = src.pods.get(source_pod) if src else None
        if src is not None and local is not None and not local.domain:
            local.completed = True
            src.mark(source_pod)

    def vm_running_on(self, node: str, vm: str) -> str | None:
        """Key of the pod in which `vm`'s domain runs on `node`, if any."""
        member = self.members.get(node)
        if member is None:
            return None
        for local in member.pods.values():
            if local.vm == vm and local.domain:
                return local.key
        return None


__all__ = [
    "Fleet",
    "LocalPod",
    "NodeCapacity",
    "NodeTimings",
    "SimNode",
    "is_launcher",
    "is_migration_target",
    "vm_of",
]
