"""What the controller reads from each Kubernetes object, from objects shaped as the API server
returns them (tests/unit/fixtures/): which launcher pods it counts as falsely ready on a dead
node, which VMIs it places on which node, which migrations still move VMs away from a node,
which taints and state it sees on a Node, which MigrationPolicy KubeVirt applies, and that
every time it keeps is its own clock's, never the remote one."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from watchdog.decide.evacuation import select_policy
from watchdog.decide.falsely_ready import falsely_ready
from watchdog.observe.cluster_cache import DEFAULT_NODE_LABELS
from watchdog.observe.projections import (
    parse_quantity,
    project_kubevirt,
    project_lease,
    project_migration,
    project_migration_policy,
    project_namespace,
    project_node,
    project_pod,
    project_setting,
    project_upgrade,
    project_vm,
    project_vmi,
    project_volume_attachment,
)

FIXTURES = Path(__file__).parent / "fixtures"
OUT_OF_SERVICE = "node.kubernetes.io/out-of-service"
UNREACHABLE = "node.kubernetes.io/unreachable"
EVERY_NAMESPACE: frozenset[str] = frozenset()  # `vm_namespaces` unset: all are watched
ONLY_VMS = frozenset({"vms"})
GiB, MiB = 2**30, 2**20

Obj = dict[str, Any]


def load(name: str) -> Obj:
    doc: Obj = json.loads((FIXTURES / f"{name}.json").read_text())
    return doc


def items(name: str) -> dict[str, Obj]:
    """The objects of a List fixture by name."""
    return {o["metadata"]["name"]: o for o in load(name)["items"]}


class Clock:
    """The cache's clock, moved by hand; counts its reads."""

    def __init__(self, t: float) -> None:
        self.t = t
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.t


def _ready(node: Obj) -> Obj:
    return next(c for c in node["status"]["conditions"] if c["type"] == "Ready")


# -- Nodes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fixture", "ready", "phase", "out_of_service", "unreachable", "labels", "cordoned", "version"),
    [
        pytest.param(
            "node_ready",
            "True",
            None,
            False,
            False,
            {"kubevirt.io/schedulable": "true", "topology.kubernetes.io/zone": "rack-1"},
            False,
            "48211",
            id="Ready, no state of ours",
        ),
        pytest.param(
            "node_not_ready",
            "Unknown",
            "Fencing",
            False,
            True,
            {
                "kubevirt.io/schedulable": "false",
                "node-role.kubernetes.io/control-plane": "true",
                "topology.kubernetes.io/zone": "rack-2",
            },
            False,
            "48367",
            id="kubelet stopped posting, declared Fencing",
        ),
        pytest.param(
            "node_out_of_service",
            "Unknown",
            "Resetting",
            True,
            True,
            {"kubevirt.io/schedulable": "false", "topology.kubernetes.io/zone": "rack-3"},
            True,
            "48502",
            id="out-of-service taint, state under the legacy name only",
        ),
    ],
)
def test_a_node_is_read_as_its_ready_condition_taints_and_our_state(
    fixture: str,
    ready: str,
    phase: str | None,
    out_of_service: bool,
    unreachable: bool,
    labels: dict[str, str],
    cordoned: bool,
    version: str,
) -> None:
    record = project_node(DEFAULT_NODE_LABELS, Clock(100.0))(load(fixture), None)
    assert record.ready == ready
    assert record.has_taint(OUT_OF_SERVICE, "NoExecute") is out_of_service
    assert record.has_taint(UNREACHABLE, "NoExecute") is unreachable
    assert record.has_taint(UNREACHABLE) is unreachable  # any effect
    state = json.loads(record.state_annotation) if record.state_annotation else {}
    assert state.get("phase") == phase
    # Only the labels the cache keeps (kubernetes.io/hostname, arch, os are dropped: memory).
    assert dict(record.labels) == labels
    assert record.unschedulable is cordoned
    assert record.resource_version == version


def test_the_out_of_service_taint_keeps_its_value_and_effect() -> None:
    record = project_node(DEFAULT_NODE_LABELS, Clock(100.0))(load("node_out_of_service"), None)
    taints = {(t.key, t.value, t.effect) for t in record.taints}
    assert (OUT_OF_SERVICE, "nodeshutdown", "NoExecute") in taints
    assert (UNREACHABLE, "", "NoSchedule") in taints
    assert len(record.taints) == 4
    assert not record.has_taint(OUT_OF_SERVICE, "NoSchedule")


def _kubelet_status_update(node: Obj) -> None:
    for condition in node["status"]["conditions"]:
        condition["lastHeartbeatTime"] = "2025-12-05T05:41:40Z"
    node["metadata"]["resourceVersion"] = "48220"


def _ready_goes_unknown(node: Obj) -> None:
    _ready(node).update(
        status="Unknown", reason="NodeStatusUnknown", lastTransitionTime="2025-12-05T05:42:20Z"
    )


def _transition_time_rewritten(node: Obj) -> None:
    _ready(node)["lastTransitionTime"] = "2031-01-01T00:00:00Z"  # a remote clock far ahead


def _virt_handler_renews(node: Obj) -> None:
    node["metadata"]["annotations"]["kubevirt.io/heartbeat"] = "2025-12-05T05:42:12Z"


def _virt_handler_gone(node: Obj) -> None:
    del node["metadata"]["annotations"]["kubevirt.io/heartbeat"]


@pytest.mark.parametrize(
    ("change", "ready_changed_at", "virt_handler_seen_at", "same_record", "reads"),
    [
        pytest.param(_kubelet_status_update, 100.0, 100.0, True, 0, id="kubelet status only"),
        pytest.param(_ready_goes_unknown, 107.0, 100.0, False, 1, id="Ready goes Unknown"),
        pytest.param(_transition_time_rewritten, 100.0, 100.0, False, 0, id="remote time only"),
        pytest.param(_virt_handler_renews, 100.0, 107.0, False, 1, id="virt-handler renews"),
        pytest.param(_virt_handler_gone, 100.0, None, False, 0, id="virt-handler gone"),
    ],
)
def test_a_node_change_is_dated_by_our_clock_only_when_what_it_dates_changed(
    change: Callable[[Obj], None],
    ready_changed_at: float,
    virt_handler_seen_at: float | None,
    same_record: bool,
    reads: int,
) -> None:
    clock = Clock(100.0)
    project = project_node(DEFAULT_NODE_LABELS, clock)
    node = load("node_ready")
    first = project(node, None)
    # First sight dates both by one read of our clock, whatever the remote times say.
    assert (first.ready_changed_at, first.virt_handler_seen_at, clock.reads) == (100.0, 100.0, 1)
    clock.t, clock.reads = 107.0, 0
    change(node)
    after = project(node, first)
    assert after.ready_changed_at == ready_changed_at
    assert after.virt_handler_seen_at == virt_handler_seen_at
    assert clock.reads == reads
    # A Node changed only in fields we do not keep is the same record: it wakes no evaluation.
    assert (after == first) is same_record


# -- Leases -----------------------------------------------------------------------------------


def test_a_node_lease_first_seen_is_dated_by_our_clock_not_its_renew_time() -> None:
    record = project_lease(Clock(100.0))(load("lease"), None)
    assert record.name == "node-b"
    assert record.holder == "node-b"
    assert record.duration_s == 40
    assert record.renew_time == "2025-12-05T05:37:58.412311Z"
    assert record.renewed_at == 100.0


@pytest.mark.parametrize(
    ("spec", "renewed_at", "duration_s"),
    [
        pytest.param({"leaseDurationSeconds": 41}, 100.0, 41, id="duration only: not a renewal"),
        pytest.param({"renewTime": "2025-12-05T05:38:08.415022Z"}, 107.0, 40, id="renewed"),
        pytest.param(
            {"renewTime": "2001-01-01T00:00:10.000000Z"}, 107.0, 40, id="renewed, clock behind"
        ),
        pytest.param({"leaseDurationSeconds": "40s"}, 100.0, None, id="unreadable duration"),
    ],
)
def test_a_lease_counts_as_renewed_when_its_renew_time_changes_on_our_clock(
    spec: Obj, renewed_at: float, duration_s: int | None
) -> None:
    clock = Clock(100.0)
    project = project_lease(clock)
    lease = load("lease")
    first = project(lease, None)
    clock.t = 107.0
    lease["spec"].update(spec)
    after = project(lease, first)
    assert after.renewed_at == renewed_at
    assert after.duration_s == duration_s


# -- virt-launcher pods -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "node", "vmi", "ready", "terminating", "phase", "claims"),
    [
        pytest.param(
            "virt-launcher-vm-db-x7k2p",
            "node-b",
            "vm-db",
            True,
            False,
            "Running",
            ("vm-db-rootdisk", "vm-db-data"),
            id="Ready on a dead node",
        ),
        pytest.param(
            "virt-launcher-vm-shop-q9z4m",
            "node-b",
            "vm-shop",
            True,
            False,
            "Running",
            ("vm-shop-rootdisk",),
            id="orphaned: its VMI from the label",
        ),
        pytest.param(
            "virt-launcher-vm-cache-2bdfn",
            "node-b",
            "vm-cache",
            True,
            True,
            "Running",
            (),
            id="terminating, still Ready",
        ),
        pytest.param(
            "virt-launcher-vm-crash-h5c8r",
            "node-b",
            "vm-crash",
            False,
            False,
            "Failed",
            ("vm-crash-rootdisk",),
            id="failed",
        ),
        pytest.param(
            "virt-launcher-vm-web-l3t6w",
            "node-a",
            "vm-web",
            True,
            False,
            "Running",
            ("vm-web-rootdisk",),
            id="Ready on a live node",
        ),
        pytest.param(
            "virt-launcher-vm-batch-9zk4d",
            None,
            "vm-batch",
            False,
            False,
            "Pending",
            (),
            id="not scheduled",
        ),
    ],
)
def test_a_launcher_pod_is_read_as_its_node_vmi_readiness_and_claims(
    name: str,
    node: str | None,
    vmi: str,
    ready: bool,
    terminating: bool,
    phase: str,
    claims: tuple[str, ...],
) -> None:
    record = project_pod(EVERY_NAMESPACE)(items("launcher_pods")[name], None)
    assert record is not None
    assert (record.namespace, record.name) == ("vms", name)
    assert record.node == node
    assert record.vmi == vmi
    assert record.ready is ready
    assert record.terminating is terminating
    assert record.phase == phase
    assert record.claims == claims  # PVCs only: secrets and emptyDirs are not volumes to free


def test_a_launcher_pod_names_its_vmi_by_uid_from_created_by() -> None:
    record = project_pod(EVERY_NAMESPACE)(items("launcher_pods")["virt-launcher-vm-db-x7k2p"], None)
    assert record is not None
    assert record.vmi_uid == "2076f683-2d58-4f46-a2d9-000000000001"


@pytest.mark.parametrize(
    ("namespaces", "expected"),
    [
        pytest.param(
            EVERY_NAMESPACE,
            [
                "ops/virt-launcher-vm-ops-m2n8v",
                "vms/virt-launcher-vm-db-x7k2p",
                "vms/virt-launcher-vm-shop-q9z4m",
            ],
            id="every namespace watched",
        ),
        pytest.param(
            ONLY_VMS,
            ["vms/virt-launcher-vm-db-x7k2p", "vms/virt-launcher-vm-shop-q9z4m"],
            id="only vms watched",
        ),
    ],
)
def test_on_a_dead_node_only_ready_pods_not_terminating_count_as_falsely_ready(
    namespaces: frozenset[str], expected: list[str]
) -> None:
    project = project_pod(namespaces)
    records = [r for obj in load("launcher_pods")["items"] if (r := project(obj, None)) is not None]
    on_dead_node = [r.launcher() for r in records if r.node == "node-b"]
    # The terminating pod is Ready too, but KubeVirt already reports its VMI not ready; the
    # failed one is not Ready; the one on node-a is on a live node.
    assert sorted(f"{p.namespace}/{p.name}" for p in falsely_ready(on_dead_node)) == expected


def test_a_pod_outside_the_watched_namespaces_is_dropped() -> None:
    assert project_pod(ONLY_VMS)(items("launcher_pods")["virt-launcher-vm-ops-m2n8v"], None) is None


# -- VMIs -------------------------------------------------------------------------------------


def _vmis_by_node(namespaces: frozenset[str]) -> dict[str | None, list[str]]:
    project = project_vmi(namespaces)
    by_node: dict[str | None, list[str]] = {}
    for obj in load("vmis")["items"]:
        record = project(obj, None)
        if record is not None:
            by_node.setdefault(record.node, []).append(f"{record.namespace}/{record.name}")
    return {node: sorted(names) for node, names in by_node.items()}


@pytest.mark.parametrize(
    ("namespaces", "expected"),
    [
        pytest.param(
            EVERY_NAMESPACE,
            {
                "node-a": ["vms/vm-api", "vms/vm-web"],
                "node-b": ["ops/vm-ops", "vms/vm-db"],
                "node-d": ["vms/vm-app"],
                None: ["vms/vm-batch"],
            },
            id="every namespace watched",
        ),
        pytest.param(
            ONLY_VMS,
            {
                "node-a": ["vms/vm-api", "vms/vm-web"],
                "node-b": ["vms/vm-db"],
                "node-d": ["vms/vm-app"],
                None: ["vms/vm-batch"],
            },
            id="only vms watched",
        ),
    ],
)
def test_each_vmi_is_on_the_node_kubevirt_runs_it_on(
    namespaces: frozenset[str], expected: dict[str | None, list[str]]
) -> None:
    # vm-web is migrating to node-d: it runs on node-a until the migration completes; vm-app
    # completed its migration to node-d; vm-batch is not scheduled anywhere yet.
    assert _vmis_by_node(namespaces) == expected


@pytest.mark.parametrize(
    ("name", "phase", "ready", "migrating", "migratable", "why_not", "priority", "memory", "vm"),
    [
        pytest.param(
            "vm-db",
            "Running",
            True,
            False,
            False,
            "DisksNotLiveMigratable",
            10,
            8 * GiB,
            "vm-db",
            id="disks not shared",
        ),
        pytest.param(
            "vm-web",
            "Running",
            True,
            True,
            True,
            None,
            5,
            2 * GiB,
            "vm-web",
            id="migrating, legacy priority, memory from requests",
        ),
        pytest.param(
            "vm-app",
            "Running",
            True,
            False,
            True,
            None,
            0,
            1536 * MiB,
            "vm-app",
            id="migration completed, unreadable priority",
        ),
        pytest.param(
            "vm-api", "Running", True, False, True, None, 0, GiB, "vm-api", id="migration failed"
        ),
        pytest.param(
            "vm-batch",
            "Scheduling",
            None,
            False,
            False,
            "NoLiveMigratableCondition",
            0,
            512 * 10**6,
            "vm-batch",
            id="not scheduled, no owner reference",
        ),
    ],
)
def test_a_vmi_is_read_as_what_its_evacuation_needs(
    name: str,
    phase: str,
    ready: bool | None,
    migrating: bool,
    migratable: bool,
    why_not: str | None,
    priority: int,
    memory: int,
    vm: str,
) -> None:
    record = project_vmi(EVERY_NAMESPACE)(items("vmis")[name], None)
    assert record is not None
    assert record.phase == phase
    assert record.ready is ready
    assert record.vm == vm
    evacuation = record.evacuation()
    assert evacuation.migrating is migrating
    assert evacuation.live_migratable is migratable
    assert evacuation.not_migratable_reason == why_not
    assert evacuation.priority == priority
    assert evacuation.memory_bytes == memory


def test_a_vmi_keeps_its_own_labels_and_kubevirts_reason_not_to_migrate() -> None:
    record = project_vmi(EVERY_NAMESPACE)(items("vmis")["vm-db"], None)
    assert record is not None
    # KubeVirt's kubevirt.io/* bookkeeping is dropped; the rest is what policies select on.
    assert dict(record.labels) == {
        "app": "db",
        "harvesterhci.io/vmName": "vm-db",
        "vm.kubevirt.io/name": "vm-db",
    }
    assert record.live_migratable_message is not None
    assert record.live_migratable_message.startswith(
        "cannot migrate VMI: PVC vm-db-rootdisk is not shared"
    )


# -- migrations -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "vmi", "node", "ours_from", "target", "final"),
    [
        pytest.param(
            "evacuate-vm-web-8fj2k", "vm-web", "node-a", "node-a", "node-d", False, id="running"
        ),
        pytest.param(
            "evacuate-vm-mail-z1x9q",
            "vm-mail",
            "node-a",
            "node-a",
            None,
            False,
            id="pending: the node from our label",
        ),
        pytest.param(
            "evacuate-vm-api-5tq9w", "vm-api", "node-a", "node-a", "node-d", True, id="failed"
        ),
        pytest.param(
            "evacuate-vm-app-r7m2c",
            "vm-app",
            "node-a",
            "node-a",
            "node-d",
            True,
            id="succeeded, legacy label",
        ),
        pytest.param(
            "kubevirt-evacuation-k2v8n",
            "vm-app",
            "node-d",
            None,
            None,
            False,
            id="KubeVirt's own",
        ),
    ],
)
def test_a_migration_is_read_as_the_node_it_moves_a_vm_away_from(
    name: str, vmi: str, node: str, ours_from: str | None, target: str | None, final: bool
) -> None:
    record = project_migration(items("migrations")[name], None)
    assert record.vmi == vmi
    assert record.node == node
    assert record.evacuation_node == ours_from
    assert record.target_node == target
    assert record.final is final


def test_only_unfinished_migrations_count_against_the_node_they_leave() -> None:
    leaving: dict[str | None, list[str]] = {}
    for obj in load("migrations")["items"]:
        record = project_migration(obj, None)
        if not record.final:
            leaving.setdefault(record.node, []).append(record.name)
    assert leaving == {
        "node-a": ["evacuate-vm-web-8fj2k", "evacuate-vm-mail-z1x9q"],
        "node-d": ["kubevirt-evacuation-k2v8n"],
    }


# -- VMs, KubeVirt, MigrationPolicies, Namespaces ---------------------------------------------


@pytest.mark.parametrize(
    ("name", "run_strategy", "ready", "printable"),
    [
        pytest.param("vm-db", "RerunOnFailure", True, "Running", id="runStrategy"),
        pytest.param("vm-web", "Always", True, "Migrating", id="legacy running: true"),
        pytest.param("vm-batch", "Halted", False, "Stopped", id="legacy running: false"),
        pytest.param("vm-crash", "Manual", False, "CrashLoopBackOff", id="manual"),
    ],
)
def test_a_vm_is_read_as_its_run_strategy(
    name: str, run_strategy: str, ready: bool, printable: str
) -> None:
    record = project_vm(EVERY_NAMESPACE)(items("vms")[name], None)
    assert record is not None
    assert record.run_strategy == run_strategy
    assert record.ready is ready
    assert record.printable_status == printable


def _no_migrations_section(cr: Obj) -> None:
    del cr["spec"]["configuration"]["migrations"]


def _per_node_set_per_cluster_unreadable(cr: Obj) -> None:
    cr["spec"]["configuration"]["migrations"].update(
        parallelMigrationsPerCluster="10", parallelOutboundMigrationsPerNode=3
    )


@pytest.mark.parametrize(
    ("change", "per_cluster", "per_node"),
    [
        pytest.param(None, 10, None, id="per node 0: the configured default applies"),
        pytest.param(_no_migrations_section, None, None, id="no migrations section"),
        pytest.param(_per_node_set_per_cluster_unreadable, None, 3, id="a string is no limit"),
    ],
)
def test_the_kubevirt_cr_gives_only_positive_migration_limits(
    change: Callable[[Obj], None] | None, per_cluster: int | None, per_node: int | None
) -> None:
    cr = load("kubevirt")
    if change is not None:
        change(cr)
    record = project_kubevirt(cr, None)
    assert (record.namespace, record.name, record.phase) == (
        "harvester-system",
        "kubevirt",
        "Deployed",
    )
    assert record.parallel_migrations_per_cluster == per_cluster
    assert record.parallel_outbound_migrations_per_node == per_node


@pytest.mark.parametrize(
    ("name", "namespaces", "vmis", "selected", "post_copy", "converge", "timeout", "bandwidth"),
    [
        pytest.param(
            "gold-db", {"tier": "gold"}, {"app": "db"}, True, None, True, 800, "64Mi", id="gold-db"
        ),
        pytest.param("by-app", {}, {"app": "web"}, True, False, None, None, "1048576", id="by-app"),
        pytest.param(
            "everything-unselected", {}, {}, False, True, True, None, None, id="no selectors"
        ),
        pytest.param(
            "batch-loose", {}, {"app": "batch"}, True, None, None, None, None, id="malformed"
        ),
    ],
)
def test_a_migration_policy_is_read_as_its_selectors_and_overrides(
    name: str,
    namespaces: dict[str, str],
    vmis: dict[str, str],
    selected: bool,
    post_copy: bool | None,
    converge: bool | None,
    timeout: int | None,
    bandwidth: str | None,
) -> None:
    record = project_migration_policy(items("migration_policies")[name], None)
    assert record.name == name
    assert dict(record.namespace_selector) == namespaces
    assert dict(record.vmi_selector) == vmis
    assert record.has_selectors is selected
    assert record.allow_post_copy is post_copy
    assert record.allow_auto_converge is converge
    assert record.completion_timeout_per_gib == timeout
    assert record.bandwidth_per_migration == bandwidth


@pytest.mark.parametrize(
    ("vmi", "policy"),
    [
        pytest.param("vm-db", "gold-db", id="namespace and VMI labels"),
        pytest.param("vm-web", "by-app", id="VMI labels"),
        pytest.param("vm-batch", "batch-loose", id="a malformed override does not hide it"),
        pytest.param("vm-app", None, id="none selects it (no selectors selects nothing)"),
        pytest.param("vm-ops", None, id="app=db outside a gold namespace"),
    ],
)
def test_the_migration_policy_kubevirt_applies_to_each_vmi(vmi: str, policy: str | None) -> None:
    policies = [project_migration_policy(o, None) for o in load("migration_policies")["items"]]
    project_ns = project_namespace(EVERY_NAMESPACE)
    labels = {
        r.name: dict(r.labels)
        for o in load("namespaces")["items"]
        if (r := project_ns(o, None)) is not None
    }
    record = project_vmi(EVERY_NAMESPACE)(items("vmis")[vmi], None)
    assert record is not None
    chosen = select_policy(policies, labels.get(record.namespace, {}), dict(record.labels))
    assert (chosen.name if chosen else None) == policy


def test_only_the_watched_namespaces_labels_are_kept() -> None:
    project = project_namespace(ONLY_VMS)
    kept = [r for o in load("namespaces")["items"] if (r := project(o, None)) is not None]
    assert [(r.name, dict(r.labels)) for r in kept] == [
        ("vms", {"kubernetes.io/metadata.name": "vms", "tier": "gold"})
    ]


# -- Harvester --------------------------------------------------------------------------------


def _value_emptied(setting: Obj) -> None:
    setting["value"] = ""


def _value_removed(setting: Obj) -> None:
    del setting["value"]


@pytest.mark.parametrize(
    ("change", "value"),
    [
        pytest.param(None, '{"enable":true,"period":15}', id="set by the operator"),
        pytest.param(_value_emptied, None, id="empty: Harvester's default applies"),
        pytest.param(_value_removed, None, id="absent"),
    ],
)
def test_harvesters_force_reset_setting_is_read_as_its_value_and_default(
    change: Callable[[Obj], None] | None, value: str | None
) -> None:
    setting = load("harvester_setting")
    if change is not None:
        change(setting)
    record = project_setting(setting, None)
    assert record.name == "vm-force-reset-policy"
    assert record.value == value
    assert record.default == '{"enable":true,"period":300}'
    assert record.resource_version == "40211"


@pytest.mark.parametrize(
    ("name", "running"),
    [
        pytest.param("hvst-upgrade-7xk2p", True, id="Completed Unknown"),
        pytest.param("hvst-upgrade-q8r3t", True, id="no Completed condition yet"),
        pytest.param("hvst-upgrade-4m9qz", False, id="succeeded"),
        pytest.param("hvst-upgrade-b2n6w", False, id="failed"),
        pytest.param("hvst-upgrade-d5f1c", False, id="being deleted"),
    ],
)
def test_a_harvester_upgrade_runs_until_completed_says_true_or_false(
    name: str, running: bool
) -> None:
    record = project_upgrade(items("harvester_upgrades")[name], None)
    assert (record.namespace, record.name) == ("harvester-system", name)
    assert record.running is running


# -- VolumeAttachments ------------------------------------------------------------------------


def test_the_volume_attachments_on_a_dead_node_name_their_volumes() -> None:
    records = [project_volume_attachment(o, None) for o in load("volume_attachments")["items"]]
    on_dead = [(r.pv, r.attached) for r in records if r.node == "node-b"]
    assert on_dead == [
        ("pvc-4d1c7b8a-0e2f-4a3b-9c5d-6e7f8a9b0c11", True),
        ("pvc-9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c22", True),
        (None, True),  # an inline CSI volume: no PersistentVolume to name
    ]
    assert {r.attacher for r in records} == {"driver.longhorn.io"}
    assert [(r.node, r.attached) for r in records if r.node != "node-b"] == [("node-a", False)]


# -- quantities -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [
        ("8Gi", 8 * GiB),
        ("1536Mi", 1536 * MiB),
        ("1.5Gi", 1536 * MiB),
        ("512M", 512 * 10**6),
        ("1e9", 10**9),
        (4096, 4096),
        (2.5e9, 2_500_000_000),
        ("", 0),
        ("-1Gi", 0),
        ("64Qi", 0),
        (True, 0),
        (None, 0),
    ],
)
def test_a_memory_quantity_is_read_in_bytes_or_as_zero(quantity: object, expected: int) -> None:
    assert parse_quantity(quantity) == expected
