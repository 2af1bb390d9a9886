"""The controller's view of the cluster: informers, per-node indexes and source health.

Owns one `Informer` per resource the controller reads (Nodes, `kube-node-lease` Leases,
virt-launcher Pods, VMIs, VMs, VirtualMachineInstanceMigrations, the KubeVirt CR, KubeVirt's
MigrationPolicies and the Namespaces' labels their `namespaceSelector` reads, Harvester's
`vm-force-reset-policy` Setting and Upgrades and, when VolumeAttachment deletion is enabled,
VolumeAttachments), each keeping the record (observe/records.py) its projection
(observe/projections.py) makes of every raw object, and indexes kept current in O(1) per watch
event (pods, VMIs, migrations and attachments by node).

Clocks: every `*_at` field is the controller's monotonic clock (`clock`, `time.monotonic` by
default, the clock asyncio's loop uses) at the moment *this process observed* a change, never
a remote wall clock (observe/projections.py).

Source health: each informer has its own `up`; in addition a cheap `/version` probe every
`probe_interval_s` notices a hung API server within seconds (an open watch on a frozen server
only times out after the watch timeout). `api_up` is true while the probe and every informer
are up; `api_up_since` is when that last became true.

CRDs the cluster does not serve (no KubeVirt, no Harvester) make their informer *absent*, never
an error: `harvester_present` is False then and the policy comes from configuration.

Must not: write to the API, decide, or keep whole objects.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from watchdog.decide.evacuation import Limits, MigrationPolicyRef, select_policy
from watchdog.decide.names import NODE_LEASE_NAMESPACE
from watchdog.decide.observations import LauncherPod
from watchdog.observe.informer import EventKind, Informer, Resource, RestartCause
from watchdog.observe.projections import (
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
from watchdog.observe.records import (
    KubeVirtRecord,
    MigrationRecord,
    NamespaceRecord,
    NodeLease,
    NodeRecord,
    PodRecord,
    PolicySetting,
    UpgradeRecord,
    VMIRecord,
    VMRecord,
    VolumeAttachmentRecord,
)
from watchdog.transport.kube import KubeApi
from watchdog.transport.kube_errors import ApiUnreachable, KubeError

log = logging.getLogger(__name__)

LAUNCHER_SELECTOR = "kubevirt.io=virt-launcher"
# Node labels worth keeping (the rest are dropped to save memory).
DEFAULT_NODE_LABELS = (
    "kubevirt.io/schedulable",
    "node-role.kubernetes.io/control-plane",
    "topology.kubernetes.io/zone",
)

NODES = Resource("/api/v1", "nodes", namespaced=False)
LEASES = Resource("/apis/coordination.k8s.io/v1", "leases")
PODS = Resource("/api/v1", "pods")
VMIS = Resource("/apis/kubevirt.io/v1", "virtualmachineinstances")
VMS = Resource("/apis/kubevirt.io/v1", "virtualmachines")
MIGRATIONS = Resource("/apis/kubevirt.io/v1", "virtualmachineinstancemigrations")
KUBEVIRTS = Resource("/apis/kubevirt.io/v1", "kubevirts")
MIGRATION_POLICIES = Resource(
    "/apis/migrations.kubevirt.io/v1alpha1", "migrationpolicies", namespaced=False
)
NAMESPACES = Resource("/api/v1", "namespaces", namespaced=False)
HARVESTER_SETTINGS = Resource("/apis/harvesterhci.io/v1beta1", "settings", namespaced=False)
HARVESTER_UPGRADES = Resource("/apis/harvesterhci.io/v1beta1", "upgrades")
VOLUME_ATTACHMENTS = Resource("/apis/storage.k8s.io/v1", "volumeattachments", namespaced=False)


class CacheSettings(Protocol):
    """What the cache reads from the runtime's Settings (structural: observe must not import
    the runtime layer)."""

    @property
    def vm_namespaces(self) -> list[str]: ...

    @property
    def harvester_setting(self) -> str: ...

    @property
    def out_of_service_taint(self) -> str: ...

    @property
    def delete_volume_attachments(self) -> bool: ...

    @property
    def parallel_migrations_per_cluster(self) -> int: ...

    @property
    def parallel_outbound_migrations_per_node(self) -> int: ...


# (resource, kind, key, old, new), e.g. ("pods", ADDED, "ns/virt-launcher-x", None, PodRecord)
CacheEventHandler = Callable[[str, EventKind, str, Any, Any], None]


@dataclass
class CacheStatistics:
    api_up: bool
    api_up_since: float | None
    synced: bool
    harvester: str  # "present", "absent (policy from config)", "unknown"
    kubevirt: str
    informers: dict[str, Any]


class _NodeIndex:
    """node name → {key: record}: O(1) per change, O(records on the node) per read."""

    def __init__(self, node_of: Callable[[Any], str | None]) -> None:
        self._node_of = node_of
        self._by_node: dict[str, dict[str, Any]] = {}

    def update(self, key: str, old: Any, new: Any) -> None:
        old_node = self._node_of(old) if old is not None else None
        new_node = self._node_of(new) if new is not None else None
        if old_node is not None and old_node != new_node:
            bucket = self._by_node.get(old_node)
            if bucket is not None:
                bucket.pop(key, None)
                if not bucket:
                    del self._by_node[old_node]
        if new_node is not None:
            self._by_node.setdefault(new_node, {})[key] = new

    def on(self, node: str) -> tuple[Any, ...]:
        bucket = self._by_node.get(node)
        return tuple(bucket.values()) if bucket else ()

    def count(self, node: str) -> int:
        return len(self._by_node.get(node) or ())


class ClusterCache:
    """All informers of the controller, their indexes and source health. Run `run()` once."""

    def __init__(
        self,
        api: KubeApi,
        settings: CacheSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_event: CacheEventHandler | None = None,
        on_restart: Callable[[str, RestartCause], None] | None = None,
        on_health: Callable[[bool], None] | None = None,
        on_api_answer: Callable[[], None] | None = None,
        node_labels: Sequence[str] = DEFAULT_NODE_LABELS,
        probe_interval_s: float | None = 2.0,
        absent_retry_s: float = 60.0,
        backoff_max_s: float = 5.0,
        page_size: int = 500,
    ) -> None:
        self.api = api
        self._settings = settings
        self._clock = clock
        self._on_event = on_event
        self._on_restart = on_restart
        self._on_health = on_health
        self._on_api_answer = on_api_answer
        self._probe_interval_s = probe_interval_s
        self._probe_up = True
        self._api_up = False
        self.api_up_since: float | None = None
        # When the latest probe that the API answered was sent (None without a probe): the API
        # server was serving us at some instant after it (decide/signals.py, lease_signal).
        self.api_answered_at: float | None = None
        # Set by `probe_soon`: a decision waits for an API answer sent after a Lease deadline.
        self._probe_wake = asyncio.Event()
        key, _, rest = settings.out_of_service_taint.partition("=")
        if ":" in key:  # "key:effect" without a value
            key, _, rest = key.partition(":")
        self._oos_key, self._oos_effect = key, rest.rpartition(":")[2]
        namespaces = frozenset(settings.vm_namespaces)

        common: dict[str, Any] = {
            "on_restart": self._restart,
            "on_health": self._informer_health,
            "absent_retry_s": absent_retry_s,
            "backoff_max_s": backoff_max_s,
            "page_size": page_size,
        }
        self.nodes: Informer[NodeRecord] = Informer(
            api, NODES, project_node(tuple(node_labels), clock), **common
        )
        self.leases: Informer[NodeLease] = Informer(
            api, LEASES, project_lease(clock), namespace=NODE_LEASE_NAMESPACE, **common
        )
        self.pods: Informer[PodRecord] = Informer(
            api, PODS, project_pod(namespaces), label_selector=LAUNCHER_SELECTOR, **common
        )
        self.vmis: Informer[VMIRecord] = Informer(api, VMIS, project_vmi(namespaces), **common)
        self.vms: Informer[VMRecord] = Informer(api, VMS, project_vm(namespaces), **common)
        self.migrations: Informer[MigrationRecord] = Informer(
            api, MIGRATIONS, project_migration, **common
        )
        self.kubevirts: Informer[KubeVirtRecord] = Informer(
            api, KUBEVIRTS, project_kubevirt, **common
        )
        # Cluster-scoped and few; absent (CRD not installed) on KubeVirt before v0.55.
        self.migration_policies: Informer[MigrationPolicyRef] = Informer(
            api, MIGRATION_POLICIES, project_migration_policy, **common
        )
        # Only for the policies' namespaceSelector: a name and its labels per namespace.
        self.namespaces: Informer[NamespaceRecord] = Informer(
            api, NAMESPACES, project_namespace(namespaces), **common
        )
        self.harvester_settings: Informer[PolicySetting] = Informer(
            api,
            HARVESTER_SETTINGS,
            project_setting,
            field_selector=f"metadata.name={settings.harvester_setting}",
            **common,
        )
        self.harvester_upgrades: Informer[UpgradeRecord] = Informer(
            api, HARVESTER_UPGRADES, project_upgrade, **common
        )
        self.volume_attachments: Informer[VolumeAttachmentRecord] | None = (
            Informer(api, VOLUME_ATTACHMENTS, project_volume_attachment, **common)
            if settings.delete_volume_attachments
            else None
        )
        self._pods_by_node = _NodeIndex(lambda p: p.node)
        self._vmis_by_node = _NodeIndex(lambda v: v.node)
        self._migrations_by_node = _NodeIndex(lambda m: None if m.final else m.node)
        self._attachments_by_node = _NodeIndex(lambda a: a.node)
        self._active_migrations: set[str] = set()
        self._wire(self.pods, self._pods_by_node)
        self._wire(self.vmis, self._vmis_by_node)
        self._wire(self.migrations, self._migrations_by_node, self._track_active)
        if self.volume_attachments is not None:
            self._wire(self.volume_attachments, self._attachments_by_node)
        for informer in (
            self.nodes,
            self.leases,
            self.vms,
            self.kubevirts,
            self.migration_policies,
            self.namespaces,
        ):
            self._wire(informer, None)
        self._wire(self.harvester_settings, None)
        self._running_upgrades: set[str] = set()
        self._wire(self.harvester_upgrades, None, self._track_upgrade)

    @property
    def informers(self) -> tuple[Informer[Any], ...]:
        base: tuple[Informer[Any], ...] = (
            self.nodes,
            self.leases,
            self.pods,
            self.vmis,
            self.vms,
            self.migrations,
            self.kubevirts,
            self.migration_policies,
            self.namespaces,
            self.harvester_settings,
            self.harvester_upgrades,
        )
        return base if self.volume_attachments is None else (*base, self.volume_attachments)

    def _wire(
        self,
        informer: Informer[Any],
        index: _NodeIndex | None,
        extra: Callable[[str, Any, Any], None] | None = None,
    ) -> None:
        resource = informer.name

        def handler(kind: EventKind, key: str, old: Any, new: Any) -> None:
            if index is not None:
                index.update(key, old, new)
            if extra is not None:
                extra(key, old, new)
            if self._on_event is not None:
                self._on_event(resource, kind, key, old, new)

        informer.add_handler(handler)

    def _track_active(
        self, key: str, old: MigrationRecord | None, new: MigrationRecord | None
    ) -> None:
        if new is not None and not new.final:
            self._active_migrations.add(key)
        else:
            self._active_migrations.discard(key)

    def _track_upgrade(
        self, key: str, old: UpgradeRecord | None, new: UpgradeRecord | None
    ) -> None:
        # Kept as a set so the hold check on every evaluation is O(1).
        if new is not None and new.running:
            self._running_upgrades.add(key)
        else:
            self._running_upgrades.discard(key)

    # -- running -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Every informer and the API probe, as named tasks of one TaskGroup, until cancelled."""
        async with asyncio.TaskGroup() as tg:
            for informer in self.informers:
                tg.create_task(informer.run(), name=f"informer {informer.name}")
            if self._probe_interval_s:
                tg.create_task(self._probe(self._probe_interval_s), name="API probe")

    async def wait_synced(self, timeout_s: float | None = None) -> None:
        """Until every informer listed once (or found its resource absent)."""
        async with asyncio.timeout(timeout_s):
            for informer in self.informers:
                await informer.synced.wait()

    @property
    def synced(self) -> bool:
        return all(i.synced.is_set() for i in self.informers)

    @property
    def api_up(self) -> bool:
        return self._api_up

    def _informer_health(self, resource: str, up: bool) -> None:
        del resource
        self._update_health()

    def _update_health(self) -> None:
        up = self._probe_up and all(i.up for i in self.informers)
        if up == self._api_up:
            return
        self._api_up = up
        self.api_up_since = self._clock() if up else None
        if self._on_health is not None:
            try:
                self._on_health(up)
            except Exception:
                log.exception("cache health callback failed")

    def _restart(self, resource: str, cause: RestartCause) -> None:
        if self._on_restart is not None:
            self._on_restart(resource, cause)

    async def _probe(self, interval_s: float) -> None:
        # A frozen API server keeps open watches silent until their timeout; this notices in
        # about `interval_s` plus the probe's own timeout.
        timeout_s = min(self.api.request_timeout_s, max(1.0, interval_s))
        while True:
            self._probe_wake.clear()  # a request from here on is answered by this probe
            sent = self._clock()
            try:
                await self.api.request("GET", "/version", timeout_s=timeout_s)
                up = True
            except ApiUnreachable as e:
                if self._probe_up:
                    log.warning("Kubernetes API unreachable: %s", e)
                up = False
            except KubeError as e:
                up = e.status is not None  # an error status is an answer; no status is none
            if up:
                self.api_answered_at = sent
            if up != self._probe_up:
                self._probe_up = up
                self._update_health()
            if up and self._on_api_answer is not None:
                try:
                    self._on_api_answer()
                except Exception:
                    log.exception("API answer callback failed")
            try:
                await asyncio.wait_for(
                    self._probe_wake.wait(), interval_s * random.uniform(0.9, 1.1)
                )
            except TimeoutError:
                continue
            # Asked for early: still at most ten probes a second, whatever asks.
            await asyncio.sleep(min(0.1, interval_s))

    def probe_soon(self) -> None:
        """Probe the API now instead of at the next interval: a node's Lease passed its deadline
        and its staleness waits for an answer to a probe sent after it (decide/signals.py,
        `lease_pending`). Wakes the probe loop; a request made while a probe is out sends one
        more right after it (that one's send time is after the deadline), so calls never pile up
        more than one probe."""
        self._probe_wake.set()

    # -- queries -----------------------------------------------------------------------------

    def node(self, name: str) -> NodeRecord | None:
        return self.nodes.get(name)

    def node_names(self) -> tuple[str, ...]:
        return tuple(self.nodes.items)

    def lease(self, node: str) -> NodeLease | None:
        return self.leases.get(f"{NODE_LEASE_NAMESPACE}/{node}")

    def out_of_service_tainted(self, node: str) -> bool:
        record = self.nodes.get(node)
        return record is not None and record.has_taint(self._oos_key, self._oos_effect)

    def pods_on(self, node: str) -> tuple[PodRecord, ...]:
        return self._pods_by_node.on(node)

    def launcher_pods(self, node: str) -> tuple[LauncherPod, ...]:
        """The decide core's view of the virt-launcher pods bound to `node`."""
        return tuple(p.launcher() for p in self._pods_by_node.on(node))

    def pod(self, namespace: str, name: str) -> PodRecord | None:
        return self.pods.get(f"{namespace}/{name}")

    def vmis_on(self, node: str) -> tuple[VMIRecord, ...]:
        return self._vmis_by_node.on(node)

    def vmi(self, namespace: str, name: str) -> VMIRecord | None:
        return self.vmis.get(f"{namespace}/{name}")

    def vm(self, namespace: str, name: str) -> VMRecord | None:
        return self.vms.get(f"{namespace}/{name}")

    def migrations_from(self, node: str) -> tuple[MigrationRecord, ...]:
        """Migrations not yet finished that move VMs away from `node`."""
        return self._migrations_by_node.on(node)

    def active_migrations(self) -> int:
        return len(self._active_migrations)

    def volume_attachments_on(self, node: str) -> tuple[VolumeAttachmentRecord, ...]:
        return self._attachments_by_node.on(node)

    @property
    def harvester_present(self) -> bool | None:
        """True/False once known; None before the Setting informer's first answer."""
        informer = self.harvester_settings
        if not informer.synced.is_set():
            return None
        return not informer.absent

    def harvester_policy(self) -> PolicySetting | None:
        """The `vm-force-reset-policy` Setting, or None (no Harvester, or no such Setting)."""
        return self.harvester_settings.get(self._settings.harvester_setting)

    def upgrade_running(self) -> str | None:
        """The name of a Harvester Upgrade still running, or None (none, or no Harvester)."""
        return min(self._running_upgrades) if self._running_upgrades else None

    def kubevirt(self) -> KubeVirtRecord | None:
        return next(iter(self.kubevirts.items.values()), None)

    def migration_limits(self) -> Limits:
        """KubeVirt's migration limits from its CR, else the configured defaults."""
        cr = self.kubevirt()
        per_cluster = cr.parallel_migrations_per_cluster if cr else None
        per_node = cr.parallel_outbound_migrations_per_node if cr else None
        return Limits(
            per_cluster=per_cluster or self._settings.parallel_migrations_per_cluster,
            outbound_per_node=per_node or self._settings.parallel_outbound_migrations_per_node,
        )

    def migration_policy(self, vmi: VMIRecord) -> MigrationPolicyRef | None:
        """The MigrationPolicy KubeVirt applies to `vmi`'s migrations (None: none selects it,
        or the cluster has no MigrationPolicy CRD). O(policies): there are a handful.

        The VMI's labels are those the record keeps (KubeVirt's own `kubevirt.io/*` are
        dropped), so a policy selecting on those is not seen to apply.
        """
        policies = self.migration_policies.items.values()
        if not policies:
            return None
        ns = self.namespaces.get(vmi.namespace)
        return select_policy(policies, dict(ns.labels) if ns else {}, dict(vmi.labels))

    def statistics(self) -> CacheStatistics:
        def presence(informer: Informer[Any], absent_means: str) -> str:
            if not informer.synced.is_set():
                return "unknown"
            return f"absent ({absent_means})" if informer.absent else "present"

        return CacheStatistics(
            api_up=self._api_up,
            api_up_since=self.api_up_since,
            synced=self.synced,
            harvester=presence(self.harvester_settings, "no Harvester: policy from config"),
            kubevirt=presence(self.vmis, "no KubeVirt: no VMs to protect"),
            informers={i.name: i.statistics() for i in self.informers},
        )


__all__ = [
    "DEFAULT_NODE_LABELS",
    "LAUNCHER_SELECTOR",
    "CacheEventHandler",
    "CacheSettings",
    "CacheStatistics",
    "ClusterCache",
]
