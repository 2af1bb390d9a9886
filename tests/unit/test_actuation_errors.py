"""What a failed request means (transport/kube_errors.py, translated in transport/kube.py): retry
it, or not, and whether the API answered at all. The leader election, every write and every
read rely on it: only these errors count as "the API is in trouble"."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException

from watchdog.transport.kube import translate
from watchdog.transport.kube_errors import (
    ApiUnreachable,
    Conflict,
    Gone,
    KubeError,
    NotFound,
    PermanentError,
    TransientError,
    from_status,
)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        # The token file replaced by the kubelet while the client re-reads it (empty a moment).
        # Nothing sent, nothing answered: never taken for the API's answer (the Lease gate).
        (ConfigException("Token file exists but empty."), ApiUnreachable),
        (aiohttp.ServerDisconnectedError(), ApiUnreachable),
        (ConnectionResetError("reset by peer"), ApiUnreachable),
        (TimeoutError(), ApiUnreachable),
        (ApiException(status=503, reason="Service Unavailable"), TransientError),
        (ApiException(status=403, reason="Forbidden"), PermanentError),
        (ApiException(status=0, reason="no answer"), ApiUnreachable),
        (ValueError("unexpected"), PermanentError),
    ],
)
def test_each_failure_is_transient_or_permanent(error: BaseException, kind: type) -> None:
    translated = translate(error, "get lease ns/x")
    assert type(translated) is kind and str(translated).startswith("get lease ns/x")
    assert translated.transient is issubclass(kind, TransientError)


@pytest.mark.parametrize(
    ("status", "kind", "transient"),
    [
        (404, NotFound, False),
        (409, Conflict, False),
        (410, Gone, False),
        (403, PermanentError, False),
        (422, PermanentError, False),
        (429, TransientError, True),
        (503, TransientError, True),
    ],
)
def test_reads_and_writes_share_one_error_tree(status: int, kind: type, transient: bool) -> None:
    """A read (the informers, the probes) and a write (the actuator) that meet the same answer
    get the same error: 410 is Gone for a watch as for a list."""
    body = b'{"kind":"Status","message":"no","reason":"R"}'
    error = from_status(status, body, {"Retry-After": "3"}, "GET /x")
    assert type(error) is kind and error.transient is transient
    assert isinstance(error, KubeError) and error.status == status
    assert error.reason == "R" and error.retry_after_s == 3.0


def test_a_cancellation_is_never_translated() -> None:
    with pytest.raises(TypeError):
        translate(asyncio.CancelledError(), "x")
