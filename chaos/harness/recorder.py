"""What the API said, and when: node conditions, the watchdog's phases, taints, launcher pods.

Owns: handlers on Node and Pod informers (the simulator's own, or ones the harness starts against
a real cluster) that stamp every change that matters for a failover with `time.monotonic()`, as
it was seen through a watch, and turn the interesting ones into human lines for live progress.
A run asks afterwards "when did X first happen after t" instead of sampling and hoping.

Must not: judge (measure.py does) or write to the cluster.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from chaos.sim.informer import Informer, Obj, condition
from chaos.sim.kubelet import is_launcher, is_migration_target, vm_of
from watchdog.decide.names import read_state_annotation

OUT_OF_SERVICE = "node.kubernetes.io/out-of-service"
DRAIN = "kubevirt.io/drain"
TAINTS = (OUT_OF_SERVICE, DRAIN)
# Watchdog phases that mean "this node is down/degraded and I am acting on it".
WATCHDOG_DETECTED = frozenset({"Unreachable", "Fencing", "Resetting", "Reset", "Degraded"})


def watchdog_phase(node: Obj | None) -> str:
    if node is None:
        return "Healthy"
    raw = read_state_annotation(node["metadata"].get("annotations"))
    if not raw:
        return "Healthy"
    try:
        return str(json.loads(raw).get("phase", "Healthy"))
    except (ValueError, AttributeError):
        return "?"


def ready_status(node: Obj | None) -> str:
    cond = condition(node, "Ready") if node is not None else None
    return str(cond.get("status")) if cond else "-"


def taints_of(node: Obj | None) -> set[str]:
    return {
        t.get("key", "")
        for t in ((node or {}).get("spec", {}).get("taints") or ())
        if t.get("key") in TAINTS
    }


@dataclass
class NodeChange:
    t: float
    node: str
    kind: str  # "ready", "phase", "taint+", "taint-"
    value: str


@dataclass
class PodRecord:
    uid: str
    key: str
    node: str
    vm: str | None
    first_seen: float
    migration_target: bool = False  # a live migration's target pod, not the VM's own
    phase: str = ""
    terminating_at: float | None = None
    not_ready_at: float | None = None
    deleted_at: float | None = None
    phase_at_delete: str | None = None


Line = Callable[[str], None]


@dataclass
class Recorder:
    """Attach to informers with `attach(nodes, pods)`; `on_line` receives progress lines."""

    on_line: Line | None = None
    nodes: list[NodeChange] = field(default_factory=list)
    pods: dict[str, PodRecord] = field(default_factory=dict)  # uid → record
    clock: Callable[[], float] = time.monotonic
    quiet_until: float = 0.0  # no lines before this (startup noise)

    def attach(self, nodes: Informer, pods: Informer) -> None:
        for obj in nodes.values():
            self._on_node(obj["metadata"]["name"], obj, None, announce=False)
        for key, obj in list(pods.items.items()):
            self._on_pod(key, obj, None)
        nodes.add_handler(lambda k, n, o: self._on_node(k, n, o))
        pods.add_handler(self._on_pod)

    def _say(self, line: str) -> None:
        if self.on_line is not None and self.clock() >= self.quiet_until:
            self.on_line(line)

    # --- handlers ------------------------------------------------------------------------------

    def _on_node(self, key: str, new: Obj | None, old: Obj | None, announce: bool = True) -> None:
        if new is None:
            return
        now = self.clock()
        name = new["metadata"]["name"]
        r_new, r_old = ready_status(new), ready_status(old) if old is not None else None
        if r_new != r_old:
            self.nodes.append(NodeChange(now, name, "ready", r_new))
            if announce and r_old is not None:
                self._say(f"{name} Ready={r_new}")
        p_new, p_old = watchdog_phase(new), watchdog_phase(old) if old is not None else None
        if p_new != p_old:
            self.nodes.append(NodeChange(now, name, "phase", p_new))
            if announce and p_old is not None:
                self._say(f"{name} watchdog phase {p_old} → {p_new}")
        t_new, t_old = taints_of(new), taints_of(old) if old is not None else set()
        for t in sorted(t_new - t_old):
            self.nodes.append(NodeChange(now, name, "taint+", t))
            if announce:
                self._say(f"{name} tainted {t}")
        for t in sorted(t_old - t_new):
            self.nodes.append(NodeChange(now, name, "taint-", t))
            if announce:
                self._say(f"{name} taint {t} removed")

    def _on_pod(self, key: str, new: Obj | None, old: Obj | None) -> None:
        obj = new or old
        if obj is None or not is_launcher(obj):
            return
        now = self.clock()
        meta = obj["metadata"]
        uid = meta.get("uid", key)
        rec = self.pods.get(uid)
        if rec is None:
            rec = PodRecord(
                uid=uid,
                key=key,
                node=obj.get("spec", {}).get("nodeName") or "",
                vm=vm_of(obj),
                first_seen=now,
                migration_target=is_migration_target(obj),
            )
            self.pods[uid] = rec
        if not rec.node:
            rec.node = obj.get("spec", {}).get("nodeName") or ""
        if new is not None:
            rec.phase = (new.get("status") or {}).get("phase") or rec.phase
            if rec.terminating_at is None and new["metadata"].get("deletionTimestamp"):
                rec.terminating_at = now
            ready = condition(new, "Ready")
            if (
                rec.not_ready_at is None
                and old is not None
                and ready_status_of(old) == "True"
                and ready is not None
                and ready.get("status") == "False"
            ):
                rec.not_ready_at = now
        else:
            rec.deleted_at = now
            rec.phase_at_delete = rec.phase
            if rec.phase == "Running" and not rec.migration_target:
                vm = (rec.vm or "?").split("/", 1)[-1]
                self._say(f"{vm}: launcher pod on {rec.node or '?'} deleted (reset)")

    # --- queries -------------------------------------------------------------------------------

    def first(
        self, node: str, kind: str, values: frozenset[str] | set[str] | None, after: float
    ) -> float | None:
        for c in self.nodes:
            if c.node == node and c.kind == kind and c.t >= after:
                if values is None or c.value in values:
                    return c.t
        return None

    def first_not_ready(self, node: str, after: float) -> float | None:
        for c in self.nodes:
            if c.node == node and c.kind == "ready" and c.t >= after and c.value != "True":
                return c.t
        return None

    def resets(self, after: float) -> list[PodRecord]:
        """Launcher pods of running VMs that vanished from the API after `after` (the target
        pods of live migrations that did not complete are not VMs' own pods: not counted)."""
        return [
            p
            for p in self.pods.values()
            if p.deleted_at is not None
            and p.deleted_at >= after
            and p.phase_at_delete == "Running"
            and not p.migration_target
        ]


def ready_status_of(pod: Obj) -> str | None:
    cond = condition(pod, "Ready")
    return str(cond.get("status")) if cond else None
