"""The test cluster's own lag: how late its event loop runs what it scheduled.

Owns: `LoopLag`, a task that asks the loop to wake it every `period_s` and records how late
each wake-up came (the simulated kubelets, machines, KubeVirt and the embedded broker all run
on that loop, so their timers are as late as this one), and `validity()`, the rule that a run
measures the watchdog only while that lag stays well below the modelled timings: its 99th
percentile at most `VALID_FRACTION` of the smallest modelled interval, and no single stall
longer than that interval. Compressed time
amplifies the lag: at time scale 0.1 a 0.3 s stall is a 3 s real-world event.

Must not: decide anything about the watchdog; the verdict is about the test cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from array import array
from dataclasses import dataclass

# The lag may be at most this fraction of the smallest modelled interval (p99 of the run).
VALID_FRACTION = 0.10
# One wake-up per 20 ms: fine enough to see a stall of a heartbeat interval at time scale 0.1
# (0.1 s), cheap enough (50 wake-ups a second) not to add lag of its own.
PERIOD_S = 0.02
# A bound on the samples kept (a 30 min run at 50 per second is 90,000): 8 bytes each.
MAX_SAMPLES = 200_000


@dataclass(frozen=True)
class LagSummary:
    samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    stalls_over_bound: int  # wake-ups later than the bound
    bound_ms: float  # VALID_FRACTION x the smallest modelled interval
    smallest_interval_s: float
    valid: bool

    def line(self) -> str:
        verdict = "valid" if self.valid else "INVALID"
        return (
            f"test-cluster loop lag p50 {self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms, max "
            f"{self.max_ms:.0f} ms over {self.samples} wake-ups; bound {self.bound_ms:.1f} ms "
            f"(10 % of the smallest modelled interval, {self.smallest_interval_s * 1000:.0f} ms "
            f"wall, which no stall may exceed): {verdict}"
        )


class LoopLag:
    """`start()` in the loop to watch, `stop()` then `summary(smallest_interval_s)`."""

    def __init__(self, period_s: float = PERIOD_S) -> None:
        self._period_s = period_s
        self._lags = array("d")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="test-cluster loop lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _watch(self) -> None:
        clock = time.monotonic
        due = clock() + self._period_s
        while True:
            await asyncio.sleep(max(0.0, due - clock()))
            now = clock()
            if len(self._lags) < MAX_SAMPLES:
                self._lags.append(max(0.0, now - due))
            # The next wake-up is due one period after this one was: a stall shows once, as
            # one late wake-up, not as a run of them.
            due = now + self._period_s

    def summary(self, smallest_interval_s: float) -> LagSummary:
        return validity(list(self._lags), smallest_interval_s)


def validity(lags_s: list[float], smallest_interval_s: float) -> LagSummary:
    """The run's lag against its bound; no samples (a run too short to watch) is valid."""
    bound_s = VALID_FRACTION * smallest_interval_s
    ordered = sorted(lags_s)

    def pct(q: float) -> float:
        if not ordered:
            return 0.0
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    p99 = pct(0.99)
    return LagSummary(
        samples=len(ordered),
        p50_ms=round(pct(0.50) * 1000, 2),
        p99_ms=round(p99 * 1000, 2),
        max_ms=round((ordered[-1] if ordered else 0.0) * 1000, 1),
        stalls_over_bound=sum(1 for lag in ordered if lag > bound_s),
        bound_ms=round(bound_s * 1000, 2),
        smallest_interval_s=smallest_interval_s,
        # One long stall is one late wake-up among thousands: it also invalidates the run
        # when it outlasts a whole modelled interval (a missed heartbeat, a late Lease).
        valid=p99 <= bound_s and (not ordered or ordered[-1] <= smallest_interval_s),
    )
