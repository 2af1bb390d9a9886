"""The names node-watchdog shares with the cluster, defined once: what observe reads, actuate
writes and decide reasons about must be spelled the same in all three.

Ours live under our own domain, `node-watchdog.io` (`kubevirt.io` is KubeVirt's). Releases
before it wrote under `node-watchdog.kubevirt.io`; those legacy names are still read, so that a
node declared or an annotated VM under the old name keeps its meaning across an upgrade. One
legacy name is still written: the node's state, in the same request as ours, because an agent
of the previous release reads only that one and must see its node declared during a rolling
upgrade or a rollback. A later release stops writing it."""

from __future__ import annotations

from collections.abc import Mapping

DOMAIN = "node-watchdog.io"
LEGACY_DOMAIN = "node-watchdog.kubevirt.io"

# The controller's persisted state of a node (decide/state.py reads and writes its value).
STATE_ANNOTATION = f"{DOMAIN}/state"
LEGACY_STATE_ANNOTATION = f"{LEGACY_DOMAIN}/state"
# On the VirtualMachineInstanceMigrations the watchdog creates to evacuate a node: a label (the
# node, hashed to a valid label value) to find them, an annotation with the node's name.
EVACUATION_LABEL = f"{DOMAIN}/evacuation"
LEGACY_EVACUATION_LABEL = f"{LEGACY_DOMAIN}/evacuation"
EVACUATION_NODE_ANNOTATION = f"{DOMAIN}/evacuation-node"
# Set by operators on VirtualMachines/VMIs: who is evacuated first.
EVACUATION_PRIORITY = f"{DOMAIN}/evacuation-priority"
LEGACY_EVACUATION_PRIORITY = f"{LEGACY_DOMAIN}/evacuation-priority"
# The API group of the virtual resources that name, for the state guard (deploy/base/
# state-guard.yaml), who else may change the state annotation or the out-of-service taint.
GUARD_API_GROUP = DOMAIN
# The signer of the agents' broker client certificates (decide/csr_review.py): the controller
# approves and signs CertificateSigningRequests that name it.
MQTT_CLIENT_SIGNER = f"{DOMAIN}/mqtt-client"
# Where every kubelet renews its node's Lease.
NODE_LEASE_NAMESPACE = "kube-node-lease"
# Harvester's maintenance mode (its node controller): "running" while it live-migrates the
# node's VMs away, "completed" once none is left; the node is cordoned throughout.
MAINTAIN_STATUS_ANNOTATION = "harvesterhci.io/maintain-status"
MAINTAIN_STATUS_COMPLETED = "completed"
# A KubeVirt migration in one of these phases is over (it no longer counts against the limits).
FINAL_MIGRATION_PHASES = frozenset({"Succeeded", "Failed"})


def read_name(values: Mapping[str, str] | None, name: str, legacy: str) -> str | None:
    """`values[name]`, else `values[legacy]` (a release before our own domain wrote it), else
    None. The new name wins when both are present: it is the one operators are told to set."""
    if not values:
        return None
    value = values.get(name)
    return values.get(legacy) if value is None else value


def read_state_annotation(annotations: Mapping[str, str] | None) -> str | None:
    """The node's state annotation, under our name or the legacy one. We write both in one
    request, so they differ only when something wrote one of them after us: a release that
    writes only the legacy name (a rollback), or an administrator by hand. The legacy one
    then wins when present: it is the only one a rollback writes."""
    if not annotations:
        return None
    legacy = annotations.get(LEGACY_STATE_ANNOTATION)
    return annotations.get(STATE_ANNOTATION) if legacy is None else legacy
