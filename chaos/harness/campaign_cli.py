"""The `campaign` subcommand of `watchdog-chaos` (registered by chaos/cli.py).

Owns: its arguments, the report directory (campaign.md, results.json, one scenario file per
trial) and the exit code: 0 when no trial found a new hole (a trial that falls into a known,
open hole is reported, not failed), 1 when one did, 2 on bad input.

Must not: hold behaviour; campaign.py does the work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from chaos.harness.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, _binaries, _out, _scale, _setup


def register_campaign(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from chaos.cli_args import existing_dir, positive_int
    from chaos.harness.campaign import KINDS, CampaignSpec

    d = CampaignSpec()
    p = sub.add_parser(
        "campaign",
        help="random fault schedules on fresh test clusters, checked against the ledger",
        description="Draw TRIALS fault schedules from SEED (1 to --max-faults overlapping "
        "faults each, from --faults) and run each on a fresh local test cluster with the "
        "watchdog. Every trial must show no split-brain, no lost VM, no false reset, no fence "
        "of a node no fault touched, and every interrupted VM running again. Each schedule is "
        "saved as a scenario file that `watchdog-chaos run FILE` replays; the same seed draws "
        "the same schedules. Exit 0 unless a trial found a new hole.",
    )
    p.add_argument("--trials", type=positive_int, default=d.trials, metavar="N")
    p.add_argument("--seed", type=int, default=d.seed, metavar="S")
    p.add_argument("--nodes", type=positive_int, default=d.nodes, metavar="N")
    p.add_argument("--vms", type=positive_int, default=d.vms, metavar="N")
    p.add_argument("--time-scale", type=_scale, default=d.time_scale, metavar="F")
    p.add_argument(
        "--faults",
        default=",".join(KINDS),
        metavar="LIST",
        help=f"comma-separated fault kinds to draw from (default: all): {', '.join(KINDS)}",
    )
    p.add_argument("--max-faults", type=positive_int, default=d.max_faults, metavar="N")
    p.add_argument(
        "--duration",
        type=float,
        default=d.duration_s,
        metavar="S",
        help="the longest a fault lasts, real-world seconds (default %(default)g)",
    )
    p.add_argument(
        "--shrink",
        action="store_true",
        help="rerun a failing trial's schedule without each fault, then with halved "
        "durations, and save the smallest that still fails (trial-K-min.yaml)",
    )
    p.add_argument("--report", type=Path, metavar="DIR", help="where to write the results")
    p.add_argument(
        "--control-plane-bin",
        type=existing_dir,
        metavar="DIR",
        help="directory with kube-apiserver, kube-controller-manager, kube-scheduler",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="log output (-vv: debug)")
    p.set_defaults(func=cmd_campaign)


def cmd_campaign(args: argparse.Namespace) -> int:
    from chaos.harness import campaign
    from chaos.harness.runner import RunOptions
    from chaos.sim.binaries import BinariesUnavailable

    spec = campaign.CampaignSpec(
        trials=args.trials,
        seed=args.seed,
        nodes=args.nodes,
        vms=args.vms,
        time_scale=args.time_scale,
        faults=tuple(f.strip() for f in args.faults.split(",") if f.strip()),
        max_faults=args.max_faults,
        duration_s=args.duration,
    )
    problems = spec.problems()
    if problems:
        for line in problems:
            print(f"watchdog-chaos campaign: {line}", file=sys.stderr)
        print(f"fault kinds: {campaign.known_kinds()}", file=sys.stderr)
        return EXIT_USAGE
    _setup(args)
    directory = args.report or Path("chaos-reports") / (
        f"campaign-{spec.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    try:
        binaries = _binaries(args.control_plane_bin)
    except BinariesUnavailable as e:
        print(f"watchdog-chaos campaign: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    opts = RunOptions(binaries=binaries, progress=lambda _: None, live=False)
    _out(
        f"campaign: {spec.trials} trials from seed {spec.seed}, {spec.nodes} nodes, "
        f"{spec.vms} VMs, time scale {spec.time_scale:g}, up to {spec.max_faults} faults of "
        f"up to {spec.duration_s:g}s each; report: {directory}"
    )
    try:
        trials = asyncio.run(
            campaign.run_campaign(
                spec,
                directory,
                campaign.runner_for(opts),
                shrink_failures=args.shrink,
                progress=_out,
            )
        )
    except KeyboardInterrupt:
        print("interrupted: every cluster was stopped", file=sys.stderr)
        return 130
    lines = campaign.summary_lines(spec, trials)
    (directory / "results.json").write_text(
        json.dumps(campaign.results_json(spec, trials), indent=2) + "\n"
    )
    (directory / "campaign.md").write_text("```\n" + "\n".join(lines) + "\n```\n")
    _out("")
    for line in lines:
        _out(line)
    return EXIT_FAILED if any(t.verdict == "FAIL" for t in trials) else EXIT_OK
