"""The leader lock: one `coordination.k8s.io/v1` Lease, read and written with optimistic
concurrency. The election algorithm (when to acquire, renew, step down) lives in
`watchdog.runtime`; this module only makes each step atomic.

Owns: the Lease's wire form (holderIdentity, leaseDurationSeconds, acquireTime, renewTime as
MicroTime: RFC 3339 with exactly six fraction digits, leaseTransitions); `create` (409 → another
contender created it first: lost), `update` (PUT carrying the resourceVersion that was read:
409 → someone wrote in between: lost), `release` (clear the holder, as client-go does on a
clean shutdown so a standby need not wait out the lease).

Must not: retry (a leader that cannot renew within its deadline must step down, not keep
trying), sleep, or read any clock but the wall clock for the Lease's own timestamps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from watchdog.actuate.writer import KubeWriter
from watchdog.transport.kube import ApiClient
from watchdog.transport.kube_errors import Conflict, NotFound, PermanentError

_API = "/apis/coordination.k8s.io/v1"


def format_micro_time(value: datetime) -> str:
    """metav1.MicroTime: `2026-05-09T07:35:25.123456Z`."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_micro_time(value: str | None) -> datetime | None:
    """A MicroTime or Time string (any fraction length, `Z` or an offset), or None."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """The election-relevant part of a Lease. `resource_version` is what `get()` read (pass it
    to `update`); it is ignored by `create`."""

    holder_identity: str | None
    lease_duration_s: int
    acquire_time: datetime | None = None
    renew_time: datetime | None = None
    lease_transitions: int = 0
    resource_version: str | None = None

    def spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "holderIdentity": self.holder_identity or None,
            "leaseDurationSeconds": self.lease_duration_s,
            "leaseTransitions": self.lease_transitions,
        }
        if self.acquire_time is not None:
            spec["acquireTime"] = format_micro_time(self.acquire_time)
        if self.renew_time is not None:
            spec["renewTime"] = format_micro_time(self.renew_time)
        return spec

    @classmethod
    def from_object(cls, obj: dict[str, Any]) -> LeaseRecord:
        spec = obj.get("spec") or {}
        return cls(
            holder_identity=spec.get("holderIdentity") or None,
            lease_duration_s=int(spec.get("leaseDurationSeconds") or 0),
            acquire_time=parse_micro_time(spec.get("acquireTime")),
            renew_time=parse_micro_time(spec.get("renewTime")),
            lease_transitions=int(spec.get("leaseTransitions") or 0),
            resource_version=str((obj.get("metadata") or {}).get("resourceVersion") or "") or None,
        )


class LeaseLock:
    """get / create / update / release of Lease `namespace/name`. Errors other than losing a
    race raise `TransientError` / `PermanentError` (one attempt each, never retried here)."""

    def __init__(
        self,
        api_client: ApiClient,
        namespace: str,
        name: str,
        *,
        request_timeout_s: float = 10.0,
    ) -> None:
        self.namespace = namespace
        self.name = name
        self._writer = KubeWriter(api_client, request_timeout_s=request_timeout_s, attempts=1)
        self._collection = f"{_API}/namespaces/{quote(namespace, safe='')}/leases"
        self._path = f"{self._collection}/{quote(name, safe='')}"

    async def get(self) -> LeaseRecord | None:
        """The Lease as stored now, or None when it does not exist."""
        try:
            obj = await self._writer.once("GET", self._path, what=f"get lease {self._key}")
        except NotFound:
            return None
        if not isinstance(obj, dict):
            raise PermanentError(f"get lease {self._key}: the answer is not an object")
        return LeaseRecord.from_object(obj)

    async def create(self, record: LeaseRecord) -> bool:
        """Create the Lease; False when another contender created it first."""
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": record.spec(),
        }
        try:
            await self._writer.once(
                "POST", self._collection, body=body, what=f"create lease {self._key}"
            )
        except Conflict:
            return False
        return True

    async def update(self, record: LeaseRecord, resource_version: str) -> bool:
        """Replace the Lease if it is still at `resource_version`; False when someone wrote
        in between (409) or it was deleted (404)."""
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "resourceVersion": resource_version,
            },
            "spec": record.spec(),
        }
        try:
            await self._writer.once("PUT", self._path, body=body, what=f"update lease {self._key}")
        except (Conflict, NotFound):
            return False
        return True

    async def release(self, identity: str) -> bool:
        """Give the lock up if `identity` holds it: holder cleared, duration 1 s, so a standby
        takes over at its next attempt. True when released (or not ours to release)."""
        current = await self.get()
        if current is None or current.holder_identity != identity:
            return True
        assert current.resource_version is not None
        now = datetime.now(UTC)
        released = replace(
            current, holder_identity=None, lease_duration_s=1, renew_time=now, acquire_time=now
        )
        return await self.update(released, current.resource_version)

    @property
    def _key(self) -> str:
        return f"{self.namespace}/{self.name}"


__all__ = ["LeaseLock", "LeaseRecord", "format_micro_time", "parse_micro_time"]
