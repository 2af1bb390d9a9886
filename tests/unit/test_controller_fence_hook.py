"""The controller's side of fence mode `external` (watchdog/runtime/controller.py): the hook runs
beside the evaluations, and only a success of a run sent in this episode, by this term, proves
anything.

The real `Controller` and `decide`, driven by a manual clock; the cluster is an in-memory
implementation of the controller's `ClusterView` protocol and the executor records what it is
asked to do (a hook whose outcome the test chooses, and when it ends).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable

import pytest

from watchdog.decide import actions as act
from watchdog.decide.config import DecideConfig, FenceMode, Policy
from watchdog.decide.heartbeats import Heartbeat, HeartbeatBook
from watchdog.decide.names import STATE_ANNOTATION
from watchdog.decide.observations import FenceDeclaration, LauncherPod
from watchdog.decide.state import Phase
from watchdog.metrics import Metrics
from watchdog.runtime.controller import Controller

NODES = ["n1", "n2", "n3", "n4", "n5"]  # one down of five: no storm hold
DOWN = "n1"


class Cluster:
    """What the controller reads, and what its writes change."""

    def __init__(self) -> None:
        self.annotations: dict[str, str] = {DOWN: json.dumps({"phase": "Fencing"})}
        self.versions: dict[str, int] = {}  # each Node's resourceVersion, moved by its writes
        self.shown: dict[str, int] = {}  # a version the view still shows, behind `versions`
        self.shown_annotations: dict[str, str] = {}  # an annotation it still shows

    def node_names(self) -> Iterable[str]:
        return NODES

    def node_ready(self, node: str) -> str | None:
        return "Unknown" if node == DOWN else "True"

    def node_annotation(self, node: str, key: str) -> str | None:
        if key != STATE_ANNOTATION:
            return None
        return self.shown_annotations.get(node) or self.annotations.get(node)

    def node_has_taint(self, node: str, key: str, effect: str) -> bool:
        return False

    def node_version(self, node: str) -> str | None:
        return str(self.shown.get(node) or self.versions.get(node, 1))

    lease_at = 0.0  # when every kubelet last renewed its Lease

    def lease_renewed_at(self, node: str) -> tuple[bool, float | None]:
        return (True, self.lease_at)

    def launcher_pods(self, node: str) -> tuple[LauncherPod, ...]:
        return ()

    def vm_run_strategy(self, namespace: str, vm: str) -> tuple[str | None, bool | None]:
        return (None, None)

    def vmi_location(self, namespace: str, name: str) -> tuple[str | None, str | None]:
        return (None, None)

    def harvester_policy(self) -> tuple[bool, str | None, str | None]:
        return (False, None, None)

    def node_maintenance(self, node: str) -> tuple[bool, str | None, int]:
        return False, None, 0

    def upgrade_running(self) -> bool:
        return False


class Executor:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.done: list[act.Action] = []
        self.hook_results: list[str] = []  # what each hook run answers, in order
        self.hook_gate: asyncio.Event | None = None  # a hook that runs until it is set

    async def __call__(self, action: act.Action, basis: act.Basis | None = None) -> str:
        if isinstance(action, act.RunFenceHook):
            if self.hook_gate is not None:
                await self.hook_gate.wait()
            self.done.append(action)
            return self.hook_results.pop(0)
        if basis is not None and not basis.may_act():
            return "stale"
        node_writes = act.PersistState | act.TaintOutOfService | act.RemoveOutOfServiceTaint
        checked = node_writes | act.ForceDeletePods | act.MarkPodsNotReady
        if isinstance(action, checked) and basis is not None:
            # The API server's optimistic concurrency, as the actuator uses it: the Node at
            # the decision's version, or at a newer one that shows of ours what it expected.
            current = self.cluster.versions.get(action.node, 1)
            if basis.node_version != str(current):
                shows = (self.cluster.annotations.get(action.node), False)
                if basis.node_version is None or basis.expect != shows:
                    return "stale"
                basis.node_version = str(current)
        if isinstance(action, node_writes) and basis is not None:
            self.cluster.versions[action.node] = current + 1
            basis.node_version = str(current + 1)
            basis.written.append(basis.node_version)
            if isinstance(action, act.PersistState) and basis.expect is not None:
                basis.expect = (action.annotation, basis.expect[1])
        if isinstance(action, act.PersistState):
            self.cluster.annotations[action.node] = action.annotation
        self.done.append(action)
        return "success"

    def resets(self) -> list[act.Action]:
        return [a for a in self.done if isinstance(a, act.TaintOutOfService | act.ForceDeletePods)]

    def hooks(self) -> int:
        return sum(isinstance(a, act.RunFenceHook) for a in self.done)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def controller() -> tuple[Controller, Executor, Clock, list[str]]:
    cluster, clock = Cluster(), Clock()
    execute = Executor(cluster)
    c = Controller(
        DecideConfig(fence_mode=FenceMode.EXTERNAL),
        Policy(period_s=0.0),
        ("node.kubernetes.io/out-of-service", "NoExecute"),
        cluster,
        HeartbeatBook(),
        execute,
        Metrics(),
        clock,
    )
    for node in NODES:
        c.known_since[node] = 0.0
    marked: list[str] = []
    c.mark = marked.append
    c.broker_connection(True)
    c.api_connection(True)
    clock.now += 100.0  # long connected, never heard from DOWN: its heartbeat is stale
    return c, execute, clock, marked


def leading_self_fence_controller() -> tuple[Controller, Clock, HeartbeatBook, Cluster]:
    """The shipped fence mode (`self`), both connections up, leading for 100 s, no heartbeat
    heard yet (the caller's `book` gets them)."""
    cluster, clock, book = Cluster(), Clock(), HeartbeatBook()
    c = Controller(
        DecideConfig(),
        Policy(period_s=15.0),
        ("node.kubernetes.io/out-of-service", "NoExecute"),
        cluster,
        book,
        Executor(cluster),
        Metrics(),
        clock,
    )
    for node in NODES:
        c.known_since[node] = 0.0
    c.broker_connection(True)
    c.api_connection(True)
    c.become_leader()
    clock.now += 100.0
    book.set_known(set(NODES))
    return c, clock, book, cluster


async def settle(c: Controller) -> None:
    await asyncio.gather(*c._hooks.values())


async def test_the_hook_runs_beside_the_evaluation_and_its_success_is_decided_at_once() -> None:
    c, execute, clock, marked = controller()
    execute.hook_gate = asyncio.Event()
    execute.hook_results = ["success"]
    c.become_leader()
    # The evaluation returns while the hook still runs: the node is decided meanwhile.
    await c.evaluate(DOWN)
    assert c.states[DOWN].hook_runs == 1 and execute.hooks() == 0
    clock.now += 1.0
    await c.evaluate(DOWN)
    assert execute.resets() == [] and execute.hooks() == 0
    execute.hook_gate.set()
    await settle(c)
    assert marked == [DOWN]  # evaluated again at once
    await c.evaluate(DOWN)
    assert execute.resets()
    # no launcher pods to delete: the reset is complete at once
    assert json.loads(execute.cluster.annotations[DOWN])["phase"] == "Reset"


async def test_a_success_of_an_earlier_term_proves_nothing_to_the_next() -> None:
    c, execute, clock, _ = controller()
    execute.hook_results = ["success", "failed", "failed", "failed", "failed"]
    c.become_leader()
    await c.evaluate(DOWN)
    await settle(c)
    assert c.fence_confirmed  # this term's run confirmed (the node is then reset)
    c.step_down()
    # Another leader took over meanwhile; the node came back and went down again, and its
    # hook does not confirm any more (a BMC gone with the power).
    execute.done.clear()
    execute.cluster.annotations[DOWN] = json.dumps({"phase": "Fencing"})
    clock.now += 300.0
    c.become_leader()
    for _ in range(4):
        await c.evaluate(DOWN)
        await settle(c)
        clock.now += 40.0
    assert execute.hooks() == 4 and execute.resets() == []
    assert not c.states[DOWN].fence_confirmed
    # What the WatchdogFenceFailing alert counts: each failed run, under the hook's action.
    failed = {"action": "RunFenceHook", "result": "failed"}
    assert c.metrics.registry.get_sample_value("watchdog_actions_total", failed) == 4
    annotation = json.loads(execute.cluster.annotations[DOWN])
    assert annotation["phase"] == "Fencing" and "fenceConfirmed" not in annotation


async def test_a_plan_made_on_a_node_that_changed_since_is_dropped_and_decided_again() -> None:
    """Our annotation was written after the view the decision was made on (an administrator;
    a newer leader would be the same): the first write of the plan is refused, nothing after
    it is sent, and the node is decided again soon on the newer Node."""
    c, execute, clock, _ = controller()
    execute.hook_results = ["success"]
    c.become_leader()
    await c.evaluate(DOWN)
    await settle(c)
    cluster = execute.cluster
    cluster.shown[DOWN] = cluster.versions.get(DOWN, 1)
    cluster.shown_annotations[DOWN] = cluster.annotations[DOWN]
    cluster.versions[DOWN] = cluster.shown[DOWN] + 1  # written, not yet seen
    cluster.annotations[DOWN] = json.dumps({"phase": "Fencing", "reason": "Resumed"})
    wake = await c.evaluate(DOWN)
    assert execute.resets() == []
    assert wake is not None and wake <= clock.now + 0.5
    stale = {"action": "TaintOutOfService", "result": "stale"}
    assert c.metrics.registry.get_sample_value("watchdog_actions_total", stale) == 1
    assert await c.evaluate(DOWN) == clock.now + 0.5, "undecided until the view catches up"
    assert c.metrics.registry.get_sample_value("watchdog_actions_total", stale) == 1
    assert execute.resets() == [] and execute.hooks() == 1
    assert c.states[DOWN].phase is Phase.FENCING, "the refused decision is undone"
    # The twin: once the view shows the Node as it is, the node is decided again from where it
    # was (its fence confirmed in this term): the plan goes through.
    del cluster.shown[DOWN], cluster.shown_annotations[DOWN]
    clock.now = wake
    await c.evaluate(DOWN)
    assert execute.hooks() == 1
    assert [type(a) for a in execute.resets()] == [act.TaintOutOfService]
    assert json.loads(execute.cluster.annotations[DOWN])["phase"] == "Reset"


async def test_a_node_changed_only_in_fields_of_others_still_carries_the_plan() -> None:
    """The kubelet (or a node controller) wrote the Node after our view: its version moved,
    our annotation and taint did not. The plan goes through at once, nothing refused."""
    c, execute, _, _ = controller()
    execute.hook_results = ["success"]
    c.become_leader()
    await c.evaluate(DOWN)
    await settle(c)
    cluster = execute.cluster
    cluster.shown[DOWN] = cluster.versions.get(DOWN, 1)
    cluster.versions[DOWN] = cluster.shown[DOWN] + 1  # someone else's write
    await c.evaluate(DOWN)
    assert [type(a) for a in execute.resets()] == [act.TaintOutOfService]
    stale = c.metrics.registry.get_sample_value
    assert stale("watchdog_actions_total", {"action": "TaintOutOfService", "result": "stale"}) == 0


async def test_the_fence_hook_of_a_refused_plan_never_starts() -> None:
    """Declared Fencing and its hook sent in one plan whose state write is refused: the hook
    (a BMC power-off) must not run for a decision that did not stand."""
    c, execute, _, _ = controller()
    cluster = execute.cluster
    unreachable = json.dumps({"phase": "Unreachable", "reason": "CorroboratedByLease"})
    cluster.annotations[DOWN] = unreachable
    execute.hook_results = ["success"]
    c.become_leader()
    cluster.shown[DOWN] = cluster.versions.get(DOWN, 1)
    cluster.shown_annotations[DOWN] = unreachable
    cluster.versions[DOWN] = cluster.shown[DOWN] + 1
    cluster.annotations[DOWN] = json.dumps({"phase": "Healthy", "reason": "HeartbeatFresh"})
    await c.evaluate(DOWN)
    await settle(c)
    assert execute.hooks() == 0 and not c._hooks
    assert c.states[DOWN].phase is Phase.UNREACHABLE
    stale = {"action": "PersistState", "result": "stale"}
    assert c.metrics.registry.get_sample_value("watchdog_actions_total", stale) == 1


async def test_a_deposed_leader_stops_its_running_hook() -> None:
    c, execute, _, marked = controller()
    execute.hook_gate = asyncio.Event()
    execute.hook_results = ["success"]
    c.become_leader()
    await c.evaluate(DOWN)
    (task,) = c._hooks.values()
    c.step_down()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert execute.hooks() == 0 and marked == [] and not c.fence_confirmed


async def test_a_hook_still_running_when_the_node_leaves_fencing_is_stopped() -> None:
    """Must-not twin of running the hook beside the evaluations: a node heard again while its
    fence (a BMC power-off) is still going must not be switched off by it."""
    c, execute, clock, marked = controller()
    execute.hook_gate = asyncio.Event()
    execute.hook_results = ["success"]
    fence = FenceDeclaration(armed=True, after_s=8.0, bound_s=5.0)
    c.book.set_known(set(NODES))
    c.book.accept(Heartbeat(DOWN, "boot-a", 1_000, 0.0, "1", fence), clock.now - 50.0)
    c.become_leader()
    await c.evaluate(DOWN)
    assert c.states[DOWN].phase is Phase.FENCING
    (task,) = c._hooks.values()
    # Its kubelet renews its Lease again, long after its agent fell silent: the machine runs.
    execute.cluster.lease_at = clock.now
    clock.now += 1.0
    await c.evaluate(DOWN)
    assert c.states[DOWN].phase is Phase.SUSPECT
    with pytest.raises(asyncio.CancelledError):
        await task
    assert execute.hooks() == 0 and marked == [] and not c.fence_confirmed
    assert execute.resets() == []


async def test_a_view_that_has_not_shown_all_our_own_writes_does_not_refuse_the_next_plan() -> None:
    """Our reset wrote the Node twice (taint, then the state) and our view shows only the
    first: the difference from etcd is our own writes, so the next plan (the node is back:
    untaint, persist) is written on the version they left, not refused as stale."""
    c, execute, clock, _ = controller()
    execute.hook_results = ["success"]
    c.become_leader()
    await c.evaluate(DOWN)
    await settle(c)
    before = execute.cluster.versions.get(DOWN, 1)
    await c.evaluate(DOWN)
    assert json.loads(execute.cluster.annotations[DOWN])["phase"] == "Reset"
    assert execute.cluster.versions[DOWN] == before + 2  # the taint, then the state
    execute.cluster.shown[DOWN] = before + 1  # the view has shown the taint write only
    clock.now += 5.0
    execute.cluster.lease_at = clock.now
    execute.cluster.node_ready = lambda node: "True"  # type: ignore[method-assign]
    c.book.set_known(set(NODES))
    for seq in range(1_000, 1_005):  # back, and heard for a while
        c.book.accept(Heartbeat(DOWN, "boot-new", seq, 0.0, "1", None), clock.now)
        await c.evaluate(DOWN)
        clock.now += 1.0
    stale = c.metrics.registry.get_sample_value
    assert all(
        stale("watchdog_actions_total", {"action": a, "result": "stale"}) == 0
        for a in ("PersistState", "RemoveOutOfServiceTaint")
    )
    assert any(isinstance(a, act.RemoveOutOfServiceTaint) for a in execute.done)
    assert json.loads(execute.cluster.annotations[DOWN])["phase"] != "Reset"
