"""Reading the watchdog's controllers from outside: their /metrics, parsed.

Owns: `Scrape` (one /metrics answer, queried by sample name and a subset of labels), `scrape()`
(GET with a short timeout; None when the replica does not answer, as a powered-off one will not),
and `summary()` (the samples a chaos report keeps: failover histograms, transitions, holds,
leadership).

Must not: reach into a controller's process; /metrics is the only door.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

HISTOGRAMS = (
    "watchdog_detection_seconds",
    "watchdog_reset_seconds",
    "watchdog_reschedule_seconds",
    "watchdog_failover_seconds",
)


@dataclass(frozen=True)
class Scrape:
    samples: dict[str, list[tuple[dict[str, str], float]]]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
        return cls(samples)

    def get(self, name: str, **labels: str) -> float:
        return sum(
            v
            for have, v in self.samples.get(name, ())
            if all(have.get(k) == want for k, want in labels.items())
        )

    def labelled(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for have, v in self.samples.get(name, ()):
            out[have.get(label, "")] = out.get(have.get(label, ""), 0.0) + v
        return out


async def scrape(url: str, timeout_s: float = 1.0) -> Scrape | None:
    """GET `url` (…/metrics); None if it does not answer in time."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
            session.get(url) as resp,
        ):
            if resp.status != 200:
                return None
            return Scrape.parse(await resp.text())
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
        return None


def summary(m: Scrape) -> dict[str, Any]:
    out: dict[str, Any] = {"leader": m.get("watchdog_leader")}
    for h in HISTOGRAMS:
        short = h.removeprefix("watchdog_").removesuffix("_seconds")
        count, total = m.get(f"{h}_count"), m.get(f"{h}_sum")
        out[short] = {"count": count, "sum_s": round(total, 3)}
    transitions: dict[str, float] = {}
    for labels, v in m.samples.get("watchdog_transitions_total", ()):
        if v:
            key = f"{labels.get('from')}→{labels.get('to')} ({labels.get('reason')})"
            transitions[key] = transitions.get(key, 0.0) + v
    out["transitions"] = transitions
    out["resets_held"] = {
        k: v for k, v in m.labelled("watchdog_resets_held", "reason").items() if v
    }
    # Per-node holds (NoArmedFence, WeakFence) count as holds seen too.
    for k, v in m.labelled("watchdog_nodes_held", "reason").items():
        if v:
            out["resets_held"].setdefault(k, v)
    out["actions"] = {
        f"{labels.get('action')}/{labels.get('result')}": v
        for labels, v in m.samples.get("watchdog_actions_total", ())
        if v
    }
    return out
