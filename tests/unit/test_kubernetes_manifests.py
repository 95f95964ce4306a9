"""monitoring/kubernetes/*.yaml: valid against the Kubernetes API schemas (kubernetes-validate bundles them, so
this runs offline) and consistent with each other and with the service's own settings."""

from __future__ import annotations

import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from noisewise.services.auth import OPEN_ROUTES
from noisewise.services.settings import Settings, reference

MANIFESTS = Path(__file__).resolve().parents[2] / "monitoring" / "kubernetes"
# the oldest Kubernetes release still supported upstream when the manifests were written, and the newest the
# validator knows: every API used (apps/v1, autoscaling/v2, policy/v1) is stable in both
KUBERNETES_VERSIONS = ("1.31.0", kubernetes_validate.latest_version())
SERVICE_PORT = 3000  # `bentoml serve --port`, in the Deployment's command


def documents() -> list[tuple[str, dict]]:
    """(file name, resource) for every document of every manifest."""
    out = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        out += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return out


def resource(kind: str) -> dict:
    found = [doc for _, doc in documents() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in {MANIFESTS}, found {len(found)}"
    return found[0]


def container() -> dict:
    containers = resource("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(("name", "doc"), documents(), ids=[f"{n}:{d['kind']}" for n, d in documents()])
def test_manifest_is_valid_against_the_kubernetes_schema(name, doc, version):
    # strict: an unknown or misspelt field (e.g. `readinesProbe`) fails instead of being ignored by the API
    kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_rejects_what_the_api_server_would():
    deployment = resource("Deployment")
    for path, bad in ((("spec", "replicas"), "two"), (("spec", "template", "spec", "containers", 0, "readinesProbe"),
                                                      {"httpGet": {"path": "/readyz", "port": 3000}})):
        broken = copy.deepcopy(deployment)
        node = broken
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = bad
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_set_holds_the_resources_of_a_replicated_service():
    kinds = sorted(doc["kind"] for _, doc in documents())
    assert kinds == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]
    assert resource("HorizontalPodAutoscaler")["apiVersion"] == "autoscaling/v2"


def test_deployment_runs_two_probed_replicas_on_the_service_port():
    spec = resource("Deployment")["spec"]
    assert spec["replicas"] == 2
    main = container()
    assert main["command"][:3] == ["bentoml", "serve", "noisewise.services.service:Noisewise"]
    assert main["command"][main["command"].index("--port") + 1] == str(SERVICE_PORT)
    ports = {port["name"]: port["containerPort"] for port in main["ports"]}
    assert ports == {"http": SERVICE_PORT}
    probes = {kind: main[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz" and probes["livenessProbe"]["path"] == "/livez"
    # the kubelet sends no API key: every probed path must be open when keys are configured
    assert {probe["path"] for probe in probes.values()} <= OPEN_ROUTES
    assert {ports.get(probe["port"], probe["port"]) for probe in probes.values()} == {SERVICE_PORT}
    assert main["resources"]["requests"]["cpu"] and main["resources"]["requests"]["memory"]
    assert main["resources"]["limits"]["memory"]
    # a rollout never drops below the ready replicas it had
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_selectors_and_references_match():
    deployment, service = resource("Deployment"), resource("Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (deployment["spec"]["selector"]["matchLabels"], service["spec"]["selector"],
                     resource("PodDisruptionBudget")["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= pod_labels.items()
    target = service["spec"]["ports"][0]["targetPort"]
    assert target in {port["name"] for port in container()["ports"]} | {SERVICE_PORT}
    scaled = resource("HorizontalPodAutoscaler")["spec"]
    assert (scaled["scaleTargetRef"]["kind"], scaled["scaleTargetRef"]["name"]) == ("Deployment",
                                                                                    deployment["metadata"]["name"])
    assert scaled["minReplicas"] == deployment["spec"]["replicas"] < scaled["maxReplicas"]
    assert [source["configMapRef"]["name"] for source in container()["envFrom"]] == [
        resource("ConfigMap")["metadata"]["name"]]


def test_secrets_come_from_a_secret_and_nowhere_else():
    from_secret = {var["name"]: var["valueFrom"]["secretKeyRef"] for var in container()["env"]
                   if "secretKeyRef" in var.get("valueFrom", {})}
    assert set(from_secret) == {"NOISEWISE_API_KEYS", "NOISEWISE_STORE_URL"}
    assert all(ref["name"] and ref["key"] and not ref.get("optional") for ref in from_secret.values())
    assert not {var["name"] for var in container()["env"] if "value" in var} & set(from_secret)
    assert not set(resource("ConfigMap")["data"]) & set(from_secret)


def test_config_map_sets_known_variables_the_service_accepts():
    data = resource("ConfigMap")["data"]
    known = {variable.env for variable in reference()}
    unknown = sorted(name for name in data if name.startswith("NOISEWISE_") and name not in known)
    assert unknown == [], f"not a noisewise variable: {unknown}"
    assert all(isinstance(value, str) for value in data.values())  # the API rejects numbers in a ConfigMap
    settings = Settings.from_env(data)  # raises with the variable's name on a value the service would refuse
    assert settings.alias == "champion" and settings.reload_interval_s > 0  # replicas follow the alias
