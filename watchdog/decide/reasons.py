"""Why a node changed phase or why an action was held: one enum for logs, Events and metrics."""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Every transition and hold carries one of these (bounded metric label values)."""

    # detection
    HEARTBEAT_STALE = "HeartbeatStale"
    AGENT_OFFLINE = "AgentOffline"
    HEARTBEAT_FRESH = "HeartbeatFresh"
    CORROBORATED_LEASE = "CorroboratedByLease"
    CORROBORATED_READY = "CorroboratedByReady"
    CORROBORATED_PEERS = "CorroboratedByPeers"
    KUBELET_PATH_LOST = "KubeletPathLost"
    KUBELET_PATH_BACK = "KubeletPathBack"
    # fencing and reset
    PERIOD_RUNNING = "PeriodRunning"
    FENCE_SELF_ELAPSED = "SelfFenceDelayElapsed"
    FENCE_EXTERNAL_CONFIRMED = "ExternalFenceConfirmed"
    FENCE_POWER_OFF_VERIFIED = "PowerOffVerified"  # the BMC switched it off and read back off
    FENCE_MANUAL_TAINT = "ManualOutOfServiceTaint"
    FENCE_NOT_REQUIRED = "FencingDisabled"
    RESET_STARTED = "ResetStarted"
    LAUNCHER_PODS_GONE = "LauncherPodsGone"
    # recovery
    NODE_BACK = "NodeBack"
    NODE_REBOOTED = "NodeRebooted"
    RECOVERED = "Recovered"
    # planned maintenance (decide/maintenance.py)
    IN_MAINTENANCE = "InMaintenance"
    MAINTENANCE_ENDED = "MaintenanceEnded"
    # holds
    HOLD_STORM = "Storm"
    # More than half of the nodes are silent to the controller: a majority may be cut off
    # together, their agents sparing themselves by quorum (decide/quorum.py).
    HOLD_QUORUM = "QuorumLost"
    HOLD_BROKER_DOWN = "BrokerDown"
    HOLD_API_DOWN = "APIDown"
    HOLD_POLICY_DISABLED = "PolicyDisabled"
    HOLD_DRY_RUN = "DryRun"
    HOLD_UPGRADE = "UpgradeRunning"
    HOLD_INGEST_LAG = "IngestLag"
    HOLD_UNFENCED = "NoArmedFence"
    HOLD_WEAK_FENCE = "WeakFence"  # armed, but no watchdog device and weak fences not accepted
    # The BMC said off while the agent heartbeats from the same boot: the BMC is not trusted.
    HOLD_POWER_CONTRADICTION = "PowerFenceContradiction"
    # bookkeeping
    RESUMED = "ResumedFromAnnotation"
