"""Falsely ready launcher pods: Ready=True on a node nobody can reach (kubernetes #112733)."""

from __future__ import annotations

from collections.abc import Iterable

from watchdog.decide.observations import LauncherPod


def falsely_ready(pods: Iterable[LauncherPod]) -> tuple[LauncherPod, ...]:
    """Launcher pods still claiming Ready on an unreachable node; Terminating ones excluded
    because KubeVirt already reports their VMI as not ready (PodTerminating)."""
    return tuple(p for p in pods if p.ready and not p.terminating)
