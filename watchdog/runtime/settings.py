"""The watchdog's configuration: one pydantic-settings model, every field with a unit and a why.

Sources, highest priority first: environment (`WATCHDOG_` prefix, `__` for nested fields), the
YAML file named by `WATCHDOG_CONFIG_FILE` (mounted from a ConfigMap in deploy/), defaults.
This module owns validation; it must not open connections or start anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from watchdog.decide.acks import BrokerContact
from watchdog.decide.config import DecideConfig, FenceMode, Policy
from watchdog.decide.peer_address import valid_peer_address
from watchdog.decide.quorum import spare_timing_error

CONFIG_FILE_ENV = "WATCHDOG_CONFIG_FILE"
# The node's address, from the downward API (status.hostIP): the default probe address.
NODE_IP_ENV = "WATCHDOG_NODE_IP"


class ConfigFileError(Exception):
    """The configuration file could not be read or parsed."""


class MQTTSettings(BaseModel):
    """Connection to the MQTT broker that carries heartbeats."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        "mqtt://127.0.0.1:1883",
        description="Broker URL: mqtt://host:port or mqtts://host:port (TLS).",
        pattern=r"^mqtts?://[^/:]+(:\d+)?/?$",
    )
    topic_prefix: str = Field(
        "node-watchdog/v1",
        description="Prefix of every topic (heartbeat/, status/, peers/, probe/).",
    )
    keepalive_s: int = Field(
        5,
        ge=2,
        le=600,
        description="MQTT keepalive in seconds; the broker announces a silent client's Will "
        "after about 1.5 x this.",
    )
    username: str | None = Field(None, description="Broker username (per-agent in deploy/).")
    password_file: Path | None = Field(
        None, description="File holding the broker password (a mounted Secret)."
    )
    password: SecretStr | None = Field(
        None, description="Broker password given directly (prefer password_file)."
    )
    ca_file: Path | None = Field(None, description="CA bundle to verify the broker (TLS).")
    cert_file: Path | None = Field(None, description="Client certificate for mutual TLS.")
    key_file: Path | None = Field(None, description="Client key for mutual TLS.")
    enroll_file: Path | None = Field(
        None,
        description="Agent: its client certificate and key (one PEM file, in memory-backed "
        "storage), obtained without a manual step and renewed at 2/3 of its lifetime through a "
        "CertificateSigningRequest (signer node-watchdog.io/mqtt-client) that the controller "
        "signs only for the node the agent's pod runs on. Its common name, the node, is the "
        "broker username and client id. Instead of cert_file/key_file and a password.",
    )
    enroll_lifetime_s: int = Field(
        86400,
        ge=600,
        le=86400,
        description="Agent: lifetime asked for its certificate (600 s to 24 h; the signer caps "
        "every certificate at 24 h: a leaked one is not valid for longer).",
    )
    signer_ca_file: Path | None = Field(
        None,
        description="Controller: CA certificate that signs the agents' certificates (the broker "
        "trusts it for client certificates). Unset: the controller signs none.",
    )
    signer_key_file: Path | None = Field(
        None, description="Controller: that CA's private key (mounted in the controller only)."
    )
    agent_service_account: str = Field(
        "node-watchdog-agent",
        min_length=1,
        description="Controller: the ServiceAccount (in `namespace`) whose certificate requests "
        "are signed; a request from anyone else is denied.",
    )
    max_queued_messages: int | None = Field(
        None,
        description="Ignored; kept so that configurations written for earlier versions still "
        "load (a warning at start): the controller handles each heartbeat as it is read and "
        "queues none.",
    )

    broker_contact: BrokerContact = Field(
        BrokerContact.ECHO,
        description="Both roles: what proves an agent's broker contact. `echo`: its own "
        "heartbeat read back from the broker, sound only with the one broker the manifests ship, "
        "which the controller reads too. `leader-ack`: the leading controller's acknowledgement "
        "of each heartbeat it accepted; required with a clustered or bridged broker (a member "
        "that no longer reaches the leader proves nothing); its cost: during a control-plane "
        "outage longer than the leader's renew deadline no leader acknowledges, and agents fence "
        "unless the quorum before self-fencing spares them (a majority of the nodes cut off "
        "too, found through the probe lists and the roster).",
    )
    max_ingest_lag_s: float = Field(
        1.0,
        gt=0,
        description="Controller: seconds its own heartbeat ingest may run behind the broker "
        "(measured by an echo probe on its connection) before heartbeats count as UNKNOWN and "
        "resets are held (IngestLag), instead of reading its own backlog as silent nodes. "
        "Keep it below suspect_after_s minus heartbeat_interval_s.",
    )

    @model_validator(mode="after")
    def _tls_pairs(self) -> MQTTSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        if self.enroll_file is not None and self.cert_file is not None:
            raise ValueError(
                f"enroll_file ({self.enroll_file}) and cert_file ({self.cert_file}): one client "
                "certificate only, either obtained through the signer or given"
            )
        if (self.signer_ca_file is None) != (self.signer_key_file is None):
            raise ValueError("signer_ca_file and signer_key_file must be given together")
        return self


class PolicySettings(BaseModel):
    """The force-reset policy used when the cluster has no Harvester `vm-force-reset-policy`."""

    model_config = ConfigDict(extra="forbid")

    enable: bool = Field(True, description="False = detect-only: report, never reset.")
    period_s: float = Field(
        15.0, gt=0, description="Seconds a node must stay unreachable before its VMs are reset."
    )
    vm_migration_timeout_s: float = Field(
        180.0, ge=0, description="Seconds an evacuation may take before it is reported as stuck."
    )


# lease_duration_s must exceed renew_deadline_s by this fraction of it: two machines'
# monotonic clocks may run at rates up to 1 % apart (NTP bounds it to 500 ppm), and the rest
# covers a write the leader issued just before its deadline that is still on its way.
LEASE_MARGIN = 0.1


class LeaderSettings(BaseModel):
    """Leader election on a coordination.k8s.io Lease."""

    model_config = ConfigDict(extra="forbid")

    lease_name: str = Field("node-watchdog-leader", description="Name of the leader Lease.")
    lease_duration_s: float = Field(
        8.0, gt=0, description="Seconds a standby waits after the last renewal before taking over."
    )
    renew_deadline_s: float = Field(
        5.0, gt=0, description="Seconds the leader keeps trying to renew before it steps down."
    )
    retry_period_s: float = Field(1.0, gt=0, description="Seconds between election attempts.")

    @model_validator(mode="after")
    def _ordered(self) -> LeaderSettings:
        if not self.retry_period_s < self.renew_deadline_s < self.lease_duration_s:
            raise ValueError(
                "need retry_period_s < renew_deadline_s < lease_duration_s, got "
                f"{self.retry_period_s} / {self.renew_deadline_s} / {self.lease_duration_s}"
            )
        # The leader counts renew_deadline_s on its clock, a standby lease_duration_s on its
        # own: the gap must cover their clock rates' drift and a write still in flight.
        need = round(self.renew_deadline_s * (1 + LEASE_MARGIN), 6)
        if self.lease_duration_s < need:
            raise ValueError(
                f"lease_duration_s {self.lease_duration_s} must be at least renew_deadline_s "
                f"x {1 + LEASE_MARGIN:g} = {need:g}, so a leader that cannot renew stops "
                "acting before a standby may take over"
            )
        return self


class Settings(BaseSettings):
    """Every knob of node-watchdog. Durations are seconds (`_s`), counts are plain integers."""

    model_config = SettingsConfigDict(
        env_prefix="WATCHDOG_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    # --- identity ----------------------------------------------------------------------------
    node_name: str | None = Field(
        None, description="This node's name (the DaemonSet sets it from the downward API)."
    )
    namespace: str = Field("node-watchdog", description="Namespace of the watchdog itself.")
    vm_namespaces: list[str] = Field(
        default_factory=list, description="Namespaces whose VMs are watched; empty = all."
    )
    boot_id_file: Path = Field(
        Path("/proc/sys/kernel/random/boot_id"),
        description="File holding this machine's boot id; a new id proves a reboot.",
    )
    boot_state_dir: Path = Field(
        Path("/run/node-watchdog"),
        description="Agent: directory for this boot's contact record (when the fence was "
        "armed, the latest proven contact), so a restarted agent keeps its fence deadline. "
        "Must outlive the agent process and not the boot: tmpfs on the host, e.g. /run.",
    )

    # --- heartbeats and detection (DESIGN §4) ----------------------------------------------------
    heartbeat_interval_s: float = Field(
        1.0, gt=0, le=60, description="Seconds between two heartbeats of an agent."
    )
    suspect_after_s: float = Field(
        3.0,
        gt=0,
        description="Seconds without a heartbeat before a node is SUSPECT (3 missed at 1 s).",
    )
    unreachable_after_s: float = Field(
        4.0,
        gt=0,
        description="Seconds without a heartbeat before a corroborated node is UNREACHABLE "
        "(4 missed at 1 s: with peer probes corroborating within ~2 s, detection stays <= 5 s).",
    )
    lease_stale_after_s: float = Field(
        15.0,
        gt=0,
        description="Seconds the kubelet's Lease renewTime may stay unchanged before it is stale "
        "(kubelet renews every 10 s).",
    )
    virt_handler_stale_after_s: float = Field(
        300.0, gt=0, description="Seconds without a kubevirt.io/heartbeat update: weak signal."
    )
    recovery_heartbeats: int = Field(
        3, ge=1, description="Fresh heartbeats in a row before a SUSPECT node is HEALTHY again."
    )
    storm_max_unreachable: int = Field(
        10,
        ge=1,
        description="More nodes than this going down at once holds every reset (storm); in fence "
        "modes self and power a node already reset no longer counts.",
    )
    storm_max_fraction: float = Field(
        0.5,
        gt=0,
        le=1,
        description="This fraction of nodes (or more) going down at once holds every reset: a "
        "partition around the controller looks exactly like that.",
    )

    # --- peer probes (DESIGN §4 `peers` signal) ------------------------------------------------
    peer_port: int = Field(
        9103,
        ge=0,
        le=65535,
        description="Agent: TCP port of its peer-probe endpoint; 0 = no peer probes at all "
        "(no endpoint, no address announced, no probing).",
    )
    peer_host: str = Field(
        "0.0.0.0", description="Agent: address the peer-probe endpoint listens on."
    )
    peer_advertise: str | None = Field(
        None,
        description='Agent: "host:port" other agents probe; default $WATCHDOG_NODE_IP:peer_port '
        "(unset and no WATCHDOG_NODE_IP: this agent is not probed).",
    )
    peer_count: int = Field(
        3,
        ge=1,
        le=16,
        description="Controller: how many other nodes each agent probes (its successors in "
        "sorted-name order), i.e. how many observers each node has.",
    )
    peer_quorum: int = Field(
        2,
        ge=1,
        le=16,
        description="Controller: observers (with fresh heartbeats of their own) that must report "
        "a silent node unreachable, none reaching it, before peers corroborate.",
    )
    peer_interval_s: float = Field(
        1.0, gt=0, le=60, description="Agent: seconds between two probe rounds."
    )
    peer_probe_timeout_s: float = Field(
        1.0,
        gt=0,
        le=30,
        description="Agent: seconds a probe may wait for its answer before it counts as a timeout.",
    )
    peer_failures: int = Field(
        2,
        ge=1,
        le=100,
        description="Agent: consecutive probe timeouts before it reports a target unreachable.",
    )
    peer_refresh_s: float = Field(
        30.0,
        gt=0,
        description="Agent: seconds after which an unchanged peer report is published again.",
    )

    # --- fencing (DESIGN §5) -------------------------------------------------------------------
    fence_mode: FenceMode = Field(
        FenceMode.SELF,
        description="self (agent fences itself), power (the node's BMC switches it off and "
        "reads back off, through a fence agent; the agent's self-fence is the fallback), "
        "external (hook), manual (admin taint), none (no fencing, Harvester-compatible; "
        "explicit opt-in).",
    )
    self_fence_after_s: float = Field(
        8.0,
        gt=0,
        description="Seconds an agent may be cut off from both broker and API before it fences.",
    )
    self_fence_lease_s: float = Field(
        0.0,
        ge=0,
        le=600,
        description="Agent, opt-in (0 = off): while its kubelet renews the node's Lease, the "
        "agent does not fence before this many seconds after the latest renewal it read (a node "
        "cut off from broker and peers but reaching the API is alive, and says so at the "
        "kubelet's next renewal); declared, and the controller resets on the self-fence only "
        "this long plus the fence's stop time after the latest renewal it saw. 15 suits the "
        "kubelet's 10 s renewal. Known limits in docs/OPERATIONS.md (Self-fencing): off by "
        "default until they are closed.",
    )
    fence_action_bound_s: float = Field(
        5.0, ge=0, description="Upper bound in seconds for the fence action to stop the VMs."
    )
    fence_margin_s: float = Field(
        2.0, ge=0, description="Extra seconds of safety for clock rate drift and scheduling."
    )
    fence_command: str | None = Field(
        None,
        description="Agent: shell command that fences this node (default on a real node: "
        "`echo b > /proc/sysrq-trigger`). Unset = the agent declares its fence unarmed.",
    )
    watchdog_device: Path | None = Field(
        None,
        description="Agent: the watchdog device that backs the self-fence (`/dev/watchdog`; "
        "load softdog where there is no hardware one). Opened (armed) at the first proven "
        "contact in this boot, petted only while contact is proven: it resets the node when the "
        "agent freezes, dies or its fence command fails. Unset = the fence is declared weak.",
    )
    watchdog_timeout_s: float = Field(
        5.0,
        gt=0,
        le=600,
        description="Agent: the watchdog device's timeout in seconds (a real device takes whole "
        "seconds, at least 1: rounded up), set on the device where the driver allows (else read "
        "back) and declared; the controller's safe delay waits "
        "max(fence_action_bound_s, this).",
    )
    accept_weak_self_fence: bool = Field(
        False,
        description="Controller: accept a self-fence that no watchdog device backs as proof for "
        "a reset. Weaker: an agent that froze, hung or whose fence command failed stops "
        "nothing, and its VMs may run twice. Warned at start and exported "
        "(watchdog_weak_fence_accepted).",
    )
    fence_hook_command: str | None = Field(
        None,
        description="Controller, fence_mode=external: command run with the node name as "
        "$NODE; exit 0 means the node is powered off. Run on entering Fencing and, until one "
        "run confirms, again 2 s after the previous start (doubling up to 30 s; one run at a "
        "time per node; not while a hold is in force); the confirmation is kept in the node's "
        "state annotation (a new leader resumes with it).",
    )
    fence_hook_url: str | None = Field(
        None,
        description='Controller, fence_mode=external: URL POSTed {"node": name}; 2xx means '
        "the node is powered off.",
    )
    fence_hook_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Seconds an external fence hook, or a power fence (off and status "
        "read-back together), may take.",
    )
    power_fence_inventory: Path | None = Field(
        None,
        description="Controller, fence_mode=power: YAML file naming each node's BMC (fence "
        "agent, ip, username, password or password_file, agent options); mount it from a "
        "Secret in the controller only. Checked at start, read again at every fence run.",
    )
    api_check_interval_s: float = Field(
        2.0,
        gt=0,
        description="Agent: seconds between its API-server reachability checks.",
    )

    # --- policy and reset (DESIGN §5) ----------------------------------------------------------
    policy: PolicySettings = Field(
        default_factory=PolicySettings,  # type: ignore[arg-type]
        description="Policy used when no Harvester setting exists.",
    )
    harvester_setting: str = Field(
        "vm-force-reset-policy", description="Name of the Harvester Setting read live."
    )
    mark_pods_not_ready: bool = Field(
        True, description="Mark falsely-ready launcher pods Ready=False on unreachable nodes."
    )
    out_of_service_taint: str = Field(
        "node.kubernetes.io/out-of-service=nodeshutdown:NoExecute",
        description="Taint key=value:effect applied before force-deleting pods.",
        pattern=r"^[A-Za-z0-9./_-]+(=[A-Za-z0-9._-]*)?:(NoExecute|NoSchedule|PreferNoSchedule)$",
    )
    delete_volume_attachments: bool = Field(
        False, description="Delete the VolumeAttachments of reset VMs' volumes (opt-in)."
    )
    dry_run: bool = Field(False, description="Decide and report, never write to the cluster.")

    # --- evacuation (DESIGN §6) ----------------------------------------------------------------
    parallel_migrations_per_cluster: int = Field(
        5, ge=1, description="KubeVirt limit used when the KubeVirt CR does not say."
    )
    parallel_outbound_migrations_per_node: int = Field(
        2, ge=1, description="KubeVirt limit used when the KubeVirt CR does not say."
    )

    # --- connections and endpoints -------------------------------------------------------------
    mqtt: MQTTSettings = Field(
        default_factory=MQTTSettings,  # type: ignore[arg-type]
        description="The MQTT broker carrying heartbeats.",
    )
    leader: LeaderSettings = Field(
        default_factory=LeaderSettings,  # type: ignore[arg-type]
        description="Leader election among controller replicas.",
    )
    api_request_timeout_s: float = Field(
        10.0, gt=0, description="Seconds a single Kubernetes API request may take."
    )
    watch_timeout_s: int = Field(
        60, ge=5, description="Server-side timeout of each watch request, in seconds."
    )
    metrics_host: str = Field("0.0.0.0", description="Address of the HTTP endpoints.")
    metrics_port: int = Field(
        9102, ge=0, le=65535, description="Port of /metrics, /healthz, /readyz; 0 = disabled."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level."
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="Log line format; json: one object per line (t, level, logger, msg, and "
        "error with the traceback), every line parseable.",
    )

    def quorum_spare_off(self) -> str | None:
        """Why the agent's quorum before self-fencing is off with these timings (it then fences
        on its own deadline, as without peers), or None (decide/quorum.py)."""
        return spare_timing_error(
            peer_interval_s=self.peer_interval_s,
            peer_probe_timeout_s=self.peer_probe_timeout_s,
            self_fence_after_s=self.self_fence_after_s,
            heartbeat_interval_s=self.heartbeat_interval_s,
            fence_margin_s=self.fence_margin_s,
            suspect_after_s=self.suspect_after_s,
            max_ingest_lag_s=self.mqtt.max_ingest_lag_s,
        )

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        if self.suspect_after_s < self.heartbeat_interval_s:
            raise ValueError(
                f"suspect_after_s ({self.suspect_after_s}) must be at least "
                f"heartbeat_interval_s ({self.heartbeat_interval_s}): one late heartbeat "
                "must not make a node suspect"
            )
        if self.unreachable_after_s <= self.suspect_after_s:
            raise ValueError(
                f"unreachable_after_s ({self.unreachable_after_s}) must be greater than "
                f"suspect_after_s ({self.suspect_after_s})"
            )
        if self.mqtt.max_ingest_lag_s >= self.suspect_after_s:
            raise ValueError(
                f"mqtt.max_ingest_lag_s ({self.mqtt.max_ingest_lag_s}) must be less than "
                f"suspect_after_s ({self.suspect_after_s}): a backlog that long already makes "
                "live nodes look suspect"
            )
        if self.peer_quorum > self.peer_count:
            raise ValueError(
                f"peer_quorum ({self.peer_quorum}) cannot exceed peer_count ({self.peer_count}): "
                "peers could never corroborate"
            )
        if self.peer_advertise is not None and not valid_peer_address(self.peer_advertise):
            raise ValueError(f"peer_advertise {self.peer_advertise!r} is not host:port")
        latest_read = max(self.api_check_interval_s, self.self_fence_after_s / 2)
        if (
            latest_read + self.api_check_interval_s
            > self.self_fence_after_s + self.heartbeat_interval_s
        ):
            raise ValueError(
                f"api_check_interval_s ({self.api_check_interval_s}) is too long for "
                f"self_fence_after_s ({self.self_fence_after_s}): an agent could read that it "
                "is being fenced only after the controller's safe delay; need "
                "max(api_check_interval_s, self_fence_after_s / 2) + api_check_interval_s <= "
                "self_fence_after_s + heartbeat_interval_s"
            )
        if self.fence_mode is FenceMode.EXTERNAL and not (
            self.fence_hook_command or self.fence_hook_url
        ):
            raise ValueError("fence_mode 'external' needs fence_hook_command or fence_hook_url")
        # fence_mode power needs power_fence_inventory only in the controller (runtime/app.py):
        # agents load the same ConfigMap without the inventory.
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlFileSource(settings_cls))

    def decide_config(self, nodes_hint: int = 0) -> DecideConfig:
        """The pure decision core's view of these settings."""
        del nodes_hint
        return DecideConfig(
            heartbeat_interval_s=self.heartbeat_interval_s,
            suspect_after_s=self.suspect_after_s,
            unreachable_after_s=self.unreachable_after_s,
            lease_stale_after_s=self.lease_stale_after_s,
            recovery_heartbeats=self.recovery_heartbeats,
            storm_max_unreachable=self.storm_max_unreachable,
            storm_max_fraction=self.storm_max_fraction,
            fence_mode=self.fence_mode,
            fence_margin_s=self.fence_margin_s,
            accept_weak_fence=self.accept_weak_self_fence,
            dry_run=self.dry_run,
            mark_pods_not_ready=self.mark_pods_not_ready,
            delete_volume_attachments=self.delete_volume_attachments,
        )

    def default_policy(self) -> Policy:
        """The policy from configuration, for clusters without the Harvester setting."""
        return Policy(
            enable=self.policy.enable,
            period_s=self.policy.period_s,
            vm_migration_timeout_s=self.policy.vm_migration_timeout_s,
        )

    def peer_address(self) -> str | None:
        """The probe address this agent announces, or None (not probed)."""
        if self.peer_port == 0:
            return None
        if self.peer_advertise is not None:
            return self.peer_advertise
        node_ip = os.environ.get(NODE_IP_ENV, "").strip()
        if not node_ip:
            return None
        host = f"[{node_ip}]" if ":" in node_ip else node_ip
        address = f"{host}:{self.peer_port}"
        return address if valid_peer_address(address) else None

    def mqtt_password(self) -> str | None:
        """The broker password, read from its file at use time so rotated Secrets apply."""
        if self.mqtt.password_file is not None:
            return self.mqtt.password_file.read_text().strip()
        return self.mqtt.password.get_secret_value() if self.mqtt.password else None


class _YamlFileSource(PydanticBaseSettingsSource):
    """Reads the YAML file named by WATCHDOG_CONFIG_FILE; a bad file is an error, not a default."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        self._data = _read_yaml(os.environ.get(CONFIG_FILE_ENV))

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


def _read_yaml(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigFileError(f"{CONFIG_FILE_ENV}={path}: cannot read: {e.strerror}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigFileError(f"{CONFIG_FILE_ENV}={path}: not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(
            f"{CONFIG_FILE_ENV}={path}: top level must be a mapping of settings, "
            f"got {type(data).__name__}"
        )
    return data


def load_settings(**overrides: Any) -> Settings:
    """Settings from environment, config file and defaults (overrides win, for tests and CLI)."""
    return Settings(**overrides)
