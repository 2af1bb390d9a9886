#!/usr/bin/env python3
"""Broker credentials for node-watchdog, made once per cluster: the controller's login, the CA
that signs the agents' certificates, and (with --tls) the broker's own certificate.

Agents need nothing from here per node: each obtains a certificate of its node from the
controller through a CertificateSigningRequest (signer node-watchdog.io/mqtt-client), so a node
that joins needs no step. Writes into a directory (kept between runs: existing keys and
passwords are reused):

    passwd          mosquitto password file (the controller's login only)
                                                     → Secret node-watchdog-mqtt-passwd
    controller      password of `watchdog_controller`, the controller's login
                                                     → Secret node-watchdog-mqtt-controller
    signer/ca.crt signer/ca.key   the CA of the agents' certificates (the controller signs with
                    it; the broker trusts it)        → Secret node-watchdog-mqtt-signer
    ca.crt ca.key tls.crt tls.key   with --tls: a private CA and the broker's certificate
                                                     → Secret node-watchdog-mqtt-tls

and prints the kubectl commands that create or update the Secrets. The password file uses
mosquitto's own PBKDF2-SHA512 format (`$7$`), so no mosquitto tools are needed here.

    python deploy/tools/mqtt_credentials.py --dir ./mqtt-creds --tls --namespace node-watchdog

Needs Python 3.11+ and the `cryptography` package.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import ipaddress
import os
import secrets
import sys
from pathlib import Path
from typing import Any

CONTROLLER_USER = "watchdog_controller"

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


def write_credentials(directory: Path) -> None:
    """The controller's password (kept if present) and the mosquitto password file holding
    only it: no agent logs in with a password."""
    controller = _read_or_make_password(directory / "controller")
    fd = os.open(directory / "passwd", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{CONTROLLER_USER}:{mosquitto_hash(controller)}\n")


def _save_key(path: Path, key: Any) -> None:
    from cryptography.hazmat.primitives import serialization

    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_ca(directory: Path, common_name: str) -> tuple[Any, Any]:
    """A private CA in `directory` (ca.crt, ca.key), kept if present: (certificate, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key_path, ca_crt_path = directory / "ca.key", directory / "ca.crt"
    if ca_key_path.is_file() and ca_crt_path.is_file():
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
        ca_crt = x509.load_pem_x509_certificate(ca_crt_path.read_bytes())
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
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
        _save_key(ca_key_path, ca_key)
        ca_crt_path.write_bytes(ca_crt.public_bytes(serialization.Encoding.PEM))
    return ca_crt, ca_key


def write_signer(directory: Path) -> None:
    """The CA of the agents' client certificates (signer/ca.crt, signer/ca.key): its key goes
    to the controller only, its certificate to the broker."""
    write_ca(directory / "signer", "node-watchdog agents' signer")


def write_tls(directory: Path, hosts: list[str], days: int = 825) -> None:
    """A private CA (kept if present) and a broker certificate for `hosts` (DNS names or IPs)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_crt, ca_key = write_ca(directory, "node-watchdog MQTT CA")
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
    _save_key(directory / "tls.key", key)
    (directory / "tls.crt").write_bytes(crt.public_bytes(serialization.Encoding.PEM))


def kubectl_commands(directory: Path, namespace: str, tls: bool) -> list[str]:
    def apply(kind: str, name: str, args: str) -> str:
        return (
            f"kubectl -n {namespace} create secret {kind} {name} {args} "
            "--dry-run=client -o yaml | kubectl apply -f -"
        )

    d = directory
    signer = d / "signer"
    cmds = [
        apply("generic", "node-watchdog-mqtt-passwd", f"--from-file=passwd={d / 'passwd'}"),
        apply(
            "generic",
            "node-watchdog-mqtt-controller",
            f"--from-file=password={d / 'controller'}",
        ),
        apply(
            "generic",
            "node-watchdog-mqtt-signer",
            f"--from-file=ca.crt={signer / 'ca.crt'} --from-file=ca.key={signer / 'ca.key'}",
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
    cmds.append(
        f"kubectl -n {namespace} rollout restart deployment/node-watchdog-mqtt "
        "deployment/node-watchdog-controller"
    )
    return cmds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("nodes", nargs="*", help=argparse.SUPPRESS)
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
    if args.nodes:
        print(
            f"node names given ({', '.join(args.nodes)}): agents no longer have passwords, each "
            "obtains a certificate of its node from the controller; run without them",
            file=sys.stderr,
        )
        return 2
    args.dir.mkdir(parents=True, exist_ok=True)
    write_credentials(args.dir)
    write_signer(args.dir)
    if args.tls:
        svc = "node-watchdog-mqtt"
        hosts = [svc, f"{svc}.{args.namespace}.svc", f"{svc}.{args.namespace}.svc.cluster.local"]
        write_tls(args.dir, hosts + args.tls_host)
    print(f"# credentials in {args.dir}; apply with:")
    for cmd in kubectl_commands(args.dir, args.namespace, args.tls):
        print(cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
