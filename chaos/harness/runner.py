"""Running a scenario on the test cluster: one fresh cluster per system and repetition.

Owns, per run: the cluster each system gets (`sim_config`: the watchdog as real `node-watchdog
agent` processes on every node and `node-watchdog run` replicas on the scenario's controller
nodes, compressed by the same factor as everything else; Harvester's node-down controller in
its 1.7 or pre-1.7 algorithm; or Kubernetes alone), waiting until it is ready (for the watchdog:
a leader that hears every agent), injecting the faults on schedule (`leader` resolved to the
acting leader's node at that moment), live progress lines, the end of a run (everything
recovered and settled, or the timeout), crash detection (a component that exits on its own:
control-plane process, agent or controller replica, broker, the simulators), and a teardown that
leaves nothing running. Across runs: one after another, every system side by side, or the
watchdog alone and then the baselines side by side (`RunOptions.parallel`).

Must not: define the numbers (measure.py) or format reports (report.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from chaos.harness import measure, probe
from chaos.harness.measure import Incident, RunResult
from chaos.harness.recorder import Recorder
from chaos.harness.scenario import DISRUPTIVE_ACTIONS, LEADER, Fault, Scenario
from chaos.harness.settings import ScaledSettings, scale_settings
from chaos.sim.binaries import ControlPlaneBinaries
from chaos.sim.cluster import SimCluster, SimConfig
from chaos.sim.ledger import RESTARTING_STRATEGIES
from chaos.sim.loop_lag import LoopLag
from chaos.sim.procs import pid_alive

log = logging.getLogger(__name__)

CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
HARVESTER = {"harvester-1.7": "1.7", "harvester-1.6": "1.6"}
TICK_S = 0.1

Progress = Callable[[str], None]


class CrashDetected(RuntimeError):
    """A component of the run died on its own."""


@dataclass
class RunOptions:
    binaries: ControlPlaneBinaries
    progress: Progress = print
    # "none": one run after another; "all": every system side by side; "baselines": the
    # watchdog alone first (its timings are the tightest: it must not share the CPU), then the
    # baselines side by side (they are cheap: no agents, no controllers).
    parallel: Literal["none", "baselines", "all"] = "none"
    work_root: Path | None = None  # keep every run's logs here (else temporary, removed)
    ready_timeout_s: float = 180.0
    live: bool = True  # print timeline lines as things happen
    # Called once a run is under way (tests use it to break things mid-run).
    on_running: Callable[[SimCluster, RunResult], Any] | None = None


@dataclass
class ScenarioResult:
    scenario: Scenario
    source: str
    runs: list[RunResult] = field(default_factory=list)
    started_at: str = ""
    wall_s: float = 0.0
    watchdog_settings: ScaledSettings | None = None

    def runs_of(self, system: str) -> list[RunResult]:
        return [r for r in self.runs if r.system == system]


def sim_config(
    scenario: Scenario, system: str, scaled: ScaledSettings, work_dir: Path | None
) -> SimConfig:
    shape = scenario.cluster
    watchdog = system == "watchdog"
    return SimConfig(
        nodes=shape.nodes,
        vms=shape.vms,
        time_scale=scenario.time_scale,
        harvester=HARVESTER.get(system, "none"),
        harvester_policy=scenario.harvester_policy if system in HARVESTER else None,
        run_strategies=tuple(shape.run_strategies),
        access_modes=tuple(shape.access_modes),
        broker=shape.broker if watchdog else None,
        bmcs=shape.bmcs,
        bmc_protocol=shape.bmc_protocol,
        agents=watchdog,
        agent_env=dict(scaled.env) if watchdog else {},
        run_nodes=tuple(scenario.watchdog.controllers) if watchdog else (),
        watchdog_devices=scenario.watchdog.devices,
        work_dir=work_dir,
        keep_work_dir=work_dir is not None,
    )


def _iso(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))


# --- crash detection ------------------------------------------------------------------------------


class CrashMonitor:
    """Notices components that died on their own (not through a fault the run injected)."""

    def __init__(self, cluster: SimCluster) -> None:
        self.cluster = cluster
        # Faults being applied right now: their effect is visible before their history entry.
        self.applying: set[str] = set()

    def _stopped_by_faults(self) -> tuple[set[str], bool]:
        down: set[str] = set()
        if "controller-manager-stop" in self.applying:
            down.add("kube-controller-manager")
        broker_down = "broker-outage" in self.applying
        for h in self.cluster.faults.history:
            match h.get("action"):
                case "controller-manager-stop":
                    down.add("kube-controller-manager")
                case "controller-manager-start":
                    down.discard("kube-controller-manager")
                case "broker-outage":
                    broker_down = True
                case "broker-restore":
                    broker_down = False
        return down, broker_down

    def check(self) -> str | None:
        c = self.cluster
        err = c.simulators_error()
        if err:
            return err
        down, broker_down = self._stopped_by_faults()
        if c.control_plane is not None:
            pids = c.control_plane.pids()
            for name in CONTROL_PLANE:
                if name not in pids and name not in down:
                    tail = _tail(c.control_plane.log_path(name))
                    return f"{name} is no longer running (not stopped by any fault){tail}"
        for node, slot in c.agents.items():
            proc = slot.proc
            if proc is None or proc.process is None or proc.process.returncode is None:
                continue
            if proc.pid in slot.killed_pids:
                continue
            role = "node-watchdog run (agent + controller)" if slot.metrics_port else "agent"
            return (
                f"{role} on {node} (pid {proc.pid}) exited with code "
                f"{proc.process.returncode} on its own{_tail(slot.log_path)}"
            )
        if c.broker is not None and not broker_down and not c.broker.running:
            return "the MQTT broker stopped (not through a broker-outage fault)"
        return None


def _tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n  last log lines:\n    " + "\n    ".join(text) if text else ""


# --- the watchdog system --------------------------------------------------------------------------


# Fence mode power: how long the results wait after the run for the fence run's own result
# (fence_redfish polls the BMC until it reads the node off; the emulator applies a power change
# up to 11 s after the request).
FENCE_RESULT_WAIT_S = 30.0


class WatchdogView:
    """The controller replicas of one cluster, seen through their /metrics."""

    def __init__(self, cluster: SimCluster, scaled: ScaledSettings) -> None:
        self.cluster = cluster
        self.scaled = scaled
        self.last: dict[str, dict[str, Any]] = {}  # node → last summary seen
        self.held_seen: set[str] = set()
        self.leaders_seen: list[str] = []
        self.phases_entered: set[str] = set()

    def urls(self) -> dict[str, str]:
        return {
            n: f"http://127.0.0.1:{s.metrics_port}/metrics"
            for n, s in self.cluster.agents.items()
            if s.metrics_port and s.running
        }

    async def poll(self, timeout_s: float = 0.5) -> dict[str, probe.Scrape]:
        urls = self.urls()
        got = await asyncio.gather(*(probe.scrape(u, timeout_s) for u in urls.values()))
        out = {n: m for n, m in zip(urls, got, strict=True) if m is not None}
        for node, m in out.items():
            s = probe.summary(m)
            self.last[node] = s
            self.held_seen.update(s["resets_held"])
            # "From→To (Reason)": a phase some node was moved into on this replica.
            self.phases_entered.update(
                k.split("→", 1)[1].split(" (", 1)[0] for k in s["transitions"]
            )
            if s["leader"] == 1 and (not self.leaders_seen or self.leaders_seen[-1] != node):
                self.leaders_seen.append(node)
        return out

    async def wait_fence_result(self, timeout_s: float) -> bool:
        """Fence mode power: until a replica reports the result of a fence run. The BMC may
        still be switching the node off when its VMs already run elsewhere (the agent's
        self-fence proved it stopped first; the run goes on, as in production), and the report
        must say whether the BMC confirmed. Gives up after `timeout_s` (the report then shows
        no run)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if any(
                key.startswith("RunFenceHook/")
                for replica in self.last.values()
                for key in replica.get("actions") or {}
            ):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.5)
            with contextlib.suppress(Exception):
                await self.poll(timeout_s=2.0)

    async def leader(self) -> str | None:
        for node, m in (await self.poll()).items():
            if m.get("watchdog_leader") == 1:
                return node
        return None

    async def wait_ready(self, timeout_s: float) -> str:
        """Ready to inject a fault: a leader hears every node fresh, and every controller
        replica holds an armed fence declaration of every node's agent (whichever replica
        leads when the fault comes must be able to reset on it; a standby that never heard a
        node holds its reset, NoArmedFence). A fence meanwhile is the product's failure, not
        the harness's: StartupFence."""
        hb = float(self.scaled.scaled.get("heartbeat_interval_s", 1.0))
        fresh = max(1.0, 4 * hb)
        nodes = set(self.cluster.fleet.members)
        deadline = time.monotonic() + timeout_s
        waiting = "no replica answering"
        while time.monotonic() < deadline:
            fenced = sorted(
                {str(f.get("node")) for f in self.cluster.faults.history if f["action"] == "fence"}
            )
            if fenced:
                raise StartupFence(fenced)
            urls = self.urls()
            scrapes = await self.poll()
            leader = None
            unready: list[str] = []
            for node in sorted(urls):
                m = scrapes.get(node)
                if m is None:
                    unready.append(f"{node} not answering")
                    continue
                armed = m.labelled("watchdog_fences_declared", "armed").get("true", 0.0)
                if armed < len(nodes):
                    unready.append(f"{node} holds {armed:.0f}/{len(nodes)} armed declarations")
                if m.get("watchdog_leader") == 1:
                    ages = m.labelled("watchdog_heartbeat_age_seconds", "node")
                    if nodes <= set(ages) and all(ages[n] < fresh for n in nodes):
                        leader = node
                    else:
                        unready.append(f"leader {node} does not hear every node")
            if leader is not None and not unready:
                return leader
            waiting = "; ".join(unready) or "no leader"
            await asyncio.sleep(0.2)
        raise TimeoutError(f"the watchdog not ready within {timeout_s:.0f}s: {waiting}")


class StartupFence(Exception):
    """Healthy nodes fenced while the cluster started, before any fault."""

    def __init__(self, nodes: list[str]) -> None:
        self.nodes = nodes
        super().__init__(f"nodes fenced during cluster start-up, before any fault: {nodes}")


# --- one run --------------------------------------------------------------------------------------


class Run:
    """One system, one repetition: `await Run(...).execute()` returns its RunResult."""

    def __init__(
        self,
        scenario: Scenario,
        system: str,
        repetition: int,
        scaled: ScaledSettings,
        opts: RunOptions,
    ) -> None:
        self.scenario = scenario
        self.system = system
        self.repetition = repetition
        self.scaled = scaled
        self.opts = opts
        self.scale = scenario.time_scale
        self.result = RunResult(system=system, repetition=repetition, time_scale=self.scale)
        self.incidents: list[Incident] = []
        self.recorder = Recorder(on_line=self._line)
        self.run_start = time.monotonic()
        self.first_fault: float | None = None
        self.cluster: SimCluster | None = None
        self.view: WatchdogView | None = None
        self._announced: set[str] = set()
        self._faults_done = asyncio.Event()
        self.monitor = CrashMonitor(None)  # type: ignore[arg-type]  # replaced in _observe

    # --- output --------------------------------------------------------------------------------

    def label(self) -> str:
        rep = f"#{self.repetition}" if self.scenario.repetitions > 1 else ""
        return f"{self.system}{rep}"

    def _line(self, text: str) -> None:
        if not self.opts.live:
            return
        t = time.monotonic() - (self.first_fault or self.run_start)
        self.opts.progress(f"[{self.label():<16}] {t:+7.2f}s ({t / self.scale:+6.0f}s real) {text}")

    def _say(self, text: str) -> None:
        self.opts.progress(f"[{self.label():<16}] {text}")

    # --- lifecycle -----------------------------------------------------------------------------

    async def execute(self) -> RunResult:
        r = self.result
        wall0, t0 = time.time(), time.monotonic()
        r.started_at = _iso(wall0)
        work = None
        if self.opts.work_root is not None:
            work = self.opts.work_root / f"{self.system}-{self.repetition}"
        cfg = sim_config(self.scenario, self.system, self.scaled, work)
        cluster = SimCluster(cfg, binaries=self.opts.binaries, progress=log.info)
        self.cluster = cluster
        pids: dict[str, int] = {}
        try:
            self._say(
                f"starting a fresh cluster: {cfg.nodes} nodes, {cfg.vms} VMs, time scale "
                f"{self.scale:g}"
                + (f", controllers on {', '.join(cfg.run_nodes)}" if cfg.run_nodes else "")
            )
            await cluster.start()
            await cluster.wait_ready(self.opts.ready_timeout_s)
            if cluster.agent_note:
                raise RuntimeError(cluster.agent_note)
            if self.system == "watchdog":
                self.view = WatchdogView(cluster, self.scaled)
                leader = await self.view.wait_ready(60)
                self._say(f"ready in {time.monotonic() - t0:.1f}s; watchdog leader on {leader}")
            else:
                self._say(f"ready in {time.monotonic() - t0:.1f}s")
            r.startup = {k: round(v, 2) for k, v in cluster.timings.items()}
            r.startup["watchdog_ready_s"] = round(time.monotonic() - t0, 2)
            pids = dict(cluster.status()["pids"])
            self.recorder.attach(cluster.informers["nodes"], cluster.informers["pods"])
            await self._observe(cluster)
        except CrashDetected as e:
            r.crashed = str(e)
            self._say(f"CRASH: {e}")
        except StartupFence as e:
            r.startup_fences = e.nodes
            self._say(f"FAILED: {e}")
        except Exception as e:  # the run could not be carried out: say why, tear down
            # Once the cluster is up, an error is most likely a component gone: name it.
            crash = CrashMonitor(cluster).check() if cluster.started_at is not None else None
            if crash:
                r.crashed = crash
                self._say(f"CRASH: {crash}")
            else:
                r.error = f"{type(e).__name__}: {e}"
                self._say(f"ERROR: {r.error}")
        finally:
            await self._collect(cluster)
            with contextlib.suppress(Exception):  # a cluster that never started has none
                pids.update(cluster.status()["pids"])
            await cluster.stop()
            left = [f"{n} (pid {p})" for n, p in pids.items() if pid_alive(p)]
            for p in pids.values():
                if pid_alive(p):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(p, signal.SIGKILL)
            if left:
                r.notes.append(f"still running after teardown, killed: {', '.join(left)}")
            r.wall_s = round(time.monotonic() - t0, 2)
        return r

    async def _observe(self, cluster: SimCluster) -> None:
        r = self.result
        sc = self.scenario
        monitor = self.monitor = CrashMonitor(cluster)
        self.run_start = time.monotonic()
        injector = asyncio.create_task(self._inject_all(cluster), name=f"faults {self.label()}")
        if self.opts.on_running is not None:
            maybe = self.opts.on_running(cluster, r)
            if asyncio.iscoroutine(maybe):
                await maybe
        observe = sc.observe_s * self.scale
        settle = sc.settle_s * self.scale
        timeout = sc.timeout_s * self.scale
        settled_since: float | None = None
        next_poll = 0.0
        lag = LoopLag()
        lag.start()
        try:
            while True:
                await asyncio.sleep(TICK_S)
                crash = monitor.check()
                if crash:
                    raise CrashDetected(crash)
                if injector.done() and not injector.cancelled():
                    failed = injector.exception()
                    if failed is not None:
                        raise failed
                now = time.monotonic()
                if self.view is not None and now >= next_poll:
                    next_poll = now + 1.0
                    await self.view.poll()
                self._announce_running(cluster)
                if self.first_fault is None:
                    continue
                elapsed = now - self.first_fault
                if elapsed >= timeout:
                    r.timed_out = not self._recovered(cluster)
                    if r.timed_out:
                        self._line(
                            f"stopping at the timeout: {sc.timeout_s:g}s real-world "
                            f"({timeout:.1f}s wall) after the first fault"
                        )
                    break
                if self._faults_done.is_set() and elapsed >= observe and self._recovered(cluster):
                    settled_since = settled_since or now
                    if now - settled_since >= settle:
                        break
                else:
                    settled_since = None
        finally:
            injector.cancel()
            with contextlib.suppress(BaseException):
                await injector
            await lag.stop()
            summary = lag.summary(self._smallest_interval_s())
            r.sim_lag = asdict(summary)
            self._say(summary.line())
        r.observed_s = round(time.monotonic() - (self.first_fault or self.run_start), 3)

    def _smallest_interval_s(self) -> float:
        """The shortest timing the run models, in wall seconds: the simulated kubelet's Lease
        renewal, and for the watchdog its heartbeat interval too (peer probes are floored in
        wall time, chaos/harness/settings.py, and never shorter than a heartbeat here)."""
        assert self.cluster is not None, "watched only once the cluster runs"
        intervals = [self.cluster.config.node_timings.lease_renew_s * self.scale]
        if self.system == "watchdog":
            intervals.append(float(self.scaled.scaled["heartbeat_interval_s"]))
        return min(intervals)

    def _recovered(self, cluster: SimCluster) -> bool:
        if not cluster.all_running():
            return False
        for inc in self.incidents:
            for vm, uid, strategy in inc.vms:
                if strategy not in RESTARTING_STRATEGIES or self._restarted(cluster, vm, inc.t):
                    continue
                if self.scenario.expect.moved:
                    return False
                rec = cluster.ledger.vms.get(vm)
                if rec is None or uid not in rec.running:  # its copy there stopped
                    return False
        return True

    def _restarted(self, cluster: SimCluster, vm: str, after: float) -> str | None:
        rec = cluster.ledger.vms.get(vm)
        if rec is None:
            return None
        for c in rec.copies:
            if c.started_mono > after:
                return c.node
        return None

    def _announce_running(self, cluster: SimCluster) -> None:
        for inc in self.incidents:
            for vm, _, _ in inc.vms:
                if vm in self._announced:
                    continue
                node = self._restarted(cluster, vm, inc.t)
                if node:
                    self._announced.add(vm)
                    self._line(f"{vm.split('/', 1)[-1]}: running again on {node}")

    # --- faults --------------------------------------------------------------------------------

    async def _inject_all(self, cluster: SimCluster) -> None:
        plan: list[tuple[float, Fault]] = sorted(
            ((t, f) for f in self.scenario.faults for t in f.times()), key=lambda x: x[0]
        )
        for at_s, fault in plan:
            delay = self.run_start + at_s * self.scale - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            targets: list[str | None] = list(fault.targets()) or [None]
            await asyncio.gather(*(self._inject(cluster, fault, t) for t in targets))
        # Undo actions scheduled by the faults themselves (duration_s) come due by then.
        last = self.run_start + self.scenario.last_fault_s() * self.scale
        await asyncio.sleep(max(0.0, last - time.monotonic()) + 0.2)
        self._faults_done.set()

    async def _resolve(self, target: str | None) -> str | None:
        if target != LEADER:
            return target
        if self.view is None:
            return self.scenario.watchdog.controllers[0]
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            leader = await self.view.leader()
            if leader:
                return leader
            await asyncio.sleep(0.2)
        raise RuntimeError("fault target `leader`: no acting leader found within 15s")

    async def _inject(self, cluster: SimCluster, fault: Fault, target: str | None) -> None:
        node = await self._resolve(target)
        duration = None if fault.duration_s is None else fault.duration_s * self.scale
        now = time.monotonic()
        if fault.action in DISRUPTIVE_ACTIONS and node is not None:
            vms = [
                (
                    c.vm,
                    c.pod_uid,
                    cluster.ledger.vms[c.vm].run_strategy if c.vm in cluster.ledger.vms else "",
                )
                for c in cluster.ledger.copies_on(node)
            ]
            self.incidents.append(Incident(node, fault.action, now, vms))
        if self.first_fault is None:
            self.first_fault = now
            if self.view is not None:
                # Leaders are counted from the first fault on (`expect.leader_changed`): a
                # change of leader while the cluster started is not the one a fault caused.
                self.view.leaders_seen[:] = self.view.leaders_seen[-1:]
        shown = f"{fault.action}{' ' + node if node else ''}" + (
            f" for {fault.duration_s:g}s real-world" if fault.duration_s else ""
        )
        if target == LEADER:
            shown += " (the acting leader's node)"
        self.monitor.applying.add(fault.action)
        try:
            await cluster.faults.apply(fault.action, node, duration)
        except ValueError as e:
            self.result.skipped_faults.append(f"{shown}: {e}")
            self._line(f"fault {shown} skipped: {e}")
            return
        finally:
            self.monitor.applying.discard(fault.action)
        there = ""
        if fault.action in DISRUPTIVE_ACTIONS and node is not None:
            there = f" ({len(self.incidents[-1].vms)} VMs there)"
        self._line(f"FAULT {shown}{there}")

    # --- results -------------------------------------------------------------------------------

    async def _collect(self, cluster: SimCluster) -> None:
        r = self.result
        if cluster.control_plane is None or not cluster.ledger.vms:
            return
        since = self.first_fault or self.run_start
        r.vms = measure.timelines(
            self.system, self.incidents, cluster.ledger, self.recorder, self.run_start
        )
        if self.scenario.expect.moved:
            for tl in r.vms:
                tl.interrupted = True  # it had to leave the node, whether or not it did
        r.invariants = measure.invariants(cluster.ledger)
        r.counts = measure.counts(cluster.ledger, self.recorder, cluster.faults.history, since)
        r.faults = [
            {k: v for k, v in h.items() if k in ("action", "node", "duration_s", "t", "result")}
            | {"at_s": round(h["t"] - (self.run_start - cluster.ledger.t0), 3)}
            for h in cluster.faults.history
        ]
        if self.view is not None:
            # The last word of every replica: a longer timeout than the run's polls, which
            # must not hold up the measurement.
            with contextlib.suppress(Exception):
                await self.view.poll(timeout_s=5.0)
            if str(self.scenario.watchdog.settings.get("fence_mode", "")) == "power":
                await self.view.wait_fence_result(FENCE_RESULT_WAIT_S)
            r.watchdog = {
                "replicas": self.view.last,
                "leaders_seen": self.view.leaders_seen,
                "resets_held_seen": sorted(self.view.held_seen),
                "phases_entered": sorted(self.view.phases_entered),
            }
        if self.system in HARVESTER and cluster.harvester is not None:
            r.notes.extend(
                f"harvester {a.get('action')} {a.get('node', '')} at "
                f"{float(a['mono']) - since:+.2f}s"  # type: ignore[arg-type]
                for a in cluster.harvester.actions[:12]
                if "mono" in a
            )


# --- a scenario -----------------------------------------------------------------------------------


async def run_scenario(scenario: Scenario, source: str, opts: RunOptions) -> ScenarioResult:
    scaled = scale_settings(scenario.watchdog.settings, scenario.time_scale)
    result = ScenarioResult(scenario=scenario, source=source, watchdog_settings=scaled)
    wall0, t0 = time.time(), time.monotonic()
    result.started_at = _iso(wall0)
    for note in scaled.notes:
        opts.progress(f"note: {note}")
    try:
        for rep in range(1, scenario.repetitions + 1):
            runs = [Run(scenario, system, rep, scaled, opts) for system in scenario.systems]
            if opts.parallel == "all":
                groups = [runs]
            elif opts.parallel == "baselines":
                groups = [[r] for r in runs if r.system == "watchdog"]
                groups.append([r for r in runs if r.system != "watchdog"])
            else:
                groups = [[r] for r in runs]
            for group in groups:
                if group:
                    result.runs.extend(await asyncio.gather(*(run.execute() for run in group)))
    finally:
        result.wall_s = round(time.monotonic() - t0, 2)
    for run_result in result.runs:
        run_result.failures = measure.verdict(run_result, scenario.expect)
    return result
