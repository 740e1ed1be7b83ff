"""Deployment files: the Kubernetes manifests validate (strict) against a pinned Kubernetes version, compose.yaml
runs PostgreSQL, two replicas and a load balancer, and the Dockerfile is multi-stage, non-root, with a health check;
`docker build` runs where a Docker daemon answers."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
KUBERNETES_VERSION = "1.30.0"
MANIFESTS = sorted((REPO_ROOT / "deploy" / "kubernetes").glob("*.yaml"))


def documents() -> list[tuple[str, dict]]:
    return [(f"{path.name}#{i}", doc) for path in MANIFESTS
            for i, doc in enumerate(yaml.safe_load_all(path.read_text())) if doc]


@pytest.mark.parametrize(("name", "document"), documents(), ids=[name for name, _ in documents()])
def test_kubernetes_manifests_validate(name, document):
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_the_manifests_cover_a_deployment():
    kinds = {document["kind"] for _, document in documents()}
    assert {"Deployment", "Service", "Secret", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "StatefulSet"} <= kinds
    deployment = next(d for _, d in documents() if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    server = deployment["containers"][0]
    assert server["readinessProbe"]["httpGet"]["path"] == "/health"
    assert server["livenessProbe"]["httpGet"]["path"] == "/health"
    drain = float(server["args"][server["args"].index("--shutdown-timeout") + 1])
    assert deployment["terminationGracePeriodSeconds"] > drain + 5  # the preStop sleep, then the drain
    assert [c["args"] for c in deployment["initContainers"] if c["name"] == "migrate"] == [["db", "upgrade"]]


def test_the_training_job_runs_torchrun_nodes_through_one_rendezvous():
    """The multi-node training Job: one torchrun node per completion index, all meeting at pod 0 through the
    headless Service, with the run directory on a volume every pod shares."""
    job = next(d for _, d in documents() if d["kind"] == "Job")
    service = next(d for _, d in documents() if d["kind"] == "Service" and d["metadata"]["name"] == "llmasos-train")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    option = dict(zip(args, args[1:], strict=False))
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == int(option["--nnodes"])
    assert option["--rdzv-backend"] == "c10d"
    assert option["--rdzv-endpoint"] == f"{job['metadata']['name']}-0.{pod['subdomain']}:29400"
    assert pod["subdomain"] == service["metadata"]["name"] and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    rank = next(e for e in pod["containers"][0]["env"] if e["name"] == "NODE_RANK")
    assert option["--node-rank"] == "$(NODE_RANK)"
    assert "job-completion-index" in rank["valueFrom"]["fieldRef"]["fieldPath"]
    claim = next(d for _, d in documents() if d["kind"] == "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert option["--output"].startswith(pod["containers"][0]["volumeMounts"][0]["mountPath"])


def test_compose_runs_postgres_two_replicas_and_a_load_balancer():
    compose = yaml.safe_load((REPO_ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "replica-1", "replica-2", "nginx", "migrate"} <= set(services)
    for name in ("replica-1", "replica-2"):
        assert services[name]["environment"]["LLMASOS_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert services["migrate"]["command"] == ["db", "upgrade"]
    nginx = (REPO_ROOT / "deploy" / "nginx.conf").read_text()
    assert "replica-1:8000" in nginx and "replica-2:8000" in nginx and "proxy_buffering off" in nginx


def test_the_dockerfile_is_multi_stage_non_root_with_a_health_check():
    text = (REPO_ROOT / "Dockerfile").read_text()
    assert text.count("\nFROM ") + text.startswith("FROM ") >= 2
    assert "\nUSER llmasos" in text and "HEALTHCHECK" in text and "/health" in text
    assert "ARG TORCH_INDEX" in text and "LLMASOS_HOME=/data" in text


def test_docker_build():
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "info"], capture_output=True).returncode != 0:
        pytest.skip("no Docker daemon here: `docker build` is exercised where one answers")
    result = subprocess.run([docker, "build", "-q", "-t", "llmasos:test", str(REPO_ROOT)], capture_output=True,
                            text=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
