"""`watchdog-chaos bench BENCHMARK [options]` (and `python -m chaos.bench ...`).

Owns: the options of each benchmark, the `--smoke` sizes (seconds, for CI), printing each
result table with the machine and load it was measured under, and writing
`<out>/<benchmark>.json` (default `reports/bench/`).

Exit codes: 0 done (the numbers may still miss a target: that is a result, not an error);
1 the benchmark could not run (a component failed to start, a load generator died);
2 bad input.

Must not: measure anything itself (the benchmark modules do).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chaos.bench.common import DEFAULT_OUT, load_line, write_report
from chaos.cli_args import EXIT_FAILED, EXIT_OK, EXIT_USAGE, existing_dir, int_list, positive

BENCHMARKS = ("ingest", "cache", "decide", "failover", "testcluster")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"directory for <benchmark>.json (default {DEFAULT_OUT})",
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes that run in seconds (CI)")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="keep every component's logs here (default: a temporary directory, removed)",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging")


def add_parser(subparsers: Any) -> None:
    """Register `bench` (with one sub-command per benchmark) on an argparse subparsers object."""
    bench = subparsers.add_parser(
        "bench",
        help="scale and throughput benchmarks (DESIGN §10)",
        description="Scale and throughput benchmarks of node-watchdog. Each prints a table and "
        "writes <out>/<benchmark>.json; --smoke runs tiny sizes in seconds.",
    )
    sub = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")

    p = sub.add_parser(
        "ingest",
        help="N agents at 1 Hz → Mosquitto → one controller process: CPU, RSS, detection",
    )
    _common(p)
    p.add_argument("--nodes", type=int_list, default=(1000, 5000), help="agent counts")
    p.add_argument("--window", type=positive(float), default=60.0, help="steady window, s")
    p.add_argument("--kill", type=int, default=5, help="nodes killed under load")
    p.add_argument("--kill-gap", type=positive(float), default=4.0, help="s between kills")
    p.add_argument("--connections", type=int, default=0, help="MQTT connections (0: N/500)")
    p.add_argument(
        "--lease-renew", type=positive(float), default=10.0, help="Lease renewal interval, s"
    )
    p.add_argument(
        "--lease-stale-after",
        type=positive(float),
        default=None,
        help="the controller's lease_stale_after_s (default: its own, 15 s)",
    )
    p.add_argument("--profile", type=float, default=0.0, help="py-spy the controller for S s")
    p.add_argument(
        "--floor",
        type=float,
        default=20.0,
        help="seconds a bare subscriber (the floor) is measured under the same load; 0: skip",
    )
    p.add_argument(
        "--no-peers",
        dest="peers",
        action="store_false",
        help="killed nodes' ring predecessors do not report them (Lease-only corroboration)",
    )
    p.add_argument(
        "--controller-source",
        type=existing_dir,
        default=None,
        help="run the controller from the `watchdog` package in DIR (compare a baseline)",
    )
    p.add_argument(
        "--controller-nice",
        type=int,
        default=None,
        help="run the controller under `nice -n N` (negative: priority on a shared machine)",
    )
    p.set_defaults(func=handle, bench_run=_run_ingest)

    p = sub.add_parser(
        "cache", help="VMIs + launcher pods in the test cluster: sync time, RSS, events, 410"
    )
    _common(p)
    p.add_argument("--vmis", type=int_list, default=(10_000, 20_000, 50_000), help="sizes")
    p.add_argument("--nodes", type=positive(int), default=1000, help="Node objects")
    p.add_argument("--events", type=positive(int), default=5000, help="pod updates measured")
    p.add_argument(
        "--controller-source", type=existing_dir, default=None, help="controller package directory"
    )
    p.set_defaults(func=handle, bench_run=_run_cache)

    p = sub.add_parser("decide", help="decide() evaluations/s; tick cost 1 vs all changed")
    _common(p)
    p.add_argument("--nodes", type=positive(int), default=5000, help="nodes for decide()")
    p.add_argument("--sizes", type=int_list, default=(500, 5000), help="cluster sizes for the tick")
    p.add_argument("--pods-per-node", type=int, default=20, help="launcher pods per node")
    p.set_defaults(func=handle, bench_run=_run_decide)

    p = sub.add_parser(
        "failover", help="power-off trials (chaos harness): watchdog vs Harvester 1.7 / 1.6"
    )
    _common(p)
    p.add_argument("--trials", type=positive(int), default=5, help="power-offs per system")
    p.add_argument(
        "--systems",
        default="watchdog,harvester-1.7,harvester-1.6",
        help="comma-separated: watchdog, harvester-1.7, harvester-1.6",
    )
    p.add_argument(
        "--fence",
        default="self",
        help="comma-separated watchdog fence modes: self (agent self-fence, default), power "
        "(fence_mode power: fence_redfish against a Redfish BMC per machine); each adds a row",
    )
    p.add_argument(
        "--period",
        type=float,
        default=None,
        metavar="S",
        help="the watchdog's reset period (policy.period_s, real-world s > 0; default: the "
        "shipped 15 s, which bounds both fence modes alike); 1 shows what each fence proof "
        "alone takes",
    )
    p.add_argument("--time-scale", type=positive(float), default=0.25, help="time compression")
    p.set_defaults(func=handle, bench_run=_run_failover)

    p = sub.add_parser(
        "testcluster", help="the test cluster at scale: create time, Lease load, RSS (issue 3)"
    )
    _common(p)
    p.add_argument("--nodes", type=positive(int), default=1000, help="simulated nodes")
    p.add_argument("--vms", type=positive(int), default=30_000, help="VMs (one launcher pod each)")
    p.add_argument("--window", type=positive(float), default=60.0, help="steady window, s")
    p.add_argument("--time-scale", type=positive(float), default=1.0, help="time compression")
    p.set_defaults(func=handle, bench_run=_run_testcluster)

    p = sub.add_parser(
        "sweep", help="a cut-off agent's roster sweep: probes, wall time and CPU per round"
    )
    _common(p)
    p.add_argument("--sizes", type=int_list, default=(100, 1000, 5000), help="cluster sizes")
    p.add_argument("--rounds", type=positive(int), default=5, help="rounds per size")
    p.set_defaults(func=handle, bench_run=_run_sweep)


# --- handlers ---------------------------------------------------------------------------------


def _run_ingest(args: argparse.Namespace) -> dict[str, Any]:
    from chaos.bench import ingest

    if args.smoke:
        return ingest.run(
            sizes=(30,),
            window_s=4.0,
            kill=1,
            kill_gap_s=1.0,
            lease_renew_s=1.0,
            controller_env={"WATCHDOG_LEASE_STALE_AFTER_S": "3"},
            profile_s=0.0,
            floor_s=2.0,
            controller_source=args.controller_source,
            progress=_progress,
        )
    return ingest.run(
        sizes=args.nodes,
        window_s=args.window,
        kill=args.kill,
        kill_gap_s=args.kill_gap,
        connections=args.connections,
        lease_renew_s=args.lease_renew,
        controller_env=(
            {"WATCHDOG_LEASE_STALE_AFTER_S": f"{args.lease_stale_after:g}"}
            if args.lease_stale_after
            else None
        ),
        profile_s=args.profile,
        floor_s=args.floor,
        peers=args.peers,
        controller_source=args.controller_source,
        profile_dir=args.out,
        controller_nice=args.controller_nice,
        work_dir=args.work_dir,
        progress=_progress,
    )


def _run_cache(args: argparse.Namespace) -> dict[str, Any]:
    from chaos.bench import cache

    if args.smoke:
        return cache.run(
            sizes=(300,),
            nodes=20,
            events=200,
            controller_source=args.controller_source,
            progress=_progress,
            pace=cache.Pace(settle_s=1.0, quiet_s=3.0, watch_timeout_s=5),
        )
    return cache.run(
        sizes=args.vmis,
        nodes=args.nodes,
        events=args.events,
        controller_source=args.controller_source,
        work_dir=args.work_dir,
        progress=_progress,
    )


def _run_decide(args: argparse.Namespace) -> dict[str, Any]:
    from chaos.bench import decide

    if args.smoke:
        return decide.run(nodes=200, sizes=(50, 200), pods_per_node=5, rounds=2, single_ticks=20)
    return decide.run(nodes=args.nodes, sizes=args.sizes, pods_per_node=args.pods_per_node)


def _run_failover(args: argparse.Namespace) -> dict[str, Any]:
    from chaos.bench import failover

    systems = tuple(s.strip() for s in args.systems.split(",") if s.strip())
    unknown = [s for s in systems if s not in failover.SYSTEMS]
    if unknown:
        raise _Usage(f"--systems: unknown {unknown}; choose from {', '.join(failover.SYSTEMS)}")
    fences = tuple(f.strip() for f in args.fence.split(",") if f.strip())
    bad = [f for f in fences if f not in failover.FENCES]
    if bad or not fences:
        raise _Usage(f"--fence: unknown {bad or fences}; choose from {', '.join(failover.FENCES)}")
    if "power" in fences and "watchdog" not in systems:
        raise _Usage("--fence power measures the watchdog: add watchdog to --systems")
    if args.period is not None and not args.period > 0:
        raise _Usage(f"--period: {args.period:g}; give seconds > 0 (the policy refuses 0)")
    if args.smoke:
        return failover.run(
            systems=("watchdog",),
            fences=fences,
            trials=1,
            time_scale=0.25,
            progress=_progress,
            period_s=args.period,
            work_dir=args.work_dir,
        )
    return failover.run(
        systems=systems,
        fences=fences,
        trials=args.trials,
        time_scale=args.time_scale,
        progress=_progress,
        period_s=args.period,
        work_dir=args.work_dir,
    )


def _run_sweep(args: argparse.Namespace) -> dict[str, Any]:
    from chaos.bench import sweep

    if args.smoke:
        return sweep.run(sizes=(20,), rounds=2)
    return sweep.run(sizes=tuple(args.sizes), rounds=args.rounds)


def _run_testcluster(args: argparse.Namespace) -> dict[str, Any]:
    from chaos.bench import testcluster

    if args.smoke:
        return testcluster.run(nodes=5, vms=10, window_s=4.0, time_scale=0.5, progress=_progress)
    return testcluster.run(
        nodes=args.nodes,
        vms=args.vms,
        window_s=args.window,
        time_scale=args.time_scale,
        progress=_progress,
    )


RENDER = {
    "ingest": "chaos.bench.ingest",
    "cache": "chaos.bench.cache",
    "decide": "chaos.bench.decide",
    "failover": "chaos.bench.failover",
    "testcluster": "chaos.bench.testcluster",
    "sweep": "chaos.bench.sweep",
}


class _Usage(Exception):
    pass


def _progress(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def handle(args: argparse.Namespace) -> int:
    """Run the chosen benchmark, print its table, write its JSON."""
    import importlib

    logging.basicConfig(
        level=logging.DEBUG
        if args.verbose > 1
        else logging.INFO
        if args.verbose
        else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        report = args.bench_run(args)
    except _Usage as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_FAILED
    except Exception as e:
        traceback.print_exc()
        print(f"bench {args.benchmark} failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    report["smoke"] = bool(args.smoke)
    words = sys.argv[1:]
    if "bench" not in words[:1]:
        words = ["bench", *words]
    report["command"] = "watchdog-chaos " + " ".join(words)
    path = write_report(args.out, args.benchmark, report)
    module = importlib.import_module(RENDER[args.benchmark])
    print(f"\n== bench {args.benchmark}{' (smoke)' if args.smoke else ''}")
    print(load_line(report["machine"]))
    print(module.render(report))
    print(f"\nJSON: {path}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m chaos.bench", description="node-watchdog benchmarks"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m chaos.bench [bench] BENCHMARK ...`: the leading `bench` is optional."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    if not args_in or args_in[0] != "bench":
        args_in = ["bench", *args_in]
    args = build_parser().parse_args(args_in)
    return handle(args)
