"""Following reset VMs until they run elsewhere: when a VM counts as rescheduled, how fast."""

from __future__ import annotations

from watchdog.decide.follow import FollowBook, Followed, Rescheduled
from watchdog.decide.reset_plan import Outcome


def followed(vm: str = "vm1", node: str = "node-a", deleted_at: float = 100.0) -> Followed:
    return Followed(
        namespace="vms",
        vm=vm,
        old_node=node,
        outcome=Outcome.EXPECT_RESTART,
        last_contact_at=70.0,
        unreachable_at=80.0,
        deleted_at=deleted_at,
    )


def test_a_vm_running_on_another_node_is_rescheduled_with_both_latencies() -> None:
    book = FollowBook()
    book.start(followed())
    assert book.vmi_changed("vms", "vm1", "node-b", "Running", 130.0) == Rescheduled(
        "vms", "vm1", "node-a", "node-b", reschedule_s=30.0, failover_s=60.0
    )
    assert len(book) == 0  # reported once


def test_failover_latency_is_unknown_without_a_last_contact() -> None:
    book = FollowBook()
    f = followed()
    book.start(Followed(f.namespace, f.vm, f.old_node, f.outcome, None, None, f.deleted_at))
    r = book.vmi_changed("vms", "vm1", "node-b", "Running", 130.0)
    assert r is not None and r.failover_s is None and r.reschedule_s == 30.0


def test_scheduling_or_the_old_node_or_an_unknown_vm_do_not_count() -> None:
    book = FollowBook()
    book.start(followed())
    assert book.vmi_changed("vms", "vm1", "node-b", "Scheduling", 110.0) is None
    assert book.vmi_changed("vms", "vm1", None, "Running", 111.0) is None
    assert book.vmi_changed("vms", "vm1", "node-a", "Running", 112.0) is None  # same node
    assert book.vmi_changed("vms", "other", "node-b", "Running", 113.0) is None
    assert [f.vm for f in book.pending()] == ["vm1"]


def test_a_repeated_delete_does_not_restart_the_clock() -> None:
    book = FollowBook()
    book.start(followed(deleted_at=100.0))
    book.start(followed(deleted_at=150.0))  # retry, or a new leader deleting again
    r = book.vmi_changed("vms", "vm1", "node-b", "Running", 160.0)
    assert r is not None and r.reschedule_s == 60.0


def test_dropping_a_node_that_came_back_forgets_only_its_vms() -> None:
    book = FollowBook()
    book.start(followed("vm1", "node-a"))
    book.start(followed("vm2", "node-a"))
    book.start(followed("vm3", "node-c"))
    assert sorted(f.vm for f in book.drop_node("node-a")) == ["vm1", "vm2"]
    assert [f.vm for f in book.pending()] == ["vm3"]
