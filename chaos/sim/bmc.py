"""Each simulated machine's BMC: a real Redfish endpoint wired to the machine's power.

Owns: one `sushy-emulator` process (sushy-tools, OpenStack's Redfish emulator, with its
fake-systems driver; not written here) per node on a free loopback port, serving HTTPS with the
test cluster's apiserver certificate (it covers 127.0.0.1; clients trust the cluster CA) and
HTTP basic auth; its one system is the node. The emulator reports every power change it applies
with a PUT of the system to its external-notification URL, a small HTTP server here: a change to
Off fences the machine exactly like the `fence` fault (`by="bmc"`), a change to On powers it
on. A machine powered off or on by a fault is told to its BMC through Redfish (ForceOff / On),
so the BMC reports what the machine is, after the emulator's own delay (it applies a power
change 1 to 11 s after the request, on the next read, as real BMCs take seconds).

A BMC here has standby power: it answers while its machine is off. Faults: `bmc-down` freezes
the node's emulator (SIGSTOP: requests hang, like a BMC without power) until `bmc-up`;
`bmc-lies` makes it switch nothing (it reports the machine off while the machine runs) until
`bmc-truthful`.

With `protocol="ipmi"` each BMC speaks IPMI 2.0 over LAN instead (chaos/sim/ipmi_bmc.py: a
pyghmi BMC server per node, for `ipmitool -I lanplus` and fence_ipmilan): the power state it
reports is kept here, set by the faults that switch the machine and by the BMC's own commands
(which switch the machine, unless it lies), with no delay of its own.

Also writes the inventory a controller in fence_mode=power reads (`inventory_path`): every node
with its fence agent (fence_redfish or fence_ipmilan), its BMC's address, port (and system URI),
and a password file.

Must not: decide anything about fencing; only emulate the hardware.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
import shutil
import ssl
import sys
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from chaos.sim.broker import wait_port
from chaos.sim.controlplane import free_port
from chaos.sim.procs import ManagedProcess

log = logging.getLogger(__name__)

USERNAME = "admin"
FENCE_AGENT = "fence_redfish"
IPMI_FENCE_AGENT = "fence_ipmilan"
PROTOCOLS = ("redfish", "ipmi")


class BmcError(RuntimeError):
    """The emulator is not installed or did not start."""


@dataclass
class Bmc:
    node: str
    uuid: str
    port: int
    proc: ManagedProcess
    lies: bool = False

    @property
    def systems_uri(self) -> str:
        return f"/redfish/v1/Systems/{self.uuid}"


class BmcFleet:
    """The BMCs of a cluster's machines. `on_power(node, "Off" | "On")` applies a power change
    the BMC made to its machine."""

    def __init__(
        self,
        work_dir: Path,
        nodes: Iterable[str],
        *,
        cert: Path,
        key: Path,
        ca: Path,
        on_power: Callable[[str, str], Awaitable[None]],
        protocol: str = "redfish",
    ) -> None:
        if protocol not in PROTOCOLS:
            raise BmcError(f"BMC protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")
        self.protocol = protocol
        # ipmi: the power state each BMC reports ("On" / "Off").
        self.reported: dict[str, str] = dict.fromkeys(nodes, "On")
        self.work_dir = work_dir
        self.nodes = list(nodes)
        self.cert, self.key, self.ca = cert, key, ca
        self.on_power = on_power
        self.password = secrets.token_urlsafe(12)  # 16 characters: IPMI allows at most 20
        self.bmcs: dict[str, Bmc] = {}
        self._runner: web.AppRunner | None = None
        self._notify_port = 0

    @staticmethod
    def available(protocol: str = "redfish") -> bool:
        if protocol == "ipmi":
            try:
                import pyghmi.ipmi.bmc  # noqa: F401
            except ImportError:
                return False
            return True
        return shutil.which("sushy-emulator") is not None

    @property
    def inventory_path(self) -> Path:
        return self.work_dir / "inventory.yaml"

    async def start(self) -> None:
        if self.protocol == "ipmi":
            await self._start_ipmi()
            return
        exe = shutil.which("sushy-emulator")
        if exe is None:
            raise BmcError("sushy-emulator is not installed (pip install -e '.[chaos]')")
        import bcrypt  # sushy-tools' own dependency: its auth file holds bcrypt hashes

        self.work_dir.mkdir(parents=True, exist_ok=True)
        app = web.Application()
        app.router.add_put("/notify", self._notified)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self._notify_port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self._notify_port).start()
        hashed = bcrypt.hashpw(self.password.encode(), bcrypt.gensalt(rounds=4)).decode()
        htpasswd = self.work_dir / "htpasswd"
        htpasswd.write_text(f"{USERNAME}:{hashed}\n")
        (self.work_dir / "password").write_text(self.password + "\n")
        for i, node in enumerate(self.nodes):
            uuid = f"00000000-0000-4000-8000-{i + 1:012d}"
            port = free_port()
            d = self.work_dir / node
            d.mkdir(parents=True, exist_ok=True)
            conf = d / "emulator.conf"
            system = {
                "uuid": uuid,
                "name": node,
                "power_state": "On",
                "external_notifier": True,
            }
            conf.write_text(
                "\n".join(
                    [
                        'SUSHY_EMULATOR_LISTEN_IP = "127.0.0.1"',
                        f"SUSHY_EMULATOR_LISTEN_PORT = {port}",
                        f"SUSHY_EMULATOR_SSL_CERT = {str(self.cert)!r}",
                        f"SUSHY_EMULATOR_SSL_KEY = {str(self.key)!r}",
                        f"SUSHY_EMULATOR_AUTH_FILE = {str(htpasswd)!r}",
                        "SUSHY_EMULATOR_FAKE_DRIVER = True",
                        f"SUSHY_EMULATOR_STATE_DIR = {str(d / 'state')!r}",
                        f"SUSHY_EMULATOR_FAKE_SYSTEMS = [{system!r}]",
                        "EXTERNAL_NOTIFICATION_URL = "
                        f"'http://127.0.0.1:{self._notify_port}/notify'",
                        "",
                    ]
                )
            )
            proc = ManagedProcess(f"bmc-{node}", [exe, "--config", str(conf)], d / "emulator.log")
            self.bmcs[node] = Bmc(node, uuid, port, proc)
        await asyncio.gather(*(b.proc.spawn() for b in self.bmcs.values()))
        try:
            await asyncio.gather(
                *(wait_port("127.0.0.1", b.port, timeout_s=30.0) for b in self.bmcs.values())
            )
        except (TimeoutError, OSError) as e:
            tails = "\n".join(b.proc.log_tail(10) for b in self.bmcs.values())
            raise BmcError(f"a BMC emulator did not start: {e}\n{tails}") from e
        self._write_inventory()

    async def _start_ipmi(self) -> None:
        if not self.available("ipmi"):
            raise BmcError("pyghmi is not installed (pip install -e '.[chaos]')")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        app = web.Application()
        app.router.add_get("/ipmi/{node}", self._ipmi_read)
        app.router.add_put("/ipmi/{node}", self._ipmi_command)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self._notify_port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self._notify_port).start()
        password = self.work_dir / "password"
        password.write_text(self.password + "\n")
        fleet = f"http://127.0.0.1:{self._notify_port}"
        for node in self.nodes:
            port = free_port()
            d = self.work_dir / node
            d.mkdir(parents=True, exist_ok=True)
            argv = [sys.executable, "-m", "chaos.sim.ipmi_bmc", "--node", node]
            argv += ["--port", str(port), "--user", USERNAME, "--password-file", str(password)]
            argv += ["--fleet", fleet]
            proc = ManagedProcess(f"bmc-{node}", argv, d / "ipmi.log")
            self.bmcs[node] = Bmc(node, node, port, proc)
        await asyncio.gather(*(b.proc.spawn() for b in self.bmcs.values()))

        async def listening(b: Bmc) -> None:
            # UDP has no connect to wait for: the process says when it has bound its port.
            for _ in range(300):
                if "IPMI BMC of" in b.proc.log_tail(5):
                    return
                await asyncio.sleep(0.1)
            raise BmcError(f"the IPMI BMC of {b.node} did not start:\n{b.proc.log_tail(10)}")

        await asyncio.gather(*(listening(b) for b in self.bmcs.values()))
        self._write_inventory()

    def _write_inventory(self) -> None:
        if self.protocol == "ipmi":
            # Cipher suite 3 (RAKP-HMAC-SHA1): the one pyghmi's BMC server speaks.
            doc = {
                "nodes": {
                    b.node: {
                        "agent": IPMI_FENCE_AGENT,
                        "ip": "127.0.0.1",
                        "username": USERNAME,
                        "password_file": "password",
                        "options": {"ipport": str(b.port), "lanplus": "1", "cipher": "3"},
                    }
                    for b in self.bmcs.values()
                }
            }
            self.inventory_path.write_text(yaml.safe_dump(doc, sort_keys=True))
            return
        doc = {
            "nodes": {
                b.node: {
                    "agent": FENCE_AGENT,
                    "ip": "127.0.0.1",
                    "username": USERNAME,
                    "password_file": "password",
                    "ca_file": str(self.ca),
                    "options": {"ipport": str(b.port), "systems-uri": b.systems_uri},
                }
                for b in self.bmcs.values()
            }
        }
        self.inventory_path.write_text(yaml.safe_dump(doc, sort_keys=True))

    async def stop(self) -> None:
        await asyncio.gather(
            *(b.proc.stop(3.0) for b in self.bmcs.values()), return_exceptions=True
        )
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- faults --------------------------------------------------------------------------------

    def down(self, node: str, down: bool) -> None:
        bmc = self.bmcs[node]
        if down:
            bmc.proc.freeze()
        else:
            bmc.proc.thaw()

    def set_lies(self, node: str, lies: bool) -> None:
        self.bmcs[node].lies = lies

    async def machine_power(self, node: str, on: bool) -> None:
        """Tell the BMC what happened to its machine (a fault, not the BMC, switched it)."""
        if self.protocol == "ipmi":
            if node in self.reported:
                self.reported[node] = "On" if on else "Off"
            return
        bmc = self.bmcs.get(node)
        if bmc is None or bmc.proc.frozen:
            return
        ctx = ssl.create_default_context(cafile=str(self.ca))
        url = f"https://127.0.0.1:{bmc.port}{bmc.systems_uri}/Actions/ComputerSystem.Reset"
        try:
            basic = base64.b64encode(f"{USERNAME}:{self.password}".encode()).decode()
            async with (
                aiohttp.ClientSession(
                    headers={"Authorization": f"Basic {basic}"},
                    timeout=aiohttp.ClientTimeout(total=5),
                ) as session,
                session.post(url, json={"ResetType": "On" if on else "ForceOff"}, ssl=ctx) as r,
            ):
                if r.status >= 300:
                    log.warning("BMC of %s refused %s: %s", node, on, await r.text())
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            log.warning("BMC of %s not told the machine is %s: %s", node, on, e)

    async def _ipmi_read(self, request: web.Request) -> web.Response:
        node = request.match_info["node"]
        if node not in self.reported:
            return web.json_response({"error": f"no BMC for {node}"}, status=404)
        return web.json_response({"power_state": self.reported[node]})

    async def _ipmi_command(self, request: web.Request) -> web.Response:
        node = request.match_info["node"]
        state = (await request.json()).get("power_state")
        if node not in self.reported or state not in ("On", "Off"):
            return web.json_response({"error": f"bad command for {node}"}, status=400)
        if self.bmcs[node].lies:
            log.info("BMC of %s reports %s but switches nothing (bmc-lies)", node, state)
        elif state != self.reported[node]:
            # Applied before the BMC answers: it never reports off while the machine runs.
            with contextlib.suppress(ValueError):
                await self.on_power(node, state)
        self.reported[node] = state
        return web.json_response({"power_state": state})

    async def _notified(self, request: web.Request) -> web.Response:
        system: dict[str, Any] = await request.json()
        node = system.get("name")
        bmc = self.bmcs.get(node) if isinstance(node, str) else None
        if bmc is None or system.get("pending_power"):
            return web.Response(text="ignored")  # a request only: applied later, on a read
        state = system.get("power_state")
        if bmc.lies:
            log.info("BMC of %s reports %s but switches nothing (bmc-lies)", node, state)
            return web.Response(text="lied")
        if state in ("On", "Off"):
            # Applied before the emulator answers the read that shows the new state: the BMC
            # never reports off while the machine still runs (unless it lies).
            with contextlib.suppress(ValueError):
                await self.on_power(bmc.node, state)
        return web.Response(text="ok")


__all__ = ["FENCE_AGENT", "IPMI_FENCE_AGENT", "PROTOCOLS", "Bmc", "BmcError", "BmcFleet"]
