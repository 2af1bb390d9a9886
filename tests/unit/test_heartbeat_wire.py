"""The heartbeat wire format and the controller's trust in it (DESIGN §4, §9).

Whatever arrives on a heartbeat topic, the parser either returns a Heartbeat or refuses it
with a reason: hostile input is an observation to count, never a crash of the subscriber.
"""

from __future__ import annotations

import json
import string
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from watchdog.decide.heartbeats import (
    MAX_HEARTBEAT_BYTES,
    Heartbeat,
    HeartbeatBook,
    HeartbeatRejected,
    RejectReason,
    encode_heartbeat,
    heartbeat_topic,
    parse_heartbeat,
)
from watchdog.decide.mqtt_url import BrokerAddress, parse_broker_url, reconnect_delay_s
from watchdog.decide.observations import FenceDeclaration

PREFIX = "node-watchdog/v1"
FENCE = FenceDeclaration(armed=True, after_s=8.0, bound_s=5.0)


def heartbeat(node: str = "node-a", boot_id: str = "boot-1", seq: int = 0) -> Heartbeat:
    return Heartbeat(node, boot_id, seq, 1_700_000_000.0, "0.1.0", FENCE)


def doc(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = json.loads(encode_heartbeat(heartbeat()))
    base.update(changes)
    return base


def parse(document: object, topic: str = heartbeat_topic(PREFIX, "node-a")) -> Heartbeat:
    return parse_heartbeat(topic, json.dumps(document).encode(), PREFIX)


def book(*known: str) -> HeartbeatBook:
    b = HeartbeatBook()
    b.set_known(set(known or {"node-a"}))
    return b


def accept(b: HeartbeatBook, hb: Heartbeat, now: float = 0.0) -> RejectReason | None:
    try:
        b.accept(hb, now)
    except HeartbeatRejected as e:
        return e.reason
    return None


# --- fuzz: nothing but HeartbeatRejected ever escapes ---------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=80),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
FIELDS = ("node", "boot_id", "seq", "sent_at", "version", "fence")
FENCE_FIELDS = ("armed", "after_s", "bound_s")


@st.composite
def mutated_documents(draw: st.DrawFn) -> dict[str, Any]:
    """A valid heartbeat with fields replaced by arbitrary JSON, removed or added."""
    d = doc()
    for key in draw(st.lists(st.sampled_from(FIELDS), max_size=3)):
        if draw(st.booleans()):
            d[key] = draw(json_values)
        else:
            d.pop(key, None)
    if isinstance(d.get("fence"), dict):
        for key in draw(st.lists(st.sampled_from(FENCE_FIELDS), max_size=3)):
            d["fence"][key] = draw(json_values)
    d.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=2)))
    return d


def _only_rejected(topic: str, payload: bytes) -> None:
    try:
        hb = parse_heartbeat(topic, payload, PREFIX)
    except HeartbeatRejected as e:
        assert isinstance(e.reason, RejectReason)
        return
    # Accepted: then it is exactly what the wire rules promise.
    assert topic == heartbeat_topic(PREFIX, hb.node)
    assert len(payload) <= MAX_HEARTBEAT_BYTES
    assert hb.seq >= 0 and 0 < len(hb.boot_id) <= 64


@settings(max_examples=500, deadline=None)
@given(
    topic=st.one_of(
        st.text(max_size=60),
        st.builds(lambda t: f"{PREFIX}/heartbeat/{t}", st.text(max_size=20)),
    ),
    payload=st.binary(max_size=2 * MAX_HEARTBEAT_BYTES),
)
@example(topic=f"{PREFIX}/heartbeat/", payload=b"{}")
@example(topic=f"{PREFIX}/heartbeat/a/b", payload=b"{}")
@example(topic=heartbeat_topic(PREFIX, "node-a"), payload=b"[" * 600 + b"]" * 400)
@example(topic=heartbeat_topic(PREFIX, "node-a"), payload=b"\xef\xbb\xbf{}")
def test_arbitrary_bytes_on_any_topic_are_parsed_or_rejected_never_crash(
    topic: str, payload: bytes
) -> None:
    _only_rejected(topic, payload)


@settings(max_examples=400, deadline=None)
@given(document=mutated_documents())
@example(document=doc(sent_at=10**400))  # a JSON integer too large for a float
@example(document=doc(fence={"armed": True, "after_s": 10**400, "bound_s": 1}))
@example(document=doc(seq=True))
@example(document=doc(fence={"armed": 1, "after_s": 1, "bound_s": 1}))
def test_arbitrary_json_documents_are_parsed_or_rejected_never_crash(
    document: dict[str, Any],
) -> None:
    _only_rejected(heartbeat_topic(PREFIX, "node-a"), json.dumps(document).encode())


# --- round trip ------------------------------------------------------------------------------

node_names = st.from_regex(r"\A[a-z0-9]([-a-z0-9.]{0,40}[a-z0-9])?\Z")
seconds = st.floats(min_value=0, max_value=86_400, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(
    hb=st.builds(
        Heartbeat,
        node=node_names,
        boot_id=st.text(string.hexdigits + "-", min_size=1, max_size=64),
        seq=st.integers(min_value=0, max_value=2**63),
        sent_at=st.floats(allow_nan=False, allow_infinity=False),
        version=st.text(max_size=32),
        fence=st.builds(FenceDeclaration, st.booleans(), seconds, seconds),
        contact_age_s=st.none() | seconds,
    )
)
def test_what_the_agent_encodes_the_controller_parses_back_unchanged(hb: Heartbeat) -> None:
    payload = encode_heartbeat(hb)
    assert len(payload) <= MAX_HEARTBEAT_BYTES
    assert parse_heartbeat(heartbeat_topic(PREFIX, hb.node), payload, PREFIX) == hb


# --- each refusal has its reason -------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        pytest.param(
            heartbeat_topic(PREFIX, "node-a"),
            encode_heartbeat(heartbeat(node="node-b")),
            RejectReason.TOPIC_MISMATCH,
            id="forged: node-b's heartbeat on node-a's topic",
        ),
        pytest.param(
            heartbeat_topic(PREFIX, "node-b"),
            encode_heartbeat(heartbeat(node="node-a")),
            RejectReason.TOPIC_MISMATCH,
            id="node-a's heartbeat on node-b's topic",
        ),
        pytest.param(
            f"{PREFIX}/heartbeat/node-a/extra",
            encode_heartbeat(heartbeat()),
            RejectReason.TOPIC_MISMATCH,
            id="topic one level too deep",
        ),
        pytest.param(
            "other/v1/heartbeat/node-a",
            encode_heartbeat(heartbeat()),
            RejectReason.TOPIC_MISMATCH,
            id="another prefix",
        ),
        pytest.param(
            heartbeat_topic(PREFIX, "node-a"),
            json.dumps(doc(version="x" * MAX_HEARTBEAT_BYTES)).encode(),
            RejectReason.OVERSIZED,
            id="oversized",
        ),
        pytest.param(
            heartbeat_topic(PREFIX, "node-a"), b"{not json", RejectReason.MALFORMED, id="not JSON"
        ),
        pytest.param(
            heartbeat_topic(PREFIX, "node-a"), b"\xff\xfe\xfd", RejectReason.MALFORMED, id="binary"
        ),
        pytest.param(
            heartbeat_topic(PREFIX, "node-a"), b'["node-a"]', RejectReason.MALFORMED, id="array"
        ),
        pytest.param(
            heartbeat_topic(PREFIX, "node-a"),
            json.dumps(doc(seq=-1)).encode(),
            RejectReason.SCHEMA,
            id="negative seq",
        ),
        pytest.param(
            heartbeat_topic(PREFIX, "node-a"),
            json.dumps(doc(seq="7")).encode(),
            RejectReason.SCHEMA,
            id="seq as a string",
        ),
        pytest.param(
            heartbeat_topic(PREFIX, "node-a"),
            json.dumps(doc(fence={"armed": "yes", "after_s": 8, "bound_s": 5})).encode(),
            RejectReason.SCHEMA,
            id="armed not a bool",
        ),
        pytest.param(
            heartbeat_topic(PREFIX, "node-a"),
            json.dumps(doc(fence={"armed": True, "after_s": -1, "bound_s": 5})).encode(),
            RejectReason.SCHEMA,
            id="negative fence delay",
        ),
        pytest.param(
            heartbeat_topic(PREFIX, "node-a"),
            json.dumps(doc(boot_id="")).encode(),
            RejectReason.SCHEMA,
            id="empty boot_id",
        ),
        pytest.param(
            heartbeat_topic(PREFIX, "node-a"),
            json.dumps(doc(contact_age_s=-0.5)).encode(),
            RejectReason.SCHEMA,
            id="negative contact age",
        ),
        pytest.param(
            heartbeat_topic(PREFIX, "node-a"),
            json.dumps(doc(contact_age_s="3")).encode(),
            RejectReason.SCHEMA,
            id="contact age as a string",
        ),
        pytest.param(
            heartbeat_topic(PREFIX, "node-a"),
            json.dumps(doc(contact_age_s=1e9)).encode(),
            RejectReason.SCHEMA,
            id="contact age beyond a day",
        ),
    ],
)
def test_parser_refuses_with_its_reason(topic: str, payload: bytes, reason: RejectReason) -> None:
    with pytest.raises(HeartbeatRejected) as refused:
        parse_heartbeat(topic, payload, PREFIX)
    assert refused.value.reason is reason


def test_book_refuses_a_heartbeat_of_an_unknown_node() -> None:
    b = book("node-a")
    assert accept(b, heartbeat(node="node-z")) is RejectReason.UNKNOWN_NODE
    assert "node-z" not in b.nodes


def test_book_refuses_a_replayed_or_repeated_seq() -> None:
    b = book()
    assert accept(b, heartbeat(seq=5), now=1.0) is None
    assert accept(b, heartbeat(seq=5), now=2.0) is RejectReason.REPLAYED
    assert accept(b, heartbeat(seq=3), now=2.0) is RejectReason.REPLAYED
    assert b.nodes["node-a"].last_at == 1.0, "a replay does not refresh the node"
    assert accept(b, heartbeat(seq=6), now=3.0) is None


def test_book_accepts_a_reboot_whose_seq_restarts_at_zero_and_refuses_the_old_boot() -> None:
    b = book()
    assert accept(b, heartbeat(boot_id="boot-1", seq=41)) is None
    assert accept(b, heartbeat(boot_id="boot-2", seq=0), now=1.0) is None, "reboot accepted"
    rec = b.nodes["node-a"]
    assert (rec.boot_id, rec.seq, rec.received) == ("boot-2", 0, 2)
    assert accept(b, heartbeat(boot_id="boot-1", seq=42)) is RejectReason.REPLAYED
    assert b.nodes["node-a"].boot_id == "boot-2"


def test_the_signal_ages_from_the_agents_own_contact_when_that_is_older_than_usual() -> None:
    """`NodeHeartbeats.contact_at`: a heartbeat reporting one interval of contact age (a healthy
    agent) is fresh; one reporting more ages the node by the excess (a one-way broker path: the
    agent is cut off and will answer `cut`, so the controller must count it silent), never
    backwards within a boot; a new boot starts afresh; an agent that does not say is fresh."""
    b = HeartbeatBook(contact_slack_s=1.0)
    b.set_known({"node-a"})

    def beat(seq: int, now: float, age: float | None, boot: str = "boot-1") -> float | None:
        hb = Heartbeat("node-a", boot, seq, 0.0, "1", FENCE, contact_age_s=age)
        return b.accept(hb, now).contact_at

    assert beat(1, 100.0, 1.0) == 100.0  # healthy: one interval
    assert beat(2, 101.0, None) == 101.0  # an agent that does not say
    assert beat(3, 102.0, 2.0) == 101.0  # one echo late: a second older
    assert beat(4, 103.0, 3.0) == 101.0  # no contact since: the node ages as if unheard
    assert beat(5, 108.0, 8.0) == 101.0
    assert beat(6, 109.0, 0.5) == 109.0  # contact again: fresh
    assert beat(7, 109.5, 9.0) == 109.0, "never backwards within a boot"
    assert beat(0, 110.0, 4.0, boot="boot-2") == 107.0  # a new boot: from its own report
    assert b.nodes["node-a"].last_at == 110.0, "the heartbeat itself is still the latest heard"


def test_book_status_offline_is_cleared_by_the_next_heartbeat_and_unknown_is_ignored() -> None:
    b = book()
    accept(b, heartbeat(seq=0))
    rec = b.status("node-a", online=False)
    assert rec is not None and rec.offline
    assert b.status("node-z", online=False) is None
    accept(b, heartbeat(seq=1))
    assert not b.nodes["node-a"].offline


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 12)), max_size=60))
def test_book_only_ever_moves_forward(events: list[tuple[int, int]]) -> None:
    """For any arrival order: per boot, accepted seqs strictly increase; a boot once left is
    never accepted again; a later seq of the current boot is always accepted."""
    b = book()
    accepted: list[tuple[int, int]] = []
    for boot, seq in events:
        current = accepted[-1] if accepted else None
        ok = accept(b, heartbeat(boot_id=f"boot-{boot}", seq=seq)) is None
        if current is not None and boot == current[0] and seq > current[1]:
            assert ok, "a fresh heartbeat of the current boot is accepted"
        if ok:
            accepted.append((boot, seq))
    for i, (boot, seq) in enumerate(accepted):
        later = accepted[i + 1 :]
        assert all(s > seq for bb, s in later if bb == boot), "seq strictly forward per boot"
        left = next((j for j, (bb, _) in enumerate(later) if bb != boot), None)
        if left is not None:
            assert all(bb != boot for bb, _ in later[left:]), "a left boot never returns"


# --- broker URL and reconnect backoff (decide/mqtt_url.py) -----------------------------------


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("mqtt://broker", BrokerAddress("broker", 1883, tls=False)),
        ("mqtt://127.0.0.1:18830/", BrokerAddress("127.0.0.1", 18830, tls=False)),
        ("mqtts://broker.example", BrokerAddress("broker.example", 8883, tls=True)),
        ("mqtts://broker:9883", BrokerAddress("broker", 9883, tls=True)),
    ],
)
def test_broker_url_gives_host_port_and_tls(url: str, address: BrokerAddress) -> None:
    assert parse_broker_url(url) == address


@pytest.mark.parametrize(
    "url",
    ["http://broker", "mqtt://", "mqtt://user:pw@broker", "mqtt://broker/x", "mqtt://b:99999"],
)
def test_broker_url_refuses_what_it_cannot_honour(url: str) -> None:
    with pytest.raises(ValueError, match="broker URL"):
        parse_broker_url(url)


@given(attempt=st.integers(-5, 10_000), jitter=st.floats(0, 1))
def test_reconnect_delay_grows_but_never_exceeds_the_cap(attempt: int, jitter: float) -> None:
    delay = reconnect_delay_s(attempt, jitter)
    assert 0.05 <= delay <= 5.0
    assert reconnect_delay_s(attempt + 1, 1.0) >= reconnect_delay_s(attempt, 1.0)


def test_first_reconnects_are_fast_and_the_cap_is_reached() -> None:
    assert reconnect_delay_s(1, 1.0) == pytest.approx(0.1)
    assert reconnect_delay_s(7, 0.0) == pytest.approx(2.5)
    assert reconnect_delay_s(50, 1.0) == pytest.approx(5.0)
