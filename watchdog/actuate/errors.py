"""The two error tiers of actuation (STYLE 7): what a failed write means, not which library
failed.

`TransientError`: worth retrying as is (connection lost, timeout, 429, 5xx). `PermanentError`:
retrying the same request cannot help (400, 401, 403, 404, 409, 422): the caller re-reads,
treats it as done, or reports it. Library exceptions (kubernetes_asyncio's `ApiException`,
aiohttp's errors, timeouts) are translated here and chained (`raise ... from e`).

Must not: retry, log or decide; `asyncio.CancelledError` is never translated.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import aiohttp
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException

# Statuses a retry of the very same request may cure.
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_MAX_BODY = 2048


class ActuationError(Exception):
    """A write to the cluster failed. `status` is the HTTP status (None: no answer)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        reason: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason  # the API's Status.reason: NotFound, AlreadyExists, Conflict, ...
        self.retry_after_s = retry_after_s


class TransientError(ActuationError):
    """Retrying the same request later may succeed."""


class PermanentError(ActuationError):
    """Retrying the same request cannot succeed."""


class NotFound(PermanentError):
    """404: the object (or its collection) does not exist."""


class Conflict(PermanentError):
    """409: a resourceVersion precondition failed (re-read, then retry) or, with
    `reason == "AlreadyExists"`, a create found the name taken."""

    @property
    def already_exists(self) -> bool:
        return self.reason == "AlreadyExists"


class Stale(PermanentError):
    """The write no longer stands on what its decision saw: the Node changed since (another
    leader, an administrator, a kubelet wrote it), or this replica stopped leading. The
    decision is dropped, not retried: the next one is made on the newer Node."""


def from_status(
    status: int, body: bytes | str | None, headers: Mapping[str, str] | None, what: str
) -> ActuationError:
    """The error for an HTTP error answer of the API server."""
    text = body.decode(errors="replace") if isinstance(body, bytes) else (body or "")
    message, reason = text[:_MAX_BODY], None
    try:
        doc: Any = json.loads(text)
        if isinstance(doc, dict):
            message = str(doc.get("message") or message)
            reason = doc.get("reason") or None
    except ValueError:
        pass
    retry_after = _retry_after((headers or {}).get("Retry-After"))
    full = f"{what}: {status} {message}".rstrip()
    kwargs: dict[str, Any] = {"status": status, "reason": reason, "retry_after_s": retry_after}
    if status == 404:
        return NotFound(full, **kwargs)
    if status == 409:
        return Conflict(full, **kwargs)
    if status in TRANSIENT_STATUSES:
        return TransientError(full, **kwargs)
    return PermanentError(full, **kwargs)


def translate(e: BaseException, what: str) -> ActuationError:
    """Our error for a library exception; raise it `from e`. Never for CancelledError."""
    if isinstance(e, asyncio.CancelledError):
        raise TypeError("CancelledError must propagate, not be translated") from e
    if isinstance(e, ActuationError):
        return e
    if isinstance(e, ApiException):
        headers = dict(e.headers) if e.headers else None
        if not e.status:
            return TransientError(f"{what}: {e.reason}")
        return from_status(int(e.status), e.body, headers, what)
    if isinstance(e, TimeoutError | asyncio.TimeoutError):
        return TransientError(f"{what}: timed out")
    if isinstance(e, aiohttp.ClientError | OSError):
        return TransientError(f"{what}: {type(e).__name__}: {e}")
    if isinstance(e, ConfigException):
        # The client re-reads its token file before requests; a projected token is replaced
        # by the kubelet while it runs (an empty file for a moment): the next attempt reads it.
        return TransientError(f"{what}: credentials: {e}")
    return PermanentError(f"{what}: {type(e).__name__}: {e}")


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: the API server never sends one


__all__ = [
    "ActuationError",
    "Conflict",
    "NotFound",
    "PermanentError",
    "Stale",
    "TransientError",
    "from_status",
    "translate",
]
