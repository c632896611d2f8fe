"""The deployment material holds together: the compose stack's services, wiring and settings, and the Dockerfile.
(The Docker engine does not run here; the same services run natively in test_servers.py.)"""

from __future__ import annotations

import re

import yaml

from tests.conftest import ROOT

INFRA = ROOT / "infra"


def _compose() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


def test_the_compose_stack_wires_its_services_together():
    compose = _compose()
    services = compose["services"]
    assert {"postgres", "minio", "buckets", "mlflow", "prefect", "worker", "deploy"} <= set(services)
    for name, service in services.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            wanted = condition["condition"]
            if wanted == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits for {dependency}'s healthcheck"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (INFRA / source).is_file(), f"{name} mounts missing {source}"
            elif not source.startswith(("$", "/", ".")):
                assert source in compose["volumes"], f"{name} uses undeclared volume {source}"

    mlflow = " ".join(services["mlflow"]["command"])
    assert "--backend-store-uri=postgresql://" in mlflow and "@postgres:5432/mlflow" in mlflow
    assert "--artifacts-destination=s3://mlflow-artifacts" in mlflow
    assert "mb --ignore-existing stack/mlflow-artifacts" in services["buckets"]["command"][0]
    assert "@postgres:5432/prefect" in services["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert "CREATE DATABASE prefect" in (INFRA / "postgres-init.sql").read_text()

    worker = services["worker"]
    env = worker["environment"]
    assert env["PREFECT_API_URL"] == "http://prefect:4200/api" and "4200:4200" in services["prefect"]["ports"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and "--port=5000" in mlflow
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000" and "9000:9000" in services["minio"]["ports"]
    assert worker["command"][:4] == ["worker", "start", "--pool", "adaptflow"]
    deploy = services["deploy"]["command"]
    assert deploy[0] == "deploy" and deploy[-2:] == ["--pool", "adaptflow"]
    for recipe in deploy[1:-2]:
        assert (ROOT / recipe).is_file(), recipe
    assert (INFRA / services["worker"]["build"]["context"] / "Dockerfile").is_file()


def test_every_setting_the_stack_needs_is_in_the_example_env_and_no_secret_is_in_the_compose_file():
    text = (INFRA / "docker-compose.yml").read_text()
    example = dict(line.split("=", 1) for line in (INFRA / "stack.env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    used = set(re.findall(r"(?<!\$)\$\{(\w+)(?::?[-?][^}]*)?\}", text))
    required = set(re.findall(r"(?<!\$)\$\{(\w+):\?", text))
    assert required <= set(example), f"missing from stack.env.example: {required - set(example)}"
    assert used <= set(example), f"undocumented settings: {used - set(example)}"
    for secret in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD"):
        assert example[secret].startswith("change-me") and example[secret] not in text
    assert "infra/stack.env" in (ROOT / ".gitignore").read_text().splitlines()


def test_the_dockerfile_builds_a_cuda_image_by_default_and_a_cpu_image_on_request():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG VARIANT=gpu$", dockerfile, re.M)
    assert re.search(r"^FROM nvidia/cuda:\S+ AS base-gpu$", dockerfile, re.M)
    assert re.search(r"^FROM python:3\.11\S* AS base-cpu$", dockerfile, re.M)
    assert re.search(r"^FROM base-\$\{VARIANT\}$", dockerfile, re.M)
    assert 'pip install --index-url "$TORCH_INDEX" torch==2.13.0' in dockerfile  # pinned, before the project
    assert dockerfile.index("torch==2.13.0") < dockerfile.index('pip install -e ".[server]"')
    for copied in re.findall(r"^COPY (\S+) ", dockerfile, re.M):
        assert (ROOT / copied).exists(), copied
