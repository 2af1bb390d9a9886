"""Broker connection options for the agent and the controller: address, TLS, credentials.

Built anew for every connection attempt, so a rotated password file or certificate applies on
the next reconnect. Owns no connection itself (the agent and the subscriber do). The pure URL
parsing lives in decide/mqtt_url.py.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass

from watchdog.decide.mqtt_url import BrokerAddress, BrokerSettings, parse_broker_url


@dataclass(frozen=True, slots=True)
class BrokerConnection:
    address: BrokerAddress
    tls_context: ssl.SSLContext | None
    username: str | None
    password: str | None


def broker_connection(
    mqtt: BrokerSettings, read_password: Callable[[], str | None]
) -> BrokerConnection:
    """Raises OSError (unreadable file), ssl.SSLError (bad certificate) or ValueError (URL)."""
    address = parse_broker_url(mqtt.url)
    tls = None
    if address.tls:
        # Verifies the broker's certificate and host name against ca_file (or the system CAs).
        tls = ssl.create_default_context(cafile=str(mqtt.ca_file) if mqtt.ca_file else None)
        if mqtt.enroll_file is not None:
            # Certificate and key in one file, replaced as one (transport/certificates.py).
            tls.load_cert_chain(str(mqtt.enroll_file))
        elif mqtt.cert_file is not None and mqtt.key_file is not None:
            tls.load_cert_chain(str(mqtt.cert_file), str(mqtt.key_file))
    return BrokerConnection(address, tls, mqtt.username, read_password())
