"""Fence mode `external` with `fence_hook_url`: the controller POSTs `{"node": ...}` to the
operator's endpoint, and only a 2xx answer confirms the node is off. Against a real HTTP server
on loopback (aiohttp's), through the service's plain HTTP client (transport/http_client.py)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from tests.loopback_http import serving
from watchdog.actuate.fence_runners import FenceRunner
from watchdog.actuate.outcome import Result
from watchdog.decide.actions import RunFenceHook
from watchdog.decide.config import FenceMode


@dataclass
class Hook:
    fence_hook_url: str | None
    fence_hook_command: str | None = None
    fence_hook_timeout_s: float = 2.0
    fence_mode: FenceMode = FenceMode.EXTERNAL
    power_fence_inventory: Path | None = None


@pytest.fixture
async def endpoint() -> AsyncIterator[tuple[str, list[object], list[int]]]:
    """A fence endpoint: records each body; answers the status at the head of `answers`."""
    bodies: list[object] = []
    answers: list[int] = []

    async def fence(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        return web.Response(status=answers.pop(0) if answers else 200, text="switched off")

    app = web.Application()
    app.router.add_post("/fence", fence)
    async with serving(app) as port:
        yield f"http://127.0.0.1:{port}/fence", bodies, answers


async def test_a_2xx_confirms_the_node_off_and_anything_else_does_not(
    endpoint: tuple[str, list[object], list[int]],
) -> None:
    url, bodies, answers = endpoint
    runner = FenceRunner(Hook(url), dry_run=False)
    ok = await runner.run_fence_hook(RunFenceHook("node-3"))
    assert ok.result is Result.SUCCESS and bodies == [{"node": "node-3"}]
    answers.append(500)  # the endpoint failed: not a confirmation
    failed = await runner.run_fence_hook(RunFenceHook("node-3"))
    assert failed.result is Result.FAILED and "500" in failed.detail
    assert "switched off" in failed.detail  # what the endpoint said, for the operator


async def test_an_endpoint_that_does_not_answer_is_a_failed_fence_never_a_success() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runner = FenceRunner(Hook(f"http://127.0.0.1:{port}/fence"), dry_run=False)
    outcome = await runner.run_fence_hook(RunFenceHook("node-3"))
    assert outcome.result is Result.FAILED and "fence webhook" in outcome.detail
