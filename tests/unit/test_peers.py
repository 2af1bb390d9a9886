"""Peer probes, the pure parts (DESIGN §4 `peers` signal): what a probe answer means, who probes
whom, what reports and probe lists the controller and agents accept, and when peers corroborate.

The safety of the quorum rule is stated as properties: peers never corroborate against a fresh
observer that reaches the target after its last heartbeat, never from reports older than that
heartbeat, and never with fewer than the quorum.
"""

from __future__ import annotations

import errno
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from watchdog.decide.heartbeats import (
    Heartbeat,
    HeartbeatRejected,
    RejectReason,
    encode_heartbeat,
    parse_heartbeat,
)
from watchdog.decide.observations import FenceDeclaration
from watchdog.decide.peer_address import split_peer_address, valid_peer_address
from watchdog.decide.peer_probe import (
    PeerView,
    ProbeOutcome,
    TargetState,
    classify,
    encode_ping,
    encode_pong,
    observe,
    parse_ping,
    parse_pong,
)
from watchdog.decide.peer_reports import (
    PeerBook,
    PeerEvidence,
    PeerReport,
    encode_report,
    parse_report,
    peers_unreachable,
)
from watchdog.decide.peer_ring import (
    PeerRing,
    assignment,
    encode_probe_list,
    parse_probe_list,
)

PREFIX = "node-watchdog/v1"
R, U, K = PeerView.REACHABLE, PeerView.UNREACHABLE, PeerView.UNKNOWN

# --- the probe line protocol and the classifier -------------------------------------------------


def test_ping_and_pong_round_trip_and_refuse_anything_else() -> None:
    assert parse_ping(encode_ping("node-2")) == "node-2"
    assert parse_pong(encode_pong("node-2", "b00t")) == ("node-2", "b00t", False)
    assert parse_pong(encode_pong("node-2", "b00t", cut=True)) == ("node-2", "b00t", True)
    for junk in (b"", b"PING\n", b"PING a b\n", b"PING a", b"ping a\n", b"PING \xff\n",
                 b"PING " + b"a" * 300 + b"\n", b"PING a/b\n"):  # fmt: skip
        assert parse_ping(junk) is None, junk
    for junk in (
        b"PONG a\n",
        b"PONG a b c\n",
        b"PONG a b cut cut\n",
        b"PONG a b CUT\n",
        b"PONG a b",
        b"PONG a " + b"x" * 65 + b"\n",
    ):
        assert parse_pong(junk) is None, junk


@pytest.mark.parametrize(
    ("reply", "error", "outcome"),
    [
        (b"PONG node-2 boot\n", None, ProbeOutcome.OK),
        (b"PONG node-2 boot cut\n", None, ProbeOutcome.CUT),  # its agent is cut off too
        (b"PONG node-3 boot cut\n", None, ProbeOutcome.MISMATCH),
        (b"PONG node-3 boot\n", None, ProbeOutcome.MISMATCH),
        (b"HTTP/1.1 400 Bad Request\r\n", None, ProbeOutcome.MISMATCH),
        (b"", None, ProbeOutcome.REFUSED),  # closed before a word: the kernel is there
        (None, None, ProbeOutcome.REFUSED),
        (None, ConnectionRefusedError(), ProbeOutcome.REFUSED),
        (None, ConnectionResetError(), ProbeOutcome.REFUSED),
        (None, BrokenPipeError(), ProbeOutcome.REFUSED),
        (None, TimeoutError(), ProbeOutcome.TIMEOUT),
        (None, OSError(errno.EHOSTUNREACH, "no route"), ProbeOutcome.TIMEOUT),
        (None, OSError(errno.EMFILE, "too many open files"), ProbeOutcome.ERROR),
        (None, RuntimeError("bug"), ProbeOutcome.ERROR),
    ],
)
def test_a_probe_attempt_is_classified_by_what_the_machine_did(
    reply: bytes | None, error: BaseException | None, outcome: ProbeOutcome
) -> None:
    assert classify("node-2", reply, error) is outcome


def run(outcomes: list[ProbeOutcome], failures: int = 2) -> list[PeerView]:
    state, views = TargetState(), []
    for o in outcomes:
        state = observe(state, o, failures)
        views.append(state.view)
    return views


def test_unreachable_only_after_consecutive_timeouts_and_reachable_on_ok_or_refused() -> None:
    T, OK, X = ProbeOutcome.TIMEOUT, ProbeOutcome.OK, ProbeOutcome.REFUSED
    assert run([T, T]) == [K, U]
    assert run([OK, T, T, T]) == [R, R, U, U]  # one lost probe is no news
    assert run([T, OK, T]) == [K, R, R]  # not consecutive
    assert run([T, T, X]) == [K, U, R]  # the agent died, the machine answers: alive
    assert run([T, T, ProbeOutcome.CUT]) == [K, U, R]  # cut off from the control plane: alive
    assert run([T, T, ProbeOutcome.MISMATCH]) == [K, U, K]
    assert run([OK, ProbeOutcome.ERROR, ProbeOutcome.ERROR]) == [R, R, R]  # our problem
    assert run([T], failures=1) == [U]


@given(st.lists(st.sampled_from(list(ProbeOutcome)), max_size=30), st.integers(1, 5))
def test_a_refused_probe_never_leaves_the_target_unreachable(
    outcomes: list[ProbeOutcome], failures: int
) -> None:
    state = TargetState()
    for o in outcomes:
        state = observe(state, o, failures)
        if o in (ProbeOutcome.OK, ProbeOutcome.CUT, ProbeOutcome.REFUSED):
            assert state.view is R
        if state.view is U:
            assert state.timeouts >= failures


# --- addresses, heartbeats ------------------------------------------------------------------


def test_peer_addresses_are_strict_host_port() -> None:
    assert split_peer_address("10.0.0.7:9103") == ("10.0.0.7", 9103)
    assert split_peer_address("[fd00::7]:9103") == ("fd00::7", 9103)
    assert split_peer_address("node-1.lab:1") == ("node-1.lab", 1)
    for bad in ("10.0.0.7", "10.0.0.7:0", "h:65536", "h:09", "a b:1", "user@h:1", "h:1/x",
                "300.1.1.1:5", "[zz]:1", ":1", "", None, 9103, "h" * 300 + ":1"):  # fmt: skip
        assert not valid_peer_address(bad), bad


FENCE = FenceDeclaration(armed=True, after_s=8.0, bound_s=5.0)


def test_a_heartbeat_may_announce_its_probe_address_and_old_agents_stay_valid() -> None:
    topic = f"{PREFIX}/heartbeat/node-1"
    old = Heartbeat("node-1", "b", 1, 0.0, "0.1.0", FENCE)
    assert "peer" not in json.loads(encode_heartbeat(old))
    assert parse_heartbeat(topic, encode_heartbeat(old), PREFIX).peer is None
    new = Heartbeat("node-1", "b", 1, 0.0, "0.2.0", FENCE, peer="10.0.0.1:9103")
    assert parse_heartbeat(topic, encode_heartbeat(new), PREFIX).peer == "10.0.0.1:9103"
    for bad in ("10.0.0.1", 9103, "10.0.0.1:9103\n", ["x"]):
        doc = json.loads(encode_heartbeat(old)) | {"peer": bad}
        with pytest.raises(HeartbeatRejected) as e:
            parse_heartbeat(topic, json.dumps(doc).encode(), PREFIX)
        assert e.value.reason is RejectReason.SCHEMA


# --- the assignment ring --------------------------------------------------------------------


def test_each_node_probes_its_k_successors_in_sorted_ring_order() -> None:
    nodes = {f"n{i}": f"10.0.0.{i}:9103" for i in range(1, 6)}
    lists = assignment(nodes, 3)
    assert list(lists["n1"]) == ["n2", "n3", "n4"]
    assert list(lists["n4"]) == ["n5", "n1", "n2"]
    assert lists["n5"]["n1"] == "10.0.0.1:9103"
    # Every node has exactly k observers.
    observed = [t for targets in lists.values() for t in targets]
    assert all(observed.count(n) == 3 for n in nodes)
    # Fewer nodes than k + 1: everyone probes everyone else.
    assert assignment({"a": "h:1", "b": "h:2"}, 3) == {"a": {"b": "h:2"}, "b": {"a": "h:1"}}
    assert assignment({"a": "h:1"}, 3) == {"a": {}}


def test_a_join_changes_only_the_k_predecessors_lists_and_its_own() -> None:
    ring = PeerRing(3)
    for i in range(10):
        ring.set_address(f"n{i:02}", f"h:{i + 1}")
    assert ring.set_address("n045", "h:99") == {"n02", "n03", "n04", "n045"}
    assert ring.set_address("n045", "h:99") == set()  # nothing new: nothing to publish
    assert ring.set_address("n045", "h:98") == {"n02", "n03", "n04"}  # moved: who lists it
    assert ring.remove("n045") == {"n02", "n03", "n04"}


ops = st.lists(
    st.tuples(
        st.sampled_from(["set", "remove"]),
        st.sampled_from([f"n{i}" for i in range(8)]),
        st.sampled_from(["h:1", "h:2"]),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(ops, st.integers(1, 4))
def test_the_ring_reports_exactly_the_lists_that_changed(
    operations: list[tuple[str, str, str]], k: int
) -> None:
    ring = PeerRing(k)
    addresses: dict[str, str] = {}
    for op, node, address in operations:
        before = assignment(addresses, k)
        if op == "set":
            changed = ring.set_address(node, address)
            addresses[node] = address
        else:
            changed = ring.remove(node)
            addresses.pop(node, None)
        after = assignment(addresses, k)
        differs = {n for n in after if before.get(n) != after[n]}
        assert changed == differs
        assert {n: ring.targets_of(n) for n in addresses} == after
        assert len(changed) <= k + 1  # work proportional to what changed


# --- probe lists and reports on the wire ------------------------------------------------------


def probe_doc(**changes: Any) -> bytes:
    doc = json.loads(encode_probe_list("node-1", {"node-2": "10.0.0.2:9103"})) | changes
    return json.dumps(doc).encode()


def list_reject(payload: bytes, topic: str = f"{PREFIX}/probe/node-1") -> RejectReason:
    with pytest.raises(HeartbeatRejected) as e:
        parse_probe_list(topic, payload, PREFIX)
    return e.value.reason


def test_probe_lists_are_parsed_strictly() -> None:
    got = parse_probe_list(f"{PREFIX}/probe/node-1", probe_doc(), PREFIX)
    assert got.targets == {"node-2": "10.0.0.2:9103"}
    assert list_reject(probe_doc(), f"{PREFIX}/probe/node-2") is RejectReason.TOPIC_MISMATCH
    assert list_reject(probe_doc(), f"{PREFIX}/probe/node-1/x") is RejectReason.TOPIC_MISMATCH
    assert list_reject(probe_doc(extra=1)) is RejectReason.SCHEMA
    assert list_reject(probe_doc(targets={"node-2": "nowhere"})) is RejectReason.SCHEMA
    assert list_reject(probe_doc(targets={"node-1": "h:1"})) is RejectReason.SCHEMA  # itself
    assert list_reject(probe_doc(targets={"a/#": "h:1"})) is RejectReason.SCHEMA
    many = {f"n{i}": "h:1" for i in range(17)}
    assert list_reject(probe_doc(targets=many)) is RejectReason.SCHEMA
    assert list_reject(b"[1]") is RejectReason.MALFORMED
    assert list_reject(b"{" * 10_000) is RejectReason.OVERSIZED


def report(node: str = "node-1", seq: int = 1, boot: str = "b1", **results: PeerView) -> PeerReport:
    return PeerReport(node, boot, seq, 1.7e9, {k.replace("_", "-"): v for k, v in results.items()})


def report_reject(doc: dict[str, Any], topic: str = f"{PREFIX}/peers/node-1") -> RejectReason:
    with pytest.raises(HeartbeatRejected) as e:
        parse_report(topic, json.dumps(doc).encode(), PREFIX)
    return e.value.reason


def test_reports_round_trip_and_are_parsed_strictly() -> None:
    r = report(node_2=U, node_3=R)
    assert parse_report(f"{PREFIX}/peers/node-1", encode_report(r), PREFIX) == r
    good = json.loads(encode_report(r))
    assert report_reject(good, f"{PREFIX}/peers/node-9") is RejectReason.TOPIC_MISMATCH
    assert report_reject(good | {"extra": 1}) is RejectReason.SCHEMA
    assert report_reject(good | {"seq": -1}) is RejectReason.SCHEMA
    assert report_reject(good | {"seq": True}) is RejectReason.SCHEMA
    assert report_reject(good | {"boot_id": ""}) is RejectReason.SCHEMA
    assert report_reject(good | {"results": {"node-2": "dead"}}) is RejectReason.SCHEMA
    assert report_reject(good | {"results": {"node-1": "reachable"}}) is RejectReason.SCHEMA
    assert report_reject({k: v for k, v in good.items() if k != "sent_at"}) is RejectReason.SCHEMA
    with pytest.raises(HeartbeatRejected) as e:
        parse_report(f"{PREFIX}/peers/node-1", b"x" * 9000, PREFIX)
    assert e.value.reason is RejectReason.OVERSIZED


def test_the_peer_book_keeps_the_latest_report_and_refuses_replays() -> None:
    book, known = PeerBook(), {"node-1", "node-2", "node-3"}
    assert book.accept(report(seq=5, node_2=U, node_3=R), 10.0, known) == {"node-2", "node-3"}
    assert book.about("node-2") == {"node-1": (U, 10.0)}
    # The broker re-delivers the retained report on resubscription: old news, not a replay.
    assert book.accept(report(seq=5, node_2=U, node_3=R), 11.0, known) is None
    assert book.about("node-2") == {"node-1": (U, 10.0)}
    for bad in (report(seq=4, node_2=R), report(seq=5, node_2=R)):
        with pytest.raises(HeartbeatRejected) as e:
            book.accept(bad, 12.0, known)
        assert e.value.reason is RejectReason.REPLAYED
    # A new list: a target dropped from the report no longer has this observer's evidence.
    assert book.accept(report(seq=6, node_3=U), 13.0, known) == {"node-2", "node-3"}
    assert book.about("node-2") == {}
    # A new boot may restart its seq; the old boot may not come back.
    assert book.accept(report(seq=0, boot="b2", node_3=R), 14.0, known) == {"node-3"}
    with pytest.raises(HeartbeatRejected) as e:
        book.accept(report(seq=99, boot="b1", node_3=U), 15.0, known)
    assert e.value.reason is RejectReason.REPLAYED
    with pytest.raises(HeartbeatRejected) as e:
        book.accept(report(node="node-9", node_3=U), 15.0, known)
    assert e.value.reason is RejectReason.UNKNOWN_NODE
    assert book.forget("node-1") == {"node-3"}
    assert book.about("node-3") == {}


# --- the quorum rule ------------------------------------------------------------------------

NOW, FRESH_S, LAST_HB = 100.0, 3.0, 90.0


def ev(view: PeerView, received_at: float = 95.0, heard: float | None = 99.5) -> PeerEvidence:
    return PeerEvidence("obs", view, received_at, heard)


def verdict(*evidence: PeerEvidence, quorum: int = 2, last: float | None = LAST_HB) -> bool | None:
    return peers_unreachable(last, evidence, NOW, FRESH_S, quorum)


def test_quorum_rule_examples() -> None:
    assert verdict(ev(U), ev(U)) is True
    assert verdict(ev(U)) is None  # below quorum
    assert verdict(ev(U), ev(U), ev(R)) is False  # one observer reaches it: alive
    assert verdict(ev(U), ev(U, received_at=89.0)) is None  # older than the last heartbeat
    assert verdict(ev(U), ev(U, heard=96.0)) is None  # that observer is silent itself
    assert verdict(ev(U), ev(U, heard=None)) is None
    assert verdict(ev(U), ev(R, received_at=80.0)) is None  # old "reachable" says nothing now
    assert verdict(ev(U), ev(K), ev(U)) is True
    assert verdict(ev(U), ev(U), last=None) is True  # never heard the target: nothing to be after
    assert verdict() is None


evidence_st = st.builds(
    PeerEvidence,
    st.sampled_from(["a", "b", "c", "d"]),
    st.sampled_from(list(PeerView)),
    st.floats(80.0, 100.0),
    st.one_of(st.none(), st.floats(90.0, 100.0)),
)


@settings(max_examples=500)
@given(st.lists(evidence_st, max_size=6), st.integers(1, 4), st.floats(80.0, 100.0))
def test_peers_never_corroborate_against_fresh_contrary_old_or_too_few_reports(
    evidence: list[PeerEvidence], quorum: int, last: float
) -> None:
    got = peers_unreachable(last, evidence, NOW, FRESH_S, quorum)
    counted = [
        e
        for e in evidence
        if e.observer_heard_at is not None
        and NOW - e.observer_heard_at < FRESH_S
        and e.received_at > last
    ]
    if any(e.view is R for e in counted):
        assert got is False  # never True when a fresh observer reaches it after the silence
    if got is True:
        # never from reports older than the last heartbeat, never below quorum
        assert sum(e.view is U for e in counted) >= quorum
        assert all(e.view is not R for e in counted)
    # Old reports and silent observers alone can never make it True.
    stale_only = [e for e in evidence if e not in counted]
    assert peers_unreachable(last, stale_only, NOW, FRESH_S, quorum) is None
