"""Kubernetes-side load for the benchmarks: many objects created fast, Lease renewals at the
kubelet's cadence, and a watch on what the controller writes.

Owns: `KubeClient` (one aiohttp session with the admin client certificate: the cheapest way
from Python to many requests per second, cheaper than kubernetes_asyncio's generic
`call_api`), `create_many` (bounded concurrency, 409 = already there), bare Node/Lease/Pod/VMI
bodies, `LeaseRenewer` (every Lease in `kube-node-lease` renewed every `interval_s`, spread
evenly, as kubelets do; `stop(node)` stops one node's renewals) and `PhaseWatch` (the
controller's `node-watchdog.io/state` annotation, watched: when each node entered
each phase, on this process's monotonic clock).

Must not: simulate kubelets beyond renewing Leases (chaos/sim does that, at higher cost).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from watchdog.decide.names import NODE_LEASE_NAMESPACE, read_state_annotation

log = logging.getLogger(__name__)

Obj = dict[str, Any]
LEASE_NS = NODE_LEASE_NAMESPACE


class KubeError(RuntimeError):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"{status}: {text[:300]}")
        self.status = status


class KubeClient:
    def __init__(
        self, server: str, ca_file: Path, cert: Path, key: Path, *, pool: int = 64
    ) -> None:
        ctx = ssl.create_default_context(cafile=str(ca_file))
        ctx.load_cert_chain(str(cert), str(key))
        self.server = server
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ctx, limit=pool),
            timeout=aiohttp.ClientTimeout(total=120.0),
        )
        self.requests = 0

    @classmethod
    def for_control_plane(cls, cp: Any, *, pool: int = 64) -> KubeClient:
        """Admin client of a running `chaos.sim.controlplane.ControlPlane`."""
        pki = cp.pki
        return cls(cp.server_url, cp.ca_file, pki.admin.cert, pki.admin.key, pool=pool)

    async def close(self) -> None:
        await self.session.close()

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        query: dict[str, str] | None = None,
    ) -> Obj:
        self.requests += 1
        data = None if body is None else json.dumps(body, separators=(",", ":"))
        async with self.session.request(
            method,
            self.server + path,
            data=data,
            params=query,
            headers={"Content-Type": content_type, "Accept": "application/json"},
        ) as resp:
            text = await resp.read()
            if resp.status >= 300:
                raise KubeError(resp.status, text.decode(errors="replace"))
            return json.loads(text) if text else {}

    async def create(self, path: str, body: Obj, *, exist_ok: bool = True) -> Obj | None:
        try:
            return await self.request("POST", path, body)
        except KubeError as e:
            if e.status == 409 and exist_ok:
                return None
            raise

    async def count(self, path: str, query: dict[str, str] | None = None) -> int:
        """Items in a collection (one page of 1 with the remaining count, or a full list)."""
        page = await self.request("GET", path, query={**(query or {}), "limit": "1"})
        meta = page.get("metadata") or {}
        return len(page.get("items") or ()) + int(meta.get("remainingItemCount") or 0)


async def create_many(
    client: KubeClient,
    items: Iterable[tuple[str, Obj]],
    *,
    concurrency: int = 48,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """POST every (path, body) with bounded concurrency; 409 counts as created. Returns the
    count, the seconds it took and the rate."""
    queue: asyncio.Queue[tuple[str, Obj] | None] = asyncio.Queue(maxsize=concurrency * 4)
    done = 0
    errors = 0
    t0 = time.monotonic()

    async def worker() -> None:
        nonlocal done, errors
        while (item := await queue.get()) is not None:
            path, body = item
            for attempt in range(5):
                try:
                    await client.create(path, body)
                    break
                except (KubeError, aiohttp.ClientError, TimeoutError) as e:
                    status = getattr(e, "status", 0)
                    if attempt == 4 or status not in (0, 429, 500, 503, 504):
                        raise
                    errors += 1
                    await asyncio.sleep(0.2 * 2**attempt)
            done += 1
            if progress is not None and done % 1000 == 0:
                progress(done)

    async with asyncio.TaskGroup() as tg:
        for i in range(concurrency):
            tg.create_task(worker(), name=f"create worker {i}")
        for item in items:
            await queue.put(item)
        for _ in range(concurrency):
            await queue.put(None)
    seconds = time.monotonic() - t0
    return {
        "count": done,
        "seconds": round(seconds, 2),
        "per_s": round(done / seconds, 1) if seconds else 0.0,
        "retried": errors,
    }


# --- bodies -----------------------------------------------------------------------------------


def rfc3339(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )


def micro_time(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, UTC).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ"
    )


def node_body(name: str) -> Obj:
    now = rfc3339()
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubevirt.io/schedulable": "true",
            },
        },
        "spec": {},
        # A Node may be created with its status (the kubelet does): Ready from the start.
        "status": {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "bench",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
            ],
            "capacity": {"cpu": "64", "memory": "256Gi", "pods": "250"},
            "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "250"},
        },
    }


def lease_body(node: str, duration_s: int = 40) -> Obj:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": node, "namespace": LEASE_NS},
        "spec": {
            "holderIdentity": node,
            "leaseDurationSeconds": duration_s,
            "renewTime": micro_time(),
        },
    }


def launcher_pod_body(namespace: str, vmi: str, node: str, uid_hint: int) -> Obj:
    """A virt-launcher pod as KubeVirt creates it (the fields the controller projects, plus the
    bulk a real one carries: labels, annotations, a container, volumes), bound to `node`."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"virt-launcher-{vmi}-{uid_hint:05x}",
            "namespace": namespace,
            "labels": {
                "kubevirt.io": "virt-launcher",
                "kubevirt.io/created-by": f"00000000-0000-4000-8000-{uid_hint:012x}",
                "vm.kubevirt.io/name": vmi,
                "kubevirt.io/domain": vmi,
                "harvesterhci.io/vmName": vmi,
            },
            "annotations": {
                "kubevirt.io/domain": vmi,
                "kubectl.kubernetes.io/default-container": "compute",
                "post.hook.backup.velero.io/command": '["/usr/bin/virt-freezer", "--unfreeze"]',
            },
        },
        "spec": {
            "nodeName": node,
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 30,
            "containers": [
                {
                    "name": "compute",
                    "image": "registry.suse.com/suse/sles/15.6/virt-launcher:1.5.0",
                    "command": ["/usr/bin/virt-launcher-monitor", "--qemu-timeout", "300s"],
                    "resources": {
                        "requests": {"cpu": "100m", "memory": "2Gi"},
                        "limits": {"cpu": "2", "memory": "2Gi"},
                    },
                }
            ],
            "volumes": [
                {"name": "rootdisk", "persistentVolumeClaim": {"claimName": f"{vmi}-rootdisk"}},
                {"name": "private", "emptyDir": {}},
            ],
        },
    }


def vmi_body(namespace: str, name: str, node: str) -> Obj:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"kubevirt.io/nodeName": node, "harvesterhci.io/vmName": name},
        },
        "spec": {
            "domain": {
                "cpu": {"cores": 2},
                "memory": {"guest": "2Gi"},
                "devices": {"disks": [{"name": "rootdisk", "disk": {"bus": "virtio"}}]},
            },
            "volumes": [
                {"name": "rootdisk", "persistentVolumeClaim": {"claimName": f"{name}-rootdisk"}}
            ],
        },
    }


# --- Lease renewals ---------------------------------------------------------------------------


@dataclass
class RenewStats:
    renewed: int = 0
    errors: int = 0
    late: int = 0  # renewals started more than one interval late
    latencies: list[float] = field(default_factory=list)


class LeaseRenewer:
    """Renews the Lease of every node every `interval_s` (merge patch of spec.renewTime),
    spread evenly over the interval; the kubelet's default is 10 s."""

    def __init__(
        self,
        client: KubeClient,
        nodes: Sequence[str],
        *,
        interval_s: float = 10.0,
        concurrency: int = 32,
    ) -> None:
        self.client = client
        self.nodes = list(nodes)
        self.interval_s = interval_s
        self.concurrency = concurrency
        self.stopped: set[str] = set()
        self.stats = RenewStats()
        self.last_renewed: dict[str, float] = {}

    def stop(self, node: str) -> float | None:
        """No more renewals for `node`; returns when its Lease was last renewed (monotonic)."""
        self.stopped.add(node)
        return self.last_renewed.get(node)

    async def run(self) -> None:
        queue: asyncio.Queue[str] = asyncio.Queue(maxsize=self.concurrency * 2)

        async def worker() -> None:
            while True:
                node = await queue.get()
                if node in self.stopped:
                    continue
                t = time.monotonic()
                try:
                    await self.client.request(
                        "PATCH",
                        f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NS}/leases/{node}",
                        {"spec": {"renewTime": micro_time()}},
                        content_type="application/merge-patch+json",
                    )
                    self.stats.renewed += 1
                    self.last_renewed[node] = t
                    if len(self.stats.latencies) < 200_000:
                        self.stats.latencies.append(time.monotonic() - t)
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    self.stats.errors += 1
                    log.debug("lease renewal of %s failed: %s", node, e)

        async with asyncio.TaskGroup() as tg:
            for i in range(self.concurrency):
                tg.create_task(worker(), name=f"lease renewer {i}")
            n = len(self.nodes)
            step = self.interval_s / max(1, n)
            start = time.monotonic()
            k = 0
            while True:
                due = start + k * step
                now = time.monotonic()
                if due > now:
                    await asyncio.sleep(due - now)
                elif now - due > self.interval_s:
                    self.stats.late += 1
                await queue.put(self.nodes[k % n])
                k += 1


# --- the controller's phases, watched ---------------------------------------------------------


class PhaseWatch:
    """Watches Nodes; records when each node's state annotation first showed each phase."""

    def __init__(self, client: KubeClient) -> None:
        self.client = client
        self.seen: dict[str, dict[str, float]] = {}  # node → phase → first monotonic time
        self.history: dict[str, list[tuple[str, float]]] = {}  # node → [(phase, when)]
        self.current: dict[str, str] = {}
        self.synced = asyncio.Event()

    def first(self, node: str, phase: str, after: float | None = None) -> float | None:
        """When `node` first entered `phase` (at or after `after`, if given)."""
        if after is None:
            return self.seen.get(node, {}).get(phase)
        return next((t for p, t in self.history.get(node, ()) if p == phase and t >= after), None)

    def nodes_in(self, phases: Iterable[str]) -> set[str]:
        wanted = set(phases)
        return {n for n, seen in self.seen.items() if wanted & seen.keys()}

    def _note(self, obj: Obj) -> None:
        meta = obj.get("metadata") or {}
        raw = read_state_annotation(meta.get("annotations"))
        if not raw:
            return
        try:
            phase = json.loads(raw).get("phase")
        except ValueError:
            return
        name = meta.get("name", "")
        if phase and self.current.get(name) != phase:
            now = time.monotonic()
            self.current[name] = phase
            self.seen.setdefault(name, {}).setdefault(phase, now)
            self.history.setdefault(name, []).append((phase, now))

    async def run(self) -> None:
        rv = ""
        while True:
            try:
                if not rv:
                    page = await self.client.request("GET", "/api/v1/nodes")
                    for obj in page.get("items") or ():
                        self._note(obj)
                    rv = page["metadata"]["resourceVersion"]
                    self.synced.set()
                rv = await self._watch(rv)
            except asyncio.CancelledError:
                raise
            except KubeError as e:
                if e.status == 410:
                    rv = ""
                else:
                    await asyncio.sleep(0.5)
            except (aiohttp.ClientError, TimeoutError):
                await asyncio.sleep(0.5)

    async def _watch(self, rv: str) -> str:
        query = {"watch": "true", "resourceVersion": rv, "timeoutSeconds": "60"}
        timeout = aiohttp.ClientTimeout(total=None, sock_read=90)
        async with self.client.session.get(
            self.client.server + "/api/v1/nodes", params=query, timeout=timeout
        ) as resp:
            if resp.status >= 300:
                raise KubeError(resp.status, (await resp.read()).decode(errors="replace"))
            async for line in resp.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                obj = event.get("object") or {}
                if event.get("type") == "ERROR":
                    raise KubeError(int(obj.get("code") or 500), str(obj.get("message")))
                self._note(obj)
                rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
        return rv


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout_s: float,
    what: str,
    poll_s: float = 0.2,
) -> float:
    """Seconds until `predicate` holds; TimeoutError naming `what` after `timeout_s`."""
    t0 = time.monotonic()
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f}s")
        await asyncio.sleep(poll_s)


@contextlib.asynccontextmanager
async def background(tasks: dict[str, Coroutine[Any, Any, Any]]) -> Any:
    """Run named coroutines (in a TaskGroup) for the duration of the block, then cancel them.

    A load generator that fails cancels the block and its error propagates: every number
    after it would be meaningless."""
    async with asyncio.TaskGroup() as tg:
        running = {name: tg.create_task(coro, name=name) for name, coro in tasks.items()}
        try:
            yield running
        finally:
            for task in running.values():
                task.cancel()
