"""The agent's memory of this boot: when it first proved contact, and when it last did.

Why it exists (DESIGN §5): an agent fences only once it has proven contact in this boot (a
cluster starting from cold must not reboot itself while its API server and broker come up),
and once it has, a restart of the agent process must not move its fence deadline (a
crash-looping agent on a partitioned node must not escape its fence). Both need a record that
outlives the process and dies with the boot: a small file on tmpfs (`/run/node-watchdog` on
the host), naming the boot it is about, so a record of an earlier boot is never read as ours
even where the directory survives a reboot.

Times are seconds on CLOCK_MONOTONIC (Python's `time.monotonic` on Linux): one clock for every
process of a boot, starting again at each boot, and never stepped by NTP. A restarted agent
can therefore compare its predecessor's stamps with its own clock.

Must not: decide anything. The agent decides; this module reads and writes one file.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FILE_NAME = "agent-contact.json"
# A record is a few dozen bytes; anything larger was not written by us.
MAX_BYTES = 4096


class BootRecordError(Exception):
    """The record for this boot exists but cannot be used (unreadable, corrupt, impossible)."""


@dataclass(frozen=True, slots=True)
class BootRecord:
    boot_id: str
    first_contact: float  # monotonic seconds of the first proven contact in this boot
    last_contact: float  # monotonic seconds of the latest proven contact known to be durable

    def to_json(self) -> str:
        return json.dumps(
            {
                "boot_id": self.boot_id,
                "first_contact": self.first_contact,
                "last_contact": self.last_contact,
            }
        )


def parse_record(text: str, boot_id: str, now: float) -> BootRecord | None:
    """The record in `text` if it is about `boot_id`; None if it is about another boot.

    Raises BootRecordError for anything we did not write: a record we cannot trust must not
    silently read as "never armed" (that would let a restarted agent escape its fence).
    """
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise BootRecordError(f"not JSON: {str(e)[:120]}") from None
    if not isinstance(doc, dict):
        raise BootRecordError("not a JSON object")
    recorded = doc.get("boot_id")
    if not isinstance(recorded, str) or not recorded:
        raise BootRecordError("boot_id missing")
    if recorded != boot_id:
        return None  # an earlier boot's record: that boot's promises died with it
    first, last = doc.get("first_contact"), doc.get("last_contact")
    for name, value in (("first_contact", first), ("last_contact", last)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BootRecordError(f"{name} is not a number: {value!r}")
        if not math.isfinite(value) or value < 0:
            raise BootRecordError(f"{name} is not a finite time: {value!r}")
        if value > now:
            raise BootRecordError(f"{name} {value} is later than now ({now}) on this boot's clock")
    assert isinstance(first, int | float) and isinstance(last, int | float)
    if first > last:
        raise BootRecordError(f"first_contact {first} is after last_contact {last}")
    return BootRecord(boot_id, float(first), float(last))


class BootRecordStore:
    """One file in `directory`; writes are atomic (write a temporary file, then rename)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / FILE_NAME

    def load(self, boot_id: str, now: float) -> BootRecord | None:
        """This boot's record; None when there is none. BootRecordError when unusable."""
        try:
            with self.path.open("rb") as f:
                data = f.read(MAX_BYTES + 1)
        except (FileNotFoundError, NotADirectoryError):
            # No record can have been written there, so no agent of this boot declared an
            # armed fence (it declares armed only once its record is written).
            return None
        except OSError as e:
            raise BootRecordError(f"{self.path}: {e}") from None
        if len(data) > MAX_BYTES:
            raise BootRecordError(f"{self.path}: larger than {MAX_BYTES} bytes")
        try:
            return parse_record(data.decode(), boot_id, now)
        except UnicodeDecodeError:
            raise BootRecordError(f"{self.path}: not UTF-8") from None
        except BootRecordError as e:
            raise BootRecordError(f"{self.path}: {e}") from None

    def clear(self) -> None:
        """Forget this boot's contact (a deliberate stop released the fence)."""
        self.path.unlink(missing_ok=True)

    def save(self, record: BootRecord) -> None:
        """Raises OSError when it cannot be written: the caller must not rely on it then."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{FILE_NAME}.{os.getpid()}")
        try:
            tmp.write_text(record.to_json())
            os.replace(tmp, self.path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
