"""The controller's own ingest lag (decide/ingest_lag.py), on virtual time.

What an operator relies on: a controller that falls behind its broker says so within one probe
interval of crossing the bound, says it caught up only once it really did, and a broker that
never echoes (an ACL without the echo topic) never blinds the controller.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from watchdog.decide.ingest_lag import MAX_UNANSWERED, EchoBook
from watchdog.decide.observations import SourceHealth
from watchdog.decide.signals import Signal
from watchdog.decide.state import Phase

from .decide_helpers import context, node, seen, step


def test_prompt_echoes_mean_no_lag() -> None:
    book = EchoBook(max_lag_s=1.0)
    for i in range(10):
        seq = book.sent(float(i))
        assert book.answer(seq, i + 0.01) is not None
        assert book.lag_s(i + 0.01) == 0.0
    assert not book.lagging(10.0)


def test_a_backlog_shows_as_the_age_of_the_oldest_unanswered_probe() -> None:
    book = EchoBook(max_lag_s=1.0)
    book.answer(book.sent(0.0), 0.01)
    for t in (1.0, 1.5, 2.0, 2.5):  # sent, stuck behind a backlog
        book.sent(t)
    assert book.lag_s(2.0) == 1.0 and not book.lagging(2.0)
    assert book.lag_s(2.6) == 1.6 and book.lagging(2.6)
    # The backlog drains: answers come in order; the lag falls to the newest probe's age.
    book.answer(2, 3.0)
    book.answer(3, 3.05)
    assert book.lag_s(3.05) == 3.05 - 2.0
    book.answer(4, 3.1)
    assert book.lag_s(3.1) == 3.1 - 2.5
    book.answer(5, 3.12)
    assert book.lag_s(3.12) == 0.0 and not book.lagging(3.12)


def test_an_answer_settles_every_older_probe_lost_on_the_way() -> None:
    book = EchoBook(max_lag_s=1.0)
    book.answer(book.sent(0.0), 0.0)
    lost = book.sent(1.0)
    kept = book.sent(1.1)
    assert book.answer(kept, 1.2) is not None
    assert book.answer(lost, 1.3) is None, "a probe settled by a newer answer is unknown"
    assert book.lag_s(50.0) == 0.0, "the lost probe does not age forever"


def test_a_probe_the_broker_dropped_blinds_for_a_while_however_prompt_the_next_echo() -> None:
    """A broker drops QoS 0 messages for a subscriber whose queue is full: heartbeats were lost
    with the probe, and a node whose heartbeats were dropped is not a silent node."""
    book = EchoBook(max_lag_s=1.0, loss_blind_s=3.0)
    book.answer(book.sent(0.0), 0.01)
    dropped = book.sent(0.5)
    book.answer(book.sent(1.0), 1.05)  # prompt, but the one before it never came
    assert book.lost == 1 and dropped not in book.unanswered
    assert book.lag_s(1.05) == 0.0, "the lag itself is honest: nothing is waiting"
    assert book.dropping(1.05) and book.lagging(1.05)
    assert book.lagging(3.9), "blind until every node had time to heartbeat again"
    book.answer(book.sent(4.0), 4.01)
    assert not book.dropping(4.1) and not book.lagging(4.1), "no loss for 3 s: sees again"
    assert book.lost == 1


def test_connecting_into_a_backlog_is_lagging_before_the_first_echo_comes_back() -> None:
    book = EchoBook(max_lag_s=1.0)
    for t in (0.0, 0.5, 1.0, 1.5):
        book.sent(t)
    assert book.lagging(1.6) and book.lag_s(1.6) == 1.6
    book.answer(1, 2.0)
    assert book.lag_s(2.0) == 1.5


def test_a_broker_that_never_echoes_blinds_only_for_a_bounded_time() -> None:
    book = EchoBook(max_lag_s=1.0, unsupported_after_s=30.0)
    t = 0.0
    while t <= 29.5:
        book.sent(t)
        t += 0.5
    assert book.lagging(29.9), "no answer yet, probes 30 s old: could be a backlog"
    assert not book.unsupported(29.9)
    book.sent(30.5)
    assert book.unsupported(30.5) and book.lag_s(30.5) == 0.0 and not book.lagging(30.5)
    for i in range(200):
        book.sent(31.0 + i)
    assert len(book.unanswered) == MAX_UNANSWERED
    assert not book.lagging(300.0), "never blinded for good"


@given(st.lists(st.floats(0.0, 5.0), min_size=1, max_size=40), st.floats(0.1, 3.0))
def test_lag_is_never_negative_and_never_exceeds_the_oldest_probe(
    gaps: list[float], max_lag: float
) -> None:
    book = EchoBook(max_lag_s=max_lag, unsupported_after_s=1e9)
    t = 0.0
    book.answer(book.sent(t), t)
    first_unanswered = None
    for gap in gaps:
        t += gap
        book.sent(t)
        if first_unanswered is None:
            first_unanswered = t
        lag = book.lag_s(t)
        assert 0.0 <= lag <= t - first_unanswered + 1e-9


def test_a_lagging_controller_sees_heartbeats_as_unknown_and_never_escalates() -> None:
    """Health while lagging (runtime/controller.py Health.snapshot): broker_up_since None, so
    a node whose heartbeat looks 10 s old because of our backlog is neither SUSPECT nor
    UNREACHABLE, even with its Lease stale."""
    lagging = context(SourceHealth(None, 0.0, broker_lagging=True))
    for phase in (Phase.HEALTHY, Phase.SUSPECT):
        d = step(node(phase), seen(10.0, lease_age=60.0, ready="Unknown"), ctx=lagging)
        assert d.signals is not None and d.signals.heartbeat is Signal.UNKNOWN
        assert d.state.phase is phase and not d.actions
