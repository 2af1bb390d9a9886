"""Peer probes end to end: a dead machine is corroborated by its peers in seconds, while a
machine that is up (only its agent died, or only its broker path is cut) is not.

Real control plane, real Mosquitto, one real `node-watchdog agent` per node, each serving its
probe endpoint behind the node's peer link, one real `node-watchdog controller` publishing the
probe lists. The controller's Lease staleness is set to 30 s here, far beyond everything
measured, so the Lease cannot be what corroborates (Ready turns Unknown only after the
controller manager's grace period, also far beyond): a fast UNREACHABLE can come only from the
peers. Each scenario starts from the baseline (`WatchdogEnv.restore`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import pytest_asyncio

from tests.integration.watchdog_env import (
    HEARTBEAT_INTERVAL_S,
    TIMINGS,
    UNREACHABLE_AFTER_S,
    Scrape,
    WatchdogEnv,
    default_config,
)
from watchdog.decide.peer_probe import ProbeOutcome
from watchdog.heartbeat.peers import probe_once

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.broker,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(300),
]

LEASE_STALE_AFTER_S = 30.0
PREFIX = "node-watchdog/v1"
# Two probe timeouts in a row plus a round and the report's trip, with room for a loaded machine.
PEER_WINDOW_S = 4.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(control_plane_binaries, tmp_path_factory: pytest.TempPathFactory):
    work = Path(tmp_path_factory.mktemp("service-peers"))
    controller_env = {"WATCHDOG_LEASE_STALE_AFTER_S": str(LEASE_STALE_AFTER_S)}
    # A killed agent leaves its watchdog device armed (the device resets the machine after its
    # timeout), and a restarted agent past its fence deadline fences: both are kept longer here
    # than every window watched, so that the killed-agent scenario watches a machine that is
    # still up (what peers must then report) and gets its agent back in time (restore()).
    agents = {
        **TIMINGS,
        "WATCHDOG_WATCHDOG_TIMEOUT_S": "20",
        "WATCHDOG_SELF_FENCE_AFTER_S": "20",
    }
    async with WatchdogEnv(
        default_config(agent_env=agents),
        control_plane_binaries,
        work,
        controller_env=controller_env,
    ) as e:
        yield e


async def retained_reports(env: WatchdogEnv) -> dict[str, dict[str, Any]]:
    """Every agent's retained peer report on the broker now (observer → report)."""
    broker = env.cluster.broker
    assert broker is not None
    marker = f"test/peers/marker-{os.getpid()}-{time.monotonic_ns()}"
    reports: dict[str, dict[str, Any]] = {}
    async with aiomqtt.Client(broker.host, broker.port, timeout=10) as client:
        await client.subscribe(f"{PREFIX}/peers/+", qos=1)
        await client.subscribe(marker, qos=1)
        # One connection's messages arrive in order: once our own marker is back, every
        # retained report delivered for the earlier subscription has arrived before it.
        await client.publish(marker, b"x", qos=1)
        async for message in client.messages:
            topic = message.topic.value
            if topic == marker:
                break
            assert isinstance(message.payload, bytes)
            reports[topic.rsplit("/", 1)[1]] = json.loads(message.payload)
    return reports


def views_of(reports: dict[str, dict[str, Any]], target: str) -> dict[str, str]:
    return {obs: r["results"][target] for obs, r in reports.items() if target in r["results"]}


def delta(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after.get(name, labels) - before.get(name, labels)


async def heartbeat_age(env: WatchdogEnv, node: str) -> float:
    m = await env.scrape_leader()
    return m.labelled("watchdog_heartbeat_age_seconds", "node").get(node, 0.0)


async def test_every_node_is_probed_by_its_peers_and_all_report_reachable(env) -> None:
    await env.restore()
    nodes = list(env.cluster.fleet.members)

    async def all_reachable() -> bool:
        reports = await retained_reports(env)
        return all(
            len(views_of(reports, n)) == len(nodes) - 1  # 4 nodes, peer_count 3: all others
            and set(views_of(reports, n).values()) == {"reachable"}
            for n in nodes
        )

    await env.wait_for(all_reachable, 30, "every node reported reachable by every other")
    m = await env.scrape_leader()
    assert m.get("watchdog_peer_reports_total") >= len(nodes)
    assert m.get("watchdog_peer_reports_rejected_total") == 0


async def test_a_powered_off_node_is_corroborated_by_peers_in_seconds_and_its_reset_due(
    env,
) -> None:
    """Detection only: the reset itself waits this module's long safe delay (its agents
    declare 20 s); test_service_failover.py follows a power-off through to the VMs."""
    await env.restore()
    c = env.cluster
    node = "node-1"
    vms = c.vms_on(node)
    assert vms
    address = c.links[node].peer.address  # type: ignore[union-attr]
    leader = await env.wait_leader()
    before = await leader.scrape()
    t0 = await env.fault("poweroff", node)

    # What its peers see: the machine does not answer at all.
    assert await probe_once(node, address, 0.5) is ProbeOutcome.TIMEOUT
    await env.wait_for(lambda: env.phase(node) in ("Unreachable", "Fencing"), 20,
                       f"{node} Unreachable")  # fmt: skip
    detected_after = time.monotonic() - t0

    async def reset_due() -> bool:
        m = await leader.scrape()
        return m.get("watchdog_reset_not_before_timestamp_seconds", node=node) > 0

    await env.wait_for(reset_due, 20, f"a reset of {node} scheduled")
    after = await leader.scrape()

    reason = {"from": "Suspect", "to": "Unreachable"}
    assert delta(before, after, "watchdog_transitions_total", **reason) == 1
    assert delta(before, after, "watchdog_transitions_total", reason="CorroboratedByPeers") == 1
    assert delta(before, after, "watchdog_transitions_total", reason="CorroboratedByLease") == 0
    # Detection (last contact → UNREACHABLE) from the controller's own histogram: the
    # heartbeat threshold plus a little, far below the Lease's 30 s.
    assert delta(before, after, "watchdog_detection_seconds_count") == 1
    detection = delta(before, after, "watchdog_detection_seconds_sum")
    print(f"\n[peers poweroff] detection {detection:.2f}s, seen Unreachable {detected_after:.2f}s")
    assert UNREACHABLE_AFTER_S <= detection < UNREACHABLE_AFTER_S + PEER_WINDOW_S
    assert detected_after < LEASE_STALE_AFTER_S / 2
    # Due a safe delay after the fence clock started (20 s + 20 s + 1 s), not before.
    due = after.get("watchdog_reset_not_before_timestamp_seconds", node=node)
    assert due - time.time() > 20
    assert delta(before, after, "watchdog_actions_total", action="ForceDeletePods") == 0
    assert c.ledger.split_brain_seconds() == 0


async def test_a_killed_agent_on_a_running_machine_is_not_corroborated_by_peers(env) -> None:
    await env.restore()
    c = env.cluster
    node = "node-2"
    address = c.links[node].peer.address  # type: ignore[union-attr]
    leader = await env.wait_leader()
    before = await leader.scrape()
    await env.fault("agent-kill", node)

    # The machine's kernel still answers: refused, i.e. the host is alive.
    assert await probe_once(node, address, 0.5) is ProbeOutcome.REFUSED
    # Silent well past the threshold and the peers' window: peers had every chance to speak.
    await env.wait_for(
        lambda: _older_than(env, node, UNREACHABLE_AFTER_S + PEER_WINDOW_S),
        30,
        f"{node} silent past the peers' window",
    )
    reports = await retained_reports(env)
    assert set(views_of(reports, node).values()) == {"reachable"}, reports
    after = await leader.scrape()
    assert env.phase(node) == "Suspect"
    assert delta(before, after, "watchdog_transitions_total", to="Unreachable") == 0
    assert delta(before, after, "watchdog_actions_total", action="ForceDeletePods") == 0
    assert c.ledger.split_brain_seconds() == 0


async def test_a_node_cut_off_from_the_broker_only_is_reached_by_peers_and_kept(env) -> None:
    await env.restore()
    c = env.cluster
    node = "node-3"
    vms = c.vms_on(node)
    leader = await env.wait_leader()
    before = await leader.scrape()
    await env.fault("broker-link-cut", node)

    address = c.links[node].peer.address  # type: ignore[union-attr]
    assert await probe_once(node, address, 2.0) is ProbeOutcome.OK
    await env.wait_for(
        lambda: _older_than(env, node, UNREACHABLE_AFTER_S + PEER_WINDOW_S),
        30,
        f"{node} silent past the peers' window",
    )
    reports = await retained_reports(env)
    others = {obs: v for obs, v in views_of(reports, node).items() if obs != node}
    assert others and set(others.values()) == {"reachable"}, reports
    after = await leader.scrape()
    assert env.phase(node) == "Suspect"
    assert delta(before, after, "watchdog_transitions_total", to="Unreachable") == 0
    assert delta(before, after, "watchdog_actions_total", action="ForceDeletePods") == 0
    assert c.vms_on(node) == vms  # its VMs never moved
    assert c.ledger.split_brain_seconds() == 0
    await env.fault("broker-link-heal", node)
    await env.wait_for(lambda: env.phase(node) == "Healthy", 30, f"{node} Healthy again")


async def _older_than(env: WatchdogEnv, node: str, age_s: float) -> bool:
    return await heartbeat_age(env, node) > age_s + HEARTBEAT_INTERVAL_S
