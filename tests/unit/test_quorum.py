"""Quorum before self-fencing (decide/quorum.py): the rule, its wire format, and a model of
partitions over time in which hypothesis looks for a schedule where the controller resets a
node whose agent spared itself.

The model: n nodes in groups that reach each other (peer probes) and maybe the control plane
(broker and API, one place or down); a controller in one of the groups; agents with the real
rule (`spared`, `spare_valid_s`), stamps and deadlines as agent.py keeps them; a controller that
counts silence from what it hears, gives the benefit of the doubt after its own reconnection,
holds on `quorum_lost` (real function) while blind, restarts the fence clock after a blind hold
(`restart_clock`) and resets once the safe delay has run. It is adversarial where the real
controller has more evidence: every silent node counts as corroborated at once, and no storm
hold or period helps. Mutants (`restart_clock=False`, a spare that never lapses, a controller
that divides by more nodes than the agents) must be caught: the model can represent the faults
it is meant to rule out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import NoSuchExample

from watchdog.decide.heartbeats import HeartbeatRejected
from watchdog.decide.quorum import (
    MembersFloor,
    cut_after_s,
    encode_members,
    parse_members,
    quorum_lost,
    spare_timing_error,
    spare_valid_s,
    spared,
)

# --- the rule itself ---------------------------------------------------------------------------


def test_an_agent_is_spared_only_with_a_strict_majority_of_cut_off_nodes() -> None:
    assert not spared(None, 3)  # never told how many nodes take part: fence
    assert not spared(4, 0)  # alone: fence (minority partition)
    assert not spared(4, 1)  # two of four: no majority
    assert spared(4, 2)  # three of four
    assert spared(3, 1)  # two of three
    assert not spared(5, 1) and spared(5, 2)
    assert spared(1, 0)  # a single node: the outage is the whole cluster


def test_the_controller_holds_when_more_than_half_are_silent() -> None:
    assert not quorum_lost(2, 4) and quorum_lost(3, 4)
    assert not quorum_lost(0, 0)
    for members in range(1, 40):
        for cut in range(members):
            # The intersection: a spare implies the hold, counted over the same members.
            if spared(members, cut):
                assert quorum_lost(1 + cut, members)


def test_settings_that_keep_a_spare_past_the_safe_delay_are_refused() -> None:
    ok = dict(
        self_fence_after_s=8.0,
        heartbeat_interval_s=1.0,
        fence_margin_s=2.0,
        suspect_after_s=3.0,
        max_ingest_lag_s=1.0,
    )
    assert spare_timing_error(peer_interval_s=1.0, peer_probe_timeout_s=1.0, **ok) is None
    # Rounds too slow: `cut` would come too late to tell, and a spare would outlive the delay.
    error = spare_timing_error(peer_interval_s=3.0, peer_probe_timeout_s=1.0, **ok)
    assert error is not None and "suspect_after_s" in error
    error = spare_timing_error(
        peer_interval_s=9.0, peer_probe_timeout_s=1.0, **{**ok, "self_fence_after_s": 24.0}
    )
    assert error is not None and "30s exceeds" in error


def test_the_member_count_on_the_wire_is_parsed_strictly() -> None:
    assert parse_members(encode_members(7)).nodes == 7
    too_long = b'{"nodes":' + b"9" * 80 + b"}"
    for bad in (b"", b"[]", b'{"nodes":0}', b'{"nodes":true}', b'{"nodes":1.5}',
                b'{"nodes":3,"x":1}', b'{"nodes":100001}', b"\xff", too_long):  # fmt: skip
        with pytest.raises(HeartbeatRejected):
            parse_members(bad)


def test_the_controller_divides_by_the_smallest_member_count_it_had_recently() -> None:
    floor = MembersFloor(memory_s=600)
    assert floor.floor(0, 4) == 4
    assert floor.floor(10, 6) == 4  # two nodes joined: an agent cut off since may know 4
    assert floor.floor(300, 6) == 4
    assert floor.floor(611, 6) == 6  # 4 was last current before the window
    assert floor.floor(612, 3) == 3  # a node deleted: smaller at once
    assert floor.floor(700, 5) == 3


# --- the model -------------------------------------------------------------------------------

HB, SUSPECT, AFTER, BOUND, MARGIN = 1, 3, 8, 5, 2
PEER_INTERVAL, PROBE_TIMEOUT = 1, 1
SAFE_DELAY = AFTER + BOUND + HB + MARGIN  # decide/safety.py, safe_delay_s, device = bound
SPARE_S = spare_valid_s(PEER_INTERVAL, PROBE_TIMEOUT)
CUT_S = cut_after_s(AFTER, PEER_INTERVAL, PROBE_TIMEOUT, HB)  # answers `cut` from then on
# An agent's latest proven contact is older than the controller's latest heartbeat of it by up
# to this much: that heartbeat's echo may be lost (one interval) and it may have reached the
# controller up to max_ingest_lag_s (1 s) after it was sent.
CONTACT_LAG = HB + 1
HORIZON = 150


@dataclass(frozen=True)
class Shape:
    """Who reaches whom from some second on: node → group; the control plane's group (None:
    broker and API down); the controller's group; the nodes whose Node object is deleted by
    then (their machines, and agents, may still run)."""

    groups: tuple[int, ...]
    control_plane: int | None
    controller: int
    deleted: frozenset[int] = frozenset()
    # Nodes on a one-way broker path: their heartbeats reach the controller (when it reaches
    # the control plane) but nothing comes back to them: no contact, as if cut off.
    one_way: frozenset[int] = frozenset()
    # Nodes cut from the control plane alone (broker and API), still reaching their group's
    # peers: the truly cut-off node that one-way peers may spare.
    isolated: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Rules:
    """The rules as built; each field off (or changed) is a mutant the model must catch."""

    restart_clock: bool = True  # the safe delay counted again after a blind hold
    lapse: bool = True  # a spare lasts SPARE_S after the round that granted it
    members_extra: int = 0  # the controller divides by this many more nodes than the agents
    cut_s: float = CUT_S
    count_deleted: bool = True  # deleted nodes count as silent (for MEMBERS_MEMORY_S)
    # A cut-off agent also sweeps the roster (decide/roster.py): it may count any node it
    # reaches, not only its k successors. Off: the probe lists alone, as before the roster.
    sweep: bool = True
    # The controller ages a heard node from the contact age its heartbeats report
    # (decide/heartbeats.py, `contact_at`). Off: every heartbeat heard is fresh.
    contact_age: bool = True


@dataclass
class Agent:
    rules: Rules
    last_contact: int = 0
    spared_at: int | None = None
    pending: int | None = None  # a round that started then and found a majority cut off
    fenced_at: int | None = None

    def cut(self, now: int) -> bool:
        return now - self.last_contact >= self.rules.cut_s

    def deadline(self) -> float:
        base: float = self.last_contact + AFTER
        if self.spared_at is not None:
            lapse = self.spared_at + SPARE_S if self.rules.lapse else float("inf")
            base = max(base, lapse)
        return base


@dataclass
class Controller:
    heard: list[int]
    connected: bool = True
    fence_clock: dict[int, int] = field(default_factory=dict)
    blind_until: int | None = None
    was_blind: bool = False


def successors(i: int, n: int, k: int) -> list[int]:
    return [(i + j) % n for j in range(1, min(k, n - 1) + 1)]


def violation(
    n: int, k: int, schedule: list[tuple[int, Shape]], rules: Rules = Rules()
) -> str | None:
    """Run the schedule; the first reset of a node whose agent has not stopped it, else None.

    One-way nodes (Shape.one_way) answer `cut` like any node without contact while the
    controller still hears them: with `Rules.contact_age` it ages them from the contact their
    heartbeats report (at most CONTACT_LAG older than what it would have heard of them)."""
    return simulate(n, k, schedule, rules)[0]


def simulate(
    n: int, k: int, schedule: list[tuple[int, Shape]], rules: Rules = Rules()
) -> tuple[str | None, list[int]]:
    """(the first reset of a node whose agent has not stopped it, or None; who fenced)."""
    fenced: list[int] = []
    agents = [Agent(rules) for _ in range(n)]
    ctl = Controller(heard=[0] * n)
    changes = dict(schedule)
    shape = Shape(tuple([0] * n), 0, 0)
    for now in range(HORIZON):
        shape = changes.get(now, shape)
        alive = [a.fenced_at is None for a in agents]
        # Contact: an agent reaches broker and API with its group.
        for i, a in enumerate(agents):
            reach = i not in shape.one_way and i not in shape.isolated
            if alive[i] and shape.control_plane is not None and reach:
                if shape.groups[i] == shape.control_plane:
                    a.last_contact = max(a.last_contact, now - CONTACT_LAG)
        # Probe rounds: last second's answers arrive now; this second's round starts.
        for i, a in enumerate(agents):
            if a.pending is not None:
                a.spared_at, a.pending = a.pending, None
            if not alive[i] or not a.cut(now):
                continue
            asked = (j for j in range(n) if j != i) if rules.sweep else successors(i, n, k)
            cut_peers = sum(
                1
                for j in asked
                if alive[j] and shape.groups[j] == shape.groups[i] and agents[j].cut(now)
            )
            if spared(n, cut_peers):  # the agents know n: published before any deletion
                a.pending = now
        # Agents fence at their deadline; the node is stopped BOUND later at the latest.
        for i, a in enumerate(agents):
            if alive[i] and now >= a.deadline():
                a.fenced_at = now
                fenced.append(i)
        # The controller.
        up = shape.control_plane is not None and shape.controller == shape.control_plane
        if not up:
            ctl.connected = False
            ctl.blind_until, ctl.was_blind = now, True  # BrokerDown
            continue
        if not ctl.connected:  # benefit of the doubt: ages count from the reconnection
            ctl.connected = True
            ctl.heard = [max(h, now) for h in ctl.heard]
        for i in range(n):
            heard = shape.groups[i] == shape.control_plane and i not in shape.isolated
            if agents[i].fenced_at is None and heard:
                if i in shape.one_way and rules.contact_age:
                    # Heard, but aged from the contact it reports: at most CONTACT_LAG older.
                    ctl.heard[i] = max(ctl.heard[i], agents[i].last_contact + CONTACT_LAG)
                else:
                    ctl.heard[i] = now
        known = [i for i in range(n) if i not in shape.deleted]
        silent = {i for i in known if now - ctl.heard[i] >= SUSPECT}
        counted = len(silent) + (len(shape.deleted) if rules.count_deleted else 0)
        blind = quorum_lost(counted, len(known) + rules.members_extra)
        if blind or ctl.was_blind:
            ctl.blind_until = now  # in force, or first seen over
        ctl.was_blind = blind
        for i in known:
            if i not in silent:
                ctl.fence_clock.pop(i, None)
                continue
            clock = ctl.fence_clock.setdefault(i, now)
            if rules.restart_clock and ctl.blind_until is not None:
                clock = ctl.fence_clock[i] = max(clock, ctl.blind_until)
            if blind:
                continue
            if now >= clock + SAFE_DELAY:
                stopped = agents[i].fenced_at
                if stopped is None or stopped + BOUND > now:
                    return f"t={now}: node {i} reset while running (fenced at {stopped})", fenced
                ctl.heard[i] = now  # reset: its VMs run elsewhere; the model looks no further
    return None, fenced


@st.composite
def schedules(draw: st.DrawFn, max_nodes: int = 9) -> tuple[int, int, list[tuple[int, Shape]]]:
    """Up to four partition changes; each may flap (switch back and forth every 1-3 s for a
    while, as a flapping link does) before it settles, and may delete Node objects."""
    n = draw(st.integers(2, max_nodes))
    k = draw(st.integers(1, 3))
    steps: dict[int, Shape] = {}
    before = Shape(tuple([0] * n), 0, 0)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(1, HORIZON - 40))
        groups = tuple(draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)))
        cp = draw(st.one_of(st.none(), st.integers(0, 2)))
        deleted = before.deleted
        if draw(st.integers(0, 3)) == 0:  # now and then, an administrator deletes a Node
            deleted = deleted | {draw(st.integers(0, n - 1))}
        one_way = frozenset(i for i in range(n) if draw(st.integers(0, 3)) == 0)
        isolated = frozenset(i for i in range(n) if draw(st.integers(0, 4)) == 0) - one_way
        controller = draw(st.integers(0, 2))
        shape = Shape(groups, cp, controller, frozenset(deleted), one_way, isolated)
        settled = at
        if draw(st.booleans()):  # flaps first
            period = draw(st.integers(1, 3))
            for i, t in enumerate(range(at, at + draw(st.integers(2, 30)), period)):
                steps[t] = shape if i % 2 == 0 else before
                settled = t + 1
        steps[settled] = shape
        before = shape
    return n, k, sorted(steps.items(), key=lambda s: s[0])


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedules())
def test_no_schedule_resets_a_node_whose_agent_spared_itself(
    case: tuple[int, int, list[tuple[int, Shape]]],
) -> None:
    n, k, schedule = case
    assert violation(n, k, schedule) is None


CONTROL_PLANE_LOSS = [
    (10, Shape((0, 0, 0, 0), None, 0)),  # broker and API down for everyone
    (50, Shape((0, 0, 0, 0), 0, 0)),
]


def test_a_control_plane_loss_reboots_no_node_in_the_model() -> None:
    """The must-not twin: four nodes, each probing the other three, lose broker and API for
    40 s: nobody fences (the reason for the rule)."""
    problem, fenced = simulate(4, 3, CONTROL_PLANE_LOSS)
    assert problem is None
    assert fenced == [], f"nodes {fenced} rebooted in a control-plane outage"


def test_a_control_plane_loss_reboots_no_node_of_a_cluster_larger_than_the_probe_lists() -> None:
    """Twelve nodes probing three each: their probe lists can never show a majority of twelve,
    so before the roster every agent fenced in a control-plane outage; sweeping it, none does."""
    outage = [(10, Shape((0,) * 12, None, 0)), (50, Shape((0,) * 12, 0, 0))]
    assert simulate(12, 3, outage) == (None, [])
    problem, fenced = simulate(12, 3, outage, Rules(sweep=False))
    assert problem is None and sorted(fenced) == list(range(12))


def test_a_large_minority_cut_off_together_fences() -> None:
    """Five of twelve nodes cut off together (they reach each other, not the control plane):
    however many of them each asks, five are no majority of twelve, so all five fence before the
    controller, hearing seven, resets them."""
    groups = (0,) * 7 + (1,) * 5
    problem, fenced = simulate(12, 3, [(10, Shape(groups, 0, 0))])
    assert problem is None and sorted(fenced) == list(range(7, 12))


def test_peers_on_a_one_way_broker_path_spare_no_node_the_controller_resets() -> None:
    """Five nodes; three lose the way back from the broker (their heartbeats still reach the
    controller, nothing reaches them) and the API; a fourth is cut from both but still reaches
    them. Those three answer `cut`, so the fourth is spared: the controller must count them
    silent and hold. Taking their heartbeats as contact, it resets the spared node."""
    one_way = [(10, Shape((0,) * 5, 0, 0, one_way=frozenset({0, 1, 2}), isolated=frozenset({3})))]
    assert simulate(5, 3, one_way)[0] is None
    problem, _ = simulate(5, 3, one_way, Rules(contact_age=False))
    assert problem is not None and "node 3 reset while running" in problem


def test_a_minority_partition_fences_and_only_then_is_reset() -> None:
    partition = [(10, Shape((0, 0, 0, 1), 0, 0))]  # node 3 alone, the rest with the control plane
    assert simulate(4, 3, partition) == (None, [3])


@pytest.mark.parametrize(
    "mutant",
    [
        Rules(restart_clock=False),  # the safe delay not counted again after a blind hold
        Rules(lapse=False),  # a spare that never lapses
        Rules(members_extra=2),  # the controller divides by more nodes than the agents
        Rules(cut_s=CUT_S - CONTACT_LAG),  # `cut` said while the controller may still hear it
        Rules(count_deleted=False),  # a deleted Node's agent still answers `cut`
        Rules(contact_age=False),  # a one-way node's heartbeats taken as contact
    ],
    ids=[
        "no-clock-restart",
        "spare-never-lapses",
        "larger-denominator",
        "cut-too-early",
        "deleted-not-counted",
        "one-way-heard-as-fresh",
    ],
)
def test_the_model_catches_each_broken_variant(mutant: Rules) -> None:
    from hypothesis import find

    try:
        found = find(
            schedules(max_nodes=5),
            lambda case: violation(*case, mutant) is not None,
            # Derandomized: the same search every run, so a variant found once is always found
            # (a random search of this size missed `cut-too-early` in one of seven runs here).
            settings=settings(max_examples=20_000, deadline=None, database=None, derandomize=True),
        )
    except NoSuchExample:  # pragma: no cover - the failure this test exists to report
        pytest.fail(f"the model cannot show what {mutant} breaks")
    assert violation(*found) is None, "the real rule must hold where the mutant fails"
