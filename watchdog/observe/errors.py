"""The observers' own errors: what a failed read of the Kubernetes API means to the watchdog.

Owns the translation target for library exceptions (kubernetes_asyncio, aiohttp, timeouts) met
while listing and watching. Callers above `observe` see only these, raised `from` the original.

Must not: decide anything. "Unreachable" is an observation about the controller's own
connection (DESIGN §10: losing a source is not evidence about nodes).
"""

from __future__ import annotations


class ObserveError(Exception):
    """Base of every error raised by `watchdog.observe`'s Kubernetes readers."""


class ApiUnreachable(ObserveError):
    """The API server could not be reached or did not answer in time (connection error,
    TLS failure, request or read timeout). Source health turns this into "API down"."""


class ApiStatusError(ObserveError):
    """The API server answered with an error status."""

    def __init__(self, status: int, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s


class ResourceGone(ApiStatusError):
    """410 Gone: the resourceVersion we resumed from was compacted away; relist."""


class ResourceAbsent(ApiStatusError):
    """404 on a collection: the resource (usually a CRD) is not served by this cluster."""


__all__ = [
    "ApiStatusError",
    "ApiUnreachable",
    "ObserveError",
    "ResourceAbsent",
    "ResourceGone",
]
