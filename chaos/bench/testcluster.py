"""Benchmark 5, the test cluster itself (issue 3): `nodes` simulated nodes and `vms` VMs (one
virt-launcher pod each) on the real control plane.

Measures: the time to start the control plane, to create everything (nodes registered, PVCs,
VMs; KubeVirt's simulator creating VMIs and pods; the real scheduler binding them; simulated
kubelets running them) and until every VM runs; then, over a steady window, the API request
rate by resource and verb from kube-apiserver's own `apiserver_request_total` (Lease renewals
are `leases`/`UPDATE`), and CPU and RSS of kube-apiserver, etcd, the controller-manager, the
scheduler and the simulator (this process: every simulated kubelet, KubeVirt, Longhorn and
Harvester controller runs in it, on one asyncio loop).
"""

from __future__ import annotations

import asyncio
import os
import ssl
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from chaos.bench.common import ProcSampler, machine, table
from chaos.sim.cluster import SimCluster, SimConfig


async def _apiserver_requests(cluster: SimCluster) -> dict[tuple[str, str], float]:
    cp = cluster.control_plane
    ctx = ssl.create_default_context(cafile=str(cp.ca_file))
    assert cp.pki is not None
    ctx.load_cert_chain(str(cp.pki.admin.cert), str(cp.pki.admin.key))
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ctx), timeout=aiohttp.ClientTimeout(total=30)
    ) as s:
        async with s.get(f"{cp.server_url}/metrics") as resp:
            text = await resp.text()
    out: dict[tuple[str, str], float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name != "apiserver_request":
            continue
        for sample in fam.samples:
            if sample.name != "apiserver_request_total":
                continue
            key = (sample.labels.get("resource", ""), sample.labels.get("verb", ""))
            out[key] = out.get(key, 0.0) + sample.value
    return out


async def _run(
    nodes: int,
    vms: int,
    window_s: float,
    time_scale: float,
    work_dir: Path,
    progress: Any,
    ready_timeout_s: float = 2400.0,
) -> dict[str, Any]:
    config = SimConfig(
        nodes=nodes,
        vms=vms,
        time_scale=time_scale,
        vm_memory="1Gi",
        work_dir=work_dir / "sim",
    )
    t0 = time.monotonic()
    c0 = time.process_time()
    out: dict[str, Any] = {"nodes": nodes, "vms": vms, "pods": vms, "time_scale": time_scale}
    cluster = SimCluster(config, progress=lambda _l: None)
    await cluster.start()
    try:
        started = time.monotonic() - t0
        out["control_plane_s"] = round(cluster.timings.get("control_plane_s", 0.0), 1)
        out["objects_created_s"] = round(started, 1)
        progress(f"testcluster: started (objects requested) in {started:.0f}s; waiting for VMs")
        # Progress of the VMs over time, so a run cut short still says how fast it went.
        out["running_over_time"] = curve = []
        deadline = t0 + ready_timeout_s
        while True:
            running = len(cluster.ledger.running())
            curve.append([round(time.monotonic() - t0, 1), running])
            if cluster.all_running() or time.monotonic() > deadline:
                break
            await asyncio.sleep(10.0)
            if len(curve) % 6 == 0:
                progress(f"testcluster: {running:,}/{vms:,} VMs running")
        out["all_running"] = cluster.all_running()
        out["all_running_s"] = round(time.monotonic() - t0, 1) if out["all_running"] else None
        out["vms_running"] = len(cluster.ledger.running())
        out["simulator_cpu_s_to_ready"] = round(time.process_time() - c0, 1)
        progress(
            f"testcluster: {out['vms_running']:,} VMs running after "
            f"{time.monotonic() - t0:.0f}s (all: {out['all_running']})"
        )
        pids = {"simulator": os.getpid(), **cluster.control_plane.pids()}
        sampler = ProcSampler(pids, interval_s=1.0)
        sampler.sample()
        await asyncio.sleep(3.0)
        r0 = await _apiserver_requests(cluster)
        w0 = time.monotonic()
        sampler.sample()
        await asyncio.sleep(window_s)
        sampler.sample()
        w1 = time.monotonic()
        r1 = await _apiserver_requests(cluster)
        span = w1 - w0
        rates = {
            f"{res or '-'} {verb}": round((v - r0.get((res, verb), 0.0)) / span, 2)
            for (res, verb), v in r1.items()
            if v - r0.get((res, verb), 0.0) > 0
        }
        out["window_s"] = round(span, 1)
        out["requests_per_s"] = dict(sorted(rates.items(), key=lambda kv: -kv[1]))
        out["requests_per_s_total"] = round(sum(rates.values()), 1)
        out["lease_renewals_per_s"] = round(
            sum(
                v
                for k, v in rates.items()
                if k.split(" ")[0] == "leases" and k.split(" ")[1] in ("PUT", "UPDATE", "PATCH")
            ),
            2,
        )
        out["lease_renewals_expected_per_s"] = round(nodes / (10.0 * time_scale), 2)
        out["processes"] = {name: sampler.window(name, w0, w1) for name in pids}
        progress(
            f"testcluster: {out['lease_renewals_per_s']} Lease renewals/s, "
            f"{out['requests_per_s_total']} requests/s"
        )
    finally:
        await cluster.stop()
    return out


def run(
    *,
    nodes: int = 1000,
    vms: int = 30_000,
    window_s: float = 60.0,
    time_scale: float = 1.0,
    work_dir: Path | None = None,
    progress: Any = print,
) -> dict[str, Any]:
    m = machine()
    with tempfile.TemporaryDirectory(prefix="bench-testcluster-") as tmp:
        result = asyncio.run(
            _run(nodes, vms, window_s, time_scale, work_dir or Path(tmp), progress)
        )
    return {"benchmark": "testcluster", "machine": m, **result}


def render(report: dict[str, Any]) -> str:
    procs = report.get("processes") or {}
    lines = [
        table(
            [
                "nodes",
                "VMs/pods",
                "control plane s",
                "start s",
                "all running s",
                "lease renewals/s (expected)",
                "API requests/s",
            ],
            [
                [
                    report["nodes"],
                    report["vms"],
                    report.get("control_plane_s"),
                    report.get("objects_created_s"),
                    report.get("all_running_s"),
                    f"{report.get('lease_renewals_per_s')} "
                    f"({report.get('lease_renewals_expected_per_s')})",
                    report.get("requests_per_s_total"),
                ]
            ],
        ),
        "",
        table(
            ["process", "CPU cores (window)", "RSS MiB"],
            [
                [name, (w or {}).get("cpu_cores"), (w or {}).get("rss_mib_max")]
                for name, w in procs.items()
            ],
        ),
        "",
        "top API requests/s: "
        + ", ".join(f"{k} {v}" for k, v in list((report.get("requests_per_s") or {}).items())[:8]),
    ]
    return "\n".join(lines)
