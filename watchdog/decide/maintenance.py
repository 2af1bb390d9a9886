"""Planned maintenance: a silent node that runs no VM and was taken out of service on purpose.

Owns: `in_maintenance`, the rule that turns a silent node's corroborated silence into the
MAINTENANCE phase instead of UNREACHABLE (machine.py). A node is in maintenance when it was
taken out of service — Harvester's maintenance mode finished (`harvesterhci.io/maintain-status:
completed`), or simply cordoned — *and* the API shows no VMI on it.

Why holding it is safe and right: a hold never runs a VM twice. With no VMI on the node there
is nothing to reset, so fencing it (a BMC power-off, the out-of-service taint, an alert) would
only disturb a planned shutdown. A node still running a VMI is never in maintenance, however it
is labelled: its VMs are failed over as on any other node (the cordoned twin). If a VMI shows
up while the node is still silent, or its kubelet renews its Lease again, it leaves
MAINTENANCE and is judged like any silent node again. The cordon or the status going away does
not end it while the node is silent and empty: that silence is old, and the machine may be
booting after the work (a BMC power-off would stop it); it ends when the node is heard.

Must not: read anything but the observation (pure).
"""

from __future__ import annotations

from watchdog.decide.names import MAINTAIN_STATUS_COMPLETED
from watchdog.decide.observations import NodeObservation


def in_maintenance(obs: NodeObservation) -> bool:
    """Taken out of service on purpose, and no VMI left on it."""
    planned = obs.cordoned or obs.maintain_status == MAINTAIN_STATUS_COMPLETED
    return planned and obs.vmis_here == 0


def maintenance_note(obs: NodeObservation) -> str:
    """How the node was taken out of service, for its Event."""
    if obs.maintain_status == MAINTAIN_STATUS_COMPLETED:
        return "Harvester maintenance mode completed"
    return "cordoned"
