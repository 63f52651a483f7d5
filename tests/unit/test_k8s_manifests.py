"""The Kubernetes manifests of archiver/deploy/k8s.py for the image built from docker/Dockerfile.

Manifests are validated offline against the Kubernetes 1.37 schemas bundled by `kubernetes-validate`.
"""

from __future__ import annotations

import argparse
import os
import re

import pytest
import yaml

from archiver.cli import add_k8s_parser
from archiver.deploy.k8s import (
    GPU_RESOURCE,
    HEALTHCHECK,
    STATE_DIR,
    K8sConfig,
    render_manifests,
    write_manifests,
)
from handlers.errors import SpecError
from tests.unit.dockerfile_rules import DOCKER, copied_to, dockerfile_text, final_stage, parse_dockerfile

K8S_VERSION = "1.37.0"
# The committed examples in docker/k8s/ and the configs (README commands) that produce them.
EXAMPLES = {"cpu": K8sConfig(), "gpu": K8sConfig(gpu=1)}


def _by_kind(config: K8sConfig) -> dict[str, dict]:
    return {m["kind"]: m for m in render_manifests(config)}


def _container(config: K8sConfig) -> dict:
    return _by_kind(config)["Deployment"]["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("variant", sorted(EXAMPLES))
def test_manifests_validate_against_the_kubernetes_schemas(variant):
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (dev extra: kubernetes-validate==1.37.0)")
    manifests = render_manifests(EXAMPLES[variant])
    assert [m["kind"] for m in manifests] == ["Deployment", "Service", "HorizontalPodAutoscaler"]
    for manifest in manifests:
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def test_schema_validation_is_not_vacuous():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    manifest = _by_kind(K8sConfig())["Deployment"]
    manifest["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["comand"] = ["x"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def test_probes_work_with_token_auth():
    """Readiness runs the image's health check (it sends the inference key); the others use the token-free port."""
    config = K8sConfig(metrics_port=9092)
    container = _container(config)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"inference": 8080, "management": 8081, "metrics": 9092}
    assert container["readinessProbe"]["exec"]["command"] == HEALTHCHECK
    instructions = parse_dockerfile(dockerfile_text())
    assert copied_to(instructions, "docker/healthcheck.py") == HEALTHCHECK[-1]  # the script is in the image
    for name in ("livenessProbe", "startupProbe"):
        probe = container[name]
        assert probe["httpGet"] == {"path": "/metrics", "port": "metrics"}, name
    for name in ("livenessProbe", "readinessProbe", "startupProbe"):
        probe = container[name]
        # an httpGet/tcpSocket on the inference or management port would get HTTP 400 without a token
        target = (probe.get("httpGet") or probe.get("tcpSocket") or {}).get("port")
        assert target in (None, "metrics", config.metrics_port), name
        assert probe["timeoutSeconds"] >= 5


def test_manifests_point_at_the_image_and_its_state_volume():
    """`tspack k8s` defaults to the tag `make image` builds, and mounts state where the image's VOLUME is."""
    final = final_stage(parse_dockerfile(dockerfile_text()))
    volumes = [v for i in final if i.keyword == "VOLUME" for v in (i.exec_form() or i.args.split())]
    assert STATE_DIR in volumes
    assert _container(K8sConfig()).get("image") == "tspack-serve:cpu"
    mounts = _container(K8sConfig(state_claim="s", max_replicas=1)).get("volumeMounts", [])
    assert [m["mountPath"] for m in mounts] == [STATE_DIR]


def test_gpu_resources_only_for_the_gpu_variant():
    cpu, gpu = _by_kind(EXAMPLES["cpu"]), _by_kind(K8sConfig(gpu=2))
    assert GPU_RESOURCE not in yaml.safe_dump(list(cpu.values()))
    cpu_pod = cpu["Deployment"]["spec"]["template"]["spec"]
    assert "nodeSelector" not in cpu_pod and "tolerations" not in cpu_pod
    gpu_pod = gpu["Deployment"]["spec"]["template"]["spec"]
    assert gpu_pod["containers"][0]["resources"]["limits"][GPU_RESOURCE] == 2
    assert GPU_RESOURCE not in gpu_pod["containers"][0]["resources"]["requests"]
    assert gpu_pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert gpu_pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    bare = _by_kind(K8sConfig(gpu=1, gpu_node_selector="", gpu_toleration=""))["Deployment"]["spec"]["template"]
    assert "nodeSelector" not in bare["spec"] and "tolerations" not in bare["spec"]
    assert _container(K8sConfig(gpu=1)).get("image") == "tspack-serve:gpu"


def test_service_and_autoscaler():
    config = K8sConfig(name="digits", replicas=2, min_replicas=2, max_replicas=6, target_cpu_utilization=60)
    kinds = _by_kind(config)
    service, hpa = kinds["Service"], kinds["HorizontalPodAutoscaler"]
    assert {p["port"] for p in service["spec"]["ports"]} == {8080, 8081, 8082}
    assert service["spec"]["selector"] == kinds["Deployment"]["spec"]["selector"]["matchLabels"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "digits"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert hpa["spec"]["metrics"] == [{"type": "Resource", "resource": {
        "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 60}}}]
    assert kinds["Deployment"]["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("kwargs, key", [
    ({"replicas": 0}, "replicas"),
    ({"min_replicas": 0}, "min_replicas"),
    ({"min_replicas": 3, "max_replicas": 2, "replicas": 3}, "max_replicas"),
    ({"replicas": 5, "max_replicas": 4}, "replicas"),
    ({"gpu": -1}, "gpu"),
    ({"cpu_request": "lots"}, "cpu_request"),
    ({"cpu_request": "3", "cpu_limit": "2500m"}, "cpu_request"),
    ({"cpu_limit": "1x"}, "cpu_limit"),
    ({"memory_request": "8Gi", "memory_limit": "4Gi"}, "memory_request"),
    ({"memory_limit": "4GB"}, "memory_limit"),
    ({"target_cpu_utilization": 0}, "target_cpu_utilization"),
    ({"name": "Digits_Model"}, "name"),
    ({"image": "tspack serve"}, "image"),
    ({"metrics_port": 8080}, "inference_port, management_port, metrics_port"),
    ({"inference_port": 70000}, "inference_port"),
    ({"service_type": "Ingress"}, "service_type"),
    ({"gpu_node_selector": "gpu-nodes"}, "gpu_node_selector"),
])
def test_bad_config_is_refused_naming_the_key(kwargs, key):
    with pytest.raises(SpecError, match="^" + re.escape(key) + ":"):
        K8sConfig(**kwargs)


def test_quantities_compare_across_units():
    K8sConfig(cpu_request="500m", cpu_limit="1", memory_request="1024Mi", memory_limit="1Gi")
    K8sConfig(memory_request="1G", memory_limit="1Gi")
    with pytest.raises(SpecError, match="^memory_request:"):
        K8sConfig(memory_request="1Gi", memory_limit="1G")


def test_write_manifests_one_file_per_kind(tmp_path):
    paths = write_manifests(EXAMPLES["gpu"], str(tmp_path / "out"))
    assert sorted(os.path.basename(p) for p in paths) == ["deployment.yaml", "hpa.yaml", "service.yaml"]
    for path, manifest in zip(paths, render_manifests(EXAMPLES["gpu"])):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        assert text.startswith("# Generated by `tspack k8s`")
        assert "&id" not in text and "*id" not in text  # no YAML anchors
        assert yaml.safe_load(text) == manifest


@pytest.mark.parametrize("variant", sorted(EXAMPLES))
def test_committed_examples_are_current(variant):
    """docker/k8s/<variant>/ is what `tspack k8s` writes for the README's commands: regenerate when this fails."""
    for manifest in render_manifests(EXAMPLES[variant]):
        name = {"Deployment": "deployment", "Service": "service", "HorizontalPodAutoscaler": "hpa"}[manifest["kind"]]
        with open(os.path.join(DOCKER, "k8s", variant, f"{name}.yaml"), encoding="utf-8") as f:
            assert yaml.safe_load(f) == manifest, f"docker/k8s/{variant}/{name}.yaml is stale"


def _k8s_cli() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tspack")
    add_k8s_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_subcommand(tmp_path, capsys):
    out = tmp_path / "k8s"
    args = _k8s_cli().parse_args(["k8s", "--gpu", "1", "--replicas", "2", "--max-replicas", "3", "--image",
                                  "registry.example/tspack-serve:gpu", "--out", str(out)])
    assert args.func(args) == 0
    assert "gpu variant" in capsys.readouterr().out
    with open(out / "deployment.yaml", encoding="utf-8") as f:
        deployment = yaml.safe_load(f)
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/tspack-serve:gpu"
    defaults = _k8s_cli().parse_args(["k8s"])
    assert defaults.out == os.path.join("docker", "k8s")
    bad = _k8s_cli().parse_args(["k8s", "--min-replicas", "3", "--max-replicas", "2", "--out", str(out)])
    with pytest.raises(SpecError, match="^max_replicas:"):
        bad.func(bad)
