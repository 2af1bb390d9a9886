"""chaos/sim/ports.py: a port chosen for a test-cluster component stays free for it.

A component's port is chosen before the component binds it, and again after every restart
(`agent-kill` then `agent-start` binds the same metrics port). A port from the ephemeral range
can be taken meanwhile by any outgoing connection's local port; that crashed a node's service
with "address already in use" in a scenario run.
"""

from __future__ import annotations

import socket

from chaos.sim import ports


def test_ports_come_from_below_the_ephemeral_range_and_are_never_repeated() -> None:
    low = ports._ephemeral_low()
    chosen = ports.free_ports(200) + [ports.free_port() for _ in range(50)]
    assert len(set(chosen)) == len(chosen)
    assert all(10_000 <= p < low for p in chosen), [p for p in chosen if p >= low]


def test_a_port_in_use_is_not_chosen() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        # every port this process could be given is checked by binding it: a listening one fails
        assert not ports._bindable("127.0.0.1", taken)
