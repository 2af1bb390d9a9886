"""`log_format: json` (the deployed default): one JSON object per line, whatever is logged.

Runs the service's own logging set-up in a fresh interpreter and parses every line of what it
wrote: quotes, newlines, non-ASCII and a traceback must all stay inside one object each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import logging
from watchdog.runtime.app import configure_logging
from watchdog.runtime.settings import Settings

configure_logging(Settings(log_format="json", log_level="INFO"))
log = logging.getLogger("watchdog.test")
log.info('a "quoted" value, a backslash \\\\ and a brace {x}')
log.warning("two\\nlines and ünïcödé ✓")
try:
    {}["missing"]
except KeyError:
    log.exception("node %s: action failed", "node-1")
log.error("last line")
"""


def run(fmt: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHDOG_")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT.replace('log_format="json"', f'log_format="{fmt}"')],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    return out.stderr.splitlines()


def test_every_json_log_line_parses_and_keeps_what_was_logged() -> None:
    lines = run("json")
    docs = [json.loads(line) for line in lines]  # every line, the traceback's included
    assert [d["level"] for d in docs] == ["INFO", "WARNING", "ERROR", "ERROR"]
    assert {d["logger"] for d in docs} == {"watchdog.test"}
    assert docs[0]["msg"] == 'a "quoted" value, a backslash \\ and a brace {x}'
    assert docs[1]["msg"] == "two\nlines and ünïcödé ✓"
    assert docs[2]["msg"] == "node node-1: action failed"
    assert "KeyError: 'missing'" in docs[2]["error"] and "Traceback" in docs[2]["error"]
    assert docs[3]["msg"] == "last line" and "error" not in docs[3]
    assert all(d["t"] for d in docs)


def test_text_logs_stay_text() -> None:
    lines = run("text")
    assert "WARNING watchdog.test: two" in lines[1]
    assert any(line.startswith("Traceback") for line in lines)
