"""The test cluster's self-check: its own event-loop lag, and the rule that makes a run invalid.

On a real event loop: a stall (a blocking call in the loop, as a busy simulator makes) is
seen as one late wake-up of its length; then the rule on measured numbers.
"""

from __future__ import annotations

import asyncio
import time

from chaos.sim.loop_lag import VALID_FRACTION, LoopLag, validity


async def test_a_stall_of_the_loop_is_seen_at_its_length() -> None:
    lag = LoopLag(period_s=0.01)
    lag.start()
    await asyncio.sleep(0.2)
    time.sleep(0.15)  # noqa: ASYNC251 - the point: a blocked loop makes every timer late
    await asyncio.sleep(0.1)
    await lag.stop()
    summary = lag.summary(smallest_interval_s=0.1)
    assert summary.samples >= 20
    assert 140 <= summary.max_ms <= 400, summary
    assert summary.stalls_over_bound >= 1
    assert summary.p50_ms < 50, "one stall, not a lagging loop"


def test_a_run_is_valid_while_its_p99_lag_stays_within_a_tenth_of_the_smallest_interval() -> None:
    interval = 0.1  # the heartbeat at time scale 0.1
    bound = VALID_FRACTION * interval
    quiet = [0.001] * 990 + [0.05] * 9  # nine stalls in a thousand: below the 99th percentile
    assert validity(quiet, interval).valid
    busy = [0.001] * 980 + [bound * 1.5] * 20  # 2 % of the wake-ups late beyond the bound
    verdict = validity(busy, interval)
    assert not verdict.valid and verdict.p99_ms > verdict.bound_ms == 10.0
    assert "INVALID" in verdict.line() and "p99 15.0 ms" in verdict.line()
    # The same lag at time scale 1 (heartbeat 1 s) measures the watchdog, not the simulator.
    assert validity(busy, 1.0).valid
    assert validity([], interval).valid, "nothing watched, nothing against it"


def test_an_invalid_run_is_run_again_slower_up_to_real_time_unless_the_scale_was_fixed() -> None:
    from chaos.harness.cli import next_valid_scale

    assert next_valid_scale(0.1, True, fixed=False) == 0.25
    assert next_valid_scale(0.25, True, fixed=False) == 0.625
    assert next_valid_scale(0.625, True, fixed=False) == 1.0
    assert next_valid_scale(1.0, True, fixed=False) is None, "real time is the last resort"
    assert next_valid_scale(0.1, False, fixed=False) is None, "a valid run stands"
    assert next_valid_scale(0.1, True, fixed=True) is None, "--time-scale F runs at F only"


def test_one_stall_longer_than_the_smallest_interval_invalidates_a_run_on_its_own() -> None:
    # At time scale 0.1 a 1 s stall is a 10 s real-world event: a missed heartbeat or more.
    verdict = validity([0.002] * 5000 + [1.0], 0.1)
    assert verdict.p99_ms < verdict.bound_ms and not verdict.valid
    assert validity([0.002] * 5000 + [0.09], 0.1).valid, "shorter than one interval"
