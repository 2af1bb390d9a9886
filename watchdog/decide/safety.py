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
    terms = (declared.after_s, declared.bound_s, declared.watchdog_s)
    if not all(math.isfinite(t) and t >= 0 for t in terms):
        # max(period_end, NaN) is period_end: a NaN or negative term would silently shorten
        # the wait. A declaration that makes no sense proves nothing: the node is unfenced.
        return None
    return (
        declared.after_s  # the agent fences (and stops petting its device) once cut off this long
        # Then the fence action stops the VMs within bound_s; should the agent freeze, die or
        # its command fail instead, the device resets the node watchdog_s after the last pet.
        + max(declared.bound_s, declared.watchdog_s if declared.device else 0.0)
        + cfg.heartbeat_interval_s  # the agent may have had one more broker round trip than we saw
        + cfg.fence_margin_s  # clock-rate drift between the two machines, scheduling delay
    )


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
) -> float | None:
    """Earliest monotonic time a reset may start on the agent's self-fence (in mode power: when
    the BMC has not confirmed); None while it cannot be computed yet."""
    period_end = unreachable_at + policy.period_s
    if not self_fence_counts(cfg.fence_mode):
        return period_end
    delay = safe_delay_s(declared, cfg)
    if delay is None or fence_clock_from is None:
        return None
    return max(period_end, fence_clock_from + delay)
