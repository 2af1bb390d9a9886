"""How an agent proves broker contact (DESIGN §5): its echo, or the leader's acknowledgement.

`mqtt.broker_contact` (both roles read it):

- `echo` (default): the agent reads its own heartbeat back from the broker. That proves the
  controller could hear it only because the controller reads the same broker: sound with the
  one broker the manifests ship (the controller holds on `BrokerDown` and `IngestLag`).
- `leader-ack`: the leading controller acknowledges every heartbeat it accepted on
  `<prefix>/ack/<node>`, and the agent counts broker contact only from those, stamped with the
  time it sent the heartbeat acknowledged. Contact means *the leader heard me*: a member of a
  clustered or bridged broker that takes the agent's heartbeats but no longer reaches the
  leader proves nothing, and the agent fences on its deadline as if the broker were gone. The
  cost: no leader, no acknowledgement. During a control-plane outage longer than the leader's
  renew deadline every agent has neither contact, and fences unless the quorum before
  self-fencing spares it (decide/quorum.py; on clusters larger than its probe list can show a
  majority of, through the roster sweep, decide/roster.py).

Every accepted heartbeat is acknowledged (QoS 0), as every heartbeat is echoed: the agent's
latest contact lags the controller's latest heartbeat of it by the controller's ingest lag and
one interval per acknowledgement lost in a row, the terms the quorum timings rest on
(decide/quorum.py, `spare_timing_error`, which allows one).

The payload is `<seq> <boot_id>` in ASCII: the boot id keeps an acknowledgement of an earlier
boot's heartbeat (same `seq` by chance) from counting. Only the controller's identity may write
these topics (deploy/base/broker/acl); the parser still refuses anything malformed.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

MAX_ACK_BYTES = 96  # 20 digits, a space, a boot id of at most 64 characters


class BrokerContact(StrEnum):
    ECHO = "echo"
    LEADER_ACK = "leader-ack"


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int
    boot_id: str


class AckRefused(ValueError):
    """An acknowledgement that is not one: why, for the agent's log."""


def ack_topic(prefix: str, node: str) -> str:
    return f"{prefix}/ack/{node}"


def encode_ack(seq: int, boot_id: str) -> bytes:
    return f"{seq} {boot_id}".encode()


def parse_ack(payload: object) -> Ack:
    """The acknowledgement in `payload`; raises AckRefused naming what is wrong."""
    if not isinstance(payload, bytes | bytearray):
        raise AckRefused("not bytes")
    if not 0 < len(payload) <= MAX_ACK_BYTES:
        raise AckRefused(f"{len(payload)} bytes (1 to {MAX_ACK_BYTES})")
    try:
        text = bytes(payload).decode("ascii")
    except UnicodeDecodeError:
        raise AckRefused("not ASCII") from None
    seq_text, sep, boot_id = text.partition(" ")
    if not sep or not boot_id or " " in boot_id or len(boot_id) > 64:
        raise AckRefused("expected '<seq> <boot id>'")
    if not seq_text.isdigit() or len(seq_text) > 20:
        raise AckRefused(f"seq {seq_text[:24]!r} is not a non-negative integer")
    return Ack(int(seq_text), boot_id)
