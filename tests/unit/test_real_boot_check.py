"""The chaos harness's boot-id check on real clusters: a kill goes only to the machine whose boot
the target's Node reports (chaos/harness/real.py `boot_mismatch`)."""

from __future__ import annotations

from chaos.harness.real import boot_mismatch, parse_boot_id


def node(boot: str | None) -> dict:
    return {"status": {"nodeInfo": {"bootID": boot} if boot is not None else {}}}


def test_the_machine_of_the_nodes_boot_may_be_killed():
    assert boot_mismatch("w-1", node("b-1"), "b-1", "ssh w-1") is None


def test_another_machine_or_another_boot_is_refused_and_named():
    why = boot_mismatch("w-1", node("b-1"), "b-2", "ssh 10.0.0.7")
    assert why is not None
    assert "ssh 10.0.0.7 has boot id b-2" in why and "reports b-1" in why


def test_nothing_to_compare_is_refused_never_assumed():
    assert "no such Node" in (boot_mismatch("w-1", None, "b-1", "x") or "")
    assert "no status.nodeInfo.bootID" in (boot_mismatch("w-1", node(None), "b-1", "x") or "")
    assert "could not read" in (boot_mismatch("w-1", node("b-1"), None, "x") or "")


def test_the_boot_id_is_the_last_line_a_command_prints():
    assert parse_boot_id("Warning: banner\n 5f0c-ab \n\n") == "5f0c-ab"
    assert parse_boot_id("  \n") is None
