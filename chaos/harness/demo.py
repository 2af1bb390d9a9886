"""`watchdog-chaos demo`: the project's first run, on embedded defaults.

Owns the demo scenario — six nodes, 24 VMs, the embedded amqtt broker, node-6 loses power —
run for the watchdog, Harvester 1.7 at its defaults and Kubernetes alone, side by side at one
time scale (0.1 by default: Harvester's four minutes fit in under half a minute), with the live
timeline printed as it happens and the side-by-side table at the end. Kubernetes alone never
restarts a VM whose node died (its launcher pod stays Terminating), so every run is capped at
`timeout_s` and the table says "not reached within" that.

Must not: differ from `run` in what it measures: it is a scenario like any other.
"""

from __future__ import annotations

from typing import Any

from chaos.harness.scenario import Scenario, validate

DEMO: dict[str, Any] = {
    "name": "demo",
    "description": (
        "Six nodes, 24 VMs; node-6 loses power (no goodbye on any socket). The same failure "
        "for the watchdog (agents on every node, two controller replicas), Harvester 1.7's "
        "node-down controller at its defaults, and Kubernetes alone."
    ),
    "time_scale": 0.1,
    "systems": ["watchdog", "harvester-1.7", "kubernetes-only"],
    "cluster": {"nodes": 6, "vms": 24, "broker": "amqtt"},
    "watchdog": {"controllers": ["node-1", "node-2"]},
    "faults": [{"at_s": 0, "action": "poweroff", "node": "node-6"}],
    "observe_s": 0,
    "settle_s": 5,
    "timeout_s": 500,
    "expect": {"systems": ["watchdog"], "resets": "required", "fences": "any"},
    "budgets": {"watchdog": {"running_p95_s": 60}},
}


def demo_scenario(time_scale: float | None = None, timeout_s: float | None = None) -> Scenario:
    data = dict(DEMO)
    if time_scale is not None:
        data["time_scale"] = time_scale
    if timeout_s is not None:
        data["timeout_s"] = timeout_s
    return validate(data, "demo")
