"""Cluster-wide holds (DESIGN §4): storms and the controller's own blindness."""

from __future__ import annotations

import pytest

from watchdog.decide.config import DecideConfig, FenceMode, Policy
from watchdog.decide.holds import (
    STORM_WAKE_AFTER_S,
    cluster_holds,
    is_storm,
    storm_hold_until,
    wake_after_storm,
)
from watchdog.decide.observations import SourceHealth
from watchdog.decide.reasons import Reason
from watchdog.decide.state import Phase

from .decide_helpers import UP

CFG = DecideConfig(storm_max_unreachable=10, storm_max_fraction=0.5)


def cluster(down: int, total: int, down_phase: Phase = Phase.FENCING) -> list[Phase]:
    return [down_phase] * down + [Phase.HEALTHY] * (total - down)


@pytest.mark.parametrize(
    ("down", "total", "storm"),
    [
        pytest.param(0, 10, False, id="nobody down"),
        pytest.param(1, 10, False, id="one of ten down"),
        pytest.param(4, 10, False, id="four of ten down: below half"),
        pytest.param(5, 10, True, id="five of ten down: exactly half is a storm"),
        pytest.param(1, 2, True, id="one of two down: half of a two-node cluster"),
        pytest.param(1, 3, False, id="one of three down"),
        pytest.param(2, 3, True, id="two of three down"),
        pytest.param(10, 100, False, id="ten of a hundred down: not more than the count"),
        pytest.param(11, 100, True, id="eleven of a hundred down: more than the count"),
        pytest.param(1, 0, False, id="no nodes known"),
    ],
)
def test_storm_by_fraction_or_absolute_count(down: int, total: int, storm: bool) -> None:
    assert is_storm(cluster(down, max(total, down)), total, CFG) is storm


@pytest.mark.parametrize(
    "phase",
    [Phase.UNREACHABLE, Phase.FENCING, Phase.RESETTING],
    ids=lambda p: f"{p} counts as going down",
)
def test_every_phase_of_a_node_going_down_counts(phase: Phase) -> None:
    assert is_storm(cluster(5, 10, phase), 10, CFG)


def test_a_node_already_reset_does_not_make_the_next_failure_a_storm() -> None:
    """Two of four nodes failing a minute apart: the first one's reset is done, so the second
    is one failure, not half the cluster at once (scenario sequential-failures)."""
    assert not is_storm([Phase.RESET, Phase.FENCING, Phase.HEALTHY, Phase.HEALTHY], 4, CFG)
    assert not cluster_holds(
        [Phase.RESET, Phase.FENCING, Phase.HEALTHY, Phase.HEALTHY], 4, UP, Policy(), CFG
    )


@pytest.mark.parametrize(
    "cfg",
    [
        DecideConfig(fence_mode=FenceMode.EXTERNAL),
        DecideConfig(fence_mode=FenceMode.MANUAL),
        DecideConfig(fence_mode=FenceMode.SELF, accept_weak_fence=True),
    ],
    ids=["external", "manual", "weak self-fences accepted"],
)
def test_where_a_reset_is_not_proven_on_its_own_a_node_already_reset_still_counts(
    cfg: DecideConfig,
) -> None:
    """The storm hold is then the only running total against a partition that grows."""
    assert is_storm([Phase.RESET, Phase.FENCING, Phase.HEALTHY, Phase.HEALTHY], 4, cfg)


@pytest.mark.parametrize(
    ("cfg", "reset_at_most"),
    [
        (DecideConfig(fence_mode=FenceMode.SELF), 9),
        (DecideConfig(fence_mode=FenceMode.POWER), 9),
        (DecideConfig(fence_mode=FenceMode.EXTERNAL), 4),
    ],
    ids=["self: each proven", "power: each proven", "external: stopped at the threshold"],
)
def test_a_partition_that_grows_one_node_at_a_time(cfg: DecideConfig, reset_at_most: int) -> None:
    """Ten nodes cut off one after the other, each reset before the next: with a proof per node
    each is reset; where a reset is only a hook's word, the storm stops it at the threshold
    (half of ten: the fifth is held)."""
    phases = [Phase.HEALTHY] * 10
    reset = 0
    for node in range(1, 10):  # node 0 runs the controller
        phases[node] = Phase.FENCING
        if is_storm(phases, 10, cfg):
            break
        phases[node] = Phase.RESET
        reset += 1
    assert reset == reset_at_most


def test_two_of_four_going_down_at_once_is_still_a_storm() -> None:
    """The must-not twin: the same two nodes, both still being fenced, are held."""
    assert is_storm([Phase.FENCING, Phase.FENCING, Phase.HEALTHY, Phase.HEALTHY], 4, CFG)
    assert cluster_holds(
        [Phase.UNREACHABLE, Phase.FENCING, Phase.HEALTHY, Phase.HEALTHY], 4, UP, Policy(), CFG
    ) == (Reason.HOLD_STORM,)


@pytest.mark.parametrize(
    "phase",
    [Phase.SUSPECT, Phase.DEGRADED, Phase.RECOVERING, Phase.HEALTHY],
    ids=lambda p: f"{p} does not count as down",
)
def test_phases_that_are_not_down_do_not_count(phase: Phase) -> None:
    assert not is_storm(cluster(9, 10, phase), 10, CFG)


def test_a_lower_count_threshold_triggers_on_a_small_absolute_number() -> None:
    cfg = DecideConfig(storm_max_unreachable=2, storm_max_fraction=1.0)
    assert not is_storm(cluster(2, 100), 100, cfg)
    assert is_storm(cluster(3, 100), 100, cfg)


HEALTHY_CLUSTER = cluster(0, 10)


@pytest.mark.parametrize(
    ("health", "phases", "policy", "cfg", "upgrade", "holds"),
    [
        pytest.param(UP, HEALTHY_CLUSTER, Policy(), CFG, False, (), id="all well: no hold"),
        pytest.param(
            SourceHealth(None, 0.0),
            HEALTHY_CLUSTER,
            Policy(),
            CFG,
            False,
            (Reason.HOLD_BROKER_DOWN,),
            id="broker connection down",
        ),
        pytest.param(
            SourceHealth(None, 0.0, broker_lagging=True),
            HEALTHY_CLUSTER,
            Policy(),
            CFG,
            False,
            (Reason.HOLD_INGEST_LAG,),
            id="broker connected but our ingest lags behind it",
        ),
        pytest.param(
            SourceHealth(0.0, None),
            HEALTHY_CLUSTER,
            Policy(),
            CFG,
            False,
            (Reason.HOLD_API_DOWN,),
            id="API connection down",
        ),
        pytest.param(UP, cluster(6, 10), Policy(), CFG, False, (Reason.HOLD_STORM,), id="storm"),
        pytest.param(
            UP,
            HEALTHY_CLUSTER,
            Policy(enable=False),
            CFG,
            False,
            (Reason.HOLD_POLICY_DISABLED,),
            id="policy disabled",
        ),
        pytest.param(
            UP, HEALTHY_CLUSTER, Policy(), CFG, True, (Reason.HOLD_UPGRADE,), id="upgrade"
        ),
        pytest.param(
            UP,
            HEALTHY_CLUSTER,
            Policy(),
            DecideConfig(dry_run=True),
            False,
            (Reason.HOLD_DRY_RUN,),
            id="dry-run",
        ),
        pytest.param(
            SourceHealth(None, None),
            cluster(6, 10),
            Policy(enable=False),
            DecideConfig(dry_run=True),
            True,
            (
                Reason.HOLD_BROKER_DOWN,
                Reason.HOLD_API_DOWN,
                Reason.HOLD_STORM,
                Reason.HOLD_POLICY_DISABLED,
                Reason.HOLD_UPGRADE,
                Reason.HOLD_DRY_RUN,
            ),
            id="everything at once: most fundamental first",
        ),
    ],
)
def test_cluster_holds(
    health: SourceHealth,
    phases: list[Phase],
    policy: Policy,
    cfg: DecideConfig,
    upgrade: bool,
    holds: tuple[Reason, ...],
) -> None:
    assert cluster_holds(phases, len(phases), health, policy, cfg, upgrade_running=upgrade) == holds


def test_the_storm_hold_outlives_the_storm_while_it_settles() -> None:
    """The first machine of a storm back takes the count below the threshold; the others,
    still booting, must not be reset in that gap."""
    after = cluster(2, 6)  # 3 of 6 went down, one is back: no storm by count any more
    assert not is_storm(after, 6, CFG)
    assert cluster_holds(after, 6, UP, Policy(), CFG) == ()
    settling = cluster_holds(after, 6, UP, Policy(), CFG, storm_settling=True)
    assert settling == (Reason.HOLD_STORM,)


def test_the_storm_hold_outlives_the_storm_by_a_lease_period_and_wakes_its_nodes_after() -> None:
    cfg = DecideConfig()
    until = storm_hold_until(True, None, 100.0, cfg)
    assert until == 100.0 + cfg.lease_stale_after_s
    # Over: the end stays where the last storm put it (a renewal within it vetoes a reset).
    assert storm_hold_until(False, until, 101.0, cfg) == until
    assert storm_hold_until(False, None, 101.0, cfg) is None
    # A held node is decided again just after the hold, or earlier if it asked to be.
    assert wake_after_storm(None, until) == until + STORM_WAKE_AFTER_S
    assert wake_after_storm(until + 5.0, until) == until + STORM_WAKE_AFTER_S
    assert wake_after_storm(until - 1.0, until) == until - 1.0
    assert wake_after_storm(7.0, None) == 7.0
