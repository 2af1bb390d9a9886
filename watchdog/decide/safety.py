"""Safety arithmetic: how long after a node was declared unreachable its VMs may be reset.

Resetting a node that is only partitioned would start a second copy of each of its VMs on a
shared volume. The reset therefore waits until the node's agent has provably stopped them,
using the fencing parameters that agent itself declared, never a value assumed here.
"""

from __future__ import annotations

import math

from watchdog.decide.config import DecideConfig, Policy, self_fence_counts
from watchdog.decide.observations import FenceDeclaration


def fence_accepted(declared: FenceDeclaration | None, cfg: DecideConfig) -> bool:
    """The agent's declaration can prove its node fenced, given enough time.

    Armed, and backed by a watchdog device, or weak (no device) where the operator opted in
    (`accept_weak_self_fence`): a weak fence is only as good as the agent process, and an agent
    that froze, hung or whose fence command failed stops nothing (DESIGN §5).
    """
    if declared is None or not declared.armed:
        return False
    return declared.device or cfg.accept_weak_fence


def safe_delay_s(declared: FenceDeclaration | None, cfg: DecideConfig) -> float | None:
    """Seconds from the fence clock's start until the node's VMs are proven stopped.

    None when the agent declared no fence that `fence_accepted`: no delay makes such a node
    safe, and the caller must fall back to manual proof (an administrator's out-of-service
    taint).
    The fence clock starts when both hold: the controller has had no heartbeat for
    `unreachable_after_s`, and the node's annotation says it is being fenced (an agent that
    still reaches the API reads that and fences at once, so its API contact stops counting).
    """
    if declared is None or not fence_accepted(declared, cfg):
        return None
    terms = (declared.after_s, declared.bound_s, declared.watchdog_s, declared.lease_s)
    if not all(math.isfinite(t) and t >= 0 for t in terms):
        # max(period_end, NaN) is period_end: a NaN or negative term would silently shorten
        # the wait. A declaration that makes no sense proves nothing: the node is unfenced.
        return None
    return (
        declared.after_s  # the agent fences (and stops petting its device) once cut off this long
        + stop_s(declared)
        + cfg.heartbeat_interval_s  # the agent may have had one more broker round trip than we saw
        + cfg.fence_margin_s  # clock-rate drift between the two machines, scheduling delay
    )


def stop_s(declared: FenceDeclaration) -> float:
    """From the moment the agent fences until its node is stopped: the fence action stops the
    VMs within bound_s; should the agent freeze, die or its command fail instead, the device
    resets the node watchdog_s after the last pet."""
    return max(declared.bound_s, declared.watchdog_s if declared.device else 0.0)


def lease_gate(
    declared: FenceDeclaration | None, lease_renewed_at: float | None, cfg: DecideConfig
) -> float | None:
    """Earliest monotonic time a self-fence reset may start given the node's Lease; None when
    the Lease does not bind (the agent declared no `lease_s`, or the Lease was never seen).

    The agent may postpone its fence until `lease_s` after the latest renewal of its kubelet's
    Lease that it read (heartbeat/agent.py, `lease_deadline`): a node cut off from broker and
    peers that still reaches the API is alive, and its kubelet's next renewal comes within
    10 s, after the agent's grace but before this gate (the controller then withdraws its
    declaration, `kubelet_alive_since_silence`). The agent read a renewal only after it was
    written, and we saw it only after that (`lease_renewed_at` is when our watch showed it
    change, on our clock), so the agent fences at the latest `lease_s` after our
    `lease_renewed_at` and its node is stopped `stop_s` later. On a dead node the gate ends
    up to 2 s after the safe delay, 2 s more for a renewal seen in the two heartbeat intervals
    after its last heartbeat (test_decide_safety.py). Not covered, and why the
    wait is an opt-in (docs/OPERATIONS.md, Self-fencing): a renewal the agent read that our
    watch has not shown yet (a lagging watch, another API server), a wall-clock step on the
    node before its agent started, an agent newer than this controller.
    """
    if declared is None or not declared.lease_s or lease_renewed_at is None:
        return None
    if not math.isfinite(declared.lease_s) or declared.lease_s < 0:
        return math.inf  # a nonsensical promise: never reset on it (the parsers refuse it too)
    return lease_renewed_at + declared.lease_s + stop_s(declared) + cfg.fence_margin_s


def effective_period_s(
    policy: Policy, declared: FenceDeclaration | None, cfg: DecideConfig
) -> float:
    """The wait actually applied: the policy period, raised to the safe delay in mode self.

    A configured period shorter than the safe delay never shortens it (the runtime warns).
    """
    if not self_fence_counts(cfg.fence_mode):
        return policy.period_s
    delay = safe_delay_s(declared, cfg)
    return policy.period_s if delay is None else max(policy.period_s, delay)


def reset_not_before(
    unreachable_at: float,
    fence_clock_from: float | None,
    policy: Policy,
    declared: FenceDeclaration | None,
    cfg: DecideConfig,
    lease_renewed_at: float | None = None,
) -> float | None:
    """Earliest monotonic time a reset may start on the agent's self-fence (in mode power: when
    the BMC has not confirmed); None while it cannot be computed yet. The safe delay from the
    fence clock and the Lease gate must both have passed: the agent fences by the later of its
    two deadlines, and each is bounded by its term here."""
    period_end = unreachable_at + policy.period_s
    if not self_fence_counts(cfg.fence_mode):
        return period_end
    delay = safe_delay_s(declared, cfg)
    if delay is None or fence_clock_from is None:
        return None
    gate = lease_gate(declared, lease_renewed_at, cfg)
    return max(period_end, fence_clock_from + delay, gate if gate is not None else period_end)
