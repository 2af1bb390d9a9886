"""Evacuating a degraded-but-alive node within KubeVirt's migration limits (DESIGN §6)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from watchdog.decide.evacuation import (
    EvacuationVMI,
    Limits,
    MigrationPolicyRef,
    describe_policy,
    matching_policy,
    plan_evacuation,
)

LIMITS = Limits(per_cluster=5, outbound_per_node=2)


def vmis(n: int, **kw: object) -> list[EvacuationVMI]:
    return [EvacuationVMI("vms", f"vm{i}", live_migratable=True, **kw) for i in range(n)]  # type: ignore[arg-type]


def names(plan: tuple[EvacuationVMI, ...]) -> list[str]:
    return [v.name for v in plan]


@pytest.mark.parametrize(
    ("in_cluster", "from_node", "started"),
    [
        pytest.param(0, 0, 2, id="idle cluster: two, the per-node limit"),
        pytest.param(4, 0, 1, id="four running in the cluster: one more"),
        pytest.param(5, 0, 0, id="cluster limit reached: none"),
        pytest.param(0, 1, 1, id="one already leaving this node: one more"),
        pytest.param(1, 2, 0, id="per-node limit reached by running ones: none"),
        pytest.param(9, 7, 0, id="over both limits (changed at run time): none, never negative"),
    ],
)
def test_never_exceeds_either_limit_counting_running_migrations(
    in_cluster: int, from_node: int, started: int
) -> None:
    plan = plan_evacuation(vmis(6), in_cluster, from_node, LIMITS)
    assert len(plan.start) == started
    assert len(plan.waiting) == 6 - started
    assert plan.not_migratable == ()


def test_a_bigger_per_node_limit_is_capped_by_the_cluster_limit() -> None:
    plan = plan_evacuation(vmis(10), 3, 0, Limits(per_cluster=5, outbound_per_node=8))
    assert len(plan.start) == 2


def test_priority_then_smaller_memory_then_name() -> None:
    vms = [
        EvacuationVMI("b", "big", True, priority=0, memory_bytes=64 << 30),
        EvacuationVMI("a", "small", True, priority=0, memory_bytes=1 << 30),
        EvacuationVMI("z", "urgent", True, priority=10, memory_bytes=128 << 30),
        EvacuationVMI("a", "small2", True, priority=0, memory_bytes=1 << 30),
        EvacuationVMI("a", "also-small", True, priority=0, memory_bytes=1 << 30),
    ]
    plan = plan_evacuation(vms, 0, 0, Limits(per_cluster=5, outbound_per_node=5))
    assert names(plan.start) == ["urgent", "also-small", "small", "small2", "big"]
    plan2 = plan_evacuation(vms, 0, 0, LIMITS)
    assert names(plan2.start) == ["urgent", "also-small"]
    assert names(plan2.waiting) == ["small", "small2", "big"]


def test_non_migratable_vmis_are_reported_with_their_reason_and_never_started() -> None:
    vms = [
        EvacuationVMI("vms", "pinned", False, not_migratable_reason="HostDevice"),
        EvacuationVMI("vms", "ok", True),
        EvacuationVMI("vms", "local-disk", False, not_migratable_reason="DisksNotLiveMigratable"),
    ]
    plan = plan_evacuation(vms, 0, 0, LIMITS)
    assert names(plan.start) == ["ok"]
    assert [(v.name, v.not_migratable_reason) for v in plan.not_migratable] == [
        ("pinned", "HostDevice"),
        ("local-disk", "DisksNotLiveMigratable"),
    ]


def test_vmis_already_migrating_are_not_started_twice() -> None:
    vms = [EvacuationVMI("vms", "moving", True, migrating=True), *vmis(3)]
    plan = plan_evacuation(vms, 1, 1, LIMITS)
    assert "moving" not in names(plan.start) + names(plan.waiting)
    assert len(plan.start) == 1  # the running one counts against the per-node limit


@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    st.lists(
        st.builds(
            EvacuationVMI,
            namespace=st.sampled_from(["a", "b"]),
            name=st.text("xyz", min_size=1, max_size=3),
            live_migratable=st.booleans(),
            priority=st.integers(-3, 3),
            memory_bytes=st.integers(0, 10),
            migrating=st.booleans(),
        ),
        max_size=12,
    ),
    st.integers(0, 8),
    st.integers(0, 4),
    st.builds(Limits, per_cluster=st.integers(0, 6), outbound_per_node=st.integers(0, 4)),
)
def test_every_vmi_is_accounted_for_and_no_limit_is_exceeded(
    vms: list[EvacuationVMI], in_cluster: int, from_node: int, limits: Limits
) -> None:
    plan = plan_evacuation(vms, in_cluster, from_node, limits)
    assert len(plan.start) + in_cluster <= max(limits.per_cluster, in_cluster)
    assert len(plan.start) + from_node <= max(limits.outbound_per_node, from_node)
    not_moving = [v for v in vms if not v.migrating]
    assert sorted(map(id, plan.start + plan.waiting + plan.not_migratable)) == sorted(
        map(id, not_moving)
    )
    assert all(v.live_migratable for v in plan.start + plan.waiting)
    if plan.start and plan.waiting:
        # nothing waits while a lower-priority VMI starts
        assert min(v.priority for v in plan.start) >= max(v.priority for v in plan.waiting)


# --- migration policies -------------------------------------------------------------------------

POLICIES = [
    MigrationPolicyRef("any", {}, {}),
    MigrationPolicyRef("prod-ns", {"env": "prod"}, {}),
    MigrationPolicyRef("prod-db", {"env": "prod"}, {"app": "db"}),
    MigrationPolicyRef("gpu", {}, {"gpu": "true"}),
]


@pytest.mark.parametrize(
    ("ns_labels", "vmi_labels", "expected"),
    [
        pytest.param({"env": "prod"}, {"app": "db"}, "prod-db", id="most matching labels wins"),
        pytest.param(
            {"env": "prod"}, {"app": "web"}, "prod-ns", id="a non-matching policy is ignored"
        ),
        pytest.param({"env": "dev"}, {"app": "db"}, "any", id="only the catch-all matches"),
        pytest.param(
            {"env": "prod"}, {"gpu": "true"}, "gpu", id="equal totals: more VMI labels wins"
        ),
    ],
)
def test_matching_policy(
    ns_labels: dict[str, str], vmi_labels: dict[str, str], expected: str
) -> None:
    assert matching_policy(POLICIES, ns_labels, vmi_labels) == expected
    assert matching_policy(list(reversed(POLICIES)), ns_labels, vmi_labels) == expected


def test_equal_totals_prefer_vmi_labels_over_an_earlier_name() -> None:
    # KubeVirt's score compares totals, then VMI labels; only a full tie goes by name.
    policies = [
        MigrationPolicyRef("a-namespace", {"env": "prod"}, {}),
        MigrationPolicyRef("z-vmi", {}, {"app": "db"}),
    ]
    assert matching_policy(policies, {"env": "prod"}, {"app": "db"}) == "z-vmi"
    twins = [
        MigrationPolicyRef("b", {}, {"app": "db"}),
        MigrationPolicyRef("a", {}, {"app": "db"}),
    ]
    assert matching_policy(twins, {}, {"app": "db"}) == "a"


def test_a_policy_without_selectors_never_applies() -> None:
    bare = MigrationPolicyRef("bare", {}, {}, has_selectors=False)
    assert matching_policy([bare], {"env": "prod"}, {"app": "db"}) is None


def test_the_report_names_the_policy_and_what_it_overrides() -> None:
    slow = MigrationPolicyRef(
        "slow-links",
        {},
        {"app": "db"},
        allow_post_copy=True,
        completion_timeout_per_gib=800,
        bandwidth_per_migration="64Mi",
    )
    assert describe_policy(slow) == (
        "MigrationPolicy slow-links (allowPostCopy=true, completionTimeoutPerGiB=800, "
        "bandwidthPerMigration=64Mi)"
    )
    assert describe_policy(MigrationPolicyRef("plain", {}, {})) == (
        "MigrationPolicy plain (no overrides)"
    )
    assert "KubeVirt CR" in describe_policy(None)


def test_no_matching_policy() -> None:
    assert matching_policy(POLICIES[1:], {"env": "dev"}, {}) is None
    assert matching_policy([], {}, {}) is None
