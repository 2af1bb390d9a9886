"""Cluster-wide holds: conditions under which no node may be reset (DESIGN §4)."""

from __future__ import annotations

from collections.abc import Iterable

from watchdog.decide.config import DecideConfig, FenceMode, Policy
from watchdog.decide.observations import SourceHealth
from watchdog.decide.reasons import Reason
from watchdog.decide.state import DOWN_PHASES, STORM_PHASES, Phase

# Holds during which cut-off agents may be sparing themselves by quorum (decide/quorum.py)
# while the controller cannot count them: more than half of the nodes are silent, or it hears
# no heartbeat at all (its broker connection is down, or its ingest lags). A node held by one of
# these waits its whole safe delay again once the hold ends (decide/machine.py). Not APIDown:
# the controller still hears heartbeats then, so QuorumLost shows a spare as it would anyway.
BLIND_HOLDS = frozenset({Reason.HOLD_QUORUM, Reason.HOLD_BROKER_DOWN, Reason.HOLD_INGEST_LAG})


def silent_phases(cfg: DecideConfig) -> frozenset[Phase]:
    """The phases the quorum hold counts as silent: SUSPECT, MAINTENANCE and the phases a storm
    counts (a node already reset, in the modes where every reset has its own proof, rebooted:
    its agent has no contact in its new boot and answers nobody `cut`). A node in maintenance
    is silent like any other: the controller cannot tell it switched off from cut off with the
    others, whose majority it may complete."""
    return frozenset({Phase.SUSPECT, Phase.MAINTENANCE}) | storm_phases(cfg)


def storm_phases(cfg: DecideConfig) -> frozenset[Phase]:
    """The phases a storm counts.

    Where every reset needs its own proof that the node stopped — mode self (the agent's
    device-backed fence and the safe delay) or power (the BMC's read-back off, else the same
    self-fence proof), weak fences refused — a node already reset does not count: its failover
    is over, and the next failure is proven on its own. A partition that grows one node at a
    time then resets each node it cuts off, each one proven stopped.

    Where a reset rests on something a node cannot prove by itself — mode external (a hook's
    word), manual, or weak self-fences accepted — nodes already reset keep counting: the storm
    hold is then the only running total that stops a slowly growing partition at the
    threshold (at the cost of holding an unrelated later failure until a node comes back)."""
    proven = cfg.fence_mode in (FenceMode.SELF, FenceMode.POWER) and not cfg.accept_weak_fence
    return STORM_PHASES if proven else DOWN_PHASES


def is_storm(phases: Iterable[Phase], total_nodes: int, cfg: DecideConfig) -> bool:
    """Too many nodes going down at once looks exactly like a partition around the controller
    (which phases count: `storm_phases`)."""
    counted = storm_phases(cfg)
    down = sum(1 for p in phases if p in counted)
    if down == 0 or total_nodes <= 0:
        return False
    return down > cfg.storm_max_unreachable or down / total_nodes >= cfg.storm_max_fraction


# A node held by the storm is decided again just after the hold ends (never exactly at it: the
# hold is still in force at `until` itself).
STORM_WAKE_AFTER_S = 0.01


def storm_hold_until(
    storm: bool, until: float | None, now: float, cfg: DecideConfig
) -> float | None:
    """When the storm hold ends: it outlives the storm by a Lease staleness period (a returning
    kubelet renews within it, which vetoes its node's reset; see cluster_holds)."""
    return now + cfg.lease_stale_after_s if storm else until


def wake_after_storm(wake: float | None, until: float | None) -> float | None:
    """The wake-up of a node the storm holds: held nodes schedule none of their own, so the
    earlier of its own and just after the hold ends."""
    if until is None:
        return wake
    after = until + STORM_WAKE_AFTER_S
    return after if wake is None or after < wake else wake


def cluster_holds(
    phases: Iterable[Phase],
    total_nodes: int,
    health: SourceHealth,
    policy: Policy,
    cfg: DecideConfig,
    upgrade_running: bool = False,
    storm_settling: bool = False,
    quorum_lost: bool = False,
) -> tuple[Reason, ...]:
    """Every hold in force, most fundamental first (the first one is reported).

    `storm_settling`: a storm ended less than `storm_settle_s` ago (the caller keeps that
    clock). The machines of a storm come back together, but not in the same second: the first
    kubelet back takes the count below the threshold while the others are still booting, and
    without this the storm's other nodes would be reset in that gap.

    `quorum_lost`: more than half of the nodes are silent (decide/quorum.py, `quorum_lost`):
    their agents may be sparing themselves by quorum, so no self-fence can be counted on.
    """
    holds: list[Reason] = []
    if health.broker_up_since is None:
        holds.append(Reason.HOLD_INGEST_LAG if health.broker_lagging else Reason.HOLD_BROKER_DOWN)
    if health.api_up_since is None:
        holds.append(Reason.HOLD_API_DOWN)
    if quorum_lost:
        holds.append(Reason.HOLD_QUORUM)
    if storm_settling or is_storm(phases, total_nodes, cfg):
        holds.append(Reason.HOLD_STORM)
    if not policy.enable:
        holds.append(Reason.HOLD_POLICY_DISABLED)
    if upgrade_running:
        holds.append(Reason.HOLD_UPGRADE)
    if cfg.dry_run:
        holds.append(Reason.HOLD_DRY_RUN)
    return tuple(holds)
