"""What a failed request means (actuate/errors.py): retry it, or not. The leader election and
every write rely on it: only these errors count as "the API is in trouble"."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException

from watchdog.actuate.errors import PermanentError, TransientError, translate


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        # The token file replaced by the kubelet while the client re-reads it (empty a moment).
        (ConfigException("Token file exists but empty."), TransientError),
        (aiohttp.ServerDisconnectedError(), TransientError),
        (ConnectionResetError("reset by peer"), TransientError),
        (TimeoutError(), TransientError),
        (ApiException(status=503, reason="Service Unavailable"), TransientError),
        (ApiException(status=403, reason="Forbidden"), PermanentError),
        (ApiException(status=0, reason="no answer"), TransientError),
        (ValueError("unexpected"), PermanentError),
    ],
)
def test_each_failure_is_transient_or_permanent(error: BaseException, kind: type) -> None:
    translated = translate(error, "get lease ns/x")
    assert type(translated) is kind and str(translated).startswith("get lease ns/x")


def test_a_cancellation_is_never_translated() -> None:
    with pytest.raises(TypeError):
        translate(asyncio.CancelledError(), "x")
