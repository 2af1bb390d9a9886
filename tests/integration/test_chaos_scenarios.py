"""The chaos harness end to end on the test cluster: every shipped scenario holds its invariants
and budgets; the side-by-side comparison measures each system on its own fresh cluster; a
component that crashes mid-run fails the run, is named in the report, and nothing is left
running.

Every shipped scenario runs once, the watchdog only, at time scale 0.1 (every timing ten times
faster, for Kubernetes, the simulated machines and the watchdog alike), each on a fresh cluster.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from chaos.harness import report
from chaos.harness.runner import RunOptions, run_scenario
from chaos.harness.scenario import load, shipped, validate
from chaos.sim.procs import pid_alive

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

CI_SCALE = 0.1

# Scenarios that show a bug of the service (watchdog/), scenario → the bug, run as a strict
# xfail: it must fail until the bug is fixed, and then the entry goes. None open.
KNOWN_SERVICE_BUGS: dict[str, str] = {}


def child_pids() -> set[int]:
    """Every live descendant of this test process."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents[int(entry)] = int(fields[1])
    me, found, frontier = os.getpid(), set(), {os.getpid()}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier and p not in found}
        found |= frontier
    found.discard(me)
    return found


def explain(result, v) -> str:
    lines = list(v.failures)
    for run in result.runs:
        lines.append(f"{run.system}: counts {run.counts} invariants {run.invariants}")
        lines += [f"  {tl}" for tl in run.vms]
    return "\n".join(lines)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN_SERVICE_BUGS[n], strict=True))
        if n in KNOWN_SERVICE_BUGS
        else n
        for n in sorted(shipped())
    ],
)
async def test_every_shipped_scenario_holds_its_invariants_and_budgets(
    name, control_plane_binaries, tmp_path
):
    sc = load(name).with_overrides(time_scale=CI_SCALE, systems=["watchdog"])
    opts = RunOptions(binaries=control_plane_binaries, work_root=tmp_path / "work")
    before = child_pids()
    result = await run_scenario(sc, name, opts)
    v = report.write(result, tmp_path / "report")
    print((tmp_path / "report" / "report.md").read_text()[:3000])
    assert v.ok, explain(result, v)
    (run,) = result.runs
    assert run.crashed is None and run.error is None
    assert run.invariants["split_brain_s"] == 0 and run.invariants["lost"] == 0
    assert child_pids() <= before, "a process of the run is still running"


async def test_side_by_side_each_system_gets_its_own_cluster_and_the_watchdog_is_fastest(
    control_plane_binaries, tmp_path
):
    sc = validate(
        {
            "name": "compare",
            "description": "A tiny cluster; one node loses power.",
            "time_scale": CI_SCALE,
            "systems": ["watchdog", "harvester-1.7", "kubernetes-only"],
            "cluster": {"nodes": 3, "vms": 3},
            "watchdog": {"controllers": ["node-1", "node-2"]},
            # Harvester 1.7 with a shorter migration timeout, so its reset fits in the window.
            "harvester_policy": {"enable": True, "period": 15, "vmMigrationTimeout": 60},
            "faults": [{"at_s": 0, "action": "poweroff", "node": "node-3"}],
            "observe_s": 0,
            "settle_s": 5,
            "timeout_s": 250,
            "expect": {"systems": ["watchdog"], "resets": "required"},
            "budgets": {"watchdog": {"running_p95_s": 60}},
        },
        "compare",
    )
    opts = RunOptions(binaries=control_plane_binaries, parallel="baselines")
    result = await run_scenario(sc, "compare", opts)
    v = report.write(result, tmp_path)
    table = report.side_by_side(result)
    print(table)
    assert v.ok, explain(result, v)
    rows = {r["system"]: r for r in report.table_rows(result)}
    assert set(rows) == {"watchdog", "harvester-1.7", "kubernetes-only"}
    wd, hv, k8s = (rows[s]["stats"] for s in ("watchdog", "harvester-1.7", "kubernetes-only"))
    # Each system lost the same VM(s) on its own cluster and was measured from ground truth.
    assert wd["running"].n == hv["running"].n == k8s["running"].n >= 1
    assert wd["running"].missing == 0
    # Harvester waits for Ready=Unknown (50 s) + period + vmMigrationTimeout: far slower.
    assert hv["detection"].p50 is not None and hv["detection"].p50 > wd["detection"].p50
    assert hv["running"].p50 is None or hv["running"].p50 > 2 * wd["running"].p95
    # Kubernetes alone never restarts them: the pods stay Terminating on the dead node.
    assert k8s["running"].missing == k8s["running"].n
    assert "none within" in table and "x" in rows["harvester-1.7"]["ratio"]["running"]
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["systems"]) == {"watchdog", "harvester-1.7", "kubernetes-only"}
    k8s_run = data["systems"]["kubernetes-only"]["runs"][0]
    assert k8s_run["invariants"]["lost"] >= 1 and k8s_run["timed_out"]
    md = (tmp_path / "report.md").read_text().splitlines()
    assert md[0] == "# Chaos run `compare`: PASS"
    assert (tmp_path / "timeline.png").stat().st_size > 10_000


async def test_a_controller_replica_killed_mid_run_fails_the_run_and_leaves_nothing_running(
    control_plane_binaries, tmp_path
):
    sc = load("power-off").with_overrides(time_scale=CI_SCALE, systems=["watchdog"])
    before = child_pids()
    seen: dict[str, int] = {}

    async def kill_replica(cluster, result) -> None:
        seen.update(cluster.status()["pids"])

        async def later() -> None:
            await asyncio.sleep(1.0)
            pid = cluster.agents["node-1"].proc.pid  # `node-watchdog run` on node-1
            os.killpg(pid, signal.SIGKILL)

        asyncio.get_running_loop().create_task(later())

    opts = RunOptions(binaries=control_plane_binaries, on_running=kill_replica)
    result = await run_scenario(sc, "power-off", opts)
    v = report.write(result, tmp_path)
    (run,) = result.runs
    assert run.crashed is not None, run
    assert "node-watchdog run (agent + controller) on node-1" in run.crashed
    assert "exited with code -9 on its own" in run.crashed
    assert not v.ok and any("crashed" in f for f in v.failures)
    md = (tmp_path / "report.md").read_text()
    assert md.splitlines()[0].endswith("FAIL") and "CRASHED" in md
    assert seen and not [n for n, pid in seen.items() if pid_alive(pid)]
    assert child_pids() <= before


def processes_mentioning(text: str) -> dict[int, str]:
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmd and pid_alive(int(entry)):
                found[int(entry)] = cmd
    return found


async def test_the_apiserver_killed_mid_run_exits_1_says_so_and_leaves_nothing_running(tmp_path):
    """Through the command line: SIGKILL kube-apiserver once the fault is in."""
    report_dir = tmp_path / "r"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chaos.cli", "run", "power-off", "--systems", "watchdog",
        "--time-scale", str(CI_SCALE), "--report", str(report_dir), "--keep-logs",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    killed = None
    async with asyncio.timeout(150):
        async for raw in proc.stdout:
            lines.append(raw.decode())
            if killed is None and "FAULT poweroff" in lines[-1]:
                apiservers = [
                    pid
                    for pid, cmd in processes_mentioning(str(report_dir)).items()
                    if "kube-apiserver" in cmd.split(" ", 1)[0]
                ]
                assert len(apiservers) == 1, apiservers
                killed = apiservers[0]
                os.kill(killed, signal.SIGKILL)
        await proc.wait()
    out = "".join(lines)
    print(out)
    assert killed is not None
    assert proc.returncode == 1, out
    assert "CRASH: kube-apiserver is no longer running" in out
    md = (report_dir / "report.md").read_text()
    assert md.splitlines()[0] == "# Chaos run `power-off`: FAIL"
    assert "kube-apiserver is no longer running" in md
    assert processes_mentioning(str(report_dir)) == {}


# --- real clusters: refusals, and the command kill method against the local test cluster --------


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chaos.cli", "run", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# The command kill method, with the boot-id command it needs.
COMMAND = ["--kill-method", "command", "--kill-command", "echo {node}",
           "--boot-id-command", "echo id-of-{node}"]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ([], "--kill-method ssh|command is required"),
        (["--kill-method", "command"], "needs --kill-command"),
        (["--kill-method", "command", "--kill-command", "true"], "must name the node"),
        (
            ["--kill-method", "command", "--kill-command", "echo {node}"],
            "needs --boot-id-command TEMPLATE",
        ),
        (
            ["--kill-method", "command", "--kill-command", "echo {node}",
             "--boot-id-command", "cat /proc/sys/kernel/random/boot_id"],
            "--boot-id-command must name the node",
        ),
        (
            ["--kill-method", "command", "--kill-command", "echo {node} | awk '{print $1}'",
             "--boot-id-command", "echo {node}"],
            "write other braces twice",
        ),
        (["--kill-method", "ssh"], "--ssh-known-hosts"),
        (COMMAND, "no --target"),
        ([*COMMAND, "--target", "a", "--target", "b"], "kills 1 node(s) (node-4) but 2 --target"),
        ([*COMMAND, "--target", "w-3"], "add --yes"),
    ],
)  # fmt: skip
def test_a_real_cluster_run_refuses_without_explicit_targets_and_yes(tmp_path, extra, words):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    proc = run_cli("power-off", "--kubeconfig", str(kubeconfig), *extra, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert words in proc.stderr, proc.stderr
    if "--yes" in words:  # the plan was printed first, naming the node and the command
        assert "power off w-3 (the scenario's node-4)" in proc.stdout
        assert "echo w-3" in proc.stdout
        assert "cluster: no current-context in the kubeconfig" in proc.stdout
        assert "must report the boot id its Node reports" in proc.stdout


def test_a_real_cluster_run_refuses_faults_a_kill_method_cannot_inflict(tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    proc = run_cli(
        "partition", "--kubeconfig", str(kubeconfig), *COMMAND, "--target", "w-1", "--yes",
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "faults[0].action: 'partition' cannot be inflicted" in proc.stderr


async def test_the_command_kill_method_against_the_local_test_cluster(
    control_plane_binaries, tmp_path
):
    """`run --kubeconfig` treats the test cluster as a real one: its kill command is
    `watchdog-chaos fault ... poweroff {node}`; Harvester 1.6 with a 10 s period resets.

    First its must-not twin: a boot-id command that reaches another machine (it reads
    node-1's boot id whatever node it is asked about) — the run is refused before any kill
    and the target keeps running."""
    from chaos.sim.cluster import SimCluster, SimConfig

    kubeconfig = tmp_path / "kubeconfig"
    cfg = SimConfig(
        nodes=3,
        vms=3,
        time_scale=0.1,
        harvester="1.6",
        harvester_policy={"enable": True, "period": 10},
        kubeconfig=kubeconfig,
        control_channel=True,
        work_dir=tmp_path / "sim",
    )
    scenario = tmp_path / "kill.yaml"
    scenario.write_text(
        yaml.safe_dump(
            {
                "name": "kill",
                "cluster": {"nodes": 3, "vms": 3},
                "faults": [{"at_s": 1, "action": "poweroff", "node": "node-3"}],
                "settle_s": 1,
                "timeout_s": 90,
                "expect": {"resets": "required"},
            }
        )
    )
    async with SimCluster(cfg, binaries=control_plane_binaries) as cluster:
        await cluster.wait_ready(120)
        victims = cluster.vms_on("node-2")
        assert victims
        kill = f"{sys.executable} -m chaos.cli fault --kubeconfig {kubeconfig} poweroff {{node}}"
        # What each simulated machine would print from /proc/sys/kernel/random/boot_id.
        nodes_dir = cluster.boot_id_file("node-1").parent.parent
        for node in cluster.fleet.members:
            cluster.boot_id_file(node)

        async def run(boot_id_command: str) -> tuple[int | None, str]:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "chaos.cli", "run", str(scenario),
                "--kubeconfig", str(kubeconfig), "--kill-method", "command",
                "--kill-command", kill, "--boot-id-command", boot_id_command,
                "--target", "node-2", "--yes", "--report", str(tmp_path / "report"),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            out, _ = await asyncio.wait_for(proc.communicate(), 150)
            print(out.decode())
            return proc.returncode, out.decode()

        # The wrong machine: refused before any kill, node-2 keeps running.
        code, text = await run(f"cat {nodes_dir}/node-1/boot_id # {{node}}")
        assert code == 2, text
        assert "not the same machine" in text and "nothing was killed" in text, text
        assert cluster.fleet["node-2"].powered and "FAULT" not in text
        assert all(cluster.vmi_node(vm) == "node-2" for vm in victims)
        # The right machine: its boot id matches the Node's, and the kill goes ahead.
        code, text = await run(f"cat {nodes_dir}/{{node}}/boot_id")
        assert code == 0, text
        assert "power off node-2 (the scenario's node-3)" in text
        assert "boot id of node-2 (" in text and f"read by `cat {nodes_dir}/node-2/boot_id`" in text
        assert not cluster.fleet["node-2"].powered  # the command really killed it
        assert all(cluster.vmi_node(vm) not in (None, "node-2") for vm in victims)
    data = json.loads((tmp_path / "report" / "results.json").read_text())
    run = data["systems"]["watchdog"]["runs"][0]
    assert {v["vm"] for v in run["vms"]} == {f"default/{vm}" for vm in victims}
    assert all(v["running_s"] is not None and v["reset_s"] is not None for v in run["vms"])
    assert run["invariants"]["ground_truth"] is False
    assert "not measurable" in (tmp_path / "report" / "report.md").read_text()
    assert "timeline.png" in os.listdir(tmp_path / "report")
