"""Random fault schedules for the protocol simulation (world.py), drawn from a seed, played, and
checked; a failure says its seed, and the seed replays it exactly (`replay`).

Owns: the fault vocabulary (what each fault does to the world and what undoes it), drawing a
schedule, playing it (a warm-up, the faults, every fault healed, a settling time), and the
campaign over many seeds with its counts.

Must not: print (the CLI does) or read a clock: everything here runs in virtual time.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from chaos.protosim.world import SHIPPED, Node, Variant, Violation, World

WARMUP_S = 15.0
WINDOW_S = 90.0  # faults start within this window after the warm-up
MAX_FAULT_S = 60.0
SETTLE_S = 150.0  # after every fault is healed: long enough for a reset and a reboot


@dataclass(frozen=True)
class Fault:
    kind: str
    node: str | None  # None: the whole cluster (broker or API server)
    at: float
    duration: float

    def describe(self) -> str:
        where = f" {self.node}" if self.node else ""
        return f"{self.kind}{where} at {self.at:.1f}s for {self.duration:.1f}s"


# kind → (on a node?, what it does, what undoes it at its end; None: nothing to undo)
Apply = Callable[[World, Node | None], None]


def _power_off(w: World, n: Node | None) -> None:
    assert n is not None
    w.power_off(n, "fault")


def _power_on(w: World, n: Node | None) -> None:
    assert n is not None
    w.power_on(n)


def _reboot(w: World, n: Node | None) -> None:
    assert n is not None
    w.reboot(n, "fault")


def _set(attr: str, value: object) -> Apply:
    def apply(w: World, n: Node | None) -> None:
        assert n is not None
        setattr(n, attr, value)
        w.mark(n.name)

    return apply


def _agent(state: str) -> Apply:
    def apply(w: World, n: Node | None) -> None:
        assert n is not None
        if not n.powered:
            return
        if state == "dead" and n.agent == "running" and w.broker_up and n.broker_link:
            # The broker delivers its Last Will at once (the socket closed).
            w.book.status(n.name, False, w.t)
            w.mark(n.name)
        if state == "running" and n.agent != "running":
            n.started_at = w.t
            n.declared_phase = n.declared_since = None
        n.agent = state

    return apply


def _restart_agent(w: World, n: Node | None) -> None:
    _agent("dead")(w, n)
    _agent("running")(w, n)


def _cluster(attr: str, up: bool) -> Apply:
    def apply(w: World, n: Node | None) -> None:
        setattr(w, attr, up)
        if attr == "broker_up":
            w.controller.broker_connection(up)
        else:
            w.controller.api_connection(up)
        w.mark_all()

    return apply


def _leader(leading: bool) -> Apply:
    """No replica leads for a while (the leader died; the standby takes the Lease over once
    it expires), then one does: it resumes every node from the annotations (runtime/
    controller.py, `become_leader`), with the heartbeat book it kept warm as a standby."""

    def apply(w: World, n: Node | None) -> None:
        if leading:
            w.controller.become_leader()
            w.mark_all()
        else:
            w.controller.step_down()

    return apply


KINDS: dict[str, tuple[bool, Apply, Apply | None]] = {
    "power-off": (True, _power_off, _power_on),
    "reboot": (True, _reboot, None),
    "partition": (True, _set("broker_link", False), _set("broker_link", True)),
    "broker-link-cut": (True, _set("broker_link", False), _set("broker_link", True)),
    "api-link-cut": (True, _set("api_link", False), _set("api_link", True)),
    "kubelet-stop": (True, _set("kubelet", False), _set("kubelet", True)),
    "agent-freeze": (True, _agent("frozen"), _agent("running")),
    "agent-kill": (True, _agent("dead"), _agent("running")),
    "agent-restart": (True, _restart_agent, None),
    "fence-fails": (True, _set("fence_fails", True), _set("fence_fails", False)),
    "broker-outage": (False, _cluster("broker_up", False), _cluster("broker_up", True)),
    "api-outage": (False, _cluster("api_up", False), _cluster("api_up", True)),
    "leader-failover": (False, _leader(False), _leader(True)),
}
# A partition cuts both of the node's paths.
PARTITION_API = (_set("api_link", False), _set("api_link", True))


@dataclass
class Schedule:
    seed: int
    nodes: int
    faults: list[Fault]

    def describe(self) -> str:
        faults = "; ".join(f.describe() for f in self.faults)
        return f"seed {self.seed}: {self.nodes} nodes; {faults}"


def draw(seed: int, kinds: list[str] | None = None) -> Schedule:
    rng = random.Random(seed)
    nodes = rng.randint(3, 6)
    names = [f"node-{i}" for i in range(1, nodes + 1)]
    pool = kinds or sorted(KINDS)
    faults = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(pool)
        on_node = KINDS[kind][0]
        at = WARMUP_S + rng.uniform(0.0, WINDOW_S)
        faults.append(
            Fault(kind, rng.choice(names) if on_node else None, at, rng.uniform(1.0, MAX_FAULT_S))
        )
    return Schedule(seed, nodes, sorted(faults, key=lambda f: f.at))


@dataclass
class Outcome:
    schedule: Schedule
    violation: str | None
    resets: int
    trace: list[str] = field(default_factory=list)


def play(schedule: Schedule, *, trace: bool = False, variant: Variant = SHIPPED) -> Outcome:
    """Plays `schedule` on a fresh world seeded by it; the first invariant broken, if any."""
    lines: list[str] | None = [] if trace else None
    world = World(schedule.nodes, random.Random(schedule.seed * 7919 + 1), lines, variant)
    world.start()
    end = WARMUP_S
    try:
        for f in schedule.faults:
            _, apply, undo = KINDS[f.kind]
            node = world.nodes[f.node] if f.node else None
            world.at(f.at, _logged(world, f"fault: {f.describe()}", apply, node))
            if f.kind == "partition":
                world.at(f.at, _logged(world, "", PARTITION_API[0], node))
            if undo is not None:
                heal = f.at + f.duration
                world.at(heal, _logged(world, f"healed: {f.kind}", undo, node))
                if f.kind == "partition":
                    world.at(heal, _logged(world, "", PARTITION_API[1], node))
                end = max(end, heal)
            end = max(end, f.at)
        world.run_until(end)
        world.at(world.t, lambda: _heal_all(world))
        world.run_until(end + SETTLE_S)
        world.check_everything_runs()
    except Violation as v:
        return Outcome(schedule, str(v), world.resets, lines or [])
    return Outcome(schedule, None, world.resets, lines or [])


def _logged(world: World, text: str, apply: Apply, node: Node | None) -> Callable[[], None]:
    def run() -> None:
        if text:
            world.log(text)
        apply(world, node)

    return run


def _heal_all(world: World) -> None:
    """Whatever is still broken is mended (a machine left off is switched on)."""
    for attr in ("broker_up", "api_up"):
        if not getattr(world, attr):
            _cluster(attr, True)(world, None)
    if not world.controller.acting:
        _leader(True)(world, None)
    for n in world.nodes.values():
        n.broker_link = n.api_link = n.kubelet = True
        n.fence_fails = False
        if n.powered and n.agent != "running":
            _agent("running")(world, n)
        if not n.powered:
            world.power_on(n)
    world.log("every fault healed")


@dataclass
class Campaign:
    schedules: int = 0
    violations: list[Outcome] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    resets: int = 0


def campaign(
    first_seed: int, count: int, kinds: list[str] | None = None, variant: Variant = SHIPPED
) -> Campaign:
    result = Campaign()
    for seed in range(first_seed, first_seed + count):
        outcome = play(draw(seed, kinds), variant=variant)
        result.schedules += 1
        result.resets += outcome.resets
        result.faults.update(f.kind for f in outcome.schedule.faults)
        if outcome.violation is not None:
            result.violations.append(outcome)
    return result


def replay(seed: int, kinds: list[str] | None = None, variant: Variant = SHIPPED) -> Outcome:
    """The same schedule and the same world as in the campaign, with its trace."""
    return play(draw(seed, kinds), trace=True, variant=variant)
