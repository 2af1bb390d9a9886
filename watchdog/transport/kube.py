"""The one Kubernetes client of the service: client construction, requests, watches, the
translation of every library error, and the retry backoff.

Owns: building one kubernetes_asyncio `ApiClient` (one connection pool per process) from an
explicit kubeconfig, `KUBECONFIG`, the in-cluster ServiceAccount or `~/.kube/config` (in that
order); `exchange`, one raw request over that client's transport (status, headers, body:
`_preload_content=False`, so 100,000 pods are never turned into generated model objects);
`KubeApi`, the readers' JSON requests and watches over it, with a client-side timeout on every
request and a server-side `timeoutSeconds` plus a read timeout on every watch; `backoff_s`, the
one backoff every retry loop of the service waits (the informers' relists and rewatches, the
writer's attempts). It is the only module that imports kubernetes_asyncio (an import-linter
contract); with transport/http_client.py, the only client of aiohttp (another contract).

Must not: cache, decide, or know what a request is for. Library exceptions never leave this
module: they become transport/kube_errors.py's (`raise ... from e`). `asyncio.CancelledError`
always propagates.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol, TypeAlias

import aiohttp
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException

from watchdog.transport.kube_errors import (
    ApiUnreachable,
    KubeError,
    PermanentError,
    from_status,
)

log = logging.getLogger(__name__)

JSON = "application/json"
# Bounds what one error body may cost us (a proxy can answer with a whole HTML page).
_MAX_ERROR_BODY = 4096
# Seconds beyond the server-side watch timeout before a silent watch counts as hung: a frozen
# apiserver keeps the TCP connection open and answers nothing.
_WATCH_READ_SLACK_S = 5.0

Obj = dict[str, Any]
# The process's connection to the API server, as the other layers hold it (opaque to them).
ApiClient: TypeAlias = k8s_client.ApiClient


def backoff_s(attempt: int, initial_s: float, max_s: float) -> float:
    """The wait before retry `attempt` (1 for the first): exponential from `initial_s`, capped
    at `max_s`, with "equal jitter" (a random half of each step, so that the retries of many
    clients spread out, and the total wait over N attempts is bounded below as well as
    above)."""
    ceiling = min(max_s, initial_s * 2 ** (attempt - 1))
    return random.uniform(ceiling / 2, ceiling)


def translate(e: BaseException, what: str) -> KubeError:
    """Our error for a library exception met sending `what`; raise it `from e`. Never for
    CancelledError."""
    if isinstance(e, asyncio.CancelledError):
        raise TypeError("CancelledError must propagate, not be translated") from e
    if isinstance(e, KubeError):
        return e
    if isinstance(e, ApiException):
        headers = dict(e.headers) if e.headers else None
        if not e.status:  # raised by the client before any byte was sent: no answer
            return ApiUnreachable(f"{what}: {e.reason}")
        return from_status(int(e.status), e.body, headers, what)
    if isinstance(e, TimeoutError | asyncio.TimeoutError):
        return ApiUnreachable(f"{what}: timed out")
    if isinstance(e, aiohttp.ClientError | OSError):
        return ApiUnreachable(f"{what}: {_describe(e)}")
    if isinstance(e, ConfigException):
        # The client re-reads its token file before requests; a projected token is replaced
        # by the kubelet while it runs (an empty file for a moment): the next attempt reads it.
        # Nothing was sent, so nothing was answered: never taken for the API's answer (the
        # Lease gate waits for a real one, decide/signals.py).
        return ApiUnreachable(f"{what}: credentials: {e}")
    return PermanentError(f"{what}: {type(e).__name__}: {e}")


def json_answer(status: int, headers: Mapping[str, str], data: bytes, what: str) -> Obj:
    """The decoded JSON body of a 2xx answer to `what`; else its `KubeError`."""
    if status >= 300:
        raise from_status(status, data, headers, what)
    try:
        return json.loads(data) if data else {}
    except ValueError as e:
        raise PermanentError(f"{what}: body is not JSON", status=status) from e


# What `exchange` and the watches meet from the library (everything else is a bug, not an
# API error, and propagates as it is).
_LIBRARY_ERRORS = (ApiException, ConfigException, aiohttp.ClientError, TimeoutError, OSError)


async def exchange(
    api_client: ApiClient,
    method: str,
    path: str,
    *,
    query: Mapping[str, Any] | None = None,
    body: Any = None,
    content_type: str = JSON,
    timeout_s: float | aiohttp.ClientTimeout = 10.0,
    what: str = "",
) -> tuple[int, Mapping[str, str], bytes]:
    """One request, its whole answer read: (status, headers, body) whatever the status. The
    request's own timeout is `timeout_s` (callers bound their wait themselves too); `what`
    names it in errors (default: method and path)."""
    try:
        resp = await _open(api_client, method, path, query, body, content_type, timeout_s)
        async with resp:
            data = await resp.read()
    except _LIBRARY_ERRORS as e:
        raise translate(e, what or f"{method} {path}") from e
    return resp.status, resp.headers, data


class KubeSettings(Protocol):
    """What this module reads from the runtime's Settings (structural: transport must not import
    the runtime layer)."""

    @property
    def api_request_timeout_s(self) -> float: ...

    @property
    def watch_timeout_s(self) -> int: ...


class ConfigError(Exception):
    """No usable Kubernetes client configuration was found."""


async def load_api_client(
    kubeconfig: str | os.PathLike[str] | None = None,
    *,
    context: str | None = None,
    pool_size: int = 100,
) -> k8s_client.ApiClient:
    """One ApiClient (one connection pool) for the whole process.

    Source, first match wins: `kubeconfig` argument; `$KUBECONFIG` (colon-separated list, as
    kubectl merges it); in-cluster ServiceAccount when `$KUBERNETES_SERVICE_HOST` is set;
    `~/.kube/config`. Every watch holds one pooled connection, so `pool_size` must exceed the
    number of informers by the concurrency wanted for writes.
    """
    cfg = k8s_client.Configuration()
    env_path = os.environ.get("KUBECONFIG")
    default_path = _default_kubeconfig()
    try:
        if kubeconfig is not None:
            await k8s_config.load_kube_config(
                config_file=str(kubeconfig), context=context, client_configuration=cfg
            )
            source = f"kubeconfig {kubeconfig}"
        elif env_path:
            await k8s_config.load_kube_config(
                config_file=env_path, context=context, client_configuration=cfg
            )
            source = f"KUBECONFIG={env_path}"
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            k8s_config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
            source = "in-cluster ServiceAccount"
        elif default_path is not None:
            await k8s_config.load_kube_config(
                config_file=default_path, context=context, client_configuration=cfg
            )
            source = f"kubeconfig {default_path}"
        else:
            raise ConfigError(
                "no Kubernetes configuration: set KUBECONFIG, run in a pod with a "
                "ServiceAccount, or create ~/.kube/config"
            )
    except (k8s_config.ConfigException, OSError, ValueError) as e:
        raise ConfigError(f"cannot load Kubernetes configuration: {e}") from e
    cfg.connection_pool_maxsize = pool_size
    log.debug("Kubernetes API %s from %s", cfg.host, source)
    return k8s_client.ApiClient(configuration=cfg)


async def connect(
    settings: KubeSettings,
    kubeconfig: str | os.PathLike[str] | None = None,
    *,
    pool_size: int = 100,
) -> KubeApi:
    """`load_api_client` + `KubeApi` with the timeouts of `settings`. The runtime hands
    `.api_client` to the actuator too: one connection pool per process."""
    client = await load_api_client(kubeconfig, pool_size=pool_size)
    return KubeApi.from_settings(client, settings)


def _default_kubeconfig() -> str | None:
    path = os.path.expanduser("~/.kube/config")
    return path if os.path.exists(path) else None


class KubeApi:
    """Raw JSON requests and watches over a kubernetes_asyncio ApiClient.

    Every request carries a client-side timeout (`request_timeout_s`, default
    `Settings.api_request_timeout_s`); every watch a server-side `timeoutSeconds` and a
    client-side read timeout a little longer than it.
    """

    def __init__(
        self,
        api_client: ApiClient,
        *,
        request_timeout_s: float = 10.0,
        watch_timeout_s: int = 60,
    ) -> None:
        self.api_client = api_client
        self.request_timeout_s = request_timeout_s
        self.watch_timeout_s = watch_timeout_s

    @classmethod
    def from_settings(cls, api_client: ApiClient, settings: KubeSettings) -> KubeApi:
        return cls(
            api_client,
            request_timeout_s=settings.api_request_timeout_s,
            watch_timeout_s=settings.watch_timeout_s,
        )

    async def close(self) -> None:
        await self.api_client.close()

    # -- requests ----------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str = JSON,
        timeout_s: float | None = None,
    ) -> Obj:
        """One request; the decoded JSON body on 2xx, else a `KubeError`."""
        timeout = self.request_timeout_s if timeout_s is None else timeout_s
        what = f"{method} {path}"
        try:
            async with asyncio.timeout(timeout):
                status, headers, data = await exchange(
                    self.api_client,
                    method,
                    path,
                    query=query,
                    body=body,
                    content_type=content_type,
                    timeout_s=timeout,
                )
        except TimeoutError as e:
            raise ApiUnreachable(f"{what}: timed out") from e
        return json_answer(status, headers, data, what)

    async def version(self) -> Obj:
        """`/version`: readable by every client, the cheapest proof the API answers."""
        return await self.request("GET", "/version")

    @contextlib.asynccontextmanager
    async def watch(
        self,
        path: str,
        *,
        resource_version: str,
        query: Mapping[str, Any] | None = None,
        timeout_s: int | None = None,
    ) -> AsyncIterator[AsyncIterator[Obj]]:
        """Open a watch from `resource_version`; entering the block means the server accepted
        it (status 200), iterating yields the watch events as decoded JSON.

        The server ends the watch after `timeout_s` (default `watch_timeout_s`); a watch that
        stays silent longer than that plus a few seconds raises `ApiUnreachable`.
        """
        server_timeout = self.watch_timeout_s if timeout_s is None else timeout_s
        params = {
            **(query or {}),
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": server_timeout,
        }
        stream_timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=self.request_timeout_s,
            sock_read=server_timeout + _WATCH_READ_SLACK_S,
        )
        try:
            # The response headers must come within the ordinary request timeout.
            async with asyncio.timeout(self.request_timeout_s):
                resp = await _open(self.api_client, "GET", path, params, None, JSON, stream_timeout)
        except _LIBRARY_ERRORS as e:
            raise translate(e, f"watch {path}") from e
        try:
            if resp.status >= 300:
                try:
                    data = await resp.content.read(_MAX_ERROR_BODY)
                except (aiohttp.ClientError, TimeoutError, OSError) as e:
                    raise ApiUnreachable(f"watch {path}: {_describe(e)}") from e
                raise from_status(resp.status, data, resp.headers, f"watch {path}")
            yield _events(resp, path)
        finally:
            # A watch not read to its end cannot go back to the pool.
            resp.close()


async def _open(
    api_client: ApiClient,
    method: str,
    path: str,
    query: Mapping[str, Any] | None,
    body: Any,
    content_type: str,
    client_timeout: float | aiohttp.ClientTimeout,
) -> aiohttp.ClientResponse:
    resp = await api_client.call_api(
        path,
        method,
        query_params=list((query or {}).items()),
        header_params={"Content-Type": content_type, "Accept": JSON},
        body=body,
        auth_settings=["BearerToken"],
        _preload_content=False,
        _request_timeout=client_timeout,
    )
    assert isinstance(resp, aiohttp.ClientResponse)
    return resp


async def _events(resp: aiohttp.ClientResponse, path: str) -> AsyncIterator[Obj]:
    """Newline-delimited JSON from a watch response, without aiohttp's line-length limit (one
    pod with large annotations can exceed it)."""
    buffer = b""
    try:
        async for chunk in resp.content.iter_any():
            buffer += chunk
            while True:
                line, sep, rest = buffer.partition(b"\n")
                if not sep:
                    break
                buffer = rest
                if line.strip():
                    yield json.loads(line)
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        raise ApiUnreachable(f"watch {path}: {_describe(e)}") from e
        if buffer.strip():
            yield json.loads(buffer)
    except ValueError as e:
        raise ApiUnreachable(f"watch {path}: undecodable event: {e}") from e


def _describe(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


__all__ = [
    "JSON",
    "ApiClient",
    "ConfigError",
    "KubeApi",
    "KubeSettings",
    "Obj",
    "backoff_s",
    "connect",
    "exchange",
    "json_answer",
    "load_api_client",
    "translate",
]
