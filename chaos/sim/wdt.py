"""An emulated watchdog device per simulated node, with the kernel's `/dev/watchdog` protocol.

The agent drives it with the code that drives a real device (watchdog/heartbeat/device.py);
only the path differs: here a FIFO per node that this emulation reads. What it does, as the
kernel's watchdog core does:

- the agent's open and first write arm it (the agent pets at once on open);
- every write pets it;
- a close whose last byte written was the magic `V` disarms it; any other close (the agent
  died, was killed or stopped uncleanly) leaves it armed;
- armed and not petted for `timeout_s`: it fires. Firing fences the node the way the kernel
  would (power-off, or reboot with `fence_action="reboot"`) through the cluster's `fence`
  fault, recorded as fenced by the watchdog device.

A FIFO read without blocking tells the three states apart: data (pets), EAGAIN (a writer holds
it open, no pet since), EOF (no writer: closed). The emulation polls it every `poll_s`, which
bounds how late it notices a pet or fires (a few percent of the timeout).

Not emulated: the ioctls (WDIOC_SETTIMEOUT): the agent then declares its configured timeout, and
the emulation is given the same value. Must not: decide anything about fencing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAGIC = ord("V")


class EmulatedWatchdog:
    def __init__(
        self,
        node: str,
        path: Path,
        timeout_s: float,
        fire: Callable[[str], Awaitable[Any]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node = node
        self.path = path
        self.timeout_s = timeout_s
        self.poll_s = min(0.05, timeout_s / 20)
        self._fire = fire
        self._clock = clock
        self._fd: int | None = None
        self.armed = False
        self.last_pet: float | None = None
        self._magic = False  # the last byte written was the magic character
        self._writer = False  # a writer holds the device open
        self.pets = 0
        self.fired = 0
        self.magic_closes = 0

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISFIFO(self.path.lstat().st_mode):
                self.path.unlink()
        if not self.path.exists():
            os.mkfifo(self.path, 0o600)
        # Our reader end stays open for the whole run, so the agent's non-blocking open finds
        # a reader (a real device is always there).
        self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def power_off(self) -> None:
        """The machine stopped: the device with it (a new boot starts disarmed)."""
        self._drain()
        self.armed = False
        self.last_pet = None
        self._magic = False

    def _drain(self) -> None:
        while self._read() not in (None, b""):
            pass

    def _read(self) -> bytes | None:
        """Bytes written since the last read; b"" when no writer holds it; None when a writer
        holds it but wrote nothing new."""
        if self._fd is None:
            return b""
        try:
            return os.read(self._fd, 4096)
        except BlockingIOError:
            return None

    def poll(self) -> bool:
        """Read what the agent did; True when the device must fire now."""
        now = self._clock()
        while True:
            data = self._read()
            if data is None:
                self._writer = True
                break
            if data == b"":
                if self._writer and self.armed and self._magic:
                    self.armed = False
                    self.magic_closes += 1
                    log.info("watchdog of %s: magic close, disarmed", self.node)
                elif self._writer and self.armed:
                    log.warning("watchdog of %s: closed without magic, still armed", self.node)
                self._writer = False
                break
            self._writer = True
            if not self.armed:
                log.info("watchdog of %s: armed (timeout %.2fs)", self.node, self.timeout_s)
            self.armed = True
            self.last_pet = now
            self.pets += 1
            self._magic = data[-1] == MAGIC
        return (
            self.armed
            and self.last_pet is not None
            and now - self.last_pet >= self.timeout_s
            and not (self._magic and not self._writer)
        )

    async def run(self) -> None:
        while True:
            if self.poll():
                self.armed = False
                self.fired += 1
                log.warning(
                    "watchdog of %s fired: not petted for %.2fs",
                    self.node,
                    self._clock() - (self.last_pet or 0.0),
                )
                try:
                    await self._fire(self.node)
                except Exception:
                    log.exception("watchdog of %s: firing failed", self.node)
            await asyncio.sleep(self.poll_s)

    def statistics(self) -> dict[str, Any]:
        return {
            "armed": self.armed,
            "pets": self.pets,
            "fired": self.fired,
            "magic_closes": self.magic_closes,
            "timeout_s": self.timeout_s,
        }
