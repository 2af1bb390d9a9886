"""The whole service under test: a test cluster with real agents, and real controller processes.

Owns what the service-level integration tests share (tests/integration/test_service_*.py,
test_evacuation.py):

- `WatchdogEnv`: a `SimCluster` (real control plane, real Mosquitto, one real `node-watchdog
  agent` per node behind its node's links) plus N real `node-watchdog controller` processes,
  each in its own process group with its log in a file, started with the same compressed timings
  as the agents (`TIMINGS`), killed at teardown. Creates the `node-watchdog` namespace. With
  `SimConfig.rbac_overlay` the controllers, like the agents, run as that overlay's ServiceAccount
  (its token, its RBAC, its namespace for the leader Lease); admin otherwise.
- `Scrape`: one parsed `/metrics` answer (prometheus_client's own parser), queried by sample
  name and a subset of labels.
- `Timeline`: what the API said, as it said it, recorded from the simulator's informers on our
  monotonic clock (node phases and taints, launcher pods turning NotReady or vanishing,
  migrations), so a test can ask "when" after the fact instead of sampling and hoping.
- Waiting: `wait_for(predicate, timeout_s, what)` with sync or async predicates; a timeout names
  what was awaited and shows the controllers' log tails.
- `restore()`: every fault undone and the cluster back to its baseline (every node Healthy,
  untainted, every VM running once, a leader), so scenarios sharing one cluster stay independent.

Must not: reach into the controller's process (we only read its metrics, logs, Events and the
objects it writes), or fake any part of the cluster.
"""

from __future__ import annotations

import calendar
import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from chaos.sim.binaries import ControlPlaneBinaries
from chaos.sim.broker_identity import IdentityBroker
from chaos.sim.cluster import SimCluster, SimConfig
from chaos.sim.informer import EVENTS, LEASES, NAMESPACES, NODES, ApiError, Obj, condition
from chaos.sim.ledger import StartReason
from chaos.sim.ports import free_port
from chaos.sim.procs import ManagedProcess, managed
from tests.eventually import eventually

NAMESPACE = "node-watchdog"
LEADER_LEASE = "node-watchdog-leader"
STATE_ANNOTATION = "node-watchdog.io/state"
OUT_OF_SERVICE = "node.kubernetes.io/out-of-service"
COMPONENT = "node-watchdog"

# Compressed timings, the same for agents and controllers (the agent declares its fence from
# them; the controller's heartbeat thresholds must match the agents' cadence).
HEARTBEAT_INTERVAL_S = 0.5
UNREACHABLE_AFTER_S = 2.5
SELF_FENCE_AFTER_S = 3.0
# The test cluster's fence command (`python -m chaos.sim.control fence ...`) needs 0.6-2 s to
# start on a loaded 2-core machine (it imports aiohttp); the agent kills a fence command that
# overruns its declared bound, which leaves the node running its VMs: the bound must cover it.
FENCE_ACTION_BOUND_S = 3.0
FENCE_MARGIN_S = 0.5
WATCHDOG_TIMEOUT_S = 3.0
POLICY_PERIOD_S = 4.0
LEASE_STALE_AFTER_S = 4.0
# decide/safety.py: declared after + declared bound + one heartbeat interval + margin.
SAFE_DELAY_S = (
    SELF_FENCE_AFTER_S
    + max(FENCE_ACTION_BOUND_S, WATCHDOG_TIMEOUT_S)
    + HEARTBEAT_INTERVAL_S
    + FENCE_MARGIN_S
)
RESET_WAIT_S = max(POLICY_PERIOD_S, SAFE_DELAY_S)

TIMINGS = {
    "WATCHDOG_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_INTERVAL_S),
    "WATCHDOG_SUSPECT_AFTER_S": "1.5",
    "WATCHDOG_UNREACHABLE_AFTER_S": str(UNREACHABLE_AFTER_S),
    "WATCHDOG_LEASE_STALE_AFTER_S": str(LEASE_STALE_AFTER_S),
    "WATCHDOG_SELF_FENCE_AFTER_S": str(SELF_FENCE_AFTER_S),
    "WATCHDOG_FENCE_ACTION_BOUND_S": str(FENCE_ACTION_BOUND_S),
    # Each agent's emulated watchdog device (chaos/sim/wdt.py): no longer than the bound, so
    # the safe delay is the same as without one.
    "WATCHDOG_WATCHDOG_TIMEOUT_S": str(WATCHDOG_TIMEOUT_S),
    "WATCHDOG_FENCE_MARGIN_S": str(FENCE_MARGIN_S),
    "WATCHDOG_POLICY__PERIOD_S": str(POLICY_PERIOD_S),
    "WATCHDOG_MQTT__KEEPALIVE_S": "2",
    "WATCHDOG_API_CHECK_INTERVAL_S": "1",
    # Peer probes at the heartbeat's pace: two timeouts in a row (~1 s) make a target
    # unreachable, well within UNREACHABLE_AFTER_S.
    "WATCHDOG_PEER_INTERVAL_S": "0.25",
    "WATCHDOG_PEER_PROBE_TIMEOUT_S": "0.5",
}
# Leader election, compressed too: a SIGKILLed leader is replaced after ~lease_duration.
LEADER_TIMINGS = {
    "WATCHDOG_LEADER__LEASE_DURATION_S": "6",
    "WATCHDOG_LEADER__RENEW_DEADLINE_S": "4",
    "WATCHDOG_LEADER__RETRY_PERIOD_S": "0.5",
}


# --- waiting ----------------------------------------------------------------------------------

Predicate = Callable[[], bool | Awaitable[bool]]


async def wait_for(
    predicate: Predicate,
    timeout_s: float,
    what: str,
    *,
    interval_s: float = 0.1,
    diagnose: Callable[[], str] | None = None,
) -> float:
    """Poll `predicate` (sync or async) until true; returns the seconds it took.

    TimeoutError names `what` (and appends `diagnose()` when given); an exception raised by the
    predicate propagates (a broken check is not a condition that is not met yet)."""
    return await eventually(
        predicate, timeout_s=timeout_s, what=what, every_s=interval_s, diagnose=diagnose
    )


# --- metrics ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scrape:
    """One /metrics answer: samples by name, each with its labels."""

    samples: dict[str, list[tuple[dict[str, str], float]]]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
        return cls(samples)

    def get(self, name: str, labels: dict[str, str] | None = None, **kw: str) -> float:
        """Sum of the samples named `name` whose labels include `labels` and `kw`."""
        want = {**(labels or {}), **kw}
        return sum(
            value
            for have, value in self.samples.get(name, ())
            if all(have.get(k) == v for k, v in want.items())
        )

    def labelled(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for have, value in self.samples.get(name, ()):
            key = have.get(label, "")
            out[key] = out.get(key, 0.0) + value
        return out

    def histogram(self, name: str) -> tuple[float, float]:
        """(count, sum) of histogram `name`."""
        return self.get(f"{name}_count"), self.get(f"{name}_sum")

    def bucket(self, name: str, le: str) -> float:
        return self.get(f"{name}_bucket", le=le)


# --- controller processes ---------------------------------------------------------------------


@dataclass
class Controller:
    """One `node-watchdog controller` process."""

    name: str
    port: int
    proc: ManagedProcess

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.running

    @property
    def returncode(self) -> int | None:
        p = self.proc.process
        return None if p is None else p.returncode

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def get(self, path: str, timeout_s: float = 2.0) -> tuple[int, str]:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(self.url + path) as resp,
        ):
            return resp.status, await resp.text()

    async def scrape(self) -> Scrape:
        status, text = await self.get("/metrics")
        assert status == 200, f"{self.name} /metrics: {status}"
        return Scrape.parse(text)

    async def try_scrape(self) -> Scrape | None:
        if not self.running:
            return None
        try:
            return await self.scrape()
        except (aiohttp.ClientError, TimeoutError, OSError, AssertionError):
            return None

    async def ready(self) -> bool:
        try:
            status, _ = await self.get("/readyz")
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False
        return status == 200

    async def is_leader(self) -> bool:
        m = await self.try_scrape()
        return m is not None and m.get("watchdog_leader") == 1

    def log_tail(self, lines: int = 30) -> str:
        return self.proc.log_tail(lines)

    def log_text(self) -> str:
        try:
            return self.proc.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


# --- what the API said, when ------------------------------------------------------------------


def node_phase(node: Obj | None) -> str:
    """The phase persisted in the watchdog's annotation ("Healthy" when there is none)."""
    if node is None:
        return "Healthy"
    raw = (node["metadata"].get("annotations") or {}).get(STATE_ANNOTATION)
    if not raw:
        return "Healthy"
    try:
        return str(json.loads(raw).get("phase", "Healthy"))
    except ValueError:
        return "?"


def out_of_service(node: Obj | None) -> bool:
    taints = (node or {}).get("spec", {}).get("taints") or ()
    return any(t.get("key") == OUT_OF_SERVICE for t in taints)


def _is_launcher(pod: Obj) -> bool:
    return (pod["metadata"].get("labels") or {}).get("kubevirt.io") == "virt-launcher"


def _ready(pod: Obj) -> str | None:
    cond = condition(pod, "Ready")
    return cond.get("status") if cond else None


@dataclass
class Timeline:
    """Changes seen through the simulator's informers, stamped with time.monotonic()."""

    phases: list[tuple[float, str, str]] = field(default_factory=list)  # (t, node, phase)
    taints: list[tuple[float, str, bool]] = field(default_factory=list)  # (t, node, oos)
    not_ready: list[tuple[float, str, str]] = field(default_factory=list)  # (t, pod, node)
    not_ready_message: dict[str, str] = field(default_factory=dict)  # pod → Ready's message
    pods_gone: list[tuple[float, str, str]] = field(default_factory=list)  # (t, pod, node)
    ready: list[tuple[float, str, str | None]] = field(default_factory=list)  # (t, node, Ready)
    # migration key → (created at, source VMI node at creation, evacuation node label)
    migrations: dict[str, dict[str, Any]] = field(default_factory=dict)
    # samples (t, active migrations in the cluster, active per evacuated node)
    migration_samples: list[tuple[float, int, dict[str, int]]] = field(default_factory=list)

    def attach(self, cluster: SimCluster) -> None:
        cluster.informers["nodes"].add_handler(self._on_node)
        cluster.informers["pods"].add_handler(self._on_pod)
        cluster.informers["vmims"].add_handler(lambda k, n, o: self._on_vmim(cluster, k, n, o))

    def _on_node(self, key: str, new: Obj | None, old: Obj | None) -> None:
        now = time.monotonic()
        if new is None:
            return
        if old is None or node_phase(new) != node_phase(old):
            self.phases.append((now, key, node_phase(new)))
        if old is None or out_of_service(new) != out_of_service(old):
            self.taints.append((now, key, out_of_service(new)))
        if old is None or _ready(new) != _ready(old):
            self.ready.append((now, key, _ready(new)))

    def _on_pod(self, key: str, new: Obj | None, old: Obj | None) -> None:
        now = time.monotonic()
        obj = new or old
        if obj is None or not _is_launcher(obj):
            return
        node = obj["spec"].get("nodeName") or ""
        if new is None:
            self.pods_gone.append((now, key, node))
        elif old is not None and _ready(old) == "True" and _ready(new) == "False":
            self.not_ready.append((now, key, node))
            self.not_ready_message[key] = (condition(new, "Ready") or {}).get("message") or ""

    def _on_vmim(self, cluster: SimCluster, key: str, new: Obj | None, old: Obj | None) -> None:
        now = time.monotonic()
        if new is not None and key not in self.migrations:
            vmi_name = new.get("spec", {}).get("vmiName", "")
            ns = new["metadata"]["namespace"]
            vmi = cluster.informers["vmis"].get(f"{ns}/{vmi_name}") or {}
            labels = new["metadata"].get("labels") or {}
            self.migrations[key] = {
                "created": now,
                "vmi": f"{ns}/{vmi_name}",
                "source": vmi.get("status", {}).get("nodeName"),
                "evacuation": labels.get("node-watchdog.io/evacuation"),
            }
        if new is not None:
            self.migrations[key]["phase"] = new.get("status", {}).get("phase") or ""
        elif key in self.migrations:
            self.migrations[key]["deleted"] = now
        active = [
            m
            for m in self.migrations.values()
            if "deleted" not in m and m.get("phase", "") not in ("Succeeded", "Failed")
        ]
        per_node: dict[str, int] = {}
        for m in active:
            per_node[m["source"] or "?"] = per_node.get(m["source"] or "?", 0) + 1
        self.migration_samples.append((now, len(active), per_node))

    def first(
        self, series: Iterable[tuple[float, str, Any]], node: str, value: Any, after: float = 0.0
    ) -> float | None:
        return next((t for t, n, v in series if n == node and v == value and t >= after), None)

    def phases_of(self, node: str, after: float = 0.0) -> list[str]:
        return [p for t, n, p in self.phases if n == node and t >= after]


# --- the environment --------------------------------------------------------------------------


def default_config(**overrides: Any) -> SimConfig:
    base: dict[str, Any] = {
        "nodes": 4,
        "vms": 8,
        "time_scale": 0.25,
        "broker": "mosquitto",
        "agents": True,
        "agent_env": dict(TIMINGS),
    }
    base.update(overrides)
    return SimConfig(**base)


class WatchdogEnv:
    """A SimCluster with agents, plus controller processes. Use `async with WatchdogEnv(...)`."""

    def __init__(
        self,
        config: SimConfig,
        binaries: ControlPlaneBinaries,
        work_dir: Path,
        *,
        controllers: int = 1,
        controller_env: dict[str, str] | None = None,
    ) -> None:
        self.work_dir = Path(work_dir)
        config.work_dir = self.work_dir / "sim"
        self.cluster = SimCluster(config, binaries=binaries)
        self.n_controllers = controllers
        self.controller_env = dict(controller_env or {})
        self.controllers: list[Controller] = []
        self.timeline = Timeline()
        self.namespace = NAMESPACE  # the controllers'; the ServiceAccount's with rbac_overlay
        self._started = 0

    # --- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> WatchdogEnv:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if shutil.which("node-watchdog") is None:
            raise RuntimeError("node-watchdog is not installed (pip install -e .)")
        c = self.cluster
        await c.start()
        await c.wait_ready(120)
        assert c.broker is not None, "the service tests need a broker"
        assert c.agents and all(s.running for s in c.agents.values()), c.agent_note
        if c.identity is not None:
            self.namespace = c.identity.namespace
        with contextlib.suppress(ApiError):
            await c.kube.create(
                NAMESPACES,
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.namespace}},
            )
        self.timeline.attach(c)
        for _ in range(self.n_controllers):
            await self.start_controller()
        await self.wait_for(self.has_leader, 60, "a leader")
        await self.wait_for(self.leader_hears_every_node, 30, "the leader hears every agent")

    async def stop(self) -> None:
        for ctl in self.controllers:
            if ctl.running:
                with contextlib.suppress(Exception):
                    await ctl.proc.stop(3.0)
        await self.cluster.stop()

    def controller_environment(self, port: int) -> dict[str, str]:
        c = self.cluster
        assert c.broker is not None
        return {
            **os.environ,
            **TIMINGS,
            **LEADER_TIMINGS,
            "KUBECONFIG": str(c.kubeconfig if c.identity is None else c.identity.kubeconfig),
            "WATCHDOG_MQTT__URL": c.broker.url,
            "WATCHDOG_METRICS_HOST": "127.0.0.1",
            "WATCHDOG_METRICS_PORT": str(port),
            "WATCHDOG_NAMESPACE": self.namespace,
            **self._broker_environment(),
            **self._bmc_environment(),
            **self.controller_env,
        }

    def _broker_environment(self) -> dict[str, str]:
        """With the shipped broker (`broker_identity`): the controllers' listener, password and
        the agents' signer, as the Deployment mounts them."""
        broker = self.cluster.broker
        return broker.controller_env() if isinstance(broker, IdentityBroker) else {}

    def _bmc_environment(self) -> dict[str, str]:
        """With the cluster's BMCs: their inventory (which names the CA of their certificate)."""
        bmcs = self.cluster.bmcs
        if bmcs is None:
            return {}
        return {"WATCHDOG_POWER_FENCE_INVENTORY": str(bmcs.inventory_path)}

    async def start_controller(
        self, *, wait_ready: bool = True, extra_env: dict[str, str] | None = None
    ) -> Controller:
        """One more `node-watchdog controller` process (a standby unless it wins the Lease);
        `extra_env` overrides its environment (e.g. a KUBECONFIG through a proxy)."""
        self._started += 1
        name = f"controller-{self._started}"
        for _attempt in range(3):
            port = free_port()
            proc = managed(
                name,
                ["node-watchdog", "controller"],
                self.work_dir / "logs" / f"{name}.log",
                {**self.controller_environment(port), **(extra_env or {})},
            )
            await proc.spawn()
            ctl = Controller(name, port, proc)
            try:
                if wait_ready:
                    await self.wait_for(
                        lambda ctl=ctl: self._ready_or_dead(ctl), 60, f"{name} ready"
                    )
            except TimeoutError:
                await proc.stop(2.0)
                raise
            if ctl.running:
                self.controllers.append(ctl)
                return ctl
            # The port was taken between our probe and its bind: try another one.
            if "address already in use" not in ctl.log_text().lower():
                raise RuntimeError(f"{name} exited {ctl.returncode}:\n{ctl.log_tail()}")
        raise RuntimeError(f"{name}: no free metrics port after 3 attempts")

    async def _ready_or_dead(self, ctl: Controller) -> bool:
        return not ctl.running or await ctl.ready()

    def live_controllers(self) -> list[Controller]:
        return [c for c in self.controllers if c.running]

    async def leader(self) -> Controller | None:
        leaders = [c for c in self.live_controllers() if await c.is_leader()]
        assert len(leaders) <= 1, f"two acting leaders: {[c.name for c in leaders]}"
        return leaders[0] if leaders else None

    async def has_leader(self) -> bool:
        return await self.leader() is not None

    async def wait_leader(self, timeout_s: float = 30.0) -> Controller:
        await self.wait_for(self.has_leader, timeout_s, "an acting leader")
        leader = await self.leader()
        assert leader is not None
        return leader

    async def scrape_leader(self) -> Scrape:
        leader = await self.wait_leader()
        return await leader.scrape()

    # --- waiting -------------------------------------------------------------------------------

    def diagnose(self) -> str:
        c = self.cluster
        lines = [f"ledger: {c.ledger.totals()}"]
        for name in c.fleet.members:
            lines.append(
                f"  {name}: phase {node_phase(c.node(name))}, ready {c.node_ready(name)}, "
                f"oos {out_of_service(c.node(name))}, vms {c.vms_on(name)}, "
                f"sim {c.fleet[name].state()}"
            )
        for ctl in self.controllers:
            lines.append(f"--- {ctl.name} (running {ctl.running}) log tail:\n{ctl.log_tail(25)}")
        return "\n".join(lines)

    async def wait_for(self, predicate: Predicate, timeout_s: float, what: str) -> float:
        return await wait_for(predicate, timeout_s, what, diagnose=self.diagnose)

    # --- reading the cluster -------------------------------------------------------------------

    def phase(self, node: str) -> str:
        return node_phase(self.cluster.node(node))

    def tainted(self, node: str) -> bool:
        return out_of_service(self.cluster.node(node))

    async def node(self, name: str) -> Obj:
        return await self.cluster.kube.get(NODES, name)

    async def events(
        self, reason: str | None = None, node: str | None = None, since: float | None = None
    ) -> list[Obj]:
        """The watchdog's Events (any namespace), oldest first; `since` is a wall time."""
        listing = await self.cluster.kube.list(EVENTS)
        out = []
        for e in listing.get("items", []):
            if (e.get("source") or {}).get("component") != COMPONENT:
                continue
            if reason is not None and e.get("reason") != reason:
                continue
            if node is not None and (e.get("involvedObject") or {}).get("name") != node:
                continue
            if since is not None and _wall(e.get("lastTimestamp")) < int(since):
                continue
            out.append(e)
        return sorted(out, key=lambda e: e.get("lastTimestamp") or "")

    async def leader_lease(self) -> Obj | None:
        return await self.cluster.kube.get_or_none(LEASES, LEADER_LEASE, self.namespace)

    # --- faults and baseline -------------------------------------------------------------------

    async def fault(self, action: str, node: str | None = None) -> float:
        """Apply a fault; returns time.monotonic() right after it took effect."""
        await self.cluster.faults.apply(action, node)
        return time.monotonic()

    def baseline_problems(self) -> list[str]:
        c = self.cluster
        problems = []
        for name, sim in c.fleet.members.items():
            if not (sim.powered and sim.network_up and sim.kubelet_running):
                problems.append(f"{name}: sim {sim.state()}")
            if name in c.agents and not c.agents[name].running:
                problems.append(f"{name}: agent not running")
            if c.node_ready(name) != "True":
                problems.append(f"{name}: Ready={c.node_ready(name)}")
            if self.phase(name) != "Healthy":
                problems.append(f"{name}: phase {self.phase(name)}")
            if self.tainted(name):
                problems.append(f"{name}: out-of-service taint")
        if not c.all_running():
            problems.append(f"VMs not all running once: {c.ledger.totals()}")
        return problems

    async def restore(self, timeout_s: float = 90.0) -> None:
        """Undo every fault, then wait for the baseline: nodes Healthy, VMs running, a leader."""
        c = self.cluster
        if c.control_plane._outage is not None:
            await c.faults.apply("api-restore")
        if "kube-controller-manager" not in c.control_plane.pids():
            await c.faults.apply("controller-manager-start")
        if c.broker is not None and not c.broker.running:
            await c.faults.apply("broker-restore")
        for name, sim in c.fleet.members.items():
            if name in c.fence_failing:
                await c.faults.apply("fence-works", name)
            if c.bmcs is not None:
                bmc = c.bmcs.bmcs[name]
                if bmc.proc.frozen:
                    await c.faults.apply("bmc-up", name)
                if bmc.lies:
                    await c.faults.apply("bmc-truthful", name)
            links = c.links.get(name)
            if links is not None and links.broker_cut:
                await c.faults.apply("broker-link-heal", name)
            if not sim.network_up:
                await c.faults.apply("heal", name)
            if not sim.powered:
                await c.faults.apply("poweron", name)
            elif not sim.kubelet_running:
                await c.faults.apply("kubelet-start", name)
            elif name in c.agents and not c.agents[name].running:
                await c.faults.apply("agent-start", name)
        if len(self.live_controllers()) < self.n_controllers:
            for _ in range(self.n_controllers - len(self.live_controllers())):
                await self.start_controller()
        await self.wait_for(lambda: not self.baseline_problems(), timeout_s, "baseline restored")
        await self.wait_for(self.leader_hears_every_node, 30, "the leader hears every agent")

    async def leader_hears_every_node(self) -> bool:
        """The acting leader has fresh heartbeats of every node, so it knows each agent's
        declared fence (a node never heard from counts as unfenced: its reset is held)."""
        return await self.leader_hears(self.cluster.fleet.members)

    async def leader_hears(self, nodes: Iterable[str]) -> bool:
        """The acting leader has fresh heartbeats of each of `nodes`."""
        leader = await self.leader()
        m = None if leader is None else await leader.try_scrape()
        if m is None:
            return False
        ages = m.labelled("watchdog_heartbeat_age_seconds", "node")
        return all(n in ages and ages[n] < HEARTBEAT_INTERVAL_S * 3 for n in nodes)

    # --- processes -----------------------------------------------------------------------------

    async def kill(self, ctl: Controller, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send `sig` to the controller's process group (SIGKILL: gone without a goodbye)."""
        assert ctl.pid is not None
        os.killpg(ctl.pid, sig)
        if sig == signal.SIGKILL:
            assert ctl.proc.process is not None
            await ctl.proc.process.wait()


def _wall(stamp: str | None) -> int:
    if not stamp:
        return 0
    return calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))


# --- ground truth helpers ---------------------------------------------------------------------


def copies(cluster: SimCluster, vm: str) -> list[Any]:
    rec = cluster.ledger.vms.get(vm if "/" in vm else f"default/{vm}")
    return list(rec.copies) if rec else []


def restarted_elsewhere(cluster: SimCluster, vm: str, node: str, after: float) -> Any | None:
    """The first copy of `vm` started (not migrated in) on another node than `node` after
    `after` (monotonic), or None."""
    for c in copies(cluster, vm):
        if c.node != node and c.start_reason is StartReason.STARTED and c.started_mono >= after:
            return c
    return None


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "n": len(values),
        "min": round(min(values), 3),
        "p50": round(percentile(values, 50), 3),
        "p95": round(percentile(values, 95), 3),
        "max": round(max(values), 3),
    }


# --- latency samples for the lead (DESIGN §10 numbers) -------------------------------------------

LATENCY_FILE = Path("/tmp/service_latencies.json")


def record_latencies(scenario: str, fault: str, **series: list[float]) -> None:
    """Append this scenario's samples to LATENCY_FILE, and summarise them per fault kind."""
    try:
        data = json.loads(LATENCY_FILE.read_text())
    except (OSError, ValueError):
        data = {"timings": TIMINGS, "samples": []}
    data["samples"].append(
        {"scenario": scenario, "fault": fault, **{k: list(v) for k, v in series.items()}}
    )
    pooled: dict[str, dict[str, list[float]]] = {}
    for sample in data["samples"]:
        for key, values in sample.items():
            if isinstance(values, list):
                pooled.setdefault(sample["fault"], {}).setdefault(key, []).extend(values)
    data["summary"] = {
        fault: {key: summary(values) for key, values in by_key.items()}
        for fault, by_key in pooled.items()
    }
    LATENCY_FILE.write_text(json.dumps(data, indent=2) + "\n")


def reset_latencies() -> None:
    LATENCY_FILE.write_text(json.dumps({"timings": TIMINGS, "samples": []}) + "\n")
