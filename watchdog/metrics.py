"""Every metric of DESIGN §7, declared once, on one registry, fed from decisions and actions.

Names are a contract with dashboards/ and alert rules. Label values are bounded: phases,
reasons, actions and results are enums; `node` appears only on per-node gauges.
"""

from __future__ import annotations

from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from watchdog.decide.actions import Action
from watchdog.decide.reasons import Reason
from watchdog.decide.state import Phase

# Latency buckets from 0.1 s to 900 s: sub-second detection up to Harvester's 5-8 min resets.
LATENCY_BUCKETS = (
    0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 240, 300, 420, 600, 900,
)  # fmt: skip


class Metrics:
    """One instance per process; tests make their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.nodes = Gauge("watchdog_nodes", "Nodes per phase.", ["phase"], registry=r)
        self.heartbeat_age = Gauge(
            "watchdog_heartbeat_age_seconds",
            "Age of the last heartbeat seen.",
            ["node"],
            registry=r,
        )
        self.reset_not_before = Gauge(
            "watchdog_reset_not_before_timestamp_seconds",
            "Unix time at which the VMs of a node being fenced will be reset; absent "
            "while a hold or a missing fence proof means no time can be promised.",
            ["node"],
            registry=r,
        )
        self.heartbeats = Counter("watchdog_heartbeats_total", "Accepted heartbeats.", registry=r)
        self.heartbeats_rejected = Counter(
            "watchdog_heartbeats_rejected_total", "Rejected heartbeats.", ["reason"], registry=r
        )
        self.peer_reports = Counter(
            "watchdog_peer_reports_total", "Accepted peer reports.", registry=r
        )
        self.peer_reports_rejected = Counter(
            "watchdog_peer_reports_rejected_total",
            "Rejected peer reports.",
            ["reason"],
            registry=r,
        )
        self.peer_probes = Counter(
            "watchdog_peer_probes_total",
            "Peer probes made by this agent, by outcome.",
            ["result"],
            registry=r,
        )
        self.detection = Histogram(
            "watchdog_detection_seconds",
            "Last contact to UNREACHABLE.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.false_ready = Gauge(
            "watchdog_false_ready_pods",
            "virt-launcher pods Ready=True on unreachable nodes.",
            registry=r,
        )
        self.reset = Histogram(
            "watchdog_reset_seconds",
            "UNREACHABLE to launcher pods force-deleted.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.reschedule = Histogram(
            "watchdog_reschedule_seconds",
            "Launcher pod deleted to VMI Running on another node.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.failover = Histogram(
            "watchdog_failover_seconds",
            "Last contact to VMI Running elsewhere, per VM.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.transitions = Counter(
            "watchdog_transitions_total",
            "Phase transitions.",
            ["from", "to", "reason"],
            registry=r,
        )
        self.actions = Counter(
            "watchdog_actions_total", "Actuations by result.", ["action", "result"], registry=r
        )
        self.resets_held = Gauge(
            "watchdog_resets_held", "1 while a hold blocks resets.", ["reason"], registry=r
        )
        self.policy_period = Gauge(
            "watchdog_policy_period_seconds", "Effective force-reset period.", registry=r
        )
        self.policy_invalid = Gauge(
            "watchdog_policy_invalid", "1 while the policy setting is invalid.", registry=r
        )
        self.leader = Gauge("watchdog_leader", "1 on the acting replica.", registry=r)
        self.migrations = Counter(
            "watchdog_migrations_total",
            "Evacuation migrations by result.",
            ["result"],
            registry=r,
        )
        self.migration_duration = Histogram(
            "watchdog_migration_seconds",
            "Evacuation migration start to end.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.watch_restarts = Counter(
            "watchdog_watch_restarts_total",
            "Watch restarts by resource and cause.",
            ["resource", "cause"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "watchdog_queue_depth", "Items waiting per internal queue.", ["queue"], registry=r
        )
        self.ingest_lag = Gauge(
            "watchdog_ingest_lag_seconds",
            "How far the controller's heartbeat ingest runs behind the broker (echo probe); "
            "over mqtt.max_ingest_lag_s heartbeats are UNKNOWN and resets held (IngestLag).",
            registry=r,
        )
        self.nodes_held = Gauge(
            "watchdog_nodes_held",
            "Nodes awaiting a reset that is held, by reason (NoArmedFence, WeakFence: no proof "
            "the node is fenced; or the cluster-wide hold they are under).",
            ["reason"],
            registry=r,
        )
        self.weak_fence_accepted = Gauge(
            "watchdog_weak_fence_accepted",
            "1 when this controller accepts a self-fence without a watchdog device as proof "
            "(accept_weak_self_fence): weaker, shown so that nobody forgets it is on.",
            registry=r,
        )
        self.fences_declared = Gauge(
            "watchdog_fences_declared",
            "Nodes by the fence their agent declared in its latest heartbeat heard by this "
            "replica (armed: self-fencing counts as proof of a reset; unarmed: holds it).",
            ["armed"],
            registry=r,
        )
        self.input_entries = Gauge(
            "watchdog_input_entries",
            "Entries held in memory about what agents sent (peer observers, peer targets, "
            "retired boot ids): bounded by the cluster, never by what a node sends.",
            ["book"],
            registry=r,
        )
        self.peer_targets_ignored = Gauge(
            "watchdog_peer_targets_ignored",
            "Views in peer reports about nodes the cluster does not have, dropped since start "
            "(a forged or stale report; never kept).",
            registry=r,
        )
        self.source_up = Gauge(
            "watchdog_source_up",
            "1 while the controller's connection to a source is up.",
            ["source"],
            registry=r,
        )
        self.mqtt_certificates = Counter(
            "watchdog_mqtt_certificates_total",
            "Agents' broker certificate requests the leader answered: issued, or denied (the "
            "reason is in the request's condition: `kubectl get csr`).",
            ["result"],
            registry=r,
        )
        self.mqtt_certificate_expiry = Gauge(
            "watchdog_mqtt_certificate_expiry_timestamp_seconds",
            "Agent: when its broker certificate expires (Unix time; 0: none held). It is renewed "
            "at 2/3 of its lifetime; an expiry close ahead means renewals fail.",
            registry=r,
        )
        for result in ("issued", "denied"):
            self.mqtt_certificates.labels(result=result)
        for phase in Phase:
            self.nodes.labels(phase=phase.value).set(0)
        # Counters born at 0: `increase()` cannot see the step from "no series" to 1, so without
        # this the first reset or failed action after a start would not show on a dashboard.
        for kind in get_args(Action):
            for result in ("success", "failed", "stale"):
                self.actions.labels(action=kind.__name__, result=result)
        for result in ("started", "succeeded", "failed", "not_migratable", "given_up", "timeout"):
            self.migrations.labels(result=result)
        for reason in (
            Reason.HOLD_STORM,
            Reason.HOLD_BROKER_DOWN,
            Reason.HOLD_API_DOWN,
            Reason.HOLD_POLICY_DISABLED,
            Reason.HOLD_DRY_RUN,
            Reason.HOLD_UPGRADE,
            Reason.HOLD_INGEST_LAG,
        ):
            self.resets_held.labels(reason=reason.value).set(0)
        # Born at 0 too: WatchdogNodeUnfenced compares them, and "no series" would read as
        # "this alert can never fire".
        for reason in (Reason.HOLD_UNFENCED, Reason.HOLD_WEAK_FENCE):
            self.nodes_held.labels(reason=reason.value).set(0)
        self.policy_invalid.set(0)
        self.leader.set(0)
