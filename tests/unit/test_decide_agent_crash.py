"""A dead agent on a live node: its Last Will voids a weak fence (nothing is left to fence the
node), while a fence backed by a watchdog device stands (the device resets the node)."""

from __future__ import annotations

import pytest

from watchdog.decide.heartbeats import Heartbeat, HeartbeatBook
from watchdog.decide.observations import FenceDeclaration

DEVICE = FenceDeclaration(True, 8.0, 5.0, device=True, watchdog_s=5.0)
WEAK = FenceDeclaration(True, 8.0, 5.0)


def book_with_heartbeat(at: float, fence: FenceDeclaration) -> HeartbeatBook:
    book = HeartbeatBook(will_fresh_s=3.0)
    book.set_known({"node-1"})
    book.accept(Heartbeat("node-1", "boot-a", 1_000, 0.0, "1", fence), at)
    return book


def test_will_while_heartbeats_are_fresh_voids_a_weak_fence() -> None:
    book = book_with_heartbeat(at=100.0, fence=WEAK)
    rec = book.status("node-1", online=False, now=100.5)
    assert rec is not None and rec.offline
    assert rec.fence is not None and not rec.fence.armed


def test_will_while_heartbeats_are_fresh_leaves_a_device_backed_fence_standing() -> None:
    # the device resets the node after the dead agent's last pet: the fence still holds
    book = book_with_heartbeat(at=100.0, fence=DEVICE)
    rec = book.status("node-1", online=False, now=100.5)
    assert rec is not None and rec.offline and rec.fence == DEVICE


@pytest.mark.parametrize("fence", [WEAK, DEVICE], ids=["weak", "device"])
def test_will_long_after_the_last_heartbeat_is_a_silent_node_and_the_fence_stands(
    fence: FenceDeclaration,
) -> None:
    book = book_with_heartbeat(at=100.0, fence=fence)
    rec = book.status("node-1", online=False, now=107.5)  # keepalive-driven Will of a dead node
    assert rec is not None and rec.offline
    assert rec.fence == fence


def test_a_restarted_agent_is_heard_and_declares_its_fence_again() -> None:
    # seq is milliseconds on the boot's monotonic clock: the new process continues above it
    book = book_with_heartbeat(at=100.0, fence=WEAK)
    book.status("node-1", online=False, now=100.2)
    rec = book.accept(Heartbeat("node-1", "boot-a", 5_000, 0.0, "1", WEAK), 105.0)
    assert rec.fence == WEAK and not rec.offline


@pytest.mark.parametrize("fence", [WEAK, DEVICE], ids=["weak", "device"])
def test_a_deliberate_stop_releases_any_fence(fence: FenceDeclaration) -> None:
    # "stopped": the agent disarmed its device and cleared its boot record
    book = book_with_heartbeat(at=100.0, fence=fence)
    rec = book.status("node-1", online=False, now=100.5, released=True)
    assert rec is not None and rec.offline
    assert rec.fence is not None and not rec.fence.armed
