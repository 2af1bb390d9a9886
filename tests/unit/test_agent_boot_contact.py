"""The agent's fence across the life of one boot: armed only by contact, kept across restarts.

Runs the agent's own bookkeeping (`Agent.resume_boot`, `contact_proven`, `deadline`) and its
boot record on a real directory; a restart is a new `Agent` on the same directory and boot, a
failing write is the directory made unusable (a file where the directory should be).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from watchdog.heartbeat.agent import Agent
from watchdog.heartbeat.boot_record import (
    BootRecord,
    BootRecordError,
    BootRecordStore,
    parse_record,
)
from watchdog.heartbeat.fence import BootContact, fence_deadline
from watchdog.runtime.settings import Settings

AFTER_S = 8.0
BOOT = "6f1c0d2e-boot"


def agent(state: Path, *, armed: bool = True) -> Agent:
    return Agent(
        Settings(
            node_name="node-a",
            boot_state_dir=state,
            self_fence_after_s=AFTER_S,
            fence_command="true" if armed else None,
        )
    )


class Boot:
    """One boot of a machine: its boot record's directory, which writes can be made to fail."""

    def __init__(self, root: Path) -> None:
        self.real = root / "real"
        self.real.mkdir(parents=True, exist_ok=True)
        self.broken = root / "not-a-directory"
        self.broken.write_text("x")
        self.link = root / "run"
        self.writable(True)

    def writable(self, ok: bool) -> None:
        self.ok = ok
        self.link.unlink(missing_ok=True)
        self.link.symlink_to(self.real if ok else self.broken)


def test_a_fresh_agent_is_not_armed_and_has_no_deadline(tmp_path: Path) -> None:
    a = agent(tmp_path / "run")
    a.resume_boot(BOOT, 100.0)
    assert a.deadline() is None and not a.armed
    assert not a.declaration.armed
    a.contact_proven(101.0)
    assert a.armed and a.declaration.armed
    assert a.deadline() == 101.0 + AFTER_S


def test_an_unarmed_agent_writes_no_record(tmp_path: Path) -> None:
    a = agent(tmp_path / "run", armed=False)
    a.resume_boot(BOOT, 100.0)
    a.contact_proven(101.0)
    assert not a.declaration.armed
    assert not (tmp_path / "run").exists()
    assert a.deadline() == 101.0 + AFTER_S  # still computed: it logs when it would fence


def test_armed_is_declared_only_once_the_contact_is_recorded(tmp_path: Path) -> None:
    boot = Boot(tmp_path)
    a = agent(boot.link)
    a.resume_boot(BOOT, 100.0)
    boot.writable(False)
    a.contact_proven(101.0)
    assert not a.declaration.armed and a.deadline() is None, "unrecorded: not armed"
    assert a.statistics()["boot_record_error"]
    boot.writable(True)
    a.contact_proven(102.0)
    assert a.declaration.armed and a.deadline() == 102.0 + AFTER_S


def test_a_record_of_an_earlier_boot_is_not_ours(tmp_path: Path) -> None:
    first = agent(tmp_path / "run")
    first.resume_boot("boot-1", 10.0)
    first.contact_proven(11.0)
    second = agent(tmp_path / "run")
    second.resume_boot("boot-2", 5.0)  # the clock starts again at a new boot
    assert second.deadline() is None and not second.declaration.armed


def test_an_unusable_record_of_this_boot_reads_as_armed_from_now(tmp_path: Path) -> None:
    """Never as "never armed": an earlier process may have declared an armed fence."""
    state = tmp_path / "run"
    state.mkdir()
    (state / "agent-contact.json").write_text('{"boot_id": "' + BOOT + '", "first_contact": "x"}')
    a = agent(state)
    a.resume_boot(BOOT, 50.0)
    assert a.declaration.armed and a.deadline() == 50.0 + AFTER_S
    assert "first_contact" in str(a.statistics()["boot_record_error"])
    # and it is rewritten as a good record
    assert parse_record((state / "agent-contact.json").read_text(), BOOT, 60.0) == BootRecord(
        BOOT, 50.0, 50.0
    )


# Events of one boot: a proven contact, a restart of the agent process, a change of whether
# the boot record can be written. Times only move forward.
Event = tuple[str, float, bool]
events = st.lists(
    st.tuples(
        st.sampled_from(["contact", "contact", "contact", "restart", "writes"]),
        st.floats(min_value=0.0, max_value=20.0),
        st.booleans(),
    ),
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(events=events)
def test_no_fence_before_first_contact_and_restarts_never_extend_the_deadline(
    tmp_path_factory: pytest.TempPathFactory, events: list[Event]
) -> None:
    """Against one agent process that saw every contact and never restarted (the reference):
    the running process never has a later deadline, has none before a first contact, declares
    `armed` exactly when it has one, and stays armed across a restart once it declared it."""
    boot = Boot(tmp_path_factory.mktemp("boot"))
    now = 1000.0
    reference = BootContact()
    current = agent(boot.link)
    current.resume_boot(BOOT, now)
    for kind, dt, flag in events:
        now += dt
        if kind == "contact":
            current.contact_proven(now)
            reference = reference.seen(now)
        elif kind == "restart":
            was_armed = current.declaration.armed
            current = agent(boot.link)
            current.resume_boot(BOOT, now)
            if was_armed and boot.ok:
                assert current.declaration.armed, "a restart escaped the fence it had declared"
        else:
            boot.writable(flag)
        deadline = current.deadline()
        assert current.declaration.armed == (deadline is not None)
        if reference.first is None:
            assert deadline is None, "fenced before any contact in this boot"
        ref_deadline = reference.deadline(AFTER_S)
        if deadline is not None:
            assert ref_deadline is not None and deadline <= ref_deadline, (
                "a restart moved the deadline later than the latest contact allows"
            )


def test_fence_deadline_counts_from_the_latest_contact_only() -> None:
    assert fence_deadline(None, AFTER_S) is None
    assert fence_deadline(3.0, AFTER_S) == 3.0 + AFTER_S
    assert BootContact().seen(5.0).seen(4.0) == BootContact(5.0, 5.0)


# --- the record's parser refuses, never crashes ---------------------------------------------


@settings(max_examples=300)
@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_any_text_is_a_record_none_or_a_refusal(text: str) -> None:
    try:
        parse_record(text, BOOT, 100.0)
    except BootRecordError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=10,
)


@settings(max_examples=300)
@given(first=json_values, last=json_values)
def test_any_field_values_are_a_record_or_a_refusal(first: object, last: object) -> None:
    text = json.dumps({"boot_id": BOOT, "first_contact": first, "last_contact": last})
    try:
        record = parse_record(text, BOOT, 100.0)
    except BootRecordError:
        return
    assert record is not None and 0 <= record.first_contact <= record.last_contact <= 100.0


@pytest.mark.parametrize(
    ("doc", "why"),
    [
        ({"boot_id": BOOT, "first_contact": 1, "last_contact": 200}, "later than now"),
        ({"boot_id": BOOT, "first_contact": 5, "last_contact": 2}, "after last_contact"),
        ({"boot_id": BOOT, "first_contact": True, "last_contact": 2}, "not a number"),
        ({"first_contact": 1, "last_contact": 2}, "boot_id missing"),
    ],
)
def test_impossible_records_are_refused_with_the_field_named(
    doc: dict[str, object], why: str
) -> None:
    with pytest.raises(BootRecordError, match=why):
        parse_record(json.dumps(doc), BOOT, 100.0)


def test_the_store_round_trips_and_bounds_what_it_reads(tmp_path: Path) -> None:
    store = BootRecordStore(tmp_path / "run")
    assert store.load(BOOT, 10.0) is None
    store.save(BootRecord(BOOT, 1.0, 2.0))
    assert store.load(BOOT, 10.0) == BootRecord(BOOT, 1.0, 2.0)
    assert store.load("another-boot", 10.0) is None
    store.path.write_text(" " * 5000)
    with pytest.raises(BootRecordError, match="larger than"):
        store.load(BOOT, 10.0)
