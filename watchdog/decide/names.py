"""The names node-watchdog shares with the cluster, defined once: what observe reads, actuate
writes and decide reasons about must be spelled the same in all three."""

from __future__ import annotations

# The controller's persisted state of a node (decide/state.py reads and writes its value).
STATE_ANNOTATION = "node-watchdog.kubevirt.io/state"
# On the VirtualMachineInstanceMigrations the watchdog creates to evacuate a node.
EVACUATION_LABEL = "node-watchdog.kubevirt.io/evacuation"
# Where every kubelet renews its node's Lease.
NODE_LEASE_NAMESPACE = "kube-node-lease"
# A KubeVirt migration in one of these phases is over (it no longer counts against the limits).
FINAL_MIGRATION_PHASES = frozenset({"Succeeded", "Failed"})
