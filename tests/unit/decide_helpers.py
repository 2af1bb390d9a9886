"""Builders and a virtual-time driver for the tests of the pure decision core.

`Sim` plays one node and the controller around `decide` on virtual time, the way the runtime is
meant to call it: the node is evaluated when something the controller observes about it changes,
or when the last decision's `wake_at` is reached, and nowhere else. So a decision that forgets
to ask for a wake-up shows up as a node that never moves on. Actions are applied to the simulated
cluster (taints, pod deletes, the state annotation) while its API is reachable; writes issued
while it is not are retried when it returns, as `actuate` does.

Nothing here decides anything: the tests compare what `decide` did with what the Sim recorded
independently (when heartbeats really stopped, when the annotation became visible, ...).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from watchdog.decide.actions import (
    Action,
    EmitEvent,
    ForceDeletePods,
    MarkPodsNotReady,
    PersistState,
    RemoveOutOfServiceTaint,
    RunFenceHook,
    TaintOutOfService,
)
from watchdog.decide.config import DecideConfig, Policy
from watchdog.decide.holds import cluster_holds
from watchdog.decide.machine import Context, Decision, decide
from watchdog.decide.observations import (
    FenceDeclaration,
    LauncherPod,
    NodeObservation,
    SourceHealth,
)
from watchdog.decide.reasons import Reason
from watchdog.decide.state import NodeState, Phase

NODE = "node-a"
T = 1000.0  # "now" of single-step tests, on the controller's monotonic clock

# An agent that fences itself 10 s after losing broker and API, within 5 s.
ARMED = FenceDeclaration(armed=True, after_s=10.0, bound_s=5.0, device=True, watchdog_s=5.0)
UNARMED = FenceDeclaration(armed=False, after_s=10.0, bound_s=5.0)

UP = SourceHealth(broker_up_since=0.0, api_up_since=0.0)
BROKER_DOWN = SourceHealth(broker_up_since=None, api_up_since=0.0)
API_DOWN = SourceHealth(broker_up_since=0.0, api_up_since=None)

DESTRUCTIVE = (TaintOutOfService, ForceDeletePods)


# --- single-step builders -----------------------------------------------------------------------


def pods(*names: str, ready: bool = True, terminating: bool = False) -> tuple[LauncherPod, ...]:
    return tuple(
        LauncherPod("vms", f"virt-launcher-{n}", n, ready=ready, terminating=terminating)
        for n in names
    )


def seen(
    hb_age: float | None = 0.5,
    *,
    lease_age: float | None = 1.0,
    ready: str | None = "True",
    peers_unreachable: bool | None = None,
    offline: bool = False,
    received: int = 100,
    boot_id: str | None = "boot-1",
    fence: FenceDeclaration | None = ARMED,
    launcher_pods: Iterable[LauncherPod] = (),
    persisted: str | None = None,
    out_of_service_tainted: bool = False,
    external_fence_confirmed: bool = False,
    cordoned: bool = False,
    maintain_status: str | None = None,
    vmis_here: int = 0,
    now: float = T,
) -> NodeObservation:
    """What the controller observes about NODE at `now`, with ages instead of timestamps."""
    return NodeObservation(
        name=NODE,
        last_heartbeat_at=None if hb_age is None else now - hb_age,
        heartbeats_received=received,
        boot_id=boot_id,
        fence=fence,
        agent_offline=offline,
        lease_seen=lease_age is not None,
        lease_renewed_at=None if lease_age is None else now - lease_age,
        ready=ready,
        peers_unreachable=peers_unreachable,
        out_of_service_tainted=out_of_service_tainted,
        launcher_pods=tuple(launcher_pods),
        external_fence_confirmed=external_fence_confirmed,
        persisted_phase=persisted,
        cordoned=cordoned,
        maintain_status=maintain_status,
        vmis_here=vmis_here,
    )


def node(phase: Phase = Phase.HEALTHY, **changes: object) -> NodeState:
    """A NodeState of NODE in `phase`; down phases default to a plausible history."""
    base = NodeState(name=NODE, phase=phase, entered_at=T - 1.0, boot_id="boot-1", fence=ARMED)
    if phase in (Phase.SUSPECT, Phase.FENCING, Phase.UNREACHABLE, Phase.RESET):
        base = replace(base, heartbeats_at_mark=100, last_contact_at=T - 40.0)
    if phase in (Phase.FENCING, Phase.UNREACHABLE, Phase.RESETTING, Phase.RESET):
        base = replace(base, unreachable_at=T - 30.0)
    if phase in (Phase.RESETTING, Phase.RESET):
        base = replace(base, tainted=True, fence_clock_from=T - 30.0)
    return replace(base, **changes)  # type: ignore[arg-type]


def context(
    health: SourceHealth = UP, policy: Policy | None = None, holds: tuple[Reason, ...] = ()
) -> Context:
    return Context(health=health, policy=policy or Policy(period_s=15.0), holds=holds)


def step(
    state: NodeState,
    obs: NodeObservation,
    *,
    cfg: DecideConfig | None = None,
    ctx: Context | None = None,
    now: float = T,
) -> Decision:
    return decide(state, obs, ctx or context(), now, cfg or DecideConfig())


# --- reading decisions --------------------------------------------------------------------------


def actions_of(d: Decision, kind: type) -> list[Action]:
    return [a for a in d.actions if isinstance(a, kind)]


def events(d: Decision) -> list[tuple[str, Reason]]:
    return [(a.event, a.reason) for a in d.actions if isinstance(a, EmitEvent)]


def starts_reset(d: Decision) -> bool:
    """The step in which the watchdog commits to resetting the node's VMs."""
    return any(to is Phase.RESETTING for _, to, _ in d.transitions)


def is_destructive(d: Decision) -> bool:
    return any(isinstance(a, DESTRUCTIVE) for a in d.actions)


def self_safe_delay(declared: FenceDeclaration, cfg: DecideConfig) -> float:
    """DESIGN §5 restated independently of safety.py: after + bound + one interval + margin."""
    return declared.after_s + declared.bound_s + cfg.heartbeat_interval_s + cfg.fence_margin_s


# --- the virtual-time driver --------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    """One call of `decide` made by the Sim, with everything it was given."""

    now: float
    state: NodeState
    obs: NodeObservation
    ctx: Context
    decision: Decision
    # ground truth at that instant, recorded by the Sim, not by decide
    truly_heartbeating: bool  # the agent's heartbeats reach this controller right now
    agent_last_contact: float | None  # the agent last reached the broker (seen by us or not)
    declared_at_agent_contact: FenceDeclaration | None  # what it declared then
    last_declaration_seen: FenceDeclaration | None  # the last declaration any leader received
    admin_taint: bool


@dataclass
class Sim:
    """One node, its agent and kubelet, and the controller's connections, on virtual time."""

    cfg: DecideConfig = field(default_factory=DecideConfig)
    policy: Policy = field(default_factory=lambda: Policy(period_s=15.0))
    name: str = NODE
    now: float = 100.0
    # --- the node (ground truth) ---
    agent_sending: bool = True  # the agent publishes heartbeats that reach the broker
    agent_offline: bool = False  # the broker delivered the agent's Last Will / "offline"
    kubelet_renewing: bool = True
    ready: str | None = "True"
    peers_unreachable: bool | None = None
    boot_id: str = "boot-1"
    fence: FenceDeclaration | None = ARMED
    launcher_pods: list[LauncherPod] = field(default_factory=lambda: list(pods("vm1", "vm2")))
    admin_taint: bool = False
    hook_confirms: bool = True  # the external fence hook succeeds when run
    hook_failures: int = 0  # ... after failing this many times first
    hook_runs: int = 0
    deletes_fail: bool = False  # pod deletes are rejected (webhook, finalizer, API errors)
    external_fence_confirmed: bool = False
    # node-lifecycle controller: Ready becomes Unknown this long after the lease stops
    node_monitor_grace_s: float | None = 40.0
    # --- the cluster around it ---
    other_nodes: int = 9
    other_down: int = 0
    upgrade_running: bool = False
    # --- the controller's connections and what it has seen ---
    broker_up_since: float | None = 0.0
    api_up_since: float | None = 0.0
    last_heartbeat_at: float | None = None
    heartbeats_received: int = 0
    lease_renewed_at: float | None = None
    annotation: str | None = None
    pending_writes: list[Action] = field(default_factory=list)  # issued while the API was down
    our_taint: bool = False
    seen_boot_id: str | None = None  # boot id and fence declaration of the last heartbeat seen
    seen_fence: FenceDeclaration | None = None
    # --- bookkeeping ---
    state: NodeState | None = None
    wake: float | None = None
    log: list[Evaluation] = field(default_factory=list)
    next_tick: float | None = None
    kubelet_stopped_at: float | None = None
    last_received_at: float | None = None  # by any leader, unlike last_heartbeat_at
    agent_last_contact: float | None = None
    declared_at_agent_contact: FenceDeclaration | None = None
    last_declaration_seen: FenceDeclaration | None = None
    failovers: list[int] = field(default_factory=list)  # log index of each new leader's start
    _annotation_phase: tuple[str | None, str | None] = (None, None)
    _context: tuple[tuple[object, ...], Context] | None = None
    _last_inputs: tuple[NodeObservation, Context] | None = None

    def __post_init__(self) -> None:
        if self.state is None:
            self.state = NodeState(name=self.name, entered_at=self.now)
        if self.next_tick is None:
            self.next_tick = self.now
        self._world_tick()
        self.next_tick = self.now + self.cfg.heartbeat_interval_s
        self.settle()

    # --- what the controller sees ---

    def observation(self) -> NodeObservation:
        if self._annotation_phase[0] != self.annotation:
            phase = json.loads(self.annotation)["phase"] if self.annotation else None
            self._annotation_phase = (self.annotation, phase)
        phase = self._annotation_phase[1]
        return NodeObservation(
            name=self.name,
            last_heartbeat_at=self.last_heartbeat_at,
            heartbeats_received=self.heartbeats_received,
            boot_id=self.seen_boot_id,
            fence=self.seen_fence,
            agent_offline=self.agent_offline,
            lease_seen=self.lease_renewed_at is not None,
            lease_renewed_at=self.lease_renewed_at,
            ready=self.ready,
            peers_unreachable=self.peers_unreachable,
            out_of_service_tainted=self.our_taint or self.admin_taint,
            launcher_pods=tuple(self.launcher_pods),
            external_fence_confirmed=self.external_fence_confirmed,
            persisted_phase=phase,
        )

    def phases(self) -> list[Phase]:
        assert self.state is not None
        down = [Phase.FENCING] * self.other_down
        up = [Phase.HEALTHY] * (self.other_nodes - self.other_down)
        return [self.state.phase, *down, *up]

    def context(self) -> Context:
        assert self.state is not None
        key = (
            self.state.phase,
            self.other_down,
            self.other_nodes,
            self.broker_up_since,
            self.api_up_since,
            self.policy,
            self.upgrade_running,
        )
        if self._context is not None and self._context[0] == key:
            return self._context[1]
        health = SourceHealth(self.broker_up_since, self.api_up_since)
        holds = cluster_holds(
            self.phases(),
            self.other_nodes + 1,
            health,
            self.policy,
            self.cfg,
            upgrade_running=self.upgrade_running,
        )
        ctx = Context(health=health, policy=self.policy, holds=holds)
        self._context = (key, ctx)
        return ctx

    @property
    def phase(self) -> Phase:
        assert self.state is not None
        return self.state.phase

    # --- the world moving on ---

    def _world_tick(self) -> None:
        if self.agent_sending:
            # the agent reaches the broker whether or not our own connection to it is up
            self.agent_last_contact = self.now
            self.declared_at_agent_contact = self.fence
        if self.agent_sending and self.broker_up_since is not None:
            self.last_heartbeat_at = self.now
            self.heartbeats_received += 1
            self.seen_boot_id = self.boot_id
            self.seen_fence = self.fence
            self.last_received_at = self.now
            self.last_declaration_seen = self.fence
        if self.kubelet_renewing:
            self.kubelet_stopped_at = None
            if self.api_up_since is not None:
                self.lease_renewed_at = self.now
                if self.ready == "Unknown":
                    self.ready = "True"  # the kubelet posts its status again
        elif self.kubelet_stopped_at is None:
            self.kubelet_stopped_at = self.now
        self._api_view()

    def _api_view(self) -> None:
        """What a working API connection shows: Ready as the node-lifecycle controller set it,
        and the state annotation once our write went through."""
        if self.api_up_since is None:
            return
        if (
            self.node_monitor_grace_s is not None
            and self.kubelet_stopped_at is not None
            and self.now - self.kubelet_stopped_at >= self.node_monitor_grace_s
        ):
            self.ready = "Unknown"
        pending, self.pending_writes = self.pending_writes, []
        for a in pending:
            self._write(a)

    def advance(self, seconds: float) -> None:
        """Let `seconds` of virtual time pass: heartbeats, renewals and wake-ups in order."""
        end = self.now + seconds
        self.settle()  # news from the scenario itself (a source back, an admin's taint, ...)
        while True:
            self._skip_quiet_ticks(end)
            assert self.next_tick is not None
            t = self.next_tick
            if self.wake is not None and self.wake < t:
                t = self.wake
            if t > end:
                break
            self.now = t
            if t >= self.next_tick:
                self._world_tick()
                self.next_tick += self.cfg.heartbeat_interval_s
            self.settle()
        self.now = end

    def _skip_quiet_ticks(self, end: float) -> None:
        """A silent node (agent and kubelet both stopped) changes nothing the controller sees
        but Ready going Unknown: skip the ticks in between (wake-ups are still honoured)."""
        if self.agent_sending or self.kubelet_renewing or self.kubelet_stopped_at is None:
            return
        assert self.next_tick is not None
        horizon = end
        if (
            self.node_monitor_grace_s is not None
            and self.ready != "Unknown"
            and self.api_up_since is not None
        ):
            horizon = min(horizon, self.kubelet_stopped_at + self.node_monitor_grace_s)
        if self.next_tick < horizon:
            interval = self.cfg.heartbeat_interval_s
            self.next_tick += math.floor((horizon - self.next_tick) / interval) * interval

    def settle(self) -> None:
        """Evaluate while there is news (or a due wake-up), as the runtime's worker would."""
        for _ in range(8):
            obs, ctx = self.observation(), self.context()
            due = self.wake is not None and self.wake <= self.now
            if not due and (obs, ctx) == self._last_inputs:
                return
            self.evaluate(obs, ctx)
        raise AssertionError("decide keeps producing news at one instant")  # pragma: no cover

    def evaluate(self, obs: NodeObservation, ctx: Context) -> Decision:
        assert self.state is not None
        d = decide(self.state, obs, ctx, self.now, self.cfg)
        self.log.append(
            Evaluation(
                now=self.now,
                state=self.state,
                obs=obs,
                ctx=ctx,
                decision=d,
                truly_heartbeating=self.truly_heartbeating(),
                agent_last_contact=self.agent_last_contact,
                declared_at_agent_contact=self.declared_at_agent_contact,
                last_declaration_seen=self.last_declaration_seen,
                admin_taint=self.admin_taint,
            )
        )
        self._last_inputs = (obs, ctx)
        self.state = d.state
        self.wake = d.wake_at
        self.apply(d.actions)
        return d

    def truly_heartbeating(self) -> bool:
        """The agent's heartbeats are reaching the controller right now (ground truth)."""
        return (
            self.broker_up_since is not None
            and not self.agent_offline
            and self.last_received_at is not None
            and self.now - self.last_received_at < self.cfg.suspect_after_s
        )

    def apply(self, actions: Iterable[Action]) -> None:
        for a in actions:
            if isinstance(a, RunFenceHook):
                self.hook_runs += 1
                if self.hook_failures > 0:
                    self.hook_failures -= 1
                else:
                    self.external_fence_confirmed |= self.hook_confirms
            elif self.api_up_since is None:
                self.pending_writes.append(a)  # actuate retries once the API is back
            else:
                self._write(a)

    def _write(self, a: Action) -> None:
        if isinstance(a, PersistState):
            self.annotation = a.annotation
        elif isinstance(a, TaintOutOfService):
            self.our_taint = True
        elif isinstance(a, RemoveOutOfServiceTaint):
            self.our_taint = False
            self.admin_taint = False
        elif isinstance(a, ForceDeletePods) and not self.deletes_fail:
            gone = set(a.pods)
            self.launcher_pods = [
                p for p in self.launcher_pods if (p.namespace, p.name) not in gone
            ]
        elif isinstance(a, MarkPodsNotReady):
            marked = set(a.pods)
            self.launcher_pods = [
                replace(p, ready=False) if (p.namespace, p.name) in marked else p
                for p in self.launcher_pods
            ]

    # --- scenario verbs ---

    def node_dies(self, will: bool = False) -> None:
        """Power loss: agent and kubelet stop; the broker may deliver the Last Will."""
        self.agent_sending = False
        self.kubelet_renewing = False
        self.agent_offline = will

    def node_boots(self, new_boot_id: str = "boot-2") -> None:
        self.boot_id = new_boot_id
        self.agent_sending = True
        self.agent_offline = False
        self.kubelet_renewing = True
        self.kubelet_stopped_at = None
        self.ready = "True"

    def broker_down(self) -> None:
        self.broker_up_since = None

    def broker_up(self) -> None:
        self.broker_up_since = self.now

    def api_down(self) -> None:
        self.api_up_since = None

    def api_up(self) -> None:
        self.api_up_since = self.now
        self._api_view()  # the relist after reconnecting shows the cluster as it is now

    def failover(self) -> None:
        """A new leader: it resumes from the annotation and starts its own clocks and caches."""
        self.state = NodeState.from_annotation(self.name, self.annotation, self.now)
        self.failovers.append(len(self.log))
        self.last_heartbeat_at = None
        self.heartbeats_received = 0
        # its first list stamps the Lease as seen now (ages on its own clock only)
        self.lease_renewed_at = self.now if self.lease_renewed_at is not None else None
        self.seen_boot_id = None
        self.seen_fence = None
        self.external_fence_confirmed = False  # the old leader's memory of its hook runs
        self.wake = None
        self._last_inputs = None
        if self.broker_up_since is not None:
            self.broker_up_since = self.now
        if self.api_up_since is not None:
            self.api_up_since = self.now

    # --- reading the history ---

    def decisions(self) -> list[Decision]:
        return [e.decision for e in self.log]

    def transitions(self) -> list[tuple[float, Phase, Phase, Reason]]:
        return [(e.now, f, t, r) for e in self.log for f, t, r in e.decision.transitions]

    def first(self, to: Phase) -> float | None:
        return next((t for t, _, p, _ in self.transitions() if p is to), None)

    def reset_times(self) -> list[float]:
        return [e.now for e in self.log if starts_reset(e.decision)]

    def events(self, name: str) -> list[tuple[float, Reason]]:
        return [
            (e.now, a.reason)
            for e in self.log
            for a in e.decision.actions
            if isinstance(a, EmitEvent) and a.event == name
        ]

    def run_until(self, phase: Phase, limit_s: float = 600.0, step_s: float = 1.0) -> float:
        """Advance until the node enters `phase` (or is in it already); the time it did."""
        start = len(self.log)
        deadline = self.now + limit_s

        def entered() -> float | None:
            return next(
                (
                    e.now
                    for e in self.log[start:]
                    for _, to, _ in e.decision.transitions
                    if to is phase
                ),
                None,
            )

        while self.phase is not phase and entered() is None:
            if self.now >= deadline:
                raise AssertionError(f"still {self.phase} after {limit_s}s, wanted {phase}")
            self.advance(step_s)
        t = entered()
        return self.last_entered(phase) if t is None else t

    def last_entered(self, phase: Phase) -> float:
        return next(t for t, _, p, _ in reversed(self.transitions()) if p is phase)
