"""A real Prometheus server (Debian's `/usr/bin/prometheus`) for integration tests.

Owns the process (own loopback port, its TSDB in a temporary directory, its log in a file,
killed at teardown) and a thin client of its HTTP API: instant and range queries, targets,
rules and alerts. Every API answer is checked for `status: success`; an error carries
Prometheus' own message, so an invalid query fails with the reason, not with an empty result.

In CI (CI=true) a missing `prometheus` binary fails the test instead of skipping it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from chaos.sim.ports import free_port

PROMETHEUS_PATHS = ("/usr/bin/prometheus", "/usr/local/bin/prometheus")


def prometheus_exe_or_skip() -> str:
    """The server binary; locally its absence skips, in CI (CI=true) it fails the test."""
    for path in (*PROMETHEUS_PATHS, shutil.which("prometheus")):
        if path and os.access(path, os.X_OK):
            return path
    msg = "prometheus is not installed (Debian package prometheus; .ci/run installs it)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{msg}; CI must run the live-scrape test", pytrace=False)
    pytest.skip(msg)


class PrometheusError(AssertionError):
    """Prometheus answered, but not with `status: success` (bad query, bad parameters)."""


class Prometheus:
    """One Prometheus process scraping static targets and evaluating `rule_files`.

    `targets`: pod name → host:port of a /metrics endpoint; the pod name becomes a `pod` target
    label, as the ServiceMonitor's Kubernetes service discovery would add it.
    """

    def __init__(
        self,
        exe: str,
        workdir: Path,
        targets: Mapping[str, str],
        rule_files: Sequence[Path] = (),
        *,
        scrape_interval: str = "1s",
        evaluation_interval: str = "1s",
        job: str = "node-watchdog",
    ) -> None:
        self.exe = exe
        self.workdir = workdir
        self.job = job
        self.targets = dict(targets)
        self.config_path = workdir / "prometheus.yml"
        self.log_path = workdir / "prometheus.log"
        self.data_dir = workdir / "data"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        config = {
            "global": {
                "scrape_interval": scrape_interval,
                "scrape_timeout": scrape_interval,
                "evaluation_interval": evaluation_interval,
            },
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [
                {
                    "job_name": job,
                    "static_configs": [
                        {"targets": [address], "labels": {"pod": pod}}
                        for pod, address in sorted(self.targets.items())
                    ],
                }
            ],
        }
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # --- process ---------------------------------------------------------------------------

    async def start(self, timeout_s: float = 60.0) -> None:
        """Start and wait until /-/ready answers 200 (TSDB open, rules loaded)."""
        for _attempt in range(3):
            self.port = free_port()
            self._spawn()
            if await self._wait_ready(timeout_s):
                return
            # The port was taken between our probe and its bind: try another one.
            if "address already in use" not in self.log_tail(50).lower():
                break
        raise RuntimeError(f"prometheus did not become ready:\n{self.log_tail()}")

    def _spawn(self) -> None:
        with self.log_path.open("ab") as log:
            log.write(f"--- start on port {self.port} ---\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [
                    self.exe,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={self.data_dir}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=info",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    async def _wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while time.monotonic() < deadline:
                if not self.running:
                    return False
                try:
                    async with session.get(f"{self.url}/-/ready") as resp:
                        if resp.status == 200:
                            return True
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await asyncio.sleep(0.2)
        self.stop()
        return False

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self.proc = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # --- HTTP API ------------------------------------------------------------------------------

    async def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; the `data` of a successful answer, else PrometheusError."""
        timeout = aiohttp.ClientTimeout(total=30)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(f"{self.url}/api/v1/{path}", params=params) as resp,
        ):
            body = await resp.json(content_type=None)
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    async def query(self, expr: str, at: float) -> list[dict[str, Any]]:
        """Instant query at wall time `at`: the result vector (or scalar as one sample)."""
        data = await self.api("query", query=expr, time=f"{at:.3f}")
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    async def query_range(
        self, expr: str, start: float, end: float, step: float = 1.0
    ) -> list[dict[str, Any]]:
        """Range query: the result matrix (one entry per series with its `values`)."""
        data = await self.api(
            "query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step}"
        )
        return list(data["result"])

    async def targets_up(self) -> bool:
        """Every configured target has been scraped and is up."""
        data = await self.api("targets", state="active")
        up = {t["labels"].get("pod") for t in data["activeTargets"] if t["health"] == "up"}
        return up >= set(self.targets)

    async def rules(self) -> list[dict[str, Any]]:
        data = await self.api("rules")
        return [rule for group in data["groups"] for rule in group["rules"]]

    async def alerts(self) -> list[dict[str, Any]]:
        return list((await self.api("alerts"))["alerts"])


def values(matrix: list[dict[str, Any]]) -> list[float]:
    """Every sample value of a range-query result (NaN included)."""
    return [float(v) for series in matrix for _, v in series["values"]]
