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
import json
import os
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import pytest_asyncio
import yaml

from chaos.sim.informer import ApiError, Resource
from chaos.sim.proxy import ProxyMode, TcpProxy
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
RENEW_DEADLINE_S = float(LEADER_TIMINGS["WATCHDOG_LEADER__RENEW_DEADLINE_S"])
CLUSTER_ROLES = Resource("/apis/rbac.authorization.k8s.io/v1", "clusterroles", namespaced=False)
CLUSTER_ROLE_BINDINGS = Resource(
    "/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", namespaced=False
)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(control_plane_binaries, tmp_path_factory: pytest.TempPathFactory):
    work = Path(tmp_path_factory.mktemp("service-leader"))
    config = default_config(audit_log=True)
    async with WatchdogEnv(config, control_plane_binaries, work, controllers=2) as e:
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


async def test_a_leader_cut_from_the_api_steps_down_before_the_standby_takes_over(env):
    """The leader's API path black-holed: its requests hang (no refusal, no FIN), longer than
    its 10 s request timeout. It stops leading at its renew deadline, before the standby may
    take the Lease, and no state write it had in flight lands after the standby took over."""
    await env.restore()
    for ctl in env.live_controllers():
        await ctl.proc.stop(5.0)  # SIGTERM hands the Lease over
    server = urlsplit(env.cluster.control_plane.server_url)
    assert server.hostname and server.port
    async with TcpProxy(server.hostname, server.port, name="leader-api") as proxy:
        kubeconfig = _via(
            Path(env.controller_environment(0)["KUBECONFIG"]),
            f"https://{proxy.address}",
            env.work_dir / "via-proxy.kubeconfig",
        )
        cut = await env.start_controller(extra_env={"KUBECONFIG": str(kubeconfig)})
        await env.wait_for(cut.is_leader, 30, "the proxied controller leads")
        standby = await env.start_controller()
        assert cut.pid and standby.pid

        proxy.set_mode(ProxyMode.BLACKHOLE)
        t_cut = time.monotonic()
        samples: list[tuple[float, bool, bool]] = []

        async def standby_leads() -> bool:
            a, b = await asyncio.gather(cut.is_leader(), standby.is_leader())
            samples.append((time.monotonic() - t_cut, a, b))
            return b

        await wait_for(standby_leads, 30, "the standby leads", interval_s=0.05)
        stepped_down = next(t for t, a, _ in samples if not a)
        took_over = next(t for t, _, b in samples if b)
        print(f"\n[leader cut] stepped down {stepped_down:.2f}s, standby leads {took_over:.2f}s")
        assert not any(a and b for _, a, b in samples), samples
        assert stepped_down < took_over
        # Bounded by the renew deadline, not by the hung requests' 10 s timeout.
        assert stepped_down < RENEW_DEADLINE_S + 1.5, samples

        # Healed: whatever the cut replica had sent now reaches the API server.
        healed = datetime.now(UTC)
        proxy.set_mode(ProxyMode.PASS)
        agent = f"_{cut.pid})"
        audit = env.cluster.control_plane.audit_log_path
        assert audit is not None

        def requests_by_cut() -> list[dict]:
            return [r for r in _audit(audit) if r.get("userAgent", "").endswith(agent)]

        await wait_for(
            lambda: any(_received(r) > healed for r in requests_by_cut()),
            30,
            "the cut replica's requests reaching the API server again",
        )
        taken = min(
            _received(r)
            for r in _audit(audit)
            if r.get("userAgent", "").endswith(f"_{standby.pid})")
            and r["verb"] == "update"
            and (r.get("objectRef") or {}).get("resource") == "leases"
            and _code(r) < 300
        )
        # Events are left out: one the replica sent while it led, held by the cut, may land
        # now (informational; it changes no state). Every write that changes what the
        # watchdog's safety reads (Nodes, pods, the Lease, migrations) must not.
        late = [
            (r["verb"], r.get("requestURI"), _code(r))
            for r in requests_by_cut()
            if r["verb"] in ("create", "update", "patch", "delete")
            and (r.get("objectRef") or {}).get("resource") != "events"
            and _code(r) < 300
            and _received(r) >= taken
        ]
        assert late == [], late
        await cut.proc.stop(5.0)


def _via(kubeconfig: Path, server: str, out: Path) -> Path:
    """A copy of `kubeconfig` that reaches the API server at `server`."""
    doc = yaml.safe_load(kubeconfig.read_text())
    for cluster in doc["clusters"]:
        cluster["cluster"]["server"] = server
    out.write_text(yaml.safe_dump(doc))
    return out


def _audit(path: Path) -> list[dict]:
    """Each request once, at its last stage."""
    by_id: dict[str, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            event = json.loads(line)
            by_id[event["auditID"]] = event
    return list(by_id.values())


def _received(event: dict) -> datetime:
    return datetime.fromisoformat(event["requestReceivedTimestamp"].replace("Z", "+00:00"))


def _code(event: dict) -> int:
    return int((event.get("responseStatus") or {}).get("code") or 0)


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
