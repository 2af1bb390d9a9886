"""What an action did: the `Outcome` every write of this package returns.

Owns: `Result`, the label values of `watchdog_actions_total{action,result}` (`success`,
`already_done`, `failed`, `stale` or `dry_run`), `Outcome`, the one mapping of dry-run and the
error tiers to a result (`guard`), and the one summary of an action over many objects
(`aggregate`).

Must not: send requests, or swallow `asyncio.CancelledError`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from watchdog.transport.kube_errors import KubeError, Stale

log = logging.getLogger(__name__)


class Result(StrEnum):
    """Label values of `watchdog_actions_total{result}`."""

    SUCCESS = "success"
    ALREADY_DONE = "already_done"
    FAILED = "failed"
    STALE = "stale"  # not written: the decision's Node changed since, or we stopped leading
    DRY_RUN = "dry_run"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one action did. `action` is the metric label (snake_case action name)."""

    action: str
    result: Result
    detail: str = ""
    error: KubeError | None = None
    items: tuple[tuple[str, Result], ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return self.result not in (Result.FAILED, Result.STALE)


async def guard(
    action: str,
    body: Callable[[], Awaitable[Outcome]],
    *,
    dry_run: bool,
    write: bool = True,
) -> Outcome:
    """Dry-run and the error tier → Outcome mapping, in one place."""
    if write and dry_run:
        return Outcome(action, Result.DRY_RUN, "dry run: nothing written")
    try:
        return await body()
    except Stale as e:
        log.info("%s not written: %s", action, e)
        return Outcome(action, Result.STALE, str(e), e)
    except KubeError as e:
        log.warning("%s failed: %s", action, e)
        return Outcome(action, Result.FAILED, str(e), e)


def aggregate(action: str, items: Sequence[tuple[str, Result, KubeError | None]]) -> Outcome:
    """One Outcome for an action over many objects: stale if leadership ended on the way,
    else failed if any failed, else success if any changed, else already_done."""
    results = tuple((name, result) for name, result, _ in items)
    stale = [e for _, result, e in items if result is Result.STALE]
    if stale:
        return Outcome(action, Result.STALE, str(stale[0]), stale[0], results)
    failures = [(name, e) for name, result, e in items if result is Result.FAILED]
    if failures:
        detail = "; ".join(f"{name}: {e}" for name, e in failures[:5])
        if len(failures) > 5:
            detail += f"; and {len(failures) - 5} more"
        return Outcome(action, Result.FAILED, detail, failures[0][1], results)
    changed = sum(1 for _, r in results if r is Result.SUCCESS)
    if changed:
        return Outcome(
            action, Result.SUCCESS, f"{changed} of {len(results)} changed", None, results
        )
    return Outcome(action, Result.ALREADY_DONE, f"{len(results)} already done", None, results)


__all__ = ["Outcome", "Result", "aggregate", "guard"]
