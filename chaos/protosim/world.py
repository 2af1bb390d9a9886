"""One simulated cluster in virtual time: the real controller and the real fence rules, the
rest modelled, every fault a schedule can hold, and the invariants checked as it runs.

Real code: the controller (`watchdog.runtime.controller.Controller`: `decide`, the holds, the
quorum hold, the quiet wake-ups, the reconciliation of its writes), its heartbeat book
(`watchdog.decide.heartbeats.HeartbeatBook`: replay protection, contact ages, Wills), and the
agent's fence rule (`watchdog.heartbeat.fence`: `BootContact`, `fence_at`, `fence_call`,
`declared_grace_s`).

Modelled (explicitly, here): the broker (delivery within 10-300 ms while the broker and the
node's link are up; the agent's echo as its contact, mode `echo`), the API server (one; the
controller's writes and the agents' reads fail while it or the node's link is down), kubelets
(a Lease renewal every 10 s with up to 1 s of jitter; Ready turns Unknown 40 s after the last
one), KubeVirt (a VM whose launcher pod is force-deleted runs again on a powered node 1-3 s
later), machines (power, a boot id per boot, 20-40 s to boot), agent processes (running, frozen,
dead; a restart keeps the boot's contact, as the boot record does), the watchdog device (reset
`watchdog_s` after the last pet; petted only by a running agent before its deadline), the
fence command (stops the node within its bound, or fails). The agent's reading of the API
(its declaration, or contact) follows heartbeat/agent.py `_record_api`.

A leader change is a time without a leader, then the real `become_leader` (resuming every
node from its annotation) with the heartbeat book the standby kept.

Not modelled yet: peer probes (so neither the peers' corroboration nor the quorum before
self-fencing: agents are never spared), two replicas acting at once (a deposed leader's late
write), acknowledgements (`leader-ack`), one-way broker paths, clock-rate drift, stale API
reads, the agents' Lease wait (`self_fence_lease_s`, off by default).

Invariants, checked at every event: no VM runs on two nodes at once (split-brain); no node's
VMs are reset while one of them still runs there; no node is fenced (its agent's command or its
device) while its agent runs and the controller heard it in the last two heartbeat intervals.
Liveness, at the end: once every fault is healed and the cluster has settled, every VM runs.
"""

from __future__ import annotations

import heapq
import json
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from watchdog.decide import actions as act
from watchdog.decide.config import DecideConfig, Policy
from watchdog.decide.heartbeats import Heartbeat, HeartbeatBook, HeartbeatRejected
from watchdog.decide.names import STATE_ANNOTATION
from watchdog.decide.observations import FenceDeclaration, LauncherPod
from watchdog.heartbeat.fence import (
    BootContact,
    declared_down,
    declared_grace_s,
    fence_at,
    fence_call,
)
from watchdog.metrics import Metrics
from watchdog.runtime.controller import Controller

NS = "vms"
TAINT = ("node.kubernetes.io/out-of-service", "NoExecute")
AFTER_S, BOUND_S, WATCHDOG_S = 8.0, 5.0, 5.0
API_INTERVAL_S = 2.0
LEASE_RENEW_S = 10.0
READY_GRACE_S = 40.0
BOOT_S = (20.0, 40.0)
DECLARATION = FenceDeclaration(
    armed=True, after_s=AFTER_S, bound_s=BOUND_S, device=True, watchdog_s=WATCHDOG_S
)


@dataclass(frozen=True)
class Variant:
    """Which of the fencing fixes the simulated service has: all of them by default. Without
    one, the simulation shows the hole it closed (tests/unit/test_protosim.py)."""

    # A restarted agent of the same boot is heard at once (its seq goes on from the clock,
    # heartbeat/agent.py); without it, its seq restarts at 0 and the controller refuses its
    # heartbeats as replays for as long as its predecessor ran.
    restart_continuity: bool = True
    # Each agent drives a watchdog device, so a frozen agent or a failed fence command still
    # stops the node; without one, the controller counts on the agent alone (what it did
    # before devices: here, `accept_weak_fence`).
    watchdog_device: bool = True


SHIPPED = Variant()


class Violation(Exception):
    """An invariant broke: the message says which, at what time."""


@dataclass
class Node:
    name: str
    powered: bool = True
    boot: int = 1
    kubelet: bool = True  # the kubelet process runs (a fault may stop it)
    agent: str = "running"  # running | frozen | dead
    broker_link: bool = True
    api_link: bool = True
    fence_fails: bool = False
    # Agent state (one process; `contact` is the boot record's, kept across restarts).
    contact: BootContact = field(default_factory=BootContact)
    started_at: float = 0.0
    declared_phase: str | None = None
    declared_since: float | None = None
    last_pet: float | None = None
    guard_at: float | None = None  # the fence guard's pending look
    fencing: bool = False  # the agent decided to fence: no heartbeat may follow
    # Ground truth.
    lease_at: float | None = None
    heard_at: float | None = None  # the controller accepted one of its heartbeats then
    # The longest the controller went without one of its heartbeats, over the agent's last
    # `AFTER_S`: below `suspect_after_s`, the controller never had reason to suspect it.
    gaps: list[tuple[float, float]] = field(default_factory=list)  # (heard at, gap before)

    @property
    def boot_id(self) -> str:
        return f"{self.name}-boot-{self.boot}"


class World:
    """The simulated cluster; `run(schedule)` plays a fault schedule and checks everything."""

    def __init__(
        self,
        nodes: int,
        rng: random.Random,
        trace: list[str] | None = None,
        variant: Variant = SHIPPED,
    ) -> None:
        self.rng = rng
        self.variant = variant
        self.t = 0.0
        self.trace = trace
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self.nodes = {f"node-{i}": Node(f"node-{i}") for i in range(1, nodes + 1)}
        self.broker_up = True
        self.api_up = True
        self.api_answered: float | None = 0.0
        # API objects.
        self.annotations: dict[str, str] = {}
        self.taints: set[str] = set()
        self.versions: dict[str, int] = dict.fromkeys(self.nodes, 1)
        self.pods: dict[str, str] = {}  # vm -> the node its launcher pod is bound to
        # Ground truth: where each VM runs (a set: more than one is split-brain).
        self.running: dict[str, set[str]] = {}
        for i, name in enumerate(self.nodes, start=1):
            vm = f"vm-{i}"
            self.pods[vm] = name
            self.running[vm] = {name}
        self.cfg = DecideConfig(accept_weak_fence=not variant.watchdog_device)
        self.declaration = (
            DECLARATION
            if variant.watchdog_device
            else FenceDeclaration(armed=True, after_s=AFTER_S, bound_s=BOUND_S)
        )
        self.book = HeartbeatBook(contact_slack_s=self.cfg.heartbeat_interval_s)
        self.book.set_known(set(self.nodes))
        self.controller = Controller(
            self.cfg,
            Policy(),
            TAINT,
            _View(self),
            self.book,
            self._execute,
            Metrics(),
            lambda: self.t,
            wall=lambda: self.t,
        )
        self.controller.mark = self.mark
        self.controller.health.api_answered = lambda: self.api_answered
        self._dirty: dict[str, None] = {}
        self._wake: dict[str, float] = {}
        self.grace_s = declared_grace_s(AFTER_S, self.cfg.heartbeat_interval_s, API_INTERVAL_S)
        self.resets = 0
        self.violation: str | None = None

    # --- the event loop -------------------------------------------------------------------------

    def at(self, t: float, what: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, what))

    def log(self, text: str) -> None:
        if self.trace is not None:
            self.trace.append(f"{self.t:8.3f}  {text}")

    def fail(self, message: str) -> None:
        """An invariant broke. Raised here, and again at the end of the event: the controller
        catches what its executor raises (as the runtime's does), so the first one is kept."""
        if self.violation is None:
            self.violation = f"t={self.t:.3f}: {message}"
            self.log(f"VIOLATION {message}")
        raise Violation(self.violation)

    def run_until(self, end: float) -> None:
        while self._events and self._events[0][0] <= end:
            t, _, what = heapq.heappop(self._events)
            self.t = t
            what()
            self._decide()
            if self.violation is not None:
                raise Violation(self.violation)
        self.t = end

    def start(self) -> None:
        c = self.controller
        for name in self.nodes:
            c.known_since[name] = 0.0
        c.broker_connection(True)
        c.api_connection(True)
        c.members_synced()
        c.become_leader()
        for node in self.nodes.values():
            offset = self.rng.uniform(0.0, 1.0)
            self._boot(node, offset)
        self.at(API_INTERVAL_S, self._api_probe)
        self.mark_all()

    # --- the controller's scheduler (runtime/scheduler.py, in virtual time) ---------------------

    def mark(self, node: str) -> None:
        self._dirty[node] = None

    def mark_all(self) -> None:
        for node in self.nodes:
            self._dirty[node] = None

    def _decide(self) -> None:
        for _ in range(50):
            if not self._dirty:
                return
            dirty, self._dirty = list(self._dirty), {}
            for node in dirty:
                self._evaluate(node)
        self.fail("the controller keeps deciding at one instant")

    def _evaluate(self, node: str) -> None:
        result = self.controller.evaluate_now(node)
        if result is not None and not isinstance(result, float | int):
            result = _finish(result)
        self._set_wake(node, result)

    def _set_wake(self, node: str, at: float | None) -> None:
        if at is None:
            self._wake.pop(node, None)
            return
        self._wake[node] = at
        self.at(at, lambda: self._woken(node, at))

    def _woken(self, node: str, at: float) -> None:
        if self._wake.get(node) != at:
            return  # superseded
        del self._wake[node]
        if node not in self._dirty:
            later = self.controller.rearm(node)
            if later is not None and later > self.t:
                self._set_wake(node, later)
                return
        self.mark(node)

    def _api_probe(self) -> None:
        if self.api_up:
            self.api_answered = self.t
            for node in self.controller.api_answered_now():
                self.mark(node)
        self.at(self.t + API_INTERVAL_S, self._api_probe)

    # --- what the controller's writes do (the actuator, against the modelled API server) ------

    async def _execute(self, action: act.Action, basis: act.Basis | None = None) -> str:
        if basis is not None and not basis.may_act():
            return "stale"
        if not self.api_up:
            return "failed"
        node = action.node
        if isinstance(action, act.PersistState):
            self.annotations[node] = action.annotation
            self._node_written(node, basis)
        elif isinstance(action, act.TaintOutOfService):
            self.taints.add(node)
            self._node_written(node, basis)
        elif isinstance(action, act.RemoveOutOfServiceTaint):
            self.taints.discard(node)
            self._node_written(node, basis)
        elif isinstance(action, act.ForceDeletePods):
            self._force_delete(node, [pod for _, pod in action.pods])
        return "success"

    def _node_written(self, node: str, basis: act.Basis | None) -> None:
        self.versions[node] += 1
        if basis is not None:
            basis.node_version = str(self.versions[node])
            basis.written.append(basis.node_version)
            if basis.expect is not None:
                basis.expect = (self.annotations.get(node), node in self.taints)
        self.mark(node)  # its watch event

    def _force_delete(self, node: str, pods: list[str]) -> None:
        for pod in pods:
            vm = pod.removeprefix("virt-launcher-")
            if self.pods.get(vm) != node:
                continue
            still = self.nodes[node]
            if still.powered and node in self.running[vm]:
                self.fail(
                    f"{vm} reset while it still runs on {node} (agent {still.agent}, broker "
                    f"link {still.broker_link}, api link {still.api_link})"
                )
            self.resets += 1
            self.log(f"controller force-deletes the pod of {vm} on {node}")
            del self.pods[vm]
            self._reschedule_later(vm)
        self.mark(node)

    def _reschedule_later(self, vm: str) -> None:
        self.at(self.t + self.rng.uniform(1.0, 3.0), lambda: self._reschedule(vm))

    def _reschedule(self, vm: str) -> None:
        """KubeVirt: a new launcher pod on a powered, Ready, untainted node; the VM runs."""
        if vm in self.pods:
            return
        # The scheduler binds the pod to a Ready, untainted node; it runs there only if that
        # node's kubelet sees the binding (it reaches the API server).
        ready = [
            n.name
            for n in self.nodes.values()
            if n.powered
            and n.kubelet
            and n.api_link
            and self.api_up
            and n.name not in self.taints
            and self._ready(n) == "True"
        ]
        if not ready:
            self.at(self.t + 2.0, lambda: self._reschedule(vm))
            return
        target = self.rng.choice(sorted(ready))
        self.pods[vm] = target
        self.mark(target)
        self._vm_starts(vm, target)

    def _vm_starts(self, vm: str, node: str) -> None:
        others = self.running[vm] - {node}
        if others:
            self.fail(f"split-brain: {vm} starts on {node}, runs on {others}")
        self.running[vm].add(node)
        self.log(f"{vm} runs on {node}")

    # --- machines -------------------------------------------------------------------------------

    def _ready(self, node: Node) -> str:
        if node.lease_at is None or self.t - node.lease_at >= READY_GRACE_S:
            return "Unknown"
        return "True"

    def _boot(self, node: Node, delay: float) -> None:
        """The machine starts: kubelet renews, the agent starts (not armed until contact)."""
        node.powered = True
        node.agent = "running"
        node.contact = BootContact()
        node.declared_phase = node.declared_since = None
        node.last_pet = None
        node.guard_at = None
        node.fencing = False
        node.started_at = self.t + delay
        boot = node.boot
        self.at(self.t + delay, lambda: self._renew(node, boot))
        self.at(self.t + delay, lambda: self._agent_tick(node, boot))
        self.at(self.t + delay + 0.3, lambda: self._api_read(node, boot))

    def power_off(self, node: Node, why: str) -> None:
        if not node.powered:
            return
        self.log(f"{node.name} powers off ({why})")
        node.powered = False
        node.boot += 1  # what runs after this is another boot
        for vm, where in self.running.items():
            if node.name in where:
                where.discard(node.name)
                self.log(f"{vm} stops with {node.name}")

    def power_on(self, node: Node) -> None:
        if node.powered:
            return
        self.log(f"{node.name} boots")
        self.at(self.t + self.rng.uniform(*BOOT_S), lambda: self._booted(node))

    def _booted(self, node: Node) -> None:
        if node.powered:
            return
        self._boot(node, 0.0)

    def reboot(self, node: Node, why: str) -> None:
        self.power_off(node, why)
        self.power_on(node)

    def _renew(self, node: Node, boot: int) -> None:
        if node.boot != boot or not node.powered:
            return
        if node.kubelet and node.api_link and self.api_up:
            node.lease_at = self.t
            self.mark(node.name)
            # Its kubelet reports the pods whose VMs do not run here (a reboot ended them):
            # KubeVirt starts those VMs again (anywhere).
            for vm, where in list(self.pods.items()):
                if where == node.name and node.name not in self.running[vm]:
                    del self.pods[vm]
                    self._reschedule_later(vm)
            self.at(self.t + READY_GRACE_S, lambda: self.mark(node.name))  # Ready may go Unknown
        jitter = self.rng.uniform(-1.0, 1.0)
        self.at(self.t + LEASE_RENEW_S + jitter, lambda: self._renew(node, boot))

    # --- the agent (heartbeat/agent.py, its fence rule the real one) ---------------------------

    def _agent_alive(self, node: Node, boot: int) -> bool:
        return node.boot == boot and node.powered and node.agent == "running"

    def _agent_tick(self, node: Node, boot: int) -> None:
        """One heartbeat interval: publish, prove contact by the echo, pet, fence if due."""
        if node.boot != boot or not node.powered:
            return
        self.at(self.t + self.cfg.heartbeat_interval_s, lambda: self._agent_tick(node, boot))
        self._device_check(node)
        if node.agent != "running" or node.fencing or not node.powered:
            return
        sent = self.t
        if self.broker_up and node.broker_link:
            delay = self.rng.uniform(0.01, 0.3)
            self.at(sent + delay, lambda: self._deliver(node, boot, sent))
            # The echo comes back the same way: contact as of the send.
            self.at(sent + 2 * delay, lambda: self._echo(node, boot, sent))
        self._fence_guard(node)

    def _deliver(self, node: Node, boot: int, sent: float) -> None:
        if not (self.broker_up and node.broker_link) or node.boot != boot:
            return
        armed = node.contact.first is not None
        age = None if node.contact.last is None else max(0.0, sent - node.contact.last)
        hb = Heartbeat(
            node.name,
            node.boot_id,
            self._seq_of(node, sent),
            sent,
            "1",
            self.declaration if armed else FenceDeclaration(False, AFTER_S, BOUND_S),
            contact_age_s=None if age is None else round(age + 0.005, 2),
        )
        try:
            self.book.accept(hb, self.t)
        except HeartbeatRejected as e:
            self.log(f"heartbeat of {node.name} refused: {e}")
            return
        gap = self.t - node.heard_at if node.heard_at is not None else float("inf")
        node.gaps = [g for g in node.gaps if g[0] > self.t - AFTER_S] + [(self.t, gap)]
        node.heard_at = self.t
        if self.controller.heartbeat_needs_evaluation(node.name):
            self.mark(node.name)

    def _seq_of(self, node: Node, sent: float) -> int:
        """As heartbeat/agent.py makes it: the monotonic clock in ms, so a restarted agent of
        the same boot goes on where its predecessor stopped (or, without that fix, a count
        from 0 per process)."""
        if self.variant.restart_continuity:
            return int(sent * 1000)
        return int((sent - node.started_at) * 1000)

    def _echo(self, node: Node, boot: int, sent: float) -> None:
        if self._agent_alive(node, boot) and self.broker_up and node.broker_link:
            self._contact(node, sent)

    def _contact(self, node: Node, at: float) -> None:
        if node.contact.first is None:
            self.log(f"{node.name}: first contact in this boot (armed)")
            if self.variant.watchdog_device:
                node.last_pet = self.t  # the device is armed and petted from now on
        node.contact = node.contact.seen(at)

    def _api_read(self, node: Node, boot: int) -> None:
        """The agent reads its Node (a quorum read): a declaration, or contact."""
        if node.boot != boot or not node.powered:
            return
        fresh = node.contact.last is not None and self.t - node.contact.last < 2.0
        interval = max(API_INTERVAL_S, AFTER_S / 2) if fresh else API_INTERVAL_S
        self.at(self.t + interval, lambda: self._api_read(node, boot))
        if node.agent != "running" or node.fencing or not (self.api_up and node.api_link):
            return
        started = self.t
        annotation = self.annotations.get(node.name)
        phase = json.loads(annotation)["phase"] if annotation else "Healthy"
        if declared_down(phase):
            if node.declared_phase is None:
                node.declared_since = started
                self.log(f"{node.name}: the API says {phase}")
            node.declared_phase = phase
        else:
            node.declared_phase = node.declared_since = None
            self._contact(node, started)
        self._fence_guard(node)

    def _fence_guard(self, node: Node) -> None:
        if node.agent != "running" or node.fencing or node.contact.first is None:
            return
        deadline = fence_at(node.contact.deadline(AFTER_S), None, None)
        call = fence_call(
            self.t,
            deadline,
            declared_phase=node.declared_phase,
            declared_since=node.declared_since,
            grace_s=self.grace_s,
            lease_deadline=None,
            last_contact=node.contact.last,
            after_s=AFTER_S,
        )
        if deadline is not None and self.t < deadline and node.last_pet is not None:
            node.last_pet = self.t  # petted only until the deadline
        if call.reason is None:
            if call.wake_at is not None and call.wake_at != node.guard_at:
                # One look pending per agent, at its latest deadline (as the guard's sleep).
                node.guard_at = at = call.wake_at
                boot = node.boot
                self.at(at, lambda: self._fence_guard_if(node, boot, at))
            return
        self._check_not_heard(node, f"its agent fences: {call.reason}")
        node.fencing = True
        self.log(f"{node.name}: agent fences ({call.reason})")
        if node.fence_fails:
            self.log(f"{node.name}: the fence command fails; the device will fire")
            return
        boot = node.boot
        self.at(self.t + self.rng.uniform(0.1, BOUND_S), lambda: self._fenced(node, boot))

    def _fence_guard_if(self, node: Node, boot: int, at: float) -> None:
        if node.guard_at != at:
            return  # superseded by a later deadline
        node.guard_at = None
        if self._agent_alive(node, boot):
            self._fence_guard(node)

    def _fenced(self, node: Node, boot: int) -> None:
        if node.boot == boot and node.powered:
            self.reboot(node, "fence command")

    def _device_check(self, node: Node) -> None:
        """The device fires `watchdog_s` after the last pet (armed once contact was proven)."""
        if node.last_pet is None or not node.powered:
            return
        if self.t >= node.last_pet + WATCHDOG_S:
            if node.agent == "running" and not node.fencing:
                self._check_not_heard(node, "its watchdog device fires")
            self.reboot(node, "watchdog device")

    def _check_not_heard(self, node: Node, what: str) -> None:
        """A node the controller never had reason to suspect (heard all along, no gap of
        `suspect_after_s` over the agent's last `AFTER_S`) is not fenced by its own agent."""
        if node.agent != "running" or node.declared_phase is not None or node.heard_at is None:
            return
        recent = self.t - node.heard_at <= 2 * self.cfg.heartbeat_interval_s
        span = [g for g in node.gaps if g[0] > self.t - AFTER_S]
        never_silent = (
            bool(span)
            and span[0][0] - (self.t - AFTER_S) < self.cfg.suspect_after_s
            and all(gap < self.cfg.suspect_after_s for _, gap in span)
        )
        if recent and never_silent:
            self.fail(
                f"{node.name} is fenced ({what}) while its agent runs and the controller "
                f"heard it all along (last {self.t - node.heard_at:.2f}s ago)"
            )

    # --- liveness -------------------------------------------------------------------------------

    def check_everything_runs(self) -> None:
        down = sorted(vm for vm, where in self.running.items() if not where)
        if down:
            phases = {n: json.loads(a)["phase"] for n, a in self.annotations.items()}
            self.fail(
                f"after every fault healed, {down} run nowhere "
                f"(phases {phases}, holds {self.controller.holds(now=self.t)})"
            )


class _View:
    """The controller's view of the modelled API server (its caches, always up to date)."""

    def __init__(self, world: World) -> None:
        self.w = world

    def node_names(self) -> Iterable[str]:
        return self.w.nodes.keys()

    def node_ready(self, node: str) -> str | None:
        return self.w._ready(self.w.nodes[node])

    def node_annotation(self, node: str, key: str) -> str | None:
        return self.w.annotations.get(node) if key == STATE_ANNOTATION else None

    def node_has_taint(self, node: str, key: str, effect: str) -> bool:
        return node in self.w.taints

    def node_version(self, node: str) -> str | None:
        return str(self.w.versions[node])

    def lease_renewed_at(self, node: str) -> tuple[bool, float | None]:
        at = self.w.nodes[node].lease_at
        return (at is not None, at)

    def launcher_pods(self, node: str) -> tuple[LauncherPod, ...]:
        ready = self.w._ready(self.w.nodes[node]) == "True"
        return tuple(
            LauncherPod(NS, f"virt-launcher-{vm}", vm, ready)
            for vm, where in sorted(self.w.pods.items())
            if where == node
        )

    def vm_run_strategy(self, namespace: str, vm: str) -> tuple[str | None, bool | None]:
        return ("Always", True)

    def vmi_location(self, namespace: str, name: str) -> tuple[str | None, str | None]:
        return (self.w.pods.get(name), "Running")

    def harvester_policy(self) -> tuple[bool, str | None, str | None]:
        return (False, None, None)

    def upgrade_running(self) -> bool:
        return False

    def node_maintenance(self, node: str) -> tuple[bool, str | None, int]:
        return (False, None, 0)


def _finish(pending: Awaitable[float | None]) -> float | None:
    """Runs a controller action plan to its end: the modelled executor never waits, so the
    coroutine finishes at its first step (a suspension would be a modelling bug)."""
    coro: Any = pending
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("an action plan waited on something in the simulation")
