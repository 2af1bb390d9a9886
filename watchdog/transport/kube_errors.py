"""What a failed request to the Kubernetes API means to the watchdog: one error tree for reads
and writes (STYLE 7), not which library failed.

`KubeError.transient`: worth retrying as is (no answer, a timeout, 408, 429, 5xx). Otherwise
retrying the very same request cannot help (400, 401, 403, 404, 409, 410, 422): the caller
re-reads, relists, treats it as done, or reports it. `ApiUnreachable` is the transient error
with no answer at all (connection refused or lost, TLS, timeout): source health reads it as
"API down", never as evidence about nodes (DESIGN §10). Library exceptions (kubernetes_asyncio's
`ApiException` and `ConfigException`, aiohttp's errors, timeouts) are translated only in
transport/kube.py (`translate`) and chained (`raise ... from e`).

Must not: retry, log or decide; `asyncio.CancelledError` is never translated.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar

# Statuses a retry of the very same request may cure.
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_MAX_BODY = 2048


class KubeError(Exception):
    """A request to the API server failed. `status` is the HTTP status (None: no answer)."""

    transient: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        reason: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.reason = reason  # the API's Status.reason: NotFound, AlreadyExists, Conflict, ...
        self.retry_after_s = retry_after_s


class TransientError(KubeError):
    """Retrying the same request later may succeed."""

    transient = True


class ApiUnreachable(TransientError):
    """No answer: the API server could not be reached or did not answer in time."""


class PermanentError(KubeError):
    """Retrying the same request cannot succeed."""


class NotFound(PermanentError):
    """404: the object, or its collection (a CRD this cluster does not serve), does not exist."""


class Conflict(PermanentError):
    """409: a resourceVersion precondition failed (re-read, then retry) or, with
    `reason == "AlreadyExists"`, a create found the name taken."""

    @property
    def already_exists(self) -> bool:
        return self.reason == "AlreadyExists"


class Gone(PermanentError):
    """410: the resourceVersion a list or watch resumed from was compacted away; relist."""


class Stale(PermanentError):
    """The write no longer stands on what its decision saw: the Node changed since (another
    leader, an administrator, a kubelet wrote it), or this replica stopped leading. The
    decision is dropped, not retried: the next one is made on the newer Node. Raised by the
    actuator's writer (actuate/writer.py), never by the API server."""


def from_status(
    status: int, body: bytes | str | None, headers: Mapping[str, str] | None, what: str
) -> KubeError:
    """The error for an HTTP error answer of the API server (a body of JSON `Status` or not)."""
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
    if status == 410:
        return Gone(full, **kwargs)
    if status in TRANSIENT_STATUSES:
        return TransientError(full, **kwargs)
    return PermanentError(full, **kwargs)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: the API server never sends one


__all__ = [
    "TRANSIENT_STATUSES",
    "ApiUnreachable",
    "Conflict",
    "Gone",
    "KubeError",
    "NotFound",
    "PermanentError",
    "Stale",
    "TransientError",
    "from_status",
]
