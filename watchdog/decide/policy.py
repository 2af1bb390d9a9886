"""Parsing Harvester's `vm-force-reset-policy` value (a JSON string) into a Policy.

Harvester's own validation (pkg/settings/settings_helper.go) rejects `period <= 0` and a
negative `vmMigrationTimeout`; a timeout of 0 means 180 s. We apply the same rules and say
which field is wrong, so the caller can keep the last good value and report the problem.
"""

from __future__ import annotations

import math
from typing import Any

from watchdog.decide import bounded_json
from watchdog.decide.config import Policy

DEFAULT_MIGRATION_TIMEOUT_S = 180.0
# A day: Harvester's own defaults are 15 s and 180 s. A larger value is a typo or an attack
# (an infinite period would hold every reset forever; NaN compares false to everything).
MAX_SECONDS = 86_400.0
MAX_SETTING_BYTES = 4096


class PolicyError(ValueError):
    """The setting's value is not a valid policy; the message names the field and value."""


def parse_policy(value: str | None, default: str | None = None) -> Policy:
    """Policy from the Setting's `.value`, falling back to `.default` when value is empty."""
    text = value if value else default
    if not text:
        raise PolicyError("setting has neither value nor default")
    try:
        doc = bounded_json.loads(text, max_bytes=MAX_SETTING_BYTES, what="value")
    except bounded_json.JsonRefused as e:
        raise PolicyError(f"{e}: {text[:80]!r}") from None
    if not isinstance(doc, dict):
        raise PolicyError(f"value must be a JSON object, got {type(doc).__name__}")
    enable = _field(doc, "enable", bool, True)
    period = _number(doc, "period", None)
    if period is None:
        raise PolicyError("field 'period' is missing")
    if period <= 0:
        raise PolicyError(f"field 'period' must be > 0, got {period}")
    timeout = _number(doc, "vmMigrationTimeout", 0.0)
    assert timeout is not None
    if timeout < 0:
        raise PolicyError(f"field 'vmMigrationTimeout' must be >= 0, got {timeout}")
    return Policy(
        enable=enable,
        period_s=period,
        vm_migration_timeout_s=timeout or DEFAULT_MIGRATION_TIMEOUT_S,
        source="harvester",
    )


def _field(doc: dict[str, Any], name: str, kind: type[bool], default: bool) -> bool:
    raw = doc.get(name, default)
    if not isinstance(raw, kind):
        raise PolicyError(f"field {name!r} must be {kind.__name__}, got {raw!r}")
    return raw


def _number(doc: dict[str, Any], name: str, default: float | None) -> float | None:
    raw = doc.get(name, default)
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise PolicyError(f"field {name!r} must be a number of seconds, got {str(raw)[:40]!r}")
    if not -MAX_SECONDS <= raw <= MAX_SECONDS or not math.isfinite(raw):
        raise PolicyError(f"field {name!r} must be at most {MAX_SECONDS:g} s, got {raw:.6g}")
    return float(raw)
