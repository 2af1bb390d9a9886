"""Finding, or building once, the real Helm binary the chart is linted and rendered with.

Owns: where `helm` comes from. `$NODE_WATCHDOG_HELM` (a path to a helm binary), else the cache
(`$WATCHDOG_CHAOS_CACHE/helm/<version>/helm`, next to the control plane's), else a build of
Helm's own command from its Go module (`go install helm.sh/helm/v4/cmd/helm@<version>`) with the
machine's Go toolchain, under the same file lock and atomic rename as the control-plane build
(chaos/sim/binaries.py). Never a helm found on PATH by chance: the version is pinned so that
every machine renders the chart with the same Helm.

Must not: download a prebuilt binary.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from chaos.sim.binaries import (
    BinariesUnavailable,
    Progress,
    build_lock,
    cache_dir,
    find_go,
    run_step,
)

HELM_MODULE = "helm.sh/helm/v4"
HELM_VERSION = "v4.3.2"
HELM_ENV = "NODE_WATCHDOG_HELM"


def _stderr_progress(line: str) -> None:
    print(f"[helm] {line}", file=sys.stderr, flush=True)


def helm_cache_dir() -> Path:
    return cache_dir().parent.parent / "helm" / HELM_VERSION


def ensure_helm(*, progress: Progress = _stderr_progress) -> Path:
    """The helm binary: given, cached, or built once (see the module doc)."""
    given = os.environ.get(HELM_ENV)
    if given:
        path = Path(given)
        if not os.access(path, os.X_OK):
            raise BinariesUnavailable(f"{HELM_ENV}={given}: not an executable file")
        return path
    target = helm_cache_dir()
    binary = target / "helm"
    if os.access(binary, os.X_OK):
        return binary
    with build_lock(target, progress):
        if os.access(binary, os.X_OK):
            return binary
        for stale in target.parent.glob(f".build-{target.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        _build(target, progress)
    return binary


def _build(target: Path, progress: Progress) -> None:
    go = find_go()
    if go is None:
        raise BinariesUnavailable(
            f"cannot build helm {HELM_VERSION}: no Go toolchain (`go` not on PATH, no "
            f"/usr/local/go); install Go, or set {HELM_ENV} to a helm binary"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f".build-{target.name}-", dir=target.parent) as tmp:
        out = Path(tmp) / "bin"
        out.mkdir()
        env = dict(os.environ, GOBIN=str(out), GOFLAGS="-trimpath")
        progress(f"building helm {HELM_VERSION} from {HELM_MODULE} with {go} (first time only)")
        run_step(
            progress,
            started,
            "go install",
            [str(go), "install", "-v", "-ldflags=-s -w", f"{HELM_MODULE}/cmd/helm@{HELM_VERSION}"],
            Path(tmp),
            env,
        )
        if not os.access(out / "helm", os.X_OK):
            raise BinariesUnavailable(f"go install finished but {out / 'helm'} is missing")
        version = subprocess.run(
            [str(out / "helm"), "version", "--short"], capture_output=True, text=True, check=False
        ).stdout.strip()
        progress(f"built {version} in {time.monotonic() - started:.0f}s into {target}")
        out.rename(target)


def main(argv: list[str] | None = None) -> int:
    """`python -m chaos.sim.helm`: find or build helm, print its path (for CI, before tests)."""
    import argparse

    argparse.ArgumentParser(prog="python -m chaos.sim.helm", description=main.__doc__).parse_args(
        argv
    )
    try:
        print(ensure_helm())
    except BinariesUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
