"""The test cluster's broker as deploy/ ships it: TLS only, agents by a certificate of their node.

Owns: a real Mosquitto started from deploy/base/broker/mosquitto.conf and deploy/base/broker/acl
with only file paths and listener ports rewritten (`shipped_config`), and the credentials it
needs, made by deploy/tools/mqtt_credentials.py as an operator makes them: the broker's own
certificate (for 127.0.0.1), the signer of the agents' certificates (its key is what a
controller signs with) and the controller's password. Two listeners, as shipped: the agents'
(`port`, require a client certificate of that signer; behind each node's broker link) and the
controllers' (`controller_port`, the password).

What each side is given to connect (`agent_env`, `controller_env`) is what the DaemonSet and
the Deployment mount: an agent only the broker's CA and where to keep its certificate, which it
obtains through a CertificateSigningRequest (so it needs its pod-bound token, see cluster.py);
a controller its password and the signer's key.

Must not: issue certificates itself; the service's own code does that through the API server.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from types import ModuleType

from chaos.sim.broker import BrokerError, MosquittoBroker
from chaos.sim.ports import free_port
from watchdog.transport.certificates import Authority, new_key_and_request, write_private

DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy"
BROKER_DIR = DEPLOY_DIR / "base" / "broker"


def credentials_tool() -> ModuleType:
    """deploy/tools/mqtt_credentials.py (a script, not a package), loaded as a module."""
    path = DEPLOY_DIR / "tools" / "mqtt_credentials.py"
    spec = importlib.util.spec_from_file_location("mqtt_credentials", path)
    if spec is None or spec.loader is None:
        raise BrokerError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shipped_config(paths: dict[str, Path], port: int, controller_port: int) -> str:
    """mosquitto.conf as shipped, with only its file paths and listener ports rewritten.

    `paths` names the files: passwd, acl, signer.crt, ca.crt, tls.crt, tls.key. Raises
    BrokerError if the shipped file no longer has each path as often as expected (a rewrite
    that silently missed would test another configuration)."""
    text = (BROKER_DIR / "mosquitto.conf").read_text()
    rewrites = {
        "/mosquitto/auth/passwd": (paths["passwd"], 1),
        "/mosquitto/config/acl": (paths["acl"], 1),
        "/mosquitto/clients/ca.crt": (paths["signer.crt"], 1),
        "/mosquitto/tls/ca.crt": (paths["ca.crt"], 1),
        "/mosquitto/tls/tls.crt": (paths["tls.crt"], 2),
        "/mosquitto/tls/tls.key": (paths["tls.key"], 2),
        "listener 8883": (f"listener {port} 127.0.0.1", 1),
        "listener 8884": (f"listener {controller_port} 127.0.0.1", 1),
    }
    for old, (new, count) in rewrites.items():
        found = text.count(old)
        if found != count:
            raise BrokerError(f"shipped mosquitto.conf has {found} {old!r}, expected {count}")
        text = text.replace(old, str(new))
    return text


def sign_identity(signer_dir: Path, node: str, path: Path, lifetime_s: int = 3600) -> Path:
    """A client certificate of `node` with its key (one file at `path`), signed by the signer
    in `signer_dir` (ca.crt, ca.key) with the service's own code: what an operator holding the
    signer can make, for tests and witnesses."""
    authority = Authority.load(signer_dir / "ca.crt", signer_dir / "ca.key")
    key, request = new_key_and_request(node)
    write_private(path, authority.sign(request, lifetime_s) + key)
    return path


class IdentityBroker(MosquittoBroker):
    """Mosquitto with the shipped configuration; `port` is the agents' listener."""

    def __init__(self, work_dir: Path, binary: str | None = None) -> None:
        super().__init__(work_dir, binary=binary)
        self.controller_port = free_port()
        self.tls_dir = work_dir / "tls"
        self.signer_dir = self.tls_dir / "signer"
        self.ca_file = self.tls_dir / "ca.crt"
        self.controller_password_file = work_dir / "auth" / "controller"
        self.controller_user = ""

    @property
    def url(self) -> str:
        """The agents' listener (what each node's broker link forwards to)."""
        return f"mqtts://{self.host}:{self.port}"

    @property
    def controller_url(self) -> str:
        return f"mqtts://{self.host}:{self.controller_port}"

    def _credentials(self) -> dict[str, Path]:
        tool = credentials_tool()
        self.controller_user = tool.CONTROLLER_USER
        auth = self.controller_password_file.parent
        if not (self.tls_dir / "tls.crt").exists():
            self.tls_dir.mkdir(parents=True, exist_ok=True)
            tool.write_tls(self.tls_dir, ["localhost", "127.0.0.1"])
            tool.write_signer(self.tls_dir)
            auth.mkdir(parents=True, exist_ok=True)
            tool.write_credentials(auth)  # `controller` (the password) and `passwd`
        acl = self.work_dir / "acl"
        shutil.copyfile(BROKER_DIR / "acl", acl)
        return {
            "passwd": auth / "passwd",
            "acl": acl,
            "signer.crt": self.signer_dir / "ca.crt",
            **{n: self.tls_dir / n for n in ("ca.crt", "tls.crt", "tls.key")},
        }

    def _write_config(self) -> Path:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        text = shipped_config(self._credentials(), self.port, self.controller_port)
        if os.geteuid() == 0:
            # Else it drops to `mosquitto` before reading its files, which live in our private
            # work directory (the Pod runs it as its image's user, with the Secrets mounted).
            text += "user root\n"
        conf = self.work_dir / "mosquitto.conf"
        conf.write_text(text)
        return conf

    def listen_ports(self) -> tuple[int, ...]:
        return (self.port, self.controller_port)

    def agent_env(self, enroll_file: Path) -> dict[str, str]:
        """What the DaemonSet gives an agent: the broker's CA and where its certificate lives
        (`mqtt.enroll_file`: it asks the controller for one through the API server)."""
        return {
            "WATCHDOG_MQTT__CA_FILE": str(self.ca_file),
            "WATCHDOG_MQTT__ENROLL_FILE": str(enroll_file),
        }

    def controller_env(self) -> dict[str, str]:
        """What the Deployment gives a controller: its listener, password and the signer."""
        return {
            "WATCHDOG_MQTT__URL": self.controller_url,
            "WATCHDOG_MQTT__USERNAME": self.controller_user,
            "WATCHDOG_MQTT__PASSWORD_FILE": str(self.controller_password_file),
            "WATCHDOG_MQTT__CA_FILE": str(self.ca_file),
            "WATCHDOG_MQTT__SIGNER_CA_FILE": str(self.signer_dir / "ca.crt"),
            "WATCHDOG_MQTT__SIGNER_KEY_FILE": str(self.signer_dir / "ca.key"),
        }
