"""The `protosim` subcommand of `watchdog-chaos` (registered by chaos/cli.py).

Owns: its arguments, the progress and the summary it prints, `results.json`, the split of the
seeds over worker processes, and the exit code: 0 when no schedule broke an invariant, 1 when
one did (its seed and what broke are printed; `--replay SEED` prints its trace), 2 on bad
input.

Must not: hold behaviour; schedule.py and world.py do the work.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
CHUNK = 500  # schedules per task handed to a worker: progress every chunk


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from chaos.cli_args import positive_int

    p = sub.add_parser(
        "protosim",
        help="random fault schedules on a simulation of the fencing protocol, in virtual time",
        description="Play SCHEDULES random fault schedules (1 to 4 overlapping faults over "
        "3 to 6 nodes, seeds SEED, SEED+1, ...) on a deterministic simulation of the protocol "
        "in virtual time: the real controller and the real fence rules, everything else "
        "modelled (chaos/protosim/world.py says what). Every schedule is checked at every "
        "step: no VM runs twice, no node's VMs are reset while one still runs there, no node "
        "the controller heard all along is fenced; and at the end, after every fault is "
        "healed, every VM runs. A failure prints its seed; --replay SEED prints its trace.",
    )
    p.add_argument("--schedules", type=positive_int, default=1000, metavar="N")
    p.add_argument("--seed", type=int, default=1, metavar="S", help="the first seed")
    p.add_argument(
        "--faults",
        default=None,
        metavar="KIND,...",
        help="draw only these fault kinds (default: all of them)",
    )
    p.add_argument("--workers", type=positive_int, default=1, metavar="N", help="processes")
    p.add_argument("--replay", type=int, default=None, metavar="SEED", help="trace one seed")
    p.add_argument("--out", type=Path, default=None, help="write results.json here")
    p.set_defaults(func=run)


def _kinds(text: str | None) -> list[str] | None:
    from chaos.protosim.schedule import KINDS

    if text is None:
        return None
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        known = ", ".join(sorted(KINDS))
        raise ValueError(f"--faults: unknown fault kind(s) {unknown or text!r}; known: {known}")
    return kinds


def _chunk(first: int, count: int, kinds: list[str] | None) -> dict[str, Any]:
    """One worker's share: its counts and its failures (picklable)."""
    from chaos.protosim.schedule import campaign

    logging.disable(logging.WARNING)  # the controller's own logs, thousands per schedule
    c = campaign(first, count, kinds)
    return {
        "schedules": c.schedules,
        "resets": c.resets,
        "faults": dict(c.faults),
        "violations": [
            {"seed": o.schedule.seed, "schedule": o.schedule.describe(), "violation": o.violation}
            for o in c.violations
        ],
    }


def run(args: argparse.Namespace) -> int:
    try:
        kinds = _kinds(args.faults)
    except ValueError as e:
        print(f"watchdog-chaos protosim: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.replay is not None:
        return _replay(args.replay, kinds)
    started = time.monotonic()
    chunks = [
        (s, min(CHUNK, args.seed + args.schedules - s), kinds)
        for s in range(args.seed, args.seed + args.schedules, CHUNK)
    ]
    totals: dict[str, Any] = {"schedules": 0, "resets": 0, "faults": Counter(), "violations": []}
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for part in pool.map(_chunk_args, chunks):
            totals["schedules"] += part["schedules"]
            totals["resets"] += part["resets"]
            totals["faults"].update(part["faults"])
            totals["violations"].extend(part["violations"])
            print(
                f"  {totals['schedules']:,} of {args.schedules:,} schedules, "
                f"{len(totals['violations'])} violation(s), "
                f"{time.monotonic() - started:.0f}s",
                flush=True,
            )
    elapsed = time.monotonic() - started
    print(
        f"protosim: {totals['schedules']:,} schedules (seeds {args.seed}.."
        f"{args.seed + args.schedules - 1}) in {elapsed:.0f}s with {args.workers} worker(s); "
        f"{totals['resets']:,} VM resets; {len(totals['violations'])} violation(s)"
    )
    for kind, n in sorted(totals["faults"].items()):
        print(f"  {kind:16s} {n:7,} faults drawn")
    for v in totals["violations"][:20]:
        print(f"VIOLATION {v['schedule']}\n  {v['violation']}\n  replay: --replay {v['seed']}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        doc = {**totals, "faults": dict(totals["faults"]), "seconds": round(elapsed, 1)}
        doc.update(first_seed=args.seed, workers=args.workers, kinds=kinds)
        (args.out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
        print(f"results: {args.out / 'results.json'}")
    return EXIT_FAILED if totals["violations"] else EXIT_OK


def _chunk_args(chunk: tuple[int, int, list[str] | None]) -> dict[str, Any]:
    return _chunk(*chunk)


def _replay(seed: int, kinds: list[str] | None) -> int:
    from chaos.protosim.schedule import replay

    logging.disable(logging.WARNING)
    outcome = replay(seed, kinds)
    print(outcome.schedule.describe())
    for line in outcome.trace:
        print(line)
    if outcome.violation is None:
        print("no invariant broken")
        return EXIT_OK
    print(f"VIOLATION {outcome.violation}")
    return EXIT_FAILED
