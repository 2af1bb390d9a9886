"""The node-local fence channel's client: `python -m chaos.sim.fence_client fence SOCKET NODE`.

What a simulated node's agent runs as its fence command. It talks to the simulator over a unix
socket (not the network the node just lost) and imports only the standard library so it
finishes well within the agent's declared fence bound.
"""

from __future__ import annotations

import socket
import sys


def send_fence(socket_path: str, node: str, timeout_s: float = 5.0) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        s.connect(socket_path)
        s.sendall(f"fence {node}\n".encode())
        return s.recv(128).decode().strip()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] != "fence":
        print("usage: python -m chaos.sim.fence_client fence SOCKET NODE", file=sys.stderr)
        return 2
    try:
        answer = send_fence(args[1], args[2])
    except OSError as e:
        print(f"fence {args[2]}: cannot reach the simulator at {args[1]}: {e}", file=sys.stderr)
        return 1
    if answer != "ok":
        print(f"fence {args[2]}: {answer}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
