"""The controller under test, as a real `node-watchdog controller` process, and the shared
infrastructure of the process-level benchmarks (control plane, broker).

Owns: `ControllerProcess` (spawn with a given environment, its log in a file, /readyz and
/metrics over HTTP, `watchdog_leader`, CPU and RSS from /proc, py-spy when asked), and
`control_plane()` / `mosquitto()` context managers over chaos/sim.

Must not: reach into the controller's memory: everything is read from /proc, its endpoints
and the API objects it writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from chaos.bench.common import ProcStat
from chaos.sim.broker import MosquittoBroker
from chaos.sim.controlplane import ControlPlane
from chaos.sim.ports import free_port
from chaos.sim.procs import ManagedProcess, managed

CONTROLLER_NAMESPACE = "node-watchdog"


def controller_command(source: Path | None = None) -> list[str]:
    """`node-watchdog controller`; with `source`, the `watchdog` package found in that
    directory instead of the installed one (to compare a change against a baseline)."""
    if source is not None:
        # Not `-m`: that puts the working directory first on sys.path, and from a checkout it
        # would import the checkout's `watchdog` instead of the one in `source`.
        code = (
            f"import sys; sys.path.insert(0, {str(source)!r}); "
            "from watchdog.runtime.cli import main; sys.exit(main())"
        )
        return [sys.executable, "-c", code, "controller"]
    exe = shutil.which("node-watchdog")
    if exe:
        return [exe, "controller"]
    return [sys.executable, "-m", "watchdog.runtime.cli", "controller"]


class Metrics:
    """One /metrics answer: sum of samples by name and a subset of labels."""

    def __init__(self, text: str) -> None:
        self.samples: list[tuple[str, dict[str, str], float]] = [
            (s.name, s.labels, s.value)
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        ]

    def get(self, name: str, **labels: str) -> float:
        return sum(
            v
            for n, ls, v in self.samples
            if n == name and all(ls.get(k) == want for k, want in labels.items())
        )

    def by(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for n, ls, v in self.samples:
            if n == name:
                out[ls.get(label, "")] = out.get(ls.get(label, ""), 0.0) + v
        return out


class ControllerProcess:
    def __init__(
        self,
        work_dir: Path,
        env: dict[str, str],
        *,
        name: str = "controller",
        source: Path | None = None,
        nice: int | None = None,
    ) -> None:
        self.port = free_port()
        self.log_path = work_dir / f"{name}.log"
        full_env = {
            **os.environ,
            "WATCHDOG_METRICS_HOST": "127.0.0.1",
            "WATCHDOG_METRICS_PORT": str(self.port),
            "WATCHDOG_NAMESPACE": CONTROLLER_NAMESPACE,
            "WATCHDOG_LOG_LEVEL": "INFO",
            **env,
        }
        argv = controller_command(source)
        if nice is not None:
            # A shared machine: give the process under test priority over its own test rig
            # (and everyone else's), i.e. what a dedicated core would give it.
            argv = ["nice", "-n", str(nice), *argv]
        self.nice = nice
        self.proc: ManagedProcess = managed(name, argv, self.log_path, full_env)
        self.started_at: float | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc.running else None

    async def start(self) -> None:
        self.started_at = time.monotonic()
        await self.proc.spawn()
        if self.nice is not None and self.proc.pid is not None:
            # With autogroup scheduling (Linux's default for desktops and many servers) a
            # process's nice value only ranks it inside its session's group; the process runs
            # in a session of its own, so the group's nice is what gives it priority.
            set_autogroup_nice(self.proc.pid, self.nice)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self.proc.stop(5.0)

    async def get(self, path: str) -> tuple[int, str]:
        assert self._session is not None
        try:
            async with self._session.get(f"http://127.0.0.1:{self.port}{path}") as resp:
                return resp.status, await resp.text()
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            return 0, str(e)

    async def ready(self) -> bool:
        status, _ = await self.get("/readyz")
        return status == 200

    async def metrics(self) -> Metrics:
        status, text = await self.get("/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}: {text[:200]}")
        return Metrics(text)

    async def leading(self) -> bool:
        status, text = await self.get("/metrics")
        return status == 200 and Metrics(text).get("watchdog_leader") == 1

    async def wait(self, what: str, check: str, timeout_s: float) -> float:
        """Seconds from spawn until /readyz (check="ready") or leadership (check="leader")."""
        assert self.started_at is not None
        deadline = time.monotonic() + timeout_s
        probe = self.ready if check == "ready" else self.leading
        while time.monotonic() < deadline:
            if not self.proc.running:
                raise RuntimeError(f"controller exited:\n{self.proc.log_tail(30)}")
            if await probe():
                return time.monotonic() - self.started_at
            await asyncio.sleep(0.2)
        raise TimeoutError(f"controller not {what} within {timeout_s:.0f}s:\n{self.log_tail()}")

    def stat(self) -> ProcStat | None:
        return None if self.pid is None else ProcStat.read(self.pid)

    def log_tail(self, lines: int = 30) -> str:
        return self.proc.log_tail(lines)

    def log_count(self, needle: str) -> int:
        try:
            with self.log_path.open(errors="replace") as f:
                return sum(1 for line in f if needle in line)
        except OSError:
            return 0

    async def profile(self, seconds: float, out: Path) -> dict[str, Any]:
        """py-spy (when installed) on the running controller for `seconds`; the top functions
        by own time and a speedscope file. {} when py-spy is missing or not permitted."""
        exe = shutil.which("py-spy")
        if exe is None or self.pid is None:
            return {}
        raw = out.with_suffix(".txt")
        raw.parent.mkdir(parents=True, exist_ok=True)
        proc = await asyncio.create_subprocess_exec(
            exe,
            "record",
            "--pid",
            str(self.pid),
            "--duration",
            str(int(seconds)),
            "--rate",
            "200",
            "--format",
            "raw",
            "--output",
            str(raw),
            "--nonblocking",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await proc.communicate()
        if proc.returncode != 0 or not raw.exists():
            return {"error": err.decode(errors="replace")[-300:]}
        return {"file": str(raw), **fold_profile(raw)}


def set_autogroup_nice(pid: int, nice: int) -> None:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/autogroup", "w") as f:
        f.write(str(nice))


def fold_profile(raw: Path, top: int = 15) -> dict[str, Any]:
    """From py-spy's collapsed stacks: share of samples per leaf function ("self") and per
    function anywhere on the stack ("total"), top entries."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        n = int(count_s)
        samples += n
        frames = [_short(f) for f in stack.split(";") if f]
        if frames and frames[-1].endswith(_IDLE):
            continue  # the event loop waiting in epoll: not work
        if frames:
            own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            total[f] = total.get(f, 0) + n

    def ranked(d: dict[str, int]) -> list[tuple[str, float]]:
        return [
            (k, round(100 * v / samples, 1)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])
        ][:top]

    return {"samples": samples, "self_pct": ranked(own), "total_pct": ranked(total)}


_IDLE = (".select (selectors.py)", ".poll (selectors.py)")


def _short(frame: str) -> str:
    # py-spy frames: "function (path/to/file.py:123)"
    func, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    if "/watchdog/" in path:
        path = "watchdog/" + path.split("/watchdog/", 1)[1]
    return f"{func} ({path})"


@contextlib.asynccontextmanager
async def control_plane(work_dir: Path, **kwargs: Any) -> AsyncIterator[ControlPlane]:
    cp = ControlPlane(work_dir=work_dir / "controlplane", **kwargs)
    await cp.start()
    try:
        yield cp
    finally:
        await cp.stop()


@contextlib.asynccontextmanager
async def mosquitto(work_dir: Path) -> AsyncIterator[MosquittoBroker]:
    broker = MosquittoBroker(work_dir / "mosquitto")
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()


def component_pids(cp: ControlPlane) -> dict[str, int]:
    return dict(cp.pids())
