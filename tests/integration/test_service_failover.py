"""The service end to end on the test cluster: a dead node's VMs come back elsewhere, fast, once.

Real control plane, real Mosquitto, one real `node-watchdog agent` per node behind its node's
links, one real `node-watchdog controller`. One cluster (4 nodes, 8 VMs) serves every scenario
of this module; each starts from the baseline (`WatchdogEnv.restore`). The resetting paths here
have their must-not-reset twins in test_service_holds.py (broker down, API down, policy off,
kubelet only, forged heartbeats) and here (a partitioned node is reset only once fenced).

Measured latencies are printed and appended to /tmp/service_latencies.json.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import pytest_asyncio

from chaos.sim.informer import NODES, ApiError, Resource
from chaos.sim.ledger import StopReason
from tests.integration.watchdog_env import (
    RESET_WAIT_S,
    SAFE_DELAY_S,
    STATE_ANNOTATION,
    TIMINGS,
    WatchdogEnv,
    default_config,
    record_latencies,
    reset_latencies,
    restarted_elsewhere,
    summary,
)

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.broker,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(240),
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(control_plane_binaries, tmp_path_factory: pytest.TempPathFactory):
    reset_latencies()
    work = Path(tmp_path_factory.mktemp("service-failover"))
    async with WatchdogEnv(default_config(), control_plane_binaries, work, controllers=1) as e:
        yield e


async def fail_over(env: WatchdogEnv, node: str, fault: str = "poweroff") -> dict:
    """Inject `fault` on `node` and wait until each of its VMs runs on another node.

    Returns what happened: the VMs, their launcher pods, the fault time, the leader's metrics
    before and after, and per VM the copy started elsewhere (ledger)."""
    c = env.cluster
    vms = c.vms_on(node)
    assert vms, f"{node} runs no VM: nothing to fail over"
    pods = {f"{p['metadata']['namespace']}/{p['metadata']['name']}" for p in c.launcher_pods(node)}
    old_uids = {copy.pod_uid for copy in c.ledger.copies_on(node)}
    leader = await env.wait_leader()
    before = await leader.scrape()
    wall = time.time()
    t0 = await env.fault(fault, node)
    await env.wait_for(
        lambda: all(restarted_elsewhere(c, vm, node, t0) for vm in vms) and c.all_running(),
        60,
        f"every VM of {node} running elsewhere after {fault}",
    )
    await env.wait_for(lambda: env.phase(node) == "Reset", 20, f"{node} Reset")
    # The controller records failover when it sees the VMI Running: give its watch a moment.
    await env.wait_for(
        lambda: _failover_count_at_least(leader, before, len(vms)), 20, "failover recorded"
    )
    after = await leader.scrape()
    return {
        "node": node,
        "fault": fault,
        "vms": vms,
        "pods": pods,
        "old_uids": old_uids,
        "t0": t0,
        "wall": wall,
        "before": before,
        "after": after,
        "new": {vm: restarted_elsewhere(c, vm, node, t0) for vm in vms},
    }


async def _failover_count_at_least(leader, before, n: int) -> bool:
    m = await leader.try_scrape()
    return m is not None and (
        m.get("watchdog_failover_seconds_count") - before.get("watchdog_failover_seconds_count")
        >= n
    )


def delta(run: dict, name: str, labels: dict[str, str] | None = None, **kw: str) -> float:
    return run["after"].get(name, labels, **kw) - run["before"].get(name, labels, **kw)


def latencies(run: dict) -> dict[str, list[float]]:
    """detection and reset from the controller's histograms (one observation per node here),
    failover per VM from the ledger (power-off → the VM's new copy running: ground truth) and
    from the controller's histogram (last contact → VMI Running; mean per node)."""
    n = delta(run, "watchdog_failover_seconds_count")
    return {
        "detection_s": [delta(run, "watchdog_detection_seconds_sum")],
        "reset_s": [delta(run, "watchdog_reset_seconds_sum")],
        "failover_ledger_s": [c.started_mono - run["t0"] for c in run["new"].values()],
        "failover_metric_mean_s": [delta(run, "watchdog_failover_seconds_sum") / n] if n else [],
    }


def report(scenario: str, run: dict) -> None:
    series = latencies(run)
    record_latencies(scenario, run["fault"], **series)
    print(f"\n[{scenario}] timings {TIMINGS}")
    for key, values in series.items():
        print(f"  {key}: {[round(v, 2) for v in values]} {summary(values)}")


async def test_a_powered_off_node_is_reset_after_the_safe_delay_and_its_vms_run_elsewhere(env):
    await env.restore()
    c = env.cluster
    node = "node-1"
    run = await fail_over(env, node, "poweroff")
    tl = env.timeline
    t0 = run["t0"]

    # Detected and corroborated (peer probes or the Lease is the second source; the peers'
    # own test, test_service_peers.py, keeps the Lease out of reach), then fenced, then reset.
    assert delta(run, "watchdog_transitions_total", to="Unreachable") == 1
    assert (
        sum(
            delta(
                run,
                "watchdog_transitions_total",
                {"from": "Suspect"},
                to="Unreachable",
                reason=reason,
            )
            for reason in ("CorroboratedByLease", "CorroboratedByPeers")
        )
        == 1
    )
    # (SUSPECT may share a step with UNREACHABLE on a slow machine; UNREACHABLE → FENCING
    # always does, so the annotation shows Fencing.)
    phases = [p for p in tl.phases_of(node, after=t0) if p != "Suspect"]
    assert phases[:3] == ["Fencing", "Resetting", "Reset"], phases

    # Falsely-ready launcher pods: reported, and marked Ready=False in the API before the reset
    # force-deleted them (both seen through a watch on the real API server).
    not_ready = {pod: t for t, pod, n in tl.not_ready if n == node and t >= t0}
    gone = {pod: t for t, pod, n in tl.pods_gone if n == node and t >= t0}
    assert set(not_ready) == run["pods"], (not_ready, run["pods"])
    assert set(gone) >= run["pods"]
    assert all(not_ready[p] < gone[p] for p in run["pods"])
    assert all("(node-watchdog)" in tl.not_ready_message[p] for p in run["pods"])
    falsely_ready = await env.events("FalselyReadyPods", node, since=run["wall"])
    assert falsely_ready
    assert all(p.split("/")[1] in falsely_ready[0]["message"] for p in run["pods"])

    # Reset no earlier than max(period, safe delay) after UNREACHABLE (the controller's own
    # measure), and no VM started elsewhere earlier than that after the power-off (ground truth:
    # UNREACHABLE itself comes after the power-off).
    reset_s = delta(run, "watchdog_reset_seconds_sum")
    assert delta(run, "watchdog_reset_seconds_count") == 1
    assert reset_s >= RESET_WAIT_S, reset_s
    first_delete = min(gone[p] for p in run["pods"])
    assert first_delete - t0 >= RESET_WAIT_S
    for vm, copy in run["new"].items():
        assert copy.started_mono - t0 >= RESET_WAIT_S, (vm, copy.started_mono - t0)
        assert c.vmi_node(vm) not in (None, node) and c.vmi_phase(vm) == "Running"
        assert c.ledger.running_on(f"default/{vm}") == [copy.node]

    assert delta(run, "watchdog_failover_seconds_count") == len(run["vms"])
    assert delta(run, "watchdog_detection_seconds_count") == 1
    for reason in ("NodeUnreachable", "NodeFenced", "ForceReset"):
        assert await env.events(reason, node, since=run["wall"]), f"no {reason} Event"
    assert env.tainted(node)

    totals = c.ledger.totals()
    assert c.ledger.split_brain_seconds() == 0, totals
    assert c.ledger.lost() == [], totals
    assert c.ledger.false_resets() == [], totals
    report("poweroff node-1", run)


async def test_a_node_that_returns_after_a_reset_is_untainted_healthy_and_runs_none_of_its_old_pods(
    env,
):
    await env.restore()
    c = env.cluster
    node = "node-2"
    run = await fail_over(env, node, "poweroff")
    report("poweroff node-2", run)
    assert env.tainted(node)
    old_pods = run["pods"]
    leader = await env.wait_leader()
    before = await leader.scrape()
    kube = c.kube

    # The API server refuses to lift the taint at first: the node must stay RECOVERING (a
    # HEALTHY node left tainted would never run a VM again) and the removal be sent again.
    await kube.patch(NODES, node, {"metadata": {"labels": {DENY_UNTAINT_LABEL: "true"}}})
    await _deny(kube, DENY_UNTAINT_POLICY)
    try:

        async def refused() -> bool:
            try:  # a dry run goes through admission and stores nothing
                await kube.request(
                    "PATCH",
                    NODES.path(None, node),
                    query={"dryRun": "All"},
                    body={"spec": {"taints": []}},
                    content_type="application/merge-patch+json",
                )
            except ApiError as e:
                return e.status in (400, 403, 422)
            return False

        await env.wait_for(refused, 30, "the API server refusing to lift the taint of " + node)
        t_on = await env.fault("poweron", node)

        async def sent_again() -> bool:
            m = await leader.scrape()
            labels = {"action": "RemoveOutOfServiceTaint", "result": "failed"}
            return (
                m.get("watchdog_actions_total", labels)
                - before.get("watchdog_actions_total", labels)
                >= 2
            )

        await env.wait_for(sent_again, 30, "the taint removal refused, sent again, refused")
        assert env.phase(node) == "Recovering" and env.tainted(node)
    finally:
        await _undeny(kube, DENY_UNTAINT_POLICY)
        await kube.patch(NODES, node, {"metadata": {"labels": {DENY_UNTAINT_LABEL: None}}})
    await env.wait_for(
        lambda: env.phase(node) == "Healthy" and not env.tainted(node), 60, f"{node} Healthy"
    )
    await env.restore()
    after = await leader.scrape()
    tl = env.timeline
    assert tl.phases_of(node, after=t_on)[-1] == "Healthy"
    # Never HEALTHY while the Node still showed the taint.
    lifted = tl.first(tl.taints, node, False, after=t_on)
    assert lifted is not None
    assert [t for t, n, p in tl.phases if n == node and p == "Healthy" and t_on <= t < lifted] == []

    def moved(frm: str, to: str, reason: str) -> float:
        labels = {"from": frm, "to": to, "reason": reason}
        return after.get("watchdog_transitions_total", labels) - before.get(
            "watchdog_transitions_total", labels
        )

    # Back with a new boot id, and the taint removed once no pod was bound to it any more.
    assert moved("Reset", "Recovering", "NodeRebooted") == 1
    assert moved("Recovering", "Healthy", "Recovered") == 1
    assert after.get("watchdog_actions_total", action="RemoveOutOfServiceTaint", result="success")
    assert tl.first(tl.taints, node, False, after=t_on) is not None
    assert await env.events("NodeRecovered", node, since=run["wall"])

    # Ground truth: nothing of what ran there before the reset runs there again; every VM runs
    # exactly once; the old launcher pod objects are gone for good.
    started_there = [
        copy
        for rec in c.ledger.vms.values()
        for copy in rec.copies
        if copy.node == node and copy.started_mono >= t_on
    ]
    assert not [copy for copy in started_there if copy.pod_uid in run["old_uids"]]
    for vm in run["vms"]:
        assert c.ledger.running_on(f"default/{vm}") == [run["new"][vm].node]
    live = {f"{p['metadata']['namespace']}/{p['metadata']['name']}" for p in c.launcher_pods()}
    assert not live & old_pods
    assert c.ledger.split_brain_seconds() == 0 and c.ledger.lost() == []


async def test_a_partitioned_node_fences_itself_before_its_vms_start_elsewhere(env):
    await env.restore()
    c = env.cluster
    node = "node-3"
    running_before = {copy.vm: copy for copy in c.ledger.copies_on(node)}
    run = await fail_over(env, node, "partition")
    report("partition node-3", run)

    # The agent, cut off from broker and API, ran its fence command (the node-local channel).
    fences = [f for f in c.faults.history if f["action"] == "fence" and f["node"] == node]
    assert fences, c.faults.history[-5:]
    for vm in run["vms"]:
        old = running_before[f"default/{vm}"]
        new = run["new"][vm]
        # Its VMs kept running through the partition until the fence stopped them, and only
        # then did they start elsewhere: never two copies.
        assert old.stop_reason is StopReason.FENCED, (vm, old.stop_reason)
        assert old.stopped_mono is not None and old.stopped_mono < new.started_mono
        assert new.started_mono - run["t0"] >= RESET_WAIT_S
    assert c.ledger.split_brain_seconds() == 0
    assert c.ledger.lost() == [] and c.ledger.false_resets() == []


def _node_policy(
    name: str, label: str, resources: list[str], variables: dict[str, str], check: str
):
    """A ValidatingAdmissionPolicy that refuses, for everyone, every Node update on nodes labelled
    `label` for which `check` (CEL, over `variables`) is false: a real API error."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["UPDATE"],
                        "resources": resources,
                    }
                ],
                "objectSelector": {"matchLabels": {label: "true"}},
            },
            "variables": [{"name": k, "expression": v} for k, v in variables.items()],
            "validations": [{"expression": check, "message": f"refused by {name}"}],
        },
    }


# Every change of the state annotation on nodes labelled `test.node-watchdog/deny-state`.
DENY_STATE_POLICY = _node_policy(
    "test-deny-state-writes",
    "test.node-watchdog/deny-state",
    ["nodes", "nodes/status"],
    {
        "key": f"'{STATE_ANNOTATION}'",
        "before": "has(oldObject.metadata.annotations) && variables.key in "
        "oldObject.metadata.annotations ? oldObject.metadata.annotations[variables.key] : ''",
        "after": "has(object.metadata.annotations) && variables.key in "
        "object.metadata.annotations ? object.metadata.annotations[variables.key] : ''",
    },
    "variables.before == variables.after",
)
# Removing the out-of-service taint from nodes labelled `test.node-watchdog/deny-untaint`.
DENY_UNTAINT_LABEL = "test.node-watchdog/deny-untaint"
DENY_UNTAINT_POLICY = _node_policy(
    "test-deny-untaint",
    DENY_UNTAINT_LABEL,
    ["nodes"],
    {
        "key": "'node.kubernetes.io/out-of-service'",
        "had": "has(oldObject.spec.taints) && "
        "oldObject.spec.taints.exists(t, t.key == variables.key)",
        "has": "has(object.spec.taints) && object.spec.taints.exists(t, t.key == variables.key)",
    },
    "!variables.had || variables.has",
)
VAP = Resource(
    "/apis/admissionregistration.k8s.io/v1", "validatingadmissionpolicies", namespaced=False
)
VAP_BINDINGS = Resource(
    "/apis/admissionregistration.k8s.io/v1",
    "validatingadmissionpolicybindings",
    namespaced=False,
)


async def _deny(kube, policy: dict) -> None:
    name = policy["metadata"]["name"]
    await kube.create(VAP, policy)
    await kube.create(
        VAP_BINDINGS,
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": name},
            "spec": {"policyName": name, "validationActions": ["Deny"]},
        },
    )


async def _undeny(kube, policy: dict) -> None:
    name = policy["metadata"]["name"]
    await kube.delete(VAP_BINDINGS, name)
    await kube.delete(VAP, name)


async def test_a_declaration_the_api_refused_to_store_holds_the_reset_and_is_written_again(env):
    """The write of the fencing declaration fails (the API server refuses it) until the refusal
    ends: no reset while the agent could not have read it, then the declaration is written again
    from what the Node shows, and the node is reset and its VMs run elsewhere."""
    await env.restore()
    c = env.cluster
    node = "node-2"
    kube = c.kube
    label = {"metadata": {"labels": {"test.node-watchdog/deny-state": "true"}}}
    await kube.patch(NODES, node, label)
    await _deny(kube, DENY_STATE_POLICY)
    try:

        async def refused() -> bool:
            probe = {"metadata": {"annotations": {STATE_ANNOTATION: "probe"}}}
            try:  # a dry run goes through admission and stores nothing
                await kube.request(
                    "PATCH",
                    NODES.path(None, node),
                    query={"dryRun": "All"},
                    body=probe,
                    content_type="application/merge-patch+json",
                )
            except ApiError as e:
                return e.status in (400, 403, 422)
            return False

        await env.wait_for(refused, 30, "the API server refusing state writes on " + node)
        leader = await env.wait_leader()
        before = await leader.scrape()
        vms = c.vms_on(node)
        t0 = await env.fault("poweroff", node)

        async def persist_failed() -> bool:
            m = await leader.scrape()
            failed = m.get("watchdog_actions_total", action="PersistState", result="failed")
            return (
                failed
                - before.get("watchdog_actions_total", action="PersistState", result="failed")
                >= 2
            )  # written again, and refused again

        await env.wait_for(persist_failed, 30, "the declaration refused twice")
        # Held: the agent cannot have read a declaration the Node does not hold.
        assert env.phase(node) == "Healthy"  # what the Node shows
        assert [vm for vm in vms if restarted_elsewhere(c, vm, node, t0)] == []
        mid = await leader.scrape()
        assert mid.get("watchdog_actions_total", action="ForceDeletePods", result="success") == (
            before.get("watchdog_actions_total", action="ForceDeletePods", result="success")
        )
    finally:
        await _undeny(kube, DENY_STATE_POLICY)
        await kube.patch(
            NODES, node, {"metadata": {"labels": {"test.node-watchdog/deny-state": None}}}
        )

    released = time.monotonic()
    await env.wait_for(
        lambda: all(restarted_elsewhere(c, vm, node, t0) for vm in vms) and c.all_running(),
        60,
        f"every VM of {node} running elsewhere once the declaration could be written",
    )
    for vm in vms:
        # The reset waited the safe delay from when the declaration became readable.
        assert restarted_elsewhere(c, vm, node, t0).started_mono - released >= SAFE_DELAY_S - 1.0
    assert c.ledger.split_brain_seconds() == 0 and c.ledger.lost() == []
