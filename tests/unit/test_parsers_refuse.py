"""Every parser of input someone else can write refuses with its own error, never crashes.

Heartbeats, peer reports and probe lists come from the broker (any node can publish); the
state annotation and Harvester's Setting from anyone who may patch them; quantities from VMI
specs; PING/PONG lines from the network; the boot record from a file. Each is fuzzed with
hypothesis over raw bytes, over JSON built to hurt (NaN, 1e999, huge integers, deep nesting,
wrong types) and over mutations of valid messages: the only exception allowed is the parser's
own. Then the poison inputs named in the security review, one by one, and the memory bounds of
the books keyed by what observers send.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from watchdog.decide import bounded_json
from watchdog.decide.acks import MAX_ACK_BYTES, Ack, AckRefused, encode_ack, parse_ack
from watchdog.decide.heartbeats import (
    MAX_RETIRED_BOOTS,
    Heartbeat,
    HeartbeatBook,
    HeartbeatRejected,
    encode_heartbeat,
    parse_heartbeat,
)
from watchdog.decide.observations import FenceDeclaration
from watchdog.decide.peer_probe import PeerView, parse_ping, parse_pong
from watchdog.decide.peer_reports import PeerBook, PeerReport, encode_report, parse_report
from watchdog.decide.peer_ring import encode_probe_list, parse_probe_list
from watchdog.decide.policy import PolicyError, parse_policy
from watchdog.decide.state import NodeState, Phase
from watchdog.heartbeat.boot_record import BootRecordError, parse_record
from watchdog.observe.node_probe import phase_for_boot
from watchdog.observe.projections import MAX_QUANTITY, parse_quantity

PREFIX = "node-watchdog/v1"
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# JSON values meant to hurt: non-finite and huge numbers, odd types, nesting.
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["Fencing", "Healthy", "Reset", "node-1", "b1", "NaN", "-1", "1e999"]),
)
_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=20,
)


def _dumps(doc: object) -> str:
    return json.dumps(doc)  # writes NaN / Infinity for non-finite floats, as an attacker can


def _texts() -> st.SearchStrategy[str]:
    deep = st.integers(min_value=1, max_value=3000).map(lambda n: "[" * n + "]" * n)
    return st.one_of(
        st.text(max_size=200),
        _json.map(_dumps),
        deep,
        st.just('{"period": 1e999}'),
        st.just("9" * 5000),
    )


def _hb(node: str = "node-1", boot: str = "b1", seq: int = 1) -> Heartbeat:
    return Heartbeat(node, boot, seq, 1.0, "0.1.0", FenceDeclaration(True, 8.0, 5.0), None)


def _mutations(valid: dict) -> st.SearchStrategy[dict]:
    """`valid` with one field replaced by anything, or removed, or one added."""
    keys = sorted(valid)
    replaced = st.tuples(st.sampled_from(keys), _json).map(lambda kv: {**valid, kv[0]: kv[1]})
    removed = st.sampled_from(keys).map(lambda k: {x: v for x, v in valid.items() if x != k})
    added = st.tuples(st.text(max_size=8), _json).map(lambda kv: {**valid, kv[0]: kv[1]})
    return st.one_of(replaced, removed, added)


# --- MQTT messages ------------------------------------------------------------------------------


@FUZZ
@given(st.one_of(st.binary(max_size=300), _texts().map(str.encode)))
def test_any_bytes_on_any_of_our_topics_are_refused_by_name(payload: bytes) -> None:
    for parse, kind in ((parse_heartbeat, "heartbeat"), (parse_report, "peers")):
        try:
            parse(f"{PREFIX}/{kind}/node-1", payload, PREFIX)
        except HeartbeatRejected:
            pass
    try:
        parse_probe_list(f"{PREFIX}/probe/node-1", payload, PREFIX)
    except HeartbeatRejected:
        pass


@FUZZ
@given(_mutations(json.loads(encode_heartbeat(_hb()))))
def test_a_heartbeat_with_any_field_wrong_is_refused_or_sane(doc: dict) -> None:
    try:
        hb = parse_heartbeat(f"{PREFIX}/heartbeat/node-1", _dumps(doc).encode(), PREFIX)
    except HeartbeatRejected:
        return
    assert math.isfinite(hb.sent_at) and hb.seq >= 0
    for seconds in (hb.fence.after_s, hb.fence.bound_s, hb.fence.watchdog_s):
        assert math.isfinite(seconds) and seconds >= 0


@FUZZ
@given(
    _mutations(
        json.loads(
            encode_report(PeerReport("node-1", "b1", 3, 1.0, {"node-2": PeerView.UNREACHABLE}))
        )
    )
)
def test_a_peer_report_with_any_field_wrong_is_refused_or_sane(doc: dict) -> None:
    try:
        report = parse_report(f"{PREFIX}/peers/node-1", _dumps(doc).encode(), PREFIX)
    except HeartbeatRejected:
        return
    assert math.isfinite(report.sent_at) and report.seq >= 0


@FUZZ
@given(_mutations(json.loads(encode_probe_list("node-1", {"node-2": "10.0.0.2:9120"}))))
def test_a_probe_list_with_any_field_wrong_is_refused_or_sane(doc: dict) -> None:
    try:
        parse_probe_list(f"{PREFIX}/probe/node-1", _dumps(doc).encode(), PREFIX)
    except HeartbeatRejected:
        pass


@FUZZ
@given(st.one_of(st.binary(max_size=200), _texts().map(str.encode)))
def test_any_acknowledgement_is_one_or_refused_by_name(payload: bytes) -> None:
    try:
        ack = parse_ack(payload)
    except AckRefused as e:
        assert str(e)
        return
    assert ack.seq >= 0 and 0 < len(ack.boot_id) <= 64 and " " not in ack.boot_id
    assert parse_ack(encode_ack(ack.seq, ack.boot_id)) == ack


@given(
    st.integers(min_value=0, max_value=10**19),
    st.text("0123456789abcdef-", min_size=1, max_size=64),
)
def test_an_acknowledgement_reads_back_as_sent(seq: int, boot_id: str) -> None:
    assert parse_ack(encode_ack(seq, boot_id)) == Ack(seq, boot_id)


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        (b"", "0 bytes"),
        (b"1" * (MAX_ACK_BYTES + 1), "bytes"),
        (b"12", "expected"),
        (b"-1 boot", "not a non-negative integer"),
        (b"1e3 boot", "not a non-negative integer"),
        (b"1 boot extra", "expected"),
        ("1 b\u00f6ot".encode(), "not ASCII"),
        (b"1 " + b"b" * 65, "expected"),
    ],
)
def test_a_malformed_acknowledgement_is_refused_naming_why(payload: bytes, says: str) -> None:
    with pytest.raises(AckRefused, match=says):
        parse_ack(payload)


@given(st.binary(max_size=600))
def test_ping_and_pong_lines_parse_or_are_none(line: bytes) -> None:
    parse_ping(line)
    parse_pong(line)


# --- what is written in the API -----------------------------------------------------------------


@FUZZ
@given(_texts())
def test_any_state_annotation_resumes_without_raising(text: str) -> None:
    state = NodeState.from_annotation("node-1", text, 100.0)
    assert state.entered_at == 100.0
    if state.fence is not None:
        assert math.isfinite(state.fence.after_s) and state.fence.after_s >= 0
    assert isinstance(phase_for_boot(text, "b1", "b1"), str)


@FUZZ
@given(st.one_of(_texts(), _mutations({"enable": True, "period": 15}).map(_dumps)))
def test_any_policy_value_is_a_policy_or_a_policy_error(text: str) -> None:
    try:
        policy = parse_policy(text)
    except PolicyError as e:
        assert str(e)
        return
    assert math.isfinite(policy.period_s) and 0 < policy.period_s <= 86_400
    assert math.isfinite(policy.vm_migration_timeout_s)


@FUZZ
@given(
    st.one_of(
        _scalars,
        st.from_regex(r"\A-?[0-9.]{0,12}([eE][+-]?[0-9]{1,7})?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?\Z"),
    )
)
def test_any_quantity_is_bytes_within_int64(value: object) -> None:
    n = parse_quantity(value)
    assert isinstance(n, int) and 0 <= n <= MAX_QUANTITY


@FUZZ
@given(_texts())
def test_any_boot_record_file_is_a_record_none_or_a_boot_record_error(text: str) -> None:
    try:
        parse_record(text, "b1", 1000.0)
    except BootRecordError:
        pass


# --- the poison inputs, one by one --------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ('{"enable": true, "period": NaN}', "NaN is not a number"),
        ('{"enable": true, "period": Infinity}', "Infinity is not a number"),
        ('{"enable": true, "period": 1e999}', "out of range"),
        ('{"enable": true, "period": 1e12}', "field 'period' must be at most 86400 s"),
        ('{"enable": true, "period": 15, "vmMigrationTimeout": -1e300}', "at most 86400"),
        ("[" * 5000 + "]" * 5000, "more than 4096"),
    ],
)
def test_a_poisoned_reset_period_is_refused_naming_why(value: str, says: str) -> None:
    with pytest.raises(PolicyError, match=says.replace("(", r"\(")):
        parse_policy(value)


def test_a_deeply_nested_state_annotation_resumes_as_healthy_said_so() -> None:
    state = NodeState.from_annotation("node-1", '{"phase":' * 900 + "1" + "}" * 900, 5.0)
    assert state.phase is Phase.HEALTHY and state.resumed


def test_a_negative_fence_time_in_the_annotation_is_not_believed() -> None:
    annotation = json.dumps(
        {"phase": "Fencing", "fence": {"armed": True, "after_s": -1e9, "bound_s": 5.0}}
    )
    state = NodeState.from_annotation("node-1", annotation, 5.0)
    assert state.fence is None or state.fence.after_s >= 0


def test_an_absurd_vmi_memory_is_read_at_once_as_unknown() -> None:
    assert parse_quantity("1e999999Ki") == 0
    assert parse_quantity("2Gi") == 2 * 2**30


def test_bounded_json_says_what_it_refused() -> None:
    with pytest.raises(bounded_json.JsonRefused, match="annotation is nested more than 16"):
        bounded_json.loads("[" * 40 + "]" * 40, max_bytes=4096, what="annotation")


# --- memory bounds ------------------------------------------------------------------------------


def test_forged_peer_reports_about_invented_nodes_take_no_memory() -> None:
    book = PeerBook()
    known = {"node-1", "node-2"}
    for seq in range(20_000):
        views = {f"x{seq}-{i}": PeerView.UNREACHABLE for i in range(16)}
        views["node-2"] = PeerView.UNREACHABLE
        book.accept(PeerReport("node-1", "b1", seq, 1.0, views), float(seq), known)
    assert book.sizes() == {"observers": 1, "targets": 1, "retired_boots": 0}
    assert book.ignored_targets == 20_000 * 16
    assert set(book.about("node-2")) == {"node-1"}


def test_invented_boot_ids_keep_only_the_last_ones_and_still_refuse_a_recent_replay() -> None:
    book = HeartbeatBook()
    book.set_known({"node-1"})
    for i in range(10_000):
        book.accept(_hb(boot=f"boot-{i}"), float(i))
    retired = book._retired["node-1"]
    assert len(retired) == MAX_RETIRED_BOOTS
    with pytest.raises(HeartbeatRejected, match="earlier boot"):
        book.accept(_hb(boot="boot-9990", seq=10**9), 1e5)
    peers = PeerBook()
    for i in range(10_000):
        peers.accept(PeerReport("node-1", f"boot-{i}", 1, 1.0, {}), float(i), {"node-1"})
    assert peers.sizes()["retired_boots"] == MAX_RETIRED_BOOTS
