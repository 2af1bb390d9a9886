"""The controller's read-only view of the cluster, over observe's ClusterCache."""

from __future__ import annotations

from collections.abc import Iterable

from watchdog.decide.names import STATE_ANNOTATION
from watchdog.decide.observations import LauncherPod
from watchdog.observe.cluster_cache import ClusterCache


class CacheView:
    def __init__(self, cache: ClusterCache) -> None:
        self.cache = cache

    def node_names(self) -> Iterable[str]:
        return self.cache.nodes.items.keys()

    def node_ready(self, node: str) -> str | None:
        rec = self.cache.node(node)
        return None if rec is None else rec.ready

    def node_annotation(self, node: str, key: str) -> str | None:
        # The cache keeps one annotation per Node, the watchdog's own (observe/projections.py):
        # asking for another one is a bug, not an absent annotation.
        if key != STATE_ANNOTATION:
            raise KeyError(f"annotation {key!r} is not cached, only {STATE_ANNOTATION!r}")
        rec = self.cache.node(node)
        return None if rec is None else rec.state_annotation

    def node_version(self, node: str) -> str | None:
        rec = self.cache.node(node)
        return rec.resource_version or None if rec is not None else None

    def node_has_taint(self, node: str, key: str, effect: str) -> bool:
        rec = self.cache.node(node)
        return rec is not None and rec.has_taint(key, effect)

    def lease_renewed_at(self, node: str) -> tuple[bool, float | None]:
        lease = self.cache.lease(node)
        return (False, None) if lease is None else (True, lease.renewed_at)

    def launcher_pods(self, node: str) -> tuple[LauncherPod, ...]:
        return self.cache.launcher_pods(node)

    def vm_run_strategy(self, namespace: str, vm: str) -> tuple[str | None, bool | None]:
        rec = self.cache.vm(namespace, vm)
        return (None, None) if rec is None else (rec.run_strategy, None)

    def vmi_location(self, namespace: str, name: str) -> tuple[str | None, str | None]:
        rec = self.cache.vmi(namespace, name)
        return (None, None) if rec is None else (rec.node, rec.phase)

    def harvester_policy(self) -> tuple[bool, str | None, str | None]:
        setting = self.cache.harvester_policy()
        if setting is None:
            return False, None, None
        return True, setting.value, setting.default

    def node_maintenance(self, node: str) -> tuple[bool, str | None, int]:
        """(cordoned, Harvester's maintenance status, VMIs the API shows on it)."""
        rec = self.cache.node(node)
        vmis = len(self.cache.vmis_on(node))
        if rec is None:
            return False, None, vmis
        return rec.unschedulable, rec.maintain_status, vmis

    def upgrade_running(self) -> bool:
        return self.cache.upgrade_running() is not None
