"""The watchdog's settings for a run: real-world values compressed by the scenario's time scale.

Owns: which of the service's settings are durations of the failure model (every `*_s` field of
`watchdog.runtime.settings.Settings` and its nested models, except the client/server request
budgets in `NOT_SCALED`), their real-world values (the service's own defaults unless a
scenario overrides them), and the `WATCHDOG_*` environment that carries them multiplied by the
time scale, so the watchdog is compressed by the same factor as Kubernetes, the simulated
machines and Harvester. Integer fields are rounded up and kept at their lower bound; where that
bound stops the compression (MQTT keepalive >= 2 s) a note says so.

Must not: start anything. Reads the service's settings model, never its runtime.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import annotated_types
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from watchdog.runtime.settings import Settings

# Request budgets of the clients, not timings of a failure: compressing them would only make
# requests time out under load, on a machine whose processing latency no factor compresses.
NOT_SCALED = frozenset({"api_request_timeout_s", "watch_timeout_s", "fence_hook_timeout_s"})

# Wall-clock floors (seconds) for durations whose compression would only measure the test
# cluster itself: every peer probe crosses a Python proxy in the harness process (its peer
# link), so probing six nodes every 0.1 s is ~180 proxied connections a second in the loop
# that also runs the simulators and the embedded broker; and an ingest-lag bound of 0.1 s
# reads that loop's hiccups as a blind controller. Kept below suspect_after_s at the smallest
# shipped scale (0.1: 0.3 s), so detection still works the way it does at full scale.
WALL_FLOORS_S = {
    "peer_interval_s": 0.2,
    "peer_probe_timeout_s": 0.2,
    "mqtt.max_ingest_lag_s": 0.2,
    # A restarted agent must reopen its watchdog device within the timeout, and starting the
    # agent's Python process takes about a second of wall time at any time scale.
    "watchdog_timeout_s": 2.0,
    # The leader steps down when a renewal has not succeeded within renew_deadline_s. At 0.1
    # that is 0.5 s of wall time, less than the loop hiccups of a loaded 2-core machine: the
    # leader flapped (safe, but each takeover restarts the timers and delays resets). Floors
    # that keep lease_duration_s >= 1.1 x renew_deadline_s at every scale.
    "leader.renew_deadline_s": 1.0,
    "leader.lease_duration_s": 1.5,
}


@dataclass(frozen=True)
class SettingField:
    path: str  # dotted: "policy.period_s"
    default: Any
    is_int: bool
    minimum: float | None  # ge / gt bound from the model
    duration: bool  # a `*_s` field that the time scale compresses

    @property
    def env(self) -> str:
        return "WATCHDOG_" + self.path.replace(".", "__").upper()


def _bound(info: FieldInfo) -> float | None:
    for meta in info.metadata:
        if isinstance(meta, annotated_types.Ge):
            return float(meta.ge)  # type: ignore[arg-type]
        if isinstance(meta, annotated_types.Gt):
            return float(meta.gt)  # type: ignore[arg-type]
    return None


def _walk(model: type[BaseModel], prefix: str = "") -> Iterator[SettingField]:
    for name, info in model.model_fields.items():
        ann = info.annotation
        path = f"{prefix}{name}"
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _walk(ann, f"{path}.")
            continue
        default = info.get_default(call_default_factory=True)
        is_num = ann in (int, float)
        yield SettingField(
            path=path,
            default=default,
            is_int=ann is int,
            minimum=_bound(info),
            duration=is_num and name.endswith("_s") and name not in NOT_SCALED,
        )


FIELDS: dict[str, SettingField] = {f.path: f for f in _walk(Settings)}


@dataclass
class ScaledSettings:
    """What a run gives the watchdog's processes."""

    env: dict[str, str]
    real_world: dict[str, Any]  # every duration, in real-world seconds
    scaled: dict[str, Any]  # the same, as passed
    notes: list[str] = field(default_factory=list)


def unknown_settings(overrides: Mapping[str, Any]) -> list[str]:
    return [k for k in overrides if k not in FIELDS]


def scale_settings(overrides: Mapping[str, Any], time_scale: float) -> ScaledSettings:
    """Every duration (default or override) x `time_scale`; other overrides as given.

    Raises KeyError for a setting the service does not have and ValueError (naming the field)
    when the service would refuse the result."""
    bad = unknown_settings(overrides)
    if bad:
        raise KeyError(bad[0])
    env: dict[str, str] = {}
    real: dict[str, Any] = {}
    scaled: dict[str, Any] = {}
    notes: list[str] = []
    for path, f in FIELDS.items():
        if f.duration:
            value = float(overrides.get(path, f.default))
            real[path] = value
            s = value * time_scale
            if f.is_int:
                wanted = s
                s = math.ceil(s - 1e-9)
                if f.minimum is not None and s < f.minimum:
                    s = math.ceil(f.minimum)
                if s > wanted + 1e-9:
                    notes.append(
                        f"{path}: {value:g} s x {time_scale:g} = {wanted:.3g} s, the service "
                        f"accepts whole seconds >= {f.minimum:g}: using {s} s "
                        f"({s / time_scale:g} s real-world)"
                    )
                scaled[path] = int(s)
                env[f.env] = str(int(s))
            else:
                floor = WALL_FLOORS_S.get(path)
                if floor is not None and s < floor:
                    notes.append(
                        f"{path}: {value:g} s x {time_scale:g} = {s:.3g} s, kept at {floor:g} s "
                        f"wall ({floor / time_scale:g} s real-world): the test cluster's own "
                        "processing, not the failure model, would set it below that"
                    )
                    s = floor
                scaled[path] = round(s, 6)
                env[f.env] = f"{s:.6g}"
        elif path in overrides:
            value = overrides[path]
            env[f.env] = (
                str(value).lower()
                if isinstance(value, bool)
                else ",".join(map(str, value))
                if isinstance(value, list)
                else str(value)
            )
    check(scaled, overrides)
    return ScaledSettings(env=env, real_world=real, scaled=scaled, notes=notes)


def check(scaled: Mapping[str, Any], overrides: Mapping[str, Any]) -> None:
    """Validate the combination with the service's own model; ValueError names the field."""
    nested: dict[str, Any] = {}
    for path, value in {**overrides, **scaled}.items():
        parts = path.split(".")
        target = nested
        for p in parts[:-1]:
            target = target.setdefault(p, {})
        target[parts[-1]] = value
    try:
        Settings(**nested)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(settings)"
        raise ValueError(f"{loc}: {first['msg']}") from None
