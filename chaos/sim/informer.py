"""The simulators' shared way of talking to the real API server: raw JSON requests, informers and
work queues, on one kubernetes_asyncio ApiClient.

Owns: `Kube` (requests as plain dicts through kubernetes_asyncio's transport, so 30,000 pods are
not turned into generated model objects), `Informer` (list + watch one collection into a cache,
relist on 410, watches always bounded by `timeoutSeconds` and a client read timeout, handlers
called synchronously with (key, new, old)), and `WorkQueue` (client-go semantics: a key is queued
once, never processed by two workers at a time, re-queued if it changed while processed).

Must not: know any simulator. Handlers must be cheap (queue a key, set an event): they run on the
informer's task.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"

Obj = dict[str, Any]
Handler = Callable[[str, Obj | None, Obj | None], None]


class ApiError(Exception):
    """A request the API server answered with an error status, or could not be made (status 0)."""

    def __init__(self, status: int, reason: str, body: Any = None) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.body = body

    @property
    def unavailable(self) -> bool:
        return self.status == 0 or self.status >= 500 or self.status == 429


@dataclass(frozen=True)
class Resource:
    """One API collection, e.g. `Resource("/api/v1", "pods", namespaced=True)`."""

    api: str
    plural: str
    namespaced: bool = True

    def path(
        self, namespace: str | None = None, name: str | None = None, sub: str | None = None
    ) -> str:
        parts = [self.api]
        if self.namespaced and namespace:
            parts += ["namespaces", quote(namespace, safe="")]
        parts.append(self.plural)
        if name:
            parts.append(quote(name, safe=""))
        if sub:
            parts.append(sub)
        return "/".join(parts)


PODS = Resource("/api/v1", "pods")
NODES = Resource("/api/v1", "nodes", namespaced=False)
NAMESPACES = Resource("/api/v1", "namespaces", namespaced=False)
PVCS = Resource("/api/v1", "persistentvolumeclaims")
PVS = Resource("/api/v1", "persistentvolumes", namespaced=False)
EVENTS = Resource("/api/v1", "events")
LEASES = Resource("/apis/coordination.k8s.io/v1", "leases")
STORAGE_CLASSES = Resource("/apis/storage.k8s.io/v1", "storageclasses", namespaced=False)
VOLUME_ATTACHMENTS = Resource("/apis/storage.k8s.io/v1", "volumeattachments", namespaced=False)
CRDS = Resource("/apis/apiextensions.k8s.io/v1", "customresourcedefinitions", namespaced=False)
VMS = Resource("/apis/kubevirt.io/v1", "virtualmachines")
VMIS = Resource("/apis/kubevirt.io/v1", "virtualmachineinstances")
VMIMS = Resource("/apis/kubevirt.io/v1", "virtualmachineinstancemigrations")
KUBEVIRTS = Resource("/apis/kubevirt.io/v1", "kubevirts")
MIGRATION_POLICIES = Resource(
    "/apis/migrations.kubevirt.io/v1alpha1", "migrationpolicies", namespaced=False
)
SETTINGS = Resource("/apis/harvesterhci.io/v1beta1", "settings", namespaced=False)
UPGRADES = Resource("/apis/harvesterhci.io/v1beta1", "upgrades")


def key_of(obj: Obj) -> str:
    meta = obj["metadata"]
    ns = meta.get("namespace")
    return f"{ns}/{meta['name']}" if ns else meta["name"]


def split_key(key: str) -> tuple[str | None, str]:
    ns, _, name = key.rpartition("/")
    return (ns or None), name


def now_rfc3339() -> str:
    """metav1.Time: seconds precision, as the API server stores it."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    """metav1.MicroTime (Lease renewTime): exactly six fraction digits, RFC3339Micro."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: str | None) -> float | None:
    """Wall-clock seconds of an API timestamp, or None."""
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def condition(obj: Obj | None, ctype: str) -> Obj | None:
    if obj is None:
        return None
    for cond in obj.get("status", {}).get("conditions") or ():
        if cond.get("type") == ctype:
            return dict(cond)
    return None


def has_taint(node: Obj, key: str) -> bool:
    return any(t.get("key") == key for t in node.get("spec", {}).get("taints") or ())


class Kube:
    """Plain-JSON requests over one kubernetes_asyncio ApiClient (one connection pool)."""

    def __init__(self, api_client: k8s_client.ApiClient, *, request_timeout_s: float = 30.0):
        self.api_client = api_client
        self.request_timeout_s = request_timeout_s

    @classmethod
    async def from_kubeconfig(cls, path: Path, *, pool_size: int = 128) -> Kube:
        cfg = k8s_client.Configuration()
        await k8s_config.load_kube_config(config_file=str(path), client_configuration=cfg)
        # The default pool (5 x cores) would serialize 1,000 nodes' lease renewals behind the
        # long-running watches.
        cfg.connection_pool_maxsize = pool_size
        return cls(k8s_client.ApiClient(configuration=cfg))

    async def close(self) -> None:
        await self.api_client.close()

    async def _open(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        request_timeout: aiohttp.ClientTimeout | float | None = None,
    ) -> aiohttp.ClientResponse:
        try:
            resp: aiohttp.ClientResponse = await self.api_client.call_api(
                path,
                method,
                query_params=list((query or {}).items()),
                header_params={"Content-Type": content_type, "Accept": "application/json"},
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=(
                    request_timeout if request_timeout is not None else self.request_timeout_s
                ),
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise ApiError(0, f"{method} {path}: {type(e).__name__}: {e}") from e
        return resp

    async def request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        request_timeout: float | None = None,
    ) -> Obj:
        resp = await self._open(
            method,
            path,
            query=query,
            body=body,
            content_type=content_type,
            request_timeout=request_timeout,
        )
        try:
            async with resp:
                data = await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise ApiError(0, f"{method} {path}: {type(e).__name__}: {e}") from e
        if resp.status >= 300:
            try:
                status_body = json.loads(data)
            except ValueError:
                status_body = data.decode(errors="replace")
            reason = (
                (status_body.get("message") if isinstance(status_body, dict) else str(status_body))
                or resp.reason
                or ""
            )
            raise ApiError(resp.status, f"{method} {path}: {reason}", status_body)
        return json.loads(data) if data else {}

    # --- verbs ---------------------------------------------------------------------------------

    async def get(self, res: Resource, name: str, namespace: str | None = None) -> Obj:
        return await self.request("GET", res.path(namespace, name))

    async def get_or_none(
        self, res: Resource, name: str, namespace: str | None = None
    ) -> Obj | None:
        try:
            return await self.get(res, name, namespace)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def list(self, res: Resource, namespace: str | None = None, **query: Any) -> Obj:
        return await self.request("GET", res.path(namespace), query=query)

    async def create(
        self, res: Resource, body: Obj, namespace: str | None = None, sub: str | None = None
    ) -> Obj:
        ns = namespace or body.get("metadata", {}).get("namespace")
        path = res.path(ns, body["metadata"]["name"], sub) if sub else res.path(ns)
        return await self.request("POST", path, body=body)

    async def replace(self, res: Resource, body: Obj, *, sub: str | None = None) -> Obj:
        meta = body["metadata"]
        return await self.request(
            "PUT", res.path(meta.get("namespace"), meta["name"], sub), body=body
        )

    async def patch(
        self,
        res: Resource,
        name: str,
        body: Any,
        namespace: str | None = None,
        *,
        sub: str | None = None,
        content_type: str = MERGE_PATCH,
    ) -> Obj:
        return await self.request(
            "PATCH", res.path(namespace, name, sub), body=body, content_type=content_type
        )

    async def delete(
        self,
        res: Resource,
        name: str,
        namespace: str | None = None,
        *,
        grace_period_s: int | None = None,
        uid: str | None = None,
        propagation: str | None = None,
        missing_ok: bool = True,
    ) -> bool:
        """Delete; True if the request was accepted, False if the object was already gone."""
        opts: Obj = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if grace_period_s is not None:
            opts["gracePeriodSeconds"] = grace_period_s
        if uid is not None:
            # Never delete a newer object that reuses the name (a recreated VMI or pod).
            opts["preconditions"] = {"uid": uid}
        if propagation:
            opts["propagationPolicy"] = propagation
        try:
            await self.request("DELETE", res.path(namespace, name), body=opts)
            return True
        except ApiError as e:
            if missing_ok and (e.status == 404 or (uid is not None and e.status == 409)):
                return False
            raise

    async def watch(
        self,
        res: Resource,
        *,
        namespace: str | None,
        resource_version: str,
        timeout_s: int,
        selectors: dict[str, str],
    ) -> AsyncIterator[Obj]:
        query: dict[str, Any] = {
            "watch": "true",
            "resourceVersion": resource_version,
            "timeoutSeconds": timeout_s,
            "allowWatchBookmarks": "true",
            **selectors,
        }
        # The server ends the watch after timeoutSeconds; the client read timeout catches a
        # server (or proxy) that went silent without closing.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=timeout_s + 15)
        resp = await self._open("GET", res.path(namespace), query=query, request_timeout=timeout)
        async with resp:
            if resp.status >= 300:
                body = await resp.read()
                raise ApiError(resp.status, f"watch {res.plural}: {body[:300]!r}")
            try:
                async for line in resp.content:
                    if line.strip():
                        yield json.loads(line)
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                raise ApiError(0, f"watch {res.plural}: {type(e).__name__}: {e}") from e


def _strip(obj: Obj) -> Obj:
    # managedFields are half of a pod's JSON; nothing here reads them.
    obj.get("metadata", {}).pop("managedFields", None)
    return obj


class Informer:
    """A cache of one collection kept current by list + watch; handlers see every change."""

    def __init__(
        self,
        kube: Kube,
        res: Resource,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        watch_timeout_s: int = 120,
        name: str | None = None,
    ) -> None:
        self.kube = kube
        self.res = res
        self.namespace = namespace
        self.selectors: dict[str, str] = {}
        if label_selector:
            self.selectors["labelSelector"] = label_selector
        if field_selector:
            self.selectors["fieldSelector"] = field_selector
        self.watch_timeout_s = watch_timeout_s
        self.name = name or res.plural
        self.items: dict[str, Obj] = {}
        self.synced = asyncio.Event()
        self._handlers: list[Handler] = []
        self._indexers: dict[str, Callable[[Obj], Iterable[str]]] = {}
        self._indices: dict[str, dict[str, set[str]]] = {}
        self.relists = 0

    def add_handler(self, handler: Handler) -> None:
        self._handlers.append(handler)

    def add_index(self, name: str, fn: Callable[[Obj], Iterable[str]]) -> None:
        """Maintain `by(name, value)` → keys, e.g. pods by spec.nodeName."""
        self._indexers[name] = fn
        idx: dict[str, set[str]] = {}
        for key, obj in self.items.items():
            for value in fn(obj):
                idx.setdefault(value, set()).add(key)
        self._indices[name] = idx

    def by(self, index: str, value: str) -> list[Obj]:
        keys = self._indices[index].get(value, ())
        return [self.items[k] for k in keys if k in self.items]

    def keys_by(self, index: str, value: str) -> set[str]:
        return set(self._indices[index].get(value, ()))

    def get(self, key: str) -> Obj | None:
        return self.items.get(key)

    def values(self) -> list[Obj]:
        return list(self.items.values())

    async def wait_synced(self, timeout_s: float = 60.0) -> None:
        await asyncio.wait_for(self.synced.wait(), timeout_s)

    def _apply(self, key: str, new: Obj | None) -> None:
        old = self.items.get(key)
        if new is None:
            if old is None:
                return
            del self.items[key]
        else:
            self.items[key] = new
        for name, fn in self._indexers.items():
            idx = self._indices[name]
            if old is not None:
                for value in fn(old):
                    keys = idx.get(value)
                    if keys is not None:
                        keys.discard(key)
                        if not keys:
                            del idx[value]
            if new is not None:
                for value in fn(new):
                    idx.setdefault(value, set()).add(key)
        for handler in self._handlers:
            try:
                handler(key, new, old)
            except Exception:  # a buggy handler must not kill the cache for everyone
                log.exception("%s informer: handler failed for %s", self.name, key)

    async def _relist(self) -> str:
        listing = await self.kube.list(self.res, self.namespace, **self.selectors)
        fresh = {key_of(o): _strip(o) for o in listing.get("items", [])}
        for key in list(self.items):
            if key not in fresh:
                self._apply(key, None)
        for key, obj in fresh.items():
            old = self.items.get(key)
            if old is None or old["metadata"].get("resourceVersion") != obj["metadata"].get(
                "resourceVersion"
            ):
                self._apply(key, obj)
        self.relists += 1
        self.synced.set()
        return str(listing["metadata"]["resourceVersion"])

    async def run(self) -> None:
        """List, then watch forever; relist on 410 Gone or after a failed watch."""
        backoff = 0.2
        rv: str | None = None
        while True:
            try:
                if rv is None:
                    rv = await self._relist()
                # Jitter the watch length so a thousand informers do not renew in lockstep.
                timeout = int(self.watch_timeout_s * random.uniform(0.8, 1.0))
                async for event in self.kube.watch(
                    self.res,
                    namespace=self.namespace,
                    resource_version=rv,
                    timeout_s=timeout,
                    selectors=self.selectors,
                ):
                    etype = event.get("type")
                    obj = event.get("object") or {}
                    if etype == "ERROR":
                        if obj.get("code") == 410:
                            log.debug("%s informer: 410 Gone, relisting", self.name)
                            rv = None
                            break
                        raise ApiError(int(obj.get("code") or 0), str(obj.get("message")))
                    new_rv = obj.get("metadata", {}).get("resourceVersion")
                    if new_rv:
                        rv = new_rv
                    if etype == "BOOKMARK":
                        continue
                    key = key_of(obj)
                    self._apply(key, None if etype == "DELETED" else _strip(obj))
                backoff = 0.2
            except asyncio.CancelledError:
                raise
            except ApiError as e:
                if e.status == 410:
                    rv = None
                    continue
                log.debug("%s informer: %s; retrying in %.1fs", self.name, e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:
                log.exception("%s informer failed; relisting", self.name)
                rv = None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)


class WorkQueue:
    """Keys to reconcile, deduplicated; one worker per key at a time (client-go semantics)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: deque[str] = deque()
        self._dirty: set[str] = set()
        self._processing: set[str] = set()
        self._ready = asyncio.Event()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._failures: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, key: str) -> None:
        if key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._processing:
            self._queue.append(key)
            self._ready.set()

    def add_after(self, key: str, delay_s: float) -> None:
        """Queue `key` in `delay_s` (an earlier pending request wins)."""
        if delay_s <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + delay_s
        timer = self._timers.get(key)
        if timer is not None and not timer.cancelled() and timer.when() <= when:
            return
        if timer is not None:
            timer.cancel()
        self._timers[key] = loop.call_at(when, self._fire, key)

    def _fire(self, key: str) -> None:
        self._timers.pop(key, None)
        self.add(key)

    async def get(self) -> str:
        while not self._queue:
            self._ready.clear()
            await self._ready.wait()
        key = self._queue.popleft()
        self._dirty.discard(key)
        self._processing.add(key)
        return key

    def done(self, key: str) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._queue.append(key)
            self._ready.set()

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    async def run_workers(self, count: int, reconcile: Callable[[str], Awaitable[None]]) -> None:
        """Run `count` workers until cancelled; a failed reconcile is retried with backoff."""
        async with asyncio.TaskGroup() as tg:
            for i in range(count):
                tg.create_task(self._worker(reconcile), name=f"{self.name} worker {i}")

    async def _worker(self, reconcile: Callable[[str], Awaitable[None]]) -> None:
        while True:
            key = await self.get()
            try:
                await reconcile(key)
                self._failures.pop(key, None)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                n = self._failures.get(key, 0) + 1
                self._failures[key] = n
                delay = min(0.05 * 2**n, 5.0)
                level = (
                    logging.DEBUG
                    if isinstance(e, ApiError) and (e.unavailable or e.status == 409)
                    else logging.WARNING
                )
                log.log(
                    level,
                    "%s: reconcile %s failed (attempt %d, retry in %.2fs): %s",
                    self.name,
                    key,
                    n,
                    delay,
                    e,
                    exc_info=level == logging.WARNING,
                )
                self.add_after(key, delay)
            finally:
                self.done(key)


class Clock:
    """The simulators' time: monotonic seconds for durations, and the time scale."""

    def __init__(self, time_scale: float) -> None:
        if time_scale <= 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        self.time_scale = time_scale

    def scaled(self, seconds: float) -> float:
        return seconds * self.time_scale

    @staticmethod
    def mono() -> float:
        return time.monotonic()


@contextlib.asynccontextmanager
async def background(name: str, coro: Awaitable[None]) -> AsyncIterator[asyncio.Task[None]]:
    """Run `coro` as a named task for the duration of the block; cancel and await it after."""
    task = asyncio.ensure_future(coro)
    task.set_name(name)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
