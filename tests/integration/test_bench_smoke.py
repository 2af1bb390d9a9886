"""Every benchmark of `watchdog-chaos bench` still runs: each at its `--smoke` size, through
`python -m chaos.bench`, writing its JSON report with sane fields.

These are not performance tests: they assert that a run produced the numbers a reader of
docs/PERFORMANCE.md needs (sizes, CPU, RSS, detection, failover), never how large they are.
The full runs are made by hand (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import mosquitto_exe_or_skip
from tests.unit.test_deploy import require_tool


def run_bench(
    name: str, out: Path, timeout_s: float = 240.0, extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "chaos.bench", name, "--smoke", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert proc.returncode == 0, (
        f"bench {name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    assert f"== bench {name} (smoke)" in proc.stdout
    report = json.loads((out / f"{name}.json").read_text())
    assert report["benchmark"] == name
    assert report["smoke"] is True
    m = report["machine"]
    assert m["cores"] >= 1 and m["memory_gib"] > 0
    assert len(m["load_at_start"]) == 3 and len(m["load_at_end"]) == 3
    return report


def test_decide_benchmark_reports_throughput_and_tick_costs(tmp_path: Path) -> None:
    report = run_bench("decide", tmp_path)
    assert report["decide"]["evaluations_per_s"] > 0
    ticks = report["ticks"]
    assert [t["nodes"] for t in ticks] == [50, 200]
    for t in ticks:
        assert t["tick_1_changed_us"] > 0
        assert t["tick_all_changed_ms"] > 0
        assert t["evaluations_per_s_controller"] > 0


def test_sweep_benchmark_spares_the_agent_within_one_probe_timeout(tmp_path: Path) -> None:
    report = run_bench("sweep", tmp_path)
    (row,) = report["sweep"]
    assert row["nodes"] == 20 and row["need"] == 10
    assert row["spared_every_round"], row
    assert row["wall_s_max"] < row["probe_timeout_s"]
    assert row["agent_cpu_s_median"] > 0 and row["peers_cpu_s_median"] is not None


@pytest.mark.cluster
@pytest.mark.broker
def test_ingest_benchmark_measures_the_controller_process_and_detects_the_killed_node(
    tmp_path: Path, control_plane_binaries: object
) -> None:
    mosquitto_exe_or_skip()
    report = run_bench("ingest", tmp_path)
    (run,) = report["runs"]
    assert run["nodes"] == 30
    steady = run["steady"]
    assert steady["heartbeats_accepted"] > 0
    assert steady["controller"]["cpu_s"] >= 0
    assert steady["controller"]["rss_mib_max"] > 10
    assert steady["cpu_s_per_1000_heartbeats"] is not None
    # The floors: bare subscribers (the controller's ingest link, and aiomqtt over paho)
    # measured under the same load, and the ratio to each.
    for key, ratio in (("floor", "ratio_to_floor"), ("floor_paho", "ratio_to_paho_floor")):
        floor = run[key]
        assert floor["messages"] > 0 and floor["cpu_s_per_1000"] > 0
        assert steady[ratio] == round(
            steady["cpu_s_per_1000_heartbeats"] / floor["cpu_s_per_1000"], 2
        )
    kills = run["kills"]
    assert len(kills["killed"]) == 1
    assert kills["not_detected"] == []
    assert kills["detection_s"]["n"] == 1 and kills["detection_s"]["p50"] > 0
    assert isinstance(run["false_unreachable"], list)  # a count, not a timing assertion


@pytest.mark.cluster
@pytest.mark.broker
def test_cache_benchmark_syncs_measures_events_and_relists_after_410(
    tmp_path: Path, control_plane_binaries: object
) -> None:
    mosquitto_exe_or_skip()
    report = run_bench("cache", tmp_path)
    (step,) = report["steps"]
    assert step["vmis"] == 300 and step["pods"] == 300
    assert step["sync_s"] > 0
    assert step["rss_mib_steady"] > 10
    assert step["pod_events"]["events"] > 0
    assert step["pod_events"]["cpu_us_per_event"] is not None
    assert step["vmi_events"]["events"] > 0
    relist = step["relist"]
    assert relist["seconds"] is not None, relist  # both informers relisted after the 410
    assert set(relist["relisted_after_s"]) == {"pods", "virtualmachineinstances.kubevirt.io"}
    assert report["creates"][0]["pods"]["count"] == 300


@pytest.mark.cluster
@pytest.mark.broker
def test_failover_benchmark_times_a_power_off_through_the_chaos_harness(
    tmp_path: Path, control_plane_binaries: object
) -> None:
    """Both fence modes: the agent's self-fence, and fence_mode power (fence_redfish against
    each machine's Redfish BMC), each a row of its own."""
    mosquitto_exe_or_skip()
    require_tool("fence_redfish", "apt-get install fence-agents (bash .ci/run does)")
    report = run_bench("failover", tmp_path, timeout_s=400, extra=("--fence", "self,power"))
    rows = {s["system"]: s for s in report["systems"]}
    assert set(rows) == {"watchdog", "watchdog (fence power)"}
    for system in rows.values():
        (trial,) = system["trials"]
        assert trial["vms"] >= 1
        assert trial["not_running"] == [] and system["split_brain_s"] == 0
        assert all(v > 0 for v in trial["failover_s"].values())
        assert system["failover_s"]["n"] == trial["vms"]
    # The power row really fenced through the BMC (fence_redfish read the machine off);
    # the self-fence row never asked one.
    assert rows["watchdog (fence power)"]["trials"][0]["fence_runs"].get("success", 0) >= 1
    assert rows["watchdog"]["trials"][0]["fence_runs"] == {}
    assert "fence modes self, power" in report["method"]


@pytest.mark.cluster
def test_testcluster_benchmark_reports_creation_lease_load_and_rss(
    tmp_path: Path, control_plane_binaries: object
) -> None:
    report = run_bench("testcluster", tmp_path)
    assert report["nodes"] == 5 and report["vms"] == 10
    assert report["all_running_s"] > 0
    assert report["lease_renewals_per_s"] >= 0
    assert report["lease_renewals_expected_per_s"] > 0
    assert report["requests_per_s_total"] > 0
    procs = report["processes"]
    assert procs["kube-apiserver"]["rss_mib_max"] > 10
    assert procs["simulator"]["rss_mib_max"] > 10
