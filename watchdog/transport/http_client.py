"""Plain HTTP requests that are not the Kubernetes API: an operator's fence webhook (fence mode
`external`) and the controller's own `/metrics` read by `node-watchdog status`.

Owns: one request each, with a total timeout, its answer as (status, text). Library errors
become `HttpError` (chained), so the layers above never import aiohttp's client.

Must not: retry or decide what an answer means (the callers do).
"""

from __future__ import annotations

from typing import Any

import aiohttp


class HttpError(Exception):
    """No answer: the connection failed or the request timed out."""


async def post_json(url: str, doc: Any, timeout_s: float) -> tuple[int, str]:
    """POST `doc` as JSON; (status, body text)."""
    return await _request("POST", url, doc, timeout_s)


async def get_text(url: str, timeout_s: float) -> tuple[int, str]:
    """GET; (status, body text)."""
    return await _request("GET", url, None, timeout_s)


async def _request(method: str, url: str, doc: Any, timeout_s: float) -> tuple[int, str]:
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.request(method, url, json=doc) as resp,
        ):
            return resp.status, await resp.text()
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        raise HttpError(f"{type(e).__name__}: {e}") from e


__all__ = ["HttpError", "get_text", "post_json"]
