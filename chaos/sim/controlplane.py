"""The test cluster's real Kubernetes control plane: etcd, kube-apiserver, kube-controller-manager
and kube-scheduler as local processes on loopback, with generated certificates.

Owns: choosing ports, generating the PKI and kubeconfigs, the flags (Kubernetes timings scaled by
one factor), starting in order and waiting for readiness, faults on the real processes, and a
teardown that leaves nothing running (see procs.py for Ctrl-C and parent crashes).

Must not: simulate anything. Nodes, KubeVirt and Harvester are API clients elsewhere in chaos/sim.

Public API (stable; kubelet.py, cluster.py and the CLI build on it)::

    cp = ControlPlane(work_dir=None, time_scale=1.0, binaries=None, audit_log=False,
                      timings=Timings(), watch_cache=False, extra_args=None,
                      startup_timeout_s=60.0, progress=None)
    async with cp:                       # or: await cp.start() ... await cp.stop()
        cp.admin_kubeconfig: Path        # client-cert kubeconfig, system:masters
        cp.server_url: str               # https://127.0.0.1:<port>
        cp.ca_file: Path
        cp.audit_log_path: Path | None   # JSON lines, level Metadata, when audit_log=True
        cp.work_dir: Path; cp.etcd_url: str; cp.pids() -> dict[str, int]
        cp.scaled: ScaledTimings         # the durations actually passed to the components
        await cp.ready(timeout_s=60)     # /readyz + controller-manager + scheduler + default SA
        await cp.kubeconfig_for_service_account(namespace, name, path) -> Path
        cp.kubeconfig_for_user(common_name, groups, path) -> Path   # e.g. system:node:node-1
        await cp.api_outage_start(mode="freeze"); await cp.api_outage_stop()
        async with cp.api_outage(mode="freeze"): ...
        await cp.controller_manager_stop(); await cp.controller_manager_start()
        await cp.scheduler_stop(); await cp.scheduler_start()
        await cp.compact() -> int        # etcd revision compacted at

API outage modes. "freeze" (default) SIGSTOPs kube-apiserver: its sockets stay open, TCP
handshakes still complete, but nothing is answered, so clients hang until their own timeouts:
what a hung apiserver or a partitioned control-plane node looks like, and the harsher case for
a watchdog. It resumes exactly where it was, so the outage lasts exactly as long as asked.
"stop" terminates kube-apiserver gracefully (SIGTERM; open watches are ended within 2 s):
clients see their connections closed, then "connection refused"; ending the outage restarts it
on the same port (about 3 s until /readyz), like an apiserver restart or upgrade.

Watch cache. kube-apiserver runs with `--watch-cache=false` by default, so watches are served
by etcd and an etcd compaction (`compact()`, or the apiserver's own periodic compaction, scaled)
gives a watch resumed from an older resourceVersion a real 410 Gone. With the watch cache on
(production's default, `watch_cache=True`), the apiserver serves recent history (at least 75 s,
not configurable) from memory regardless of etcd compaction, so `compact()` would not be seen.

Timings not scaled because Kubernetes hard-codes them: the pod GC period (20 s) and its
quarantine for orphaned pods (40 s), the watch cache's 75 s history. Scaling also stops where a
component refuses shorter values (attach-detach reconcile >= 1 s; toleration seconds are whole).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import os
import shutil
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

import aiohttp
import yaml

from chaos.sim import pki as pki_mod
from chaos.sim.binaries import ControlPlaneBinaries, ensure_binaries
from chaos.sim.ports import free_port, free_ports
from chaos.sim.procs import ManagedProcess, managed

SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
_PORT_ATTEMPTS = 3
_STOP_TIMEOUT_S = 10.0
_POLL_S = 0.1

OutageMode = Literal["freeze", "stop"]


class ControlPlaneError(RuntimeError):
    """A component failed to start or to become ready; the message carries its log's tail."""


class _PortInUse(Exception):
    pass


@dataclass(frozen=True)
class Timings:
    """Kubernetes v1.37 defaults, in real seconds, before `time_scale` is applied.

    Override a field to model a distribution with other defaults (e.g. Harvester's).
    """

    node_monitor_grace_period_s: float = 50.0  # KCM: lease age after which a node is Unknown
    node_monitor_period_s: float = 5.0  # KCM: how often node health is checked
    node_startup_grace_period_s: float = 60.0  # KCM: grace for a node that never reported
    node_eviction_rate_per_s: float = 0.1  # KCM: nodes per second whose pods may be evicted
    secondary_node_eviction_rate_per_s: float = 0.01  # KCM: the same, in an unhealthy zone
    default_toleration_s: float = 300.0  # apiserver: tolerationSeconds for not-ready/unreachable
    pvclaimbinder_sync_period_s: float = 15.0
    attach_detach_reconcile_period_s: float = 60.0
    namespace_sync_period_s: float = 300.0
    resource_quota_sync_period_s: float = 300.0
    etcd_compaction_interval_s: float = 300.0  # apiserver: its own periodic etcd compaction
    event_ttl_s: float = 3600.0
    scheduler_pod_initial_backoff_s: float = 1.0
    scheduler_pod_max_backoff_s: float = 10.0
    # Client rate limits are rates too: in compressed time a controller must get through the
    # same work in less real time (this also sets how fast the controller-manager starts: it
    # makes ~100 requests for its per-controller ServiceAccounts before the first pod can be
    # created).
    controller_manager_api_qps: float = 20.0
    controller_manager_api_burst: int = 30
    scheduler_api_qps: float = 50.0
    scheduler_api_burst: int = 100


@dataclass(frozen=True)
class ScaledTimings:
    """Timings after `time_scale`, rounded to what each flag accepts."""

    time_scale: float
    kube_apiserver: tuple[str, ...]
    kube_controller_manager: tuple[str, ...]
    scheduler_pod_initial_backoff_s: int
    scheduler_pod_max_backoff_s: int
    scheduler_api_qps: float
    scheduler_api_burst: int


def scale_timings(timings: Timings, time_scale: float) -> ScaledTimings:
    """Pure: the flags that carry `timings` compressed by `time_scale` (0.1 = ten times faster)."""
    if not 0 < time_scale <= 10:
        raise ValueError(f"time_scale must be in (0, 10], got {time_scale}")
    t = timings

    def dur(seconds: float, floor_s: float = 0.001) -> str:
        return f"{max(round(seconds * time_scale * 1000), round(floor_s * 1000))}ms"

    def whole(seconds: float) -> int:
        return max(1, round(seconds * time_scale))

    def per_second(rate: float) -> float:
        return rate / time_scale

    toleration = str(whole(t.default_toleration_s))
    apiserver = (
        f"--default-not-ready-toleration-seconds={toleration}",
        f"--default-unreachable-toleration-seconds={toleration}",
        f"--etcd-compaction-interval={dur(t.etcd_compaction_interval_s)}",
        f"--event-ttl={dur(t.event_ttl_s)}",
    )
    kcm = (
        f"--node-monitor-grace-period={dur(t.node_monitor_grace_period_s)}",
        f"--node-monitor-period={dur(t.node_monitor_period_s)}",
        f"--node-startup-grace-period={dur(t.node_startup_grace_period_s)}",
        # Rates are per second: compressing time multiplies them.
        f"--node-eviction-rate={per_second(t.node_eviction_rate_per_s):g}",
        f"--secondary-node-eviction-rate={per_second(t.secondary_node_eviction_rate_per_s):g}",
        f"--pvclaimbinder-sync-period={dur(t.pvclaimbinder_sync_period_s)}",
        # The attach-detach controller rejects periods under one second.
        f"--attach-detach-reconcile-sync-period={dur(t.attach_detach_reconcile_period_s, 1.001)}",
        f"--namespace-sync-period={dur(t.namespace_sync_period_s)}",
        f"--resource-quota-sync-period={dur(t.resource_quota_sync_period_s)}",
        f"--kube-api-qps={per_second(t.controller_manager_api_qps):g}",
        f"--kube-api-burst={math.ceil(per_second(t.controller_manager_api_burst))}",
    )
    return ScaledTimings(
        time_scale=time_scale,
        kube_apiserver=apiserver,
        kube_controller_manager=kcm,
        scheduler_pod_initial_backoff_s=whole(t.scheduler_pod_initial_backoff_s),
        scheduler_pod_max_backoff_s=whole(t.scheduler_pod_max_backoff_s),
        scheduler_api_qps=per_second(t.scheduler_api_qps),
        scheduler_api_burst=math.ceil(per_second(t.scheduler_api_burst)),
    )


def write_kubeconfig(
    path: Path,
    *,
    server: str,
    ca_file: Path,
    user: str,
    cert: pki_mod.CertPair | None = None,
    token: str | None = None,
) -> Path:
    """A self-contained kubeconfig (data embedded), written 0600."""
    creds: dict[str, str] = {}
    if cert is not None:
        creds["client-certificate-data"] = _b64(cert.cert.read_bytes())
        creds["client-key-data"] = _b64(cert.key.read_bytes())
    if token is not None:
        creds["token"] = token
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "test-cluster",
                "cluster": {
                    "server": server,
                    "certificate-authority-data": _b64(ca_file.read_bytes()),
                },
            }
        ],
        "users": [{"name": user, "user": creds}],
        "contexts": [{"name": user, "context": {"cluster": "test-cluster", "user": user}}],
        "current-context": user,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    tmp.chmod(0o600)
    tmp.replace(path)
    return path


class ControlPlane:
    """The control plane's processes and the faults on them. See the module doc for the API."""

    def __init__(
        self,
        *,
        work_dir: Path | None = None,
        time_scale: float = 1.0,
        binaries: ControlPlaneBinaries | None = None,
        audit_log: bool = False,
        timings: Timings | None = None,
        watch_cache: bool = False,
        extra_args: Mapping[str, Sequence[str]] | None = None,
        startup_timeout_s: float = 60.0,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.scaled = scale_timings(timings or Timings(), time_scale)
        self.time_scale = time_scale
        self._requested_work_dir = work_dir
        self._binaries = binaries
        self._audit = audit_log
        self._watch_cache = watch_cache
        self._extra = {k: list(v) for k, v in (extra_args or {}).items()}
        self._startup_timeout_s = startup_timeout_s
        self._progress = progress or (lambda _line: None)
        self._procs: dict[str, ManagedProcess] = {}
        self._ports: dict[str, int] = {}
        self._admin: aiohttp.ClientSession | None = None
        self._plain: aiohttp.ClientSession | None = None
        self._outage: OutageMode | None = None
        self._own_work_dir = False
        self._keep_work_dir = bool(os.environ.get("WATCHDOG_CHAOS_KEEP_WORK_DIR"))
        self.work_dir = Path()
        self.pki: pki_mod.ClusterPKI | None = None

    # -- public attributes -------------------------------------------------------------------

    @property
    def server_url(self) -> str:
        return f"https://127.0.0.1:{self._ports['apiserver']}"

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self._ports['etcd']}"

    @property
    def ca_file(self) -> Path:
        return self._pki.ca.cert

    @property
    def admin_kubeconfig(self) -> Path:
        return self.work_dir / "admin.kubeconfig"

    @property
    def audit_log_path(self) -> Path | None:
        return self.work_dir / "audit.log" if self._audit else None

    @property
    def binaries(self) -> ControlPlaneBinaries:
        if self._binaries is None:
            raise RuntimeError("binaries are resolved by start()")
        return self._binaries

    def pids(self) -> dict[str, int]:
        """pid of every component process currently running (frozen ones included)."""
        return {n: p.pid for n, p in self._procs.items() if p.running and p.pid is not None}

    def log_path(self, component: str) -> Path:
        return self.work_dir / "logs" / f"{component}.log"

    @property
    def _pki(self) -> pki_mod.ClusterPKI:
        if self.pki is None:
            raise RuntimeError("the control plane is not started")
        return self.pki

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> ControlPlane:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start every component in order and return once the cluster is ready."""
        started = time.monotonic()
        if self._binaries is None:
            self._binaries = await asyncio.to_thread(ensure_binaries, progress=self._progress)
        self._prepare_work_dir()
        try:
            await self._start_etcd()
            await self._start_apiserver()
            await self._start_controllers()
            await self.ready(self._startup_timeout_s)
        except BaseException:
            self._keep_work_dir = True  # the error names log files in it
            await self.stop()
            raise
        self._progress(
            f"control plane ready at {self.server_url} in "
            f"{time.monotonic() - started:.1f}s (work dir {self.work_dir})"
        )

    async def _start_controllers(self) -> None:
        """The controller-manager and the scheduler, concurrently: neither needs the other."""
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.controller_manager_start(), name="start controller-manager")
                tg.create_task(self.scheduler_start(), name="start scheduler")
        except BaseExceptionGroup as group:
            # Callers expect ControlPlaneError (with the log tail), not a group of one.
            raise group.exceptions[0] from None

    async def stop(self) -> None:
        """Stop every component (dependents first); idempotent. Removes a temp work dir."""
        for name in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            proc = self._procs.get(name)
            if proc is not None:
                await proc.stop(_STOP_TIMEOUT_S)
        for session in (self._admin, self._plain):
            if session is not None:
                await session.close()
        self._admin = self._plain = None
        self._outage = None
        if self._own_work_dir and not self._keep_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            self._own_work_dir = False

    async def ready(self, timeout_s: float = 60.0) -> None:
        """Wait until the apiserver is ready, the controller-manager and scheduler are healthy
        and the `default` ServiceAccount exists (pods cannot be created before it does)."""
        deadline = time.monotonic() + timeout_s
        await self._wait_ready("kube-apiserver", self._apiserver_ready, deadline)
        for name in ("kube-controller-manager", "kube-scheduler"):
            if self._procs.get(name) is not None and self._procs[name].running:
                await self._wait_ready(name, self._health_check(name), deadline)
        # Created by the controller-manager's serviceaccount controller.
        await self._wait_ready(
            "default ServiceAccount",
            self._default_service_account_exists,
            deadline,
        )

    # -- identities --------------------------------------------------------------------------

    async def kubeconfig_for_service_account(
        self,
        namespace: str,
        name: str,
        path: Path,
        *,
        expiration_s: int = 24 * 3600,
        bound_pod: tuple[str, str] | None = None,
    ) -> Path:
        """A kubeconfig with a bound token for ServiceAccount `namespace/name` (TokenRequest).

        The namespace and ServiceAccount are created if missing; nothing else is granted, so
        RBAC decides what the token may do, as in a real cluster. With `bound_pod` (name, uid
        of a pod in `namespace` that runs as that ServiceAccount) the token is bound to that
        pod, as the kubelet's projected tokens are: the API server then names the pod and its
        node in the requests' user info (`authentication.kubernetes.io/node-name`).
        """
        await self._ensure(
            f"/api/v1/namespaces/{namespace}",
            "/api/v1/namespaces",
            {"metadata": {"name": namespace}},
        )
        sa_path = f"/api/v1/namespaces/{namespace}/serviceaccounts"
        await self._ensure(f"{sa_path}/{name}", sa_path, {"metadata": {"name": name}})
        spec: dict[str, object] = {"expirationSeconds": expiration_s}
        if bound_pod is not None:
            pod, uid = bound_pod
            spec["boundObjectRef"] = {"kind": "Pod", "apiVersion": "v1", "name": pod, "uid": uid}
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        async with self._admin_session().post(
            f"{self.server_url}{sa_path}/{name}/token", json=body
        ) as resp:
            if resp.status != 201:
                raise ControlPlaneError(
                    f"TokenRequest for {namespace}/{name}: {resp.status} {await resp.text()}"
                )
            token = (await resp.json())["status"]["token"]
        return write_kubeconfig(
            path,
            server=self.server_url,
            ca_file=self.ca_file,
            user=f"system:serviceaccount:{namespace}:{name}",
            token=token,
        )

    def kubeconfig_for_user(self, common_name: str, groups: Sequence[str], path: Path) -> Path:
        """A client-certificate kubeconfig for any identity, e.g. a node's
        (`system:node:node-1`, groups `["system:nodes"]`, seen by the Node authorizer)."""
        safe = common_name.replace(":", "_").replace("/", "_")
        cert = self._pki.issue_client(f"user-{safe}", common_name, groups)
        return write_kubeconfig(
            path, server=self.server_url, ca_file=self.ca_file, user=common_name, cert=cert
        )

    # -- faults ------------------------------------------------------------------------------

    async def api_outage_start(self, mode: OutageMode = "freeze") -> None:
        """Make kube-apiserver unreachable (see the module doc for the two modes)."""
        if self._outage is not None:
            raise RuntimeError(f"an API outage ({self._outage}) is already in progress")
        proc = self._procs["kube-apiserver"]
        if mode == "freeze":
            proc.freeze()
        else:
            await proc.stop(_STOP_TIMEOUT_S)
        self._outage = mode

    async def api_outage_stop(self, timeout_s: float = 60.0) -> None:
        """End the outage and wait until the apiserver is ready again."""
        if self._outage is None:
            return
        proc = self._procs["kube-apiserver"]
        if self._outage == "freeze":
            proc.thaw()
        else:
            # Clients hold kubeconfigs with this port: it must come back on the same one.
            await proc.spawn()
        self._outage = None
        await self._wait_ready(
            "kube-apiserver", self._apiserver_ready, time.monotonic() + timeout_s
        )

    @contextlib.asynccontextmanager
    async def api_outage(self, mode: OutageMode = "freeze") -> AsyncIterator[None]:
        await self.api_outage_start(mode)
        try:
            yield
        finally:
            await self.api_outage_stop()

    async def controller_manager_stop(self) -> None:
        """Stop kube-controller-manager: node lifecycle, pod GC, taint eviction all pause."""
        await self._stop_component("kube-controller-manager")

    async def controller_manager_start(self) -> None:
        await self._start_with_port("kube-controller-manager", self._kcm_argv)

    async def scheduler_stop(self) -> None:
        await self._stop_component("kube-scheduler")

    async def scheduler_start(self) -> None:
        await self._start_with_port("kube-scheduler", self._scheduler_argv)

    async def compact(self) -> int:
        """Compact etcd at its current revision; returns that revision. With the default
        `watch_cache=False`, a watch from any older resourceVersion now gets 410 Gone.

        A marker key outside the apiserver's `/registry` prefix is written first, and the
        compaction is at the marker's revision: the last change any client can have seen is
        then strictly older, so a watch resumed from it gets a clean 410 instead of racing the
        compaction (a watch starting exactly at the compacted revision would otherwise get its
        first event without the previous value, which the apiserver reports as a 500).
        """
        session = self._plain_session()
        marker = {"key": _b64(b"/chaos-sim/compaction"), "value": _b64(str(time.time()).encode())}
        async with session.post(f"{self.etcd_url}/v3/kv/put", json=marker) as resp:
            resp.raise_for_status()
            revision = int((await resp.json())["header"]["revision"])
        body = {"revision": str(revision), "physical": True}
        async with session.post(f"{self.etcd_url}/v3/kv/compaction", json=body) as resp:
            resp.raise_for_status()
        return revision

    # -- starting components -----------------------------------------------------------------

    def _prepare_work_dir(self) -> None:
        if self._requested_work_dir is None:
            self.work_dir = Path(tempfile.mkdtemp(prefix="watchdog-controlplane-"))
            self._own_work_dir = True
        else:
            self.work_dir = Path(self._requested_work_dir)
            self.work_dir.mkdir(parents=True, exist_ok=True)
        self.pki = pki_mod.generate(self.work_dir / "pki", service_ip=_first_service_ip())
        if self._audit:
            (self.work_dir / "audit-policy.yaml").write_text(
                yaml.safe_dump(
                    {
                        "apiVersion": "audit.k8s.io/v1",
                        "kind": "Policy",
                        "omitStages": ["RequestReceived"],
                        "rules": [{"level": "Metadata"}],
                    }
                )
            )

    async def _start_etcd(self) -> None:
        async def attempt() -> None:
            self._ports["etcd"], self._ports["etcd-peer"] = free_ports(2)
            await self._launch("etcd", self._etcd_argv(), self._etcd_healthy)

        await _retry_on_port_collision("etcd", attempt)

    async def _start_apiserver(self) -> None:
        async def attempt() -> None:
            self._ports["apiserver"] = free_port()
            self._write_component_kubeconfigs()
            await self._launch("kube-apiserver", self._apiserver_argv(), self._apiserver_ready)

        await _retry_on_port_collision("kube-apiserver", attempt)

    async def _start_with_port(self, name: str, argv: Callable[[], list[str]]) -> None:
        if self._procs.get(name) is not None and self._procs[name].running:
            return

        async def attempt() -> None:
            if name not in self._ports:
                self._ports[name] = free_port()
            try:
                await self._launch(name, argv(), self._health_check(name))
            except _PortInUse:
                del self._ports[name]  # nobody depends on this port: take another one
                raise

        await _retry_on_port_collision(name, attempt)

    async def _stop_component(self, name: str) -> None:
        proc = self._procs.get(name)
        if proc is not None:
            await proc.stop(_STOP_TIMEOUT_S)

    async def _launch(
        self,
        name: str,
        argv: list[str],
        is_ready: Callable[[], Awaitable[bool]],
    ) -> None:
        proc = managed(name, [*argv, *self._extra.get(name, ())], self.log_path(name))
        self._procs[name] = proc
        started = time.monotonic()
        await proc.spawn()
        await self._wait_ready(name, is_ready, started + self._startup_timeout_s)
        self._progress(f"{name} ready in {time.monotonic() - started:.1f}s (pid {proc.pid})")

    async def _wait_ready(
        self,
        name: str,
        is_ready: Callable[[], Awaitable[bool]],
        deadline: float,
    ) -> None:
        """Poll `is_ready` until it holds; fail fast if process `name` died, with its log."""
        proc = self._procs.get(name)
        while True:
            if proc is not None and not proc.running:
                tail = proc.log_tail()
                await proc.stop()
                if "address already in use" in tail:
                    raise _PortInUse(name)
                raise ControlPlaneError(
                    f"{name} exited (code {proc.process.returncode if proc.process else '?'}) "
                    f"before it was ready; last lines of {proc.log_path}:\n{tail}"
                )
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                if await is_ready():
                    return
            if time.monotonic() > deadline:
                tail = proc.log_tail() if proc else ""
                raise ControlPlaneError(
                    f"{name} not ready before the deadline; last lines of "
                    f"{self.log_path(name)}:\n{tail}"
                )
            await asyncio.sleep(_POLL_S)

    # -- readiness probes --------------------------------------------------------------------

    async def _etcd_healthy(self) -> bool:
        async with self._plain_session().get(
            f"{self.etcd_url}/health", timeout=_probe_timeout()
        ) as r:
            return r.status == 200 and (await r.json(content_type=None)).get("health") == "true"

    async def _apiserver_ready(self) -> bool:
        async with self._admin_session().get(
            f"{self.server_url}/readyz", timeout=_probe_timeout()
        ) as r:
            return r.status == 200

    def _health_check(self, name: str) -> Callable[[], Awaitable[bool]]:
        async def healthy() -> bool:
            # Their serving certificates are self-signed at startup: nothing to verify against.
            url = f"https://127.0.0.1:{self._ports[name]}/healthz"
            async with self._plain_session().get(url, ssl=False, timeout=_probe_timeout()) as r:
                return r.status == 200

        return healthy

    async def _default_service_account_exists(self) -> bool:
        url = f"{self.server_url}/api/v1/namespaces/default/serviceaccounts/default"
        async with self._admin_session().get(url, timeout=_probe_timeout()) as r:
            return r.status == 200

    async def _ensure(self, item_path: str, collection_path: str, body: dict[str, object]) -> None:
        session = self._admin_session()
        async with session.get(f"{self.server_url}{item_path}") as resp:
            if resp.status == 200:
                return
        async with session.post(f"{self.server_url}{collection_path}", json=body) as resp:
            if resp.status not in (201, 409):  # 409: created concurrently, as good
                raise ControlPlaneError(f"creating {item_path}: {resp.status} {await resp.text()}")

    def _admin_session(self) -> aiohttp.ClientSession:
        if self._admin is None:
            ctx = ssl.create_default_context(cafile=str(self.ca_file))
            ctx.load_cert_chain(self._pki.admin.cert, self._pki.admin.key)
            self._admin = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ctx),
                timeout=aiohttp.ClientTimeout(total=30.0),
            )
        return self._admin

    def _plain_session(self) -> aiohttp.ClientSession:
        if self._plain is None:
            self._plain = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30.0))
        return self._plain

    # -- command lines -----------------------------------------------------------------------

    def _write_component_kubeconfigs(self) -> None:
        p = self._pki
        write_kubeconfig(
            self.admin_kubeconfig,
            server=self.server_url,
            ca_file=p.ca.cert,
            user="kubernetes-admin",
            cert=p.admin,
        )
        write_kubeconfig(
            self.work_dir / "controller-manager.kubeconfig",
            server=self.server_url,
            ca_file=p.ca.cert,
            user="system:kube-controller-manager",
            cert=p.controller_manager,
        )
        write_kubeconfig(
            self.work_dir / "scheduler.kubeconfig",
            server=self.server_url,
            ca_file=p.ca.cert,
            user="system:kube-scheduler",
            cert=p.scheduler,
        )

    def _etcd_argv(self) -> list[str]:
        client = f"http://127.0.0.1:{self._ports['etcd']}"
        peer = f"http://127.0.0.1:{self._ports['etcd-peer']}"
        return [
            str(self.binaries.etcd),
            "--name=default",
            f"--data-dir={self.work_dir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
            "--initial-cluster-state=new",
            # A throw-away test store: durability buys nothing, fsync costs seconds at scale.
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ]

    def _apiserver_argv(self) -> list[str]:
        p = self._pki
        argv = [
            str(self.binaries.kube_apiserver),
            "--advertise-address=127.0.0.1",
            # A loopback address may not back the `kubernetes` Service's endpoints; nothing here
            # runs in-cluster, so skip that reconciler rather than invent a routable address.
            "--endpoint-reconciler-type=none",
            "--bind-address=127.0.0.1",
            f"--secure-port={self._ports['apiserver']}",
            f"--etcd-servers={self.etcd_url}",
            f"--cert-dir={self.work_dir / 'apiserver-certs'}",
            f"--tls-cert-file={p.apiserver.cert}",
            f"--tls-private-key-file={p.apiserver.key}",
            f"--client-ca-file={p.ca.cert}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={p.service_account_pub}",
            f"--service-account-signing-key-file={p.service_account_key}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            "--allow-privileged=true",
            f"--watch-cache={'true' if self._watch_cache else 'false'}",
            "--profiling=false",
            # Otherwise open watches (every simulated kubelet holds some) keep a graceful stop
            # waiting for the whole 60 s request timeout, and teardown would end in SIGKILL.
            "--shutdown-watch-termination-grace-period=2s",
            *self.scaled.kube_apiserver,
        ]
        if self._audit:
            argv += [
                f"--audit-policy-file={self.work_dir / 'audit-policy.yaml'}",
                f"--audit-log-path={self.audit_log_path}",
                "--audit-log-format=json",
            ]
        return argv

    def _kcm_argv(self) -> list[str]:
        p = self._pki
        kubeconfig = self.work_dir / "controller-manager.kubeconfig"
        return [
            str(self.binaries.kube_controller_manager),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={self._ports['kube-controller-manager']}",
            f"--cert-dir={self.work_dir / 'controller-manager-certs'}",
            # One instance: leader election would only delay a restart by the lease duration.
            "--leader-elect=false",
            "--controllers=*",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={p.service_account_key}",
            f"--root-ca-file={p.ca.cert}",
            f"--cluster-signing-cert-file={p.ca.cert}",
            f"--cluster-signing-key-file={p.ca.key}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            *self.scaled.kube_controller_manager,
        ]

    def _scheduler_argv(self) -> list[str]:
        kubeconfig = self.work_dir / "scheduler.kubeconfig"
        config = self.work_dir / "scheduler-config.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kubescheduler.config.k8s.io/v1",
                    "kind": "KubeSchedulerConfiguration",
                    "clientConnection": {
                        "kubeconfig": str(kubeconfig),
                        "qps": self.scaled.scheduler_api_qps,
                        "burst": self.scaled.scheduler_api_burst,
                    },
                    "leaderElection": {"leaderElect": False},
                    "podInitialBackoffSeconds": self.scaled.scheduler_pod_initial_backoff_s,
                    "podMaxBackoffSeconds": self.scaled.scheduler_pod_max_backoff_s,
                }
            )
        )
        return [
            str(self.binaries.kube_scheduler),
            f"--config={config}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={self._ports['kube-scheduler']}",
            f"--cert-dir={self.work_dir / 'scheduler-certs'}",
        ]


async def _retry_on_port_collision(name: str, attempt: Callable[[], Awaitable[None]]) -> None:
    # free_port() closes its socket before the component binds: another process on the machine
    # that binds explicit ports may win the race (outgoing connections cannot: see ports.py).
    # Rare, so a few fresh attempts are enough.
    for _ in range(_PORT_ATTEMPTS - 1):
        try:
            await attempt()
            return
        except _PortInUse:
            continue
    try:
        await attempt()
    except _PortInUse as e:
        raise ControlPlaneError(f"{name}: port in use on {_PORT_ATTEMPTS} attempts") from e


def _probe_timeout() -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=2.0)


def _first_service_ip() -> str:
    base, _ = SERVICE_CLUSTER_IP_RANGE.split("/")
    a, b, c, d = (int(x) for x in base.split("."))
    return f"{a}.{b}.{c}.{d + 1}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


__all__ = [
    "ControlPlane",
    "ControlPlaneError",
    "OutageMode",
    "ScaledTimings",
    "Timings",
    "free_port",
    "free_ports",
    "scale_timings",
    "write_kubeconfig",
]
