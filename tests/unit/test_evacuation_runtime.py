"""The evacuation runtime carries out the pure step's effects (runtime/evacuation.py): the
Events in the step's order with their texts, the metrics, the migrations asked of the
actuator; and a migration ending while a look is carried out still counts its attempt."""

from __future__ import annotations

from typing import Any, cast

from watchdog.actuate.actuator import Actuator
from watchdog.actuate.outcome import Outcome, Result
from watchdog.decide.actions import EmitEvent, EventType, StartEvacuation, StopEvacuation
from watchdog.decide.evacuation import Limits
from watchdog.decide.reasons import Reason
from watchdog.metrics import Metrics
from watchdog.observe.cluster_cache import ClusterCache
from watchdog.observe.records import MigrationRecord, VMIRecord
from watchdog.runtime.evacuation import Evacuations

NODE = "n1"
NO_POLICY = "no MigrationPolicy selects it: the KubeVirt CR's migration settings apply"


def vmi(name: str, movable: bool = True) -> VMIRecord:
    return VMIRecord(
        namespace="vms",
        name=name,
        uid=f"uid-{name}",
        node=NODE,
        phase="Running",
        ready=True,
        live_migratable="True" if movable else "False",
        live_migratable_reason=None if movable else "HostDevice",
        live_migratable_message=None,
        vm=name,
        labels=(),
        memory_bytes=1 << 30,
        priority=0,
        migrating=False,
    )


def migration(name: str, vmi_name: str, phase: str | None) -> MigrationRecord:
    return MigrationRecord("vms", name, vmi_name, phase, NODE, NODE, None)


class FakeCache:
    def __init__(self, vmis: list[VMIRecord]) -> None:
        self.vmis = vmis
        self.running = 0

    def vmis_on(self, node: str) -> tuple[VMIRecord, ...]:
        return tuple(v for v in self.vmis if v.node == node)

    def vmi(self, namespace: str, name: str) -> VMIRecord | None:
        return next((v for v in self.vmis if (v.namespace, v.name) == (namespace, name)), None)

    def migrations_from(self, node: str) -> tuple[object, ...]:
        return (object(),) * self.running

    def active_migrations(self) -> int:
        return self.running

    def migration_limits(self) -> Limits:
        return Limits(per_cluster=5, outbound_per_node=2)

    def migration_policy(self, vmi: VMIRecord) -> None:
        return None


class FakeActuator:
    def __init__(self) -> None:
        self.done: list[Any] = []
        self.events = self
        self.during_start: list[Any] = []  # callbacks run while a StartEvacuation is sent

    async def execute(self, action: Any, *, vmis: Any = ()) -> Outcome:
        if isinstance(action, StartEvacuation):
            chosen = list(vmis)
            self.done.append((action, chosen))
            for callback in self.during_start:
                callback()
            items = tuple((f"{ns}/{name}", Result.SUCCESS) for ns, name in chosen)
            return Outcome("start_evacuation", Result.SUCCESS, items=items)
        self.done.append(action)
        return Outcome(type(action).__name__, Result.SUCCESS)

    async def emit_vmi_event(
        self, namespace: str, name: str, event: str, message: str, uid: str = ""
    ) -> None:
        self.done.append(("vmi", namespace, name, event, message, uid))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(
    vmis: list[VMIRecord], timeout_s: float = 180.0
) -> tuple[Evacuations, FakeCache, FakeActuator, Metrics, Clock]:
    cache, actuator, metrics, clock = FakeCache(vmis), FakeActuator(), Metrics(), Clock()
    evac = Evacuations(
        cast(ClusterCache, cache), cast(Actuator, actuator), metrics, clock, lambda: timeout_s
    )
    return evac, cache, actuator, metrics, clock


def counted(metrics: Metrics, result: str) -> float:
    value = metrics.registry.get_sample_value("watchdog_migrations_total", {"result": result})
    return value or 0.0


def warning(event: str, message: str) -> EmitEvent:
    return EmitEvent(NODE, event, Reason.KUBELET_PATH_LOST, message, EventType.WARNING)


async def test_a_look_reports_then_migrates_in_the_steps_order_with_its_texts() -> None:
    evac, _, actuator, metrics, _ = make([vmi("pinned", movable=False), vmi("a"), vmi("b")])
    assert await evac.start(StartEvacuation(NODE)) == "success"
    assert actuator.done == [
        warning(
            "VMNotMigratable",
            "vms/pinned cannot live-migrate (HostDevice); it keeps running on the degraded node",
        ),
        (StartEvacuation(NODE), [("vms", "a"), ("vms", "b")]),
        *(
            (
                "vmi",
                "vms",
                n,
                "EvacuationMigrating",
                f"live-migrating off degraded node {NODE}; {NO_POLICY}",
                f"uid-{n}",
            )
            for n in ("a", "b")
        ),
    ]
    assert counted(metrics, "not_migratable") == 1
    assert counted(metrics, "started") == 2
    assert evac.active[NODE].reported == {("vms", "pinned")}


async def test_failed_migrations_seen_in_the_cache_end_in_giving_up_once() -> None:
    evac, cache, actuator, metrics, _ = make([vmi("a")])
    await evac.start(StartEvacuation(NODE))
    for i in range(2):
        key = f"vms/m{i}"
        assert evac.migration_changed(key, None, migration(f"m{i}", "a", "Running")) == NODE
        assert evac.migration_changed(key, None, migration(f"m{i}", "a", "Failed")) == NODE
        # The same final phase seen again counts nothing.
        evac.migration_changed(
            key, migration(f"m{i}", "a", "Failed"), migration(f"m{i}", "a", "Failed")
        )
        await evac.tick(NODE)
    assert counted(metrics, "failed") == 2
    assert evac.active[NODE].attempts == {("vms", "a"): 2}
    assert evac.active[NODE].given_up == {("vms", "a")}
    assert counted(metrics, "given_up") == 1
    assert counted(metrics, "started") == 2  # the first try and one retry
    gave_up = warning("VMNotMigratable", "vms/a: 2 migrations failed; not retrying")
    assert actuator.done.count(gave_up) == 1

    await evac.tick(NODE)
    assert actuator.done[-1] == EmitEvent(
        NODE,
        "EvacuationFinished",
        Reason.KUBELET_PATH_LOST,
        f"every live-migratable VMI left {NODE} (0 not migratable, 1 given up)",
        EventType.NORMAL,
    )
    assert counted(metrics, "given_up") == 1
    assert cache.running == 0


async def test_a_migration_that_fails_while_a_look_is_carried_out_counts_its_attempt() -> None:
    evac, _, actuator, metrics, _ = make([vmi("a"), vmi("b")])
    actuator.during_start.append(
        lambda: evac.migration_changed("vms/old", None, migration("old", "b", "Failed"))
    )
    await evac.start(StartEvacuation(NODE))
    assert counted(metrics, "failed") == 1
    assert evac.active[NODE].attempts == {("vms", "b"): 1}


async def test_the_timeout_is_reported_once_and_a_stop_ends_the_evacuation() -> None:
    evac, cache, actuator, metrics, clock = make([vmi("a")], timeout_s=60.0)
    cache.running = 5  # the cluster's limit taken: nothing starts
    await evac.start(StartEvacuation(NODE))
    clock.now += 60.0
    await evac.tick(NODE)
    assert counted(metrics, "timeout") == 0
    clock.now += 0.5
    await evac.tick_all()
    await evac.tick_all()
    timeout = warning(
        "EvacuationTimeout",
        f"evacuation of {NODE} still unfinished after 60s (1 VMIs left); "
        "VMs keep running, nothing is reset",
    )
    assert actuator.done == [timeout]
    assert counted(metrics, "timeout") == 1

    assert await evac.stop(StopEvacuation(NODE)) == "success"
    assert NODE not in evac.active
    await evac.tick(NODE)
    assert actuator.done == [timeout, StopEvacuation(NODE)]


async def test_the_loop_is_woken_for_the_time_limit_alone_and_not_after_it() -> None:
    """No polling: between changes the evacuation loop sleeps until `next_wake`, the moment
    the time limit has passed (decide/evacuation.py, `evacuation_wake_at`); a look then
    reports the timeout, and after it nothing is due for time alone."""
    evac, cache, _, metrics, clock = make([vmi("a")], timeout_s=60.0)
    cache.running = 5  # the cluster's limit taken: nothing starts, nothing finishes
    assert evac.next_wake() is None
    await evac.start(StartEvacuation(NODE))
    wake = evac.next_wake()
    assert wake is not None and clock.now + 60.0 < wake <= clock.now + 60.1
    assert evac.due(wake - 0.001) == set()
    clock.now = wake
    assert evac.due(clock.now) == {NODE}
    for node in evac.due(clock.now):
        await evac.tick(node)
    assert counted(metrics, "timeout") == 1, "the look for time alone found the timeout"
    assert evac.next_wake() is None and evac.due(clock.now + 1e6) == set()
    await evac.stop(StopEvacuation(NODE))
    assert evac.next_wake() is None


async def test_a_look_deferred_while_not_acting_comes_later_and_a_step_down_forgets_all() -> None:
    """A replica that may not act for a moment defers a due look (the loop would otherwise be
    woken again at once, spinning); one that steps down keeps neither evacuations nor looks."""
    evac, cache, _, _, clock = make([vmi("a")], timeout_s=60.0)
    cache.running = 5
    await evac.start(StartEvacuation(NODE))
    wake = evac.next_wake()
    assert wake is not None
    clock.now = wake
    evac.defer(evac.due(clock.now), clock.now + 1.0)
    assert evac.due(clock.now) == set() and evac.next_wake() == clock.now + 1.0
    evac.forget_all()
    assert evac.active == {} and evac.next_wake() is None
