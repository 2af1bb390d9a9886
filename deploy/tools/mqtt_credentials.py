#!/usr/bin/env python3
"""Broker credentials for node-watchdog: one password per node, the broker's password file, TLS.

Writes into a directory (kept between runs, so adding a node keeps every other password):

    agents/<node>   that node's agent password      → Secret node-watchdog-mqtt-agents
    passwd          mosquitto password file          → Secret node-watchdog-mqtt-passwd
    controller      password of `watchdog_controller`, the controller's login
                                                     → Secret node-watchdog-mqtt-controller
    ca.crt ca.key tls.crt tls.key   with --tls: a private CA and the broker's certificate
                                                     → Secret node-watchdog-mqtt-tls

and prints the kubectl commands that create or update the four Secrets. The password file uses
mosquitto's own PBKDF2-SHA512 format (`$7$`), so no mosquitto tools are needed here.

    python deploy/tools/mqtt_credentials.py --dir ./mqtt-creds --tls \
        --namespace node-watchdog $(kubectl get nodes -o name | cut -d/ -f2)

Needs Python 3.11+; --tls also needs the `cryptography` package.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import ipaddress
import os
import re
import secrets
import sys
from pathlib import Path

CONTROLLER_USER = "watchdog_controller"
# RFC 1123 subdomain: what Kubernetes allows as a node name (and, being [-.a-z0-9], always a
# valid Secret key and a valid, wildcard-free MQTT topic level).
NODE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

# mosquitto_passwd's defaults (mosquitto 2.0): PBKDF2-HMAC-SHA512, 101 iterations, 12-byte salt.
PBKDF2_ITERATIONS = 101
SALT_BYTES = 12


def mosquitto_hash(
    password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS
) -> str:
    """The password-file hash mosquitto 2 writes with `mosquitto_passwd` ($7$ = PBKDF2-SHA512)."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, dklen=64)
    b64 = base64.b64encode
    return f"$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def _read_or_make_password(path: Path) -> str:
    if path.is_file():
        return path.read_text().strip()
    password = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return password


def write_credentials(directory: Path, nodes: list[str]) -> list[str]:
    """Passwords for `nodes` (existing ones kept) and the matching mosquitto password file."""
    bad = [n for n in nodes if not NODE_NAME.match(n) or len(n) > 253]
    if bad:
        raise ValueError(f"not valid node names: {', '.join(bad)}")
    agents = directory / "agents"
    for node in nodes:
        _read_or_make_password(agents / node)
    known = sorted(p.name for p in agents.iterdir()) if agents.is_dir() else []
    lines = [f"{node}:{mosquitto_hash(_read_or_make_password(agents / node))}" for node in known]
    controller = _read_or_make_password(directory / "controller")
    lines.append(f"{CONTROLLER_USER}:{mosquitto_hash(controller)}")
    fd = os.open(directory / "passwd", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    return known


def write_tls(directory: Path, hosts: list[str], days: int = 825) -> None:
    """A private CA (kept if present) and a broker certificate for `hosts` (DNS names or IPs)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    pem = serialization.Encoding.PEM
    raw = serialization.PrivateFormat.PKCS8

    def save_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
        data = key.private_bytes(pem, raw, serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    ca_key_path, ca_crt_path = directory / "ca.key", directory / "ca.crt"
    if ca_key_path.is_file() and ca_crt_path.is_file():
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
        ca_crt = x509.load_pem_x509_certificate(ca_crt_path.read_bytes())
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node-watchdog MQTT CA")])
        ca_crt = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .sign(ca_key, hashes.SHA256())
        )
        save_key(ca_key_path, ca_key)
        ca_crt_path.write_bytes(ca_crt.public_bytes(pem))

    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    crt = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_crt.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    save_key(directory / "tls.key", key)
    (directory / "tls.crt").write_bytes(crt.public_bytes(pem))


def kubectl_commands(directory: Path, namespace: str, tls: bool) -> list[str]:
    def apply(kind: str, name: str, args: str) -> str:
        return (
            f"kubectl -n {namespace} create secret {kind} {name} {args} "
            "--dry-run=client -o yaml | kubectl apply -f -"
        )

    d = directory
    cmds = [
        apply("generic", "node-watchdog-mqtt-agents", f"--from-file={d / 'agents'}"),
        apply("generic", "node-watchdog-mqtt-passwd", f"--from-file=passwd={d / 'passwd'}"),
        apply(
            "generic",
            "node-watchdog-mqtt-controller",
            f"--from-file=password={d / 'controller'}",
        ),
    ]
    if tls:
        cmds.append(
            apply(
                "generic",
                "node-watchdog-mqtt-tls",
                f"--from-file=tls.crt={d / 'tls.crt'} --from-file=tls.key={d / 'tls.key'} "
                f"--from-file=ca.crt={d / 'ca.crt'}",
            )
        )
    cmds.append(f"kubectl -n {namespace} rollout restart deployment/node-watchdog-mqtt")
    return cmds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("nodes", nargs="*", help="node names to add (existing ones are kept)")
    parser.add_argument("--dir", type=Path, required=True, help="credentials directory")
    parser.add_argument("--namespace", default="node-watchdog", help="the watchdog's namespace")
    parser.add_argument("--tls", action="store_true", help="also make a CA and broker cert")
    parser.add_argument(
        "--tls-host",
        action="append",
        default=[],
        help="extra DNS name or IP of the broker certificate (repeatable)",
    )
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    try:
        known = write_credentials(args.dir, args.nodes)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    if args.tls:
        svc = "node-watchdog-mqtt"
        hosts = [svc, f"{svc}.{args.namespace}.svc", f"{svc}.{args.namespace}.svc.cluster.local"]
        write_tls(args.dir, hosts + args.tls_host)
    print(f"# {len(known)} node credentials in {args.dir}; apply with:")
    for cmd in kubectl_commands(args.dir, args.namespace, args.tls):
        print(cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
