"""The `run` and `demo` subcommands of `watchdog-chaos` (registered by chaos/cli.py).

Owns: their arguments, the first-run notice while the control-plane binaries are built, the
report directory, printing the side-by-side table, and exit codes: 0 every invariant held and
every budget was met; 1 a run failed, missed a budget or a component crashed; 2 bad input (a
scenario file, an argument, a refused real-cluster action), always naming what was wrong.

Must not: hold behaviour; runner.py, report.py and real.py do the work.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PARALLEL = {
    "none": "one after another",
    "baselines": "the watchdog alone, then the baselines side by side",
    "all": "side by side",
}


def _out(line: str) -> None:
    print(line, flush=True)


def _scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be in (0, 1] (0.1 = ten times faster)")
    return value


def _systems(text: str) -> list[str]:
    from chaos.harness.scenario import SYSTEMS

    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in SYSTEMS]
    if bad or not values:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a comma-separated list of {', '.join(SYSTEMS)}"
        )
    return values


def _common(p: argparse.ArgumentParser) -> None:
    from chaos.cli_args import existing_dir

    p.add_argument(
        "--report",
        type=Path,
        metavar="DIR",
        help="write report.md, results.json and timeline.png here",
    )
    p.add_argument(
        "--control-plane-bin",
        type=existing_dir,
        metavar="DIR",
        help="directory with kube-apiserver, kube-controller-manager, kube-scheduler",
    )
    p.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep every component's log under the report directory (work/)",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="log output (-vv: debug)")


# --- run ------------------------------------------------------------------------------------------


def register_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from chaos.cli_args import positive_int

    p = sub.add_parser(
        "run",
        help="run a chaos scenario and write a report",
        description="Run SCENARIO (a file, or the name of a shipped scenario: see --list) on "
        "fresh local test clusters, one per system compared, or — with --kubeconfig and a kill "
        "method — against a real cluster. Exit 0 only if every invariant held and every "
        "budget was met.",
    )
    p.add_argument("scenario", nargs="?", metavar="SCENARIO", help="file or shipped name")
    p.add_argument("--list", action="store_true", help="list the shipped scenarios and exit")
    p.add_argument("--time-scale", type=_scale, metavar="F", help="override the scenario's")
    p.add_argument("--systems", type=_systems, metavar="LIST", help="override the systems compared")
    p.add_argument("--repetitions", type=positive_int, metavar="N", help="override")
    p.add_argument(
        "--parallel",
        choices=("none", "baselines", "all"),
        default="none",
        help="none: one system after another (default); baselines: the watchdog alone, then "
        "the baselines side by side; all: every system side by side (they share the CPU)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no live timeline lines")
    _common(p)
    real = p.add_argument_group(
        "real cluster",
        "Kill real nodes. Nothing is done without --target for every node the scenario "
        "touches and --yes; the plan is printed first.",
    )
    real.add_argument("--kubeconfig", type=Path, metavar="FILE", help="the real cluster")
    real.add_argument("--kill-method", choices=("ssh", "command"), help="how to kill a node")
    real.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="NODE",
        help="a node the scenario may kill, in the order the scenario names nodes (repeat)",
    )
    real.add_argument("--yes", action="store_true", help="really do it")
    real.add_argument(
        "--kill-command",
        metavar="TEMPLATE",
        help="--kill-method command: run locally, {node} replaced (e.g. 'virsh destroy {node}')",
    )
    real.add_argument(
        "--boot-id-command",
        metavar="TEMPLATE",
        help="--kill-method command: run locally, {node}/{address} replaced; prints the boot id "
        "or system UUID of the machine, read through the kill command's own channel (e.g. "
        "'virsh domuuid {node}'); required: checked against the Node's status.nodeInfo "
        "bootID / systemUUID before every kill",
    )
    real.add_argument(
        "--ssh-boot-id-command",
        default="cat /proc/sys/kernel/random/boot_id",
        metavar="CMD",
        help="--kill-method ssh: run on the node before every kill; its output must be the "
        "Node's status.nodeInfo.bootID",
    )
    real.add_argument(
        "--ssh-command",
        default="sudo sh -c 'echo o > /proc/sysrq-trigger'",
        metavar="CMD",
        help="--kill-method ssh: run on the node (default: immediate power-off via sysrq)",
    )
    real.add_argument(
        "--ssh-known-hosts",
        type=Path,
        metavar="FILE",
        help="--kill-method ssh: pinned host keys (required; no trust on first use)",
    )
    real.add_argument("--ssh-user", default="root", metavar="USER")
    real.add_argument("--ssh-key", type=Path, metavar="FILE", help="private key (else agent)")
    real.add_argument(
        "--ssh-address",
        default="{address}",
        metavar="TEMPLATE",
        help="host to connect to: {node} or {address} (the Node's InternalIP; default)",
    )
    real.add_argument(
        "--metrics-url",
        action="append",
        default=[],
        metavar="URL",
        help="a watchdog controller's /metrics to read (repeat)",
    )
    real.add_argument(
        "--vm-namespace", action="append", default=[], metavar="NS", help="default: all"
    )
    p.set_defaults(func=cmd_run)


def _setup(args: argparse.Namespace) -> None:
    from chaos.cli_args import setup_logging

    setup_logging(args.verbose)


def _binaries(bin_dir: Path | None) -> Any:
    """Find or build the control-plane binaries, saying so when a first build is needed."""
    import os

    from chaos.sim.binaries import cache_dir, ensure_binaries

    if bin_dir is None and not os.environ.get("KUBEBUILDER_ASSETS"):
        if not (cache_dir() / "kube-apiserver").exists():
            _out(
                "First run: building the control-plane binaries (kube-apiserver, "
                "kube-controller-manager, kube-scheduler) from their Go modules once — about "
                f"6 minutes on 2 cores; later runs reuse them from {cache_dir()}."
            )
    t0 = time.monotonic()
    found = ensure_binaries(bin_dir, progress=lambda line: _out(f"[control-plane] {line}"))
    if time.monotonic() - t0 > 5:
        _out(f"control-plane binaries ready in {time.monotonic() - t0:.0f}s")
    return found


def _report_dir(args: argparse.Namespace, name: str) -> Path:
    if args.report is not None:
        return Path(args.report)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("chaos-reports") / f"{name}-{stamp}"


def cmd_run(args: argparse.Namespace) -> int:
    from chaos.harness import scenario as scn

    if args.list:
        for name, path in scn.shipped().items():
            try:
                desc = scn.load(path).description.strip().split(". ")[0].rstrip(".") + "."
            except scn.ScenarioError as e:
                desc = f"(invalid: {e})"
            print(f"{name:<18} {desc}")
        return EXIT_OK
    if not args.scenario:
        print("watchdog-chaos run: error: argument SCENARIO: required", file=sys.stderr)
        return EXIT_USAGE
    _setup(args)
    try:
        sc = scn.load(args.scenario)
        sc = sc.with_overrides(
            time_scale=args.time_scale, systems=args.systems, repetitions=args.repetitions
        )
    except scn.ScenarioError as e:
        print(f"watchdog-chaos run: invalid scenario:\n{e}", file=sys.stderr)
        return EXIT_USAGE
    source = str(scn.resolve(args.scenario))
    real_args = (args.kill_method, args.target, args.yes, args.kill_command, args.metrics_url)
    if args.kubeconfig is not None or any(real_args):
        from chaos.harness import real

        return real.cmd_real(args, sc, source)
    directory = _report_dir(args, sc.name)
    return _run_local(args, sc, source, directory)


def next_valid_scale(scale: float, invalid: bool, *, fixed: bool) -> float | None:
    """The time scale to run again at, or None to keep this run: an invalid run (the test
    cluster's own lag too large against the compressed timings, chaos/sim/loop_lag.py) is run
    again 2.5x slower, up to real time, unless the operator fixed the scale."""
    if not invalid or fixed or scale >= 1.0:
        return None
    return min(1.0, round(scale * 2.5, 4))


def _run_local(args: argparse.Namespace, sc: Any, source: str, directory: Path) -> int:
    from chaos.harness import report
    from chaos.harness.runner import RunOptions, run_scenario
    from chaos.sim.binaries import BinariesUnavailable

    try:
        binaries = _binaries(args.control_plane_bin)
    except BinariesUnavailable as e:
        print(f"watchdog-chaos {args.command}: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted while building the control plane: nothing was run", file=sys.stderr)
        return 130
    opts = RunOptions(
        binaries=binaries,
        progress=_out,
        parallel=args.parallel,
        work_root=(directory / "work") if args.keep_logs else None,
        live=not getattr(args, "quiet", False),
    )
    while True:
        _out(
            f"scenario {sc.name}: {', '.join(sc.systems)} at time scale {sc.time_scale:g} "
            f"(every timing x{sc.time_scale:g}), {sc.repetitions} repetition(s), "
            f"{PARALLEL[args.parallel]}"
        )
        try:
            result = asyncio.run(run_scenario(sc, source, opts))
        except KeyboardInterrupt:
            print("interrupted: every cluster was stopped", file=sys.stderr)
            return 130
        invalid = any(r.sim_lag and not r.sim_lag["valid"] for r in result.runs)
        larger = next_valid_scale(sc.time_scale, invalid, fixed=args.time_scale is not None)
        if larger is None:
            break
        _out(report.validity_line(result).replace("**", ""))
        _out(
            f"rerunning at time scale {larger:g}, where this machine's own lag weighs less "
            "against the modelled timings (--time-scale F runs at F only)"
        )
        sc = sc.with_overrides(time_scale=larger)
    v = report.write(result, directory)
    _out("")
    _out(report.side_by_side(result))
    _out("")
    for line in report.invariant_lines(result):
        _out(line)
    _out(report.validity_line(result).replace("**", ""))
    _out(f"{'PASS' if v.ok else 'FAIL'} in {result.wall_s:.0f}s; report: {directory}/report.md")
    for f in v.failures:
        _out(f"  - {f}")
    return EXIT_OK if v.ok else EXIT_FAILED


# --- demo -----------------------------------------------------------------------------------------


def register_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="power off a node of a local test cluster: watchdog vs Harvester 1.7 vs Kubernetes",
        description="The main job on embedded defaults: a local test cluster (six nodes, 24 "
        "VMs, embedded MQTT broker, real watchdog processes), one node loses power; the same "
        "for Harvester 1.7 and Kubernetes alone; prints the failover timeline as it happens and "
        "a side-by-side table. No network, no root.",
    )
    p.add_argument(
        "--time-scale",
        type=_scale,
        default=None,
        metavar="F",
        help="compress every timing by F (default 0.1: about two minutes in all)",
    )
    p.add_argument(
        "--sequential",
        action="store_true",
        help="run the three systems one after another (default: the watchdog alone, then "
        "Harvester and Kubernetes side by side)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="real-world seconds after the power-off at which a run stops waiting (default 500)",
    )
    _common(p)
    p.set_defaults(func=cmd_demo, quiet=False)


def cmd_demo(args: argparse.Namespace) -> int:
    from chaos.harness.demo import demo_scenario

    _setup(args)
    sc = demo_scenario(args.time_scale, args.timeout)
    args.parallel = "none" if args.sequential else "baselines"
    directory = args.report or Path(tempfile.mkdtemp(prefix="watchdog-chaos-demo-"))
    _out(
        "watchdog-chaos demo: 6 nodes, 24 VMs, node-6 loses power — watchdog vs Harvester 1.7 "
        "vs Kubernetes alone, each on a fresh local test cluster"
    )
    return _run_local(args, sc, "demo", Path(directory))
