"""The first build's progress lines give a total and an estimate of the time left.

`count_packages` runs the real `go list` on a small module (its own packages and the standard
library's, all present offline); `progress_line` is the arithmetic of the estimate.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from chaos.sim.binaries import count_packages, find_go, progress_line


def test_a_line_counts_against_the_total_and_estimates_from_the_pace_so_far() -> None:
    line = progress_line("compiling", 100.0, 400, 2000)
    assert line == "compiling: 400 of 2,000 packages, 100s elapsed, about 7 min left"
    assert progress_line("compiling", 30.0, 300, 400).endswith("about 10s left")
    # A warm build cache: fewer lines than the total, never a negative estimate.
    assert progress_line("compiling", 10.0, 450, 400).startswith("compiling: 400 of 400")
    assert progress_line("compiling", 10.0, 0, 400) == "compiling: 10s elapsed"
    assert progress_line("go install", 40.0, 247, None) == (
        "go install: 40s elapsed, 247 packages so far"
    )


def test_the_total_is_every_package_the_build_compiles(tmp_path: Path) -> None:
    go = find_go()
    if go is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("no Go toolchain: CI builds the control plane with it", pytrace=False)
        pytest.skip("no Go toolchain")
    (tmp_path / "go.mod").write_text("module example.com/m\n\ngo 1.22\n")
    for name in ("a", "b"):
        cmd = tmp_path / "cmd" / name
        cmd.mkdir(parents=True)
        main = 'package main\n\nimport "fmt"\n\nfunc main() { fmt.Println() }\n'
        (cmd / "main.go").write_text(main)
    env = dict(os.environ, GOFLAGS="-mod=mod", GOTOOLCHAIN="local")
    total = count_packages(go, tmp_path, env)
    assert total is not None
    # Both commands and fmt's standard-library closure (dozens of packages), each counted once.
    assert 20 < total < 200
    (tmp_path / "go.mod").unlink()
    assert count_packages(go, tmp_path, env) is None, "not a module: it cannot tell"
