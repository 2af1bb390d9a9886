"""Requests to the Kubernetes API server: the one way every write of this package is sent.

Owns: `KubeWriter` (raw JSON requests over the process's API client, transport/kube.py's
`exchange`, a timeout on every request, transient errors (`KubeError.transient`) retried with
tenacity: bounded attempts, transport/kube.py's `backoff_s`, `Retry-After` honoured on 429,
`attempt n/N` logged), the leadership check before every attempt (`sent_only_while`), and the
wire formats the writes share (content types, metav1.Time).

Must not: decide what to write, map errors to results (outcome.py does), or swallow
`asyncio.CancelledError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import tenacity

from watchdog.transport.kube import JSON, ApiClient, Obj, backoff_s, exchange, json_answer
from watchdog.transport.kube_errors import (
    ApiUnreachable,
    KubeError,
    Stale,
)

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"

# The running action's `Basis.may_act`, seen by every request it makes (the per-pod tasks
# inherit it): checked before each attempt, so a retried request stops when leadership does.
_MAY_ACT: ContextVar[Callable[[], bool] | None] = ContextVar("may_act", default=None)
# And the seconds it may still act: no request waits for its answer beyond that.
_ACTING_LEFT: ContextVar[Callable[[], float | None] | None] = ContextVar(
    "acting_left", default=None
)


@contextlib.contextmanager
def sent_only_while(
    may_act: Callable[[], bool], acting_left_s: Callable[[], float | None] | None = None
) -> Iterator[None]:
    """Every `KubeWriter.call()` made inside (in tasks started inside too) sends each attempt
    only while `may_act()` says so, else it raises `Stale` without sending it; and with
    `acting_left_s`, waits for each answer only that long (then `Stale`, not retried)."""
    token = _MAY_ACT.set(may_act)
    left_token = _ACTING_LEFT.set(acting_left_s)
    try:
        yield
    finally:
        _ACTING_LEFT.reset(left_token)
        _MAY_ACT.reset(token)


def now_rfc3339() -> str:
    """metav1.Time: seconds precision, UTC."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Wait(tenacity.wait.wait_base):
    """`backoff_s`, or the server's Retry-After when it sent one (bounded)."""

    def __init__(self, initial_s: float, max_s: float, max_retry_after_s: float) -> None:
        self._initial_s = initial_s
        self._max_s = max_s
        self._max_retry_after_s = max_retry_after_s

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        if isinstance(error, KubeError) and error.retry_after_s is not None:
            return min(error.retry_after_s, self._max_retry_after_s)
        return backoff_s(retry_state.attempt_number, self._initial_s, self._max_s)


class KubeWriter:
    """Raw JSON requests with our error tree; `call()` retries transient failures."""

    def __init__(
        self,
        api_client: ApiClient,
        *,
        request_timeout_s: float = 10.0,
        attempts: int = 5,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 5.0,
        max_retry_after_s: float = 30.0,
    ) -> None:
        self.api_client = api_client
        self.request_timeout_s = request_timeout_s
        self.attempts = attempts
        self._wait = _Wait(backoff_initial_s, backoff_max_s, max_retry_after_s)

    async def once(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str = JSON,
        what: str = "",
    ) -> Obj:
        """One attempt. The decoded body on 2xx; else a `KubeError`."""
        what = what or f"{method} {path}"
        acting_left = _ACTING_LEFT.get()
        left = acting_left() if acting_left is not None else None
        if left is not None and left <= 0:
            raise Stale(f"{what}: not sent, this replica's leader Lease ran out")
        sending = exchange(
            self.api_client,
            method,
            path,
            query=query,
            body=body,
            content_type=content_type,
            timeout_s=self.request_timeout_s,
            what=what,
        )
        try:
            status, headers, data = await self._within_lease(sending, acting_left, what)
        except TimeoutError as e:
            raise ApiUnreachable(f"{what}: timed out") from e
        return json_answer(status, headers, data, what)

    async def _within_lease(
        self,
        sending: Awaitable[tuple[int, Mapping[str, str], bytes]],
        acting_left: Callable[[], float | None] | None,
        what: str,
    ) -> tuple[int, Mapping[str, str], bytes]:
        """The answer, waited for at most the request timeout and (with `acting_left`) never
        past this replica's leader deadline, which moves on with every renewal while the
        request is out. At the deadline the request is abandoned (`Stale`, not retried):
        another replica may lead from then on. (What the API server had already applied stays
        applied; the next leader reads it.)"""
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(sending)
        give_up_at = loop.time() + self.request_timeout_s
        try:
            while True:
                left = acting_left() if acting_left is not None else None
                if left is not None and left <= 0:
                    raise Stale(f"{what}: abandoned at this replica's leader deadline")
                wait = give_up_at - loop.time()
                if wait <= 0:
                    raise TimeoutError
                if left is not None:
                    wait = min(wait, left)
                done, _ = await asyncio.wait({task}, timeout=wait)
                if done:
                    return task.result()
        finally:
            if not task.done():
                task.cancel()
                try:
                    # Not `await task`: a cancellation of this caller that arrives meanwhile
                    # must reach it, not be taken for the abandoned request's own.
                    await asyncio.wait({task})
                finally:
                    if task.done() and not task.cancelled():
                        task.exception()  # the abandoned request's error: retrieved, dropped

    async def call(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str = JSON,
        what: str = "",
    ) -> Obj:
        """`once()`, retried on a transient error (`KubeError.transient`) up to `attempts`
        times."""
        what = what or f"{method} {path}"
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(self.attempts),
            wait=self._wait,
            retry=tenacity.retry_if_exception(lambda e: isinstance(e, KubeError) and e.transient),
            before_sleep=self._log_retry(what),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                may_act = _MAY_ACT.get()
                if may_act is not None and not may_act():
                    raise Stale(f"{what}: not sent, this replica no longer leads")
                return await self.once(
                    method, path, query=query, body=body, content_type=content_type, what=what
                )
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    def _log_retry(self, what: str) -> Callable[[tenacity.RetryCallState], None]:
        attempts = self.attempts

        def before_sleep(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome is not None else None
            delay = state.next_action.sleep if state.next_action is not None else 0.0
            log.warning(
                "%s: attempt %d/%d failed (%s); retrying in %.1fs",
                what,
                state.attempt_number,
                attempts,
                error,
                delay,
            )

        return before_sleep


__all__ = [
    "JSON",
    "MERGE_PATCH",
    "STRATEGIC_MERGE_PATCH",
    "KubeWriter",
    "Obj",
    "now_rfc3339",
    "sent_only_while",
]
