"""The agent's view of the API: can it reach the API server, and what phase does its Node show.

The agent uses this to decide whether API contact still counts as contact (DESIGN §5): it does
only while the controller has not marked this node down. One GET of one Node per check.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from urllib.parse import quote

from watchdog.decide.state import STATE_ANNOTATION
from watchdog.observe.kube import KubeApi


def node_phase_probe(api: KubeApi, node: str) -> Callable[[], Awaitable[str | None]]:
    """A probe returning this node's persisted phase ("Healthy" when none is recorded).

    Raises (an `ObserveError`) when the API cannot be reached: that is not contact.
    """
    path = f"/api/v1/nodes/{quote(node, safe='')}"

    async def probe() -> str | None:
        obj = await api.request("GET", path)
        annotations = (obj.get("metadata") or {}).get("annotations") or {}
        raw = annotations.get(STATE_ANNOTATION)
        if not raw:
            return "Healthy"
        try:
            phase = json.loads(raw).get("phase")
        except (ValueError, AttributeError):
            return "Healthy"
        return phase if isinstance(phase, str) else "Healthy"

    return probe
