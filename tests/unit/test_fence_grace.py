"""The agent's grace before acting on a declaration that it is being fenced (heartbeat/fence.py).

An operator relies on two things: a NIC flap just longer than the detection threshold does not
reboot a healthy node, and the grace never lets the controller reset VMs before the agent's
fence has run (which would run a VM twice).
"""

from __future__ import annotations

from hypothesis import assume, given
from hypothesis import strategies as st

from watchdog.decide.config import DecideConfig
from watchdog.decide.observations import FenceDeclaration
from watchdog.decide.safety import safe_delay_s
from watchdog.heartbeat.fence import declared_grace_s

durations = st.floats(0.05, 120.0, allow_nan=False)


def test_the_defaults_leave_time_for_the_controller_to_withdraw() -> None:
    # self_fence_after 8 s, heartbeat 1 s, API check 2 s: the controller withdraws at the
    # first heartbeat it hears (about 1 s after the link returns), the agent reads it within
    # one API interval (2 s) of that.
    assert declared_grace_s(8.0, 1.0, 2.0) == 3.0


@given(after=durations, heartbeat=durations, api=durations, bound=durations)
def test_the_fence_always_ends_before_the_controller_may_reset(
    after: float, heartbeat: float, api: float, bound: float
) -> None:
    """Worst case: the declaration became visible at 0; the agent reads it as late as its
    polling allows, waits the whole grace, then its fence takes the whole bound. The
    controller's earliest reset counts from visibility with margin 0 (the least it may use)."""
    latest_read = max(api, after / 2) + api
    # Settings refuse the rest (runtime/settings.py): the declaration could not even be read
    # in time to fence at once.
    assume(latest_read <= after + heartbeat)
    grace = declared_grace_s(after, heartbeat, api)
    assert grace >= 0.0
    fenced_by = latest_read + grace + bound
    cfg = DecideConfig(heartbeat_interval_s=heartbeat, fence_margin_s=0.0)
    earliest_reset = safe_delay_s(
        FenceDeclaration(True, after, bound, device=True, watchdog_s=bound), cfg
    )
    assert fenced_by <= earliest_reset + 1e-9
