"""The controller's side of a Lease past its deadline while the API may be frozen unnoticed
(watchdog/runtime/controller.py, decide/signals.py): the node is not judged on it until the
API answers a probe sent after the deadline, and that answer has it decided again.

The real `Controller` and `decide`, a manual clock, the in-memory cluster of
test_controller_fence_hook.py.
"""

from __future__ import annotations

from watchdog.decide.heartbeats import Heartbeat
from watchdog.decide.observations import FenceDeclaration
from watchdog.decide.state import Phase

from .test_controller_fence_hook import leading_self_fence_controller

LIVE = "n2"


async def test_a_lease_past_its_deadline_waits_for_an_api_answer_after_it() -> None:
    c, clock, book, cluster = leading_self_fence_controller()
    answered: list[float] = [clock.now - 100.0]
    c.health.api_answered = lambda: answered[-1]
    probes: list[float] = []  # when the controller asked the cache for a probe now
    c.request_api_probe = lambda: probes.append(clock.now)
    cluster.lease_at = clock.now - 15.5  # deadline half a second ago
    answered.append(clock.now - 2.0)  # the API answered last before it (then froze)
    armed = FenceDeclaration(armed=True, after_s=8.0, bound_s=5.0, device=True, watchdog_s=5.0)
    for seq in range(1, 4):
        book.accept(Heartbeat(LIVE, "boot-1", seq, 0.0, "1", armed), clock.now)
    assert probes == []  # a live Lease asks for nothing
    await c.evaluate(LIVE)
    assert c.states[LIVE].phase is Phase.HEALTHY
    # Asked for an answer now, not at the next periodic probe; once, however often decided.
    assert probes == [clock.now]
    await c.evaluate(LIVE)
    assert probes == [clock.now]
    assert c.api_answered_now() == [LIVE]
    assert c.api_answered_now() == []  # handed over once
    # The API answers a probe sent after the deadline; still no renewal: the kubelet's path
    # is lost, and the node is evacuated.
    answered.append(clock.now)
    await c.evaluate(LIVE)
    assert c.states[LIVE].phase is Phase.DEGRADED
    assert c.api_answered_now() == []
