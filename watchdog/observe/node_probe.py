"""The agent's view of the API: can it reach the API server, and what phase does its Node show.

The agent uses this to decide whether API contact still counts as contact (DESIGN §5): it does
only while the controller has not marked this node down. One GET of one Node per check.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from urllib.parse import quote

from watchdog.decide import bounded_json
from watchdog.decide.names import NODE_LEASE_NAMESPACE, read_state_annotation
from watchdog.decide.state import (
    DOWN_PHASES,
    MAX_ANNOTATION_BYTES,
    UNREADABLE,
    Phase,
)
from watchdog.transport.kube import KubeApi
from watchdog.transport.kube_errors import NotFound

HEALTHY = "Healthy"
KNOWN_PHASES = frozenset(p.value for p in Phase)


def node_phase_probe(
    api: KubeApi, node: str, boot_id: Callable[[], str]
) -> Callable[[], Awaitable[str | None]]:
    """A probe returning this node's persisted phase ("Healthy" when none is recorded).

    A phase recorded about an earlier boot of this machine is not about us: the VMs it was
    about died with that boot, so it reads as "Healthy" (otherwise a rebooted node would fence
    itself again at every boot and never come back). Raises a `KubeError` when the API
    cannot be reached: that is not contact.
    """
    path = f"/api/v1/nodes/{quote(node, safe='')}"

    async def probe() -> str | None:
        # A quorum read (no resourceVersion): what etcd holds now. A watch-cache read
        # (resourceVersion=0) can lag the API server the controller writes through, so it
        # would count as contact an answer that misses the controller's declaration. The
        # agent asks every api_check_interval_s only while the broker does not answer.
        obj = await api.request("GET", path)
        annotations = (obj.get("metadata") or {}).get("annotations") or {}
        info = (obj.get("status") or {}).get("nodeInfo") or {}
        kubelet_boot = info.get("bootID") if isinstance(info, dict) else None
        return phase_for_boot(
            read_state_annotation(annotations),
            boot_id(),
            kubelet_boot if isinstance(kubelet_boot, str) else None,
        )

    return probe


def node_lease_probe(api: KubeApi, node: str) -> Callable[[], Awaitable[float | None]]:
    """A probe returning when this node's kubelet last renewed its Lease (`spec.renewTime`,
    Unix time on this machine's clock, which the kubelet stamps); None when it has no Lease.
    A quorum read, like the Node's: a renewal the agent counts on must be in etcd."""
    path = (
        f"/apis/coordination.k8s.io/v1/namespaces/{NODE_LEASE_NAMESPACE}/leases/"
        f"{quote(node, safe='')}"
    )

    async def probe() -> float | None:
        try:
            obj = await api.request("GET", path)
        except NotFound:
            return None
        return renew_time(obj)

    return probe


def renew_time(lease: object) -> float | None:
    """`spec.renewTime` of a Lease as Unix time; None when absent or not a time."""
    spec = lease.get("spec") if isinstance(lease, dict) else None
    value = spec.get("renewTime") if isinstance(spec, dict) else None
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        stamp = datetime.fromisoformat(value)
    except ValueError:
        return None
    return stamp.timestamp() if stamp.tzinfo is not None else None


def phase_for_boot(annotation: str | None, boot_id: str, kubelet_boot_id: str | None) -> str:
    """The phase to act on. A declaration that this node is down is acted on only when it
    names this boot and the kubelet reports this boot too (`status.nodeInfo.bootID`); one
    that names no boot, or that the kubelet's boot contradicts, is UNREADABLE: neither a
    reason to fence at once nor contact (the agent then fences at its own deadline, which the
    controller's safe delay covers)."""
    if not annotation:
        return HEALTHY
    try:
        doc = bounded_json.loads(annotation, max_bytes=MAX_ANNOTATION_BYTES, what="annotation")
    except bounded_json.JsonRefused:
        return UNREADABLE
    if not isinstance(doc, dict):
        return UNREADABLE
    phase, recorded_boot = doc.get("phase"), doc.get("bootID")
    if not isinstance(phase, str):
        return UNREADABLE
    if phase not in KNOWN_PHASES:
        return UNREADABLE  # e.g. a phase of a newer controller: not ours to read as contact
    if isinstance(recorded_boot, str) and recorded_boot != boot_id:
        return HEALTHY
    if phase in DOWN_PHASES and (recorded_boot != boot_id or kubelet_boot_id != boot_id):
        return UNREADABLE
    return phase
