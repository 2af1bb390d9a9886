"""The must-not-reset twins of the failover tests, on the test cluster with the real service.

Losing a source is an observation about the watchdog, not evidence about nodes (STYLE 10): a
broker outage or an API outage resets nothing; a policy `enable: false` detects and reports but
never resets (and an invalid policy keeps the last good one); a node whose kubelet died while
its agent heartbeats is evacuated, never reset; forged and malformed heartbeats are counted and
ignored. Each scenario checks the ground truth (the ledger: no VM copy stopped or started) and
what the controller wrote (no taint, no force-delete), not only its metrics.

One cluster (4 nodes, 8 VMs, one controller) serves every scenario of this module.

After an API outage longer than kube-controller-manager's node-monitor-grace-period, KCM marks
nodes Ready=Unknown (and their pods NotReady) until their kubelets report again; the watchdog
does not read Ready=Unknown as a lost kubelet (unit-tested, test_decide_kubelet_path). The
API-outage test stops KCM, to test the watchdog's own behaviour and to leave the pods' Ready as
the next scenarios expect.

A Lease whose staleness deadline falls in the first seconds of an API freeze, before the
controller's probe notices the freeze, once turned a live node DEGRADED here (a renewal 2.5 s
before the freeze, the freeze noticed after 3.7 s); a Lease is now stale only once the API
answered a probe sent after its deadline (decide/signals.py; the unit tests reproduce that run).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiomqtt
import pytest
import pytest_asyncio

from chaos.sim.harvester import (
    POLICY_SETTING,
    UPGRADE_NAMESPACE,
    setting_manifest,
    upgrade_completed,
    upgrade_manifest,
)
from chaos.sim.informer import NAMESPACES, SETTINGS, UPGRADES
from chaos.sim.ledger import StartReason, StopReason
from tests.integration.watchdog_env import (
    RESET_WAIT_S,
    SAFE_DELAY_S,
    SELF_FENCE_AFTER_S,
    UNREACHABLE_AFTER_S,
    Scrape,
    WatchdogEnv,
    default_config,
    restarted_elsewhere,
)
from watchdog.decide.state import DOWN_PHASES

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.broker,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(240),
]

TOPIC = "node-watchdog/v1/heartbeat"
# Long enough for every timer that could act: unreachable, the safe delay, the agents' own
# self-fence (they keep the other source, so they must not fence).
OUTAGE_S = UNREACHABLE_AFTER_S + max(RESET_WAIT_S, SELF_FENCE_AFTER_S) + 1.0


# The controller notices a frozen API server within its probe interval plus the probe's timeout
# (2 + 2 s, observe/cluster_cache.py). A Lease judged stale sooner than that is judged while the
# controller still believes the API answers: with the compressed 4 s of the other modules, a
# live node can turn DEGRADED in the first seconds of an API outage. Production keeps 15 s.
LEASE_STALE_AFTER_S = 6.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(control_plane_binaries, tmp_path_factory: pytest.TempPathFactory):
    work = Path(tmp_path_factory.mktemp("service-holds"))
    async with WatchdogEnv(
        default_config(),
        control_plane_binaries,
        work,
        controllers=1,
        controller_env={"WATCHDOG_LEASE_STALE_AFTER_S": str(LEASE_STALE_AFTER_S)},
    ) as e:
        yield e


def running_copies(env: WatchdogEnv) -> dict[str, str]:
    """VM → pod uid of its one running copy (ground truth)."""
    out = {}
    for key, rec in env.cluster.ledger.vms.items():
        (uid,) = rec.running  # exactly one copy each
        out[key] = uid
    return out


def changes_since(env: WatchdogEnv, t0: float) -> list[str]:
    """What the controller (or anyone) did to nodes and VMs after t0, as the API/ledger saw it."""
    tl = env.timeline
    out = [f"taint {n} {v}" for t, n, v in tl.taints if t >= t0]
    out += [f"pod gone {p} on {n}" for t, p, n in tl.pods_gone if t >= t0]
    out += [f"pod not ready {p} on {n}" for t, p, n in tl.not_ready if t >= t0]
    out += [f"migration {k}" for k, m in tl.migrations.items() if m["created"] >= t0]
    for rec in env.cluster.ledger.vms.values():
        for c in rec.copies:
            if c.started_mono >= t0:
                out.append(f"{c.vm} started on {c.node} ({c.start_reason})")
            if c.stopped_mono is not None and c.stopped_mono >= t0:
                out.append(f"{c.vm} stopped on {c.node} ({c.stop_reason})")
    return out


def unchanged(before: Scrape, after: Scrape, name: str, **labels: str) -> bool:
    return after.get(name, **labels) == before.get(name, **labels)


async def hold_for(env: WatchdogEnv, seconds: float, check, leader=None) -> None:
    """Keep a fault in place for `seconds`, checking the leader's metrics all along (`leader`:
    that replica, even should it step down meanwhile)."""
    leader = leader or await env.wait_leader()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        m = await leader.try_scrape()
        if m is not None:
            check(m)
        await asyncio.sleep(0.5)


async def test_a_broker_outage_longer_than_unreachable_after_resets_nothing_and_fences_nothing(
    env,
):
    await env.restore()
    c = env.cluster
    leader = await env.wait_leader()
    before = await leader.scrape()
    copies = running_copies(env)

    t0 = await env.fault("broker-outage")
    await env.wait_for(
        lambda: _held(leader, "broker", "BrokerDown"), 15, "the controller holds: broker down"
    )

    def nothing_yet(m: Scrape) -> None:
        assert unchanged(before, m, "watchdog_transitions_total", to="Unreachable")
        assert m.get("watchdog_resets_held", reason="BrokerDown") == 1

    await hold_for(env, OUTAGE_S, nothing_yet)
    t_restore = await env.fault("broker-restore")
    mid = await leader.scrape()
    # Heartbeats resume: the leader counts new ones and hears every agent again.
    await env.wait_for(
        lambda: _more_heartbeats(leader, mid), 20, "heartbeats accepted after the outage"
    )
    await env.restore()
    after = await leader.scrape()
    print(
        f"\n[broker outage {time.monotonic() - t0:.1f}s] transitions: {_transitions(before, after)}"
    )

    assert unchanged(before, after, "watchdog_transitions_total", to="Unreachable")
    assert unchanged(before, after, "watchdog_actions_total", action="TaintOutOfService")
    assert unchanged(before, after, "watchdog_actions_total", action="ForceDeletePods")
    assert after.get("watchdog_resets_held", reason="BrokerDown") == 0
    assert after.get("watchdog_source_up", source="broker") == 1
    # No agent fenced (each still had the API), no VM stopped or started anywhere.
    assert not [f for f in c.faults.history if f["action"] == "fence"]
    assert all(slot.running for slot in c.agents.values())
    assert changes_since(env, t0) == []
    assert running_copies(env) == copies
    assert t_restore - t0 >= OUTAGE_S


async def test_an_api_outage_holds_every_action_and_a_node_that_died_meanwhile_is_reset_after_it(
    env,
):
    await env.restore()
    c = env.cluster
    leader = await env.wait_leader()
    before = await leader.scrape()
    node = "node-3"
    vms = c.vms_on(node)
    assert vms
    others = {vm: uid for vm, uid in running_copies(env).items() if vm.split("/")[1] not in vms}

    # kube-controller-manager is stopped for the duration: after an outage longer than its
    # node-monitor-grace-period it marks every node NotReady until their kubelets report again,
    # which is its reaction, not the watchdog's (see the module doc).
    await env.fault("controller-manager-stop")
    t0 = await env.fault("api-outage")  # kube-apiserver frozen (SIGSTOP): requests hang
    # The leader reports the APIDown hold, unless it stepped down first: it cannot renew its
    # Lease either, and its renew deadline (5 s) can come before the probe that notices the
    # outage has timed out on a loaded machine. A replica that does not lead acts on nothing.
    await env.wait_for(
        lambda: _held_or_stepped_down(leader, "api", "APIDown"), 20, "holds: API down"
    )
    # A node dies while the controller is blind to Leases and Ready: its heartbeat alone goes
    # stale, which is never enough.
    t_dead = await env.fault("poweroff", node)

    def nothing_yet(m: Scrape) -> None:
        assert unchanged(before, m, "watchdog_transitions_total", to="Unreachable")
        # Held, or no longer leading at all: a leader that cannot renew its Lease steps down
        # at its renew deadline, and a replica that does not lead acts on nothing.
        assert m.get("watchdog_resets_held", reason="APIDown") == 1 or (
            m.get("watchdog_leader") == 0
        )

    await hold_for(env, OUTAGE_S, nothing_yet, leader)
    t_restore = await env.fault("api-restore")
    await env.wait_for(
        lambda: all(restarted_elsewhere(c, vm, node, t_dead) for vm in vms) and c.all_running(),
        60,
        f"VMs of {node} running elsewhere after the outage",
    )
    await env.wait_for(lambda: env.phase(node) == "Reset", 20, f"{node} Reset")
    after = await leader.scrape()
    tl = env.timeline
    gone = [t for t, _, n in tl.pods_gone if n == node and t >= t0]
    print(
        f"\n[api outage] {node} reset {min(gone) - t_restore:.1f}s after the API came back; "
        f"transitions {_transitions(before, after)}"
    )

    # Nothing landed during the outage (not even queued writes right after it), and the dead
    # node was handled only once the controller could see again: corroborated after the
    # reconnection, then fenced for the whole safe delay.
    assert min(gone) - t_restore >= SAFE_DELAY_S
    for vm in vms:
        new = restarted_elsewhere(c, vm, node, t_dead)
        assert new is not None and new.started_mono > t_restore
    # Declared down only after the API came back, and only the dead node. Read from the
    # annotations, not from one replica's counters: the leader that could not renew during the
    # outage stepped down, and after it either replica may lead (and a term that lost its Lease
    # before its declaration landed starts the node over, which only lengthens its fence).
    declared = [(t, n) for t, n, p in tl.phases if t >= t0 and p in {s.value for s in DOWN_PHASES}]
    assert {n for _, n in declared} == {node}
    assert min(t for t, _ in declared) > t_restore
    # Only the dead node was touched: the others kept their VMs, taints and migrations none.
    assert [n for t, n, v in tl.taints if v and t >= t0] == [node]
    assert not [k for k, m in tl.migrations.items() if m["created"] >= t0]
    assert {vm: uid for vm, uid in running_copies(env).items() if vm in others} == others
    assert c.ledger.split_brain_seconds() == 0 and c.ledger.lost() == []
    await env.fault("controller-manager-start")


async def test_policy_disabled_is_detect_only_and_an_invalid_policy_keeps_the_last_good_one(env):
    await env.restore()
    c = env.cluster
    leader = await env.wait_leader()
    node = "node-4"
    vms = c.vms_on(node)
    assert vms
    disabled = setting_manifest("1.7", {"enable": False, "period": 6, "vmMigrationTimeout": 180})
    await c.kube.create(SETTINGS, disabled)
    try:
        # The Harvester setting is read live (its period, 6 s, shows the controller has it).
        await env.wait_for(lambda: _gauge(leader, "watchdog_policy_period_seconds", 6), 20, "6s")
        before = await leader.scrape()
        wall = time.time()
        t0 = await env.fault("poweroff", node)

        held = await _wait_events(env, "ResetHeld", node, wall, "PolicyDisabled")
        t_fencing = await _fencing_seen(env, node, t0)
        assert await env.events("NodeUnreachable", node, since=wall)
        assert await env.events("FalselyReadyPods", node, since=wall)
        m = await leader.scrape()
        assert (
            m.get("watchdog_detection_seconds_count")
            == before.get("watchdog_detection_seconds_count") + 1
        )
        assert m.get("watchdog_resets_held", reason="PolicyDisabled") == 1

        # Well past period and safe delay: still nothing reset, the VMs stay down (detect-only).
        wait = t_fencing + max(6.0, SAFE_DELAY_S) + 2.0 - time.monotonic()
        await hold_for(env, wait, lambda m: None)
        assert not env.tainted(node) and env.phase(node) == "Fencing"
        assert not [p for t, p, n in env.timeline.pods_gone if n == node and t >= t0]
        assert not any(restarted_elsewhere(c, vm, node, t0) for vm in vms)

        # An invalid value: reported, and the last good policy (disabled) stays in force.
        await c.kube.patch(SETTINGS, POLICY_SETTING, {"value": '{"enable": tru'})
        await env.wait_for(lambda: _gauge(leader, "watchdog_policy_invalid", 1), 20, "invalid")
        m = await leader.scrape()
        assert m.get("watchdog_policy_period_seconds") == 6
        assert m.get("watchdog_resets_held", reason="PolicyDisabled") == 1
        assert "vm-force-reset-policy invalid" in leader.log_text()
        assert not env.tainted(node)

        # Enabling it again releases the hold: the node is reset and its VMs come back.
        t_on = time.monotonic()
        await c.kube.patch(SETTINGS, POLICY_SETTING, {"value": '{"enable":true,"period":4}'})
        await env.wait_for(
            lambda: all(restarted_elsewhere(c, vm, node, t_on) for vm in vms) and c.all_running(),
            60,
            "reset once the policy is enabled",
        )
        m = await leader.scrape()
        assert m.get("watchdog_policy_invalid") == 0
        assert m.get("watchdog_resets_held", reason="PolicyDisabled") == 0
        print(f"\n[policy disabled] held: {held[0]['message']}")
    finally:
        await c.kube.delete(SETTINGS, POLICY_SETTING)
    assert c.ledger.split_brain_seconds() == 0 and c.ledger.lost() == []


async def test_a_harvester_upgrade_in_progress_holds_resets_until_it_completes(env):
    """An upgrade drains and reboots nodes one by one: a node going down meanwhile is detected
    and reported, never reset, until the Upgrade says Completed; then it is reset at once."""
    await env.restore()
    c = env.cluster
    leader = await env.wait_leader()
    node = "node-3"
    vms = c.vms_on(node)
    assert vms
    if await c.kube.get_or_none(NAMESPACES, UPGRADE_NAMESPACE) is None:
        await c.kube.create(
            NAMESPACES,
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": UPGRADE_NAMESPACE}},
        )
    name = "hvst-upgrade-hold"
    await c.kube.create(UPGRADES, upgrade_manifest(name))
    try:
        await env.wait_for(
            lambda: _hold_is(leader, "UpgradeRunning", 1), 20, "UpgradeRunning hold in force"
        )
        wall = time.time()
        t0 = await env.fault("poweroff", node)
        held = await _wait_events(env, "ResetHeld", node, wall, "UpgradeRunning")
        t_fencing = await _fencing_seen(env, node, t0)
        # Well past the reset wait: the node is down and reported, but nothing was reset.
        await hold_for(env, t_fencing + RESET_WAIT_S + 2.0 - time.monotonic(), lambda m: None)
        assert not env.tainted(node) and env.phase(node) == "Fencing"
        assert not [p for t, p, n in env.timeline.pods_gone if n == node and t >= t0]
        assert not any(restarted_elsewhere(c, vm, node, t0) for vm in vms)

        # Harvester marks the upgrade Completed: the hold lifts and the node is reset.
        t_done = time.monotonic()
        await c.kube.patch(UPGRADES, name, upgrade_completed(), UPGRADE_NAMESPACE, sub="status")
        await env.wait_for(
            lambda: all(restarted_elsewhere(c, vm, node, t_done) for vm in vms) and c.all_running(),
            60,
            "reset once the upgrade completed",
        )
        assert await _hold_is(leader, "UpgradeRunning", 0)
        print(f"\n[upgrade] held: {held[0]['message']}")
    finally:
        await c.kube.delete(UPGRADES, name, UPGRADE_NAMESPACE)
    assert c.ledger.split_brain_seconds() == 0 and c.ledger.lost() == []


async def test_a_node_whose_kubelet_died_under_a_live_agent_is_degraded_and_never_reset(env):
    await env.restore()
    c = env.cluster
    leader = await env.wait_leader()
    before = await leader.scrape()
    node = "node-1"
    vms = c.vms_on(node)
    assert vms
    wall = time.time()
    t0 = await env.fault("kubelet-stop", node)
    await env.wait_for(lambda: env.phase(node) == "Degraded", 30, f"{node} Degraded")
    # Every VM here is live-migratable (ReadWriteMany): the evacuation moves them all.
    await _wait_events(env, "EvacuationFinished", node, wall)
    after = await leader.scrape()

    assert unchanged(before, after, "watchdog_transitions_total", to="Unreachable")
    assert unchanged(before, after, "watchdog_actions_total", action="TaintOutOfService")
    assert unchanged(before, after, "watchdog_actions_total", action="ForceDeletePods")
    assert not [v for t, n, v in env.timeline.taints if n == node and t >= t0]
    # Ground truth: the VMs were never stopped, only handed over live.
    for vm in vms:
        rec = c.ledger.vms[f"default/{vm}"]
        moved = [x for x in rec.copies if x.started_mono >= t0]
        assert [x.start_reason for x in moved] == [StartReason.MIGRATED_IN], (vm, moved)
        old = [x for x in rec.copies if x.stopped_mono is not None and x.stopped_mono >= t0]
        assert [x.stop_reason for x in old] == [StopReason.MIGRATED_AWAY], (vm, old)
    assert c.ledger.split_brain_seconds() == 0 and c.ledger.false_resets() == []
    assert after.get("watchdog_migrations_total", result="succeeded") - before.get(
        "watchdog_migrations_total", result="succeeded"
    ) == len(vms)

    await env.fault("kubelet-start", node)
    await env.wait_for(lambda: env.phase(node) == "Healthy", 30, f"{node} Healthy")
    await env.restore()


async def test_forged_oversized_malformed_replayed_wrong_topic_heartbeats_are_counted_and_ignored(
    env,
):
    await env.restore()
    c = env.cluster
    assert c.broker is not None
    leader = await env.wait_leader()
    before = await leader.scrape()
    t0 = time.monotonic()
    async with aiomqtt.Client(c.broker.host, c.broker.port, identifier="test-attacker") as client:
        await client.subscribe(f"{TOPIC}/node-2")
        real = None
        async with asyncio.timeout(10):
            async for message in client.messages:
                real = bytes(message.payload)  # type: ignore[arg-type]
                break
        assert real is not None
        await client.unsubscribe(f"{TOPIC}/node-2")
        doc = json.loads(real)
        forged = {**doc, "node": "node-99", "seq": 1}
        sent = {
            "unknown_node": [(f"{TOPIC}/node-99", json.dumps(forged).encode())],
            "oversized": [(f"{TOPIC}/node-2", json.dumps({**doc, "pad": "x" * 2048}).encode())],
            "malformed": [(f"{TOPIC}/node-2", b"{not json"), (f"{TOPIC}/node-2", b"\xff\xfe")],
            "schema": [(f"{TOPIC}/node-2", json.dumps({"node": "node-2"}).encode())],
            "replayed": [(f"{TOPIC}/node-2", real)],
            "topic_mismatch": [(f"{TOPIC}/node-1", real)],
        }
        for messages in sent.values():
            for topic, payload in messages:
                await client.publish(topic, payload, qos=1)

    async def counted() -> bool:
        m = await leader.try_scrape()
        return m is not None and all(
            m.get("watchdog_heartbeats_rejected_total", reason=r)
            - before.get("watchdog_heartbeats_rejected_total", reason=r)
            >= len(msgs)
            for r, msgs in sent.items()
        )

    await env.wait_for(counted, 15, "every bad heartbeat counted by reason")
    # Still running, still healthy, still hearing the real agents; nobody changed phase.
    await env.restore()
    after = await leader.scrape()
    assert leader.running
    status, _ = await leader.get("/healthz")
    assert status == 200
    assert after.get("watchdog_heartbeats_total") > before.get("watchdog_heartbeats_total")
    assert after.get("watchdog_transitions_total") == before.get("watchdog_transitions_total")
    assert changes_since(env, t0) == []
    print(f"\n[bad heartbeats] {after.labelled('watchdog_heartbeats_rejected_total', 'reason')}")


# --- helpers ------------------------------------------------------------------------------------


async def _held(leader, source: str, hold: str) -> bool:
    m = await leader.try_scrape()
    return (
        m is not None
        and m.get("watchdog_source_up", source=source) == 0
        and m.get("watchdog_resets_held", reason=hold) == 1
    )


async def _held_or_stepped_down(leader, source: str, hold: str) -> bool:
    m = await leader.try_scrape()
    return (
        m is not None
        and m.get("watchdog_source_up", source=source) == 0
        and (m.get("watchdog_resets_held", reason=hold) == 1 or m.get("watchdog_leader") == 0)
    )


async def _gauge(leader, name: str, value: float) -> bool:
    m = await leader.try_scrape()
    return m is not None and m.get(name) == value


async def _hold_is(leader, reason: str, value: float) -> bool:
    m = await leader.try_scrape()
    return m is not None and m.get("watchdog_resets_held", reason=reason) == value


async def _more_heartbeats(leader, than: Scrape) -> bool:
    m = await leader.try_scrape()
    return m is not None and m.get("watchdog_heartbeats_total") > than.get(
        "watchdog_heartbeats_total"
    ) + 3 * len(than.labelled("watchdog_heartbeat_age_seconds", "node"))


async def _fencing_seen(env: WatchdogEnv, node: str, t0: float) -> float:
    """When the test's informer saw `node` enter Fencing. The hold's Event and the phase
    annotation are two writes of one decision: the Event can be listed before the node update
    reaches the informer."""

    def seen() -> float | None:
        return env.timeline.first(env.timeline.phases, node, "Fencing", after=t0)

    await env.wait_for(lambda: seen() is not None, 10, f"{node} seen in Fencing")
    t = seen()
    assert t is not None
    return t


async def _wait_events(
    env: WatchdogEnv, reason: str, node: str, since: float, text: str = ""
) -> list:
    found: list = []

    async def present() -> bool:
        found[:] = [
            e for e in await env.events(reason, node, since=since) if text in e.get("message", "")
        ]
        return bool(found)

    await env.wait_for(present, 30, f"Event {reason} on {node} {text}".strip())
    return found


def _transitions(before: Scrape, after: Scrape) -> dict[str, float]:
    out = {}
    for labels, value in after.samples.get("watchdog_transitions_total", ()):
        d = value - before.get("watchdog_transitions_total", labels)
        if d:
            out[f"{labels['from']}->{labels['to']} ({labels['reason']})"] = d
    return out
