"""The configuration contract: every bad input is a clear exit 2 naming field, value and why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from tests.unit.test_csr_review import make_authority
from watchdog.decide.config import DecideConfig, FenceMode, Policy
from watchdog.runtime.settings import Settings


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("WATCHDOG_")}
    return subprocess.run(
        [sys.executable, "-m", "watchdog.runtime.cli", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_defaults_are_valid_and_documented() -> None:
    s = Settings()
    assert s.fence_mode is FenceMode.SELF
    assert s.heartbeat_interval_s == 1.0
    schema = Settings.model_json_schema()
    undocumented = [k for k, v in schema["properties"].items() if not v.get("description")]
    assert undocumented == []


def test_the_settings_defaults_are_the_decision_cores_defaults() -> None:
    """The decision core's timings and switches have defaults of their own (its tests and
    benchmarks build it without Settings): they must be the ones the service runs with."""
    s = Settings()
    assert s.decide_config() == DecideConfig()
    assert s.default_policy() == Policy()


def test_nested_environment_and_yaml_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("fence_mode: manual\npolicy:\n  period_s: 42\nmqtt:\n  keepalive_s: 9\n")
    monkeypatch.setenv("WATCHDOG_CONFIG_FILE", str(cfg))
    monkeypatch.setenv("WATCHDOG_MQTT__KEEPALIVE_S", "11")
    s = Settings()
    assert s.fence_mode is FenceMode.MANUAL
    assert s.policy.period_s == 42
    assert s.mqtt.keepalive_s == 11  # the environment wins over the file


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param(
            {"WATCHDOG_HEARTBEAT_INTERVAL_S": "-1"},
            ["heartbeat_interval_s = '-1'", "greater than 0", "WATCHDOG_HEARTBEAT_INTERVAL_S"],
            id="negative duration names field, value and env var",
        ),
        pytest.param(
            {"WATCHDOG_SUSPECT_AFTER_S": "soon"},
            ["suspect_after_s = 'soon'", "valid number"],
            id="wrong type",
        ),
        pytest.param(
            {"WATCHDOG_UNREACHABLE_AFTER_S": "2"},
            ["unreachable_after_s (2.0) must be greater than suspect_after_s (3.0)"],
            id="inverted durations",
        ),
        pytest.param(
            {"WATCHDOG_FENCE_MODE": "stonith"},
            ["fence_mode = 'stonith'", "'self', 'external', 'power', 'manual' or 'none'"],
            id="unknown fence mode",
        ),
        pytest.param(
            {"WATCHDOG_FENCE_MODE": "external"},
            ["needs fence_hook_command or fence_hook_url"],
            id="external fencing without a hook",
        ),
        pytest.param(
            {"WATCHDOG_MQTT__URL": "http://broker"},
            ["mqtt.url = 'http://broker'", "WATCHDOG_MQTT__URL"],
            id="nested field bad value",
        ),
        pytest.param(
            {
                "WATCHDOG_MQTT__ENROLL_FILE": "/run/id.pem",
                "WATCHDOG_MQTT__CERT_FILE": "/c.pem",
                "WATCHDOG_MQTT__KEY_FILE": "/k.pem",
            },
            ["enroll_file (/run/id.pem) and cert_file (/c.pem): one client certificate only"],
            id="an obtained and a given client certificate",
        ),
        pytest.param(
            {"WATCHDOG_MQTT__SIGNER_CA_FILE": "/ca.crt"},
            ["signer_ca_file and signer_key_file must be given together"],
            id="a signer without its key",
        ),
        pytest.param(
            {"WATCHDOG_MQTT__ENROLL_LIFETIME_S": "60"},
            ["mqtt.enroll_lifetime_s = '60'", "greater than or equal to 600"],
            id="a certificate lifetime below the API's minimum",
        ),
        pytest.param(
            {"WATCHDOG_CONFIG_FILE": "/nonexistent/watchdog.yaml"},
            ["/nonexistent/watchdog.yaml", "cannot read"],
            id="unreadable config file",
        ),
        pytest.param(
            {"WATCHDOG_NO_SUCH_KNOB": "1"},
            [],
            id="unknown env vars with the prefix are ignored, like every pydantic-settings app",
        ),
    ],
)
def test_bad_configuration_exits_2_with_a_clear_message(
    env: dict[str, str], expected: list[str]
) -> None:
    result = run_cli("config", env=env)
    if not expected:
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode == 2, result.stdout
    for text in expected:
        assert text in result.stderr


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param("fence_mode: [self\n", "not valid YAML", id="broken yaml"),
        pytest.param("- a\n- b\n", "top level must be a mapping", id="yaml list"),
        pytest.param("fence_mod: self\n", "fence_mod", id="misspelled key is refused"),
    ],
)
def test_bad_config_file_exits_2(tmp_path: Path, content: str, expected: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(content)
    result = run_cli("config", env={"WATCHDOG_CONFIG_FILE": str(cfg)})
    assert result.returncode == 2
    assert expected in result.stderr


def test_config_prints_effective_values_with_secrets_masked(tmp_path: Path) -> None:
    result = run_cli(
        "config",
        env={"WATCHDOG_MQTT__PASSWORD": "hunter2", "WATCHDOG_POLICY__PERIOD_S": "30"},
    )
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout
    data = json.loads(result.stdout)
    assert data["mqtt"]["password"] == "***"
    assert data["policy"]["period_s"] == 30


def test_schema_lists_every_field() -> None:
    result = run_cli("config", "--schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert {"heartbeat_interval_s", "fence_mode", "policy", "mqtt"} <= set(schema["properties"])


def test_password_is_read_from_its_file_at_use_time(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("first\n")
    s = Settings(mqtt={"password_file": secret})
    assert s.mqtt_password() == "first"
    secret.write_text("rotated\n")
    assert s.mqtt_password() == "rotated"


def test_power_fencing_needs_a_bmc_inventory_in_the_controller_only(tmp_path: Path) -> None:
    """Agents load the same ConfigMap: fence_mode power without an inventory is valid for them;
    a controller refuses to start without one, or with one it cannot use, naming what is
    wrong (exit 2, before it connects to anything)."""
    power = {"WATCHDOG_FENCE_MODE": "power", "WATCHDOG_NODE_NAME": "node-1"}
    assert run_cli("config", env=power).returncode == 0
    result = run_cli("controller", env=power)
    assert result.returncode == 2, result.stderr
    assert "fence_mode 'power' needs power_fence_inventory" in result.stderr
    bad = tmp_path / "inventory.yaml"
    bad.write_text("nodes:\n  node-1: {agent: fence_redfish, ip: 10.0.0.1, username: a}\n")
    result = run_cli("controller", env={**power, "WATCHDOG_POWER_FENCE_INVENTORY": str(bad)})
    assert result.returncode == 2, result.stderr
    assert "nodes.node-1: needs exactly one of password, password_file" in result.stderr


def test_a_controller_refuses_a_signer_it_cannot_sign_with(tmp_path: Path) -> None:
    """A missing CA file, or a key that is not the CA's: exit 2 at start, naming the files,
    not when the first node asks for its certificate. The agent never reads them."""
    a, b = make_authority(), make_authority()
    pem = serialization.Encoding.PEM
    (tmp_path / "a.crt").write_bytes(a.certificate.public_bytes(pem))
    (tmp_path / "b.key").write_bytes(
        b.key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    mismatched = {
        "WATCHDOG_MQTT__SIGNER_CA_FILE": str(tmp_path / "a.crt"),
        "WATCHDOG_MQTT__SIGNER_KEY_FILE": str(tmp_path / "b.key"),
    }
    missing = {**mismatched, "WATCHDOG_MQTT__SIGNER_CA_FILE": str(tmp_path / "none.crt")}
    for env, why in ((mismatched, "is not the key of the certificate"), (missing, "none.crt")):
        result = run_cli("controller", env=env)
        assert result.returncode == 2, result.stderr
        assert "mqtt.signer_ca_file/signer_key_file" in result.stderr and why in result.stderr


def test_an_agent_whose_node_name_cannot_be_a_common_name_exits_naming_it() -> None:
    """A certificate's common name has at most 64 characters; a longer node name cannot get one
    through the signer: exit 2 at start, naming the node, instead of retrying for ever."""
    node = "n" * 65
    env = {"WATCHDOG_NODE_NAME": node, "WATCHDOG_MQTT__ENROLL_FILE": "/run/id/client.pem"}
    result = run_cli("agent", env=env)
    assert result.returncode == 2, result.stderr
    assert f"node name {node!r} has 65 characters" in result.stderr
    # The twin: 64 characters pass this check; the agent goes on to its kubeconfig (none here).
    fits = {**env, "WATCHDOG_NODE_NAME": "n" * 64, "KUBECONFIG": "/nonexistent/kubeconfig"}
    later = run_cli("agent", env=fits)
    assert "characters, a certificate's common name" not in later.stderr
    assert "/nonexistent/kubeconfig" in later.stderr, later.stderr
