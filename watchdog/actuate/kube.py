"""Idempotent Kubernetes writes: one method per action of `watchdog.decide.actions`.

Owns: `KubeWriter` (raw JSON requests over the process's kubernetes_asyncio ApiClient, a
timeout on every request, library errors translated into `TransientError` / `PermanentError`,
transient ones retried with tenacity: bounded attempts, jittered exponential backoff,
`Retry-After` honoured on 429, `attempt n/N` logged) and `Actuator`, whose every method is
safe to repeat and returns an `Outcome` whose `result` feeds
`watchdog_actions_total{action,result}`: `success`, `already_done`, `failed`, `stale` or
`dry_run`.

Idempotency, per STYLE 6: an existing taint is `already_done`; a 404 on a delete, or on the pod
to mark, is `already_done`; a 409 on a resourceVersion precondition means re-read and retry —
except for a write that carries its decision's `Basis` (decide/actions.py): that one is `stale`,
because the Node it was decided on is no longer the one in etcd.

Must not: decide (the actions say what to do), read the observers' caches (a sibling layer),
or swallow `asyncio.CancelledError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
import tenacity
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException

from watchdog.actuate.errors import (
    ActuationError,
    Conflict,
    NotFound,
    PermanentError,
    Stale,
    TransientError,
    from_status,
    translate,
)
from watchdog.actuate.event_backlog import EventBacklog, UnwrittenEvent
from watchdog.actuate.events import EventRecorder, ObjectRef, rfc3339_now
from watchdog.actuate.power_fence import PowerFencer
from watchdog.decide.actions import (
    Action,
    Basis,
    DeleteVolumeAttachments,
    EmitEvent,
    EventType,
    ForceDeletePods,
    MarkPodsNotReady,
    PersistState,
    RemoveOutOfServiceTaint,
    RunFenceHook,
    StartEvacuation,
    StopEvacuation,
    TaintOutOfService,
)
from watchdog.decide.config import FenceMode
from watchdog.decide.names import (
    EVACUATION_LABEL,
    EVACUATION_NODE_ANNOTATION,
    FINAL_MIGRATION_PHASES,
    LEGACY_EVACUATION_LABEL,
    LEGACY_STATE_ANNOTATION,
    STATE_ANNOTATION,
    read_state_annotation,
)
from watchdog.decide.state import DOWN_PHASES

log = logging.getLogger(__name__)

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
CONDITION_TYPE = "NodeWatchdog"  # the Node condition that shows our phase
CONDITION_DOWN_PHASES = frozenset(p.value for p in DOWN_PHASES)
NOT_READY_REASON = "NodeUnreachable"
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_CONFLICT_RETRIES = 8
_CONFLICT_BACKOFF_S = 0.05
_PARALLEL_ITEMS = 16

Obj = dict[str, Any]

# The running action's `Basis.may_act`, seen by every request it makes (the per-pod tasks
# inherit it): checked before each attempt, so a retried request stops when leadership does.
_MAY_ACT: ContextVar[Callable[[], bool] | None] = ContextVar("may_act", default=None)


class Result(StrEnum):
    """Label values of `watchdog_actions_total{result}`."""

    SUCCESS = "success"
    ALREADY_DONE = "already_done"
    FAILED = "failed"
    STALE = "stale"  # not written: the decision's Node changed since, or we stopped leading
    DRY_RUN = "dry_run"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one action did. `action` is the metric label (snake_case action name)."""

    action: str
    result: Result
    detail: str = ""
    error: ActuationError | None = None
    items: tuple[tuple[str, Result], ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return self.result not in (Result.FAILED, Result.STALE)


class ActuatorSettings(Protocol):
    """What the actuator reads from the runtime's Settings (structural: actuate must not
    import the runtime layer)."""

    @property
    def out_of_service_taint(self) -> str: ...

    @property
    def api_request_timeout_s(self) -> float: ...

    @property
    def dry_run(self) -> bool: ...

    @property
    def fence_hook_command(self) -> str | None: ...

    @property
    def fence_hook_url(self) -> str | None: ...

    @property
    def fence_hook_timeout_s(self) -> float: ...

    @property
    def fence_mode(self) -> FenceMode: ...

    @property
    def power_fence_inventory(self) -> Path | None: ...


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


# -- transport ---------------------------------------------------------------------------------


class _Wait(tenacity.wait.wait_base):
    """Exponential backoff with "equal jitter" (a random half of each step, so the total wait
    over N attempts is bounded below as well as above), or the server's Retry-After when it
    sent one (bounded)."""

    def __init__(self, initial_s: float, max_s: float, max_retry_after_s: float) -> None:
        self._initial_s = initial_s
        self._max_s = max_s
        self._max_retry_after_s = max_retry_after_s

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        if isinstance(error, ActuationError) and error.retry_after_s is not None:
            return min(error.retry_after_s, self._max_retry_after_s)
        ceiling = min(self._max_s, self._initial_s * 2 ** (retry_state.attempt_number - 1))
        return random.uniform(ceiling / 2, ceiling)


class KubeWriter:
    """Raw JSON requests with our error tiers; `call()` retries transient failures."""

    def __init__(
        self,
        api_client: k8s_client.ApiClient,
        *,
        request_timeout_s: float = 10.0,
        attempts: int = 5,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 5.0,
        max_retry_after_s: float = 30.0,
    ) -> None:
        self.api_client = api_client
        self.request_timeout_s = request_timeout_s
        self.attempts = attempts
        self._wait = _Wait(backoff_initial_s, backoff_max_s, max_retry_after_s)

    async def once(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str = JSON,
        what: str = "",
    ) -> Obj:
        """One attempt. The decoded body on 2xx; else an `ActuationError`."""
        what = what or f"{method} {path}"
        try:
            async with asyncio.timeout(self.request_timeout_s):
                resp = await self.api_client.call_api(
                    path,
                    method,
                    query_params=list((query or {}).items()),
                    header_params={"Content-Type": content_type, "Accept": JSON},
                    body=body,
                    auth_settings=["BearerToken"],
                    _preload_content=False,
                    _request_timeout=self.request_timeout_s,
                )
                async with resp:
                    data = await resp.read()
        except (ApiException, ConfigException, aiohttp.ClientError, TimeoutError, OSError) as e:
            raise translate(e, what) from e
        if resp.status >= 300:
            raise from_status(resp.status, data, resp.headers, what)
        try:
            return json.loads(data) if data else {}
        except ValueError as e:
            raise PermanentError(f"{what}: answer is not JSON", status=resp.status) from e

    async def call(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str = JSON,
        what: str = "",
    ) -> Obj:
        """`once()`, retried on `TransientError` up to `attempts` times."""
        what = what or f"{method} {path}"
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(self.attempts),
            wait=self._wait,
            retry=tenacity.retry_if_exception_type(TransientError),
            before_sleep=self._log_retry(what),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                may_act = _MAY_ACT.get()
                if may_act is not None and not may_act():
                    raise Stale(f"{what}: not sent, this replica no longer leads")
                return await self.once(
                    method, path, query=query, body=body, content_type=content_type, what=what
                )
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    def _log_retry(self, what: str) -> Callable[[tenacity.RetryCallState], None]:
        attempts = self.attempts

        def before_sleep(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome is not None else None
            delay = state.next_action.sleep if state.next_action is not None else 0.0
            log.warning(
                "%s: attempt %d/%d failed (%s); retrying in %.1fs",
                what,
                state.attempt_number,
                attempts,
                error,
                delay,
            )

        return before_sleep


def now_rfc3339() -> str:
    """metav1.Time: seconds precision, UTC."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def evacuation_label_value(node: str) -> str:
    """The evacuation label's value for `node`: the name itself when it is a valid label value
    (up to 63 characters), else a shortened, hashed form (the full name is annotated)."""
    if len(node) <= 63 and _LABEL_VALUE.match(node):
        return node
    digest = hashlib.sha256(node.encode()).hexdigest()[:10]
    head = re.sub(r"[^A-Za-z0-9_.-]", "-", node)[:50].strip("-_.")
    return f"{head}-{digest}" if head else digest


def _pods_path(namespace: str, name: str, sub: str = "") -> str:
    path = f"/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(name, safe='')}"
    return f"{path}/{sub}" if sub else path


def _node_path(name: str) -> str:
    return f"/api/v1/nodes/{quote(name, safe='')}"


def _version(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


def _aggregate(action: str, items: Sequence[tuple[str, Result, ActuationError | None]]) -> Outcome:
    """One Outcome for an action over many objects: stale if leadership ended on the way,
    else failed if any failed, else success if any changed, else already_done."""
    results = tuple((name, result) for name, result, _ in items)
    stale = [e for _, result, e in items if result is Result.STALE]
    if stale:
        return Outcome(action, Result.STALE, str(stale[0]), stale[0], results)
    failures = [(name, e) for name, result, e in items if result is Result.FAILED]
    if failures:
        detail = "; ".join(f"{name}: {e}" for name, e in failures[:5])
        if len(failures) > 5:
            detail += f"; and {len(failures) - 5} more"
        return Outcome(action, Result.FAILED, detail, failures[0][1], results)
    changed = sum(1 for _, r in results if r is Result.SUCCESS)
    if changed:
        return Outcome(
            action, Result.SUCCESS, f"{changed} of {len(results)} changed", None, results
        )
    return Outcome(action, Result.ALREADY_DONE, f"{len(results)} already done", None, results)


# -- the actuator ------------------------------------------------------------------------------


class Actuator:
    """Executes decide's actions against the cluster; every method is idempotent."""

    def __init__(
        self,
        api_client: k8s_client.ApiClient,
        settings: ActuatorSettings,
        *,
        dry_run: bool | None = None,
        attempts: int = 5,
        component: str = "node-watchdog",
        instance: str | None = None,
    ) -> None:
        self.settings = settings
        self.dry_run = settings.dry_run if dry_run is None else dry_run
        self.writer = KubeWriter(
            api_client, request_timeout_s=settings.api_request_timeout_s, attempts=attempts
        )
        self.taint = TaintSpec.parse(settings.out_of_service_taint)
        self.events = EventRecorder(
            self.writer.call,
            component=component,
            instance=instance or os.environ.get("POD_NAME") or socket.gethostname(),
        )
        # Events whose write failed; written again by `event_backlog.run()` (the runtime runs
        # it while this replica leads).
        self.event_backlog = EventBacklog(self._write_late)
        self._condition_warned = False

    # -- dispatch ----------------------------------------------------------------------------

    async def execute(
        self,
        action: Action,
        *,
        claims: Iterable[tuple[str, str]] = (),
        vmis: Iterable[tuple[str, str]] = (),
        basis: Basis | None = None,
    ) -> Outcome:
        """Run one action. `DeleteVolumeAttachments` needs the (namespace, PVC) `claims` of the
        reset pods; `StartEvacuation` the (namespace, name) `vmis` chosen to migrate now.
        With the decision's `basis`, Node writes carry its resourceVersion as precondition,
        pod and volume writes go ahead only while etcd's Node still has it, and nothing is
        sent once `basis.may_act()` says no (`Basis`, decide/actions.py)."""
        if basis is None:
            return await self._dispatch(action, claims, vmis, None)
        token = _MAY_ACT.set(basis.may_act)
        try:
            if isinstance(action, MarkPodsNotReady | ForceDeletePods | DeleteVolumeAttachments):
                refused = await self._refused(type(action).__name__, action.node, basis)
                if refused is not None:
                    return refused
            return await self._dispatch(action, claims, vmis, basis)
        finally:
            _MAY_ACT.reset(token)

    async def _dispatch(
        self,
        action: Action,
        claims: Iterable[tuple[str, str]],
        vmis: Iterable[tuple[str, str]],
        basis: Basis | None,
    ) -> Outcome:
        match action:
            case EmitEvent():
                return await self.emit_event(action)
            case PersistState():
                return await self.persist_state(action, basis)
            case MarkPodsNotReady():
                return await self.mark_pods_not_ready(action)
            case RunFenceHook():
                return await self.run_fence_hook(action)
            case TaintOutOfService():
                return await self.taint_out_of_service(action, basis)
            case ForceDeletePods():
                return await self.force_delete_pods(action)
            case DeleteVolumeAttachments():
                return await self.delete_volume_attachments(action, claims)
            case RemoveOutOfServiceTaint():
                return await self.remove_out_of_service_taint(action, basis)
            case StartEvacuation():
                return await self.start_evacuation(action, vmis)
            case StopEvacuation():
                return await self.stop_evacuation(action)
        raise AssertionError(f"unknown action {action!r}")

    async def _refused(self, action: str, node: str, basis: Basis) -> Outcome | None:
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

        outcome = await self._guard(action, body, write=False)
        return None if outcome.result is Result.SUCCESS else outcome

    async def _guard(
        self, action: str, body: Callable[[], Awaitable[Outcome]], *, write: bool = True
    ) -> Outcome:
        """Dry-run and the error tier → Outcome mapping, in one place."""
        if write and self.dry_run:
            return Outcome(action, Result.DRY_RUN, "dry run: nothing written")
        try:
            return await body()
        except Stale as e:
            log.info("%s not written: %s", action, e)
            return Outcome(action, Result.STALE, str(e), e)
        except ActuationError as e:
            log.warning("%s failed: %s", action, e)
            return Outcome(action, Result.FAILED, str(e), e)

    # -- events ------------------------------------------------------------------------------

    async def emit_event(self, action: EmitEvent) -> Outcome:
        """A core/v1 Event on the Node (reason = the DESIGN §7 event name)."""
        message = f"{action.message} ({action.reason.value})" if action.message else action.reason
        return await self.record_event(
            ObjectRef.node(action.node), action.type, action.event, str(message)
        )

    async def emit_vmi_event(
        self,
        namespace: str,
        name: str,
        event: str,
        message: str,
        *,
        event_type: EventType = EventType.NORMAL,
        uid: str = "",
    ) -> Outcome:
        """A core/v1 Event on a VMI (e.g. `VMRescheduled`)."""
        return await self.record_event(
            ObjectRef.vmi(namespace, name, uid), event_type, event, message
        )

    async def record_event(
        self, ref: ObjectRef, event_type: EventType, event: str, message: str
    ) -> Outcome:
        """Write the Event; one that cannot be written now waits in `event_backlog`."""
        unwritten = UnwrittenEvent(ref, event_type.value, event, message, rfc3339_now())
        outcome = await self._write_event(unwritten)
        if outcome.result is Result.FAILED:
            self.event_backlog.add(unwritten)
        return outcome

    async def _write_event(self, e: UnwrittenEvent) -> Outcome:
        async def body() -> Outcome:
            how = await self.events.record(e.ref, e.event_type, e.reason, e.message, stamp=e.stamp)
            # A repeat only increments the count of the existing Event.
            result = Result.SUCCESS if how == "created" else Result.ALREADY_DONE
            return Outcome("emit_event", result, f"{e.reason} on {e.ref.kind} {e.ref.name}: {how}")

        return await self._guard("emit_event", body)

    async def _write_late(self, e: UnwrittenEvent) -> bool:
        return (await self._write_event(e)).result is not Result.FAILED

    # -- node ----------------------------------------------------------------------------------

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

        return await self._guard("persist_state", body)

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
        except ActuationError as e:
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

        return await self._guard(
            "taint_out_of_service",
            lambda: self._edit_taints("taint_out_of_service", action.node, add, basis=basis),
        )

    async def remove_out_of_service_taint(
        self, action: RemoveOutOfServiceTaint, basis: Basis | None = None
    ) -> Outcome:
        """Remove the configured out-of-service taint (absent taint or node: done)."""

        def remove(taints: list[Obj]) -> list[Obj] | None:
            kept = [t for t in taints if not self.taint.matches(t)]
            return None if len(kept) == len(taints) else kept

        return await self._guard(
            "remove_out_of_service_taint",
            lambda: self._edit_taints(
                "remove_out_of_service_taint", action.node, remove, missing_ok=True, basis=basis
            ),
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

    # -- pods ----------------------------------------------------------------------------------

    async def mark_pods_not_ready(self, action: MarkPodsNotReady) -> Outcome:
        """Set Ready=False and ContainersReady=False (reason NodeUnreachable) on each pod's
        status, as the node lifecycle controller's MarkPodsNotReady would have."""
        if self.dry_run:
            return Outcome("mark_pods_not_ready", Result.DRY_RUN, "dry run: nothing written")
        message = f"Node {action.node} is unreachable (node-watchdog)"

        async def one(namespace: str, name: str) -> Result:
            try:
                pod = await self.writer.call(
                    "GET", _pods_path(namespace, name), what=f"get pod {namespace}/{name}"
                )
            except NotFound:
                return Result.ALREADY_DONE
            conditions = (pod.get("status") or {}).get("conditions") or []
            ready = next((c for c in conditions if c.get("type") == "Ready"), None)
            if ready is not None and ready.get("status") == "False":
                return Result.ALREADY_DONE
            stamp = now_rfc3339()
            patch = {
                "status": {
                    "conditions": [
                        {
                            "type": ctype,
                            "status": "False",
                            "reason": NOT_READY_REASON,
                            "message": message,
                            "lastTransitionTime": stamp,
                            "lastProbeTime": None,
                        }
                        for ctype in ("Ready", "ContainersReady")
                    ]
                }
            }
            try:
                await self.writer.call(
                    "PATCH",
                    _pods_path(namespace, name, "status"),
                    body=patch,
                    content_type=STRATEGIC_MERGE_PATCH,
                    what=f"mark pod {namespace}/{name} not ready",
                )
            except NotFound:
                return Result.ALREADY_DONE
            return Result.SUCCESS

        return await self._for_each("mark_pods_not_ready", action.pods, one)

    async def force_delete_pods(
        self, action: ForceDeletePods, *, uids: Mapping[tuple[str, str], str] | None = None
    ) -> Outcome:
        """Delete each pod with grace 0 (no kubelet is left to confirm a graceful delete).
        With `uids`, a pod recreated under the same name is left alone."""
        if self.dry_run:
            return Outcome("force_delete_pods", Result.DRY_RUN, "dry run: nothing written")

        async def one(namespace: str, name: str) -> Result:
            options: Obj = {
                "apiVersion": "v1",
                "kind": "DeleteOptions",
                "gracePeriodSeconds": 0,
                "propagationPolicy": "Background",
            }
            uid = (uids or {}).get((namespace, name))
            if uid:
                options["preconditions"] = {"uid": uid}
            try:
                await self.writer.call(
                    "DELETE",
                    _pods_path(namespace, name),
                    body=options,
                    what=f"force-delete pod {namespace}/{name}",
                )
            except NotFound:
                return Result.ALREADY_DONE
            except Conflict:
                if uid:  # another pod of that name now: ours is gone
                    return Result.ALREADY_DONE
                raise
            return Result.SUCCESS

        return await self._for_each("force_delete_pods", action.pods, one)

    async def _for_each(
        self,
        name: str,
        pods: Iterable[tuple[str, str]],
        one: Callable[[str, str], Awaitable[Result]],
    ) -> Outcome:
        items: list[tuple[str, Result, ActuationError | None]] = []
        limit = asyncio.Semaphore(_PARALLEL_ITEMS)

        async def run(namespace: str, pod: str) -> None:
            async with limit:
                try:
                    items.append((f"{namespace}/{pod}", await one(namespace, pod), None))
                except Stale as e:
                    items.append((f"{namespace}/{pod}", Result.STALE, e))
                except ActuationError as e:
                    log.warning("%s %s/%s failed: %s", name, namespace, pod, e)
                    items.append((f"{namespace}/{pod}", Result.FAILED, e))

        async with asyncio.TaskGroup() as tg:
            for namespace, pod in dict.fromkeys(pods):
                tg.create_task(run(namespace, pod), name=f"{name} {namespace}/{pod}")
        if not items:
            return Outcome(name, Result.ALREADY_DONE, "no pods")
        items.sort(key=lambda item: item[0])
        return _aggregate(name, items)

    # -- volume attachments ----------------------------------------------------------------------

    async def delete_volume_attachments(
        self,
        action: DeleteVolumeAttachments,
        claims: Iterable[tuple[str, str]],
        *,
        attacher: str | None = None,
    ) -> Outcome:
        """Delete the VolumeAttachments on `action.node` of the PVs bound to `claims`
        ((namespace, PVC name) of the reset pods' volumes), optionally only `attacher`'s
        (e.g. `driver.longhorn.io`). Nothing else on the node is touched."""
        name = "delete_volume_attachments"
        if self.dry_run:
            return Outcome(name, Result.DRY_RUN, "dry run: nothing written")

        async def body() -> Outcome:
            pvs: set[str] = set()
            for namespace, claim in dict.fromkeys(claims):
                path = (
                    f"/api/v1/namespaces/{quote(namespace, safe='')}/persistentvolumeclaims/"
                    f"{quote(claim, safe='')}"
                )
                try:
                    pvc = await self.writer.call("GET", path, what=f"get PVC {namespace}/{claim}")
                except NotFound:
                    continue
                volume = (pvc.get("spec") or {}).get("volumeName")
                if volume:
                    pvs.add(volume)
            if not pvs:
                return Outcome(name, Result.ALREADY_DONE, "no bound volumes")
            listing = await self.writer.call(
                "GET", "/apis/storage.k8s.io/v1/volumeattachments", what="list VolumeAttachments"
            )
            targets = [
                va["metadata"]["name"]
                for va in listing.get("items") or ()
                if (va.get("spec") or {}).get("nodeName") == action.node
                and ((va.get("spec") or {}).get("source") or {}).get("persistentVolumeName") in pvs
                and (attacher is None or va["spec"].get("attacher") == attacher)
            ]
            items: list[tuple[str, Result, ActuationError | None]] = []
            for va_name in targets:
                try:
                    await self.writer.call(
                        "DELETE",
                        f"/apis/storage.k8s.io/v1/volumeattachments/{quote(va_name, safe='')}",
                        body={
                            "apiVersion": "v1",
                            "kind": "DeleteOptions",
                            "propagationPolicy": "Background",
                        },
                        what=f"delete VolumeAttachment {va_name}",
                    )
                    items.append((va_name, Result.SUCCESS, None))
                except NotFound:
                    items.append((va_name, Result.ALREADY_DONE, None))
                except Stale as e:
                    items.append((va_name, Result.STALE, e))
                except ActuationError as e:
                    items.append((va_name, Result.FAILED, e))
            if not items:
                return Outcome(name, Result.ALREADY_DONE, "no attachments on the node")
            return _aggregate(name, items)

        return await self._guard(name, body)

    # -- evacuation ----------------------------------------------------------------------------

    async def start_evacuation(
        self, action: StartEvacuation, vmis: Iterable[tuple[str, str]]
    ) -> Outcome:
        """One migration per (namespace, VMI) chosen by the plan (decide.evacuation)."""
        items: list[tuple[str, Result, ActuationError | None]] = []
        for namespace, vmi in vmis:
            outcome = await self.create_migration(namespace, vmi, action.node)
            items.append((f"{namespace}/{vmi}", outcome.result, outcome.error))
        if self.dry_run and items:
            return Outcome("start_evacuation", Result.DRY_RUN, f"{len(items)} migrations")
        if not items:
            return Outcome("start_evacuation", Result.ALREADY_DONE, "nothing to migrate now")
        return _aggregate("start_evacuation", items)

    async def create_migration(self, namespace: str, vmi: str, node: str) -> Outcome:
        """A `VirtualMachineInstanceMigration` for `vmi` (generateName `evacuate-<vmi>-`,
        labelled with the node being evacuated); a running one for the VMI: already_done."""
        name = "start_evacuation"
        collection = (
            f"/apis/kubevirt.io/v1/namespaces/{quote(namespace, safe='')}"
            "/virtualmachineinstancemigrations"
        )

        async def body() -> Outcome:
            listing = await self.writer.call(
                "GET", collection, what=f"list migrations in {namespace}"
            )
            for m in listing.get("items") or ():
                phase = (m.get("status") or {}).get("phase")
                if (m.get("spec") or {}).get("vmiName") == vmi and phase not in (
                    FINAL_MIGRATION_PHASES
                ):
                    return Outcome(
                        name, Result.ALREADY_DONE, f"{m['metadata']['name']} already migrates it"
                    )
            manifest = {
                "apiVersion": "kubevirt.io/v1",
                "kind": "VirtualMachineInstanceMigration",
                "metadata": {
                    "generateName": f"evacuate-{vmi}-",
                    "namespace": namespace,
                    "labels": {EVACUATION_LABEL: evacuation_label_value(node)},
                    "annotations": {EVACUATION_NODE_ANNOTATION: node},
                },
                "spec": {"vmiName": vmi},
            }
            created = await self.writer.call(
                "POST", collection, body=manifest, what=f"create migration for {namespace}/{vmi}"
            )
            return Outcome(name, Result.SUCCESS, str(created.get("metadata", {}).get("name")))

        return await self._guard(name, body)

    async def stop_evacuation(self, action: StopEvacuation) -> Outcome:
        """Delete the unfinished migrations this node's evacuation created (aborts them)."""
        name = "stop_evacuation"
        label = evacuation_label_value(action.node)

        async def body() -> Outcome:
            found: list[Obj] = []
            # Also those a release before our own domain created, under the legacy label.
            for key in (EVACUATION_LABEL, LEGACY_EVACUATION_LABEL):
                listing = await self.writer.call(
                    "GET",
                    "/apis/kubevirt.io/v1/virtualmachineinstancemigrations",
                    query={"labelSelector": f"{key}={label}"},
                    what=f"list evacuation migrations of {action.node}",
                )
                found.extend(listing.get("items") or ())
            items: list[tuple[str, Result, ActuationError | None]] = []
            for m in found:
                if (m.get("status") or {}).get("phase") in FINAL_MIGRATION_PHASES:
                    continue
                meta = m["metadata"]
                key = f"{meta['namespace']}/{meta['name']}"
                path = (
                    f"/apis/kubevirt.io/v1/namespaces/{quote(meta['namespace'], safe='')}"
                    f"/virtualmachineinstancemigrations/{quote(meta['name'], safe='')}"
                )
                try:
                    await self.writer.call("DELETE", path, what=f"delete migration {key}")
                    items.append((key, Result.SUCCESS, None))
                except NotFound:
                    items.append((key, Result.ALREADY_DONE, None))
                except ActuationError as e:
                    items.append((key, Result.FAILED, e))
            if not items:
                return Outcome(name, Result.ALREADY_DONE, "no unfinished migrations")
            return _aggregate(name, items)

        return await self._guard(name, body)

    # -- fencing -------------------------------------------------------------------------------

    async def run_fence_hook(self, action: RunFenceHook) -> Outcome:
        """fence_mode=power: switch the node off through its BMC and read back off
        (power_fence.py); fence_mode=external: run the command (node name in $NODE) or POST
        the webhook, success meaning the hook confirms the node is powered off. Not retried
        here: the decision loop asks again."""
        name = "run_fence_hook"
        if self.dry_run:
            return Outcome(name, Result.DRY_RUN, "dry run: hook not called")
        outcome = await self._fence(name, action.node)
        if outcome.result is Result.FAILED:
            # What an operator answering WatchdogFenceFailing reads: which node, and why.
            log.warning("fence of node %s failed: %s", action.node, outcome.detail[:500])
        return outcome

    async def _fence(self, name: str, node: str) -> Outcome:
        s = self.settings
        if s.fence_mode is FenceMode.POWER and s.power_fence_inventory is not None:
            run = await PowerFencer(s.power_fence_inventory, s.fence_hook_timeout_s).fence(node)
            return Outcome(name, Result.SUCCESS if run.confirmed else Result.FAILED, run.detail)
        if s.fence_hook_command:
            return await self._fence_command(name, s.fence_hook_command, node)
        if s.fence_hook_url:
            return await self._fence_webhook(name, s.fence_hook_url, node)
        return Outcome(name, Result.FAILED, "no fence hook configured")

    async def _fence_command(self, name: str, command: str, node: str) -> Outcome:
        proc = await asyncio.create_subprocess_shell(
            command,
            env={**os.environ, "NODE": node},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            async with asyncio.timeout(self.settings.fence_hook_timeout_s):
                output, _ = await proc.communicate()
        except TimeoutError:
            return Outcome(
                name,
                Result.FAILED,
                f"fence command timed out after {self.settings.fence_hook_timeout_s:.0f}s",
            )
        finally:
            if proc.returncode is None:  # timed out or cancelled: never leave the hook running
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        tail = output.decode(errors="replace").strip()[-300:]
        if proc.returncode == 0:
            return Outcome(name, Result.SUCCESS, f"fence command confirmed {node} off")
        return Outcome(name, Result.FAILED, f"fence command exit {proc.returncode}: {tail}")

    async def _fence_webhook(self, name: str, url: str, node: str) -> Outcome:
        timeout = aiohttp.ClientTimeout(total=self.settings.fence_hook_timeout_s)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.post(url, json={"node": node}) as resp,
            ):
                text = (await resp.text())[:300]
                if 200 <= resp.status < 300:
                    return Outcome(name, Result.SUCCESS, f"fence webhook confirmed {node} off")
                return Outcome(name, Result.FAILED, f"fence webhook {resp.status}: {text}")
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            return Outcome(name, Result.FAILED, f"fence webhook: {type(e).__name__}: {e}")


__all__ = [
    "EVACUATION_LABEL",
    "NOT_READY_REASON",
    "Actuator",
    "ActuatorSettings",
    "KubeWriter",
    "Outcome",
    "Result",
    "TaintSpec",
    "evacuation_label_value",
    "now_rfc3339",
]
