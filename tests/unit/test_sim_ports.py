"""chaos/sim/ports.py: a port chosen for a test-cluster component stays free for it.

A component's port is chosen before the component binds it, and again after every restart
(`agent-kill` then `agent-start` binds the same metrics port). A port from the ephemeral range
can be taken meanwhile by any outgoing connection's local port; that crashed a node's service
with "address already in use" in a scenario run.
"""

from __future__ import annotations

import itertools
import re
import socket

import pytest

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


def test_side_by_side_processes_choose_from_disjoint_slices(monkeypatch) -> None:
    # Two workers of the parallel suite cannot see each other's choices: their slices must not
    # overlap, or both could give the same port to a component that binds it later.
    high = ports._ephemeral_low() - 1
    chosen = {}
    for k in range(3):
        monkeypatch.setenv(ports.SLICE_ENV, f"{k}/3")
        lo, hi = ports._slice(10_000, high)
        chosen[k] = (lo, hi, ports.free_ports(50))
        assert all(lo <= p <= hi for p in chosen[k][2])
    spans = sorted((lo, hi) for lo, hi, _ in chosen.values())
    assert all(a_hi < b_lo for (_, a_hi), (b_lo, _) in itertools.pairwise(spans))


def test_a_malformed_slice_is_refused_naming_the_variable(monkeypatch) -> None:
    for bad in ("2/2", "x", "1/0"):
        monkeypatch.setenv(ports.SLICE_ENV, bad)
        with pytest.raises(ValueError, match=f"{ports.SLICE_ENV}='{re.escape(bad)}'"):
            ports.free_port()
