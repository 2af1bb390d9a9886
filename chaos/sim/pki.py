"""Certificates and keys for the test cluster's control plane.

Owns: a throw-away CA, the kube-apiserver serving certificate, client certificates (admin,
controller-manager, scheduler, and any further identity a caller asks for, e.g. a node), and the
service-account token signing key pair, written as PEM files into one directory.

Must not: be used for anything but a local test cluster. Keys are EC P-256 (fast to generate)
and unencrypted on disk.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = dt.timedelta(days=365)
# Backdate so that a slightly skewed clock on a reused machine does not reject fresh certs.
_BACKDATE = dt.timedelta(hours=1)

APISERVER_DNS_NAMES = (
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class ClusterPKI:
    """Paths of everything the control plane needs; `issue_client` adds identities later."""

    directory: Path
    ca: CertPair
    apiserver: CertPair
    admin: CertPair
    controller_manager: CertPair
    scheduler: CertPair
    service_account_key: Path  # private: signs tokens (apiserver) and legacy tokens (KCM)
    service_account_pub: Path  # public: verifies tokens

    def issue_client(
        self, name: str, common_name: str, organizations: Sequence[str] = ()
    ) -> CertPair:
        """A client certificate for `common_name` in groups `organizations`, signed by our CA."""
        ca_key = _load_key(self.ca.key)
        ca_cert = x509.load_pem_x509_certificate(self.ca.cert.read_bytes())
        return _write_client(self.directory, name, common_name, organizations, ca_cert, ca_key)


def generate(directory: Path, *, service_ip: str = "10.0.0.1") -> ClusterPKI:
    """Create a fresh CA and every certificate the control plane uses, in `directory`.

    `service_ip` is the first address of the service range: in-cluster clients reach the
    apiserver through it, so it belongs in the serving certificate.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _ca_certificate(ca_key)
    ca = CertPair(
        _write_cert(directory / "ca.crt", ca_cert), _write_key(directory / "ca.key", ca_key)
    )
    apiserver = _write_serving(directory, "apiserver", ca_cert, ca_key, service_ip)
    admin = _write_client(
        directory, "admin", "kubernetes-admin", ["system:masters"], ca_cert, ca_key
    )
    kcm = _write_client(
        directory, "controller-manager", "system:kube-controller-manager", [], ca_cert, ca_key
    )
    scheduler = _write_client(directory, "scheduler", "system:kube-scheduler", [], ca_cert, ca_key)
    sa_key = ec.generate_private_key(ec.SECP256R1())
    sa_pub_path = directory / "sa.pub"
    sa_pub_path.write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return ClusterPKI(
        directory=directory,
        ca=ca,
        apiserver=apiserver,
        admin=admin,
        controller_manager=kcm,
        scheduler=scheduler,
        service_account_key=_write_key(directory / "sa.key", sa_key),
        service_account_pub=sa_pub_path,
    )


def _name(common_name: str, organizations: Sequence[str] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALIDITY)
    )


def _ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = _name("node-watchdog-test-cluster-ca")
    return (
        _builder(name, name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _leaf(
    subject: x509.Name,
    usage: x509.ObjectIdentifier,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    sans: list[x509.GeneralName] | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder(subject, ca_cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=False,
                key_cert_sign=False,
                crl_sign=False,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _write_serving(
    directory: Path,
    name: str,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    service_ip: str,
) -> CertPair:
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in APISERVER_DNS_NAMES]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", "::1", service_ip)]
    cert, key = _leaf(
        _name("kube-apiserver"), ExtendedKeyUsageOID.SERVER_AUTH, ca_cert, ca_key, sans
    )
    return CertPair(
        _write_cert(directory / f"{name}.crt", cert), _write_key(directory / f"{name}.key", key)
    )


def _write_client(
    directory: Path,
    name: str,
    common_name: str,
    organizations: Sequence[str],
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
) -> CertPair:
    cert, key = _leaf(
        _name(common_name, organizations), ExtendedKeyUsageOID.CLIENT_AUTH, ca_cert, ca_key
    )
    return CertPair(
        _write_cert(directory / f"{name}.crt", cert), _write_key(directory / f"{name}.key", key)
    )


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key
