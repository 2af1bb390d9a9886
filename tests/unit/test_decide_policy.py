"""Parsing Harvester's `vm-force-reset-policy`: good values, and errors that name the field."""

from __future__ import annotations

import pytest

from watchdog.decide.config import Policy
from watchdog.decide.policy import DEFAULT_MIGRATION_TIMEOUT_S, PolicyError, parse_policy


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(
            '{"enable":true,"period":300}',
            Policy(enable=True, period_s=300.0, vm_migration_timeout_s=180.0, source="harvester"),
            id="value without vmMigrationTimeout (older Harvester) gets the 180 s default",
        ),
        pytest.param(
            '{"enable":true,"period":15,"vmMigrationTimeout":240}',
            Policy(enable=True, period_s=15.0, vm_migration_timeout_s=240.0, source="harvester"),
            id="value with vmMigrationTimeout (newer Harvester)",
        ),
        pytest.param(
            '{"enable":false,"period":60,"vmMigrationTimeout":0}',
            Policy(enable=False, period_s=60.0, vm_migration_timeout_s=180.0, source="harvester"),
            id="disabled, and a timeout of 0 means Harvester's 180 s",
        ),
        pytest.param(
            '{"period":2.5}',
            Policy(enable=True, period_s=2.5, vm_migration_timeout_s=180.0, source="harvester"),
            id="enable omitted means enabled; fractional seconds accepted",
        ),
        pytest.param(
            ' {"enable": true, "period": 300, "somethingNew": 1} ',
            Policy(enable=True, period_s=300.0, source="harvester"),
            id="whitespace and unknown fields are tolerated",
        ),
    ],
)
def test_valid_policy_values(value: str, expected: Policy) -> None:
    assert parse_policy(value) == expected


def test_an_empty_value_falls_back_to_the_settings_default() -> None:
    default = '{"enable":true,"period":300}'
    assert parse_policy("", default).period_s == 300.0
    assert parse_policy(None, default).period_s == 300.0


def test_a_value_wins_over_the_default() -> None:
    assert parse_policy('{"period":15}', '{"period":300}').period_s == 15.0


@pytest.mark.parametrize(
    ("value", "names"),
    [
        pytest.param("", "neither value nor default", id="no value and no default"),
        pytest.param("{enable: true}", "not JSON", id="invalid JSON"),
        pytest.param('{"enable":true,"period":30', "not JSON", id="truncated JSON"),
        pytest.param("[1, 2]", "JSON object", id="a JSON array"),
        pytest.param('"300"', "JSON object", id="a JSON string"),
        pytest.param('{"enable":true}', "'period'", id="period missing"),
        pytest.param('{"period":0}', "'period'", id="period zero"),
        pytest.param('{"period":-5}', "'period'", id="period negative"),
        pytest.param('{"period":"300"}', "'period'", id="period as a string"),
        pytest.param('{"period":true}', "'period'", id="period as a boolean"),
        pytest.param('{"period":null}', "'period'", id="period null"),
        pytest.param('{"period":[300]}', "'period'", id="period as a list"),
        pytest.param(
            '{"period":15,"vmMigrationTimeout":-1}', "'vmMigrationTimeout'", id="negative timeout"
        ),
        pytest.param(
            '{"period":15,"vmMigrationTimeout":"3m"}',
            "'vmMigrationTimeout'",
            id="timeout as a string",
        ),
        pytest.param('{"enable":"yes","period":15}', "'enable'", id="enable as a string"),
        pytest.param('{"enable":1,"period":15}', "'enable'", id="enable as a number"),
    ],
)
def test_invalid_values_are_rejected_naming_the_problem(value: str, names: str) -> None:
    with pytest.raises(PolicyError) as exc:
        parse_policy(value)
    assert names in str(exc.value)


def test_the_offending_value_is_quoted_in_the_error() -> None:
    with pytest.raises(PolicyError, match=r"must be > 0, got -5"):
        parse_policy('{"period":-5}')
    with pytest.raises(PolicyError, match=r"got 'yes'"):
        parse_policy('{"enable":"yes","period":15}')


def test_policy_errors_are_value_errors() -> None:
    # callers keep the last good policy on any ValueError, PolicyError included
    assert issubclass(PolicyError, ValueError)
    assert DEFAULT_MIGRATION_TIMEOUT_S == 180.0
