"""Ground truth: where every VM's process really runs, over time.

Owns: the record of VM copies (one per launcher pod whose domain runs on a simulated machine),
fed ONLY by the simulated node runtimes — a start when a kubelet starts a launcher pod's domain,
a stop when the domain stops (power-off, fence, kubelet killing the pod), an atomic move at a
live-migration handover — and the figures computed from it. It never reads the API and never
hears the watchdog's opinion: the API can say a pod is Running on a machine that is off, and a
partitioned machine keeps running VMs the API has already rescheduled. The ledger is what was.

Definitions (the numbers a chaos report quotes):

- copy: one running instance of a VM's domain, on one node, in one launcher pod.
- `split_brain_s`: VM-seconds with two or more copies running at once, summed over VMs
  (a VM with 2 copies for 3 s adds 3, not 6). A move at migration handover is atomic and never
  counts.
- `lost`: VMs whose runStrategy is `Always` or `RerunOnFailure` that run nowhere *now*. A VM
  that was never started yet counts too, so read it once the cluster is ready.
- `running`: VMs with at least one copy running now.
- `downtime_s` (per VM): seconds with no copy running since the VM's first start.
- `false_resets`: copies stopped because their launcher pod object vanished from the API without
  the kubelet's graceful termination (a force delete, grace 0) while the machine running them was
  healthy: powered on, kubelet running and connected, network up — i.e. the kubelet saw the
  deletion at once and killed a VM that had nothing wrong with it. A copy stopped by power-off or
  fence is not one; nor is a stale copy a kubelet reaps after a partition heals or after it
  restarts (the pod object was deleted while the node was cut off: that VM already counted in
  `split_brain_s` if it was restarted elsewhere). Those are stopped with reason `reaped`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

RESTARTING_STRATEGIES = frozenset({"Always", "RerunOnFailure"})


class StartReason(StrEnum):
    STARTED = "started"  # kubelet started the launcher pod, virt-handler the domain
    MIGRATED_IN = "migrated-in"  # handover of a live migration


class StopReason(StrEnum):
    POWEROFF = "poweroff"  # the machine lost power (or rebooted)
    FENCED = "fenced"  # the node's agent fenced it
    DELETED = "deleted"  # kubelet finished a graceful deletion of the pod
    FORCE_DELETED = "force-deleted"  # the pod object vanished (grace 0) under a live kubelet
    REAPED = "reaped"  # kubelet found the pod gone after a partition/restart
    MIGRATED_AWAY = "migrated-away"  # handover of a live migration
    FAILED = "failed"  # the domain ended on its own (not used by faults yet)


@dataclass
class Copy:
    vm: str
    node: str
    pod_uid: str
    boot_id: str
    start_reason: StartReason
    started_mono: float
    started_wall: float
    stop_reason: StopReason | None = None
    stopped_mono: float | None = None
    stopped_wall: float | None = None
    false_reset: bool = False

    @property
    def running(self) -> bool:
        return self.stopped_mono is None

    def to_json(self, t0: float) -> dict[str, Any]:
        return {
            "node": self.node,
            "pod_uid": self.pod_uid,
            "boot_id": self.boot_id,
            "start_reason": str(self.start_reason),
            "started_at": _iso(self.started_wall),
            "started_t": round(self.started_mono - t0, 3),
            "stop_reason": str(self.stop_reason) if self.stop_reason else None,
            "stopped_at": _iso(self.stopped_wall) if self.stopped_wall else None,
            "stopped_t": round(self.stopped_mono - t0, 3) if self.stopped_mono else None,
            "false_reset": self.false_reset,
        }


@dataclass
class VmRecord:
    key: str
    run_strategy: str = "RerunOnFailure"
    deleted: bool = False
    copies: list[Copy] = field(default_factory=list)
    running: dict[str, Copy] = field(default_factory=dict)  # pod uid → copy
    split_brain_s: float = 0.0
    split_since: float | None = None  # mono time the copy count reached 2
    downtime_s: float = 0.0
    down_since: float | None = None  # mono time the copy count fell to 0 (after a first start)

    def nodes(self) -> list[str]:
        return sorted(c.node for c in self.running.values())


def _iso(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1000):03d}Z"


class Ledger:
    """Where VMs run. Synchronous and cheap; the event loop is its only writer."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.t0 = clock()
        self.t0_wall = time.time()
        self.vms: dict[str, VmRecord] = {}
        self._changed = asyncio.Event()

    # --- desired state (which VMs exist and how they should run) -------------------------------

    def register_vm(self, vm: str, run_strategy: str) -> None:
        rec = self.vms.setdefault(vm, VmRecord(vm))
        rec.run_strategy = run_strategy
        rec.deleted = False
        self._notify()

    def forget_vm(self, vm: str) -> None:
        """The VM object was deleted: it can no longer be lost."""
        rec = self.vms.get(vm)
        if rec is not None:
            rec.deleted = True
            self._notify()

    # --- facts from the node runtimes ----------------------------------------------------------

    def start(
        self,
        vm: str,
        node: str,
        pod_uid: str,
        boot_id: str,
        reason: StartReason = StartReason.STARTED,
    ) -> Copy:
        now = self._clock()
        rec = self.vms.setdefault(vm, VmRecord(vm))
        existing = rec.running.get(pod_uid)
        if existing is not None:
            return existing
        self._account(rec, now)
        copy = Copy(vm, node, pod_uid, boot_id, reason, now, time.time())
        rec.copies.append(copy)
        rec.running[pod_uid] = copy
        self._reset_marks(rec, now)
        self._notify()
        return copy

    def stop(
        self, vm: str, pod_uid: str, reason: StopReason, *, false_reset: bool = False
    ) -> Copy | None:
        rec = self.vms.get(vm)
        copy = rec.running.get(pod_uid) if rec else None
        if rec is None or copy is None:
            return None
        now = self._clock()
        self._account(rec, now)
        del rec.running[pod_uid]
        copy.stop_reason = reason
        copy.stopped_mono = now
        copy.stopped_wall = time.time()
        copy.false_reset = false_reset
        self._reset_marks(rec, now)
        self._notify()
        return copy

    def move(
        self, vm: str, from_pod_uid: str, to_node: str, to_pod_uid: str, boot_id: str
    ) -> Copy | None:
        """Live-migration handover: the source copy ends and the target begins at one instant."""
        rec = self.vms.get(vm)
        source = rec.running.get(from_pod_uid) if rec else None
        if rec is None or source is None:
            return None
        now = self._clock()
        wall = time.time()
        self._account(rec, now)
        del rec.running[from_pod_uid]
        source.stop_reason = StopReason.MIGRATED_AWAY
        source.stopped_mono = now
        source.stopped_wall = wall
        target = Copy(vm, to_node, to_pod_uid, boot_id, StartReason.MIGRATED_IN, now, wall)
        rec.copies.append(target)
        rec.running[to_pod_uid] = target
        self._reset_marks(rec, now)
        self._notify()
        return target

    # --- accounting ----------------------------------------------------------------------------

    def _account(self, rec: VmRecord, now: float) -> None:
        """Close the open intervals (split-brain, downtime) up to `now` before a change."""
        if rec.split_since is not None:
            rec.split_brain_s += now - rec.split_since
            rec.split_since = None
        if rec.down_since is not None:
            rec.downtime_s += now - rec.down_since
            rec.down_since = None

    def _reset_marks(self, rec: VmRecord, now: float) -> None:
        n = len(rec.running)
        if n >= 2:
            rec.split_since = now
        elif n == 0 and rec.copies:
            rec.down_since = now

    def _split_s(self, rec: VmRecord, now: float) -> float:
        return rec.split_brain_s + (now - rec.split_since if rec.split_since is not None else 0)

    def _down_s(self, rec: VmRecord, now: float) -> float:
        return rec.downtime_s + (now - rec.down_since if rec.down_since is not None else 0)

    # --- queries -------------------------------------------------------------------------------

    def running_on(self, vm: str) -> list[str]:
        rec = self.vms.get(vm)
        return rec.nodes() if rec else []

    def copies_on(self, node: str) -> list[Copy]:
        return [c for rec in self.vms.values() for c in rec.running.values() if c.node == node]

    def split_brain_seconds(self) -> float:
        now = self._clock()
        return sum(self._split_s(rec, now) for rec in self.vms.values())

    def split_brain_vms(self) -> list[str]:
        """VMs with two or more copies running now."""
        return sorted(k for k, rec in self.vms.items() if len(rec.running) >= 2)

    def lost(self) -> list[str]:
        return sorted(
            k
            for k, rec in self.vms.items()
            if not rec.deleted and rec.run_strategy in RESTARTING_STRATEGIES and not rec.running
        )

    def running(self) -> list[str]:
        return sorted(k for k, rec in self.vms.items() if rec.running)

    def false_resets(self) -> list[Copy]:
        return [c for rec in self.vms.values() for c in rec.copies if c.false_reset]

    def totals(self) -> dict[str, Any]:
        now = self._clock()
        return {
            "vms": sum(1 for r in self.vms.values() if not r.deleted),
            "running": len(self.running()),
            "lost": len(self.lost()),
            "split_brain_s": round(sum(self._split_s(r, now) for r in self.vms.values()), 3),
            "split_brain_now": len(self.split_brain_vms()),
            "max_copies": max((len(r.running) for r in self.vms.values()), default=0),
            "false_resets": len(self.false_resets()),
        }

    def snapshot(self, *, history: bool = True) -> dict[str, Any]:
        """Everything, JSON-serialisable: totals, lists, and per VM its copies over time."""
        now = self._clock()
        vms: dict[str, Any] = {}
        for key in sorted(self.vms):
            rec = self.vms[key]
            entry: dict[str, Any] = {
                "run_strategy": rec.run_strategy,
                "deleted": rec.deleted,
                "running_on": rec.nodes(),
                "copies": len(rec.running),
                "split_brain_s": round(self._split_s(rec, now), 3),
                "downtime_s": round(self._down_s(rec, now), 3),
                "starts": len(rec.copies),
            }
            if history:
                entry["history"] = [c.to_json(self.t0) for c in rec.copies]
            vms[key] = entry
        return {
            "generated_at": _iso(time.time()),
            "started_at": _iso(self.t0_wall),
            "uptime_s": round(now - self.t0, 3),
            "totals": self.totals(),
            "lost": self.lost(),
            "split_brain": self.split_brain_vms(),
            "false_resets": [c.to_json(self.t0) | {"vm": c.vm} for c in self.false_resets()],
            "vms": vms,
        }

    # --- waiting -------------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, predicate: Callable[[Ledger], bool], timeout_s: float) -> None:
        """Return once `predicate(self)` holds; TimeoutError after `timeout_s`."""
        async with asyncio.timeout(timeout_s):
            while not predicate(self):
                await self._changed.wait()
