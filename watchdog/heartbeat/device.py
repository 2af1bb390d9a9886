"""The watchdog device that backs the self-fence (DESIGN §5): the kernel's `/dev/watchdog`
protocol, so that the node resets even when the agent freezes, dies or its fence command fails.

The protocol (Documentation/watchdog/watchdog-api.rst): opening the device arms it; any write
pets it; if the last write before `close()` was the magic character `V`, the close disarms it
(unless the driver was built or loaded with nowayout); any other close — including the one the
kernel makes for a process that dies — leaves it armed, and it resets the machine `timeout`
seconds after the last pet. `WDIOC_SETTIMEOUT` sets the timeout where the driver allows it.

The agent pets only while contact is proven (`deadline` in the future, heartbeat/fence.py), from
a thread of its own: an event loop that stalls for a moment must not reboot a healthy node, and
a frozen process (SIGSTOP freezes every thread) or a passed deadline stops the petting, so the
device fires at most `timeout` after the fence deadline. The test cluster emulates a device at a
per-node path (a FIFO, chaos/sim/wdt.py): this code drives it unchanged; only the path differs.

Must not: decide when to fence (fence.py and the agent do), or magic-close on its own.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import math
import os
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# linux/watchdog.h: _IOWR('W', 6, int) and _IOR('W', 7, int)
WDIOC_SETTIMEOUT = 0xC0045706
WDIOC_GETTIMEOUT = 0x80045707
PET = b"1"  # any byte but "V": a pet that also withdraws an earlier magic character
MAGIC_CLOSE = b"V"


class DeviceError(Exception):
    """The device could not be opened or driven (the fence is then weak; say so)."""


class WatchdogDevice:
    """One open watchdog device. `open()` arms it; `close(magic=True)` disarms it."""

    def __init__(self, path: Path, timeout_s: float) -> None:
        self.path = path
        self.requested_timeout_s = timeout_s
        self.timeout_s = timeout_s  # what the device runs with (read back where it can be)
        self._fd: int | None = None
        self._lock = threading.Lock()
        self.pets = 0
        self.last_pet: float | None = None

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def open(self) -> float:
        """Arm the device; returns its timeout. DeviceError when it cannot be armed.

        O_NONBLOCK: a device that is missing its reader (the emulation's FIFO) fails at once
        with ENXIO instead of blocking the agent; a real device ignores it.
        """
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise DeviceError(f"cannot open {self.path}: {e.strerror or e}") from None
        self._fd = fd
        self.timeout_s = self._set_timeout(fd)
        self.pet()  # armed from the open; pet at once so the timeout counts from now
        return self.timeout_s

    def _set_timeout(self, fd: int) -> float:
        wanted = max(1, math.ceil(self.requested_timeout_s))
        try:
            got = fcntl.ioctl(fd, WDIOC_SETTIMEOUT, struct.pack("i", wanted))
            (actual,) = struct.unpack("i", got)
        except OSError as e:
            if e.errno not in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                log.warning("watchdog %s: setting the timeout failed: %s", self.path, e)
            try:
                got = fcntl.ioctl(fd, WDIOC_GETTIMEOUT, struct.pack("i", 0))
                (actual,) = struct.unpack("i", got)
            except OSError:
                # Not a device that tells (the emulation, or a driver without the ioctl): the
                # configured timeout is the one declared; the emulation is given the same.
                return self.requested_timeout_s
        if actual != wanted:
            log.warning(
                "watchdog %s runs with a %ds timeout (asked for %ds): declaring %ds",
                self.path,
                actual,
                wanted,
                actual,
            )
        return float(actual)

    def pet(self) -> None:
        with self._lock:
            if self._fd is None:
                return
            try:
                os.write(self._fd, PET)
            except OSError as e:
                raise DeviceError(f"pet failed: {e.strerror or e}") from None
            self.pets += 1
            self.last_pet = time.monotonic()

    def close(self, *, magic: bool) -> None:
        """Close; with `magic`, disarm (a deliberate, announced stop). Without, it stays armed
        and fires `timeout` after the last pet unless a successor opens it and pets."""
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is None:
                return
            try:
                if magic:
                    os.write(fd, MAGIC_CLOSE)
            except OSError as e:
                log.error("watchdog %s: magic close failed, it stays armed: %s", self.path, e)
            finally:
                os.close(fd)


class Petter:
    """Pets `device` every `interval_s` while `until()` is in the future (monotonic seconds;
    None: not yet armed, no petting) and `stopped()` is False, from a daemon thread."""

    def __init__(
        self,
        device: WatchdogDevice,
        interval_s: float,
        until: Callable[[], float | None],
        stopped: Callable[[], bool],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.device = device
        self.interval_s = interval_s
        self.until = until
        self.stopped = stopped
        self.clock = clock
        self.failures = 0
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog-petter", daemon=True)
        self.withheld_since: float | None = None  # the deadline passed: petting stopped

    def start(self) -> None:
        self._thread.start()

    def halt(self) -> None:
        self._halt.set()
        self._thread.join(timeout=2 * self.interval_s + 1)

    def _run(self) -> None:
        while not self._halt.is_set():
            until = self.until()
            now = self.clock()
            if self.stopped() or until is None or now >= until:
                if self.withheld_since is None:
                    self.withheld_since = now
                    log.critical(
                        "watchdog %s: no longer petted (%s): the node resets within %.1fs "
                        "unless contact is proven again",
                        self.device.path,
                        "fencing" if self.stopped() else "no proven contact",
                        self.device.timeout_s,
                    )
            else:
                if self.withheld_since is not None:
                    log.warning("watchdog %s: petted again (contact proven)", self.device.path)
                self.withheld_since = None
                try:
                    self.device.pet()
                except DeviceError as e:
                    self.failures += 1
                    log.error("watchdog %s: %s", self.device.path, e)
            self._halt.wait(self.interval_s)
