"""The transition table (watchdog/decide/transitions.py) is what the machine does, all of it.

- `move()` refuses an edge that is not in the table (the whole decision suite runs through it,
  and the hypothesis simulations of test_decide_properties.py with it);
- every edge of the table is taken by some single-step row: the rows of
  test_decide_transitions.py (DETECTION, RECOVERY) and, for the edges they do not show, the rows
  below, each run here through the real `decide`;
- docs/ARCHITECTURE.md carries the diagram generated from the table, byte for byte.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from watchdog.decide.config import DecideConfig
from watchdog.decide.machine import Context
from watchdog.decide.observations import NodeObservation
from watchdog.decide.reasons import Reason
from watchdog.decide.state import NodeState, Phase
from watchdog.decide.transitions import TRANSITIONS, IllegalTransition, check, mermaid

from .decide_helpers import context, node, seen, step
from .test_decide_transitions import DETECTION, PERIOD, RECOVERY, SELF, dead

H, S, D = Phase.HEALTHY, Phase.SUSPECT, Phase.DEGRADED
U, F, RS, R, RC = Phase.UNREACHABLE, Phase.FENCING, Phase.RESETTING, Phase.RESET, Phase.RECOVERING
M = Phase.MAINTENANCE
ARCHITECTURE = Path(__file__).resolve().parents[2] / "docs" / "ARCHITECTURE.md"
BEGIN, END = "```mermaid\n", "```\n"

Transition = tuple[Phase, Phase, Reason]

MORE_ROWS = [
    pytest.param(
        node(D),
        seen(0.5, offline=True),
        None,
        [(D, S, Reason.AGENT_OFFLINE)],
        id="a degraded node's agent leaves its Last Will: suspect",
    ),
    pytest.param(
        node(RC),
        seen(0.5, offline=True),
        None,
        [(RC, S, Reason.AGENT_OFFLINE)],
        id="a recovering node's agent leaves its Last Will: suspect",
    ),
    pytest.param(
        node(U),
        seen(0.5, received=101),
        None,
        [(U, S, Reason.HEARTBEAT_FRESH)],
        id="a heartbeat before the declaration was even written withdraws it",
    ),
    pytest.param(
        node(U),
        seen(0.5, received=103, boot_id="boot-2"),
        None,
        [(U, RC, Reason.NODE_REBOOTED), (RC, H, Reason.RECOVERED)],
        id="an unreachable node heard from a new boot has rebooted: recovered",
    ),
    pytest.param(
        node(F),
        seen(40.0, lease_age=1.0, ready="Unknown"),
        None,
        [(F, S, Reason.KUBELET_PATH_BACK)],
        id="a kubelet renewing its Lease after the silence stops the fencing",
    ),
    pytest.param(
        node(S, tainted=True),
        seen(0.5, received=103),
        None,
        [(S, RC, Reason.NODE_BACK), (RC, H, Reason.RECOVERED)],
        id="a node that went silent while still tainted is back: recovering",
    ),
    pytest.param(
        node(S, tainted=True),
        seen(0.5, received=103, boot_id="boot-2"),
        None,
        [(S, RC, Reason.NODE_REBOOTED), (RC, H, Reason.RECOVERED)],
        id="a node that went silent while still tainted is back from a new boot",
    ),
    pytest.param(
        node(F, fence_clock_from=1000.0 - 18.0),
        dead(persisted="Fencing"),
        SELF,
        [(F, RS, Reason.RESET_STARTED)],
        id="period and safe delay elapsed on an armed fence: the reset",
    ),
    pytest.param(
        node(RS),
        dead(launcher_pods=(), received=150),
        None,
        [(RS, R, Reason.LAUNCHER_PODS_GONE)],
        id="the launcher pods are gone: reset",
    ),
    pytest.param(
        node(S),
        dead(launcher_pods=(), cordoned=True),
        None,
        [(S, M, Reason.IN_MAINTENANCE)],
        id="a cordoned node with no VMI goes down: maintenance, not unreachable",
    ),
    pytest.param(
        node(M, heartbeats_at_mark=100),
        dead(launcher_pods=(), cordoned=True, vmis_here=1),
        None,
        [
            (M, S, Reason.MAINTENANCE_ENDED),
            (S, U, Reason.CORROBORATED_LEASE),
            (U, F, Reason.PERIOD_RUNNING),
        ],
        id="a VMI shows on a silent node in maintenance: judged again",
    ),
    pytest.param(
        node(M, heartbeats_at_mark=100),
        seen(0.5, received=103, cordoned=True),
        None,
        [(M, H, Reason.HEARTBEAT_FRESH)],
        id="heard again after maintenance: healthy",
    ),
    pytest.param(
        node(M, heartbeats_at_mark=100, last_contact_at=1000.0 - 40.0),
        seen(40.0, lease_age=1.0, cordoned=True),
        None,
        [(M, S, Reason.KUBELET_PATH_BACK)],
        id="a kubelet renewing again after maintenance: suspect, never declared",
    ),
]


@pytest.mark.parametrize(("state", "obs", "cfg", "expected"), MORE_ROWS)
def test_the_edges_no_table_row_shows(
    state: NodeState,
    obs: NodeObservation,
    cfg: DecideConfig | None,
    expected: list[Transition],
) -> None:
    ctx: Context = context(policy=PERIOD)
    assert list(step(state, obs, cfg=cfg, ctx=ctx).transitions) == expected


def test_every_edge_of_the_table_is_taken_by_a_row_and_every_row_takes_table_edges() -> None:
    rows = [p.values[3] for p in DETECTION] + [p.values[3] for p in RECOVERY]
    rows += [p.values[3] for p in MORE_ROWS]
    taken = {t for row in rows for t in row}  # type: ignore[attr-defined]
    assert taken - TRANSITIONS == set()
    assert sorted(TRANSITIONS - taken, key=str) == []


@pytest.mark.parametrize(
    "edge",
    [
        (H, RS, Reason.RESET_STARTED),  # a reset without fencing
        (S, F, Reason.PERIOD_RUNNING),  # a declaration without corroboration
        (R, H, Reason.RECOVERED),  # recovered without the taint's removal
        (S, U, Reason.HEARTBEAT_STALE),  # unreachable on the heartbeat alone
    ],
)
def test_an_edge_outside_the_table_is_refused(edge: Transition) -> None:
    with pytest.raises(IllegalTransition, match=f"{edge[0].value} → {edge[1].value}"):
        check(*edge)


def test_the_architecture_diagram_is_the_table() -> None:
    text = ARCHITECTURE.read_text()
    start = text.index(BEGIN) + len(BEGIN)
    shown = text[start : text.index(END, start)]
    assert shown == mermaid(), (
        "docs/ARCHITECTURE.md's state diagram differs from the table; paste the output of "
        "`python3 -m watchdog.decide.transitions` between its ```mermaid fences"
    )
