"""The agent's side of the quorum before self-fencing (decide/quorum.py): when it answers `cut`,
when a probe round spares it, how long a spare lasts (and so how long its watchdog device is
petted), and when it never spares itself.

Runs the agent's own bookkeeping with a manual clock: `contact_proven`, the member count as it
arrives from the broker, the prober's round callback, `deadline`.
"""

from __future__ import annotations

from pathlib import Path

from watchdog.decide.quorum import encode_members
from watchdog.decide.roster import encode_roster_shard, roster_topic, shard_of
from watchdog.heartbeat.agent import Agent
from watchdog.runtime.settings import Settings

BOOT = "6f1c0d2e-boot"
PREFIX = "node-watchdog/v1"
AFTER_S = 8.0  # shipped: cut answered 5 s after the last contact, spare lasts 4 s (1 s rounds)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def agent(state: Path, clock: Clock, **settings: object) -> Agent:
    a = Agent(
        Settings(
            node_name="node-a",
            boot_state_dir=state,
            self_fence_after_s=AFTER_S,
            fence_command="true",
            **settings,  # type: ignore[arg-type]
        ),
        clock=clock,
    )
    a.resume_boot(BOOT, clock.now)
    a.contact_proven(clock.now)  # armed; the last contact is now
    return a


def test_cut_is_answered_only_after_five_seconds_without_contact(tmp_path: Path) -> None:
    clock = Clock()
    a = agent(tmp_path, clock)
    clock.now += 4.9
    assert not a.cut_off()
    clock.now += 0.1
    assert a.cut_off()
    a.contact_proven(clock.now)
    assert not a.cut_off()


def test_a_majority_of_cut_off_nodes_spares_it_for_two_rounds(tmp_path: Path) -> None:
    clock = Clock()
    a = agent(tmp_path, clock)
    a._members_message(encode_members(4))
    assert a.deadline() == 108.0
    clock.now = 107.0
    a._probe_round(106.5, 2)  # it and two peers: three of four
    assert a.deadline() == 106.5 + 4.0  # the device is petted until then
    clock.now = 110.0
    a._probe_round(109.5, 2)
    assert a.deadline() == 113.5
    # The peers' contact is back (they answer plain PONGs): no more rounds spare it, and the
    # last one lapses 4 s after it started.
    a._probe_round(110.5, 0)
    assert a.deadline() == 113.5


def test_half_of_the_nodes_is_not_a_majority(tmp_path: Path) -> None:
    clock = Clock()
    a = agent(tmp_path, clock)
    a._members_message(encode_members(4))
    clock.now = 107.0
    a._probe_round(106.5, 1)  # two of four: maybe a partition in halves; the controller
    assert a.deadline() == 108.0  # may hear the other half, so fence


def test_no_spare_without_a_member_count_or_while_in_contact(tmp_path: Path) -> None:
    clock = Clock()
    a = agent(tmp_path, clock)
    clock.now = 107.0
    a._probe_round(106.5, 3)  # never told how many nodes there are
    assert a.deadline() == 108.0
    a._members_message(b'{"nodes":"four"}')  # refused, logged
    a._probe_round(106.6, 3)
    assert a.deadline() == 108.0
    a._members_message(encode_members(4))
    clock.now = 104.0
    a._probe_round(103.5, 3)  # 4 s since contact: not cut off itself
    assert a.deadline() == 108.0


def test_no_cut_from_an_agent_without_contact_in_this_boot(tmp_path: Path) -> None:
    clock = Clock()
    a = Agent(
        Settings(node_name="node-a", boot_state_dir=tmp_path, fence_command="true"), clock=clock
    )
    a.resume_boot(BOOT, clock.now)
    clock.now += 60.0
    assert not a.cut_off()  # unarmed; the controller may never have heard this boot


def test_timings_that_cannot_keep_a_spare_safe_turn_the_quorum_off(tmp_path: Path) -> None:
    clock = Clock()
    # 8 - (2 + 1) - 1 = 4 s: it would say `cut` while the controller may still hear it.
    a = agent(tmp_path, clock, peer_interval_s=2.0, peer_probe_timeout_s=1.0)
    a._members_message(encode_members(4))
    clock.now = 107.0
    assert not a.cut_off()
    a._probe_round(106.5, 3)
    assert a.deadline() == 108.0


def test_a_peer_with_contact_again_has_broker_and_api_tried_at_once(tmp_path: Path) -> None:
    """At the end of an outage the peers' `cut` stops, and the spare with it: this agent must
    not wait out a reconnect backoff before its own contact returns."""
    clock = Clock()
    a = agent(tmp_path, clock)
    a._members_message(encode_members(4))
    clock.now = 107.0
    a._probe_round(106.5, 2, 0)  # spared, nobody has contact
    assert not a._retry_broker.is_set() and not a._retry_api.is_set()
    a._probe_round(107.5, 1, 1)  # one peer's contact is back
    assert a._retry_broker.is_set() and a._retry_api.is_set()
    a._retry_broker.clear()
    a._retry_api.clear()
    a._probe_round(108.5, 1, 1)  # no news: the backoff stands
    assert not a._retry_broker.is_set()
    a.contact_proven(clock.now)
    a._probe_round(109.5, 0, 3)  # in contact ourselves: nothing to retry
    assert not a._retry_broker.is_set()


def test_a_cut_off_agent_sweeps_the_roster_it_was_given(tmp_path: Path) -> None:
    """The roster (decide/roster.py): while cut off, every other node of it may be asked, for
    the count a spare needs; before that, or never told the member count, nobody is swept."""
    clock = Clock()
    a = agent(tmp_path, clock)
    nodes = {f"node-{c}": f"10.0.0.{i}:9101" for i, c in enumerate("abcdefghij")}
    for shard in {shard_of(n) for n in nodes}:
        part = {n: addr for n, addr in nodes.items() if shard_of(n) == shard}
        a._roster_message(roster_topic(PREFIX, shard), encode_roster_shard(shard, part))
    assert a.roster_size() == 10
    clock.now += 6.0  # cut off
    assert a._sweep_plan() is None, "no member count: nothing found could spare it"
    a._members_message(encode_members(10))
    plan = a._sweep_plan()
    assert plan is not None and plan.need == 5
    assert set(plan.candidates) == set(nodes) - {"node-a"}  # never itself
    a.contact_proven(clock.now)
    assert a._sweep_plan() is None, "in contact: no sweep"


def test_a_refused_roster_shard_keeps_what_the_agent_knew(tmp_path: Path) -> None:
    clock = Clock()
    a = agent(tmp_path, clock)
    shard = shard_of("node-b")
    topic = roster_topic(PREFIX, shard)
    a._roster_message(topic, encode_roster_shard(shard, {"node-b": "10.0.0.2:9101"}))
    a._roster_message(topic, b'{"shard":' + str(shard).encode() + b',"nodes":{"node-b":"x"}}')
    a._roster_message(topic, b"")  # a cleared retained message: kept too
    assert a._roster == {shard: {"node-b": "10.0.0.2:9101"}}


def test_heartbeats_report_the_age_cut_is_judged_on(tmp_path: Path) -> None:
    """`contact_age_s` (decide/heartbeats.py): the same age `cut_off` compares, rounded up (an
    older age only makes the controller count the node silent sooner), capped at a day."""
    clock = Clock()
    a = Agent(
        Settings(node_name="node-a", boot_state_dir=tmp_path, fence_command="true"), clock=clock
    )
    a.resume_boot(BOOT, clock.now)
    assert a.contact_age() is None, "no contact in this boot: nothing to report"
    a.contact_proven(clock.now)
    clock.now += 3.451
    assert a.contact_age() == 3.46
    clock.now += 1.549
    assert a.contact_age() == 5.0 and a.cut_off()
    clock.now += 200_000.0
    assert a.contact_age() == 86_400.0
