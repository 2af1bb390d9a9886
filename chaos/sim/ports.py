"""Ports for the test cluster's components, chosen where no outgoing connection can take them.

A component is told its port before it binds (kube-apiserver's `--secure-port`, an agent's
metrics port, a broker restarted on the port its clients know), so the port has to stay free
between the choice and every later bind. A port the kernel hands out for `bind(0)` comes from
the ephemeral range (`net.ipv4.ip_local_port_range`), the same range every outgoing TCP
connection draws its local port from, and the test cluster opens hundreds of those: a node's
metrics port freed by an `agent-kill` was taken by a connection before `agent-start` bound it
again. Ports here come from below that range, which the kernel never assigns on its own; within
this process no port is handed out twice.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
from pathlib import Path

# Below 10000 sit the well-known defaults of what may also run on the machine (Prometheus
# 9090, node exporters, brokers on 1883/8883).
_LOWEST = 10_000
_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")

_given: set[int] = set()
_lock = threading.Lock()
_random = random.SystemRandom()  # separate processes must not draw the same sequence


def _ephemeral_low() -> int:
    try:
        return int(_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now, outside the ephemeral range, not handed out before here."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports, each bound once to check it is free, none handed out before."""
    high = _ephemeral_low() - 1
    if high - _LOWEST < 1_000:
        # The machine gave (almost) every port to the ephemeral range: fall back to the
        # kernel's choice, which is as good as it gets there.
        return _kernel_ports(count, host)
    ports: list[int] = []
    with _lock:
        for _ in range(50 * count):
            if len(ports) == count:
                break
            port = _random.randint(_LOWEST, high)
            if port in _given or port in ports:
                continue
            if _bindable(host, port):
                ports.append(port)
        if len(ports) < count:
            raise OSError(f"no {count} free ports between {_LOWEST} and {high} on {host}")
        _given.update(ports)
    return ports


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _kernel_ports(count: int, host: str) -> list[int]:
    with contextlib.ExitStack() as stack:
        socks = [
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            for _ in range(count)
        ]
        for s in socks:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]


__all__ = ["free_port", "free_ports"]
