"""The controller: turns observations into decisions and decisions into actions, per node.

It owns the node states, the live policy, source health and the follow-up of reset VMs. It
reads the clock once per evaluation and hands it to `decide`; it never decides anything
itself. Actions run only while this replica is the leader (or in dry-run, never).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from watchdog.decide import actions as act
from watchdog.decide.config import DecideConfig, FenceMode, Policy
from watchdog.decide.follow import FollowBook, Followed, Rescheduled
from watchdog.decide.heartbeats import HeartbeatBook
from watchdog.decide.holds import (
    BLIND_HOLDS,
    cluster_holds,
    is_storm,
    silent_phases,
    storm_hold_until,
    storm_phases,
    wake_after_storm,
)
from watchdog.decide.machine import Context, Decision, decide
from watchdog.decide.names import STATE_ANNOTATION
from watchdog.decide.observations import LauncherPod, NodeObservation, SourceHealth
from watchdog.decide.peer_reports import PeerBook, PeerEvidence, peers_unreachable
from watchdog.decide.policy import PolicyError, parse_policy
from watchdog.decide.quiet import Quiet, next_quiet_wake
from watchdog.decide.quorum import MEMBERS_MEMORY_S, MembersFloor, quorum_lost
from watchdog.decide.reasons import Reason
from watchdog.decide.reset_plan import Outcome, outcome_for
from watchdog.decide.safety import effective_period_s, safe_delay_s
from watchdog.decide.state import DOWN_PHASES, NodeState, Phase
from watchdog.metrics import Metrics

if TYPE_CHECKING:
    from prometheus_client import Gauge

log = logging.getLogger(__name__)

# After a write refused as stale, decide again this soon if no Node event has marked the node
# first (its event normally does, within milliseconds) ...
STALE_RETRY_S = 0.5
# ... and at the latest this long after the refusal even if our view still shows the version
# the refused plan stood on.
STALE_GATE_S = 5.0
# A quiet node's wake-up is decided in full, not re-armed (`rearm`), when the cluster-wide holds
# are older than this: holds that end by time alone end within it.
HOLDS_REREAD_S = 1.0


@dataclass(frozen=True, slots=True)
class OwnWrites:
    """What our last writes of a Node left in etcd (`version`, and `expect`: our annotation and
    whether our taint is on), and the versions our view may show before it shows them."""

    versions: frozenset[str]
    version: str
    expect: tuple[str | None, bool] | None


class ClusterView(Protocol):
    """What the controller reads from the API caches (implemented over observe's cache)."""

    def node_names(self) -> Iterable[str]: ...
    def node_ready(self, node: str) -> str | None: ...
    def node_annotation(self, node: str, key: str) -> str | None: ...
    def node_has_taint(self, node: str, key: str, effect: str) -> bool: ...
    def node_version(self, node: str) -> str | None: ...
    def lease_renewed_at(self, node: str) -> tuple[bool, float | None]: ...
    def launcher_pods(self, node: str) -> tuple[LauncherPod, ...]: ...
    def vm_run_strategy(self, namespace: str, vm: str) -> tuple[str | None, bool | None]: ...
    def vmi_location(self, namespace: str, name: str) -> tuple[str | None, str | None]: ...
    def harvester_policy(self) -> tuple[bool, str | None, str | None]: ...
    def upgrade_running(self) -> bool: ...
    def node_maintenance(self, node: str) -> tuple[bool, str | None, int]: ...


class Executor(Protocol):
    """Executes one action; returns the result label (success, already_done, failed, ...)."""

    async def __call__(self, action: act.Action, basis: act.Basis | None = None) -> str: ...


@dataclass
class Health:
    broker_up_since: float | None = None
    api_up_since: float | None = None
    # Set by the runtime to the cache's `api_answered_at` (None: not tracked, as in tests that
    # drive the controller without an API probe).
    api_answered: Callable[[], float | None] = lambda: None

    def snapshot(self, ingest_lagging: bool = False) -> SourceHealth:
        answered = self.api_answered()
        if ingest_lagging and self.broker_up_since is not None:
            # Connected, but heartbeats wait in our own backlog: their ages say nothing about
            # the nodes. Blind until the backlog clears; the connection's own up-since is kept,
            # because nothing was lost meanwhile (no benefit of the doubt needed afterwards).
            return SourceHealth(
                None, self.api_up_since, broker_lagging=True, api_answered_at=answered
            )
        return SourceHealth(self.broker_up_since, self.api_up_since, api_answered_at=answered)


class Controller:
    def __init__(
        self,
        cfg: DecideConfig,
        default_policy: Policy,
        taint: tuple[str, str],
        view: ClusterView,
        book: HeartbeatBook,
        execute: Executor,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        *,
        wall: Callable[[], float] = time.time,
        peers: PeerBook | None = None,
        observers_of: Callable[[str], Iterable[str]] | None = None,
        peer_quorum: int = 2,
    ) -> None:
        self.cfg = cfg
        self.peers = peers
        self.observers_of = observers_of
        self.peer_quorum = peer_quorum
        self.default_policy = default_policy
        self.policy = default_policy
        self.taint_key, self.taint_effect = taint
        self.view = view
        self.book = book
        self.execute = execute
        self.metrics = metrics
        self.clock = clock
        self.wall = wall
        self.health = Health()
        self.states: dict[str, NodeState] = {}
        self.phase_counts: Counter[Phase] = Counter()
        self.follow = FollowBook()
        self._leading = False
        # Set by the runtime to the elector's `holds_lease`: a leader whose renew deadline has
        # passed stops acting at once, before its elector's loop gets to step it down.
        self.lease_held: Callable[[], bool] = lambda: True
        # Seconds left before the leader Lease's renew deadline (None: unbounded, no election).
        self.lease_left_s: Callable[[], float | None] = lambda: None
        # node → when the machine sent the hook run that succeeded (the machine's clock): it
        # counts only for the episode whose first run was not later (`NodeState.hook_since`).
        self.fence_confirmed: dict[str, float | None] = {}
        self._hooks: dict[str, asyncio.Task[str]] = {}  # the fence hook running per node
        # node → the Node version a decision was refused on (see `_act`): what we remember of
        # it is dropped once our view shows a newer Node.
        self._stale: dict[str, tuple[str, float]] = {}  # node → (version, when refused)
        # node → what our own last writes left in etcd, while our view may not show it all.
        self._own: dict[str, OwnWrites] = {}
        self._term = 0  # counts leadership terms: a plan of an earlier term writes nothing
        # Set by the runtime to the scheduler's `mark`: a finished hook has the node decided
        # again at once.
        self.mark: Callable[[str], None] = lambda node: None
        self._policy_text: tuple[str | None, str | None] | None = None
        self._policy_invalid_reported: str | None = None
        self._false_ready: dict[str, int] = {}
        self._age_gauges: dict[str, Gauge] = {}  # node → its heartbeat-age child (`rearm`)
        self._reset_due: dict[str, float] = {}  # node → reset_not_before (our clock) exported
        self._node_holds: dict[str, Reason] = {}  # node → why its reset is held (exported)
        self._period_warned: set[tuple[float, float]] = set()
        # HEALTHY nodes whose last decision only waits for their heartbeat to age, and what
        # it waited for (decide/quiet.py; `heartbeat_needs_evaluation`, `rearm`).
        self._quiet: dict[str, Quiet] = {}
        # When the cluster-wide holds were last computed (`holds`; `rearm`).
        self._holds_at: float | None = None
        # Nodes whose Lease passed its deadline with no API answer after it yet (signals.py,
        # lease_pending): decided again at the next probe answer (`api_answered_now`).
        self._lease_pending: set[str] = set()
        # Set by the runtime to the cache's `probe_soon`: the first pending Lease asks for an
        # API answer now rather than at the next periodic probe (up to its interval later).
        self.request_api_probe: Callable[[], None] = lambda: None
        self._holds_reported: tuple[Reason, ...] = ()
        self.storm_until: float | None = None  # the storm hold lasts until then (holds())
        # The member count the quorum hold divides by: the smallest this replica counted
        # within MEMBERS_MEMORY_S since its cache synced (every replica keeps it from Node
        # events, so a new leader has it too); and the nodes deleted within that time, which
        # count as silent (their agents may still answer `cut` with the count they knew).
        self.members_floor = MembersFloor()
        self._members_synced = False
        self._deleted: dict[str, float] = {}
        self._quorum_lost = False
        # decide/machine.py, Context.blind_until: when a blind hold was last in force.
        self.blind_until: float | None = None
        self._was_blind = False
        # node → when the Node object first appeared in our cache (see heartbeat_watch_since).
        self.known_since: dict[str, float] = {}
        # Set by the runtime to the heartbeat subscriber's lag check (observe/mqtt.py); read at
        # every evaluation, so a decision never uses ages measured across our own backlog.
        self.ingest_lagging: Callable[[], bool] = lambda: False

    # --- leadership -----------------------------------------------------------------------------

    def become_leader(self) -> None:
        """Resume every node from its persisted annotation; timers restart from now."""
        now = self.clock()
        self.states.clear()
        self.phase_counts.clear()
        self._quiet.clear()
        self._stale.clear()
        self._own.clear()
        self._term += 1
        for node in self.view.node_names():
            self._set_state(node, self._resumed(node, now))
        self.fence_confirmed.clear()  # an earlier term's hook runs prove nothing to this one
        self._leading = True
        self.metrics.leader.set(1)

    def _resumed(self, node: str, now: float) -> NodeState:
        """The node's state as its annotation in our view says; timers restart from `now`."""
        state = NodeState.from_annotation(
            node, self.view.node_annotation(node, STATE_ANNOTATION), now
        )
        # A resumed node's heartbeat count baseline is what we have seen so far.
        rec = self.book.nodes.get(node)
        if rec is not None:
            state = replace(state, heartbeats_at_mark=rec.received)
        return state

    def step_down(self) -> None:
        self._leading = False
        self.metrics.leader.set(0)
        self.fence_confirmed.clear()
        for task in self._hooks.values():
            task.cancel()  # a deposed leader runs nothing more (the hook's process is killed)
        self._hooks.clear()

    @property
    def acting(self) -> bool:
        """Whether this replica may write: it leads and its Lease is still valid."""
        return self._leading and self.lease_held()

    # --- inputs ---------------------------------------------------------------------------------

    def broker_connection(self, up: bool) -> None:
        self.health.broker_up_since = self.clock() if up else None
        self.metrics.source_up.labels(source="broker").set(1 if up else 0)

    def api_connection(self, up: bool) -> None:
        self.health.api_up_since = self.clock() if up else None
        self.metrics.source_up.labels(source="api").set(1 if up else 0)

    def refresh_policy(self) -> Policy:
        """Read the Harvester setting (if the cluster has one); invalid → keep last good."""
        present, value, default = self.view.harvester_policy()
        if not present:
            self.policy = self.default_policy
            self.metrics.policy_invalid.set(0)
        elif (value, default) != self._policy_text:
            self._policy_text = (value, default)
            try:
                self.policy = parse_policy(value, default)
                self.metrics.policy_invalid.set(0)
                self._policy_invalid_reported = None
                log.info("policy from Harvester setting: %s", self.policy)
            except PolicyError as e:
                self.metrics.policy_invalid.set(1)
                if self._policy_invalid_reported != str(e):
                    self._policy_invalid_reported = str(e)
                    log.error("vm-force-reset-policy invalid (%s); keeping %s", e, self.policy)
        self.metrics.policy_period.set(effective_period_s(self.policy, None, self.cfg))
        return self.policy

    def policy_problem(self) -> str | None:
        return self._policy_invalid_reported

    # --- evaluation -----------------------------------------------------------------------------

    def peer_verdict(self, node: str, last_heartbeat_at: float | None, now: float) -> bool | None:
        """`NodeObservation.peers_unreachable`: the assigned observers' reports, weighed."""
        if self.peers is None or self.observers_of is None:
            return None
        about = self.peers.about(node)
        if not about:
            return None
        evidence = []
        for observer in self.observers_of(node):
            seen = about.get(observer)
            if seen is None:
                continue
            rec = self.book.nodes.get(observer)
            heard = rec.last_at if rec is not None and not rec.offline else None
            evidence.append(PeerEvidence(observer, seen[0], seen[1], heard))
        return peers_unreachable(
            last_heartbeat_at, evidence, now, self.cfg.suspect_after_s, self.peer_quorum
        )

    def observe_node(self, node: str, now: float | None = None) -> NodeObservation:
        rec = self.book.nodes.get(node)
        # Aged from the agent's own contact when that is older than a heartbeat interval
        # (decide/heartbeats.py, `NodeHeartbeats.contact_at`): a node whose agent is cut off
        # but still heard (a one-way broker path) turns SUSPECT as if it were not heard.
        last_at = rec.contact_at if rec else None
        peers = self.peer_verdict(node, last_at, self.clock() if now is None else now)
        lease_seen, lease_at = self.view.lease_renewed_at(node)
        tainted = self.view.node_has_taint(node, self.taint_key, self.taint_effect)
        persisted = self.view.node_annotation(node, STATE_ANNOTATION)
        persisted_phase = None
        if persisted:
            persisted_phase = NodeState.from_annotation(node, persisted, 0.0).phase.value
        cordoned, maintain_status, vmis_here = self.view.node_maintenance(node)
        return NodeObservation(
            name=node,
            last_heartbeat_at=last_at,
            heard_at=rec.last_at if rec else None,
            heartbeats_received=rec.received if rec else 0,
            boot_id=rec.boot_id if rec else None,
            fence=rec.fence if rec else None,
            agent_offline=rec.offline if rec else False,
            lease_seen=lease_seen,
            lease_renewed_at=lease_at,
            ready=self.view.node_ready(node),
            peers_unreachable=peers,
            out_of_service_tainted=tainted,
            launcher_pods=self.view.launcher_pods(node),
            external_fence_confirmed=self._hook_confirmed(node),
            persisted_phase=persisted_phase,
            known_since=self.known_since.get(node),
            cordoned=cordoned,
            maintain_status=maintain_status,
            vmis_here=vmis_here,
        )

    def _hook_confirmed(self, node: str) -> bool:
        if node not in self.fence_confirmed:
            return False
        sent, state = self.fence_confirmed[node], self.states.get(node)
        since = state.hook_since if state is not None else None
        return sent is not None and since is not None and sent >= since

    def holds(
        self, health: SourceHealth | None = None, now: float | None = None
    ) -> tuple[Reason, ...]:
        """The cluster-wide holds at `now` (an evaluation passes its own `now`: one reading of
        the clock per decision, so the holds and the node's timers agree)."""
        # O(phases), not O(nodes): only the count going down matters for storm control.
        counted = storm_phases(self.cfg)
        down = sum(n for p, n in self.phase_counts.items() if p in counted)
        phases = [Phase.UNREACHABLE] * down
        now = self.clock() if now is None else now
        self._holds_at = now
        storm = is_storm(phases, len(self.states), self.cfg)
        self.storm_until = storm_hold_until(storm, self.storm_until, now, self.cfg)
        settling = self.storm_until is not None and now < self.storm_until
        silent_in = silent_phases(self.cfg)
        silent = sum(n for p, n in self.phase_counts.items() if p in silent_in)
        for node, at in list(self._deleted.items()):
            if at < now - MEMBERS_MEMORY_S:
                del self._deleted[node]
        lost = quorum_lost(silent + len(self._deleted), self._members(now))
        if self._quorum_lost and not lost:
            # Held nodes schedule no wake-up of their own: decide them again now (their fence
            # clocks restart, decide/machine.py).
            for node, why in list(self._node_holds.items()):
                if why is Reason.HOLD_QUORUM:
                    self.mark(node)
        self._quorum_lost = lost
        holds = cluster_holds(
            phases,
            len(self.states),
            health or self.health.snapshot(self.ingest_lagging()),
            self.policy,
            self.cfg,
            self.view.upgrade_running(),
            storm_settling=settling,
            quorum_lost=lost,
        )
        blind = any(h in BLIND_HOLDS for h in holds)
        if blind or self._was_blind:
            self.blind_until = now  # in force now, or first seen over now
        self._was_blind = blind
        return holds

    def _set_state(self, node: str, state: NodeState) -> None:
        old = self.states.get(node)
        self.states[node] = state
        if old is not None and old.phase is state.phase:
            return  # counts unchanged: no metric label lookups on the common path
        if old is not None:
            self.phase_counts[old.phase] -= 1
            self.metrics.nodes.labels(phase=old.phase.value).dec()
        self.phase_counts[state.phase] += 1
        self.metrics.nodes.labels(phase=state.phase.value).inc()

    def api_answered_now(self) -> list[str]:
        """The API answered a probe: the nodes whose Lease waited for that, to decide again."""
        pending = list(self._lease_pending)
        self._lease_pending.clear()
        return pending

    def node_known(self, node: str) -> None:
        self.known_since.setdefault(node, self.clock())
        self._deleted.pop(node, None)  # back under its name: counted by its phase again

    def members_synced(self) -> None:
        """The Node cache is synced: from now on the node count is the member count."""
        self._members_synced = True
        self.node_count_changed()

    def node_count_changed(self) -> None:
        """A Node was added or deleted (after the sync): the floor remembers the count."""
        if self._members_synced:
            self._members(self.clock())

    def _members(self, now: float) -> int:
        current = len(self.book.known)
        return self.members_floor.floor(now, current) if self._members_synced else current

    def forget_node(self, node: str) -> None:
        if self._members_synced:
            self._deleted[node] = self.clock()
        self._quiet.pop(node, None)
        self._lease_pending.discard(node)
        self.known_since.pop(node, None)
        self._stale.pop(node, None)
        self._own.pop(node, None)
        old = self.states.pop(node, None)
        if old is not None:
            self.phase_counts[old.phase] -= 1
            self.metrics.nodes.labels(phase=old.phase.value).dec()
        if self._age_gauges.pop(node, None) is not None:
            self.metrics.heartbeat_age.remove(node)
        if self._reset_due.pop(node, None) is not None:
            self.metrics.reset_not_before.remove(node)
        self._record_node_hold(node, None)

    async def evaluate(self, node: str) -> float | None:
        """One decision for one node, its actions carried out; returns when to look again."""
        result = self.evaluate_now(node)
        if inspect.isawaitable(result):
            return await result
        return result

    def evaluate_now(self, node: str) -> float | Awaitable[float | None] | None:
        """One decision for one node: its `wake_at` when it has no actions (decided and
        recorded here, nothing awaited), else the awaitable that carries them out and then
        returns it (the scheduler keeps the node busy until it has).

        A standby decides nothing: its state would diverge from the leader's, which acts. It
        keeps its caches and heartbeat book warm and resumes from annotations on takeover.
        """
        # What its last decision waited for no longer holds once it is decided again: were this
        # evaluation to fail, its retry must not be re-armed as if it had been quiet (`rearm`).
        self._quiet.pop(node, None)
        if not self.acting:
            return None
        # Membership on the view's key view is O(1); building a set here made every
        # evaluation O(nodes) (docs/PERFORMANCE.md, decide benchmark).
        if node not in self.states and node not in self.view.node_names():
            return None
        now = self.clock()
        stale = self._stale.get(node)
        if stale is not None:
            version, since = stale
            if self.view.node_version(node) == version and now < since + STALE_GATE_S:
                return now + STALE_RETRY_S  # our view has not caught up with etcd yet
            # Caught up, or not within the bound (a Node written only by us and the refused
            # writer): decided again, its writes checked against etcd as always.
            del self._stale[node]
        state = self.states.get(node) or NodeState(node, entered_at=now)
        if node not in self.states:
            self._set_state(node, state)
        obs = self.observe_node(node, now)
        health = self.health.snapshot(self.ingest_lagging())
        ctx = Context(health, self.refresh_policy(), self.holds(health, now), self.blind_until)
        self._report_holds(ctx.holds)
        decision = decide(state, obs, ctx, now, self.cfg)
        if (
            Reason.HOLD_STORM in ctx.holds
            and self.storm_until is not None
            and decision.state.held is Reason.HOLD_STORM
        ):
            decision = replace(
                decision, wake_at=wake_after_storm(decision.wake_at, self.storm_until)
            )
        self._record(node, state, obs, decision, now)
        self._set_state(node, decision.state)
        sig = decision.signals
        if sig is not None and sig.lease_pending:
            if not self._lease_pending:
                self.request_api_probe()
            self._lease_pending.add(node)
        else:
            self._lease_pending.discard(node)
        if decision.quiet is not None:
            self._quiet[node] = decision.quiet
        else:
            self._quiet.pop(node, None)
        if not decision.actions:
            self._count_transitions(node, decision, now)
            return decision.wake_at
        # What the plan stands on is taken now, with the view the decision was made from (the
        # plan runs in a task of its own, and our view may move before it starts).
        return self._act(decision, obs, now, state, self._basis(node))

    def _basis(self, node: str) -> tuple[act.Basis, str | None, OwnWrites | None]:
        """The decision's basis: the Node's version and what it shows of ours (annotation,
        taint) in our view, or, when the view shows only part of our own last writes, the
        version and fields those writes left in etcd (they differ from the view by those
        writes alone). Its writes go only while this term leads."""
        seen = self.view.node_version(node)
        expect: tuple[str | None, bool] | None = (
            self.view.node_annotation(node, STATE_ANNOTATION),
            self.view.node_has_taint(node, self.taint_key, self.taint_effect),
        )
        version, own = seen, self._own.get(node)
        if own is not None and seen in own.versions:
            version, expect = own.version, own.expect
        term = self._term
        basis = act.Basis(
            version,
            lambda: self.acting and self._term == term,
            acting_left_s=self.lease_left_s,
            expect=expect,
        )
        return basis, seen, own

    async def _act(
        self,
        decision: Decision,
        obs: NodeObservation,
        now: float,
        before: NodeState,
        based: tuple[act.Basis, str | None, OwnWrites | None],
    ) -> float | None:
        node = obs.name
        basis, seen, own = based
        term = self._term
        hooks: list[act.RunFenceHook] = []
        landed = False  # a write of the plan went through (or found the world as wanted)
        for action in decision.actions:
            # Checked before every action: one that hung (a frozen API server) can outlast our
            # leadership, and a deposed leader must not carry on with the rest of its plan. Its
            # bookkeeping belongs to no term any more: the next leader resumes from the Node.
            if not self.acting or self._term != term:
                return decision.wake_at
            if isinstance(action, act.RunFenceHook):
                # Started only once the plan stood: a plan refused halfway is undone, and a
                # fence hook must not outlive the decision that sent it.
                hooks.append(action)
                continue
            result = await self._run(action, decision, obs, now, basis)
            if result != "stale":
                landed = landed or not isinstance(action, act.EmitEvent)
                continue
            if not self.acting or self._term != term:
                return decision.wake_at  # refused because this term ended
            # Someone wrote what the plan stands on (our annotation or taint) since we decided:
            # a newer leader, an administrator. The rest of the plan is dropped and the node
            # decided again once our view shows the newer Node (its watch event marks the
            # node; the wake-up covers an event that never comes). A plan of which nothing was
            # written is undone (its timers kept: the state it was made from); one that wrote
            # part stands, and the next decisions complete it from what the Node shows.
            log.info(
                "node %s: %s not written (the Node changed since the decision): deciding "
                "again on the newer Node",
                node,
                type(action).__name__,
            )
            if not landed and self.states.get(node) is decision.state:
                self._set_state(node, before)
            else:
                self._count_transitions(node, decision, now)
            self._own.pop(node, None)
            if seen is not None:
                self._stale[node] = (seen, now)
            return now + STALE_RETRY_S
        for hook in hooks:
            self._start_hook(hook)
        self._count_transitions(node, decision, now)
        if seen is not None and basis.written and basis.node_version:
            ours = {seen, *basis.written} | (own.versions if own is not None else set())
            self._own[node] = OwnWrites(frozenset(ours), basis.node_version, basis.expect)
        elif own is not None and seen not in own.versions:
            del self._own[node]  # the view has caught up (or moved on)
        return decision.wake_at

    def _cancel_hook(self, node: str) -> None:
        task = self._hooks.pop(node, None)
        if task is not None and not task.done():
            log.warning("node %s: left Fencing: the fence still running for it is stopped", node)
            task.cancel()

    def _start_hook(self, action: act.RunFenceHook) -> None:
        """Run the fence hook beside the evaluations: a hook may take `fence_hook_timeout_s`,
        and the node must still be decided meanwhile (a heartbeat back withdraws its
        declaration within the agent's grace). One run at a time per node; a send while one
        runs is dropped (the machine sends again after its backoff)."""
        running = self._hooks.get(action.node)
        if running is not None and not running.done():
            return
        self._hooks[action.node] = asyncio.create_task(
            self._run(action, None, None, self.clock()), name=f"fence hook {action.node}"
        )

    def heartbeat_needs_evaluation(self, node: str) -> bool:
        """Whether a fresh heartbeat of `node` can change its decision before its `wake_at`.

        Not for a quiet node (its last decision's `quiet`, decide/quiet.py: HEALTHY, heartbeat
        ALIVE, kubelet path not stale): a heartbeat changes only its heartbeat fields, and with
        those alone it stays HEALTHY and does nothing; its wake-up (last heartbeat +
        `suspect_after_s`) is then moved on from the newest heartbeat (`rearm`) or decided in
        full. A healthy node so costs a few comparisons per `suspect_after_s` rather than one
        evaluation per heartbeat (docs/PERFORMANCE.md, ingest). Every other node is evaluated
        on every heartbeat.
        """
        return node not in self._quiet

    def rearm(self, node: str) -> float | None:
        """A quiet node's wake-up has come: its next one when its newer heartbeats alone move it
        (decide/quiet.py, where the proof is), else None and it is decided in full.

        Also decided in full when the cluster-wide holds were last computed `HOLDS_REREAD_S` ago
        or more: some change by time alone (storm settling, deleted nodes leaving the member
        count), and the nodes they hold are decided again only when they are computed."""
        quiet = self._quiet.get(node)
        if quiet is None or not self.acting or node in self._stale:
            return None
        rec = self.book.nodes.get(node)
        if rec is None or rec.offline:
            return None
        now = self.clock()
        if self._holds_at is None or now - self._holds_at >= HOLDS_REREAD_S:
            return None
        health = self.health  # as `Health.snapshot` gives it, without building one
        broker = None if self.ingest_lagging() else health.broker_up_since
        moved = next_quiet_wake(quiet, rec.contact_at, broker, health.api_up_since, now, self.cfg)
        if moved is None:
            return None
        wake_at, age = moved
        self._set_age(node, age)
        return wake_at

    def _set_age(self, node: str, age: float) -> None:
        """`watchdog_heartbeat_age_seconds{node}`; its child kept (a label lookup takes a lock
        and builds a tuple, every few seconds per node)."""
        gauge = self._age_gauges.get(node)
        if gauge is None:
            gauge = self._age_gauges[node] = self.metrics.heartbeat_age.labels(node=node)
        gauge.set(age)

    def _report_holds(self, holds: tuple[Reason, ...]) -> None:
        """`watchdog_resets_held{reason}`: 1 while that cluster-wide hold is in force."""
        if holds != self._holds_reported:
            for reason in set(self._holds_reported) | set(holds):
                self.metrics.resets_held.labels(reason=reason.value).set(int(reason in holds))
            self._holds_reported = holds

    def _record(
        self, node: str, before: NodeState, obs: NodeObservation, d: Decision, now: float
    ) -> None:
        sig = d.signals
        # Only for a node we have heard: before its first heartbeat the signal's age counts
        # from the broker connection (benefit of the doubt), which is no heartbeat's age.
        heard = obs.last_heartbeat_at is not None
        if sig is not None and sig.heartbeat_age_s is not None and heard:
            self._set_age(node, sig.heartbeat_age_s)
        for frm, to, _ in d.transitions:
            if to is Phase.UNREACHABLE:
                # A new episode needs its own external fence confirmation.
                self.fence_confirmed.pop(node, None)
            if frm is Phase.FENCING and to is not Phase.RESETTING:
                # The node is back (or a new episode starts): a fence still running for it
                # must not switch it off now (its process is killed).
                self._cancel_hook(node)
            if to is Phase.UNREACHABLE:
                self._warn_period_raised(node, d.state)
        down = d.state.phase in DOWN_PHASES
        ready = sum(1 for p in obs.launcher_pods if p.ready and not p.terminating) if down else 0
        if ready or node in self._false_ready:
            self._false_ready[node] = ready
            if not ready:
                del self._false_ready[node]
            self.metrics.false_ready.set(sum(self._false_ready.values()))
        if d.state.held is not None and d.state.held is not before.held:
            log.warning("node %s: reset held (%s)", node, d.state.held.value)
        quorum_held = d.state.held is Reason.HOLD_QUORUM  # a SUSPECT node not declared yet
        counted = d.state.phase in DOWN_PHASES or quorum_held
        self._record_node_hold(node, d.state.held if counted else None)
        self._record_reset_due(node, d.reset_not_before, now)

    def _count_transitions(self, node: str, d: Decision, now: float) -> None:
        """Log and count a decision's transitions: once it stands (a decision whose writes
        were refused as stale is undone, and counted when it is made again)."""
        for frm, to, reason in d.transitions:
            self.metrics.transitions.labels(frm.value, to.value, reason.value).inc()
            log.info("node %s: %s -> %s (%s)", node, frm.value, to.value, reason.value)
            if to is Phase.UNREACHABLE and d.state.last_contact_at is not None:
                self.metrics.detection.observe(now - d.state.last_contact_at)
            if frm is Phase.RESETTING and to is Phase.RESET and d.state.unreachable_at:
                self.metrics.reset.observe(now - d.state.unreachable_at)

    def _warn_period_raised(self, node: str, state: NodeState) -> None:
        """A policy period below the node's safe delay is raised to it (DESIGN §5): say so, once
        per (period, safe delay) pair, so an operator who set a short period knows why resets
        take longer."""
        if self.cfg.fence_mode is not FenceMode.SELF:
            return
        delay = safe_delay_s(state.fence, self.cfg)
        period = self.policy.period_s
        if delay is None or period >= delay or (period, delay) in self._period_warned:
            return
        self._period_warned.add((period, delay))
        log.warning(
            "node %s: the reset period %.1fs is below the safe delay its agent's fence needs "
            "(%.1fs): waiting the safe delay",
            node,
            period,
            delay,
        )

    def _record_node_hold(self, node: str, held: Reason | None) -> None:
        """`watchdog_nodes_held{reason}`: nodes whose reset is held for a reason of their own
        (NoArmedFence, WeakFence, or a cluster-wide hold they are under)."""
        old = self._node_holds.get(node)
        if old is held:
            return
        if old is not None:
            self.metrics.nodes_held.labels(reason=old.value).dec()
            del self._node_holds[node]
        if held is not None:
            self.metrics.nodes_held.labels(reason=held.value).inc()
            self._node_holds[node] = held

    def _record_reset_due(self, node: str, at: float | None, now: float) -> None:
        """`watchdog_reset_not_before_timestamp_seconds{node}`, as Unix time: an operator (and
        a dashboard) can tell when the VMs of a node being fenced will be reset, without knowing
        our clock. Logged when it first appears or moves."""
        known = self._reset_due.get(node)
        if at is None:
            if known is not None:
                del self._reset_due[node]
                self.metrics.reset_not_before.remove(node)
            return
        if known == at:
            return  # unchanged: the wall clock is not read again, so the series stays steady
        self._reset_due[node] = at
        self.metrics.reset_not_before.labels(node=node).set(self.wall() + (at - now))
        log.info("node %s: VMs may be reset in %.1fs", node, max(0.0, at - now))

    async def _run(
        self,
        action: act.Action,
        d: Decision | None,
        obs: NodeObservation | None,
        now: float,
        basis: act.Basis | None = None,
    ) -> str:
        name = type(action).__name__
        try:
            result = await self.execute(action, basis)
        except Exception as e:
            # The executor retried transient errors already; the next evaluation retries again.
            log.error("%s on %s failed: %s", name, action.node, e)
            result = "failed"
        self.metrics.actions.labels(action=name, result=result).inc()
        done = result in ("success", "already_done")
        if isinstance(action, act.ForceDeletePods) and done and d is not None and obs is not None:
            self._follow_pods(action, d.state, obs, now)
        if isinstance(action, act.RunFenceHook) and result == "success" and self._leading:
            self.fence_confirmed[action.node] = action.sent_at
            self.mark(action.node)  # decide on it at once
        return result

    def _follow_pods(
        self, action: act.ForceDeletePods, state: NodeState, obs: NodeObservation, now: float
    ) -> None:
        by_name = {(p.namespace, p.name): p for p in obs.launcher_pods}
        for ns, pod in action.pods:
            lp = by_name.get((ns, pod))
            if lp is None:
                continue
            strategy, running = self.view.vm_run_strategy(ns, lp.vmi)
            outcome = outcome_for(strategy, running)
            if outcome is not Outcome.EXPECT_RESTART:
                log.info("VM %s/%s not restarted by policy (%s)", ns, lp.vmi, strategy)
                continue
            self.follow.start(
                Followed(
                    ns,
                    lp.vmi,
                    action.node,
                    outcome,
                    state.last_contact_at,
                    state.unreachable_at,
                    now,
                )
            )

    async def vmi_changed(self, namespace: str, name: str) -> Rescheduled | None:
        """Called on every VMI event; records the failover of a followed VM once it runs."""
        node, phase = self.view.vmi_location(namespace, name)
        done = self.follow.vmi_changed(namespace, name, node, phase, self.clock())
        if done is not None:
            self.metrics.reschedule.observe(done.reschedule_s)
            if done.failover_s is not None:
                self.metrics.failover.observe(done.failover_s)
            failover = "n/a" if done.failover_s is None else f"{done.failover_s:.1f}s"
            message = (
                f"VM {namespace}/{name} running on {done.new_node} (was {done.old_node}): "
                f"reschedule {done.reschedule_s:.1f}s, failover {failover}"
            )
            log.info("%s", message)
            if self.acting:
                event = act.EmitEvent(done.old_node, "VMRescheduled", Reason.RECOVERED, message)
                await self._run(event, None, None, 0.0)
        return done
