"""Controller replicas on the test cluster: leader failover, clean shutdown, and preflight RBAC.

Two real `node-watchdog controller` processes elect a leader on the Lease
`node-watchdog/node-watchdog-leader`. A leader SIGKILLed in the middle of a failover is replaced
by the standby, which resumes from the phase persisted on the Node and completes it; a leader
given SIGTERM exits 0 at once and hands the Lease over (no waiting for it to expire).

Not covered here: a controller running *on* the node that powers off (the test cluster runs
controllers as local processes, not on simulated machines); killing the leader's process is the
same loss as far as the standby can tell (no more renewals, no goodbye).
"""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import time
from pathlib import Path

import pytest
import pytest_asyncio

from chaos.sim.informer import ApiError, Resource
from tests.integration.watchdog_env import (
    LEADER_TIMINGS,
    NAMESPACE,
    SAFE_DELAY_S,
    WatchdogEnv,
    default_config,
    restarted_elsewhere,
    wait_for,
)
from watchdog.actuate.preflight import cluster_role_rules, required_access
from watchdog.runtime.settings import Settings

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.broker,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(240),
]

LEASE_DURATION_S = float(LEADER_TIMINGS["WATCHDOG_LEADER__LEASE_DURATION_S"])
CLUSTER_ROLES = Resource("/apis/rbac.authorization.k8s.io/v1", "clusterroles", namespaced=False)
CLUSTER_ROLE_BINDINGS = Resource(
    "/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", namespaced=False
)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(control_plane_binaries, tmp_path_factory: pytest.TempPathFactory):
    work = Path(tmp_path_factory.mktemp("service-leader"))
    async with WatchdogEnv(default_config(), control_plane_binaries, work, controllers=2) as e:
        yield e


async def test_the_standby_completes_a_failover_when_the_leader_is_killed_mid_way(env):
    await env.restore()
    c = env.cluster
    leader = await env.wait_leader()
    (standby,) = [x for x in env.live_controllers() if x is not leader]
    node = "node-2"
    vms = c.vms_on(node)
    assert vms

    t0 = await env.fault("poweroff", node)
    # The leader declared the node unreachable and started fencing it (persisted on the Node)...
    await env.wait_for(lambda: env.phase(node) == "Fencing", 30, f"{node} Fencing")
    assert not env.tainted(node), "killed too late: the reset already began"
    # ... and dies before the reset, without a goodbye.
    await env.kill(leader, signal.SIGKILL)
    t_kill = time.monotonic()

    takeover_s = await env.wait_for(standby.is_leader, 3 * LEASE_DURATION_S, "standby leads")
    await env.wait_for(
        lambda: all(restarted_elsewhere(c, vm, node, t0) for vm in vms) and c.all_running(),
        60,
        f"VMs of {node} running elsewhere under the new leader",
    )
    await env.wait_for(lambda: env.phase(node) == "Reset", 20, f"{node} Reset")
    print(f"\n[leader failover] takeover {takeover_s:.1f}s after SIGKILL")

    m = await standby.scrape()
    assert m.get("watchdog_leader") == 1
    # The new leader resumed from the annotation and finished the reset itself.
    assert m.get("watchdog_transitions_total", {"from": "Resetting", "to": "Reset"}) == 1
    assert m.get("watchdog_actions_total", action="ForceDeletePods", result="success") >= 1
    lease = await env.leader_lease()
    assert lease is not None
    assert str(lease["spec"]["holderIdentity"]).endswith(f"_{standby.pid}")

    # It restarted the safety timers from its own observations: no reset before the safe delay
    # counted from its takeover (never shortened by the old leader's head start).
    gone = [t for t, _, n in env.timeline.pods_gone if n == node and t >= t0]
    assert gone and min(gone) >= t_kill + SAFE_DELAY_S, (min(gone) - t_kill, takeover_s)
    # Nothing done twice in a harmful way: each VM started once elsewhere, never two copies.
    for vm in vms:
        copies = c.ledger.vms[f"default/{vm}"].copies
        starts = [x for x in copies if x.started_mono >= t0 and x.node != node]
        assert len(starts) == 1, (vm, starts)
    assert c.ledger.split_brain_seconds() == 0
    assert c.ledger.lost() == [] and c.ledger.false_resets() == []


async def test_sigterm_makes_the_leader_exit_at_once_and_hand_the_lease_over(env):
    await env.restore()
    leader = await env.wait_leader()
    (standby,) = [x for x in env.live_controllers() if x is not leader]
    assert leader.pid is not None and leader.proc.process is not None

    t0 = time.monotonic()
    os.killpg(leader.pid, signal.SIGTERM)
    rc = await asyncio.wait_for(leader.proc.process.wait(), 10)
    exit_s = time.monotonic() - t0
    lease = await env.leader_lease()
    took_s = await env.wait_for(standby.is_leader, LEASE_DURATION_S, "standby leads")
    print(f"\n[sigterm] exit {exit_s:.2f}s, standby leading {exit_s + took_s:.2f}s after SIGTERM")

    assert rc == 0, leader.log_tail()
    assert exit_s < 5
    # Released (holder cleared), or already taken by the standby: never left to expire.
    assert lease is not None
    holder = lease["spec"].get("holderIdentity")
    assert not holder or str(holder).endswith(f"_{standby.pid}"), holder
    # Expiry would take lease_duration after the leader's last renewal; a release is seen at
    # the standby's next attempt.
    assert exit_s + took_s < LEASE_DURATION_S - 1, took_s
    assert "SIGTERM: shutting down" in leader.log_text()


def _without(rules: list[dict], group: str, resource: str, verb: str) -> list[dict]:
    out = copy.deepcopy(rules)
    for rule in out:
        if rule["apiGroups"] == [group] and rule["resources"] == [resource]:
            rule["verbs"] = [v for v in rule["verbs"] if v != verb]
    return [r for r in out if r["verbs"]]


async def _bind(env: WatchdogEnv, name: str, rules: list[dict]) -> Path:
    kube = env.cluster.kube
    for res, body in (
        (
            CLUSTER_ROLES,
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": {"name": name},
                "rules": rules,
            },
        ),
        (
            CLUSTER_ROLE_BINDINGS,
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": name},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": name,
                },
                "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}],
            },
        ),
    ):
        try:
            await kube.create(res, body)
        except ApiError as e:
            if e.status != 409:
                raise
    return await env.cluster.control_plane.kubeconfig_for_service_account(
        NAMESPACE, name, env.work_dir / f"{name}.kubeconfig"
    )


async def _preflight(kubeconfig: Path) -> tuple[int, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("WATCHDOG_") and k != "KUBECONFIG"
    }
    env.update({"KUBECONFIG": str(kubeconfig), "WATCHDOG_NAMESPACE": NAMESPACE})
    proc = await asyncio.create_subprocess_exec(
        "node-watchdog",
        "preflight",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_preflight_names_the_one_verb_its_service_account_lacks(env):
    settings = Settings(namespace=NAMESPACE)
    full = cluster_role_rules(required_access(settings))
    lacking = _without(full, "", "pods", "delete")
    assert lacking != full
    full_cfg, lacking_cfg = await asyncio.gather(
        _bind(env, "watchdog-preflight-full", full),
        _bind(env, "watchdog-preflight-lacking", lacking),
    )
    results: dict[str, tuple[int, str]] = {}

    def fails(out: str) -> list[str]:
        return [line for line in out.splitlines() if line.startswith("FAIL")]

    async def settled() -> bool:
        # RBAC reaches the authorizer's cache within a moment of the bindings' creation.
        results["full"], results["lacking"] = await asyncio.gather(
            _preflight(full_cfg), _preflight(lacking_cfg)
        )
        return not fails(results["full"][1]) and len(fails(results["lacking"][1])) == 1

    await wait_for(settled, 30, "preflight results settled", interval_s=0.5)
    rc_full, out_full = results["full"]
    rc_lacking, out_lacking = results["lacking"]
    print(f"\n[preflight lacking delete pods] exit {rc_lacking}\n{out_lacking}")

    assert rc_full == 0, out_full
    assert all(line.startswith("ok") for line in out_full.splitlines() if "rbac:" in line)
    assert rc_lacking != 0
    (line,) = fails(out_lacking)
    assert line.startswith("FAIL rbac: delete pods"), line
    assert "DENIED" in line and "force-delete" in line
