"""`node-watchdog status` against the real API server: what it prints for each node is what the
Node records (the state annotation a new leader resumes from, our taint), plus, with
`--metrics-url`, what only the leader knows, read from a real `/metrics` exposition of the
service's own metrics.
"""

from __future__ import annotations

import asyncio
import json
import os
import sysconfig
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from chaos.sim.binaries import ControlPlaneBinaries
from chaos.sim.controlplane import ControlPlane
from chaos.sim.informer import NODES, Kube
from tests.loopback_http import serving
from watchdog.decide.names import STATE_ANNOTATION
from watchdog.metrics import Metrics

pytestmark = [pytest.mark.cluster, pytest.mark.asyncio(loop_scope="module")]

FENCING = {
    "phase": "Fencing",
    "reason": "CorroboratedByLease",
    "fence": {"armed": True, "after_s": 8.0, "bound_s": 5.0, "device": True, "watchdog_s": 10.0},
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(control_plane_binaries: ControlPlaneBinaries) -> AsyncIterator[ControlPlane]:
    async with ControlPlane(binaries=control_plane_binaries) as cp:
        kube = await Kube.from_kubeconfig(cp.admin_kubeconfig)
        try:
            await kube.create(
                NODES,
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": "st-down",
                        "annotations": {STATE_ANNOTATION: json.dumps(FENCING)},
                    },
                    "spec": {
                        "taints": [
                            {
                                "key": "node.kubernetes.io/out-of-service",
                                "value": "nodeshutdown",
                                "effect": "NoExecute",
                            }
                        ]
                    },
                },
            )
            await kube.create(
                NODES, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "st-fine"}}
            )
        finally:
            await kube.close()
        yield cp


async def status(
    cluster: ControlPlane | Path, *args: str, command: tuple[str, ...] = ("node-watchdog",)
) -> tuple[int, str, str]:
    """`COMMAND status ARGS` with the cluster's admin kubeconfig (or the one given). pip's
    scripts directory comes first on PATH: kubectl looks for its plugins there."""
    kubeconfig = cluster if isinstance(cluster, Path) else cluster.admin_kubeconfig
    path = f"{sysconfig.get_path('scripts')}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "WATCHDOG_API_REQUEST_TIMEOUT_S": "2",
        "PATH": path,
    }
    env.pop("WATCHDOG_CONFIG_FILE", None)
    proc = await asyncio.create_subprocess_exec(
        *command,
        "status",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_status_shows_each_nodes_phase_fence_and_taint_as_the_node_records_them(
    cluster: ControlPlane,
) -> None:
    code, out, err = await status(cluster, "--json")
    assert code == 0, err
    rows = {r["node"]: r for r in json.loads(out)["nodes"]}
    down, fine = rows["st-down"], rows["st-fine"]
    assert (down["phase"], down["reason"], down["fence"], down["tainted"]) == (
        "Fencing",
        "CorroboratedByLease",
        "armed+device",
        True,
    )
    assert (fine["phase"], fine["fence"], fine["tainted"]) == ("Healthy", "-", False)
    assert down["heartbeat_age_s"] is None  # only the leader knows: needs --metrics-url
    code, table, _ = await status(cluster)
    assert code == 0
    line = next(x for x in table.splitlines() if x.startswith("st-down"))
    assert "Fencing" in line and "armed+device" in line and "yes" in line


async def test_with_the_leaders_metrics_it_adds_heartbeat_ages_reset_times_and_holds(
    cluster: ControlPlane,
) -> None:
    metrics = Metrics()
    metrics.heartbeat_age.labels(node="st-down").set(12.5)
    metrics.heartbeat_age.labels(node="st-fine").set(0.4)
    metrics.reset_not_before.labels(node="st-down").set(time.time() + 30.0)
    metrics.nodes_held.labels(reason="WeakFence").set(1)

    async def exposition(_: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", exposition)
    async with serving(app) as port:
        code, out, err = await status(
            cluster, "--json", f"--metrics-url=http://127.0.0.1:{port}/metrics"
        )
    assert code == 0, err
    doc: dict[str, Any] = json.loads(out)
    rows = {r["node"]: r for r in doc["nodes"]}
    assert rows["st-down"]["heartbeat_age_s"] == 12.5 and rows["st-fine"]["heartbeat_age_s"] == 0.4
    assert 20.0 < rows["st-down"]["reset_in_s"] <= 30.0
    assert doc["holds"] == {"WeakFence": 1.0} and doc["metrics_error"] is None

    # The leader's metrics unreachable: said so, the Nodes' record still shown.
    code, out, _ = await status(cluster, "--json", f"--metrics-url=http://127.0.0.1:{port}/metrics")
    assert code == 0 and "metrics" in json.loads(out)["metrics_error"]


async def test_kubectl_runs_it_as_a_plugin(cluster: ControlPlane) -> None:
    """`kubectl node-watchdog status`: the real kubectl finds `kubectl-node_watchdog` (installed
    with the package, next to `node-watchdog`) and prints what `node-watchdog status` does."""
    listed = await asyncio.create_subprocess_exec(
        "kubectl",
        "plugin",
        "list",
        env={
            **os.environ,
            "PATH": f"{sysconfig.get_path('scripts')}{os.pathsep}{os.environ['PATH']}",
        },
        stdout=asyncio.subprocess.PIPE,
    )
    plugins, _ = await asyncio.wait_for(listed.communicate(), 60)
    assert b"kubectl-node_watchdog" in plugins, plugins
    code, out, err = await status(cluster, "--json", command=("kubectl", "node-watchdog"))
    assert code == 0, err
    via_kubectl = {r["node"]: r["phase"] for r in json.loads(out)["nodes"]}
    code, direct, _ = await status(cluster, "--json")
    assert code == 0
    assert via_kubectl == {r["node"]: r["phase"] for r in json.loads(direct)["nodes"]}
    assert via_kubectl["st-down"] == "Fencing"


async def test_an_unreachable_api_server_exits_1_and_says_so(tmp_path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:9'}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\nusers: [{name: u, user: {}}]\n"
    )
    code, _, err = await status(kubeconfig)
    assert code == 1 and "cannot read the cluster" in err, err
