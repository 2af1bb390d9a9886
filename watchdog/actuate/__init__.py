"""Idempotent Kubernetes writes: taints, pod status and deletes, Events, annotations,
migrations, the leader Lease, and the preflight checks (DESIGN §4, §5, §7, §9).

Executes the actions `watchdog.decide` returns; decides nothing itself. Only this package and
`watchdog.observe` import kubernetes_asyncio; the two never import each other.
"""

from watchdog.actuate.actuator import Actuator, ActuatorSettings
from watchdog.actuate.errors import ActuationError, PermanentError, TransientError
from watchdog.actuate.lease_lock import LeaseLock, LeaseRecord
from watchdog.actuate.outcome import Outcome, Result

__all__ = [
    "ActuationError",
    "Actuator",
    "ActuatorSettings",
    "LeaseLock",
    "LeaseRecord",
    "Outcome",
    "PermanentError",
    "Result",
    "TransientError",
]
