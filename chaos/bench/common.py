"""What every benchmark shares: the machine it ran on, process accounting, percentiles, tables
and the JSON report.

Owns: `machine()` (cores, memory, load averages before and after, date, git revision: every
number is printed next to the load it was measured under, because the machine is shared),
`ProcStat` / `ProcSampler` (CPU seconds and RSS of any process from /proc, no psutil),
`summary()` (nearest-rank percentiles), `table()` and `write_report()`.

Must not: start anything or measure anything by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import resource
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path("reports/bench")
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


# --- the machine ------------------------------------------------------------------------------


def loadavg() -> tuple[float, float, float]:
    return os.getloadavg()


def machine() -> dict[str, Any]:
    """Cores, memory, CPU model, kernel, Python, date and load: what a reader needs to judge a
    number from a shared 2-core box."""
    mem_total = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    rev = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cores": os.cpu_count(),
        "memory_gib": round(mem_total / 2**30, 1),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "git": rev,
        "load_at_start": [round(x, 2) for x in loadavg()],
    }


# --- processes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcStat:
    """One reading of a process: CPU seconds (user+system, children excluded) and RSS."""

    pid: int
    at: float  # time.monotonic()
    cpu_s: float
    rss_bytes: int
    # Seconds spent runnable but waiting for a CPU (/proc/<pid>/schedstat, all threads of the
    # main task): how much a busy machine held this process back.
    wait_s: float = 0.0

    @classmethod
    def read(cls, pid: int) -> ProcStat | None:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            statm = Path(f"/proc/{pid}/statm").read_text()
        except OSError:
            return None
        # The command name may contain spaces and parentheses: split after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        utime, stime = int(fields[11]), int(fields[12])
        rss_pages = int(statm.split()[1])
        wait_s = 0.0
        with contextlib.suppress(OSError, ValueError, IndexError):
            wait_s = int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
        return cls(pid, time.monotonic(), (utime + stime) / _CLK_TCK, rss_pages * _PAGE, wait_s)


def self_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


@dataclass
class ProcSampler:
    """Samples named processes every `interval_s` (CPU seconds, RSS) until stopped.

    `window(name, t0, t1)` gives CPU seconds used and peak RSS between two monotonic instants,
    from the samples nearest to them.
    """

    pids: dict[str, int]
    interval_s: float = 1.0
    samples: dict[str, list[ProcStat]] = field(default_factory=dict)

    def sample(self) -> None:
        for name, pid in self.pids.items():
            s = ProcStat.read(pid)
            if s is not None:
                self.samples.setdefault(name, []).append(s)

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval_s)

    def window(self, name: str, t0: float, t1: float) -> dict[str, float] | None:
        rows = [s for s in self.samples.get(name, ()) if t0 - 0.01 <= s.at <= t1 + 0.01]
        if len(rows) < 2:
            return None
        first, last = rows[0], rows[-1]
        span = last.at - first.at
        cpu = last.cpu_s - first.cpu_s
        return {
            "seconds": round(span, 2),
            "cpu_s": round(cpu, 3),
            "cpu_cores": round(cpu / span, 3) if span > 0 else 0.0,
            # Time it wanted a CPU and waited for one (run queue), per second: contention.
            "runqueue_wait_per_s": round((last.wait_s - first.wait_s) / span, 3) if span else 0.0,
            "rss_mib_max": round(max(s.rss_bytes for s in rows) / 2**20, 1),
            "rss_mib_last": round(last.rss_bytes / 2**20, 1),
        }


# --- statistics -------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]


def summary(values: Iterable[float], digits: int = 3) -> dict[str, float]:
    vals = list(values)
    if not vals:
        return {"n": 0}
    return {
        "n": len(vals),
        "min": round(min(vals), digits),
        "p50": round(percentile(vals, 50), digits),
        "p95": round(percentile(vals, 95), digits),
        "max": round(max(vals), digits),
        "mean": round(sum(vals) / len(vals), digits),
    }


# --- output -----------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain Markdown table (what PERFORMANCE.md shows, and readable in a terminal)."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = []
    for n, row in enumerate(cells):
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if n == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def write_report(out_dir: Path, name: str, report: dict[str, Any]) -> Path:
    """`<out>/<name>.json`, with the machine and the load at the end filled in."""
    report.setdefault("machine", machine())
    report["machine"]["load_at_end"] = [round(x, 2) for x in loadavg()]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)
    return path


def load_line(m: dict[str, Any]) -> str:
    end = m.get("load_at_end") or [round(x, 2) for x in loadavg()]
    return (
        f"machine: {m.get('cores')} cores, {m.get('memory_gib')} GiB, load {m.get('load_at_start')}"
        f" → {end} (1/5/15 min), {m.get('date')}, git {m.get('git') or '?'}"
    )
