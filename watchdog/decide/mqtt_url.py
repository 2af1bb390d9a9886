"""Pure arithmetic of a broker connection, shared by the agent and the controller's subscriber.

Owns: turning `mqtt.url` into host, port and whether TLS is required, and the reconnect
backoff. It must not open sockets, read certificate files or build an `ssl.SSLContext`: each
side does that at connect time (rotated certificates and passwords apply on the next attempt).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from watchdog.decide.acks import BrokerContact

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}

# Reconnect backoff: fast first retries (a broker restart or a healed partition is back within
# a second), capped low because every second without the broker brings the agent closer to
# self-fencing and makes the controller blind (UNKNOWN heartbeats, resets held).
RECONNECT_BASE_S = 0.1
RECONNECT_CAP_S = 5.0


class BrokerSettings(Protocol):
    """What both sides read of `Settings.mqtt` (runtime's model satisfies it structurally;
    the layers below runtime cannot import it)."""

    @property
    def url(self) -> str: ...
    @property
    def topic_prefix(self) -> str: ...
    @property
    def keepalive_s(self) -> int: ...
    @property
    def username(self) -> str | None: ...
    @property
    def ca_file(self) -> Path | None: ...
    @property
    def cert_file(self) -> Path | None: ...
    @property
    def key_file(self) -> Path | None: ...
    @property
    def enroll_file(self) -> Path | None: ...
    @property
    def broker_contact(self) -> BrokerContact: ...


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """`mqtt://host[:port]` or `mqtts://host[:port]` (TLS); ValueError names what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS:
        raise ValueError(f"broker URL {url!r}: scheme must be mqtt or mqtts")
    if not parts.hostname:
        raise ValueError(f"broker URL {url!r}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"broker URL {url!r}: no path, query or fragment allowed")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"broker URL {url!r}: credentials belong in username/password_file")
    try:
        port = parts.port
    except ValueError as e:
        raise ValueError(f"broker URL {url!r}: {e}") from e
    return BrokerAddress(
        host=parts.hostname,
        port=port if port is not None else DEFAULT_PORTS[parts.scheme],
        tls=parts.scheme == "mqtts",
    )


def reconnect_delay_s(
    attempt: int,
    jitter: float,
    *,
    base_s: float = RECONNECT_BASE_S,
    cap_s: float = RECONNECT_CAP_S,
) -> float:
    """Seconds to wait before reconnect `attempt` (1, 2, ...), given `jitter` in [0, 1).

    Exponential from `base_s`, capped at `cap_s`, "equal jitter": half the step is fixed, half
    random, so a broker restart is not met by every agent of the cluster in the same instant,
    yet no client ever waits longer than the cap.
    """
    step = min(cap_s, base_s * 2.0 ** min(max(attempt, 1) - 1, 32))
    return step / 2 + step / 2 * min(max(jitter, 0.0), 1.0)
