"""Fault injection on the test cluster: per node, and on the cluster's shared services.

Owns the meaning of every fault action and its inverse, and the order of the steps inside one
(cut the links before killing an agent, so the broker sees no FIN):

per node
  poweroff        links black-holed, then every process on the machine stops silently: kubelet,
                  virt-handler, VM domains (ledger), the agent (SIGKILL behind the black hole)
  poweron         fresh boot: new boot_id, links restored, kubelet and agent start after the boot
                  delay; pods whose objects still exist are restarted or marked Failed (kubelet.py)
  reboot          poweroff + poweron
  partition/heal  the machine's network: links black-holed, its kubelet and virt-handler cannot
                  reach the API; its VMs keep running
  nic-flap        a partition healed after --duration (default 5 s, scaled)
  kubelet-stop/kubelet-start   kubelet only; VMs, virt-handler and agent keep running
  agent-kill      SIGKILL of the agent alone: the kernel closes its socket, the proxy forwards
                  the FIN, the broker publishes the Will at once
  agent-start     start the agent again
  agent-restart   one step of a rollout: SIGTERM (the agent says offline, disarms its watchdog
                  device), wait for its exit, start it again on the same boot
  agent-freeze/agent-thaw   SIGSTOP / SIGCONT of the agent's processes: no FIN, no Will until
                  the broker's keepalive runs out, no pet of the watchdog device
  fence-fails/fence-works   the node's fence command fails (exits non-zero, fences nothing)
                  until fence-works; the watchdog device is its fallback
  broker-link-cut/broker-link-heal   only the machine's path to the broker black-holed: its
                  kubelet, API path and peer link stay up (the agent keeps reaching the API)
  mgmt-link-cut/mgmt-link-heal   the machine's broker path and its peer link black-holed (a
                  management network down): its kubelet and agent still reach the API
  api-link-cut/api-link-heal   only the machine's path to the API server black-holed: its
                  kubelet and virt-handler, its agent and a controller replica on it lose the
                  API; broker and peer paths stay up
  bmc-down/bmc-up   the machine's BMC frozen (a BMC without power: requests hang) / back
  bmc-lies/bmc-truthful   the BMC reports power changes it never makes (off while it runs)
  maintenance     Harvester's maintenance mode, through the API (chaos/sim/maintenance.py):
                  cordoned, its VMs live-migrated away; returns once Harvester would show it
                  completed
  maintenance-end maintenance mode disabled: uncordoned, the status annotation removed
  cordon/uncordon `kubectl cordon`: unschedulable, its VMs stay where they are
  fence           (the node-local fence channel, the node's watchdog device firing, or its BMC
                  switching it off) as
                  poweroff, recorded as a fence (`by`: fence-command or watchdog-device); with
                  `fence_action="reboot"` the machine boots again
cluster
  api-outage/api-restore                kube-apiserver frozen (SIGSTOP) / thawed
  broker-outage/broker-restore          the broker stopped / started on the same port
  controller-manager-stop/-start, compact (etcd compaction: watches get 410 Gone)

`--duration S` (wall seconds) schedules the inverse action. Must not: decide when to inject
(the chaos harness does), or simulate anything itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from chaos.sim import maintenance
from chaos.sim.bmc import BmcFleet
from chaos.sim.broker import MqttBroker
from chaos.sim.controlplane import ControlPlane
from chaos.sim.informer import Clock, Kube
from chaos.sim.kubelet import Fleet
from chaos.sim.ledger import Ledger, StopReason

log = logging.getLogger(__name__)

NODE_ACTIONS = (
    "poweroff",
    "poweron",
    "reboot",
    "partition",
    "heal",
    "nic-flap",
    "kubelet-stop",
    "kubelet-start",
    "agent-kill",
    "agent-start",
    "agent-restart",
    "agent-freeze",
    "agent-thaw",
    "fence-fails",
    "fence-works",
    "broker-link-cut",
    "broker-link-heal",
    "mgmt-link-cut",
    "mgmt-link-heal",
    "api-link-cut",
    "api-link-heal",
    "bmc-down",
    "bmc-up",
    "bmc-lies",
    "bmc-truthful",
    "maintenance",
    "maintenance-end",
    "cordon",
    "uncordon",
    "fence",
)
CLUSTER_ACTIONS = (
    "api-outage",
    "api-restore",
    "broker-outage",
    "broker-restore",
    "controller-manager-stop",
    "controller-manager-start",
    "compact",
)
ACTIONS = NODE_ACTIONS + CLUSTER_ACTIONS
INVERSE = {
    "poweroff": "poweron",
    "partition": "heal",
    "nic-flap": "heal",
    "kubelet-stop": "kubelet-start",
    "agent-kill": "agent-start",
    "agent-freeze": "agent-thaw",
    "fence-fails": "fence-works",
    "broker-link-cut": "broker-link-heal",
    "mgmt-link-cut": "mgmt-link-heal",
    "api-link-cut": "api-link-heal",
    "bmc-down": "bmc-up",
    "bmc-lies": "bmc-truthful",
    "fence": "poweron",
    "maintenance": "maintenance-end",
    "cordon": "uncordon",
    "api-outage": "api-restore",
    "broker-outage": "broker-restore",
    "controller-manager-stop": "controller-manager-start",
}
NIC_FLAP_S = 5.0  # unscaled


class MachineConfig(Protocol):
    @property
    def fence_action(self) -> str: ...


class FaultTarget(Protocol):
    """What faults act on: the test cluster's machines, links, agents, BMCs, control plane
    and broker (`chaos.sim.cluster.SimCluster` is one; this module does not import it)."""

    fleet: Fleet
    clock: Clock
    ledger: Ledger
    bmcs: BmcFleet | None
    control_plane: ControlPlane
    kube: Kube
    broker: MqttBroker | None
    fence_failing: set[str]

    @property
    def config(self) -> MachineConfig: ...
    def background(self, step: Awaitable[None], name: str) -> None: ...
    def links_down(self, node: str) -> None: ...
    def sync_links(self, node: str) -> None: ...
    def cut_broker_link(self, node: str, cut: bool) -> None: ...
    def cut_mgmt_link(self, node: str, cut: bool) -> None: ...
    def cut_api_link(self, node: str, cut: bool) -> None: ...
    def device_power_off(self, node: str) -> None: ...
    def signal_agent(self, node: str, *, freeze: bool) -> bool: ...
    async def restart_agent(self, node: str) -> bool: ...
    async def start_agent(self, node: str) -> bool: ...
    def start_agent_after_boot(self, node: str) -> None: ...
    async def kill_agent(self, node: str) -> bool: ...


class Faults:
    """Applies faults to a running test cluster; keeps a history for reports."""

    def __init__(self, cluster: FaultTarget) -> None:
        self.cluster = cluster
        self.history: list[dict[str, Any]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def schedule(self, delay_s: float, what: str, fn: Callable[[], Awaitable[Any]]) -> None:
        async def run() -> None:
            await asyncio.sleep(delay_s)
            try:
                await fn()
            except Exception:
                log.exception("scheduled %s failed", what)

        task = asyncio.create_task(run(), name=what)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def apply(
        self,
        action: str,
        node: str | None = None,
        duration_s: float | None = None,
        *,
        by: str | None = None,
    ) -> dict[str, Any]:
        """Inject `action` (on `node` for node actions). Raises ValueError on bad input."""
        if action not in ACTIONS:
            raise ValueError(f"unknown fault action {action!r}; one of: {', '.join(ACTIONS)}")
        if action in NODE_ACTIONS:
            if not node:
                raise ValueError(f"fault {action} needs a NODE")
            if node not in self.cluster.fleet.members:
                raise ValueError(
                    f"unknown node {node!r} (nodes: {', '.join(self.cluster.fleet.members)})"
                )
        elif node:
            raise ValueError(f"fault {action} is cluster-wide: it takes no NODE (got {node!r})")
        if duration_s is not None and duration_s < 0:
            raise ValueError(f"--duration must be >= 0, got {duration_s}")
        if action == "nic-flap" and duration_s is None:
            duration_s = self.cluster.clock.scaled(NIC_FLAP_S)
        entry: dict[str, Any] = {
            "action": action,
            "node": node,
            "duration_s": duration_s,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "t": round(time.monotonic() - self.cluster.ledger.t0, 3),
        }
        if by is not None:
            entry["by"] = by
        result = await self._do(action, node)
        entry["result"] = result
        self.history.append(entry)
        log.info(
            "fault %s%s%s: %s",
            action,
            f" {node}" if node else "",
            f" for {duration_s}s" if duration_s else "",
            result,
        )
        inverse = INVERSE.get(action)
        if duration_s is not None and inverse is not None:
            self.schedule(
                duration_s, f"{inverse} {node or ''}".strip(), lambda: self.apply(inverse, node)
            )
            entry["heals_with"] = inverse
        return entry

    async def _do(self, action: str, node: str | None) -> dict[str, Any]:
        c = self.cluster
        if node is not None:
            sim = c.fleet[node]
            match action:
                case "poweroff" | "fence":
                    reason = StopReason.FENCED if action == "fence" else StopReason.POWEROFF
                    # Links first: the agent's socket closes when it dies, and that FIN must
                    # not reach the broker (a machine without power sends nothing).
                    c.links_down(node)
                    stopped = sim.power_off(reason)
                    c.device_power_off(node)
                    await c.kill_agent(node)
                    if c.bmcs is not None:  # its BMC (standby power) sees the machine off
                        c.background(c.bmcs.machine_power(node, on=False), f"bmc {node} off")
                    if action == "fence" and c.config.fence_action == "reboot":
                        await self._do("poweron", node)
                    return {"stopped_vms": stopped}
                case "poweron":
                    if sim.powered:
                        return {"already": "on"}
                    sim.power_on()
                    c.sync_links(node)
                    c.start_agent_after_boot(node)
                    if c.bmcs is not None:
                        c.background(c.bmcs.machine_power(node, on=True), f"bmc {node} on")
                    return {"boot_id": sim.boot_id}
                case "reboot":
                    first = await self._do("poweroff", node)
                    second = await self._do("poweron", node)
                    return {**first, **second}
                case "partition" | "nic-flap":
                    sim.partition()
                    c.sync_links(node)
                    return {}
                case "heal":
                    sim.heal()
                    c.sync_links(node)
                    return {}
                case "kubelet-stop":
                    sim.kubelet_stop()
                    return {}
                case "kubelet-start":
                    sim.kubelet_start()
                    return {}
                case "agent-kill":
                    return {"killed": await c.kill_agent(node)}
                case "agent-start":
                    return {"started": await c.start_agent(node)}
                case "agent-restart":
                    return {"restarted": await c.restart_agent(node)}
                case "agent-freeze" | "agent-thaw":
                    return {"signalled": c.signal_agent(node, freeze=action == "agent-freeze")}
                case "fence-fails":
                    c.fence_failing.add(node)
                    return {"fence": "fails"}
                case "fence-works":
                    c.fence_failing.discard(node)
                    return {"fence": "works"}
                case "broker-link-cut" | "broker-link-heal":
                    c.cut_broker_link(node, action == "broker-link-cut")
                    return {}
                case "mgmt-link-cut" | "mgmt-link-heal":
                    c.cut_mgmt_link(node, action == "mgmt-link-cut")
                    return {}
                case "api-link-cut" | "api-link-heal":
                    c.cut_api_link(node, action == "api-link-cut")
                    return {}
                case "maintenance":
                    return await maintenance.enter(c.kube, node, c.clock)
                case "maintenance-end":
                    return await maintenance.leave(c.kube, node)
                case "cordon" | "uncordon":
                    return await maintenance.cordon(c.kube, node, on=action == "cordon")
                case "bmc-down" | "bmc-up" | "bmc-lies" | "bmc-truthful":
                    if c.bmcs is None:
                        raise ValueError(f"fault {action}: this cluster has no BMCs (bmcs: true)")
                    if action in ("bmc-down", "bmc-up"):
                        c.bmcs.down(node, action == "bmc-down")
                        if action == "bmc-up":  # it reads its machine's power again
                            c.background(
                                c.bmcs.machine_power(node, on=sim.powered), f"bmc {node} sync"
                            )
                    else:
                        c.bmcs.set_lies(node, action == "bmc-lies")
                    return {}
        cp = c.control_plane
        match action:
            case "api-outage":
                await cp.api_outage_start()
            case "api-restore":
                await cp.api_outage_stop()
            case "broker-outage":
                if c.broker is None:
                    raise ValueError("this cluster has no broker (start the sim with one)")
                await c.broker.stop()
            case "broker-restore":
                if c.broker is None:
                    raise ValueError("this cluster has no broker (start the sim with one)")
                await c.broker.start()
            case "controller-manager-stop":
                await cp.controller_manager_stop()
            case "controller-manager-start":
                await cp.controller_manager_start()
            case "compact":
                return {"revision": await cp.compact()}
        return {}
