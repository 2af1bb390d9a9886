"""Whether a CertificateSigningRequest for an agent's broker identity deserves a certificate.

The proof that a request speaks for node N is the API server's, not the request's: the agent
sends it with its pod's bound ServiceAccount token, and the API server records in the
request's `spec.extra` the node that pod is bound to (`authentication.kubernetes.io/node-name`,
set for tokens bound to a pod). A node's credentials can therefore obtain a certificate for
that node only. The certificate's common name becomes the broker username and client id, and
the broker ACL's `%u`: the node whose topics it may write. Everything else in the request must
be exactly what an agent of ours asks for; anything else is denied with the field, the value
and the reason.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from watchdog.decide.names import MQTT_CLIENT_SIGNER

NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
# What an agent asks for; a subset is accepted, "client auth" is required.
ALLOWED_USAGES = frozenset({"client auth", "digital signature", "key encipherment"})
# DNS subdomain, as Kubernetes requires of node names: never `watchdog_controller` (the
# controller's broker login), never a wildcard or a topic separator.
_NODE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_CURVES = frozenset({"secp256r1", "secp384r1"})
MAX_REQUEST_BYTES = 16 * 1024
# X.509's upper bound for a common name (RFC 5280 ub-common-name): longer node names cannot be
# a certificate's subject.
MAX_COMMON_NAME = 64


@dataclass(frozen=True, slots=True)
class Verdict:
    """`node` when the request is granted (the certificate's subject); else `denial`."""

    node: str | None
    denial: str | None = None


def _deny(why: str) -> Verdict:
    return Verdict(None, why)


def review(spec: Mapping[str, Any], request_pem: bytes, agent_user: str) -> Verdict:
    """The verdict on one request: its `spec` and its decoded `spec.request`. Never raises:
    whatever the request holds, an exception while reading it is a denial (a request that
    crashed the signer would crash every replica that leads after it)."""
    try:
        return _review(spec, request_pem, agent_user)
    except Exception as e:  # any parser failure is the request's fault
        return _deny(f"spec.request cannot be read: {type(e).__name__}: {e}"[:512])


def _review(spec: Mapping[str, Any], request_pem: bytes, agent_user: str) -> Verdict:
    if spec.get("signerName") != MQTT_CLIENT_SIGNER:
        return _deny(f"spec.signerName {spec.get('signerName')!r} is not {MQTT_CLIENT_SIGNER}")
    username = spec.get("username")
    if username != agent_user:
        return _deny(f"spec.username {username!r}: only {agent_user} may ask (the agents)")
    extra = spec.get("extra") or {}
    nodes = extra.get(NODE_NAME_EXTRA) if isinstance(extra, Mapping) else None
    if not isinstance(nodes, Sequence) or isinstance(nodes, str) or len(nodes) != 1:
        return _deny(
            f"spec.extra[{NODE_NAME_EXTRA}] is {nodes!r}: the request must be sent with a token "
            "bound to the agent's pod, which names its node"
        )
    (node,) = nodes
    if not isinstance(node, str) or len(node) > 253 or not _NODE_NAME.match(node):
        return _deny(f"spec.extra[{NODE_NAME_EXTRA}] {node!r} is not a node name")
    if len(node) > MAX_COMMON_NAME:
        return _deny(
            f"node {node!r} has {len(node)} characters: a certificate's common name has at most "
            f"{MAX_COMMON_NAME} (give this agent cert_file/key_file instead)"
        )
    if not (extra.get(POD_NAME_EXTRA) if isinstance(extra, Mapping) else None):
        return _deny(f"spec.extra[{POD_NAME_EXTRA}] is missing: the token is not bound to a pod")
    usages = spec.get("usages") or []
    if not isinstance(usages, Sequence) or isinstance(usages, str):
        return _deny(f"spec.usages {usages!r} is not a list")
    if "client auth" not in usages or not set(usages) <= ALLOWED_USAGES:
        return _deny(f"spec.usages {sorted(map(str, usages))}: 'client auth' only (and the key's)")
    if len(request_pem) > MAX_REQUEST_BYTES:
        return _deny(f"spec.request is {len(request_pem)} bytes, over {MAX_REQUEST_BYTES}")
    try:
        request = x509.load_pem_x509_csr(request_pem)
    except ValueError as e:
        return _deny(f"spec.request is not a PEM certificate request: {e}")
    if not request.is_signature_valid:
        return _deny("spec.request: its signature does not verify with its own key")
    attributes = list(request.subject)
    if len(attributes) != 1 or attributes[0].oid != NameOID.COMMON_NAME:
        return _deny(f"spec.request subject {request.subject.rfc4514_string()!r}: CN only")
    if attributes[0].value != node:
        return _deny(
            f"spec.request asks for CN={attributes[0].value!r}, but the pod that sent it runs on "
            f"node {node!r}"
        )
    if len(request.extensions) != 0:
        return _deny("spec.request carries extensions: an agent's request has none")
    key = request.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in _CURVES:
            return _deny(f"spec.request key on curve {key.curve.name}: P-256 or P-384 only")
    elif isinstance(key, rsa.RSAPublicKey):
        if not 2048 <= key.key_size <= 8192:
            return _deny(f"spec.request RSA key of {key.key_size} bits: 2048 to 8192 only")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        return _deny(f"spec.request key type {type(key).__name__} is not accepted")
    return Verdict(node)
