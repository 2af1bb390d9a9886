"""`watchdog-chaos campaign` on the real test cluster: a small campaign with a fixed seed runs
every drawn schedule on a fresh cluster (real control plane, real agents and controllers, the
embedded broker), finds no new hole, and leaves for every trial a scenario file that replays it.

The full campaign is a benchmark (docs/RELIABILITY.md); this one keeps the command working and
its schedules honest in CI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from chaos.harness import campaign
from chaos.harness.scenario import load

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

# Seed 3 draws, at most three faults of at most 60 s: trial 1 a fence command that fails and a
# management-network cut on the same node, trial 2 the leader's node losing power while another
# node's fence command fails.
SEED, TRIALS = 3, 2


def test_a_small_campaign_finds_no_new_hole_and_saves_every_schedule(
    control_plane_binaries, tmp_path: Path
) -> None:
    report = tmp_path / "campaign"
    argv = [
        sys.executable, "-m", "chaos.cli", "campaign",
        "--trials", str(TRIALS), "--seed", str(SEED), "--max-faults", "3", "--duration", "60",
        "--time-scale", "0.1", "--nodes", "4", "--vms", "8", "--report", str(report),
        "--control-plane-bin", str(control_plane_binaries.directory),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=560)
    print(done.stdout[-6000:], done.stderr[-3000:])
    results = json.loads((report / "results.json").read_text())
    trials = results["trials"]
    assert [t["verdict"] for t in trials] == ["PASS"] * TRIALS, json.dumps(trials, indent=1)
    assert done.returncode == 0
    spec = campaign.CampaignSpec(
        seed=SEED, trials=TRIALS, max_faults=3, duration_s=60, time_scale=0.1
    )
    for k, t in enumerate(trials, start=1):
        replay = load(t["file"])  # what `watchdog-chaos run FILE` loads
        assert replay.model_dump() == campaign.draw(spec, k).model_dump()
        assert t["faults"] == campaign.fault_dicts(replay)
    assert f"{TRIALS} trials, seed {SEED}" in (report / "campaign.md").read_text()
    assert "about" in done.stdout and "min left" in done.stdout  # progress with an estimate
