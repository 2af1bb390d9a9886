"""The `RunFenceHook` action: one run of the node's fence, whose success means the node is
powered off.

Owns: `FenceRunner`, which runs the fence the settings name: the BMC power fence
(power_fence.py, fence_mode=power), else the hook command (node name in $NODE), else the hook
webhook (POST `{"node": ...}`); and `FenceSettings`, what it reads of the runtime's Settings.
A run that times out or is cancelled leaves no hook command running.

Must not: retry (the decision loop asks again), or swallow `asyncio.CancelledError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Protocol

from watchdog.actuate.outcome import Outcome, Result
from watchdog.actuate.power_fence import PowerFencer
from watchdog.decide.actions import RunFenceHook
from watchdog.decide.config import FenceMode
from watchdog.transport.http_client import HttpError, post_json

log = logging.getLogger(__name__)


class FenceSettings(Protocol):
    """What the fence runner reads from the runtime's Settings (structural: actuate must not
    import the runtime layer)."""

    @property
    def fence_hook_command(self) -> str | None: ...

    @property
    def fence_hook_url(self) -> str | None: ...

    @property
    def fence_hook_timeout_s(self) -> float: ...

    @property
    def fence_mode(self) -> FenceMode: ...

    @property
    def power_fence_inventory(self) -> Path | None: ...


class FenceRunner:
    """Runs the configured fence of a node, once per call."""

    def __init__(self, settings: FenceSettings, *, dry_run: bool) -> None:
        self.settings = settings
        self.dry_run = dry_run

    async def run_fence_hook(self, action: RunFenceHook) -> Outcome:
        """fence_mode=power: switch the node off through its BMC and read back off
        (power_fence.py); fence_mode=external: run the command (node name in $NODE) or POST
        the webhook, success meaning the hook confirms the node is powered off. Not retried
        here: the decision loop asks again."""
        name = "run_fence_hook"
        if self.dry_run:
            return Outcome(name, Result.DRY_RUN, "dry run: hook not called")
        outcome = await self._fence(name, action.node)
        if outcome.result is Result.FAILED:
            # What an operator answering WatchdogFenceFailing reads: which node, and why.
            log.warning("fence of node %s failed: %s", action.node, outcome.detail[:500])
        return outcome

    async def _fence(self, name: str, node: str) -> Outcome:
        s = self.settings
        if s.fence_mode is FenceMode.POWER and s.power_fence_inventory is not None:
            run = await PowerFencer(s.power_fence_inventory, s.fence_hook_timeout_s).fence(node)
            return Outcome(name, Result.SUCCESS if run.confirmed else Result.FAILED, run.detail)
        if s.fence_hook_command:
            return await self._fence_command(name, s.fence_hook_command, node)
        if s.fence_hook_url:
            return await self._fence_webhook(name, s.fence_hook_url, node)
        return Outcome(name, Result.FAILED, "no fence hook configured")

    async def _fence_command(self, name: str, command: str, node: str) -> Outcome:
        proc = await asyncio.create_subprocess_shell(
            command,
            env={**os.environ, "NODE": node},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            async with asyncio.timeout(self.settings.fence_hook_timeout_s):
                output, _ = await proc.communicate()
        except TimeoutError:
            return Outcome(
                name,
                Result.FAILED,
                f"fence command timed out after {self.settings.fence_hook_timeout_s:.0f}s",
            )
        finally:
            if proc.returncode is None:  # timed out or cancelled: never leave the hook running
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        tail = output.decode(errors="replace").strip()[-300:]
        if proc.returncode == 0:
            return Outcome(name, Result.SUCCESS, f"fence command confirmed {node} off")
        return Outcome(name, Result.FAILED, f"fence command exit {proc.returncode}: {tail}")

    async def _fence_webhook(self, name: str, url: str, node: str) -> Outcome:
        try:
            status, text = await post_json(url, {"node": node}, self.settings.fence_hook_timeout_s)
        except HttpError as e:
            return Outcome(name, Result.FAILED, f"fence webhook: {e}")
        if 200 <= status < 300:
            return Outcome(name, Result.SUCCESS, f"fence webhook confirmed {node} off")
        return Outcome(name, Result.FAILED, f"fence webhook {status}: {text[:300]}")


__all__ = ["FenceRunner", "FenceSettings"]
