"""Shared fixtures. Each fixture is owned by the module it serves; append, do not rewrite."""

from __future__ import annotations

import os

import pytest

from chaos.sim.binaries import BinariesUnavailable, ControlPlaneBinaries, ensure_binaries


@pytest.fixture(scope="session")
def control_plane_binaries(pytestconfig: pytest.Config) -> ControlPlaneBinaries:
    """The real control-plane binaries, found or built once per session (chaos/sim/binaries.py).

    Locally a machine that cannot get them skips the cluster tests; in CI (CI=true) that is a
    failure, so a broken build can never pass as "all skipped".
    """
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")

    def progress(line: str) -> None:
        # A first build takes minutes: show it on the terminal despite output capturing.
        with capture.global_and_fixture_disabled():
            print(f"[control-plane] {line}", flush=True)

    try:
        return ensure_binaries(progress=progress)
    except BinariesUnavailable as e:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"control-plane binaries unavailable in CI: {e}", pytrace=False)
        pytest.skip(f"control-plane binaries unavailable: {e}")
