"""Every phase change the decision core may make, as data (DESIGN §4).

Owns: `TRANSITIONS`, the (from, to, reason) triples that `machine.py`'s `move()` — the only
place a phase changes — accepts; any other is a bug in the machine, refused where it happens
(`IllegalTransition`) instead of written to the Node. And the Mermaid diagram of the table,
which docs/ARCHITECTURE.md carries byte for byte (tests/unit/test_transition_table.py; print it
with `python3 -m watchdog.decide.transitions`).

Must not: decide anything. Which edge is taken, and when, is machine.py's.
"""

from __future__ import annotations

from itertools import product

from watchdog.decide.reasons import Reason
from watchdog.decide.state import Phase

H, S, D = Phase.HEALTHY, Phase.SUSPECT, Phase.DEGRADED
U, F, RS, R, RC = Phase.UNREACHABLE, Phase.FENCING, Phase.RESETTING, Phase.RESET, Phase.RECOVERING
M = Phase.MAINTENANCE

_SILENT = (Reason.HEARTBEAT_STALE, Reason.AGENT_OFFLINE)
_CORROBORATED = (Reason.CORROBORATED_LEASE, Reason.CORROBORATED_READY, Reason.CORROBORATED_PEERS)
_BACK = (Reason.NODE_BACK, Reason.NODE_REBOOTED)

TRANSITIONS: frozenset[tuple[Phase, Phase, Reason]] = frozenset(
    [
        # Detection: silence (or the agent's Last Will) makes a node suspect from any phase in
        # which it was heard; enough fresh heartbeats in a row make it healthy again.
        *((p, S, why) for p, why in product((H, D, RC), _SILENT)),
        (S, H, Reason.HEARTBEAT_FRESH),
        # The agent heartbeats but the kubelet's Lease or Ready is stale: evacuate, never reset.
        (H, D, Reason.KUBELET_PATH_LOST),
        (S, D, Reason.KUBELET_PATH_LOST),
        (D, H, Reason.KUBELET_PATH_BACK),
        # A second, independent source confirms the silence.
        *((S, U, why) for why in _CORROBORATED),
        # The declaration is written: the fence clock and the reset period run.
        (U, F, Reason.PERIOD_RUNNING),
        # Withdrawals: a heartbeat while being fenced (before any reset action), or the
        # kubelet renewing its Lease again.
        (U, S, Reason.HEARTBEAT_FRESH),
        (F, S, Reason.HEARTBEAT_FRESH),
        (F, S, Reason.KUBELET_PATH_BACK),
        # Fencing proven and the period over: the reset.
        (F, RS, Reason.RESET_STARTED),
        (RS, R, Reason.LAUNCHER_PODS_GONE),
        # The node is heard again: after a reset, or while still fenced or tainted.
        *((p, RC, why) for p, why in product((S, U, F, R), _BACK)),
        (RC, H, Reason.RECOVERED),
        # Planned maintenance (decide/maintenance.py): a corroborated silence of a node taken
        # out of service with no VMI on it is held, not declared; it is judged again from
        # SUSPECT once a VMI shows on it or its kubelet renews, and is healthy when heard.
        (S, M, Reason.IN_MAINTENANCE),
        (M, S, Reason.MAINTENANCE_ENDED),
        (M, S, Reason.KUBELET_PATH_BACK),
        (M, H, Reason.HEARTBEAT_FRESH),
    ]
)


class IllegalTransition(AssertionError):
    """The machine tried a phase change that is not in TRANSITIONS: a bug, never a decision."""


def check(source: Phase, target: Phase, reason: Reason) -> None:
    if (source, target, reason) not in TRANSITIONS:
        raise IllegalTransition(f"{source.value} → {target.value} ({reason.value})")


_ORDER = list(Phase)


def mermaid() -> str:
    """The table as a Mermaid state diagram: one edge per (from, to), its reasons joined."""
    edges: dict[tuple[Phase, Phase], list[str]] = {}
    for source, target, reason in TRANSITIONS:
        edges.setdefault((source, target), []).append(reason.value)
    lines = ["stateDiagram-v2", f"    [*] --> {H.value}"]
    for source, target in sorted(edges, key=lambda e: (_ORDER.index(e[0]), _ORDER.index(e[1]))):
        reasons = ", ".join(sorted(edges[(source, target)]))
        lines.append(f"    {source.value} --> {target.value}: {reasons}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(mermaid(), end="")
