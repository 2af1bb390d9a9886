"""Integration fixtures. Each fixture is owned by the module it serves; append, do not rewrite."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from chaos.sim.ports import free_port

# --- mosquitto: a real broker per test (owned by tests/integration/test_agent_mqtt.py) ---------

MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def find_mosquitto() -> str | None:
    for path in (*MOSQUITTO_PATHS, shutil.which("mosquitto")):
        if path and os.access(path, os.X_OK):
            return path
    return None


class Mosquitto:
    """A real mosquitto on a loopback port of its own; `stop()`/`start()` keep the port.

    `extra_config` is appended to the generated configuration (TLS, auth); by default the
    listener allows anonymous clients and nothing is persisted (a restart forgets retained
    messages, like a broker whose storage was lost).
    """

    def __init__(
        self,
        exe: str,
        workdir: Path,
        *,
        extra_config: str = "",
        listener_options: str = "",
        allow_anonymous: bool = True,
        scheme: str = "mqtt",
    ) -> None:
        self.exe = exe
        self.workdir = workdir
        self.port = free_port()
        self.scheme = scheme
        self.config = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\n"
            f"{listener_options}"
            f"allow_anonymous {'true' if allow_anonymous else 'false'}\n"
            "persistence false\n"
            # Run as root, mosquitto would drop to user `mosquitto` and then fail to read
            # password and certificate files in pytest's private (0700) temporary directories.
            f"{'user root' + chr(10) if os.geteuid() == 0 else ''}"
            "log_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
            f"{extra_config}"
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        assert not self.running, "already running"
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts} ---\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [self.exe, "-c", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mosquitto not listening after {timeout}s:\n{self.log_tail()}")

    def stop(self, *, kill: bool = False) -> None:
        """Ends the broker (SIGTERM, or SIGKILL with `kill`); clients see the connection drop."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def mosquitto_exe_or_skip() -> str:
    """The broker binary; locally its absence skips, in CI (CI=true) it fails the test."""
    exe = find_mosquitto()
    if exe is None:
        msg = "mosquitto not installed (Debian: apt-get install mosquitto)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{msg}; CI must run the broker tests", pytrace=False)
        pytest.skip(msg)
    return exe


@pytest.fixture
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A fresh anonymous broker on a free loopback port; killed at teardown."""
    broker = Mosquitto(mosquitto_exe_or_skip(), tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop(kill=True)


@pytest.fixture
def make_mosquitto(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., Mosquitto]]:
    """Brokers with custom configuration (`Mosquitto` keyword arguments); started, and killed
    at teardown."""
    exe = mosquitto_exe_or_skip()
    brokers: list[Mosquitto] = []

    def make(**kwargs: Any) -> Mosquitto:
        broker = Mosquitto(exe, tmp_path_factory.mktemp("mosquitto"), **kwargs)
        brokers.append(broker)
        broker.start()
        return broker

    try:
        yield make
    finally:
        for broker in brokers:
            broker.stop(kill=True)
