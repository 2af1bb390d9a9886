"""chaos/sim/rbac.py picks the shipped RBAC, and only it, out of a rendered deploy/ overlay.

Rendered with the real `kubectl kustomize`; what the test cluster then does with the objects
(apply, token, running the service as the ServiceAccount) is tests/integration/test_rbac_proof.py.
"""

from __future__ import annotations

import re

import pytest

from chaos.sim.cluster import SimConfig
from chaos.sim.rbac import (
    AGENT_ACCOUNT,
    RBAC_KINDS,
    RbacError,
    rbac_objects,
    render,
    service_account,
)

from .test_deploy import require_tool


@pytest.fixture(autouse=True)
def _kubectl() -> None:
    # Locally a missing kubectl skips; in CI (CI=true) it fails, like every other tool here.
    require_tool("kubectl", "the control-plane cache or a kubectl binary on PATH")


@pytest.mark.parametrize(
    ("overlay", "namespace", "cluster_roles"),
    [
        ("kubevirt", "node-watchdog", {"node-watchdog", "node-watchdog-agent"}),
        ("harvester", "harvester-system", {"node-watchdog", "node-watchdog-agent"}),
        (
            "kubevirt+delete-volume-attachments",
            "node-watchdog",
            {"node-watchdog", "node-watchdog-agent", "node-watchdog-volume-attachments"},
        ),
    ],
)
def test_only_the_rbac_objects_of_an_overlay_are_picked_accounts_and_roles_first(
    overlay: str, namespace: str, cluster_roles: set[str]
) -> None:
    everything = render(overlay)
    objs = rbac_objects(everything)
    assert {o["kind"] for o in everything} - set(RBAC_KINDS)  # a DaemonSet, a broker...
    assert {o["kind"] for o in objs} == set(RBAC_KINDS)
    kinds = [RBAC_KINDS.index(o["kind"]) for o in objs]
    assert kinds == sorted(kinds)
    assert service_account(objs) == (namespace, "node-watchdog")
    assert service_account(objs, AGENT_ACCOUNT) == (namespace, "node-watchdog-agent")
    assert {o["metadata"]["name"] for o in objs if o["kind"] == "ClusterRole"} == cluster_roles
    # The node Lease reader stays in kube-node-lease; the leader Role follows the overlay.
    assert {o["metadata"].get("namespace") for o in objs if o["kind"] == "Role"} == {
        "kube-node-lease",
        namespace,
    }


def test_an_unknown_overlay_or_component_is_refused_naming_the_field() -> None:
    with pytest.raises(RbacError, match="no kustomization"):
        render("kubevirt+no-such-component")
    with pytest.raises(ValueError, match="rbac_overlay='openshift'"):
        SimConfig(rbac_overlay="openshift").validate()


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        ({"broker": "amqtt", "rbac_overlay": "kubevirt"}, "broker='amqtt'"),
        ({"broker": "mosquitto"}, "rbac_overlay=None"),
        (
            {
                "broker": "mosquitto",
                "rbac_overlay": "kubevirt",
                "agents": True,
                "run_nodes": ("node-1",),
            },
            "run_nodes=",
        ),
    ],
)
def test_the_shipped_broker_in_the_test_cluster_names_what_it_lacks(
    fields: dict[str, object], names: str
) -> None:
    """broker_identity needs the real Mosquitto, the agents' ServiceAccount (their certificate
    requests) and controllers of their own (role `run` would need both listeners)."""
    with pytest.raises(ValueError, match=re.escape(names)):
        SimConfig(broker_identity=True, **fields).validate()  # type: ignore[arg-type]
    SimConfig(broker_identity=True, broker="mosquitto", rbac_overlay="kubevirt").validate()
