"""The test cluster, assembled: a real control plane, simulated machines, KubeVirt and Harvester,
the ground-truth ledger, faults, an optional broker and real agents.

Owns: `SimConfig` (what a scenario varies: node and VM counts, runStrategies, access modes,
Harvester version, time scale, broker, agents), `SimCluster` (start in order, run the simulators
as one task group on one shared API client, wait until ready, tear everything down), and the
machine-side plumbing of each node: its links to the broker and the API server (TCP proxies a
fault can black-hole), its agent process (or, on `run_nodes`, its `node-watchdog run` process:
agent + controller replica, as the DaemonSet runs it), its boot-id file and its fence command.

Must not: decide what faults to inject or when (the chaos harness does), or compute results
(ledger.py does).

Usage::

    async with SimCluster(SimConfig(nodes=3, vms=6, time_scale=0.2)) as cluster:
        await cluster.wait_ready()
        await cluster.faults.apply("poweroff", "node-1")
        await cluster.wait_until(lambda: not cluster.ledger.lost(), 60, "VMs back")
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from chaos.sim.binaries import ControlPlaneBinaries
from chaos.sim.bmc import BmcFleet
from chaos.sim.broker import MqttBroker, make_broker
from chaos.sim.broker_identity import IdentityBroker
from chaos.sim.control import ControlServer, FenceServer, fence_command
from chaos.sim.controlplane import ControlPlane, Timings, free_port
from chaos.sim.faults import Faults
from chaos.sim.harvester import HARVESTER_MODES, Longhorn, NodeDownController, ensure_setting
from chaos.sim.informer import (
    CRDS,
    KUBEVIRTS,
    NAMESPACES,
    NODES,
    PODS,
    PVCS,
    SETTINGS,
    VMIMS,
    VMIS,
    VMS,
    VOLUME_ATTACHMENTS,
    ApiError,
    Clock,
    Informer,
    Kube,
    Obj,
    condition,
)
from chaos.sim.kubelet import Fleet, NodeCapacity, NodeTimings
from chaos.sim.kubevirt import (
    KubeVirtSim,
    KubeVirtTimings,
    MigrationLimits,
    kubevirt_cr,
    vm_manifest,
)
from chaos.sim.ledger import RESTARTING_STRATEGIES, Ledger
from chaos.sim.procs import ManagedProcess, managed
from chaos.sim.proxy import ProxyMode, TcpProxy
from chaos.sim.rbac import RbacError, ServiceIdentity, agent_pod_token, kustomization_dirs
from chaos.sim.rbac import install as install_rbac
from chaos.sim.wdt import EmulatedWatchdog
from watchdog.runtime.settings import Settings

log = logging.getLogger(__name__)
# The longest one step of SimCluster.stop may take before it is given up (and named).
STOP_STEP_S = 20.0

RUN_STRATEGIES = ("Always", "RerunOnFailure", "Manual", "Halted", "Once")
ACCESS_MODES = ("ReadWriteMany", "ReadWriteOnce")
DEFAULT_AGENT_COMMAND = ("node-watchdog", "agent")
DEFAULT_RUN_COMMAND = ("node-watchdog", "run")
WATCHDOG_NAMESPACE = "node-watchdog"  # where the controllers' leader Lease lives


@dataclass
class SimConfig:
    """Everything a scenario can vary. Durations in the timing dataclasses are unscaled."""

    nodes: int = 3
    vms: int = 6
    time_scale: float = 1.0
    harvester: str = "none"  # "none", "1.6" or "1.7"
    harvester_policy: dict[str, Any] | None = None  # vm-force-reset-policy value; None: default
    run_strategies: tuple[str, ...] = ("RerunOnFailure",)  # cycled over vm-1..M
    access_modes: tuple[str, ...] = ("ReadWriteMany",)  # cycled over vm-1..M
    vm_namespace: str = "default"
    vm_memory: str = "1Gi"
    spread_vms: bool = True
    node_capacity: NodeCapacity = field(default_factory=NodeCapacity)
    node_timings: NodeTimings = field(default_factory=NodeTimings)
    kubevirt_timings: KubeVirtTimings = field(default_factory=KubeVirtTimings)
    migration_limits: MigrationLimits = field(default_factory=MigrationLimits)
    control_plane_timings: Timings | None = None
    # kube-apiserver's watch cache: off by default so that `compact` gives watches real 410s;
    # on for scale runs (without it every watch is served by etcd: the apiserver's CPU is the
    # limit at 1,000 nodes).
    watch_cache: bool = False
    broker: str | None = None  # None, "amqtt", "mosquitto" or mqtt://host:port
    agents: bool = False
    agent_command: tuple[str, ...] | None = None  # default: node-watchdog agent
    agent_env: dict[str, str] = field(default_factory=dict)
    # Nodes whose agent process is `node-watchdog run` instead (agent + a controller replica,
    # what the DaemonSet runs), each with its own metrics port: powering such a node off kills
    # its controller replica too. `run_env` is added to their environment.
    run_nodes: tuple[str, ...] = ()
    run_command: tuple[str, ...] | None = None  # default: node-watchdog run
    run_env: dict[str, str] = field(default_factory=dict)
    node_links: bool | None = None  # per-node proxies; default: when a broker or agents run
    # Agents serve peer probes behind a third per-node link ("peer link"), each on its own free
    # loopback port, and announce that link's address; False runs them without peer probes.
    peers: bool = True
    fence_action: str = "poweroff"  # what the fence channel does: "poweroff" or "reboot"
    # A BMC per machine (chaos/sim/bmc.py: a real Redfish emulator wired to the machine's
    # power) and the inventory a controller in fence_mode=power reads (`SimCluster.bmcs`).
    bmcs: bool = False
    bmc_protocol: str = "redfish"  # or "ipmi" (IPMI 2.0 over LAN, for fence_ipmilan)
    # Each agent gets an emulated watchdog device (chaos/sim/wdt.py) at a per-node path;
    # False runs them without one (a weak fence, held by the controller unless accepted).
    watchdog_devices: bool = True
    work_dir: Path | None = None
    kubeconfig: Path | None = None  # where to write the admin kubeconfig (default: work dir)
    control_plane_bin: Path | None = None
    audit_log: bool = False
    # A deploy/ overlay ("kubevirt", "harvester", "kubevirt+delete-volume-attachments": with
    # components): its RBAC objects are applied, the agents run as its agent ServiceAccount
    # (`SimCluster.agent_identity`), nodes in role `run` as its controller ServiceAccount
    # (`SimCluster.identity`, also for controllers); None: everything runs as admin.
    rbac_overlay: str | None = None
    # The broker as deploy/ ships it (chaos/sim/broker_identity.py): TLS only, each agent by a
    # certificate of its node that it obtains from the controller through a
    # CertificateSigningRequest with a token bound to an agent pod on its node (one is created
    # per node), controllers by password on their own listener (`broker.controller_env()`).
    # Needs broker="mosquitto", an rbac_overlay, and no node in role `run` (whose one process
    # would need both listeners).
    broker_identity: bool = False
    control_channel: bool = False  # serve the `fault`/`ledger` control API (the CLI does)
    keep_work_dir: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the field and the value for anything unusable."""

        def bad(name: str, value: object, why: str) -> ValueError:
            return ValueError(f"{name}={value!r}: {why}")

        if self.nodes < 1:
            raise bad("nodes", self.nodes, "need at least one node")
        if self.vms < 0:
            raise bad("vms", self.vms, "cannot be negative")
        if not 0 < self.time_scale <= 10:
            raise bad("time_scale", self.time_scale, "must be in (0, 10]")
        if self.harvester not in HARVESTER_MODES:
            raise bad("harvester", self.harvester, f"one of {', '.join(HARVESTER_MODES)}")
        for s in self.run_strategies:
            if s not in RUN_STRATEGIES:
                raise bad("run_strategies", s, f"one of {', '.join(RUN_STRATEGIES)}")
        for m in self.access_modes:
            if m not in ACCESS_MODES:
                raise bad("access_modes", m, f"one of {', '.join(ACCESS_MODES)}")
        if not self.run_strategies or not self.access_modes:
            raise bad("run_strategies/access_modes", (), "need at least one value")
        if self.fence_action not in ("poweroff", "reboot"):
            raise bad("fence_action", self.fence_action, "poweroff or reboot")
        if self.bmc_protocol not in ("redfish", "ipmi"):
            raise bad("bmc_protocol", self.bmc_protocol, "redfish or ipmi")
        names = {f"node-{i}" for i in range(1, self.nodes + 1)}
        for n in self.run_nodes:
            if n not in names:
                raise bad("run_nodes", n, f"no such node (node-1..node-{self.nodes})")
        if self.run_nodes and not self.agents:
            raise bad("run_nodes", self.run_nodes, "needs agents=True")
        if self.control_plane_bin is not None and not Path(self.control_plane_bin).is_dir():
            raise bad("control_plane_bin", str(self.control_plane_bin), "not a directory")
        if self.rbac_overlay is not None:
            try:
                kustomization_dirs(self.rbac_overlay)
            except RbacError as e:
                raise bad("rbac_overlay", self.rbac_overlay, str(e)) from e
        if self.broker_identity:
            if self.broker != "mosquitto":
                raise bad("broker", self.broker, "broker_identity needs broker='mosquitto'")
            if self.rbac_overlay is None:
                raise bad("rbac_overlay", None, "broker_identity needs the agents' ServiceAccount")
            if self.run_nodes:
                raise bad(
                    "run_nodes",
                    self.run_nodes,
                    "broker_identity runs controllers as their own processes (role `run` "
                    "would need the agents' and the controllers' listener in one process)",
                )

    @property
    def wants_links(self) -> bool:
        return (
            self.node_links
            if self.node_links is not None
            else (self.broker is not None or self.agents)
        )


@dataclass
class NodeLinks:
    """A machine's network paths, as proxies a fault can cut (no FIN, no RST when cut).

    `peer` fronts the agent's peer-probe endpoint (listening on `peer_port`): other agents
    probe the machine through it, so a powered-off or partitioned machine's probes time out,
    while a machine whose agent alone died answers with an RST (the proxy's target refuses).
    """

    broker: TcpProxy | None = None
    api: TcpProxy | None = None
    peer: TcpProxy | None = None
    peer_port: int | None = None  # where this node's agent listens for probes
    broker_cut: bool = False  # the `broker-link-cut` fault: only the broker path is down
    peer_cut: bool = False  # the `mgmt-link-cut` fault (with broker_cut): probes of it time out
    api_cut: bool = False  # the `api-link-cut` fault: only the API path is down

    def set_mode(self, mode: ProxyMode) -> None:
        for proxy in (self.broker, self.api, self.peer):
            if proxy is not None:
                proxy.set_mode(mode)
        if self.broker_cut and self.broker is not None:
            self.broker.set_mode(ProxyMode.BLACKHOLE)
        if self.peer_cut and self.peer is not None:
            self.peer.set_mode(ProxyMode.BLACKHOLE)
        if self.api_cut and self.api is not None:
            self.api.set_mode(ProxyMode.BLACKHOLE)

    async def close(self) -> None:
        for proxy in (self.broker, self.api, self.peer):
            if proxy is not None:
                await proxy.close()


@dataclass
class AgentSlot:
    """One node's agent process and what it is started with."""

    node: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: ManagedProcess | None = None
    starts: int = 0
    metrics_port: int | None = None  # `node-watchdog run` replicas serve /metrics here
    killed_pids: set[int] = field(default_factory=set)  # stopped by a fault, not crashed

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.running


def crd_documents() -> list[Obj]:
    """The CRDs shipped in chaos/sim/crds (KubeVirt, MigrationPolicy, Harvester Setting)."""
    docs: list[Obj] = []
    for entry in sorted(
        resources.files("chaos.sim").joinpath("crds").iterdir(), key=lambda e: e.name
    ):
        if entry.name.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(entry.read_text()) if d)
    return docs


def _identity_state(identity: ServiceIdentity | None) -> dict[str, str] | None:
    if identity is None:
        return None
    return {"user": identity.username, "kubeconfig": str(identity.kubeconfig)}


class SimCluster:
    """The whole test cluster. `async with SimCluster(config) as c: await c.wait_ready()`."""

    def __init__(
        self,
        config: SimConfig | None = None,
        *,
        binaries: ControlPlaneBinaries | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config or SimConfig()
        self.config.validate()
        self.clock = Clock(self.config.time_scale)
        self.ledger = Ledger()
        self.faults = Faults(self)
        self._binaries = binaries
        self._progress = progress or (lambda line: log.info("%s", line))
        self.work_dir = Path()
        self._own_work_dir = False
        self.control_plane: ControlPlane = None  # type: ignore[assignment]
        self.kube: Kube = None  # type: ignore[assignment]
        self.fleet: Fleet = None  # type: ignore[assignment]
        self.kubevirt: KubeVirtSim = None  # type: ignore[assignment]
        self.longhorn: Longhorn = None  # type: ignore[assignment]
        self.harvester: NodeDownController = None  # type: ignore[assignment]
        self.broker: MqttBroker | None = None
        self.informers: dict[str, Informer] = {}
        self.links: dict[str, NodeLinks] = {}
        self.agents: dict[str, AgentSlot] = {}
        self.agent_note: str | None = None
        self.kubeconfig = Path()
        # With config.rbac_overlay: the controller's ServiceAccount (controllers, nodes in
        # role `run`) and the agents'.
        self.identity: ServiceIdentity | None = None
        self.agent_identity: ServiceIdentity | None = None
        self._agent_tokens: dict[str, Path] = {}  # node → its agent pod's bound token
        self._runner: asyncio.Task[None] | None = None
        self._control: ControlServer | None = None
        self._fence: FenceServer | None = None
        self.devices: dict[str, EmulatedWatchdog] = {}
        self._device_tasks: list[asyncio.Task[None]] = []
        self.fence_failing: set[str] = set()  # nodes whose fence command fails (a fault)
        self.bmcs: BmcFleet | None = None  # with config.bmcs
        self._background: set[asyncio.Task[None]] = set()
        self.started_at: float | None = None
        self.timings: dict[str, float] = {}

    # --- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> SimCluster:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        t0 = time.monotonic()
        cfg = self.config
        try:
            self._prepare_work_dir()
            binaries = self._binaries
            if binaries is None and cfg.control_plane_bin is not None:
                from chaos.sim.binaries import ensure_binaries

                binaries = await asyncio.to_thread(
                    ensure_binaries, cfg.control_plane_bin, progress=self._progress
                )
            self.control_plane = ControlPlane(
                work_dir=self.work_dir / "controlplane",
                time_scale=cfg.time_scale,
                binaries=binaries,
                audit_log=cfg.audit_log,
                timings=cfg.control_plane_timings,
                watch_cache=cfg.watch_cache,
                progress=self._progress,
            )
            await self.control_plane.start()
            self.timings["control_plane_s"] = time.monotonic() - t0
            self.kubeconfig = self._write_kubeconfig()
            self.kube = await Kube.from_kubeconfig(self.control_plane.admin_kubeconfig)
            await self._install_crds()
            self._build_simulators()
            self._runner = asyncio.create_task(self._run_all(), name="sim cluster")
            await self._wait_informers()
            await self._create_cluster_objects()
            if cfg.rbac_overlay is not None:
                self.identity, self.agent_identity = await install_rbac(
                    self.control_plane,
                    self.kube,
                    cfg.rbac_overlay,
                    self.work_dir / "service-account.kubeconfig",
                )
            await self.fleet.wait_started()
            await self._start_broker_and_links()
            if cfg.bmcs:
                await self._start_bmcs()
            await self._create_vms()
            if cfg.broker_identity and cfg.agents:
                await self._bind_agent_tokens()
            await self._start_agents()
            if cfg.control_channel:
                self._control = ControlServer(self, self.kubeconfig)
                await self._control.start(
                    {"work_dir": str(self.work_dir), "nodes": list(self.fleet.members)}
                )
            self.started_at = time.monotonic()
            self.timings["start_s"] = self.started_at - t0
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop everything this cluster started, in reverse order; idempotent.

        Each step is bounded (`STOP_STEP_S`): one that does not end is named in the log and
        left behind, and the rest, the control plane last, still stops. A teardown that hangs
        would otherwise hold the whole test run until its timeout and hide which part hung.
        """
        await self._stop_step("fault injector", self.faults.close(), suppress=True)
        if self._control is not None:
            await self._stop_step("control channel", self._control.stop())
            self._control = None
        if self._fence is not None:
            await self._stop_step("fence channel", self._fence.stop())
            self._fence = None
        for task in list(self._background):
            task.cancel()
        if self.bmcs is not None:
            await self._stop_step("BMCs", self.bmcs.stop(), suppress=True)
            self.bmcs = None
        for task in self._device_tasks:
            task.cancel()
        await self._stop_step(
            "watchdog devices", asyncio.gather(*self._device_tasks, return_exceptions=True)
        )
        self._device_tasks.clear()
        await self._stop_step(
            "agents",
            asyncio.gather(
                *(
                    slot.proc.stop(5.0)
                    for slot in self.agents.values()
                    if slot.proc is not None and slot.proc.running
                ),
                return_exceptions=True,
            ),
        )
        if self._runner is not None:
            self._runner.cancel()
            await self._stop_step("simulators", self._runner, suppress=True)
            self._runner = None
        if self.kubevirt is not None:
            self.kubevirt.close()
        for name, links in self.links.items():
            await self._stop_step(f"links of {name}", links.close(), suppress=True)
        self.links.clear()
        if self.broker is not None and self.broker.running:
            await self._stop_step("broker", self.broker.stop(), suppress=True)
        if self.kube is not None:
            await self._stop_step("API client", self.kube.close())
            self.kube = None  # type: ignore[assignment]
        if self.control_plane is not None:
            await self.control_plane.stop()
        if self._own_work_dir and not (
            self.config.keep_work_dir or os.environ.get("WATCHDOG_CHAOS_KEEP_WORK_DIR")
        ):
            shutil.rmtree(self.work_dir, ignore_errors=True)
            self._own_work_dir = False

    async def _stop_step(
        self, what: str, step: Awaitable[object], *, suppress: bool = False
    ) -> None:
        task = asyncio.ensure_future(step)
        # asyncio.wait, not wait_for: a step that ignores its cancellation must not hold us.
        done, _ = await asyncio.wait({task}, timeout=STOP_STEP_S)
        if not done:
            task.cancel()
            log.error("cluster stop: %s did not end within %.0fs; stopping the rest", what,
                      STOP_STEP_S)  # fmt: skip
            return
        if task.cancelled():
            return
        error = task.exception()
        if error is not None and not suppress:
            raise error

    def _prepare_work_dir(self) -> None:
        if self.config.work_dir is not None:
            self.work_dir = Path(self.config.work_dir)
            self.work_dir.mkdir(parents=True, exist_ok=True)
        else:
            self.work_dir = Path(tempfile.mkdtemp(prefix="watchdog-sim-"))
            self._own_work_dir = True

    def _write_kubeconfig(self) -> Path:
        target = self.config.kubeconfig
        admin = self.control_plane.admin_kubeconfig
        if target is None:
            return admin
        target = Path(target).absolute()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(admin, tmp)
        tmp.chmod(0o600)
        tmp.replace(target)
        return target

    async def _install_crds(self) -> None:
        names = []
        for doc in crd_documents():
            names.append(doc["metadata"]["name"])
            try:
                await self.kube.create(CRDS, doc)
            except ApiError as e:
                if e.status != 409:
                    raise
        pending = set(names)

        async def poll() -> None:
            for n in list(pending):
                cond = condition(await self.kube.get_or_none(CRDS, n), "Established")
                if cond and cond.get("status") == "True":
                    pending.discard(n)

        await self.wait_until(lambda: not pending, 30, "CRDs established", poll=poll)

    def _build_simulators(self) -> None:
        cfg = self.config
        kube = self.kube
        inf = self.informers
        inf["pods"] = Informer(kube, PODS)
        inf["nodes"] = Informer(kube, NODES)
        inf["pvcs"] = Informer(kube, PVCS)
        inf["vms"] = Informer(kube, VMS)
        inf["vmis"] = Informer(kube, VMIS)
        inf["vmims"] = Informer(kube, VMIMS)
        inf["kubevirts"] = Informer(kube, KUBEVIRTS, namespace="kubevirt")
        inf["settings"] = Informer(kube, SETTINGS)
        inf["volumeattachments"] = Informer(kube, VOLUME_ATTACHMENTS)
        self.fleet = Fleet(
            kube,
            self.clock,
            self.ledger,
            inf["pods"],
            inf["nodes"],
            timings=cfg.node_timings,
            capacity=cfg.node_capacity,
        )
        self.longhorn = Longhorn(
            kube,
            self.clock,
            pvcs=inf["pvcs"],
            vas=inf["volumeattachments"],
            pods=inf["pods"],
            nodes=inf["nodes"],
        )
        self.fleet.storage = self.longhorn
        self.kubevirt = KubeVirtSim(
            kube,
            self.clock,
            self.fleet,
            self.ledger,
            pods=inf["pods"],
            nodes=inf["nodes"],
            pvcs=inf["pvcs"],
            vms=inf["vms"],
            vmis=inf["vmis"],
            vmims=inf["vmims"],
            kubevirts=inf["kubevirts"],
            timings=cfg.kubevirt_timings,
        )
        self.harvester = NodeDownController(
            kube,
            self.clock,
            cfg.harvester,
            nodes=inf["nodes"],
            pods=inf["pods"],
            settings=inf["settings"],
            longhorn=self.longhorn,
            handler_stale_s=cfg.kubevirt_timings.handler_stale_s,
        )
        for i in range(1, cfg.nodes + 1):
            self.fleet.add(f"node-{i}")

    async def _run_all(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for name, informer in self.informers.items():
                tg.create_task(informer.run(), name=f"informer {name}")
            await self._wait_informers()
            tg.create_task(self.fleet.run(), name="fleet")
            tg.create_task(self.kubevirt.run(), name="kubevirt")
            tg.create_task(self.harvester.run(), name="harvester")
            tg.create_task(self.longhorn.run(), name="longhorn")

    async def _wait_informers(self) -> None:
        async with asyncio.timeout(60):
            for informer in self.informers.values():
                await self._guarded(informer.synced.wait())

    async def _guarded(self, aw: Any) -> Any:
        """Await `aw` unless the simulators' task group died first (then raise its error)."""
        runner = self._runner
        task = asyncio.ensure_future(aw)
        if runner is None:
            return await task
        done, _ = await asyncio.wait({task, runner}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        exc = runner.exception() if not runner.cancelled() else None
        raise RuntimeError(f"the simulators stopped: {exc!r}") from exc

    async def _create_cluster_objects(self) -> None:
        # The watchdog's own namespace always: a controller started by hand against this
        # cluster (`node-watchdog controller`) keeps its leader Lease there.
        namespaces = ["kubevirt", self.config.vm_namespace, WATCHDOG_NAMESPACE]
        for ns in namespaces:
            with contextlib.suppress(ApiError):
                await self.kube.create(
                    NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
                )
        try:
            await self.kube.create(KUBEVIRTS, kubevirt_cr(self.config.migration_limits))
        except ApiError as e:
            if e.status != 409:
                raise
        await self.longhorn.ensure_storage_class()
        if self.config.harvester != "none":
            await ensure_setting(self.kube, self.config.harvester, self.config.harvester_policy)

    async def _create_vms(self) -> None:
        cfg = self.config
        strategies = itertools.cycle(cfg.run_strategies)
        modes = itertools.cycle(cfg.access_modes)
        plan = [(f"vm-{i}", next(strategies), next(modes)) for i in range(1, cfg.vms + 1)]
        sem = asyncio.Semaphore(32)

        async def limited(coro: Any) -> None:
            async with sem:
                await coro

        # Volumes first, as Harvester creates them: a launcher pod's claim must name a PV.
        await asyncio.gather(
            *(
                limited(
                    self.longhorn.provision(cfg.vm_namespace, f"{name}-rootdisk", access_mode=mode)
                )
                for name, _, mode in plan
            )
        )
        # The PVs and claims exist now; their binding is already complete for the scheduler
        # (see Longhorn.provision), so VMs need not wait for the PV controller.

        async def create(name: str, strategy: str) -> None:
            body = vm_manifest(
                name,
                cfg.vm_namespace,
                run_strategy=strategy,
                memory=cfg.vm_memory,
                spread=cfg.spread_vms,
            )
            try:
                await self.kube.create(VMS, body)
            except ApiError as e:
                if e.status != 409:
                    raise

        await asyncio.gather(*(limited(create(name, strategy)) for name, strategy, _ in plan))

    # --- broker, links and agents ------------------------------------------------------------

    async def _start_broker_and_links(self) -> None:
        cfg = self.config
        self.broker = (
            IdentityBroker(self.work_dir / "mosquitto")
            if cfg.broker_identity
            else make_broker(cfg.broker, self.work_dir)
        )
        if self.broker is not None:
            await self.broker.start()
        if not cfg.wants_links:
            return
        api_port = int(self.control_plane.server_url.rsplit(":", 1)[1])
        for name in self.fleet.members:
            links = NodeLinks()
            if self.broker is not None:
                links.broker = TcpProxy(
                    self.broker.host, self.broker.port, name=f"{name} broker link"
                )
                await links.broker.start()
            links.api = TcpProxy("127.0.0.1", api_port, name=f"{name} api link")
            await links.api.start()
            if cfg.agents and cfg.peers:
                links.peer_port = free_port()
                links.peer = TcpProxy("127.0.0.1", links.peer_port, name=f"{name} peer link")
                await links.peer.start()
            self.links[name] = links

    def links_down(self, node: str) -> None:
        links = self.links.get(node)
        if links is not None:
            links.set_mode(ProxyMode.BLACKHOLE)

    def sync_links(self, node: str) -> None:
        """A machine's links carry traffic iff it is powered and its network is up."""
        links = self.links.get(node)
        if links is not None:
            links.set_mode(ProxyMode.PASS if self.fleet[node].networked else ProxyMode.BLACKHOLE)

    def cut_broker_link(self, node: str, cut: bool) -> None:
        """Only the machine's path to the broker (a firewall rule, a broken route): its API
        and peer paths follow the machine as before."""
        links = self.links.get(node)
        if links is None or links.broker is None:
            raise ValueError(f"{node} has no broker link (start the sim with a broker)")
        links.broker_cut = cut
        self.sync_links(node)

    def cut_mgmt_link(self, node: str, cut: bool) -> None:
        """The machine's paths to the broker and from its peers (a management network that the
        API does not use): its kubelet and agent still reach the API. Other agents' probes of
        it time out; its own probes of them still pass (they go through their links)."""
        links = self.links.get(node)
        if links is None or links.broker is None or links.peer is None:
            raise ValueError(f"{node} has no broker or peer link (start the sim with a broker)")
        links.broker_cut = links.peer_cut = cut
        self.sync_links(node)

    def cut_api_link(self, node: str, cut: bool) -> None:
        """Only the machine's path to the API server (a management network down, a firewall
        rule): its kubelet and virt-handler, and its agent and controller replica, lose the
        API; its broker and peer paths follow the machine as before."""
        self.fleet[node].cut_api(cut)
        links = self.links.get(node)
        if links is not None:
            links.api_cut = cut
        self.sync_links(node)

    def peer_env(self, node: str) -> dict[str, str]:
        """The agent's peer-probe settings: its endpoint behind the peer link, or none."""
        links = self.links.get(node)
        if links is None or links.peer is None or links.peer_port is None:
            return {"WATCHDOG_PEER_PORT": "0"}
        return {
            "WATCHDOG_PEER_HOST": "127.0.0.1",
            "WATCHDOG_PEER_PORT": str(links.peer_port),
            "WATCHDOG_PEER_ADVERTISE": links.peer.address,
        }

    def node_broker_url(self, node: str) -> str | None:
        links = self.links.get(node)
        if links is None or links.broker is None:
            return None
        scheme = "mqtts" if isinstance(self.broker, IdentityBroker) else "mqtt"
        return f"{scheme}://127.0.0.1:{links.broker.port}"

    def node_kubeconfig(self, node: str) -> Path:
        """A kubeconfig reaching the API server through `node`'s link: with `rbac_overlay` the
        agents' ServiceAccount's (the controller's on a node in role `run`, which runs the
        controller too), else admin's."""
        path = self.work_dir / "nodes" / node / "kubeconfig"
        links = self.links.get(node)
        source = self.control_plane.admin_kubeconfig
        identity = self.identity if node in self.config.run_nodes else self.agent_identity
        if identity is not None:
            source = self._agent_tokens.get(node, identity.kubeconfig)
        data = yaml.safe_load(source.read_text())
        if links is not None and links.api is not None:
            for cluster in data["clusters"]:
                cluster["cluster"]["server"] = f"https://127.0.0.1:{links.api.port}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        path.chmod(0o600)
        return path

    def boot_id_file(self, node: str) -> Path:
        path = self.work_dir / "nodes" / node / "boot_id"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.fleet[node].boot_id + "\n")
        return path

    def boot_state_dir(self, node: str) -> Path:
        """The node's `/run/node-watchdog`: the agent's boot record lives here (a tmpfs on a
        real host, emptied by `new_boot_state`)."""
        return self.work_dir / "nodes" / node / "run"

    def new_boot_state(self, node: str) -> None:
        """A boot empties the machine's tmpfs, and with it the agent's boot record (and its
        broker certificate, kept in its pod's memory)."""
        shutil.rmtree(self.boot_state_dir(node), ignore_errors=True)
        shutil.rmtree(self.broker_identity_dir(node), ignore_errors=True)

    def broker_identity_dir(self, node: str) -> Path:
        """The agent pod's memory volume for its broker certificate (`mqtt.enroll_file`)."""
        return self.work_dir / "nodes" / node / "identity"

    async def _bind_agent_tokens(self) -> None:
        """With broker_identity: an agent pod on each node (tolerating every taint, as the
        DaemonSet's do) and a token bound to it, which the agent uses for everything (the API
        server then names its node in each request, and the signer grants only that node)."""
        ident = self.agent_identity
        assert ident is not None
        for name in self.fleet.members:
            self._agent_tokens[name] = await agent_pod_token(
                self.control_plane,
                self.kube,
                ident,
                name,
                self.work_dir / "nodes" / name / "agent-token.kubeconfig",
            )

    async def _start_agents(self) -> None:
        cfg = self.config
        if not cfg.agents:
            return
        argv = list(cfg.agent_command or DEFAULT_AGENT_COMMAND)
        exe = shutil.which(argv[0])
        if exe is None:
            self.agent_note = (
                f"--agents: {argv[0]!r} is not installed (not on PATH): running without agents"
            )
            log.warning("%s", self.agent_note)
            return
        self._fence = FenceServer(
            self.work_dir / "fence.sock", self._on_fence, lambda node: node in self.fence_failing
        )
        await self._fence.start()
        for name in self.fleet.members:
            env = {
                **os.environ,
                **cfg.agent_env,
                "WATCHDOG_NODE_NAME": name,
                "KUBECONFIG": str(self.node_kubeconfig(name)),
                "WATCHDOG_BOOT_ID_FILE": str(self.boot_id_file(name)),
                "WATCHDOG_BOOT_STATE_DIR": str(self.boot_state_dir(name)),
                "WATCHDOG_METRICS_PORT": "0",
                "WATCHDOG_FENCE_COMMAND": fence_command(self._fence.path, name),
                **self.peer_env(name),
                **self._device_env(name, cfg.agent_env),
            }
            broker_url = self.node_broker_url(name)
            if broker_url:
                env["WATCHDOG_MQTT__URL"] = broker_url
            if isinstance(self.broker, IdentityBroker):
                env.update(self.broker.agent_env(self.broker_identity_dir(name) / "mqtt.pem"))
            node_argv = [exe, *argv[1:]]
            metrics_port = None
            if name in cfg.run_nodes:
                run_argv = list(cfg.run_command or DEFAULT_RUN_COMMAND)
                node_argv = [shutil.which(run_argv[0]) or run_argv[0], *run_argv[1:]]
                metrics_port = free_port()
                env.update(cfg.run_env)
                if self.bmcs is not None:  # a controller in fence_mode power reads it
                    env.setdefault("WATCHDOG_POWER_FENCE_INVENTORY", str(self.bmcs.inventory_path))
                env["WATCHDOG_METRICS_HOST"] = "127.0.0.1"
                env["WATCHDOG_METRICS_PORT"] = str(metrics_port)
            self.agents[name] = AgentSlot(
                name,
                node_argv,
                env,
                self.work_dir / "logs" / f"agent-{name}.log",
                metrics_port=metrics_port,
            )
        await asyncio.gather(*(self.start_agent(n) for n in self.agents))

    def background(self, step: Awaitable[None], name: str) -> None:
        """Run `step` beside the caller (e.g. telling a BMC what a fault did); cancelled at
        stop."""
        task = asyncio.ensure_future(step)
        task.set_name(name)
        self._background.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("%s failed", name, exc_info=t.exception())

        task.add_done_callback(done)

    async def _start_bmcs(self) -> None:
        pki = self.control_plane.pki
        assert pki is not None
        self.bmcs = BmcFleet(
            self.work_dir / "bmc",
            self.fleet.members,
            cert=pki.apiserver.cert,  # its SANs include 127.0.0.1
            key=pki.apiserver.key,
            ca=pki.ca.cert,
            on_power=self._on_bmc_power,
            protocol=self.config.bmc_protocol,
        )
        await self.bmcs.start()

    async def _on_bmc_power(self, node: str, state: str) -> None:
        """The BMC switched its machine: a switch-off is a fence by the BMC."""
        sim = self.fleet[node]
        if state == "Off" and sim.powered:
            await self.faults.apply("fence", node, by="bmc")
        elif state == "On" and not sim.powered:
            await self.faults.apply("poweron", node, by="bmc")

    async def _on_fence(self, node: str) -> None:
        if node in self.fleet.members:
            await self.faults.apply("fence", node, by="fence-command")
        else:
            log.warning("fence request for unknown node %r ignored", node)

    def _device_env(self, node: str, agent_env: dict[str, str]) -> dict[str, str]:
        """The node's emulated watchdog device (started here), as the agent's settings."""
        if not self.config.watchdog_devices:
            return {}
        timeout = float(
            agent_env.get(
                "WATCHDOG_WATCHDOG_TIMEOUT_S", Settings.model_fields["watchdog_timeout_s"].default
            )
        )

        async def fire(n: str) -> None:
            await self.faults.apply("fence", n, by="watchdog-device")

        device = EmulatedWatchdog(node, self.work_dir / "nodes" / node / "watchdog", timeout, fire)
        device.open()
        self.devices[node] = device
        self._device_tasks.append(asyncio.create_task(device.run(), name=f"watchdog {node}"))
        return {
            "WATCHDOG_WATCHDOG_DEVICE": str(device.path),
            "WATCHDOG_WATCHDOG_TIMEOUT_S": str(timeout),
        }

    def device_power_off(self, node: str) -> None:
        device = self.devices.get(node)
        if device is not None:
            device.power_off()

    def signal_agent(self, node: str, *, freeze: bool) -> bool:
        """SIGSTOP (freeze) or SIGCONT the agent's process group: a hung agent, not a dead one."""
        slot = self.agents.get(node)
        if slot is None or slot.proc is None or not slot.proc.running:
            return False
        if freeze:
            slot.proc.freeze()
        else:
            slot.proc.thaw()
        return True

    async def restart_agent(self, node: str) -> bool:
        """One step of a rollout: SIGTERM (a clean stop), wait for the exit, start again."""
        slot = self.agents.get(node)
        if slot is None or slot.proc is None or not slot.proc.running:
            return False
        if slot.proc.pid is not None:
            # Stopped by this fault, not on its own: the harness's crash monitor can see the
            # exit before `stop` returns (a CI run counted a rollout step as a crash).
            slot.killed_pids.add(slot.proc.pid)
        await slot.proc.stop(10.0)
        return await self.start_agent(node)

    async def start_agent(self, node: str) -> bool:
        slot = self.agents.get(node)
        if slot is None or slot.running or not self.fleet[node].powered:
            return False
        self.boot_id_file(node)
        slot.proc = managed(f"agent {node}", slot.argv, slot.log_path, slot.env)
        await slot.proc.spawn()
        slot.starts += 1
        return True

    def start_agent_after_boot(self, node: str) -> None:
        sim = self.fleet[node]
        boot_id = sim.boot_id
        self.new_boot_state(node)
        delay = self.clock.scaled(self.config.node_timings.boot_s)

        async def later() -> None:
            if sim.powered and sim.boot_id == boot_id:
                await self.start_agent(node)

        if node in self.agents:
            self.faults.schedule(delay, f"agent start {node}", later)

    async def kill_agent(self, node: str) -> bool:
        """SIGKILL the agent's process group; what its sockets do depends on its links."""
        slot = self.agents.get(node)
        if slot is None or slot.proc is None or not slot.proc.running:
            return False
        proc = slot.proc
        if proc.pid is not None:
            slot.killed_pids.add(proc.pid)
        proc.kill_now()
        if proc.process is not None:
            await proc.process.wait()
        return True

    def simulators_error(self) -> str | None:
        """Why the simulators' task group ended, if it did (None while it runs)."""
        runner = self._runner
        if runner is None or not runner.done():
            return None
        if runner.cancelled():
            return "the simulators were cancelled"
        exc = runner.exception()
        return f"the simulators stopped: {exc!r}" if exc else "the simulators stopped"

    # --- waiting and looking -------------------------------------------------------------------

    async def wait_until(
        self,
        predicate: Callable[[], bool],
        timeout_s: float,
        what: str,
        *,
        poll: Callable[[], Any] | None = None,
        interval_s: float = 0.05,
    ) -> float:
        """Poll `predicate` until true; returns the seconds it took. TimeoutError names `what`."""
        start = time.monotonic()
        deadline = start + timeout_s
        while True:
            if poll is not None:
                await poll()
            if predicate():
                return time.monotonic() - start
            if self._runner is not None and self._runner.done():
                await self._guarded(asyncio.sleep(0))
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not reached within {timeout_s:.0f}s")
            await asyncio.sleep(interval_s)

    def node(self, name: str) -> Obj | None:
        return self.informers["nodes"].get(name)

    def node_ready(self, name: str) -> str | None:
        cond = condition(self.node(name), "Ready")
        return cond.get("status") if cond else None

    def vmi(self, name: str, namespace: str | None = None) -> Obj | None:
        return self.informers["vmis"].get(f"{namespace or self.config.vm_namespace}/{name}")

    def vmi_phase(self, name: str) -> str | None:
        vmi = self.vmi(name)
        return vmi.get("status", {}).get("phase") if vmi else None

    def vmi_node(self, name: str) -> str | None:
        vmi = self.vmi(name)
        return vmi.get("status", {}).get("nodeName") if vmi else None

    def launcher_pods(self, node: str | None = None) -> list[Obj]:
        pods = self.informers["pods"]
        objs = pods.by("node", node) if node else pods.values()
        return [
            p for p in objs if p["metadata"].get("labels", {}).get("kubevirt.io") == "virt-launcher"
        ]

    def vm_names(self) -> list[str]:
        return [f"vm-{i}" for i in range(1, self.config.vms + 1)]

    def vms_on(self, node: str) -> list[str]:
        """VMs whose VMI the API places on `node` (not the ledger's truth)."""
        return sorted(
            v["metadata"]["name"]
            for v in self.informers["vmis"].by("node", node)
            if v.get("status", {}).get("phase") == "Running"
        )

    def all_running(self) -> bool:
        """Every VM that should run has a Running VMI and exactly one running copy."""
        for key, rec in self.ledger.vms.items():
            if rec.deleted or rec.run_strategy not in RESTARTING_STRATEGIES:
                continue
            _, name = key.split("/", 1)
            if len(rec.running) != 1 or self.vmi_phase(name) != "Running":
                return False
        return len(self.ledger.vms) >= self.config.vms

    async def wait_ready(self, timeout_s: float = 120.0) -> float:
        """Wait until every node is Ready and every VM runs (VMI Running, one copy)."""
        names = list(self.fleet.members)
        took = await self.wait_until(
            lambda: all(self.node_ready(n) == "True" for n in names), timeout_s, "nodes Ready"
        )
        took += await self.wait_until(
            self.all_running, max(1.0, timeout_s - took), "every VM running"
        )
        if "ready_s" not in self.timings and self.started_at is not None:
            self.timings["ready_s"] = time.monotonic() - self.started_at
        return took

    # --- control channel handler ---------------------------------------------------------------

    async def fault(
        self, action: str, node: str | None, duration_s: float | None
    ) -> dict[str, Any]:
        return await self.faults.apply(action, node, duration_s)

    def ledger_snapshot(self, history: bool = True) -> dict[str, Any]:
        return self.ledger.snapshot(history=history)

    def status(self) -> dict[str, Any]:
        return {
            "kubeconfig": str(self.kubeconfig),
            "server": self.control_plane.server_url if self.control_plane else None,
            "time_scale": self.config.time_scale,
            "harvester": self.config.harvester,
            "broker": self.broker.url if self.broker else None,
            "agents": {
                n: {"running": s.running, "starts": s.starts} for n, s in self.agents.items()
            },
            "agent_note": self.agent_note,
            "service_account": _identity_state(self.identity),
            "agent_service_account": _identity_state(self.agent_identity),
            "nodes": {
                n: {**m.state(), "ready": self.node_ready(n), "broker_url": self.node_broker_url(n)}
                for n, m in self.fleet.members.items()
            },
            "totals": self.ledger.totals(),
            "pids": {
                **(self.control_plane.pids() if self.control_plane else {}),
                **{
                    f"agent {n}": s.proc.pid
                    for n, s in self.agents.items()
                    if s.proc is not None and s.running and s.proc.pid
                },
                **({"mosquitto": pid} if (pid := getattr(self.broker, "pid", None)) else {}),
            },
            "faults": self.faults.history[-50:],
            "timings": self.timings,
        }
