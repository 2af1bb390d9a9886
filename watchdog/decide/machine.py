"""The per-node state machine (DESIGN §4): `(state, observation, context, now) → Decision`.

Pure: same inputs, same outputs. The caller evaluates a node when something about it changed
or when the returned `wake_at` is reached; nothing here sleeps or reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, assert_never

from watchdog.decide.actions import (
    Action,
    DeleteVolumeAttachments,
    EmitEvent,
    EventType,
    ForceDeletePods,
    MarkPodsNotReady,
    PersistState,
    RemoveOutOfServiceTaint,
    RunFenceHook,
    StartEvacuation,
    StopEvacuation,
    TaintOutOfService,
)
from watchdog.decide.config import (
    DecideConfig,
    FenceMode,
    Policy,
    runs_fence_hook,
    self_fence_counts,
)
from watchdog.decide.falsely_ready import falsely_ready
from watchdog.decide.maintenance import in_maintenance, maintenance_note
from watchdog.decide.observations import FenceDeclaration, NodeObservation, SourceHealth
from watchdog.decide.quiet import Quiet
from watchdog.decide.reasons import Reason
from watchdog.decide.safety import fence_accepted, reset_not_before
from watchdog.decide.signals import (
    Signal,
    Signals,
    heartbeat_signal,
    heartbeat_watch_since,
    signals_of,
)
from watchdog.decide.state import DOWN_PHASES, NodeState, Phase
from watchdog.decide.transitions import check

# While pods are being force-deleted, look again this often (deletes are idempotent).
RESET_RETRY_S = 2.0
# A write the Node does not show this long after the decision that made it is written again
# (a failed or lost write; the watch normally shows ours within a second).
RECONCILE_AFTER_S = 2.0
# A withdrawn declaration still shown is written again sooner: the agent's grace is short.
WITHDRAW_RETRY_S = 0.5
# Fence mode `external`: a hook that has not confirmed is run again after this, doubling up to
# the maximum (a BMC that is busy or rebooting answers later; one that is gone never does).
HOOK_RETRY_S = 2.0
HOOK_RETRY_MAX_S = 30.0


@dataclass(frozen=True, slots=True)
class Context:
    """What the whole cluster contributes to one node's decision."""

    health: SourceHealth
    policy: Policy
    holds: tuple[Reason, ...] = ()
    # The latest moment a blind hold (holds.py, BLIND_HOLDS) was in force, or when one was
    # first seen over (the controller's clock); None: never.
    blind_until: float | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    state: NodeState
    actions: tuple[Action, ...] = ()
    wake_at: float | None = None
    signals: Signals | None = None
    # Every phase change of this step, in order: (from, to, reason).
    transitions: tuple[tuple[Phase, Phase, Reason], ...] = field(default=())
    # A node being fenced whose reset waits only for time (fencing proven or proven by time
    # alone, no hold in force): when its VMs will be reset. None while a hold or a missing
    # proof means no time can be promised.
    reset_not_before: float | None = None
    # A HEALTHY node whose decision changed nothing and waits only for time: what it waited
    # for, so its wake-up can be moved on by newer heartbeats without deciding (quiet.py).
    quiet: Quiet | None = None


def decide(
    state: NodeState,
    obs: NodeObservation,
    ctx: Context,
    now: float,
    cfg: DecideConfig,
) -> Decision:
    """Decide one node: new state, actions as data, and when to look again."""
    sig = signals_of(obs, ctx.health, now, cfg)
    step = _Step(state, obs, ctx, now, cfg, sig)
    match state.phase:
        case Phase.HEALTHY:
            step.while_healthy()
        case Phase.SUSPECT:
            step.while_suspect()
        case Phase.DEGRADED:
            step.while_degraded()
        case Phase.UNREACHABLE | Phase.FENCING:
            step.while_fencing()
        case Phase.RESETTING:
            step.while_resetting()
        case Phase.RESET:
            step.while_reset()
        case Phase.RECOVERING:
            step.while_recovering()
        case Phase.MAINTENANCE:
            step.while_maintenance()
        case _ as unreachable:
            assert_never(unreachable)
    return step.result()


class _Step:
    """One evaluation; accumulates actions and the earliest wake-up, then yields a Decision."""

    def __init__(
        self,
        state: NodeState,
        obs: NodeObservation,
        ctx: Context,
        now: float,
        cfg: DecideConfig,
        sig: Signals,
    ) -> None:
        self.start = state
        self.state = state
        self.obs = obs
        self.ctx = ctx
        self.now = now
        self.cfg = cfg
        self.sig = sig
        self.actions: list[Action] = []
        self.wake: float | None = None
        self.other_wake: float | None = None  # the earliest not asked for by the heartbeat
        self.transitions: list[tuple[Phase, Phase, Reason]] = []
        self.reset_at: float | None = None

    # --- helpers -------------------------------------------------------------------------------

    def result(self) -> Decision:
        if (
            self.transitions
            or self.state.fence_confirmed != self.start.fence_confirmed
            or self.state.power_contradicted != self.start.power_contradicted
        ):
            persist = PersistState(self.obs.name, self.state.to_annotation())
            if self.start.phase in DOWN_PHASES and self.state.phase not in DOWN_PHASES:
                # A withdrawal goes first: an Event ahead of it may wait out a Retry-After
                # while the node's agent counts down its grace.
                self.actions.insert(0, persist)
            else:
                self.actions.append(persist)
        else:
            self.reconcile()
        return Decision(
            state=self.state,
            actions=tuple(self.actions),
            wake_at=self.wake,
            signals=self.sig,
            transitions=tuple(self.transitions),
            reset_not_before=self.reset_at if self.state.phase is Phase.FENCING else None,
            quiet=self.quiet(),
        )

    def quiet(self) -> Quiet | None:
        """HEALTHY before and after, nothing done, the heartbeat ALIVE and the kubelet path not
        stale (nor waiting for an API answer to tell): the next decision can only differ by its
        heartbeat and the clock until one of its other inputs changes (quiet.py). The kubelet
        path as `while_healthy` reads it, not only its signals: a Ready=False seen before the
        API went down still moves a node that is then heard (`heard`) to DEGRADED."""
        sig, health = self.sig, self.ctx.health
        if (
            self.start.phase is not Phase.HEALTHY
            or self.state is not self.start
            or self.actions
            or sig.heartbeat is not Signal.ALIVE
            or self.kubelet_path_stale()
            or sig.lease_pending
            or health.broker_up_since is None
        ):
            return None
        return Quiet(
            heartbeat_watch_since(self.obs, health.broker_up_since),
            self.other_wake,
            health.broker_up_since,
            health.api_up_since,
        )

    def reconcile(self) -> None:
        """Re-issue what the Node should show but does not: the annotation of a down phase
        (the agent reads its declaration there, and the fence clock starts only once it is
        visible) and, while resetting, the out-of-service taint. Judged from what is
        observed, not from what was sent: a write that failed or was lost is written again.
        Not in dry-run, where nothing is ever written."""
        if self.cfg.dry_run:
            return
        if self.state.phase not in DOWN_PHASES:
            if self.obs.persisted_phase in DOWN_PHASES:
                # A withdrawal the Node does not show: its armed agent would fence on the old
                # declaration within its grace (a few seconds), so write it again soon.
                due = self.state.entered_at + WITHDRAW_RETRY_S
                if self.now < due:
                    self.wake_at(due)
                    return
                self.actions.insert(0, PersistState(self.obs.name, self.state.to_annotation()))
                self.wake_at(self.now + WITHDRAW_RETRY_S)
            return
        missing: list[Action] = []
        if self.obs.persisted_phase != self.state.phase.value:
            missing.append(PersistState(self.obs.name, self.state.to_annotation()))
        if (
            self.state.phase is Phase.RESETTING
            and self.state.tainted
            and not self.obs.out_of_service_tainted
        ):
            missing.append(TaintOutOfService(self.obs.name))
        if not missing:
            return
        due = self.state.entered_at + RECONCILE_AFTER_S
        if self.now < due:
            self.wake_at(due)
            return
        self.actions.extend(missing)
        self.wake_at(self.now + RECONCILE_AFTER_S)

    def wake_at(self, t: float | None, heartbeat: bool = False) -> None:
        if t is None or t <= self.now:
            return
        if self.wake is None or t < self.wake:
            self.wake = t
        if not heartbeat and (self.other_wake is None or t < self.other_wake):
            self.other_wake = t

    def event(self, event: str, reason: Reason, message: str, warning: bool = False) -> None:
        kind = EventType.WARNING if warning else EventType.NORMAL
        self.actions.append(EmitEvent(self.obs.name, event, reason, message, kind))

    def move(self, phase: Phase, reason: Reason, **changes: Any) -> None:
        """The only place a phase changes, and only along an edge of TRANSITIONS."""
        check(self.state.phase, phase, reason)
        self.transitions.append((self.state.phase, phase, reason))
        self.state = self.state.moved(phase, reason, self.now, **changes)

    def fresh_enough(self) -> bool:
        """Hysteresis: N heartbeats in a row since the node was marked, and still alive."""
        got = self.obs.heartbeats_received - self.state.heartbeats_at_mark
        return self.sig.heartbeat is Signal.ALIVE and got >= self.cfg.recovery_heartbeats

    def kubelet_path_stale(self) -> bool:
        """The kubelet lost its path to the API: its Lease is stale, or it says NotReady itself.

        Ready=Unknown does not count here: the node lifecycle controller writes it, and after
        a long API outage it writes it for every node at once although every kubelet is fine
        (reading that as DEGRADED would live-migrate VMs off healthy nodes). Our own Lease
        view, aged from the API's return, is the direct signal. Unknown still corroborates
        UNREACHABLE, where the heartbeat must be stale as well.
        """
        return self.sig.lease is Signal.STALE or self.obs.ready == "False"

    def corroboration(self) -> Reason | None:
        """A second, independent source says the node is gone, and none says it is alive.

        A Lease renewed after the agent went silent vetoes: that machine reaches the API
        server, so it runs (Ready lags, peers see only the network between nodes). A Lease
        merely not stale yet is no evidence either way: it was renewed before the silence.
        """
        if self.kubelet_alive_since_silence():
            return None
        if self.sig.lease is Signal.STALE:
            return Reason.CORROBORATED_LEASE
        if self.sig.ready is Signal.STALE:
            return Reason.CORROBORATED_READY
        if self.sig.peers is Signal.STALE:
            return Reason.CORROBORATED_PEERS
        return None

    def kubelet_alive_since_silence(self) -> bool:
        """The kubelet renewed its Lease after the agent's next heartbeat was due.

        A renewal seen within two heartbeat intervals of the last heartbeat proves nothing: a
        machine that renewed its Lease and lost power a moment later shows exactly that (its
        agent's next beat was due one interval later, and the Lease watch may deliver the
        renewal a little after the heartbeat it preceded). Treating it as life vetoed the peers'
        corroboration of one power-off in ten until the Lease went stale, 15 s later. A machine
        that really runs renews again within its renewal interval, well inside the safe delay.
        """
        renewed, last = self.obs.lease_renewed_at, self.obs.last_heartbeat_at
        # Never heard the agent (e.g. a new leader): a Lease first seen now proves nothing.
        return (
            self.sig.lease is Signal.ALIVE
            and renewed is not None
            and last is not None
            and renewed > last + 2 * self.cfg.heartbeat_interval_s
        )

    def heartbeat_wakeups(self) -> None:
        """Wake when a silent source would cross its next threshold."""
        if self.ctx.health.broker_up_since is not None:
            since = heartbeat_watch_since(self.obs, self.ctx.health.broker_up_since)
            ref = max(self.obs.last_heartbeat_at or 0.0, since)
            self.wake_at(ref + self.cfg.suspect_after_s, heartbeat=True)
            self.wake_at(ref + self.cfg.unreachable_after_s, heartbeat=True)
        self.lease_wakeup()

    def lease_wakeup(self) -> None:
        """Wake when the Lease would turn stale (once past it, while the API has not answered
        after it, the runtime decides the node again at the next answer: lease_pending)."""
        if self.ctx.health.api_up_since is not None and self.obs.lease_seen:
            ref = max(self.obs.lease_renewed_at or 0.0, self.ctx.health.api_up_since)
            self.wake_at(ref + self.cfg.lease_stale_after_s)

    def enter_suspect(self) -> None:
        reason = Reason.AGENT_OFFLINE if self.obs.agent_offline else Reason.HEARTBEAT_STALE
        last = self.obs.last_heartbeat_at
        self.move(
            Phase.SUSPECT,
            reason,
            last_contact_at=last,
            heartbeats_at_mark=self.obs.heartbeats_received,
            boot_id=self.obs.boot_id,
            fence=self.obs.fence,
        )
        age = self.sig.heartbeat_age_s or 0.0
        self.event("NodeSuspect", reason, f"no heartbeat for {age:.1f}s", warning=True)

    # --- phases --------------------------------------------------------------------------------

    def while_healthy(self) -> None:
        if self.sig.heartbeat is Signal.STALE:
            self.enter_suspect()
            self.while_suspect()
        elif self.sig.heartbeat is Signal.ALIVE and self.kubelet_path_stale() and self.heard():
            self.enter_degraded()
        else:
            self.heartbeat_wakeups()

    def heard(self) -> bool:
        """A heartbeat arrived since the broker connection came up: ALIVE is then a fact.

        Right after a reconnection every node is ALIVE for `suspect_after_s` by benefit of the
        doubt; that is enough to hold off a reset but not to start an evacuation.
        """
        up = self.ctx.health.broker_up_since
        last = self.obs.last_heartbeat_at
        return up is not None and last is not None and last >= up

    def enter_degraded(self) -> None:
        self.move(Phase.DEGRADED, Reason.KUBELET_PATH_LOST, heartbeats_at_mark=0)
        self.event(
            "EvacuationStarted",
            Reason.KUBELET_PATH_LOST,
            "agent heartbeats but kubelet lease/Ready is stale: VMs are alive, live-migrating",
            warning=True,
        )
        self.actions.append(StartEvacuation(self.obs.name))

    def while_suspect(self) -> None:
        if self.sig.heartbeat is Signal.ALIVE:
            if self.state.tainted:
                # It went silent while RECOVERING: our out-of-service taint is still on the
                # node, and only RECOVERING removes it (once no pods remain bound).
                if not self.node_back():
                    self.heartbeat_wakeups()
                return
            if self.fresh_enough():
                if self.kubelet_path_stale():
                    self.enter_degraded()
                else:
                    self.move(Phase.HEALTHY, Reason.HEARTBEAT_FRESH)
            self.heartbeat_wakeups()
            return
        if self.sig.heartbeat is Signal.UNKNOWN:
            return  # blind: neither recover nor escalate
        age = self.sig.heartbeat_age_s or 0.0
        if age < self.cfg.unreachable_after_s:
            self.heartbeat_wakeups()
            return
        why = self.corroboration()
        if why is None:
            self.heartbeat_wakeups()  # heartbeat alone is not evidence; wait for a corroborator
            return
        if in_maintenance(self.obs) and not self.state.tainted:
            # Planned and empty: no declaration (the agent reads none), no fence, no reset, no
            # failure alert. A hold, so safe; nothing to reset, so nothing kept down
            # (decide/maintenance.py). A node still carrying our taint is finished normally.
            self.move(Phase.MAINTENANCE, Reason.IN_MAINTENANCE)
            self.event(
                "NodeInMaintenance",
                Reason.IN_MAINTENANCE,
                f"no heartbeat for {age:.1f}s; {maintenance_note(self.obs)} and no VMI on it: "
                "not fenced, nothing to reset",
            )
            self.heartbeat_wakeups()
            return
        if Reason.HOLD_QUORUM in self.ctx.holds:
            # More than half of the nodes are silent, their agents maybe sparing themselves by
            # quorum (decide/quorum.py). A declaration written now would be the first thing such
            # an agent reads when its link returns, before we hear it, and it would fence: no
            # declaration until the hold is over (the controller decides us again then).
            self.hold(Reason.HOLD_QUORUM)
            self.heartbeat_wakeups()
            return
        self.enter_unreachable(why, age)

    def while_maintenance(self) -> None:
        if self.sig.heartbeat is Signal.ALIVE:
            if self.fresh_enough():
                self.move(Phase.HEALTHY, Reason.HEARTBEAT_FRESH)
                self.event("NodeRecovered", Reason.HEARTBEAT_FRESH, "heartbeats are back")
            self.heartbeat_wakeups()
            return
        if self.kubelet_alive_since_silence():
            # Its kubelet renews again: the machine runs (booting after the work, or only its
            # agent is gone). Judged from SUSPECT like any node whose kubelet lives.
            self.move(Phase.SUSPECT, Reason.KUBELET_PATH_BACK)
            self.while_suspect()
            return
        if self.sig.heartbeat is Signal.STALE and self.obs.vmis_here > 0:
            # A VMI shows on the silent node: its VMs may need failing over, so it is judged
            # like any silent node again, from SUSPECT (its silence is already counted).
            self.move(Phase.SUSPECT, Reason.MAINTENANCE_ENDED)
            self.event(
                "NodeSuspect",
                Reason.MAINTENANCE_ENDED,
                f"silent, and {self.obs.vmis_here} VMI(s) show on it: no longer in maintenance",
                warning=True,
            )
            self.while_suspect()
            return
        # Uncordoned, or Harvester's status gone, while still silent and empty: nothing to
        # reset, and the old silence is no evidence against a machine that may be booting (a
        # power-off through its BMC would stop it): held until it is heard or runs a VMI.
        self.heartbeat_wakeups()

    def declared_fence(self) -> FenceDeclaration | None:
        """What the agent declared in the last heartbeat this controller saw (DESIGN §5)."""
        return self.obs.fence if self.obs.fence is not None else self.state.fence

    def enter_unreachable(self, why: Reason, age: float) -> None:
        self.move(
            Phase.UNREACHABLE,
            why,
            unreachable_at=self.now,
            fence_clock_from=None,
            fence=self.declared_fence(),
        )
        self.event(
            "NodeUnreachable", why, f"no heartbeat for {age:.1f}s; {why.value}", warning=True
        )
        pods = falsely_ready(self.obs.launcher_pods)
        if pods:
            names = ", ".join(f"{p.namespace}/{p.name}" for p in pods)
            self.event(
                "FalselyReadyPods",
                why,
                f"{len(pods)} launcher pods show Ready: {names}",
                warning=True,
            )
            if self.cfg.mark_pods_not_ready and not self.cfg.dry_run:
                self.actions.append(
                    MarkPodsNotReady(self.obs.name, tuple((p.namespace, p.name) for p in pods))
                )
        self.while_fencing()

    def while_degraded(self) -> None:
        if self.sig.heartbeat is Signal.STALE:
            self.actions.append(StopEvacuation(self.obs.name))
            self.enter_suspect()
            self.while_suspect()
        elif self.sig.heartbeat is Signal.ALIVE and not self.kubelet_path_stale():
            if self.sig.lease is Signal.UNKNOWN and self.sig.ready is Signal.UNKNOWN:
                self.heartbeat_wakeups()  # still notice the heartbeat going silent
                return  # API blind: keep evacuating state until we can see again
            self.move(Phase.HEALTHY, Reason.KUBELET_PATH_BACK)
            self.actions.append(StopEvacuation(self.obs.name))
            self.event("NodeRecovered", Reason.KUBELET_PATH_BACK, "kubelet path is back")
        else:
            self.heartbeat_wakeups()

    def node_back(self) -> bool:
        if not self.fresh_enough():
            return False
        rebooted = self.obs.boot_id is not None and self.obs.boot_id != self.state.boot_id
        reason = Reason.NODE_REBOOTED if rebooted else Reason.NODE_BACK
        self.move(Phase.RECOVERING, reason)
        self.event("NodeRecovered", reason, "heartbeats are back", warning=False)
        self.while_recovering()
        return True

    def withdraw_fencing(self) -> None:
        """A heartbeat while UNREACHABLE/FENCING, before a single reset action: withdraw the
        declaration at once (back to SUSPECT) instead of after `recovery_heartbeats`.

        The agent reached the broker again, so its own self-fence timer restarted; ours restarts
        too (a new UNREACHABLE, a new fence clock from when that declaration is visible). An
        agent that reads the declaration through the API waits a bounded grace for exactly this
        withdrawal before it fences (heartbeat/fence.py, declared_grace_s): without it a NIC
        flap just longer than `unreachable_after_s` would fence a healthy node.
        """
        self.move(
            Phase.SUSPECT,
            Reason.HEARTBEAT_FRESH,
            unreachable_at=None,
            fence_clock_from=None,
            fence=self.declared_fence(),
        )
        self.event(
            "NodeSuspect",
            Reason.HEARTBEAT_FRESH,
            "heartbeat back while being fenced: declaration withdrawn, no reset",
        )
        self.heartbeat_wakeups()

    def while_fencing(self) -> None:
        if self.sig.heartbeat is not Signal.ALIVE and self.heard_alive():
            # Heard, though its agent reports no contact (aged as silent): still proof that the
            # node runs, which a BMC's "off" cannot outweigh.
            rebooted = self.obs.boot_id is not None and self.obs.boot_id != self.state.boot_id
            if self.power_off_contradicted(rebooted):
                return
        if self.sig.heartbeat is Signal.ALIVE:
            rebooted = self.obs.boot_id is not None and self.obs.boot_id != self.state.boot_id
            if self.power_off_contradicted(rebooted):
                return
            if self.node_back():
                return
            got = self.obs.heartbeats_received - self.state.heartbeats_at_mark
            if self.heard() and got >= 1 and not rebooted:
                self.withdraw_fencing()
                return
            # Alive only by the benefit of the doubt after a (re)connection, or a new boot (its
            # agent ignores a declaration about the old boot): restart the fence clock once
            # silent again (safe delay from last contact) with the newest declaration.
            self.state = replace(self.state, fence_clock_from=None, fence=self.declared_fence())
            self.heartbeat_wakeups()
            return
        if self.state.phase is Phase.UNREACHABLE:
            self.move(
                Phase.FENCING,
                Reason.PERIOD_RUNNING,
                heartbeats_at_mark=self.obs.heartbeats_received,
            )
        if self.kubelet_alive_since_silence():
            # The kubelet is back (it starts before the agent after a power-on): the machine
            # runs, and a reset now would kill the VMs it is restarting. Start over.
            self.move(
                Phase.SUSPECT,
                Reason.KUBELET_PATH_BACK,
                unreachable_at=None,
                fence_clock_from=None,
                heartbeats_at_mark=self.obs.heartbeats_received,
            )
            self.event(
                "NodeSuspect",
                Reason.KUBELET_PATH_BACK,
                "kubelet renews its Lease again: no reset, waiting for the agent",
            )
            self.heartbeat_wakeups()
            return
        self.start_fence_clock()
        if runs_fence_hook(self.cfg.fence_mode):
            self.external_fence()
        fenced = self.fence_proof()
        earliest = self.earliest_reset()
        if self.ctx.holds:
            self.hold(self.ctx.holds[0])
            return
        if fenced is None:
            if self_fence_counts(self.cfg.fence_mode) and self.state.fence_clock_from is not None:
                fence = self.state.fence
                weak = fence is not None and fence.armed and not fence.device
                self.hold(Reason.HOLD_WEAK_FENCE if weak else Reason.HOLD_UNFENCED)
            return
        self.reset_at = earliest
        if earliest is None or self.now < earliest:
            self.wake_at(earliest)
            return
        self.enter_resetting(fenced)

    def start_fence_clock(self) -> None:
        # The agent can read that it is being fenced only once the annotation is visible.
        visible = self.obs.persisted_phase in {Phase.UNREACHABLE, Phase.FENCING}
        if self.state.fence_clock_from is None and visible:
            self.state = replace(self.state, fence_clock_from=self.now)
        clock, blind = self.state.fence_clock_from, self.ctx.blind_until
        if clock is not None and blind is not None and clock < blind:
            # While the controller was blind, a cut-off agent may have spared itself by quorum
            # (decide/quorum.py), so its own deadline no longer bounds its fence: the safe
            # delay counts again, whole, from the end of the blind hold.
            self.state = replace(self.state, fence_clock_from=blind)

    def heard_alive(self) -> bool:
        """Heartbeats still arriving, whatever contact they report (`NodeObservation.heard_at`)."""
        heard = self.obs.heard_at
        if heard is None or heard == self.obs.last_heartbeat_at:
            return self.sig.heartbeat is Signal.ALIVE
        as_heard = replace(self.obs, last_heartbeat_at=heard)
        return heartbeat_signal(as_heard, self.ctx.health, self.now, self.cfg)[0] is Signal.ALIVE

    def power_off_contradicted(self, rebooted: bool) -> bool:
        """Fence mode `power`: the BMC confirmed the node off, yet its agent heartbeats from the
        same boot. The BMC is wrong (or controls another machine): hold this node's reset, say
        so, and keep the node in FENCING with the confirmation dropped, so only the agent's own
        self-fence (its safe delay from when it is silent again) can prove it stopped."""
        confirmed = self.state.fence_confirmed or (
            self.obs.external_fence_confirmed and self.state.hook_sent_at is not None
        )
        if not (self.cfg.fence_mode is FenceMode.POWER and confirmed and not rebooted):
            return False
        self.state = replace(
            self.state,
            fence_confirmed=False,
            power_contradicted=True,
            fence_clock_from=None,
            fence=self.declared_fence(),
        )
        self.hold(Reason.HOLD_POWER_CONTRADICTION)
        self.event(
            "PowerFenceContradiction",
            Reason.HOLD_POWER_CONTRADICTION,
            "the BMC reported the node off but its agent heartbeats from the same boot: the BMC "
            "is not trusted for this node until it recovers; reset held",
            warning=True,
        )
        self.heartbeat_wakeups()
        return True

    def external_fence(self) -> None:
        """Fence modes `external` and `power`: run the hook (or the BMC's fence agent) until it
        confirms, and keep its confirmation.

        Reconciled, not remembered: a hook that has not confirmed is sent again
        `HOOK_RETRY_S` after the previous send, doubling up to `HOOK_RETRY_MAX_S`, for as long
        as the node is being fenced and no hold is in force (in mode external the first run,
        on entering FENCING, is never held back, as before: a fenced node is safe to reset once
        the hold ends; in mode power nothing is sent during a hold, and only once
        `power_off_due`). The controller runs one at a time per node, beside the evaluations,
        and stops it when the node leaves FENCING. Its success is written into the state
        annotation, so a new leader resumes with the proof (mode external) or asks the BMC
        again (mode power); any other phase drops it, and the controller counts only a success
        of a run sent in this episode (`hook_since`). Never in dry-run.
        """
        sent, runs = self.state.hook_sent_at, self.state.hook_runs
        power = self.cfg.fence_mode is FenceMode.POWER
        if power and self.state.power_contradicted:
            return  # this node's BMC once said off while the node ran: it proves nothing
        if power and self.state.fence_confirmed and sent is None:
            # Resumed from the annotation by a new leader: the node may have been powered on
            # meanwhile. Ask the BMC again (off is idempotent) instead of trusting the record.
            self.state = replace(self.state, fence_confirmed=False)
        # Only a confirmation of a hook sent in this episode counts (the controller's record of
        # an earlier episode's success may still be there in the step that starts a new one).
        if self.obs.external_fence_confirmed and sent is not None:
            self.state = replace(self.state, fence_confirmed=True)
        if self.state.fence_confirmed or self.cfg.dry_run:
            return
        if (runs or power) and self.ctx.holds:
            # Run again once nothing holds resets. In mode external the first run is not held
            # back; a power-off is never sent during a hold (a storm, an upgrade, an API or
            # broker outage): switching nodes off is as destructive as resetting their VMs.
            return
        if power and not self.power_off_due():
            return
        if sent is not None:
            due = sent + min(HOOK_RETRY_MAX_S, HOOK_RETRY_S * 2 ** max(0, runs - 1))
            if self.now < due:
                self.wake_at(due)
                return
        self.actions.append(RunFenceHook(self.obs.name, sent_at=self.now))
        since = self.now if self.state.hook_since is None else self.state.hook_since
        self.state = replace(
            self.state, hook_runs=runs + 1, hook_since=since, hook_sent_at=self.now
        )
        self.wake_at(self.now + min(HOOK_RETRY_MAX_S, HOOK_RETRY_S * 2**runs))

    def power_off_due(self) -> bool:
        """Fence mode `power`: whether the BMC may switch the node off now. Only once

        - its kubelet's Lease is stale: the API server authenticates each node's Lease renewals
          (NodeRestriction), so no other node can forge this silence, unlike heartbeats and
          peer reports on the shared broker; and
        - it has been silent at least as long as its own agent waits before fencing itself
          (the `after_s` it declared): the BMC never switches off a node that its own
          self-fence would have spared (a NIC flap, withdrawn at the next heartbeat).

        Otherwise wakes when the silence is long enough, or when the Lease turns stale."""
        if self.sig.lease is not Signal.STALE:
            self.lease_wakeup()
            return False
        fence = self.state.fence
        last = self.state.last_contact_at
        if fence is not None and last is not None and self.now < last + fence.after_s:
            self.wake_at(last + fence.after_s)
            return False
        return True

    def fence_proof(self) -> Reason | None:
        mode = self.cfg.fence_mode
        if self.obs.out_of_service_tainted and not self.state.tainted:
            return Reason.FENCE_MANUAL_TAINT  # an administrator's taint is proof in any mode
        if mode is FenceMode.NONE:
            return Reason.FENCE_NOT_REQUIRED
        if mode is FenceMode.EXTERNAL:
            return Reason.FENCE_EXTERNAL_CONFIRMED if self.state.fence_confirmed else None
        if mode is FenceMode.MANUAL:
            return None
        if mode is FenceMode.POWER and self.state.fence_confirmed:
            if not self.state.power_contradicted:
                return Reason.FENCE_POWER_OFF_VERIFIED
        # Mode self, or mode power without the BMC's confirmation: the agent's self-fence.
        if not fence_accepted(self.state.fence, self.cfg) or self.state.fence_clock_from is None:
            return None
        return Reason.FENCE_SELF_ELAPSED

    def earliest_reset(self) -> float | None:
        assert self.state.unreachable_at is not None
        if self.obs.out_of_service_tainted and not self.state.tainted:
            return self.state.unreachable_at + self.ctx.policy.period_s
        if (
            self.cfg.fence_mode is FenceMode.POWER
            and self.state.fence_confirmed
            and not self.state.power_contradicted
        ):
            # Read back off from the BMC: no safe delay to wait, only the policy period.
            return self.state.unreachable_at + self.ctx.policy.period_s
        return reset_not_before(
            self.state.unreachable_at,
            self.state.fence_clock_from,
            self.ctx.policy,
            self.state.fence,
            self.cfg,
            self.obs.lease_renewed_at,
        )

    def hold(self, why: Reason) -> None:
        if self.state.held is not why:
            self.state = replace(self.state, held=why)
            self.event("ResetHeld", why, f"reset held: {why.value}", warning=True)

    def enter_resetting(self, fenced: Reason) -> None:
        self.event("NodeFenced", fenced, f"fencing proven: {fenced.value}")
        self.move(Phase.RESETTING, Reason.RESET_STARTED, tainted=True)
        self.actions.append(TaintOutOfService(self.obs.name))
        self.issue_deletes()
        if self.cfg.delete_volume_attachments:
            self.actions.append(DeleteVolumeAttachments(self.obs.name))
        n = len(self.obs.launcher_pods)
        self.event("ForceReset", Reason.RESET_STARTED, f"force-deleting {n} launcher pods")
        if not n:
            self.while_resetting()  # nothing to delete: the reset is complete

    def issue_deletes(self) -> None:
        pods = tuple((p.namespace, p.name) for p in self.obs.launcher_pods)
        if pods:
            self.actions.append(ForceDeletePods(self.obs.name, pods))
            self.wake_at(self.now + RESET_RETRY_S)

    def while_resetting(self) -> None:
        if self.obs.launcher_pods:
            # Never force-delete on a node whose agent heartbeats again (DESIGN §6); the
            # out-of-service taint already placed evicts what is left.
            if self.ctx.health.api_up_since is not None and self.sig.heartbeat is not Signal.ALIVE:
                self.issue_deletes()
            return
        self.move(
            Phase.RESET, Reason.LAUNCHER_PODS_GONE, heartbeats_at_mark=self.obs.heartbeats_received
        )

    def while_reset(self) -> None:
        if self.sig.heartbeat is Signal.ALIVE and not self.node_back():
            self.heartbeat_wakeups()

    def untaint(self) -> bool:
        """Remove our out-of-service taint; True once the node may be HEALTHY.

        Judged from what the Node shows, not from what was sent: while it still shows the
        taint (a removal that failed or was lost, or one our watch has not shown yet) the node
        stays RECOVERING and the removal is sent again every `RECONCILE_AFTER_S`. A node left
        tainted while we called it HEALTHY would never run a VM again. A Node that never
        showed the taint gets one removal (our own placement may not be in our cache) and goes
        on.
        """
        sent = self.state.untaint_sent_at
        shown = self.obs.out_of_service_tainted
        if sent is None or (shown and self.now >= sent + RECONCILE_AFTER_S):
            self.actions.append(RemoveOutOfServiceTaint(self.obs.name))
            sent = self.now
            self.state = replace(self.state, untaint_sent_at=sent)
        if shown:
            self.wake_at(sent + RECONCILE_AFTER_S)
            self.heartbeat_wakeups()  # the node may go silent again while we wait
            return False
        return True

    def while_recovering(self) -> None:
        if self.sig.heartbeat is Signal.STALE:
            self.enter_suspect()
            self.while_suspect()
            return
        if self.state.tainted:
            # Kubernetes must first clean up every pod still bound to the node, or the node's
            # kubelet would restart VMs that already run elsewhere.
            if self.obs.launcher_pods:
                self.heartbeat_wakeups()  # the node may go silent again while we wait
                return
            if self.kubelet_path_stale():
                # The agent is back before the kubelet (it boots faster): keep the taint until
                # the kubelet renews its Lease, or the node would look DEGRADED for a moment.
                self.heartbeat_wakeups()
                return
            if not self.untaint():
                return
        self.move(
            Phase.HEALTHY,
            Reason.RECOVERED,
            tainted=False,
            unreachable_at=None,
            fence_clock_from=None,
        )
        self.heartbeat_wakeups()
