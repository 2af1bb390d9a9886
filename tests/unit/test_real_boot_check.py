"""The chaos harness's boot-id check on real clusters: a kill goes only to the machine whose boot
the target's Node reports (chaos/harness/real.py `boot_mismatch`)."""

from __future__ import annotations

from chaos.harness.real import boot_mismatch, parse_boot_id

UUID = "4C4C4544-0042-3510-8051-B4C04F4B4E31"


def node(boot: str | None, uuid: str | None = None) -> dict:
    info = {k: v for k, v in (("bootID", boot), ("systemUUID", uuid)) if v is not None}
    return {"status": {"nodeInfo": info}}


def test_the_machine_of_the_nodes_boot_may_be_killed():
    assert boot_mismatch("w-1", node("b-1"), "b-1", "ssh w-1") is None


def test_a_hypervisor_or_bmc_may_name_the_machine_by_its_system_uuid():
    # `virsh domuuid` prints it in lower case; the kubelet reports what the firmware says.
    assert boot_mismatch("w-1", node("b-1", UUID), UUID.lower(), "virsh domuuid w-1") is None
    why = boot_mismatch("w-1", node("b-1", UUID), "0" * 32, "virsh domuuid w-1")
    assert why is not None and f"system UUID {UUID}" in why


def test_another_machine_or_another_boot_is_refused_and_named():
    why = boot_mismatch("w-1", node("b-1"), "b-2", "ssh 10.0.0.7")
    assert why is not None
    assert "ssh 10.0.0.7 printed b-2" in why and "boot id b-1" in why
    assert "not the same machine" in why


def test_nothing_to_compare_is_refused_never_assumed():
    assert "no such Node" in (boot_mismatch("w-1", None, "b-1", "x") or "")
    assert "neither status.nodeInfo.bootID nor systemUUID" in (
        boot_mismatch("w-1", node(None), "b-1", "x") or ""
    )
    assert "could not read" in (boot_mismatch("w-1", node("b-1"), None, "x") or "")


def test_the_boot_id_is_the_last_line_a_command_prints():
    assert parse_boot_id("Warning: banner\n 5f0c-ab \n\n") == "5f0c-ab"
    assert parse_boot_id("  \n") is None
