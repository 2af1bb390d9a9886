"""The decision core's configuration and the force-reset policy, as plain frozen values."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class FenceMode(StrEnum):
    """How a node is proven stopped before its VMs are reset (DESIGN §5)."""

    SELF = "self"
    EXTERNAL = "external"
    # The node's BMC switches it off and reads back that it is off; without that confirmation
    # (a BMC without power answers nothing) the agent's self-fence is the proof, as in SELF.
    POWER = "power"
    MANUAL = "manual"
    NONE = "none"


def self_fence_counts(mode: FenceMode) -> bool:
    """Whether the agent's declared self-fence (and its safe delay) can prove a node stopped:
    in mode self always, in mode power as the fallback when the BMC does not confirm."""
    return mode in (FenceMode.SELF, FenceMode.POWER)


def runs_fence_hook(mode: FenceMode) -> bool:
    """Whether the controller runs a fence per node until it confirms: the operator's hook
    (external) or the node's BMC through a fence agent (power)."""
    return mode in (FenceMode.EXTERNAL, FenceMode.POWER)


@dataclass(frozen=True, slots=True)
class Policy:
    """Harvester's `vm-force-reset-policy`, or the configured equivalent."""

    enable: bool = True
    period_s: float = 15.0
    vm_migration_timeout_s: float = 180.0
    source: str = "config"


@dataclass(frozen=True, slots=True)
class DecideConfig:
    """The timings and switches the state machine needs; built from Settings by runtime."""

    heartbeat_interval_s: float = 1.0
    suspect_after_s: float = 3.0
    unreachable_after_s: float = 4.0
    lease_stale_after_s: float = 15.0
    recovery_heartbeats: int = 3
    storm_max_unreachable: int = 10
    storm_max_fraction: float = 0.5
    fence_mode: FenceMode = FenceMode.SELF
    fence_margin_s: float = 2.0
    # Accept a self-fence that no watchdog device backs (decide/safety.py, fence_accepted).
    accept_weak_fence: bool = False
    dry_run: bool = False
    mark_pods_not_ready: bool = True
    delete_volume_attachments: bool = False
