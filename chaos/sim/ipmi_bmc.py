"""One simulated machine's BMC speaking IPMI 2.0 over LAN (RMCP+, what `ipmitool -I lanplus` and
Debian's fence_ipmilan talk), as its own process.

The protocol is pyghmi's BMC server (OpenStack's IPMI library, the one virtualbmc serves with; not
written here); this module only wires its power commands to the test cluster: the power state it
reports is the one its fleet (chaos/sim/bmc.py) keeps for the machine, read over HTTP at every
request, and a power command is sent to the fleet, which switches the machine (or, under
`bmc-lies`, only reports the change). `bmc-down` stops this process (SIGSTOP): requests go
unanswered, like a BMC without power.

Run: python -m chaos.sim.ipmi_bmc --node N --port P --user U --password-file F --fleet URL
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pyghmi.ipmi.bmc as pyghmi_bmc

_TIMEOUT_S = 5.0


class SimBmc(pyghmi_bmc.Bmc):  # type: ignore[misc]
    def __init__(self, node: str, fleet: str, authdata: dict[str, str], port: int) -> None:
        super().__init__(authdata, port=port, address="127.0.0.1")
        self.node = node
        self.fleet = fleet.rstrip("/")

    def _call(self, method: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.fleet}/ipmi/{self.node}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as answer:
            result: dict[str, Any] = json.loads(answer.read())
            return result

    def get_power_state(self) -> str:
        return "on" if self._call("GET").get("power_state") == "On" else "off"

    def power_off(self) -> None:
        self._call("PUT", {"power_state": "Off"})

    def power_on(self) -> None:
        self._call("PUT", {"power_state": "On"})

    def power_shutdown(self) -> None:
        self.power_off()  # no guest to ask: a soft off is an off

    def power_cycle(self) -> None:
        self.power_off()
        self.power_on()

    def power_reset(self) -> None:
        self.power_cycle()

    def is_active(self) -> bool:
        return self.get_power_state() == "on"

    def get_system_guid(self) -> str:
        return self.node


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chaos.sim.ipmi_bmc")
    p.add_argument("--node", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password-file", type=Path, required=True)
    p.add_argument("--fleet", required=True, help="the fleet's URL (chaos/sim/bmc.py)")
    args = p.parse_args(argv)
    password = args.password_file.read_text().strip()
    bmc = SimBmc(args.node, args.fleet, {args.user: password}, args.port)
    print(f"IPMI BMC of {args.node} on 127.0.0.1:{args.port}", flush=True)
    bmc.listen(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
