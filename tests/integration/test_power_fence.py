"""fence_mode=power end to end: Debian's real fence_redfish against a real Redfish BMC per node.

Each machine of the test cluster has a BMC (chaos/sim/bmc.py: sushy-tools' sushy-emulator,
HTTPS with basic auth, wired to the machine's power: the BMC reports off only once the machine
is off). The controller runs in fence_mode=power with the cluster's BMC inventory; the agents
have no watchdog device, so their self-fence is weak and never accepted: the BMC is the only
proof that can let a reset happen, and the only one these tests can see.

1. A partitioned node whose own fence fails keeps running its VMs: only its BMC can stop it.
   The controller switches it off through fence_redfish, reads back off, and resets at once
   (NodeFenced reason PowerOffVerified); the machine was off before any VM started elsewhere.
2. The must-not twin: with the BMC down (a BMC without power answers nothing), nothing is
   assumed off — the reset is held; once the BMC answers again its read-back proves the node
   off and the reset follows.

Rerun (about 60 s on 2 cores; needs fence-agents and sushy-tools):
    python3 -m pytest -p no:cacheprovider tests/integration/test_power_fence.py
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import pytest_asyncio

from tests.integration.test_service_failover import fail_over
from tests.integration.watchdog_env import WatchdogEnv, default_config
from tests.unit.test_deploy import require_tool

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.broker,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(300),
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(control_plane_binaries, tmp_path_factory: pytest.TempPathFactory):
    require_tool("fence_redfish", "apt-get install fence-agents (bash .ci/run does)")
    require_tool("sushy-emulator", "pip install -e '.[chaos]'")
    work = Path(tmp_path_factory.mktemp("power-fence"))
    config = default_config(bmcs=True, watchdog_devices=False)
    # The default fence timeout (30 s) covers the emulator's own 1 to 11 s power delay.
    controller_env = {"WATCHDOG_FENCE_MODE": "power"}
    async with WatchdogEnv(
        config, control_plane_binaries, work, controller_env=controller_env
    ) as e:
        yield e


def fenced_by_bmc(env: WatchdogEnv, node: str, since: float) -> list[dict]:
    return [
        h
        for h in env.cluster.faults.history
        if h["action"] == "fence" and h["node"] == node and h.get("by") == "bmc"
        and h["t"] >= since - env.cluster.ledger.t0
    ]  # fmt: skip


def node_with_vms(env: WatchdogEnv, exclude: tuple[str, ...] = ()) -> str:
    c = env.cluster
    return max((n for n in c.fleet.members if n not in exclude), key=lambda n: len(c.vms_on(n)))


async def test_a_node_that_cannot_fence_itself_is_switched_off_by_its_bmc_and_reset_at_once(env):
    await env.restore()
    c = env.cluster
    node = node_with_vms(env)
    await env.fault("fence-fails", node)  # its agent's fence command stops nothing
    t0 = time.monotonic()
    run = await fail_over(env, node, "partition")
    # The BMC switched the machine off (fence_redfish ForceOff, read back off) ...
    [fence] = fenced_by_bmc(env, node, t0)
    assert not c.fleet[node].powered
    fenced = await env.events("NodeFenced", node, since=run["wall"])
    assert fenced and all("PowerOffVerified" in e["message"] for e in fenced), fenced
    # ... before any of its VMs started elsewhere: never two copies at once.
    off_at = c.ledger.t0 + fence["t"]
    for vm, copy in run["new"].items():
        assert copy.started_mono >= off_at, (vm, copy.started_mono, off_at)
    assert c.ledger.split_brain_seconds() == 0, c.ledger.totals()
    assert c.ledger.lost() == [] and c.ledger.false_resets() == [], c.ledger.totals()
    await env.restore()


async def test_with_its_bmc_down_a_node_is_not_assumed_off_and_is_reset_once_the_bmc_answers(env):
    await env.restore()
    c = env.cluster
    node = node_with_vms(env)
    vms = c.vms_on(node)
    wall = time.time()
    await env.fault("bmc-down", node)
    t0 = await env.fault("partition", node)
    # The agent fences itself (its command works, but without a watchdog device the fence is
    # weak and not accepted), the BMC answers nothing: the reset is held.
    await env.wait_for(lambda: env.events("ResetHeld", node, since=wall), 30, f"{node}: reset held")
    assert env.phase(node) == "Fencing" and not env.tainted(node)
    assert not fenced_by_bmc(env, node, t0)
    for vm in vms:  # not started anywhere else
        assert c.ledger.running_on(f"default/{vm}") in ([], [node]), vm
    # The BMC is back: the next fence run reads the machine off and the reset follows.
    await env.fault("bmc-up", node)
    await env.wait_for(lambda: env.phase(node) in ("Resetting", "Reset"), 60, f"{node} reset")
    fenced = await env.events("NodeFenced", node, since=wall)
    assert fenced and "PowerOffVerified" in fenced[-1]["message"], fenced
    assert c.ledger.split_brain_seconds() == 0, c.ledger.totals()
    await env.restore()
