"""Kubernetes Events with client-go's EventRecorder manners: the same reason repeated on the
same object within a window increments `count` on the existing Event instead of creating another.

Owns the core/v1 Event body (`reportingComponent`/`source.component` = node-watchdog, names
`<object>.<hex nanoseconds>` like client-go), the deduplication cache (bounded, LRU) and the
fallback when a counted Event expired meanwhile (its TTL) — create a new one.

Must not: decide which Events to emit, or retry on its own (the requester it is given does).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import quote

from watchdog.transport.kube_errors import NotFound

MERGE_PATCH = "application/merge-patch+json"
_MAX_MESSAGE = 1024  # the API server rejects messages over 1 KiB for new-style events


class Requester(Protocol):
    def __call__(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = ...,
        what: str,
    ) -> Awaitable[dict[str, Any]]: ...


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """The object an Event is about."""

    kind: str
    name: str
    namespace: str = ""
    uid: str = ""
    api_version: str = "v1"

    @classmethod
    def node(cls, name: str) -> ObjectRef:
        # kubelet, the node lifecycle controller and `kubectl describe node` all use the node's
        # name as its uid in event references: with it the Event shows in `describe node`.
        return cls(kind="Node", name=name, uid=name)

    @classmethod
    def vmi(cls, namespace: str, name: str, uid: str = "") -> ObjectRef:
        return cls(
            kind="VirtualMachineInstance",
            name=name,
            namespace=namespace,
            uid=uid,
            api_version="kubevirt.io/v1",
        )

    @property
    def event_namespace(self) -> str:
        # Events about cluster-scoped objects live in "default", as client-go puts them.
        return self.namespace or "default"


@dataclass
class _Seen:
    namespace: str
    name: str
    count: int
    first_timestamp: str
    at: float


class EventRecorder:
    """Create or count Events. `record()` returns "created" or "counted"."""

    def __init__(
        self,
        request: Requester,
        *,
        component: str = "node-watchdog",
        instance: str = "",
        window_s: float = 600.0,
        max_entries: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._request = request
        self.component = component
        self.instance = instance
        self._window_s = window_s
        self._max_entries = max_entries
        self._clock = clock
        self._seen: OrderedDict[tuple[str, ...], _Seen] = OrderedDict()

    async def record(
        self,
        ref: ObjectRef,
        event_type: str,
        reason: str,
        message: str,
        *,
        action: str = "",
        stamp: str | None = None,
    ) -> str:
        """`stamp`: when it happened (default now), for an Event written late."""
        message = message[:_MAX_MESSAGE]
        # The message is part of the key, as in client-go's EventCorrelator: the same reason
        # about different things (VMNotMigratable for vm-3, then vm-6) must not overwrite one
        # Event with the last message; only true repeats are counted.
        key = (ref.kind, ref.namespace, ref.name, ref.uid, event_type, reason, message)
        now = self._clock()
        stamp = stamp or _now()
        seen = self._seen.get(key)
        if seen is not None and now - seen.at <= self._window_s:
            patch = {"count": seen.count + 1, "lastTimestamp": stamp, "message": message}
            path = f"/api/v1/namespaces/{quote(seen.namespace)}/events/{quote(seen.name)}"
            try:
                await self._request(
                    "PATCH",
                    path,
                    body=patch,
                    content_type=MERGE_PATCH,
                    what=f"count Event {reason} on {ref.kind} {ref.name}",
                )
            except NotFound:
                pass  # expired (event TTL) or deleted: create a fresh one below
            else:
                seen.count += 1
                seen.at = now
                self._seen.move_to_end(key)
                return "counted"
        name = f"{ref.name}.{time.time_ns():x}"
        body = self._body(ref, name, event_type, reason, message, action, stamp)
        await self._request(
            "POST",
            f"/api/v1/namespaces/{quote(ref.event_namespace)}/events",
            body=body,
            what=f"create Event {reason} on {ref.kind} {ref.name}",
        )
        self._seen[key] = _Seen(ref.event_namespace, name, 1, stamp, now)
        self._seen.move_to_end(key)
        while len(self._seen) > self._max_entries:
            self._seen.popitem(last=False)
        return "created"

    def _body(
        self,
        ref: ObjectRef,
        name: str,
        event_type: str,
        reason: str,
        message: str,
        action: str,
        stamp: str,
    ) -> dict[str, Any]:
        involved: dict[str, Any] = {
            "apiVersion": ref.api_version,
            "kind": ref.kind,
            "name": ref.name,
        }
        if ref.namespace:
            involved["namespace"] = ref.namespace
        if ref.uid:
            involved["uid"] = ref.uid
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": ref.event_namespace},
            "involvedObject": involved,
            "type": event_type,
            "reason": reason,
            "message": message,
            "count": 1,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "source": {"component": self.component},
            "reportingComponent": self.component,
            "reportingInstance": self.instance,
        }
        if action:
            body["action"] = action
        return body


def rfc3339_now() -> str:
    return _now()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


__all__ = ["EventRecorder", "ObjectRef", "Requester", "rfc3339_now"]
