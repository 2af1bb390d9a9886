"""Events the watchdog writes: the `EmitEvent` action's Events on Nodes, and those on VMIs and
other objects the runtime reports on.

Owns: `EventWrites`, which writes each Event through the `EventRecorder` (events.py: a repeat
only increments the count of the existing Event, `already_done`) and puts one that cannot be
written now in the backlog (event_backlog.py), which writes it again later with the time it
happened.

Must not: decide which Events to emit, or swallow `asyncio.CancelledError`.
"""

from __future__ import annotations

from watchdog.actuate.event_backlog import EventBacklog, UnwrittenEvent
from watchdog.actuate.events import EventRecorder, ObjectRef, rfc3339_now
from watchdog.actuate.outcome import Outcome, Result, guard
from watchdog.actuate.writer import KubeWriter
from watchdog.decide.actions import EmitEvent, EventType


class EventWrites:
    """The Events of the action `EmitEvent`, and of the runtime's own reports."""

    def __init__(self, writer: KubeWriter, *, component: str, instance: str, dry_run: bool) -> None:
        self.dry_run = dry_run
        self.recorder = EventRecorder(writer.call, component=component, instance=instance)
        # Events whose write failed; written again by `backlog.run()` (the runtime runs it
        # while this replica leads).
        self.backlog = EventBacklog(self._write_late)

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
        """Write the Event; one that cannot be written now waits in `backlog`."""
        unwritten = UnwrittenEvent(ref, event_type.value, event, message, rfc3339_now())
        outcome = await self._write_event(unwritten)
        if outcome.result is Result.FAILED:
            self.backlog.add(unwritten)
        return outcome

    async def _write_event(self, e: UnwrittenEvent) -> Outcome:
        async def body() -> Outcome:
            how = await self.recorder.record(
                e.ref, e.event_type, e.reason, e.message, stamp=e.stamp
            )
            # A repeat only increments the count of the existing Event.
            result = Result.SUCCESS if how == "created" else Result.ALREADY_DONE
            return Outcome("emit_event", result, f"{e.reason} on {e.ref.kind} {e.ref.name}: {how}")

        return await guard("emit_event", body, dry_run=self.dry_run)

    async def _write_late(self, e: UnwrittenEvent) -> bool:
        return (await self._write_event(e)).result is not Result.FAILED


__all__ = ["EventWrites"]
