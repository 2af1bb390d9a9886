"""Ports for the test cluster's components, chosen where no outgoing connection can take them.

A component is told its port before it binds (kube-apiserver's `--secure-port`, an agent's
metrics port, a broker restarted on the port its clients know), so the port has to stay free
between the choice and every later bind. A port the kernel hands out for `bind(0)` comes from
the ephemeral range (`net.ipv4.ip_local_port_range`), the same range every outgoing TCP
connection draws its local port from, and the test cluster opens hundreds of those: a node's
metrics port freed by an `agent-kill` was taken by a connection before `agent-start` bound it
again. Ports here come from below that range, which the kernel never assigns on its own; within
this process no port is handed out twice.

Processes that run test clusters side by side (the test suite's parallel workers) cannot see
each other's choices: each is given its own slice of that range with `NODE_WATCHDOG_PORT_SLICE`
= `k/n` (slice k of n, from 0), so no two of them can choose the same port.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import threading
from pathlib import Path

# Below 10000 sit the well-known defaults of what may also run on the machine (Prometheus
# 9090, node exporters, brokers on 1883/8883).
_LOWEST = 10_000
_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
SLICE_ENV = "NODE_WATCHDOG_PORT_SLICE"

_given: set[int] = set()
_lock = threading.Lock()
_random = random.SystemRandom()  # separate processes must not draw the same sequence


def _ephemeral_low() -> int:
    try:
        return int(_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def _slice(low: int, high: int) -> tuple[int, int]:
    """This process's part of [low, high]: all of it unless SLICE_ENV names a slice."""
    raw = os.environ.get(SLICE_ENV, "")
    if not raw:
        return low, high
    try:
        k, n = (int(x) for x in raw.split("/"))
    except ValueError:
        raise ValueError(f"{SLICE_ENV}={raw!r}: expected k/n, e.g. 0/2") from None
    if not 0 <= k < n:
        raise ValueError(f"{SLICE_ENV}={raw!r}: k must be in 0..n-1")
    size = (high - low + 1) // n
    return low + k * size, low + (k + 1) * size - 1


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now, outside the ephemeral range, not handed out before here."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports, each bound once to check it is free, none handed out before."""
    low, high = _slice(_LOWEST, _ephemeral_low() - 1)
    if high - low < 1_000:
        # The machine gave (almost) every port to the ephemeral range: fall back to the
        # kernel's choice, which is as good as it gets there.
        return _kernel_ports(count, host)
    ports: list[int] = []
    with _lock:
        for _ in range(50 * count):
            if len(ports) == count:
                break
            port = _random.randint(low, high)
            if port in _given or port in ports:
                continue
            if _bindable(host, port):
                ports.append(port)
        if len(ports) < count:
            raise OSError(f"no {count} free ports between {low} and {high} on {host}")
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
