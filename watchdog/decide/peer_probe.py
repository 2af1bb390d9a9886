"""One peer probe, as data: the line protocol, what an answer means, and an observer's verdict.

Protocol (TCP, one exchange per connection): the prober sends `PING <expected-node>\\n`, the
endpoint answers `PONG <its-node> <boot_id>\\n` (with ` cut` before the newline while its agent
has proven no contact with broker or API for `cut_after_s`, decide/quorum.py) and closes. Lines
are ASCII, bounded, and parsed strictly; anything else is not an answer from the agent we meant
to reach.

What an attempt says about the *machine* (not the agent):

- `ok`       the right PONG within the timeout: the agent runs there.
- `cut`      the right PONG, saying its agent is cut off from broker and API too
             (`PONG <node> <boot_id> cut`, decide/quorum.py): the agent runs there.
- `refused`  refused, reset, or closed before a reply: the machine's kernel answered, only the
             agent is missing. The host is ALIVE and must never count as unreachable.
- `timeout`  nothing within the timeout (or no route to the host): the only outcome that is
             evidence of a dead machine or a cut network.
- `mismatch` a PONG from another node, or garbage: someone else owns that address: unknown.
- `error`    our own side failed (e.g. out of file descriptors): says nothing about the target.

An observer calls a target `unreachable` only after `failures` consecutive timeouts, and
`reachable` again at the first ok or refused.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from enum import StrEnum

# A Kubernetes node name is at most 253 characters and a boot id at most 64, so a valid line
# is at most 5 + 253 + 1 + 64 + 4 + 1 bytes (` cut` included); anything longer is refused unread.
MAX_LINE_BYTES = 5 + 253 + 1 + 64 + 4 + 1
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._")


class ProbeOutcome(StrEnum):
    OK = "ok"
    CUT = "cut"
    REFUSED = "refused"
    TIMEOUT = "timeout"
    MISMATCH = "mismatch"
    ERROR = "error"


class PeerView(StrEnum):
    """What one observer reports about one target."""

    REACHABLE = "reachable"
    UNREACHABLE = "unreachable"
    UNKNOWN = "unknown"


def _token(text: str, limit: int) -> bool:
    return 0 < len(text) <= limit and all(c in _NAME_CHARS for c in text)


def encode_ping(expected: str) -> bytes:
    return f"PING {expected}\n".encode()


def encode_pong(node: str, boot_id: str, *, cut: bool = False) -> bytes:
    return f"PONG {node} {boot_id}{' cut' if cut else ''}\n".encode()


def _words(line: bytes) -> list[str] | None:
    """The space-separated words of one bounded ASCII line ending in a newline, else None."""
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        return None
    if len(line) > MAX_LINE_BYTES or not text.endswith("\n"):
        return None
    return text[:-1].split(" ")


def parse_ping(line: bytes) -> str | None:
    """The node a PING asks for, or None for anything that is not exactly one PING line."""
    parts = _words(line)
    if parts is None or len(parts) != 2 or parts[0] != "PING" or not _token(parts[1], 253):
        return None
    return parts[1]


def parse_pong(line: bytes) -> tuple[str, str, bool] | None:
    """(node, boot_id, cut) of exactly one PONG line, else None."""
    parts = _words(line)
    if parts is None or len(parts) not in (3, 4) or parts[0] != "PONG":
        return None
    if not _token(parts[1], 253) or not _token(parts[2], 64):
        return None
    if len(parts) == 4 and parts[3] != "cut":
        return None
    return parts[1], parts[2], len(parts) == 4


# The machine does not answer at all: as good as a timeout (ARP or routing gave up on it).
_SILENT_ERRNOS = frozenset(
    {errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ENETUNREACH, errno.ETIMEDOUT}
)


def classify(expected: str, reply: bytes | None, error: BaseException | None) -> ProbeOutcome:
    """What one attempt says: `reply` is the line read (b"" or None: closed before a reply),
    `error` what the attempt raised (None if it completed)."""
    if error is not None:
        if isinstance(error, TimeoutError):
            return ProbeOutcome.TIMEOUT
        if isinstance(error, ConnectionError):  # refused, reset, aborted, broken pipe
            return ProbeOutcome.REFUSED
        if isinstance(error, OSError) and error.errno in _SILENT_ERRNOS:
            return ProbeOutcome.TIMEOUT
        return ProbeOutcome.ERROR
    if not reply:
        return ProbeOutcome.REFUSED  # the endpoint closed without a word: the kernel is there
    pong = parse_pong(reply)
    if pong is None or pong[0] != expected:
        return ProbeOutcome.MISMATCH
    return ProbeOutcome.CUT if pong[2] else ProbeOutcome.OK


@dataclass(frozen=True, slots=True)
class TargetState:
    """An observer's running verdict on one target."""

    view: PeerView = PeerView.UNKNOWN
    timeouts: int = 0  # consecutive


def observe(state: TargetState, outcome: ProbeOutcome, failures: int) -> TargetState:
    """The verdict after one more attempt."""
    match outcome:
        case ProbeOutcome.OK | ProbeOutcome.CUT | ProbeOutcome.REFUSED:
            return TargetState(PeerView.REACHABLE, 0)
        case ProbeOutcome.TIMEOUT:
            timeouts = state.timeouts + 1
            view = PeerView.UNREACHABLE if timeouts >= failures else state.view
            # Below the threshold a REACHABLE target stays REACHABLE: one lost probe on a busy
            # network is not news worth a report.
            return TargetState(view, timeouts)
        case ProbeOutcome.MISMATCH:
            return TargetState(PeerView.UNKNOWN, 0)
        case ProbeOutcome.ERROR:
            return state  # our problem, not the target's
