"""The running simulator's control channels.

Owns:

- The control API of a running `watchdog-chaos sim`: a tiny aiohttp server on loopback with a
  random bearer token, announced in a sidecar file next to the kubeconfig
  (`<kubeconfig>.chaos.json`, mode 0600: whoever can read the kubeconfig may drive the
  faults). `fault`, `ledger` and `status` of the CLI are its clients (`ControlClient`).
- The node-local fence channel: a unix socket the simulator listens on; an agent's fence command
  (`python -m chaos.sim.control fence SOCKET NODE`) writes "fence NODE" to it. It is a local
  channel on purpose: a node that fences because it lost its network must still reach it.

Must not: know what a fault does (the handler given to the server does).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shlex
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from aiohttp import web

SIDECAR_SUFFIX = ".chaos.json"


class ControlError(RuntimeError):
    """The control channel could not be used; the message says why and what to do."""


class ControlBadRequest(ControlError):
    """The sim refused the request as invalid (unknown node, wrong action for a node...)."""


class ControlHandler(Protocol):
    async def fault(
        self, action: str, node: str | None, duration_s: float | None
    ) -> dict[str, Any]: ...

    def ledger_snapshot(self, history: bool) -> dict[str, Any]: ...

    def status(self) -> dict[str, Any]: ...


def sidecar_path(kubeconfig: Path) -> Path:
    return Path(f"{kubeconfig}{SIDECAR_SUFFIX}")


class ControlServer:
    """aiohttp on 127.0.0.1:<random>; every request needs `Authorization: Bearer <token>`."""

    def __init__(self, handler: ControlHandler, kubeconfig: Path) -> None:
        self.handler = handler
        self.kubeconfig = kubeconfig
        self.sidecar = sidecar_path(kubeconfig)
        self.token = secrets.token_urlsafe(32)
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self, extra: dict[str, Any] | None = None) -> None:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/v1/status", self._status)
        app.router.add_get("/v1/ledger", self._ledger)
        app.router.add_post("/v1/fault", self._fault)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        info = {
            "url": self.url,
            "token": self.token,
            "pid": os.getpid(),
            "kubeconfig": str(self.kubeconfig),
            **(extra or {}),
        }
        tmp = self.sidecar.with_name(f".{self.sidecar.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(info, f, indent=2)
        tmp.replace(self.sidecar)

    async def stop(self) -> None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            if json.loads(self.sidecar.read_text()).get("token") == self.token:
                self.sidecar.unlink()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _auth(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if not secrets.compare_digest(
            request.headers.get("Authorization", ""), f"Bearer {self.token}"
        ):
            return web.json_response({"error": "bad or missing token"}, status=401)
        return await handler(request)

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.handler.status())

    async def _ledger(self, request: web.Request) -> web.Response:
        history = request.query.get("history", "1") not in ("0", "false")
        return web.json_response(self.handler.ledger_snapshot(history))

    async def _fault(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            action = str(body["action"])
            node = body.get("node")
            duration = body.get("duration_s")
            duration = float(duration) if duration is not None else None
        except (ValueError, KeyError, TypeError) as e:
            return web.json_response({"error": f"bad request: {e}"}, status=400)
        try:
            result = await self.handler.fault(action, node, duration)
        except (ValueError, KeyError) as e:
            return web.json_response({"error": str(e).strip("'\"")}, status=400)
        except Exception as e:
            return web.json_response({"error": f"{type(e).__name__}: {e}"}, status=500)
        return web.json_response(result)


class ControlClient:
    """Talks to the `sim` process that wrote the sidecar next to `kubeconfig`."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token

    @classmethod
    def for_kubeconfig(cls, kubeconfig: Path) -> ControlClient:
        path = sidecar_path(kubeconfig)
        try:
            info = json.loads(path.read_text())
        except FileNotFoundError:
            raise ControlError(
                f"no running `watchdog-chaos sim` for {kubeconfig}: {path} does not exist "
                "(start one with `watchdog-chaos sim --kubeconfig "
                f"{kubeconfig}`)"
            ) from None
        except (OSError, ValueError) as e:
            raise ControlError(f"cannot read {path}: {e}") from e
        pid = info.get("pid")
        if isinstance(pid, int) and not _pid_alive(pid):
            raise ControlError(f"the sim that wrote {path} (pid {pid}) is not running any more")
        return cls(str(info["url"]), str(info["token"]))

    async def _call(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.token}"}
        timeout = aiohttp.ClientTimeout(total=120)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.request(method, f"{self.url}{path}", json=body, headers=headers) as resp,
            ):
                data = await resp.json(content_type=None)
                if resp.status == 400:
                    raise ControlBadRequest(str(data.get("error", data)))
                if resp.status >= 300:
                    raise ControlError(str(data.get("error", data)))
                return dict(data)
        except aiohttp.ClientError as e:
            raise ControlError(f"cannot reach the sim at {self.url}: {e}") from e

    async def fault(
        self, action: str, node: str | None = None, duration_s: float | None = None
    ) -> dict[str, Any]:
        return await self._call(
            "POST", "/v1/fault", {"action": action, "node": node, "duration_s": duration_s}
        )

    async def ledger(self, *, history: bool = True) -> dict[str, Any]:
        return await self._call("GET", f"/v1/ledger?history={int(history)}")

    async def status(self) -> dict[str, Any]:
        return await self._call("GET", "/v1/status")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- node-local fence channel ---------------------------------------------------------------------


class FenceServer:
    """A unix socket; each connection sends `fence NODE\\n` and gets `ok\\n` once it is done."""

    def __init__(
        self,
        path: Path,
        on_fence: Callable[[str], Awaitable[None]],
        failing: Callable[[str], bool] = lambda node: False,
    ) -> None:
        self.path = path
        self.on_fence = on_fence
        self.failing = failing  # the `fence-fails` fault: this node's fence command fails
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._handle, path=str(self.path))
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = (await asyncio.wait_for(reader.readline(), 5.0)).decode().split()
            if len(line) != 2 or line[0] != "fence":
                writer.write(b"error: expected 'fence NODE'\n")
                return
            if self.failing(line[1]):
                writer.write(b"error: the fence failed (fault fence-fails)\n")
                return
            # Answer before acting: the fence powers off the machine, agent included, and the
            # caller should see its command succeed the way a sysrq write returns.
            writer.write(b"ok\n")
            await writer.drain()
            writer.close()
            await self.on_fence(line[1])
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()


def fence_command(socket_path: Path, node: str) -> str:
    """The shell command an agent runs to fence `node` (WATCHDOG_FENCE_COMMAND)."""
    # The client module imports only the standard library: a fence must act within its
    # declared bound even on a loaded machine (importing aiohttp alone can take a second).
    return shlex.join(
        [sys.executable, "-m", "chaos.sim.fence_client", "fence", str(socket_path), node]
    )
