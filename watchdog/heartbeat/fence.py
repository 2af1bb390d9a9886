"""Self-fencing of this node (DESIGN §5, fence mode `self`): when to fence and how.

The controller resets a node's VMs elsewhere only after `safe_delay` (decide/safety.py), a sum
of what this agent declares in every heartbeat: it fences after `self_fence_after_s` without
contact, and its fence action stops the VMs within `fence_action_bound_s`. This module keeps
the agent's side of that bargain. It owns the fence deadline and the fence action; it must not
talk to the broker or the API (the agent feeds it contact times).

**Contact** is proven, never assumed: one of the agent's heartbeats come back (read back from
the broker, or acknowledged by the leading controller: `mqtt.broker_contact`, decide/acks.py)
or an API read (a quorum read, not the watch cache) in which the controller does not consider
this node down. Each contact is stamped with the time its request was *sent*, which is never
later than the moment the broker (or the leader) or the API server last saw us, so the agent
fences no later than the controller's arithmetic expects.

**Armed in this boot.** The agent neither fences nor declares its fence armed before its first
proven contact in this boot, and declares it armed only once that contact is recorded in the
boot record (boot_record.py), so that every later agent process of this boot keeps the same
deadline. It keeps exactly the promise it declared: armed → it fences at the deadline.

**The fence action** is `fence_command`, run through the shell, in its own process group,
retried after a failure while `fence_action_bound_s` lasts. On a real node it is an immediate
reboot::

    echo b > /proc/sysrq-trigger

(needs `kernel.sysrq` to allow it, and the host access the self-fence component of deploy/
grants). In the test cluster it powers off that simulated node. **The watchdog device**
(heartbeat/device.py) backs it: petted only until the deadline, it resets the node
`watchdog_timeout_s` later when the command failed, or the agent froze or died. Without a
device the fence is *weak*: declared (`device: false`) and not accepted by the controller as
proof unless the operator opted in. Without `fence_command` the fence is *unarmed*: the agent
says so in every heartbeat (`armed: false`), only logs when it would fence, and the controller
treats the node as unfenced (no self-fence-based reset).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from watchdog.decide.state import DOWN_PHASES, Phase

log = logging.getLogger(__name__)

# A declared bound of 0 means "instant" (sysrq reboot never returns); the shell still needs a
# moment to start, so the wait for the command is never shorter than this.
MIN_COMMAND_WAIT_S = 1.0
# Between two attempts of a failing fence command (within its declared bound).
RETRY_PAUSE_S = 0.2
OUTPUT_LIMIT = 2000


def declared_down(phase: str | None) -> bool:
    """True when the phase the controller persisted for this node says it is being fenced."""
    return phase is not None and phase in DOWN_PHASES


def declared_grace_s(after_s: float, heartbeat_interval_s: float, api_interval_s: float) -> float:
    """How long the agent may wait, once it reads that the controller declared it down, for
    that declaration to be withdrawn before it fences.

    Why wait at all: a NIC flap just longer than `unreachable_after_s` is declared (peers
    corroborate in seconds); when the link returns, the agent's API read races the controller,
    which withdraws the declaration at the first heartbeat it hears that reports fresh contact
    (sent as soon as contact is back; decide/machine.py,
    `withdraw_fencing`). Fencing at once would reboot a healthy node.

    Why this is safe: the controller resets no earlier than
    `visible + after + bound + heartbeat_interval + margin`, where `visible` is when it saw its
    declaration on the Node. The agent reads the API at least every `max(api_interval,
    after / 2)` (relaxed while the broker answers), and a read takes at most `api_interval`, so
    it reads the declaration by `visible + max(api_interval, after / 2) + api_interval`. Adding
    this grace and the fence's own bound stays within the controller's wait, without counting
    on the margin (the controller's, not ours):
    `max(api_interval, after / 2) + api_interval + grace <= after + heartbeat_interval`.
    """
    return max(
        0.0, after_s + heartbeat_interval_s - max(api_interval_s, after_s / 2) - api_interval_s
    )


def fence_deadline(last_contact: float | None, after_s: float) -> float | None:
    """Monotonic time at which the agent must fence unless contact is proven before it; None
    while it has proven no contact in this boot: then it never fences.

    Why not fence without contact: after a power cut a whole cluster boots at once, and its
    API server and broker need minutes. An agent that fenced `after_s` after its own start
    would reboot every node, again at every boot. Fencing a node that the controller never
    heard in this boot protects nothing: the controller resets only on a declaration it
    received, and the agent declares itself armed only once contact is proven and recorded
    (boot_record.py).

    Why a restart does not move it: `last_contact` is the latest contact of any agent process
    of this boot (the boot record survives the process), so a crash-looping agent on a
    partitioned node fences at the deadline its first process had.
    """
    return None if last_contact is None else last_contact + after_s


@dataclass(frozen=True, slots=True)
class BootContact:
    """This boot's proven contact as one agent process knows it: resumed from the boot record
    of an earlier process (if any), then moved by every contact this process proves."""

    first: float | None = None  # the first proven contact in this boot: armed from then on
    last: float | None = None  # the latest one

    def seen(self, at: float) -> BootContact:
        first = at if self.first is None else self.first
        last = at if self.last is None else max(self.last, at)
        return BootContact(first, last)

    def deadline(self, after_s: float) -> float | None:
        return fence_deadline(self.last if self.first is not None else None, after_s)


# Declarations in which the controller still waits for its Lease gate as well (decide/safety.py):
# once it writes Resetting it has passed the gate, and the agent waits for no renewal any more.
LEASE_WAITS_IN = frozenset({Phase.UNREACHABLE.value, Phase.FENCING.value})


def fence_at(
    base: float | None, spared_until: float | None, lease_deadline: float | None
) -> float | None:
    """When an armed agent fences without contact: its boot's deadline (`BootContact.deadline`;
    None: not armed in this boot, never), moved on while a majority of cut-off peers spares it
    (until `spared_until`, decide/quorum.py) and to the Lease wait (`lease_deadline`, an
    opt-in): the controller waits for each of them (decide/safety.py)."""
    if base is None:
        return None
    if spared_until is not None:
        base = max(base, spared_until)
    return base if lease_deadline is None else max(base, lease_deadline)


@dataclass(frozen=True, slots=True)
class FenceCall:
    """What the agent's fence guard does at one look: fence now (`reason`, and the `episode` it
    logs an unarmed fence once for), or look again at `wake_at` at the latest (None: only when
    contact or a declaration changes)."""

    reason: str | None = None
    episode: str | None = None
    wake_at: float | None = None


def fence_call(
    now: float,
    deadline: float | None,
    *,
    declared_phase: str | None,
    declared_since: float | None,
    grace_s: float,
    lease_deadline: float | None,
    last_contact: float | None,
    after_s: float,
) -> FenceCall:
    """The fence guard's rule, at `now`, with this boot's `deadline` (`fence_at`; None: not
    armed, never fence: the controller cannot have received an armed declaration of this
    boot). Fence when the controller's declaration that this node is down (`declared_phase`,
    read `declared_since`) has stood for `grace_s` (`declared_grace_s`) and, while the
    controller still waits for the Lease gate, until `lease_deadline`; or when the deadline
    passed without contact."""
    if deadline is None:
        return FenceCall()
    grace_until: float | None = None
    if declared_phase is not None:
        assert declared_since is not None
        grace_until = declared_since + grace_s
        if lease_deadline is not None and declared_phase in LEASE_WAITS_IN:
            grace_until = max(grace_until, lease_deadline)
    if grace_until is not None and now >= grace_until:
        return FenceCall(
            f"the API says this node is {declared_phase}", f"declared {declared_phase}"
        )
    if now >= deadline:
        silent_s = now - last_contact if last_contact is not None else after_s
        return FenceCall(
            f"no contact with broker or API for {silent_s:.1f}s", f"cut off until {deadline}"
        )
    return FenceCall(wake_at=deadline if grace_until is None else min(deadline, grace_until))


@dataclass(frozen=True, slots=True)
class FenceOutcome:
    """What running the fence action did (for logs and `statistics()`)."""

    reason: str
    armed: bool
    returncode: int | None = None
    timed_out: bool = False
    error: str | None = None
    duration_s: float = 0.0
    output: str = ""
    attempts: int = 1

    @property
    def succeeded(self) -> bool:
        return self.armed and self.returncode == 0 and not self.timed_out and self.error is None

    def summary(self) -> str:
        if not self.armed:
            return "unarmed"
        if self.error is not None:
            return f"error: {self.error}"
        if self.timed_out:
            return "timed out"
        return f"exit {self.returncode}"


class FenceAction:
    """The configured fence command; `armed` is False without one."""

    def __init__(self, command: str | None, bound_s: float) -> None:
        self.command = command.strip() if command and command.strip() else None
        self.bound_s = bound_s

    @property
    def armed(self) -> bool:
        return self.command is not None

    async def run_within_bound(self, reason: str, clock: Callable[[], float]) -> FenceOutcome:
        """Run the command, again after a failure while its declared bound lasts (at least
        once); the last outcome, with the number of attempts. A fence that still fails leaves
        the node to its watchdog device, which the agent no longer pets."""
        started = clock()
        attempts = 0
        while True:
            attempts += 1
            outcome = await self.run(reason)
            outcome = replace(outcome, attempts=attempts)
            left = self.bound_s - (clock() - started)
            if outcome.succeeded or not self.armed or outcome.timed_out or left < RETRY_PAUSE_S:
                return outcome
            log.critical(
                "fence command failed (%s), attempt %d; retrying (%.1fs of its bound left)",
                outcome.summary(),
                attempts,
                left,
            )
            await asyncio.sleep(RETRY_PAUSE_S)

    async def run(self, reason: str) -> FenceOutcome:
        """Run the command once; past the declared bound it is reported, never killed."""
        if self.command is None:
            return FenceOutcome(reason=reason, armed=False)
        started = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_shell(
                self.command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # its own process group: a timeout kills all of it
            )
        except OSError as e:
            return FenceOutcome(reason, True, error=str(e), duration_s=time.monotonic() - started)
        wait_s = max(self.bound_s, MIN_COMMAND_WAIT_S)
        try:
            async with asyncio.timeout(wait_s):
                out, _ = await proc.communicate()
        except TimeoutError:
            # Overrunning the declared bound breaks the controller's arithmetic, but killing
            # the fence would be worse: a half-run fence may leave the VMs running. Let it
            # finish, and say loudly that the declared bound is too short.
            log.critical(
                "fence command still running after its declared bound of %.1fs: letting it "
                "finish; raise fence_action_bound_s",
                self.bound_s,
            )
            out, _ = await proc.communicate()
            return FenceOutcome(
                reason,
                True,
                returncode=proc.returncode,
                timed_out=True,
                duration_s=time.monotonic() - started,
                output=out.decode(errors="replace")[-OUTPUT_LIMIT:] if out else "",
            )
        except asyncio.CancelledError:
            _kill_group(proc)
            raise
        return FenceOutcome(
            reason,
            True,
            returncode=proc.returncode,
            duration_s=time.monotonic() - started,
            output=out.decode(errors="replace")[-OUTPUT_LIMIT:] if out else "",
        )


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
