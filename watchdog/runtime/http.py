"""HTTP endpoints: /metrics (Prometheus), /healthz (loops alive), /readyz (caches and broker).

Health is reported by the loops themselves through `Health.beat(name)`; a loop that has not
beaten within its allowance makes /healthz fail, so a wedged process gets restarted.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


class Health:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._beats: dict[str, tuple[float, float]] = {}
        self._ready: dict[str, Callable[[], bool]] = {}

    def beat(self, loop: str, allowance_s: float = 30.0) -> None:
        self._beats[loop] = (self._clock(), allowance_s)

    def readiness(self, name: str, check: Callable[[], bool]) -> None:
        self._ready[name] = check

    def dead_loops(self) -> list[str]:
        now = self._clock()
        return sorted(n for n, (at, allow) in self._beats.items() if now - at > allow)

    def not_ready(self) -> list[str]:
        return sorted(n for n, check in self._ready.items() if not check())


def make_app(registry: CollectorRegistry, health: Health) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        dead = health.dead_loops()
        if dead:
            return web.Response(status=503, text="stalled: " + ", ".join(dead) + "\n")
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        missing = health.not_ready()
        if missing:
            return web.Response(status=503, text="not ready: " + ", ".join(missing) + "\n")
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def serve(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Start serving; returns the runner (its `addresses` give the bound port when port=0)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner
