"""Writes on the Node object: the state annotation, the `NodeWatchdog` condition and the
out-of-service taint, and the rule every write of a decision stands on (its `Basis`).

Owns: `TaintSpec` (the configured taint) and `NodeWrites`, whose every method is safe to
repeat. Idempotency, per STYLE 6: an existing taint is `already_done`; a 409 on a
resourceVersion precondition means re-read and retry — except for a write that carries its
decision's `Basis` (decide/actions.py): that one is `stale`, because the Node it was decided
on is no longer the one in etcd (unless etcd's Node still shows of ours what the decision saw:
`_still`). `refused` is the same check for the pod and volume writes of a decision, made
before they start.

Must not: decide, read the observers' caches (a sibling layer), or swallow
`asyncio.CancelledError`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from watchdog.actuate.outcome import Outcome, Result, guard
from watchdog.actuate.writer import (
    MERGE_PATCH,
    STRATEGIC_MERGE_PATCH,
    KubeWriter,
    Obj,
    now_rfc3339,
)
from watchdog.decide.actions import (
    Basis,
    PersistState,
    RemoveOutOfServiceTaint,
    TaintOutOfService,
)
from watchdog.decide.names import (
    LEGACY_STATE_ANNOTATION,
    STATE_ANNOTATION,
    read_state_annotation,
)
from watchdog.decide.state import DOWN_PHASES
from watchdog.transport.kube_errors import Conflict, KubeError, NotFound, Stale, TransientError

log = logging.getLogger(__name__)

CONDITION_TYPE = "NodeWatchdog"  # the Node condition that shows our phase
CONDITION_DOWN_PHASES = frozenset(p.value for p in DOWN_PHASES)
_CONFLICT_RETRIES = 8
_CONFLICT_BACKOFF_S = 0.05


@dataclass(frozen=True, slots=True)
class TaintSpec:
    key: str
    value: str
    effect: str

    @classmethod
    def parse(cls, text: str) -> TaintSpec:
        """`key=value:effect` or `key:effect` (kubectl taint's syntax)."""
        key_value, sep, effect = text.rpartition(":")
        if not sep or not key_value or not effect:
            raise ValueError(f"taint {text!r} is not key[=value]:effect")
        key, _, value = key_value.partition("=")
        return cls(key=key, value=value, effect=effect)

    def matches(self, taint: Mapping[str, Any]) -> bool:
        return taint.get("key") == self.key and taint.get("effect") == self.effect

    def __str__(self) -> str:
        return (
            f"{self.key}={self.value}:{self.effect}" if self.value else f"{self.key}:{self.effect}"
        )


def _node_path(name: str) -> str:
    return f"/api/v1/nodes/{quote(name, safe='')}"


def _version(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


class NodeWrites:
    """The Node writes of the actions `PersistState`, `TaintOutOfService` and
    `RemoveOutOfServiceTaint`, and the Node check of a decision's other writes."""

    def __init__(self, writer: KubeWriter, taint: TaintSpec, *, dry_run: bool) -> None:
        self.writer = writer
        self.taint = taint
        self.dry_run = dry_run
        self._condition_warned = False

    async def refused(self, action: str, node: str, basis: Basis) -> Outcome | None:
        """None when etcd's Node (a quorum read) is still the one the decision was made on;
        else the outcome that stops the decision: `stale`, or `failed` when it cannot be read
        (a hold: nothing is written without that proof)."""
        if self.dry_run:
            return None

        async def body() -> Outcome:
            try:
                obj = await self._get_node(node)
            except NotFound as e:
                raise Stale(f"{action} on node {node}: the Node is gone since the decision") from e
            self._still(obj, basis, action, node)
            return Outcome(action, Result.SUCCESS)

        outcome = await guard(action, body, dry_run=self.dry_run, write=False)
        return None if outcome.result is Result.SUCCESS else outcome

    def _shows(self, obj: Obj) -> tuple[str | None, bool]:
        """What a Node shows of ours: the state annotation, and whether our taint is on."""
        annotation = read_state_annotation((obj.get("metadata") or {}).get("annotations"))
        taints = (obj.get("spec") or {}).get("taints") or []
        return annotation or None, any(self.taint.matches(t) for t in taints)

    def _still(self, obj: Obj, basis: Basis, action: str, node: str) -> None:
        """Raise `Stale` unless `obj` (the Node as etcd has it) still carries the decision: at
        the version it was made on, or at a newer one that shows of ours exactly what that
        version showed (only fields of others changed: the kubelet's status, labels), in which
        case the basis moves to it. Our annotation and taint are written only by the leader,
        one evaluation at a time per node, and every attempt is checked against `may_act`:
        a write of another leader or of an administrator always shows here."""
        version = _version(obj)
        if basis.node_version and version == basis.node_version:
            return
        if basis.node_version and basis.expect is not None and self._shows(obj) == basis.expect:
            basis.node_version = version
            # A version our view may show while etcd differs from it by our writes alone.
            basis.written.append(version)
            return
        raise Stale(
            f"{action} on node {node}: the Node changed since the decision (version "
            f"{version}, the decision saw {basis.node_version or 'no Node'})"
        )

    def _moved(
        self, basis: Basis, written: Obj, annotation: str | None, tainted: bool | None
    ) -> None:
        """The basis after a write of ours: its version, and what the Node now shows."""
        basis.node_version = _version(written)
        basis.written.append(basis.node_version)
        if basis.expect is not None:
            basis.expect = (
                basis.expect[0] if annotation is None else annotation,
                basis.expect[1] if tainted is None else tainted,
            )

    async def persist_state(self, action: PersistState, basis: Basis | None = None) -> Outcome:
        """Merge-patch `metadata.annotations[STATE_ANNOTATION]` on the Node; with a `basis`,
        on the Node's version it names only (one request, no read before). Then the Node's
        `NodeWatchdog` condition says the same (see `_write_condition`)."""

        async def body() -> Outcome:
            # Also under the legacy name (a release before our own domain), in the same request:
            # an agent of that release reads only it, and during a rolling upgrade (or a
            # rollback) it must still see its node declared, or it would not fence itself.
            patch: Obj = {
                "metadata": {
                    "annotations": {
                        STATE_ANNOTATION: action.annotation,
                        LEGACY_STATE_ANNOTATION: action.annotation,
                    }
                }
            }
            if basis is not None:
                await self._patch_on(basis, action, patch)
                await self._write_condition(action, basis)
                return Outcome("persist_state", Result.SUCCESS, action.annotation)
            node = await self._get_node(action.node)
            annotations = node.get("metadata", {}).get("annotations") or {}
            current = annotations.get(STATE_ANNOTATION)
            if current == action.annotation == annotations.get(LEGACY_STATE_ANNOTATION):
                return Outcome("persist_state", Result.ALREADY_DONE, "annotation unchanged")
            await self.writer.call(
                "PATCH",
                _node_path(action.node),
                body=patch,
                content_type=MERGE_PATCH,
                what=f"persist state on node {action.node}",
            )
            await self._write_condition(action, None)
            return Outcome("persist_state", Result.SUCCESS, action.annotation)

        return await guard("persist_state", body, dry_run=self.dry_run)

    async def _write_condition(self, action: PersistState, basis: Basis | None) -> None:
        """The `NodeWatchdog` condition in the Node's status: True while the watchdog holds the
        node down (Unreachable, Fencing, Resetting, Reset), reason = the phase, for
        `kubectl describe node`. Informational only: nothing reads it back, it is not guarded
        (a node's kubelet may write its own Node's status), and a failed write is logged, not
        retried (the annotation is the record; the next change writes the condition again).
        With a basis it is written on the basis's version too and moves it."""
        try:
            doc = json.loads(action.annotation)
            phase, reason = str(doc["phase"]), str(doc.get("reason", ""))
        except (ValueError, KeyError, TypeError):
            return
        condition = {
            "type": CONDITION_TYPE,
            "status": "True" if phase in CONDITION_DOWN_PHASES else "False",
            "reason": phase,
            "message": f"{phase}: {reason} (node-watchdog)",
            "lastTransitionTime": now_rfc3339(),  # written at each change of phase
        }
        patch: Obj = {"status": {"conditions": [condition]}}
        if basis is not None and basis.node_version:
            patch["metadata"] = {"resourceVersion": basis.node_version}
        try:
            written = await self.writer.call(
                "PATCH",
                _node_path(action.node) + "/status",
                body=patch,
                content_type=STRATEGIC_MERGE_PATCH,
                what=f"NodeWatchdog condition on node {action.node}",
            )
        except KubeError as e:
            # A conflict: someone wrote the Node after our annotation; the chain's next Node
            # write says so. A refusal (e.g. RBAC of an older release without nodes/status):
            # said once.
            if not isinstance(e, Conflict) and not self._condition_warned:
                self._condition_warned = True
                log.warning("the NodeWatchdog condition is not written: %s", e)
            return
        if basis is not None and basis.node_version:
            self._moved(basis, written, None, None)

    async def _patch_on(self, basis: Basis, action: PersistState, patch: Obj) -> None:
        """The state annotation, merge-patched with `basis.node_version` as precondition; on a
        409 the Node is read again and the write retried only if it still carries the decision
        (`_still`), else `Stale`. Moves the basis to the version written."""
        node, what = action.node, f"persist state on node {action.node}"
        for _ in range(_CONFLICT_RETRIES):
            if not basis.node_version:
                raise Stale(f"{what}: no Node in the view the decision was made from")
            patch["metadata"]["resourceVersion"] = basis.node_version
            try:
                written = await self.writer.call(
                    "PATCH", _node_path(node), body=patch, content_type=MERGE_PATCH, what=what
                )
            except Conflict:
                try:
                    obj = await self._get_node(node)
                except NotFound as e:
                    raise Stale(f"{what}: the Node is gone since the decision") from e
                self._still(obj, basis, "persist state", node)
                continue
            self._moved(basis, written, action.annotation, None)
            return
        raise TransientError(f"{what}: {_CONFLICT_RETRIES} conflicts in a row")

    async def taint_out_of_service(
        self, action: TaintOutOfService, basis: Basis | None = None
    ) -> Outcome:
        """Add the configured out-of-service taint (existing taint with key+effect: done)."""

        def add(taints: list[Obj]) -> list[Obj] | None:
            if any(self.taint.matches(t) for t in taints):
                return None
            new: Obj = {"key": self.taint.key, "effect": self.taint.effect}
            if self.taint.value:
                new["value"] = self.taint.value
            if self.taint.effect == "NoExecute":
                new["timeAdded"] = now_rfc3339()
            return [*taints, new]

        return await guard(
            "taint_out_of_service",
            lambda: self._edit_taints("taint_out_of_service", action.node, add, basis=basis),
            dry_run=self.dry_run,
        )

    async def remove_out_of_service_taint(
        self, action: RemoveOutOfServiceTaint, basis: Basis | None = None
    ) -> Outcome:
        """Remove the configured out-of-service taint (absent taint or node: done)."""

        def remove(taints: list[Obj]) -> list[Obj] | None:
            kept = [t for t in taints if not self.taint.matches(t)]
            return None if len(kept) == len(taints) else kept

        return await guard(
            "remove_out_of_service_taint",
            lambda: self._edit_taints(
                "remove_out_of_service_taint", action.node, remove, missing_ok=True, basis=basis
            ),
            dry_run=self.dry_run,
        )

    async def _edit_taints(
        self,
        name: str,
        node: str,
        edit: Callable[[list[Obj]], list[Obj] | None],
        *,
        missing_ok: bool = False,
        basis: Basis | None = None,
    ) -> Outcome:
        """Read-modify-write of spec.taints with the read resourceVersion as precondition:
        a 409 means someone else changed the node in between, so read again. With a `basis`,
        each read must still carry the decision (`_still`, else `Stale`)."""
        for attempt in range(1, _CONFLICT_RETRIES + 1):
            try:
                obj = await self._get_node(node)
            except NotFound:
                if missing_ok:
                    return Outcome(name, Result.ALREADY_DONE, f"node {node} does not exist")
                raise
            if basis is not None:
                self._still(obj, basis, name, node)
            taints = list(obj.get("spec", {}).get("taints") or [])
            new = edit(taints)
            if new is None:
                return Outcome(name, Result.ALREADY_DONE, f"{self.taint} already as wanted")
            patch = {
                "metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]},
                # A JSON merge patch replaces the whole list: exactly what we read, edited.
                "spec": {"taints": new},
            }
            try:
                written = await self.writer.call(
                    "PATCH",
                    _node_path(node),
                    body=patch,
                    content_type=MERGE_PATCH,
                    what=f"{name} {self.taint} on node {node}",
                )
            except Conflict:
                log.debug(
                    "%s on %s: conflict (attempt %d/%d), re-reading",
                    name,
                    node,
                    attempt,
                    _CONFLICT_RETRIES,
                )
                # Jitter, so contenders that collided do not collide again in lockstep.
                await asyncio.sleep(random.uniform(0, _CONFLICT_BACKOFF_S * attempt))
                continue
            if basis is not None:
                self._moved(basis, written, None, any(self.taint.matches(t) for t in new))
            return Outcome(name, Result.SUCCESS, f"{self.taint} on node {node}")
        raise TransientError(f"{name} on node {node}: {_CONFLICT_RETRIES} conflicts in a row")

    async def _get_node(self, node: str) -> Obj:
        return await self.writer.call("GET", _node_path(node), what=f"get node {node}")


__all__ = ["CONDITION_TYPE", "NodeWrites", "TaintSpec"]
