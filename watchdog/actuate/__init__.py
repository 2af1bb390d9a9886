"""Idempotent Kubernetes writes: taints, pod status and deletes, Events, annotations,
migrations, the leader Lease, and the preflight checks (DESIGN §4, §5, §7, §9).

Executes the actions `watchdog.decide` returns; decides nothing itself. It reaches the API server
only through the service's one Kubernetes client (watchdog/transport/kube.py) and its one error
tree (transport/kube_errors.py); it never imports `watchdog.observe`, nor observe it.
"""

from watchdog.actuate.actuator import Actuator, ActuatorSettings
from watchdog.actuate.lease_lock import LeaseLock, LeaseRecord
from watchdog.actuate.outcome import Outcome, Result

__all__ = [
    "Actuator",
    "ActuatorSettings",
    "LeaseLock",
    "LeaseRecord",
    "Outcome",
    "Result",
]
