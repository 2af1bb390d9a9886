"""Shared fixtures. Each fixture is owned by the module it serves; append, do not rewrite."""

from __future__ import annotations

import os

import pytest

from chaos.sim.binaries import BinariesUnavailable, ControlPlaneBinaries, ensure_binaries
from chaos.sim.ports import SLICE_ENV

# The suite runs on parallel workers (pytest-xdist, `.ci/run`): each worker's test clusters,
# brokers and servers take ports from the worker's own slice, inherited by every process it
# starts, so two workers never choose the same port.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ[SLICE_ENV] = (
        f"{int(os.environ['PYTEST_XDIST_WORKER'].removeprefix('gw'))}"
        f"/{int(os.environ['PYTEST_XDIST_WORKER_COUNT'])}"
    )


@pytest.fixture(scope="session")
def control_plane_binaries(pytestconfig: pytest.Config) -> ControlPlaneBinaries:
    """The real control-plane binaries, found or built once per session (chaos/sim/binaries.py).

    Locally a machine that cannot get them skips the cluster tests; in CI (CI=true) that is a
    failure, so a broken build can never pass as "all skipped".
    """
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")

    def progress(line: str) -> None:
        # A first build takes minutes: show it on the terminal despite output capturing.
        with capture.global_and_fixture_disabled():
            print(f"[control-plane] {line}", flush=True)

    try:
        return ensure_binaries(progress=progress)
    except BinariesUnavailable as e:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"control-plane binaries unavailable in CI: {e}", pytrace=False)
        pytest.skip(f"control-plane binaries unavailable: {e}")


# --- chaos/sim/cluster.py: the whole test cluster (appended by the simulator's owner) ----------


@pytest.fixture
async def sim_cluster(control_plane_binaries: ControlPlaneBinaries, tmp_path: os.PathLike[str]):
    """A factory: `cluster = await sim_cluster(nodes=3, vms=6, time_scale=0.2, ...)`.

    Each call starts a SimCluster (real control plane, simulated nodes, KubeVirt, Harvester) and
    returns once every node is Ready and every VM runs; all are stopped at teardown. Work
    directories (logs of every component) stay under the test's tmp_path.
    """
    from chaos.sim.cluster import SimCluster, SimConfig

    clusters: list[SimCluster] = []

    async def make(**kwargs: object) -> SimCluster:
        kwargs.setdefault("time_scale", 0.2)
        kwargs.setdefault("work_dir", os.path.join(tmp_path, f"sim-{len(clusters)}"))
        cluster = SimCluster(SimConfig(**kwargs), binaries=control_plane_binaries)  # type: ignore[arg-type]
        clusters.append(cluster)
        await cluster.start()
        await cluster.wait_ready(120)
        return cluster

    yield make
    for cluster in reversed(clusters):
        await cluster.stop()
