"""`node-watchdog status`: what the watchdog says about every node, where an operator looks.

Owns: reading the Nodes (their Ready condition, our state annotation, our out-of-service taint)
and the leader Lease through the API, and optionally the leader's `/metrics` (heartbeat age per
node, when each node being fenced may be reset, the holds in force); one row per node, as a
table or as JSON (`--json`).

The Node is the record a new leader resumes from, so the phase shown is the one the cluster
would act on; the leader's memory may be a moment ahead (its next write). Heartbeat ages and
reset times exist only in the leader's memory: they need `--metrics-url`.

Must not: write anything.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from watchdog.actuate.node_writes import TaintSpec
from watchdog.decide.names import read_state_annotation
from watchdog.decide.reasons import Reason
from watchdog.decide.state import NodeState, Phase
from watchdog.runtime.settings import Settings
from watchdog.transport.http_client import HttpError, get_text
from watchdog.transport.kube import ConfigError, KubeApi, load_api_client
from watchdog.transport.kube_errors import KubeError

NODE_LEASE_API = "/apis/coordination.k8s.io/v1"


@dataclass
class NodeRow:
    node: str
    ready: str  # the kubelet's Ready condition: True, False, Unknown, or "-" (none)
    phase: str  # ours, from the Node's state annotation ("Healthy" when it has none)
    reason: str
    fence: str  # what its agent declared: "armed+device", "armed (weak)", "unarmed", "-"
    tainted: bool  # our out-of-service taint is on the Node
    heartbeat_age_s: float | None = None  # from the leader's metrics
    reset_in_s: float | None = None  # from the leader's metrics: when its VMs may be reset


@dataclass
class Status:
    leader: str | None  # the leader Lease's holder
    leader_renewed_age_s: float | None
    nodes: list[NodeRow]
    holds: dict[str, float] = field(default_factory=dict)  # from the leader's metrics
    metrics_error: str | None = None


def node_row(node: Mapping[str, Any], taint_key: str) -> NodeRow:
    meta = node.get("metadata") or {}
    name = str(meta.get("name", ""))
    conditions = (node.get("status") or {}).get("conditions") or []
    ready = next((c.get("status") for c in conditions if c.get("type") == "Ready"), None)
    annotation = read_state_annotation(meta.get("annotations"))
    state = NodeState.from_annotation(name, annotation, 0.0)
    fence = "-"
    if state.fence is not None:
        fence = "unarmed"
        if state.fence.armed:
            fence = "armed+device" if state.fence.device else "armed (weak)"
    taints = (node.get("spec") or {}).get("taints") or []
    reason = state.reason.value if annotation else "-"  # nothing recorded yet
    if annotation and state.reason is Reason.RESUMED and not _readable(annotation):
        reason = "unreadable annotation"
    return NodeRow(
        node=name,
        ready=str(ready) if ready else "-",
        phase=state.phase.value,
        reason=reason,
        fence=fence,
        tainted=any(t.get("key") == taint_key for t in taints),
    )


def _readable(annotation: str) -> bool:
    try:
        Phase(json.loads(annotation)["phase"])
    except (ValueError, KeyError, TypeError):
        return False
    return True


def apply_metrics(status: Status, text: str, now_wall: float) -> None:
    """Heartbeat ages, reset times and holds from the leader's `/metrics` exposition."""
    rows = {r.node: r for r in status.nodes}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            node = s.labels.get("node")
            if s.name == "watchdog_heartbeat_age_seconds" and node in rows:
                rows[node].heartbeat_age_s = s.value
            elif s.name == "watchdog_reset_not_before_timestamp_seconds" and node in rows:
                rows[node].reset_in_s = max(0.0, s.value - now_wall)
            elif s.name == "watchdog_nodes_held" and s.value > 0:
                status.holds[s.labels.get("reason", "?")] = s.value


async def collect(settings: Settings, metrics_url: str | None = None) -> Status:
    api = KubeApi.from_settings(await load_api_client(), settings)
    try:
        nodes = await api.request("GET", "/api/v1/nodes")
        lease_path = (
            f"{NODE_LEASE_API}/namespaces/{settings.namespace}/leases/{settings.leader.lease_name}"
        )
        try:
            lease = await api.request("GET", lease_path)
        except KubeError:  # no leader yet, or not allowed to read it: shown as "-"
            lease = {}
    finally:
        await api.close()
    taint_key = TaintSpec.parse(settings.out_of_service_taint).key
    rows = sorted((node_row(n, taint_key) for n in nodes.get("items") or ()), key=lambda r: r.node)
    spec = lease.get("spec") or {}
    renewed = spec.get("renewTime")
    age = None
    if isinstance(renewed, str):
        at = datetime.fromisoformat(renewed.replace("Z", "+00:00"))
        age = max(0.0, (datetime.now(UTC) - at).total_seconds())
    status = Status(spec.get("holderIdentity"), age, rows)
    if metrics_url:
        try:
            code, text = await get_text(metrics_url, settings.api_request_timeout_s)
            if code >= 300:
                raise HttpError(f"HTTP {code}")
            apply_metrics(status, text, time.time())
        except (HttpError, ValueError) as e:
            status.metrics_error = f"{metrics_url}: {type(e).__name__}: {e}"
    return status


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def render_table(status: Status) -> str:
    leader = status.leader or "-"
    if status.leader_renewed_age_s is not None:
        leader += f" (renewed {status.leader_renewed_age_s:.1f}s ago)"
    lines = [f"leader: {leader}"]
    if status.holds:
        held = ", ".join(f"{r} ({int(n)} nodes)" for r, n in sorted(status.holds.items()))
        lines.append(f"resets held: {held}")
    if status.metrics_error:
        lines.append(f"metrics not read: {status.metrics_error}")
    header = ("NODE", "READY", "PHASE", "REASON", "FENCE", "TAINTED", "HEARTBEAT", "RESET IN")
    table = [header] + [
        (
            r.node,
            r.ready,
            r.phase,
            r.reason,
            r.fence,
            "yes" if r.tainted else "no",
            _seconds(r.heartbeat_age_s),
            _seconds(r.reset_in_s),
        )
        for r in status.nodes
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def main(settings: Settings, metrics_url: str | None, as_json: bool) -> int:
    """0 with the status printed; 1 when the API server cannot be read (said why)."""
    try:
        status = asyncio.run(collect(settings, metrics_url))
    except (ConfigError, KubeError) as e:
        print(f"error: cannot read the cluster: {e}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(asdict(status), indent=2, sort_keys=True))
    else:
        print(render_table(status))
    return 0


__all__ = ["NodeRow", "Status", "apply_metrics", "collect", "main", "node_row", "render_table"]
