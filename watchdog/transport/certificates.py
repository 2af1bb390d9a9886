"""X.509 for the agents' broker identity: an agent's key and request, the signer's certificate,
and what a certificate on disk still proves.

Owns the cryptography (keys, requests, signatures, validity) and writing the files the broker
connection reads (transport/mqtt.py reads them anew at every connection attempt, so a renewed
certificate applies on the next reconnect). Deciding whether a request deserves a certificate
is decide/csr_review.py's; talking to the API server is actuate/mqtt_identity.py's.
"""

from __future__ import annotations

import datetime
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# A certificate is renewed once this fraction of its lifetime has passed (as kubelets do with
# theirs, at 70-90 %): the rest leaves hours for a controller that is down to come back.
RENEW_AT = 2 / 3
# Backdated so that a machine whose clock runs a little behind the signer's accepts it.
BACKDATE = datetime.timedelta(minutes=5)


def new_key_and_request(common_name: str) -> tuple[bytes, bytes]:
    """A fresh P-256 key and a certificate request whose subject is only CN=`common_name`
    (PEM, PEM). The key never leaves the machine that made it."""
    key = ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, request.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True, slots=True)
class Authority:
    """The CA that signs agents' client certificates (its key is mounted in the controller's
    pods only)."""

    certificate: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes

    @classmethod
    def load(cls, cert_file: Path, key_file: Path) -> Authority:
        """Raises OSError (unreadable) or ValueError (not a PEM certificate / key)."""
        certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        if not isinstance(
            key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
        ):
            raise ValueError(f"{key_file}: a {type(key).__name__} cannot sign certificates here")
        if not _same_key(key, certificate):
            raise ValueError(f"{key_file} is not the key of the certificate in {cert_file}")
        return cls(certificate, key)

    def sign(
        self, request_pem: bytes, lifetime_s: int, now: datetime.datetime | None = None
    ) -> bytes:
        """A client certificate (PEM) for the request's subject and key, valid `lifetime_s`.
        Only the subject and the public key are taken from the request: whatever else it
        asks for (extensions, other usages) is not granted."""
        request = x509.load_pem_x509_csr(request_pem)
        now = now or datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(request.subject)
            .issuer_name(self.certificate.subject)
            .public_key(request.public_key())
            .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + datetime.timedelta(seconds=lifetime_s))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        # Ed25519 signs without a separate hash.
        digest = None if isinstance(self.key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
        certificate = builder.sign(self.key, digest)
        return certificate.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True, slots=True)
class Held:
    """What a certificate and key on disk prove now."""

    common_name: str | None
    not_before: datetime.datetime
    not_after: datetime.datetime

    def renew_at(self) -> datetime.datetime:
        return self.not_before + (self.not_after - self.not_before) * RENEW_AT


def held(path: Path) -> Held | None:
    """The certificate in `path` (certificate and key in one PEM file, replaced as one, so a
    reader never sees a certificate with another one's key) if it is readable and the key is
    its own; None otherwise."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return held_in(data)


def held_in(data: bytes) -> Held | None:
    """`held` of the bytes of such a file."""
    try:
        certificate = x509.load_pem_x509_certificate(data)
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        return None
    if not _same_key(key, certificate):
        return None
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = str(names[0].value) if len(names) == 1 else None
    return Held(common_name, certificate.not_valid_before_utc, certificate.not_valid_after_utc)


def _same_key(key: PrivateKeyTypes, certificate: x509.Certificate) -> bool:
    """Whether `key` is the private half of the certificate's public key."""
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    mine = key.public_key().public_bytes(der, spki)
    return mine == certificate.public_key().public_bytes(der, spki)


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` atomically (write beside it, then rename), readable by us only: the
    broker connection may read it at any moment and must never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(partial, path)
