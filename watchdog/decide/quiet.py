"""A quiet node's wake-up, moved on by its newer heartbeats without a whole decision.

Nearly every node of a large cluster is HEALTHY with a fresh heartbeat. Its decision changes
nothing and only asks to be woken when its heartbeat would turn stale (last heartbeat +
`suspect_after_s`) or its Lease would. By the time that wake-up comes, the node has sent
several newer heartbeats, and deciding again gives the same state, no action and a later
wake-up. `next_quiet_wake` gives that later wake-up directly, from what the decision was made of
(`Quiet`), so a healthy node costs a few comparisons per `suspect_after_s` rather than a whole
decision (docs/PERFORMANCE.md, ingest).

Why this is the decision itself, not an estimate of it: from HEALTHY, `decide` reads the
heartbeat (ALIVE or STALE), the kubelet path (Lease and Ready) and, in `reconcile`, the Node's
annotation. Everything but the heartbeat and the clock comes from the API view, the sources'
health or the policy, and the runtime decides a node again in full whenever one of those
changes (their events mark it). So between two decisions only the heartbeat fields and the
time move, and `next_quiet_wake` refuses (None: decide in full) unless, at `now`:

- the heartbeat is still ALIVE (its age below `suspect_after_s`), counted from the same
  reference `decide` uses (`heartbeat_watch_since`);
- every other wake-up the decision asked for (the Lease deadline, a withdrawal to re-write) is
  still ahead, so the Lease is not stale and nothing is due;
- the broker and API connections are the ones the decision saw.

tests/unit/test_decide_quiet.py checks, against `decide` itself, that whenever `next_quiet_wake`
gives a time, `decide` at that moment would keep the state, act on nothing and ask for that same
time.
"""

from __future__ import annotations

from dataclasses import dataclass

from watchdog.decide.config import DecideConfig


@dataclass(frozen=True, slots=True)
class Quiet:
    """What a quiet HEALTHY node's decision waited for."""

    # Heartbeats count from this moment at the earliest (`heartbeat_watch_since`).
    watch_since: float
    # The earliest wake-up the decision asked for that was not the heartbeat's own.
    other_wake: float | None
    # The connections the decision was made under (None: down or lagging).
    broker_up_since: float
    api_up_since: float | None


def next_quiet_wake(
    quiet: Quiet,
    last_heartbeat_at: float | None,
    broker_up_since: float | None,
    api_up_since: float | None,
    now: float,
    cfg: DecideConfig,
) -> tuple[float, float] | None:
    """(next wake-up, heartbeat age) of a quiet node woken at `now`, whose heartbeat fields alone
    may have changed since its decision; None when it must be decided in full. The connections
    are the sources' health now (`SourceHealth`: broker None while down or lagging)."""
    if broker_up_since != quiet.broker_up_since or api_up_since != quiet.api_up_since:
        return None
    other = quiet.other_wake
    if other is not None and other <= now:
        return None
    ref = (
        quiet.watch_since
        if last_heartbeat_at is None
        else max(last_heartbeat_at, quiet.watch_since)
    )
    stale_at = ref + cfg.suspect_after_s
    if stale_at <= now:
        return None
    return (stale_at if other is None or stale_at < other else other), now - ref
