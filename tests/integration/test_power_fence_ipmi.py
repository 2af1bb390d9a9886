"""fence_mode=power over IPMI: Debian's real fence_ipmilan (through ipmitool, IPMI 2.0 over LAN)
against a real IPMI BMC server per node (chaos/sim/ipmi_bmc.py: pyghmi's, as virtualbmc serves
it, wired to the machine's power).

A partitioned node whose own fence fails, without a watchdog device (its self-fence is weak and
never accepted): only its BMC can stop it. The controller switches it off with fence_ipmilan,
reads back off, and resets at once (PowerOffVerified); the machine was off before any VM
started elsewhere. The BMC-down and lying-BMC twins run over Redfish (test_power_fence.py):
what they check is the controller's, the same for either protocol.

Rerun (about 60 s on 2 cores; needs fence-agents, ipmitool and pyghmi):
    python3 -m pytest -p no:cacheprovider tests/integration/test_power_fence_ipmi.py
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import pytest_asyncio

from tests.integration.test_power_fence import fenced_by_bmc, node_with_vms
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
    require_tool("fence_ipmilan", "apt-get install fence-agents (bash .ci/run does)")
    require_tool("ipmitool", "apt-get install ipmitool (bash .ci/run does)")
    work = Path(tmp_path_factory.mktemp("power-fence-ipmi"))
    config = default_config(bmcs=True, bmc_protocol="ipmi", watchdog_devices=False)
    controller_env = {"WATCHDOG_FENCE_MODE": "power"}
    async with WatchdogEnv(
        config, control_plane_binaries, work, controller_env=controller_env
    ) as e:
        yield e


async def test_a_node_that_cannot_fence_itself_is_switched_off_over_ipmi_and_reset_at_once(env):
    await env.restore()
    c = env.cluster
    node = node_with_vms(env)
    inventory = c.bmcs.inventory_path.read_text()
    assert "fence_ipmilan" in inventory and "fence_redfish" not in inventory
    await env.fault("fence-fails", node)  # its agent's fence command stops nothing
    t0 = time.monotonic()
    run = await fail_over(env, node, "partition")
    [fence] = fenced_by_bmc(env, node, t0)
    assert not c.fleet[node].powered
    assert c.bmcs.reported[node] == "Off"
    fenced = await env.events("NodeFenced", node, since=run["wall"])
    assert fenced and all("PowerOffVerified" in e["message"] for e in fenced), fenced
    off_at = c.ledger.t0 + fence["t"]
    for vm, copy in run["new"].items():
        assert copy.started_mono >= off_at, (vm, copy.started_mono, off_at)
    assert c.ledger.split_brain_seconds() == 0, c.ledger.totals()
    assert c.ledger.lost() == [] and c.ledger.false_resets() == [], c.ledger.totals()
