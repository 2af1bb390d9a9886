"""Who gets a broker certificate of a node: only the agents' ServiceAccount, only for the node
its pod runs on, only for a request exactly like an agent's (decide/csr_review.py); and what
the signer puts in a certificate (transport/certificates.py)."""

from __future__ import annotations

import base64
import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from watchdog.decide.csr_review import NODE_NAME_EXTRA, POD_NAME_EXTRA, review
from watchdog.decide.names import MQTT_CLIENT_SIGNER
from watchdog.transport.certificates import Authority, held, new_key_and_request, write_private

AGENT = "system:serviceaccount:node-watchdog:node-watchdog-agent"


def spec(node: str = "node-1", **changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "signerName": MQTT_CLIENT_SIGNER,
        "username": AGENT,
        "extra": {NODE_NAME_EXTRA: [node], POD_NAME_EXTRA: ["node-watchdog-abcde"]},
        "usages": ["client auth", "digital signature"],
    }
    return base | changes


def request_for(*attributes: x509.NameAttribute, key: Any = None, san: bool = False) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(list(attributes)))
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("node-2")]), critical=False
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def cn(name: str) -> x509.NameAttribute:
    return x509.NameAttribute(NameOID.COMMON_NAME, name)


def test_the_agent_of_a_node_gets_a_certificate_of_that_node() -> None:
    _, request = new_key_and_request("node-1")
    verdict = review(spec(), request, AGENT)
    assert verdict.node == "node-1" and verdict.denial is None


def test_a_nodes_credentials_cannot_ask_for_another_node() -> None:
    """The must-not twin: the pod runs on node-1 (the API server says so), the request asks
    for node-2's identity."""
    _, request = new_key_and_request("node-2")
    verdict = review(spec("node-1"), request, AGENT)
    assert verdict.node is None
    assert "CN='node-2'" in (verdict.denial or "") and "'node-1'" in (verdict.denial or "")


def test_every_deviation_from_an_agents_request_is_denied_naming_the_field() -> None:
    _, good = new_key_and_request("node-1")
    cases: list[tuple[dict[str, Any], bytes, str]] = [
        (spec(signerName="kubernetes.io/kube-apiserver-client"), good, "spec.signerName"),
        (spec(username="system:serviceaccount:default:intruder"), good, "spec.username"),
        (spec(extra={POD_NAME_EXTRA: ["p"]}), good, NODE_NAME_EXTRA),  # an unbound token
        (spec(extra={NODE_NAME_EXTRA: ["node-1", "node-2"], POD_NAME_EXTRA: ["p"]}), good, "extra"),
        (spec(extra={NODE_NAME_EXTRA: ["node-1"]}), good, POD_NAME_EXTRA),
        (spec(usages=["client auth", "server auth"]), good, "spec.usages"),
        (spec(usages=["digital signature"]), good, "spec.usages"),
        (spec(), b"not a request", "spec.request"),
        (spec(), b"x" * 20_000, "bytes"),
        (
            spec(),
            request_for(
                cn("node-1"), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters")
            ),
            "CN only",
        ),
        (spec(), request_for(cn("node-1"), san=True), "extensions"),
        (
            spec(),
            request_for(cn("node-1"), key=rsa.generate_private_key(65537, 1024)),
            "RSA key of 1024 bits",
        ),
    ]
    for s, request, field in cases:
        verdict = review(s, request, AGENT)
        assert verdict.node is None, (s, field)
        assert field in (verdict.denial or ""), (field, verdict.denial)


def test_the_controllers_login_is_never_a_node_name() -> None:
    """`watchdog_controller` logs in with a password on its own listener; no certificate is
    ever issued for it (nor for anything that is not a node name)."""
    for name in ("watchdog_controller", "node-1/#", "+", "NODE-1", ""):
        _, request = new_key_and_request(name or "x")
        verdict = review(spec(name), request, AGENT)
        assert verdict.node is None and "not a node name" in (verdict.denial or ""), name


def _der(request_pem: bytes) -> bytes:
    return x509.load_pem_x509_csr(request_pem).public_bytes(serialization.Encoding.DER)


def _pem(der: bytes) -> bytes:
    body = base64.encodebytes(der)
    return b"-----BEGIN CERTIFICATE REQUEST-----\n" + body + b"-----END CERTIFICATE REQUEST-----\n"


def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    size = (
        bytes([n])
        if n < 128
        else bytes([0x80 | ((n.bit_length() + 7) // 8)])
        + n.to_bytes((n.bit_length() + 7) // 8, "big")
    )
    return bytes([tag]) + size + content


def _read(buf: bytes, i: int) -> tuple[bytes, int]:
    """The whole TLV at `i` and the index after it."""
    length, j = buf[i + 1], i + 2
    if length & 0x80:
        k = length & 0x7F
        length, j = int.from_bytes(buf[j : j + k], "big"), j + k
    return buf[i : j + length], j + length


def test_a_request_whose_extensions_cannot_be_parsed_is_denied_not_raised() -> None:
    """A request correctly signed by its key whose extensions the parser rejects (two
    basicConstraints; a basicConstraints that is not one): reading `extensions` raises in the
    library. One node's request must not crash every replica that leads."""
    key = ec.generate_private_key(ec.SECP256R1())
    stand_in = x509.ObjectIdentifier("1.2.3.4")  # DER 06 03 2a 03 04, as long as basicConstraints'
    for value, duplicate in ((b"\x05\x00", True), (b"\x04\x00", False)):
        builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([cn("node-1")]))
        if duplicate:
            builder = builder.add_extension(x509.BasicConstraints(False, None), critical=False)
        builder = builder.add_extension(x509.UnrecognizedExtension(stand_in, value), critical=False)
        der = builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
        outer, _ = _read(der, 0)
        header = 2 if outer[1] < 128 else 2 + (outer[1] & 0x7F)
        tbs, after = _read(outer, header)
        algorithm, _ = _read(outer, after)
        tbs = tbs.replace(bytes.fromhex("06032a0304"), bytes.fromhex("0603551d13"))
        signature = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
        forged = _pem(_tlv(0x30, tbs + algorithm + _tlv(0x03, b"\x00" + signature)))
        verdict = review(spec(), forged, AGENT)
        assert verdict.node is None and verdict.denial, verdict


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_review_never_raises_on_a_mutated_request(data: st.DataObject) -> None:
    """Each field of a valid spec right, the request's DER mutated anywhere: a verdict, never
    an exception, and never a certificate of another subject."""
    der = bytearray(_der(GOOD_REQUEST))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(der) - 1))
        der[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(len(der) // 2, len(der)))
    verdict = review(spec(), _pem(bytes(der[:cut])), AGENT)
    assert (verdict.node is None) != (verdict.denial is None)
    assert verdict.node in (None, "node-1")


GOOD_REQUEST = new_key_and_request("node-1")[1]


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["signerName", "username", "extra", "usages", "expirationSeconds"]),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(max_size=40), inner, max_size=3)
            ),
            max_leaves=8,
        ),
    ),
    st.binary(max_size=300),
)
def test_review_never_raises_on_any_input(raw: dict[str, Any], request: bytes) -> None:
    verdict = review(raw, request, AGENT)
    assert verdict.node is None and verdict.denial


def make_authority() -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([cn("test signer")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Authority(certificate, key)


def test_a_certificate_grants_client_auth_for_the_subject_and_key_of_the_request_only(
    tmp_path: Path,
) -> None:
    authority = make_authority()
    key_pem, request = new_key_and_request("node-1")
    now = datetime.datetime.now(datetime.UTC)
    pem = authority.sign(request, 3600, now)
    certificate = x509.load_pem_x509_certificate(pem)
    assert certificate.subject.rfc4514_string() == "CN=node-1"
    assert certificate.issuer == authority.certificate.subject
    eku = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # X.509 times have whole seconds.
    lifetime = certificate.not_valid_after_utc - now
    assert abs(lifetime - datetime.timedelta(seconds=3600)) < datetime.timedelta(seconds=1)
    # It verifies against the signer's certificate.
    certificate.verify_directly_issued_by(authority.certificate)

    path = tmp_path / "client.pem"
    write_private(path, pem + key_pem)
    assert path.stat().st_mode & 0o777 == 0o600
    h = held(path)
    assert h is not None and h.common_name == "node-1"
    assert h.not_before < h.renew_at() < h.not_after
    # A certificate beside another key (a torn renewal) proves nothing.
    other_key, _ = new_key_and_request("node-1")
    write_private(path, pem + other_key)
    assert held(path) is None
    assert held(tmp_path / "missing.pem") is None


def test_extensions_asked_for_are_not_granted() -> None:
    """A request with a SubjectAlternativeName (it would be denied by review anyway): signing
    takes only the subject and the key."""
    request = request_for(cn("node-1"), san=True)
    certificate = x509.load_pem_x509_certificate(make_authority().sign(request, 600))
    assert all(not isinstance(e.value, x509.SubjectAlternativeName) for e in certificate.extensions)
