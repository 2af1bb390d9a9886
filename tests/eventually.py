"""The one way tests wait: poll a condition until it holds, within a bound that names it."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

Check = Callable[[], object | Awaitable[object]]


async def eventually(
    check: Check,
    *,
    timeout_s: float = 30.0,
    what: str = "condition",
    every_s: float = 0.05,
    diagnose: Callable[[], str] | None = None,
) -> float:
    """Poll `check` (sync or async) until it is true; returns the seconds it took.

    Raises TimeoutError naming `what` (with `diagnose()` appended) after `timeout_s`; an
    exception raised by the check propagates: a broken check is not a condition not met yet.
    """
    start = time.monotonic()
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            extra = f"\n{diagnose()}" if diagnose is not None else ""
            raise TimeoutError(f"{what}: not reached within {timeout_s:g}s{extra}")
        await asyncio.sleep(every_s)
