"""Cluster-wide faults through `Faults.apply`: API outage, etcd compaction, broker outage."""

from __future__ import annotations

import asyncio
import time

import aiomqtt
import pytest

from chaos.sim.informer import NODES, ApiError

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]


async def test_cluster_faults_interrupt_and_the_cluster_recovers(sim_cluster):
    cluster = await sim_cluster(nodes=2, vms=2, time_scale=0.2, broker="amqtt")
    assert cluster.broker is not None
    port = cluster.broker.port

    # API outage (kube-apiserver frozen), healed by --duration.
    entry = await cluster.faults.apply("api-outage", duration_s=1.5)
    assert entry["heals_with"] == "api-restore"
    with pytest.raises(ApiError) as err:
        await cluster.kube.request("GET", NODES.path(), request_timeout=0.5)
    assert err.value.status == 0
    deadline = time.monotonic() + 30
    while True:
        try:
            await cluster.kube.request("GET", NODES.path(), request_timeout=2)
            break
        except ApiError:
            assert time.monotonic() < deadline, "the API did not come back"
            await asyncio.sleep(0.2)
    # The scheduled restore is recorded once it has finished (it waits for the API to serve
    # again), which can be after our own request went through: wait for the record itself.
    await cluster.wait_until(
        lambda: any(f["action"] == "api-restore" for f in cluster.faults.history),
        30,
        "api-restore recorded",
    )

    # Compaction: watches resumed from before it get 410 and relist; the simulators carry on.
    revision = (await cluster.faults.apply("compact"))["result"]["revision"]
    assert revision > 0
    await cluster.faults.apply("poweroff", "node-1", duration_s=0.5)
    await cluster.wait_until(lambda: cluster.fleet["node-1"].powered, 10, "node-1 back")
    await cluster.wait_until(cluster.all_running, 60, "VMs running after the faults")

    # Broker outage: the port refuses connections, then the broker is back on the same port.
    await cluster.faults.apply("broker-outage")
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client("127.0.0.1", port, identifier="probe", timeout=2):
            pass
    await cluster.faults.apply("broker-restore")
    assert cluster.broker.port == port
    async with aiomqtt.Client("127.0.0.1", port, identifier="probe", timeout=5) as client:
        await client.publish("probe", b"ok")
    assert [f["action"] for f in cluster.faults.history] == [
        "api-outage",
        "api-restore",
        "compact",
        "poweroff",
        "poweron",
        "broker-outage",
        "broker-restore",
    ]


async def test_informers_relist_after_a_compaction_hides_their_resource_version(sim_cluster):
    cluster = await sim_cluster(nodes=2, vms=2, time_scale=0.2)
    pods = cluster.informers["pods"]
    relists = pods.relists
    # Every watch breaks (the apiserver restarts) and must resume from a compacted revision.
    await cluster.control_plane.api_outage_start(mode="stop")
    await cluster.control_plane.compact()
    await cluster.control_plane.api_outage_stop()
    await cluster.wait_until(lambda: pods.relists > relists, 60, "pod informer relisted")
    await cluster.faults.apply("reboot", "node-2")
    await cluster.wait_until(
        lambda: cluster.node_ready("node-2") == "True" and cluster.all_running(),
        60,
        "cluster working after the relist",
    )
