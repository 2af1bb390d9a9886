"""Supervision of the child processes the test cluster starts (etcd, kube-*).

Owns: spawning a binary with its output in a log file, in its own session (so a Ctrl-C in the
terminal reaches only us, and we stop the children in order), with the kernel's parent-death
signal set (so a crash or SIGKILL of the Python process never leaves a control plane running);
freezing and thawing; a bounded stop (SIGTERM, then SIGKILL); the tail of a log for error
messages. A last-resort `atexit` hook kills whatever is still registered.

Must not: know what the processes are. Readiness belongs to the caller (controlplane.py).

Caveat: Linux delivers the parent-death signal when the *thread* that forked the child exits.
asyncio forks from the thread running the event loop, so run the loop in a thread that lives as
long as the cluster (the main thread, normally).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import functools
import glob
import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# Resolved once in the parent: loading a library between fork and exec can deadlock.
_prctl = ctypes.CDLL(None, use_errno=True).prctl
_LIVE: dict[int, ManagedProcess] = {}


def _die_with_parent(parent_pid: int) -> None:
    """preexec_fn: ask the kernel to SIGKILL us when our parent dies.

    Runs in the forked child before exec. If the parent already died between fork and prctl,
    the signal would never come, hence the getppid check.
    """
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


@dataclass
class ManagedProcess:
    """One running (or stopped) child. Restartable: `spawn` again with the same argv."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    process: asyncio.subprocess.Process | None = field(default=None, repr=False)
    frozen: bool = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def running(self) -> bool:
        """True while the process exists (also when frozen)."""
        return self.process is not None and self.process.returncode is None

    async def spawn(self) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"\n===== starting {self.name}: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self.env,
                start_new_session=True,
                preexec_fn=functools.partial(_die_with_parent, os.getpid()),
            )
        self.frozen = False
        _LIVE[self.process.pid] = self

    def freeze(self) -> None:
        """SIGSTOP the process group: sockets stay open, nothing is answered. Returns once
        every thread of the process shows stopped: `kill` only queues the signal, and a thread
        running on the other core can still answer a request for a moment (seen under load:
        a request sent right after the freeze was served)."""
        self._signal_group(signal.SIGSTOP)
        self.frozen = True
        proc = self.process
        if proc is not None and proc.returncode is None:
            _wait_stopped(proc.pid)

    def thaw(self) -> None:
        self._signal_group(signal.SIGCONT)
        self.frozen = False

    async def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout_s`. Returns the exit code (None if never run)."""
        proc = self.process
        if proc is None:
            return None
        if proc.returncode is None:
            # A stopped process cannot act on SIGTERM; thaw first so shutdown is graceful.
            self._signal_group(signal.SIGCONT)
            self._signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout_s)
            except TimeoutError:
                self._signal_group(signal.SIGKILL)
                await proc.wait()
        self.frozen = False
        _LIVE.pop(proc.pid, None)
        return proc.returncode

    def kill_now(self) -> None:
        """Synchronous SIGKILL, for paths where no event loop runs any more."""
        self._signal_group(signal.SIGKILL)
        if self.process is not None:
            _LIVE.pop(self.process.pid, None)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _signal_group(self, sig: signal.Signals) -> None:
        proc = self.process
        if proc is None or proc.returncode is not None:
            return
        # The child leads its own session, so its pgid is its pid; the group also catches
        # anything it forked.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


def _wait_stopped(pid: int, timeout_s: float = 2.0) -> None:
    """Until every thread of `pid` is in the stopped state (`T` in /proc), or `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            states = [
                (Path(task) / "stat").read_text().rsplit(")", 1)[1].split()[0]
                for task in glob.glob(f"/proc/{pid}/task/*")
            ]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            states = []  # a thread ended while we read: look again
        if states and all(state in ("T", "t") for state in states):
            return
        time.sleep(0.001)


def managed(
    name: str,
    argv: Sequence[str | os.PathLike[str]],
    log_path: Path,
    env: Mapping[str, str] | None = None,
) -> ManagedProcess:
    return ManagedProcess(
        name=name,
        argv=[os.fspath(a) for a in argv],
        log_path=log_path,
        env=dict(env) if env is not None else None,
    )


def pid_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE.values()):
        proc.kill_now()
