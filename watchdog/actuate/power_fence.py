"""Power fencing through each node's BMC with a real fence agent (fence_mode=power, DESIGN §5).

Owns: the BMC inventory (which fence agent, address and credentials reach each node's BMC),
read from a YAML file that only the controller mounts, and one fencing run: `action=off`, then
an independent `action=status` read-back that must say off. A run confirms only when both do;
anything else (no entry, the agent missing, a timeout, a BMC that does not answer or still
reports on) is a failure that the decision loop retries, while the agent's self-fence stays the
fallback proof. The fence agents are the ones Pacemaker and medik8s Fence Agents Remediation run
(Debian's fence-agents: fence_redfish, fence_ipmilan, ...); their options go on stdin, one
`name=value` per line, so no password appears in a process list.

Exit codes of the fence agents' library: `off` exits 0 once the power state reads off (it polls
for up to `power_timeout`); `status` exits 0 for on and 2 for off.

Must not: confirm on an exit code alone; the status read-back is part of the proof.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

AGENT_NAME = re.compile(r"^fence_[a-z0-9_]+$")
# The agents' options an inventory may set, and nothing else: the fence library also takes
# options that run a command (password-script) or write a file (debug-file), and aliases of the
# address and credentials, which the watchdog sets itself.
VALUE_OPTIONS = frozenset(
    {
        "ipport",
        "systems-uri",
        "redfish-uri",
        "cipher",
        "privlvl",
        "auth",
        "hexadecimal-kg",
        "power-timeout",
        "power-wait",
        "login-timeout",
        "shell-timeout",
        "ipmitool-timeout",
        "retry-on",
    }
)
# Flags: set with 1 (the library reads 1/yes/on/true); leave a flag out to unset it (fence_redfish
# treats ssl-insecure=0 as set).
FLAG_OPTIONS = frozenset(
    {"ssl", "ssl-secure", "ssl-insecure", "notls", "lanplus", "inet4-only", "inet6-only"}
)
FLAG_ON = ("1", "yes", "on", "true")
# Where Debian installs the fence agents (not always on a container's PATH).
AGENT_DIRS = ("/usr/sbin", "/sbin")
STATUS_ON, STATUS_OFF = 0, 2
MAX_INVENTORY_BYTES = 1 << 20


class InventoryError(ValueError):
    """The BMC inventory is unreadable or names a field wrongly (the message says which)."""


@dataclass(frozen=True, slots=True)
class Bmc:
    """How to reach one node's BMC."""

    node: str
    agent: str
    ip: str
    username: str
    password: str = field(repr=False)
    options: tuple[tuple[str, str], ...] = ()
    ca_file: Path | None = None  # the CA the BMC's HTTPS certificate is checked against

    def stdin(self, action: str) -> bytes:
        # The watchdog's own lines last: the fence library keeps the last value of an option.
        lines = [
            *(f"{k}={v}" for k, v in self.options),
            f"ip={self.ip}",
            f"username={self.username}",
            f"password={self.password}",
            f"action={action}",
        ]
        return ("\n".join(lines) + "\n").encode()


@dataclass(frozen=True, slots=True)
class FenceRun:
    confirmed: bool
    detail: str


def _text(node: str, entry: dict[str, Any], key: str, *, required: bool = True) -> str | None:
    value = entry.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
        raise InventoryError(f"nodes.{node}.{key}: {value!r} is not a non-empty string")
    text = str(value)
    if "\n" in text or "\r" in text:
        raise InventoryError(f"nodes.{node}.{key}: must be one line")
    return text


def parse_inventory(text: str, base: Path | None = None) -> dict[str, Bmc]:
    """The inventory document → node name → Bmc. Refuses anything it cannot use, naming the
    node and the field: a fence that cannot run is found at start, not during a failover.

        nodes:
          node-1:
            agent: fence_redfish          # any fence_* agent
            ip: 10.0.0.11                 # the BMC (fence_redfish also takes ipport)
            username: admin
            password_file: node-1.pw      # or password:; relative to the inventory file
            ca_file: bmc-ca.crt           # optional: the CA of the BMC's HTTPS certificate
            options:                      # further agent options (VALUE_OPTIONS, FLAG_OPTIONS)
              ipport: "443"
              systems-uri: /redfish/v1/Systems/1
    """
    if len(text.encode()) > MAX_INVENTORY_BYTES:
        raise InventoryError(f"larger than {MAX_INVENTORY_BYTES} bytes")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InventoryError(f"not YAML: {e}") from None
    nodes = doc.get("nodes") if isinstance(doc, dict) else None
    if not isinstance(nodes, dict) or not nodes:
        raise InventoryError("needs a non-empty mapping `nodes: {<node name>: {...}}`")
    out: dict[str, Bmc] = {}
    for node, entry in nodes.items():
        if not isinstance(node, str) or not isinstance(entry, dict):
            raise InventoryError(f"nodes.{node}: must map a node name to its BMC's fields")
        known = {"agent", "ip", "username", "password", "password_file", "options", "ca_file"}
        unknown = set(entry) - known
        if unknown:
            raise InventoryError(f"nodes.{node}: unknown fields {sorted(unknown)}")
        agent = _text(node, entry, "agent")
        assert agent is not None
        if not AGENT_NAME.match(agent):
            raise InventoryError(f"nodes.{node}.agent: {agent!r} is not a fence agent (fence_*)")
        password = _text(node, entry, "password", required=False)
        password_file = _text(node, entry, "password_file", required=False)
        if (password is None) == (password_file is None):
            raise InventoryError(f"nodes.{node}: needs exactly one of password, password_file")
        if password_file is not None:
            path = Path(password_file)
            if not path.is_absolute() and base is not None:
                path = base / path
            try:
                password = path.read_text().strip()
            except OSError as e:
                raise InventoryError(f"nodes.{node}.password_file: {e}") from None
            if not password or "\n" in password or "\r" in password:
                raise InventoryError(f"nodes.{node}.password_file: must hold one line")
        ca_file = _text(node, entry, "ca_file", required=False)
        ca_path = None
        if ca_file is not None:
            ca_path = Path(ca_file)
            if not ca_path.is_absolute() and base is not None:
                ca_path = base / ca_path
            if not ca_path.is_file():
                raise InventoryError(f"nodes.{node}.ca_file: {ca_path} is not a file")
        options = entry.get("options") or {}
        if not isinstance(options, dict):
            raise InventoryError(f"nodes.{node}.options: must be a mapping")
        pairs = []
        for key, value in options.items():
            if key in FLAG_OPTIONS:
                if str(value).lower() not in FLAG_ON:
                    raise InventoryError(
                        f"nodes.{node}.options.{key}: {value!r}: a flag, set it with 1 "
                        "(leave it out to unset it)"
                    )
                pairs.append((key, "1"))
                continue
            if key not in VALUE_OPTIONS:
                raise InventoryError(
                    f"nodes.{node}.options: {key!r} is not an option the watchdog passes on "
                    f"(one of {', '.join(sorted(VALUE_OPTIONS | FLAG_OPTIONS))})"
                )
            if value is None or isinstance(value, (bool, dict, list)):
                raise InventoryError(f"nodes.{node}.options.{key}: {value!r} is not a value")
            value = str(value)
            if not value or "\n" in value or "\r" in value:
                raise InventoryError(f"nodes.{node}.options.{key}: must be one non-empty line")
            pairs.append((key, value))
        ip = _text(node, entry, "ip")
        username = _text(node, entry, "username")
        assert ip is not None and username is not None and password is not None
        out[node] = Bmc(node, agent, ip, username, password, tuple(sorted(pairs)), ca_path)
    return out


def load_inventory(path: Path) -> dict[str, Bmc]:
    try:
        text = path.read_text()
    except OSError as e:
        raise InventoryError(f"{path}: {e}") from None
    try:
        return parse_inventory(text, path.parent)
    except InventoryError as e:
        raise InventoryError(f"{path}: {e}") from None


def find_agent(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in AGENT_DIRS:
        candidate = os.path.join(d, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


class PowerFencer:
    """Switches one node off through its BMC and reads back that it is off."""

    def __init__(self, inventory_file: Path, timeout_s: float) -> None:
        self.inventory_file = inventory_file
        self.timeout_s = timeout_s

    def check(self) -> dict[str, Bmc]:
        """The inventory, every agent installed; raises InventoryError naming what is wrong."""
        bmcs = load_inventory(self.inventory_file)
        missing = sorted({b.agent for b in bmcs.values() if find_agent(b.agent) is None})
        if missing:
            raise InventoryError(f"fence agents not installed: {', '.join(missing)}")
        return bmcs

    async def fence(self, node: str) -> FenceRun:
        # Read at every run: rotated credentials or a replaced BMC count at once.
        try:
            bmc = load_inventory(self.inventory_file).get(node)
        except InventoryError as e:
            return FenceRun(False, f"BMC inventory: {e}")
        if bmc is None:
            return FenceRun(False, f"no BMC for {node} in {self.inventory_file}")
        agent = find_agent(bmc.agent)
        if agent is None:
            return FenceRun(False, f"fence agent {bmc.agent} is not installed")
        env = dict(os.environ)
        if bmc.ca_file is not None:
            env["REQUESTS_CA_BUNDLE"] = str(bmc.ca_file)  # python-requests, as fence_redfish uses
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        code, out = await _run(agent, bmc.stdin("off"), deadline - loop.time(), env)
        if code != 0:
            return FenceRun(False, f"{bmc.agent} off at {bmc.ip}: {out}")
        code, status = await _run(agent, bmc.stdin("status"), deadline - loop.time(), env)
        # Exit 2 is also a usage error of the fence library: the status line must say it too.
        if code == STATUS_OFF and "Status: OFF" in status:
            return FenceRun(True, f"{bmc.agent} at {bmc.ip}: switched off, status reads off")
        if code == STATUS_ON:
            return FenceRun(False, f"{bmc.agent} at {bmc.ip}: off succeeded but status reads on")
        return FenceRun(False, f"{bmc.agent} status at {bmc.ip}: {status}")


async def _run(
    agent: str, stdin: bytes, timeout_s: float, env: dict[str, str]
) -> tuple[int | None, str]:
    """(exit code, last output) of one agent run; (None, why) on a timeout."""
    if timeout_s <= 0:
        return None, "no time left within the fence timeout"
    proc = await asyncio.create_subprocess_exec(
        agent,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
        start_new_session=True,  # its own process group: a timeout kills what it started too
    )
    try:
        async with asyncio.timeout(timeout_s):
            output, _ = await proc.communicate(stdin)
    except TimeoutError:
        return None, f"timed out after {timeout_s:.1f}s (BMC not answering?)"
    finally:
        if proc.returncode is None:  # timed out or cancelled: never leave the agent running
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    tail = output.decode(errors="replace").strip().splitlines()
    return proc.returncode, f"exit {proc.returncode}: {' | '.join(tail[-3:])[-300:]}"


__all__ = [
    "Bmc",
    "FenceRun",
    "InventoryError",
    "PowerFencer",
    "find_agent",
    "load_inventory",
    "parse_inventory",
]
