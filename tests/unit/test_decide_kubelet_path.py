"""Which kubelet signals make a live node DEGRADED, and when a recovered node is HEALTHY."""

from __future__ import annotations

from watchdog.decide.actions import RemoveOutOfServiceTaint, StartEvacuation
from watchdog.decide.config import DecideConfig, Policy
from watchdog.decide.machine import Context, decide
from watchdog.decide.observations import FenceDeclaration, NodeObservation, SourceHealth
from watchdog.decide.state import NodeState, Phase

CFG = DecideConfig()
CTX = Context(SourceHealth(broker_up_since=0.0, api_up_since=0.0), Policy())
NOW = 100.0


def alive(**kw: object) -> NodeObservation:
    base: dict[str, object] = {
        "name": "node-a",
        "last_heartbeat_at": NOW - 0.5,
        "heartbeats_received": 50,
        "boot_id": "b2",
        "fence": FenceDeclaration(True, 8.0, 5.0, device=True, watchdog_s=5.0),
        "lease_seen": True,
        "lease_renewed_at": NOW - 2.0,
        "ready": "True",
    }
    base.update(kw)
    return NodeObservation(**base)  # type: ignore[arg-type]


def test_ready_unknown_from_the_lifecycle_controller_alone_does_not_evacuate_a_live_node() -> None:
    # After a long API outage the node lifecycle controller marks every node Unknown although
    # every kubelet renews its Lease: no mass live migration off healthy nodes.
    d = decide(NodeState("node-a"), alive(ready="Unknown"), CTX, NOW, CFG)
    assert d.state.phase is Phase.HEALTHY
    assert not [a for a in d.actions if isinstance(a, StartEvacuation)]


def test_ready_false_reported_by_the_kubelet_itself_does_evacuate() -> None:
    d = decide(NodeState("node-a"), alive(ready="False"), CTX, NOW, CFG)
    assert d.state.phase is Phase.DEGRADED
    assert [a for a in d.actions if isinstance(a, StartEvacuation)]


def test_recovering_node_keeps_its_taint_until_the_kubelet_renews_its_lease() -> None:
    state = NodeState("node-a", Phase.RECOVERING, tainted=True, heartbeats_at_mark=0)
    waiting = decide(state, alive(lease_renewed_at=NOW - 60.0), CTX, NOW, CFG)
    assert waiting.state.phase is Phase.RECOVERING
    assert not [a for a in waiting.actions if isinstance(a, RemoveOutOfServiceTaint)]
    back = decide(waiting.state, alive(), CTX, NOW + 1, CFG)
    assert back.state.phase is Phase.HEALTHY
    assert [a for a in back.actions if isinstance(a, RemoveOutOfServiceTaint)]


def test_a_fencing_node_whose_kubelet_renews_again_is_not_reset() -> None:
    # After a storm hold lifts, a node whose kubelet is back before its agent (the usual boot
    # order) must not be reset: its kubelet is restarting VMs there.
    state = NodeState(
        "node-a",
        Phase.FENCING,
        unreachable_at=NOW - 60.0,
        fence_clock_from=NOW - 59.0,
        last_contact_at=NOW - 65.0,
        fence=FenceDeclaration(True, 8.0, 5.0, device=True, watchdog_s=5.0),
    )
    obs = alive(
        last_heartbeat_at=NOW - 65.0,
        lease_renewed_at=NOW - 1.0,
        ready="Unknown",
        persisted_phase="Fencing",
    )
    d = decide(state, obs, CTX, NOW, CFG)
    assert d.state.phase is Phase.SUSPECT
    assert not [
        a for a in d.actions if type(a).__name__ in ("ForceDeletePods", "TaintOutOfService")
    ]
