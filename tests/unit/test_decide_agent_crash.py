"""A dead agent on a live node cannot fence it: its Last Will voids the declared fence."""

from __future__ import annotations

from watchdog.decide.heartbeats import Heartbeat, HeartbeatBook
from watchdog.decide.observations import FenceDeclaration

ARMED = FenceDeclaration(True, 8.0, 5.0, device=True, watchdog_s=5.0)


def book_with_heartbeat(at: float) -> HeartbeatBook:
    book = HeartbeatBook(will_fresh_s=3.0)
    book.set_known({"node-1"})
    book.accept(Heartbeat("node-1", "boot-a", 1, 0.0, "1", ARMED), at)
    return book


def test_will_while_heartbeats_are_fresh_means_the_agent_crashed_and_the_fence_is_void() -> None:
    book = book_with_heartbeat(at=100.0)
    rec = book.status("node-1", online=False, now=100.5)
    assert rec is not None and rec.offline
    assert rec.fence is not None and not rec.fence.armed


def test_will_long_after_the_last_heartbeat_is_a_silent_node_and_the_fence_stands() -> None:
    book = book_with_heartbeat(at=100.0)
    rec = book.status("node-1", online=False, now=107.5)  # keepalive-driven Will of a dead node
    assert rec is not None and rec.offline
    assert rec.fence == ARMED


def test_a_restarted_agent_declares_its_fence_again() -> None:
    book = book_with_heartbeat(at=100.0)
    book.status("node-1", online=False, now=100.2)
    rec = book.accept(Heartbeat("node-1", "boot-a", 2, 0.0, "1", ARMED), 105.0)
    assert rec.fence == ARMED and not rec.offline
