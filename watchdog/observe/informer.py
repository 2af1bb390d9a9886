"""A list+watch cache of one Kubernetes collection, keeping only small projected records.

Owns, for one resource (core, coordination, storage or a CRD): a paginated list, then watches
resumed from the last resourceVersion, each bounded by a server-side `timeoutSeconds` (jittered,
so many informers do not renew in lockstep) and a client read timeout; a quiet relist on
410 Gone (counted through `on_restart`); bounded, jittered backoff on errors; the `synced`
event; source health (`up`, `on_health`); and change callbacks `on_event(kind, key, old, new)`
fired only when the projected record really changed.

Records are whatever the projection returns (frozen dataclasses in `records`): the raw
object is dropped as soon as it is projected, which is what lets 100,000 pods fit in memory.

Health is precise: the informer is down when a list or watch request fails with a connection
error or a timeout, and up again on the first successful list or watch response. An error
status (403, 500, ...) is an answer: the API is up, the informer backs off and retries.

A resource the server does not serve (404 on the collection: a CRD not installed) is *absent*:
the store is emptied, `synced` is set (an empty store is the truth), and the list is retried
rarely. Nothing crashes.

Must not: create tasks of its own (the runtime's TaskGroup runs `run()`), write to the API,
or decide anything. Handlers run on the informer's task and must be cheap.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Generic, TypeVar
from urllib.parse import quote

from watchdog.transport.kube import KubeApi, backoff_s
from watchdog.transport.kube_errors import ApiUnreachable, Gone, KubeError, NotFound, from_status

log = logging.getLogger(__name__)

T = TypeVar("T")
Obj = dict[str, Any]


class EventKind(StrEnum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"


class RestartCause(StrEnum):
    """Why an informer listed again after its first list."""

    GONE = "gone"  # 410: the resourceVersion was compacted away
    ERROR = "error"  # an unexpected error; the store is rebuilt to be safe
    APPEARED = "appeared"  # an absent resource (CRD) is served now


# (kind, key, old, new): old is None for ADDED, new is None for DELETED.
EventHandler = Callable[[EventKind, str, Any, Any], None]
RestartHandler = Callable[[str, RestartCause], None]
HealthHandler = Callable[[str, bool], None]
# Projection: raw object and the record currently stored under its key → new record, or None
# to drop the object (filtered out). Receiving the old record lets a projection carry state
# across updates, e.g. when a Lease's renewTime was last seen to change.
Projection = Callable[[Obj, T | None], T | None]


@dataclass(frozen=True)
class Resource:
    """One API collection: `Resource("/api/v1", "pods")`,
    `Resource("/apis/kubevirt.io/v1", "virtualmachineinstances")`."""

    api: str
    plural: str
    namespaced: bool = True

    @property
    def name(self) -> str:
        """`pods`, `leases.coordination.k8s.io`: kubectl's resource.group spelling."""
        parts = self.api.strip("/").split("/")
        return self.plural if parts[0] == "api" else f"{self.plural}.{parts[1]}"

    @property
    def group(self) -> str:
        parts = self.api.strip("/").split("/")
        return "" if parts[0] == "api" else parts[1]

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        parts = [self.api.rstrip("/")]
        if self.namespaced and namespace:
            parts += ["namespaces", quote(namespace, safe="")]
        parts.append(self.plural)
        if name:
            parts.append(quote(name, safe=""))
        return "/".join(parts)


def key_of(obj: Obj) -> str:
    """`namespace/name`, or `name` for a cluster-scoped object (client-go's MetaNamespaceKey)."""
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{ns}/{meta.get('name', '')}" if ns else str(meta.get("name", ""))


@dataclass
class InformerStatistics:
    resource: str
    items: int
    synced: bool
    up: bool
    absent: bool
    resource_version: str | None
    lists: int
    restarts: dict[str, int]
    watches: int
    events: int
    errors: int
    last_error: str | None


@dataclass
class _Backoff:
    """Consecutive failures, and the wait before the next retry (transport/kube.py's
    `backoff_s`, the service's one backoff)."""

    initial_s: float
    max_s: float
    attempt: int = 0

    def next(self) -> float:
        self.attempt += 1
        return backoff_s(self.attempt, self.initial_s, self.max_s)

    def reset(self) -> None:
        self.attempt = 0


class _CollectionAbsent(Exception):
    """A list found no such collection (404): a CRD this cluster does not serve (yet)."""


@dataclass
class _Counters:
    lists: int = 0
    watches: int = 0
    events: int = 0
    errors: int = 0
    restarts: Counter[str] = field(default_factory=Counter)
    last_error: str | None = None


class Informer(Generic[T]):
    """List+watch one collection into a dict of projected records. Run `run()` as one task."""

    def __init__(
        self,
        api: KubeApi,
        resource: Resource,
        project: Projection[T],
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        page_size: int = 500,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        absent_retry_s: float = 60.0,
        on_event: EventHandler | None = None,
        on_restart: RestartHandler | None = None,
        on_health: HealthHandler | None = None,
    ) -> None:
        self.api = api
        self.resource = resource
        self.namespace = namespace
        self._project = project
        self._query: dict[str, Any] = {}
        if label_selector:
            self._query["labelSelector"] = label_selector
        if field_selector:
            self._query["fieldSelector"] = field_selector
        self._page_size = page_size
        self._backoff = _Backoff(backoff_initial_s, backoff_max_s)
        self._absent_retry_s = absent_retry_s
        self._handlers: list[EventHandler] = [on_event] if on_event else []
        self._on_restart = on_restart
        self._health_handlers: list[HealthHandler] = [on_health] if on_health else []
        self._items: dict[str, T] = {}
        self.synced = asyncio.Event()
        self.up = False
        self.absent = False
        self.resource_version: str | None = None
        self._counters = _Counters()

    # -- reading -----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.resource.name

    @property
    def items(self) -> Mapping[str, T]:
        """Read-only view of the store, keyed `namespace/name` (or `name`)."""
        return MappingProxyType(self._items)

    def get(self, key: str) -> T | None:
        return self._items.get(key)

    def __len__(self) -> int:
        return len(self._items)

    def add_handler(self, handler: EventHandler) -> None:
        """Also call `handler(kind, key, old, new)` on every change (after existing ones)."""
        self._handlers.append(handler)

    def add_health_handler(self, handler: HealthHandler) -> None:
        """Also call `handler(resource, up)` whenever `up` flips."""
        self._health_handlers.append(handler)

    async def wait_synced(self, timeout_s: float | None = None) -> None:
        """Until the first list completed (or the resource proved absent); TimeoutError after
        `timeout_s`."""
        async with asyncio.timeout(timeout_s):
            await self.synced.wait()

    def statistics(self) -> InformerStatistics:
        c = self._counters
        return InformerStatistics(
            resource=self.name,
            items=len(self._items),
            synced=self.synced.is_set(),
            up=self.up,
            absent=self.absent,
            resource_version=self.resource_version,
            lists=c.lists,
            restarts=dict(c.restarts),
            watches=c.watches,
            events=c.events,
            errors=c.errors,
            last_error=c.last_error,
        )

    # -- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        """List, then watch until cancelled. Never returns; never raises but CancelledError."""
        path = self.resource.path(self.namespace)
        restart: RestartCause | None = None
        events_at_list = -1  # watch events counted when the last list completed
        while True:
            delay: float | None = None
            try:
                if self.resource_version is None:
                    await self._list(path)
                    events_at_list = self._counters.events
                    if restart is not None:
                        self._counters.restarts[restart] += 1
                        if self._on_restart is not None:
                            self._call(self._on_restart, self.name, restart)
                    restart = None
                started, events = time.monotonic(), self._counters.events
                await self._watch(path)
                if time.monotonic() - started < 1.0 and events == self._counters.events:
                    # A watch the server ends at once, again and again, must not spin.
                    delay = self._backoff.next()
                else:
                    self._backoff.reset()
            except asyncio.CancelledError:
                raise
            except Gone:
                # Quiet: a compacted resourceVersion is routine (DESIGN §4, STYLE 8).
                log.debug(
                    "%s: 410 Gone at resourceVersion %s, relisting",
                    self.name,
                    self.resource_version,
                )
                if self._counters.events == events_at_list:
                    # Gone again right after a fresh list: back off rather than spin.
                    delay = self._backoff.next()
                self.resource_version = None
                restart = RestartCause.GONE
            except _CollectionAbsent:
                self._set_up(True)
                self._set_absent()
                self.resource_version = None
                restart = RestartCause.APPEARED
                delay = random.uniform(0.8, 1.2) * self._absent_retry_s
            except ApiUnreachable as e:
                self._note_error(e)
                self._set_up(False)
                delay = self._backoff.next()
                log.debug("%s: API unreachable (%s); retrying in %.1fs", self.name, e, delay)
            except KubeError as e:
                self._note_error(e)
                # An error status is an answer: the API is reachable. An error without one
                # (never sent, e.g. no credentials for a moment) says nothing either way.
                if e.status is not None:
                    self._set_up(True)
                if e.status == 404 and self.resource_version is not None:
                    # The collection vanished under a running watch (CRD deleted): relist,
                    # which finds it absent.
                    self.resource_version = None
                    restart = RestartCause.ERROR
                    continue
                delay = max(self._backoff.next(), e.retry_after_s or 0.0)
                log.warning("%s: %s; retrying in %.1fs", self.name, e, delay)
            except Exception as e:
                # A projection bug or a malformed object: rebuild the store from a fresh list.
                self._note_error(e)
                log.exception("%s: informer failed; relisting", self.name)
                self.resource_version = None
                restart = RestartCause.ERROR
                delay = self._backoff.next()
            if delay is not None:
                await asyncio.sleep(delay)

    async def _list(self, path: str) -> None:
        """Paginated list applied item by item (peak memory: the store plus one page), then
        every key the list did not show is deleted."""
        seen: set[str] = set()
        query: dict[str, Any] = {**self._query, "limit": self._page_size}
        rv = ""
        while True:
            try:
                page = await self.api.request("GET", path, query=query)
            except NotFound as e:
                raise _CollectionAbsent(e.message) from e
            except Gone:
                if "continue" in query:
                    # The continue token expired mid-list: start over.
                    query = {**self._query, "limit": self._page_size}
                    seen.clear()
                    continue
                raise
            self._set_up(True)
            for obj in page.get("items") or ():
                # A list's items omit kind/apiVersion; nothing below needs them.
                key = key_of(obj)
                seen.add(key)
                self._apply(key, obj)
            meta = page.get("metadata") or {}
            rv = str(meta.get("resourceVersion") or rv)
            token = meta.get("continue")
            if not token:
                break
            query = {**self._query, "limit": self._page_size, "continue": token}
        for key in [k for k in self._items if k not in seen]:
            self._delete(key)
        self._counters.lists += 1
        self.absent = False
        self.resource_version = rv
        self.synced.set()

    async def _watch(self, path: str) -> None:
        assert self.resource_version is not None
        # Jitter the watch length so a thousand informers do not reconnect in lockstep.
        timeout_s = max(1, int(self.api.watch_timeout_s * random.uniform(0.8, 1.0)))
        async with self.api.watch(
            path, resource_version=self.resource_version, query=self._query, timeout_s=timeout_s
        ) as events:
            self._counters.watches += 1
            self._set_up(True)
            async for event in events:
                self._handle(event)

    def _handle(self, event: Obj) -> None:
        etype = event.get("type")
        obj = event.get("object") or {}
        if etype == "ERROR":
            code = int(obj.get("code") or 0)
            message = str(obj.get("message") or obj)
            raise from_status(code, message, None, f"watch {self.name}")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if etype != "BOOKMARK":
            self._counters.events += 1
            key = key_of(obj)
            if etype == "DELETED":
                self._delete(key)
            elif etype in ("ADDED", "MODIFIED"):
                self._apply(key, obj)
            else:
                log.warning("%s: unknown watch event type %r", self.name, etype)
        if rv:
            self.resource_version = str(rv)

    # -- the store ---------------------------------------------------------------------------

    def _apply(self, key: str, obj: Obj) -> None:
        old = self._items.get(key)
        new = self._project(obj, old)
        if new is None:
            if old is not None:
                self._delete(key)
            return
        if new == old:
            # Only fields we do not keep changed: nobody needs to hear about it. Kept all the
            # same, for what a record carries without comparing it (a Node's resourceVersion).
            self._items[key] = new
            return
        self._items[key] = new
        self._emit(EventKind.ADDED if old is None else EventKind.MODIFIED, key, old, new)

    def _delete(self, key: str) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self._emit(EventKind.DELETED, key, old, None)

    def _set_absent(self) -> None:
        if not self.absent:
            log.info(
                "%s: not served by this cluster (CRD absent); checking again every ~%.0fs",
                self.name,
                self._absent_retry_s,
            )
        for key in list(self._items):
            self._delete(key)
        self.absent = True
        self.synced.set()

    def _emit(self, kind: EventKind, key: str, old: T | None, new: T | None) -> None:
        for handler in self._handlers:
            self._call(handler, kind, key, old, new)

    def _set_up(self, up: bool) -> None:
        if up == self.up:
            return
        self.up = up
        if not up:
            log.warning("%s: Kubernetes API unreachable", self.name)
        elif self._counters.lists:
            log.info("%s: Kubernetes API reachable again", self.name)
        for handler in self._health_handlers:
            self._call(handler, self.name, up)

    def _note_error(self, e: BaseException) -> None:
        self._counters.errors += 1
        self._counters.last_error = f"{time.strftime('%H:%M:%S')} {type(e).__name__}: {e}"

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        # A buggy callback must not stop the cache for everyone else.
        try:
            fn(*args)
        except Exception:
            log.exception("%s: callback %r failed", self.name, fn)


__all__ = [
    "EventHandler",
    "EventKind",
    "HealthHandler",
    "Informer",
    "InformerStatistics",
    "Projection",
    "Resource",
    "RestartCause",
    "RestartHandler",
    "key_of",
]
