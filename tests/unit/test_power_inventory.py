"""The BMC inventory of fence_mode=power refuses what it cannot use, naming node and field.

A fence that cannot run must be found when the controller starts, not during a failover; and
no input may raise anything but the parser's own error (hypothesis).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from watchdog.actuate.power_fence import Bmc, InventoryError, parse_inventory

GOOD = {
    "nodes": {
        "node-1": {
            "agent": "fence_redfish",
            "ip": "10.0.0.11",
            "username": "admin",
            "password": "s3cret",
            "options": {
                "ipport": 443,
                "systems-uri": "/redfish/v1/Systems/1",
                "ssl-insecure": 1,
            },
        }
    }
}


def doc(**node: object) -> str:
    entry = {**GOOD["nodes"]["node-1"], **node}
    return yaml.safe_dump({"nodes": {"node-1": {k: v for k, v in entry.items() if v != "DROP"}}})


def test_a_good_inventory_gives_the_agent_its_options_on_stdin_never_on_the_command_line() -> None:
    bmc = parse_inventory(yaml.safe_dump(GOOD))["node-1"]
    assert bmc == Bmc(
        "node-1",
        "fence_redfish",
        "10.0.0.11",
        "admin",
        "s3cret",
        (("ipport", "443"), ("ssl-insecure", "1"), ("systems-uri", "/redfish/v1/Systems/1")),
    )
    lines = bmc.stdin("off").decode().splitlines()
    # The watchdog's own lines last: the fence library keeps the last value of an option.
    assert lines[-4:] == ["ip=10.0.0.11", "username=admin", "password=s3cret", "action=off"]
    assert "s3cret" not in repr(bmc)


def test_a_password_file_is_read_relative_to_the_inventory(tmp_path: Path) -> None:
    (tmp_path / "node-1.pw").write_text("from-file\n")
    bmc = parse_inventory(doc(password="DROP", password_file="node-1.pw"), tmp_path)["node-1"]
    assert bmc.password == "from-file"
    # A second line would be read by the fence agent as another option.
    (tmp_path / "node-1.pw").write_text("pw\naction=on\n")
    with pytest.raises(InventoryError, match="password_file: must hold one line"):
        parse_inventory(doc(password="DROP", password_file="node-1.pw"), tmp_path)


def test_a_ca_file_is_checked_and_given_to_the_agent(tmp_path: Path) -> None:
    (tmp_path / "bmc-ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    bmc = parse_inventory(doc(ca_file="bmc-ca.crt"), tmp_path)["node-1"]
    assert bmc.ca_file == tmp_path / "bmc-ca.crt"
    with pytest.raises(InventoryError, match=r"nodes\.node-1\.ca_file"):
        parse_inventory(doc(ca_file="missing.crt"), tmp_path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("nodes: []", "non-empty mapping", id="no nodes"),
        pytest.param("{{{", "not YAML", id="not yaml"),
        pytest.param(
            doc(agent="ipmitool"), "nodes.node-1.agent: 'ipmitool'", id="not a fence agent"
        ),
        pytest.param(doc(agent="fence_x; rm -rf /"), "nodes.node-1.agent", id="shell in the agent"),
        pytest.param(doc(ip="DROP"), "nodes.node-1.ip: None", id="no ip"),
        pytest.param(doc(ip=""), "nodes.node-1.ip", id="empty ip"),
        pytest.param(doc(username=["a"]), "nodes.node-1.username", id="username not a string"),
        pytest.param(doc(password="DROP"), "exactly one of password, password_file", id="none"),
        pytest.param(
            doc(password_file="x.pw"), "exactly one of password, password_file", id="both"
        ),
        pytest.param(doc(password="a\nip=6.6.6.6"), "must be one line", id="injected option"),
        pytest.param(
            doc(options={"ip": "6.6.6.6"}), "'ip' is not an option the watchdog passes on", id="ip"
        ),
        pytest.param(
            doc(options={"Bad Key": 1}), "is not an option the watchdog passes on", id="bad"
        ),
        pytest.param(
            doc(options={"password-script": "/bin/sh -c 'reboot'"}),
            "'password-script' is not an option the watchdog passes on",
            id="an option that runs a command",
        ),
        pytest.param(
            doc(options={"ipaddr": "6.6.6.6"}), "'ipaddr' is not an option", id="ip alias"
        ),
        pytest.param(
            doc(options={"lanplus": ""}), "options.lanplus: '': a flag, set it with 1", id="flag"
        ),
        pytest.param(doc(options={"ssl-insecure": 0}), "a flag, set it with 1", id="flag off"),
        pytest.param(doc(options={"cipher": "a\nb"}), "options.cipher: must be one", id="bad v"),
        pytest.param(doc(port=1), "unknown fields ['port']", id="unknown field"),
        pytest.param(
            doc(password="DROP", password_file="/nonexistent/pw"), "password_file", id="f"
        ),
    ],
)
def test_a_bad_inventory_is_refused_naming_the_node_and_field(text: str, message: str) -> None:
    with pytest.raises(InventoryError, match=None) as err:
        parse_inventory(text)
    assert message in str(err.value), str(err.value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["nodes", "x"]), json_values) | json_values)
def test_no_document_raises_anything_but_an_inventory_error(value: object) -> None:
    try:
        parse_inventory(yaml.safe_dump(value))
    except InventoryError:
        pass
