"""`node-watchdog` command line: parses arguments, loads settings, hands over to a role.

Invalid configuration exits 2 naming the field, the value given and why it was refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError

from watchdog import __version__
from watchdog.runtime.settings import CONFIG_FILE_ENV, ConfigFileError, Settings, load_settings

EXIT_CONFIG = 2


def _env_name(loc: Sequence[int | str]) -> str:
    return "WATCHDOG_" + "__".join(str(p) for p in loc).upper()


def format_validation_error(err: ValidationError) -> str:
    """One line per problem: field, value, reason, and where to set it."""
    lines = ["invalid configuration:"]
    for e in err.errors():
        loc = [p for p in e["loc"] if p != "__root__"]
        field = ".".join(str(p) for p in loc) or "(settings)"
        where = f" (env {_env_name(loc)} or key in {CONFIG_FILE_ENV})" if loc else ""
        value = e.get("input")
        shown = "" if not loc or isinstance(value, dict) else f" = {value!r}"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {field}{shown}: {msg}{where}")
    return "\n".join(lines)


def settings_or_exit(**overrides: Any) -> Settings:
    try:
        return load_settings(**overrides)
    except ValidationError as e:
        print(format_validation_error(e), file=sys.stderr)
    except ConfigFileError as e:
        print(f"invalid configuration: {e}", file=sys.stderr)
    raise SystemExit(EXIT_CONFIG)


def masked(settings: Settings) -> dict[str, Any]:
    """The effective configuration as JSON-able data, secrets replaced by '***'."""
    data: dict[str, Any] = json.loads(settings.model_dump_json())
    if settings.mqtt.password is not None:
        data["mqtt"]["password"] = "***"
    return data


def cmd_config(args: argparse.Namespace) -> int:
    if args.schema:
        print(json.dumps(Settings.model_json_schema(), indent=2, sort_keys=True))
        return 0
    settings = settings_or_exit()
    print(json.dumps(masked(settings), indent=2, sort_keys=True))
    return 0


def _role(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        overrides = {"dry_run": True} if getattr(args, "dry_run", False) else {}
        settings = settings_or_exit(**overrides)
        from watchdog.runtime import app

        return int(app.main(name, settings, args))

    return run


def build_parser(prog: str = "node-watchdog") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Keeps KubeVirt/Harvester VMs alive when a node dies. Configuration comes "
        f"from WATCHDOG_* environment variables and the YAML file named by {CONFIG_FILE_ENV}; "
        "see `node-watchdog config --schema`.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("config", help="print the effective configuration (secrets masked)")
    p.add_argument("--schema", action="store_true", help="print the JSON schema instead")
    p.set_defaults(func=cmd_config)

    roles = {
        "run": "agent + leader-elected controller in one process (test cluster, small "
        "clusters: every node then holds the controller's credentials)",
        "agent": "only the node agent: heartbeats, Last Will, self-fencing (the DaemonSet)",
        "controller": "only the leader-elected controller: detection, fencing, reset, metrics "
        "(the Deployment)",
    }
    for name, text in roles.items():
        p = sub.add_parser(name, help=text)
        if name != "agent":
            p.add_argument("--dry-run", action="store_true", help="decide and report only")
        p.set_defaults(func=_role(name))
    p = sub.add_parser("preflight", help="check API, RBAC, CRDs and broker; non-zero on failure")
    p.add_argument(
        "--role",
        choices=("controller", "agent"),
        default="controller",
        help="whose access to check: the controller's (default) or an agent's, which must "
        "also be denied every controller write",
    )
    p.set_defaults(func=_role("preflight"))
    p = sub.add_parser(
        "status",
        help="every node's phase, reason, fence and taint as the cluster records them; with "
        "--metrics-url also heartbeat ages, reset times and holds from the leader",
    )
    p.add_argument(
        "--metrics-url",
        metavar="URL",
        help="the leader's /metrics (e.g. through kubectl port-forward)",
    )
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(func=cmd_status)
    return parser


def cmd_status(args: argparse.Namespace) -> int:
    settings = settings_or_exit()
    from watchdog.runtime import status

    return status.main(settings, args.metrics_url, args.json)


def main(argv: Sequence[str] | None = None, prog: str = "node-watchdog") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


def kubectl_plugin() -> int:
    """`kubectl node-watchdog …`: kubectl runs the executable `kubectl-node_watchdog` it finds
    on PATH with the rest of the command line, and the environment (KUBECONFIG included)."""
    return main(prog="kubectl node-watchdog")


if __name__ == "__main__":
    sys.exit(main())
