"""The controller's side of the quorum before self-fencing (decide/quorum.py): it holds every
reset while more than half of the nodes are silent (QuorumLost), and once that hold is over it
waits a node's whole safe delay again, counted from the hold's end — the time a spared agent
needs to see its quorum gone and fence.

The real `Controller` and `decide`, a manual clock, the in-memory cluster of
test_controller_fence_hook.py (five nodes; n1 declared Fencing, its kubelet silent).
"""

from __future__ import annotations

import json

from watchdog.decide.config import DecideConfig, Policy
from watchdog.decide.heartbeats import Heartbeat, HeartbeatBook
from watchdog.decide.observations import FenceDeclaration
from watchdog.decide.reasons import Reason
from watchdog.decide.state import Phase
from watchdog.metrics import Metrics
from watchdog.runtime.controller import Controller

from .test_controller_fence_hook import DOWN, NODES, Clock, Cluster, Executor

ARMED = FenceDeclaration(armed=True, after_s=8.0, bound_s=5.0, device=True, watchdog_s=5.0)
SAFE_DELAY = 8.0 + 5.0 + 1.0 + 2.0  # after + max(bound, device) + heartbeat + margin
QUIET = ["n2", "n3"]  # cut off with the down node: three of five silent
HEARD = ["n4", "n5"]


class KubeletsAlive(Cluster):
    """Every kubelet but the down node's renews its Lease (the quiet nodes' agents only are
    silent: nothing corroborates them, they stay Suspect)."""

    def lease_renewed_at(self, node: str) -> tuple[bool, float | None]:
        return (True, 0.0 if node == DOWN else self.clock.now - 1.0)

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock
        self.deleted: set[str] = set()

    def node_names(self) -> list[str]:
        return [n for n in NODES if n not in self.deleted]


class Run:
    def __init__(self) -> None:
        self.clock = Clock()
        self.cluster = KubeletsAlive(self.clock)
        declared = {"phase": "Fencing", "bootID": "boot-1", "fence": ARMED.to_json()}
        self.cluster.annotations[DOWN] = json.dumps(declared)
        self.execute = Executor(self.cluster)
        self.book = HeartbeatBook()
        self.c = Controller(
            DecideConfig(),
            Policy(period_s=0.0),
            ("node.kubernetes.io/out-of-service", "NoExecute"),
            self.cluster,
            self.book,
            self.execute,
            Metrics(),
            self.clock,
        )
        self.marked: list[str] = []
        self.c.mark = self.marked.append
        self.seq = 0
        # node → since when its agent has had no contact (a one-way broker path), for
        # `contact_age`; a node not in it reports nothing.
        self.contact_lost: dict[str, float] = {}
        for node in NODES:
            self.c.known_since[node] = 0.0
        self.book.set_known(set(NODES))
        self.c.broker_connection(True)
        self.c.api_connection(True)
        self.clock.now += 100.0
        self.beat(*NODES[1:])  # every agent but the down node's heard once

    def beat(self, *nodes: str) -> None:
        for node in nodes:
            self.seq += 1
            age = self.contact_age(node)
            hb = Heartbeat(node, "boot-1", self.seq, 0.0, "1", ARMED, contact_age_s=age)
            self.book.accept(hb, self.clock.now)

    def contact_age(self, node: str) -> float | None:
        """What the node's agent reports (None: an agent that does not say)."""
        since = self.contact_lost.get(node)
        return None if since is None else max(1.0, self.clock.now - since)

    async def tick(self, seconds: float, heard: list[str]) -> None:
        """Seconds pass, heartbeats of `heard` every second, every node decided each second."""
        end = self.clock.now + seconds
        while self.clock.now < end:
            self.clock.now = min(end, self.clock.now + 1.0)
            self.beat(*heard)
            for node in self.cluster.node_names():
                await self.c.evaluate(node)

    def reset(self) -> bool:
        return bool(self.execute.resets())


async def test_no_reset_while_more_than_half_are_silent_and_a_whole_safe_delay_after() -> None:
    run = Run()
    run.c.become_leader()
    start = run.clock.now
    await run.tick(14.0, HEARD)  # n2, n3 silent too: 3 of 5
    assert [run.c.states[n].phase for n in QUIET] == [Phase.SUSPECT] * 2
    assert Reason.HOLD_QUORUM in run.c.holds()
    assert run.c.states[DOWN].held is Reason.HOLD_QUORUM
    assert not run.reset()
    # n2 and n3 are heard again: the hold is over, its held node is decided again at once.
    await run.tick(4.0, HEARD + QUIET)
    ended = run.c.blind_until
    assert ended is not None and Reason.HOLD_QUORUM not in run.c.holds()
    assert DOWN in run.marked
    # The safe delay from the fence clock's start (start + 16 s) is long over; the reset waits
    # for the one counted from the end of the hold.
    assert run.clock.now > start + SAFE_DELAY
    await run.tick(ended + SAFE_DELAY - run.clock.now - 0.5, HEARD + QUIET)
    assert not run.reset(), "reset before a spared agent could have fenced"
    await run.tick(2.0, HEARD + QUIET)
    assert run.reset()


async def test_with_a_majority_heard_the_reset_comes_after_one_safe_delay() -> None:
    """The twin: the same down node while four of five agents are heard."""
    run = Run()
    run.c.become_leader()
    start = run.clock.now
    await run.tick(SAFE_DELAY - 1.0, HEARD + QUIET)
    assert not run.reset() and run.c.holds() == ()
    await run.tick(2.0, HEARD + QUIET)
    assert run.reset() and run.c.blind_until is None
    assert run.clock.now <= start + SAFE_DELAY + 1.0


async def test_a_deleted_node_still_counts_as_silent() -> None:
    """Deleting the Node of a cut-off machine does not end the hold: its agent still answers
    `cut` to its peers with the member count it knew."""
    run = Run()
    run.c.members_synced()
    run.c.become_leader()
    await run.tick(6.0, HEARD)
    assert Reason.HOLD_QUORUM in run.c.holds()
    run.cluster.deleted.add("n3")  # and what the runtime does on a Node's deletion:
    run.book.known.discard("n3")
    run.c.forget_node("n3")
    run.c.node_count_changed()
    await run.tick(30.0, HEARD)
    assert Reason.HOLD_QUORUM in run.c.holds(), "3 of 5 cut off, yet the hold ended"
    assert not run.reset()


async def test_a_new_leader_divides_by_the_smallest_count_its_replica_saw() -> None:
    """The floor is kept by every replica from Node events, not by the leader alone."""
    run = Run()
    run.c.members_synced()  # a standby, synced: it counts 5
    run.book.known.update({"n6", "n7"})  # two nodes join while n1-n3 are cut off
    run.c.node_count_changed()
    run.c.become_leader()
    await run.tick(6.0, HEARD)
    # 3 silent of 7 is no majority, but agents cut off before the join may know only 5.
    assert Reason.HOLD_QUORUM in run.c.holds()


async def test_a_node_registered_again_counts_once() -> None:
    """A healthy node deleted and registered again is counted by its phase, not also as a
    deleted node (which would hold resets for ten minutes for nothing)."""
    run = Run()
    run.c.members_synced()
    run.c.become_leader()
    run.cluster.deleted.add("n5")
    run.book.known.discard("n5")
    run.c.forget_node("n5")
    run.c.node_count_changed()
    run.cluster.deleted.discard("n5")
    run.book.known.add("n5")
    run.c.node_known("n5")
    run.c.node_count_changed()
    await run.tick(6.0, ["n3", "n4", "n5"])  # n1 down, n2 silent: 2 of 5, no majority
    assert Reason.HOLD_QUORUM not in run.c.holds()


async def test_agents_heard_but_cut_off_count_as_silent_and_hold_every_reset() -> None:
    """A one-way broker path: n2's and n3's heartbeats still reach the controller, but nothing
    reaches them back and they lost the API: they report their contact getting older, and
    from 5 s without it they answer their peers `cut`, so they may spare n1. The controller
    ages them from that contact, finds them Suspect — three of five silent — and holds.
    Taken as heard, n1 would have been reset while its agent may be spared."""
    run = Run()
    run.c.become_leader()
    for node in QUIET:
        run.contact_lost[node] = run.clock.now
    await run.tick(SAFE_DELAY + 4.0, HEARD + QUIET)  # every node's heartbeat arrives
    assert [run.c.states[n].phase for n in QUIET] == [Phase.SUSPECT] * 2
    assert Reason.HOLD_QUORUM in run.c.holds()
    assert not run.reset()


async def test_agents_that_report_contact_as_usual_are_heard() -> None:
    """The twin: the same heartbeats reporting a healthy agent's contact age (one interval):
    n2 and n3 stay Healthy, and n1 is reset after one safe delay."""
    run = Run()
    run.c.become_leader()
    start = run.clock.now
    for node in QUIET:
        run.contact_lost[node] = float("inf")  # reports max(1.0, -inf): one interval
    await run.tick(SAFE_DELAY + 1.0, HEARD + QUIET)
    assert [run.c.states[n].phase for n in QUIET] == [Phase.HEALTHY] * 2
    assert run.reset() and run.clock.now <= start + SAFE_DELAY + 1.0
