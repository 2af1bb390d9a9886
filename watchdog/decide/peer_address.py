"""The address an agent's peer-probe endpoint is reached at: strict "host:port" (DESIGN §4, §9).

It travels in heartbeats and probe lists, and an agent connects to whatever it says, so it is
validated like any other input from the wire: an IPv4 address, a bracketed IPv6 address or a
DNS name, and a port in 1..65535. Nothing else (no user info, no path, no whitespace).
"""

from __future__ import annotations

import functools
import ipaddress
import re

MAX_ADDRESS_CHARS = 262  # a 253-char DNS name, the colon and five digits, with room for brackets
_LABEL = r"[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?"
_DNS = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(\.{_LABEL})*")
_PORT = re.compile(r"[1-9][0-9]{0,4}")


def split_peer_address(text: object) -> tuple[str, int]:
    """(host, port) of a valid address; raises ValueError naming what is wrong."""
    if not isinstance(text, str) or not 0 < len(text) <= MAX_ADDRESS_CHARS:
        raise ValueError("peer address must be a non-empty string of at most 262 characters")
    host, sep, port_text = text.rpartition(":")
    if not sep or not _PORT.fullmatch(port_text) or not 0 < int(port_text) <= 65535:
        raise ValueError(f"peer address {text[:80]!r}: needs host:port with a port in 1..65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError as e:
            raise ValueError(f"peer address {text[:80]!r}: bad IPv6 address") from e
        return host[1:-1], int(port_text)
    if not _DNS.fullmatch(host):
        raise ValueError(f"peer address {text[:80]!r}: host is not an IPv4 address or DNS name")
    if all(part.isdigit() for part in host.split(".")):
        try:
            ipaddress.IPv4Address(host)
        except ValueError as e:  # 999.1.1.1 matches the DNS pattern but is no address
            raise ValueError(f"peer address {text[:80]!r}: bad IPv4 address") from e
    return host, int(port_text)


def valid_peer_address(text: object) -> bool:
    if isinstance(text, str):
        return _valid_address_text(text)
    return False


# Every heartbeat carries its node's address, and it almost never changes: remember verdicts
# (bounded: an agent sending ever new addresses only evicts entries, it costs a check again).
@functools.lru_cache(maxsize=16_384)
def _valid_address_text(text: str) -> bool:
    try:
        split_peer_address(text)
    except ValueError:
        return False
    return True
