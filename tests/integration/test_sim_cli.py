"""`watchdog-chaos sim`, `fault`, `ledger` as a user runs them: separate processes."""

from __future__ import annotations

import json
import os
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from chaos.sim.procs import pid_alive

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

CLI = [sys.executable, "-m", "chaos.cli"]


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def read_until(proc: subprocess.Popen[str], prefix: str, timeout_s: float) -> str:
    """The rest of the first stdout line starting with `prefix` (a thread reads the pipe)."""
    assert proc.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(
        target=lambda: [lines.put(line) for line in proc.stdout],  # type: ignore[union-attr]
        daemon=True,
    ).start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            if proc.poll() is not None:
                pytest.fail(f"sim exited with {proc.returncode}")
            continue
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
    pytest.fail(f"no {prefix!r} line within {timeout_s}s")


def test_sim_serves_fault_and_ledger_and_exits_cleanly_on_sigterm(
    control_plane_binaries, tmp_path: Path
):
    kubeconfig = tmp_path / "sim.kubeconfig"
    stderr = (tmp_path / "sim.stderr").open("w")  # the sim's log, kept for a failure's autopsy
    proc = subprocess.Popen(
        [
            *CLI,
            "sim",
            "--nodes",
            "2",
            "--vms",
            "2",
            "--time-scale",
            "0.2",
            "-q",
            "--kubeconfig",
            str(kubeconfig),
            "--control-plane-bin",
            str(control_plane_binaries.directory),
        ],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert read_until(proc, "kubeconfig: ", 120) == str(kubeconfig)
        sidecar = Path(f"{kubeconfig}.chaos.json")
        assert stat.S_IMODE(sidecar.stat().st_mode) == 0o600
        work_dir = Path(json.loads(sidecar.read_text())["work_dir"])

        nodes = subprocess.run(
            ["kubectl", f"--kubeconfig={kubeconfig}", "get", "nodes"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert nodes.returncode == 0 and nodes.stdout.count(" Ready ") == 2
        # A controller started by hand against it finds the namespace of its leader Lease.
        ns = subprocess.run(
            ["kubectl", f"--kubeconfig={kubeconfig}", "get", "namespace", "node-watchdog"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert ns.returncode == 0, ns.stderr

        status = run_cli("status", "--kubeconfig", str(kubeconfig))
        assert status.returncode == 0, status.stderr
        pids = json.loads(status.stdout)["pids"]
        assert {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"} <= set(pids)

        fault = run_cli(
            "fault", "--kubeconfig", str(kubeconfig), "poweroff", "node-1", "--duration", "2"
        )
        assert fault.returncode == 0, fault.stderr
        assert "poweroff node-1" in fault.stdout and "poweron in 2.0s" in fault.stdout

        ledger = run_cli("ledger", "--kubeconfig", str(kubeconfig), "--json")
        assert ledger.returncode == 0, ledger.stderr
        snap = json.loads(ledger.stdout)
        assert snap["totals"]["vms"] == 2
        assert set(snap["vms"]) == {"default/vm-1", "default/vm-2"}
        assert all("history" in vm for vm in snap["vms"].values())

        table = run_cli("ledger", "--kubeconfig", str(kubeconfig))
        assert table.returncode == 0 and table.stdout.startswith("VM ")

        bad = run_cli("fault", "--kubeconfig", str(kubeconfig), "poweroff", "node-9")
        assert bad.returncode == 2 and "node-9" in bad.stderr
        bad = run_cli("fault", "--kubeconfig", str(kubeconfig), "compact", "node-1")
        assert bad.returncode == 2 and "NODE" in bad.stderr
        bad = run_cli("fault", "--kubeconfig", str(kubeconfig), "poweroff")
        assert bad.returncode == 2 and "NODE" in bad.stderr

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.close()
    assert not [name for name, pid in pids.items() if pid_alive(pid)]
    assert not sidecar.exists()
    assert not work_dir.exists()
    gone = run_cli("ledger", "--kubeconfig", str(kubeconfig))
    assert gone.returncode == 1 and "no running `watchdog-chaos sim`" in gone.stderr


def test_bad_arguments_exit_2_naming_the_argument_and_value():
    for args, needle in (
        (["sim", "--nodes", "0"], "argument --nodes: '0'"),
        (["sim", "--time-scale", "fast"], "argument --time-scale: 'fast'"),
        (["sim", "--harvester", "1.5"], "argument --harvester: invalid choice: '1.5'"),
        (["sim", "--broker", "http://x"], "argument --broker: 'http://x'"),
        (["sim", "--run-strategy", "Sometimes"], "argument --run-strategy: 'Sometimes'"),
        (
            ["fault", "--kubeconfig", "/nonexistent", "melt", "node-1"],
            "argument ACTION: invalid choice: 'melt'",
        ),
        (
            ["fault", "--kubeconfig", "/nonexistent", "poweroff", "node-1", "--duration", "-1"],
            "argument --duration: '-1'",
        ),
    ):
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert needle in result.stderr, (args, result.stderr)


def test_build_only_prints_the_binaries(control_plane_binaries):
    result = run_cli(
        "sim", "--build-only", "--control-plane-bin", str(control_plane_binaries.directory)
    )
    assert result.returncode == 0, result.stderr
    for name in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd"):
        assert f"{name}: /" in result.stdout
