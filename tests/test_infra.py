"""The manifests in infra/ parse, and every field that must agree with the code does:
entrypoints exist, `reverie` subcommands parse, ports are Serve's and the cluster's, environment
variables are ones the code reads (docs/environment.md), and one image and one Ray version are
named everywhere."""

from __future__ import annotations

import importlib
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines.cli import COMMANDS, build_parser
from pipelines.demo import DemoConfig
from pipelines.settings import Settings
from storage.experience_writer import EXPERIENCE_PREFIX

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
IMAGE = f"registry.example.com/reverie:{PYPROJECT['project']['version']}"
RAY_VERSION = next(d.split("==")[1] for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray["))
CODE = ("model", "storage", "workers", "pipelines", "federation")
RAY_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001}


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


MANIFESTS = {path.relative_to(ROOT).as_posix(): load(path) for path in sorted(INFRA.rglob("*.yaml"))}
KUBERAY = {kind: doc for docs in MANIFESTS.values() for doc in docs if (kind := doc.get("kind")) in
           ("RayCluster", "RayService", "RayJob")}
SERVE = MANIFESTS["infra/serve.yaml"][0]
CLUSTER = MANIFESTS["infra/ray-cluster.yaml"][0]
WORKER = next(doc for doc in MANIFESTS["infra/prefect-worker.yaml"] if doc["kind"] == "Deployment")


def walk(node: Any, key: str) -> Iterator[Any]:
    """Every value stored under `key`, anywhere in a parsed document."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, key)


def cluster_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    yield "RayCluster", KUBERAY["RayCluster"]["spec"]
    yield "RayService", KUBERAY["RayService"]["spec"]["rayClusterConfig"]
    yield "RayJob", KUBERAY["RayJob"]["spec"]["rayClusterSpec"]


def head_container(spec: dict[str, Any]) -> dict[str, Any]:
    return spec["headGroupSpec"]["template"]["spec"]["containers"][0]


def documented_variables() -> set[str]:
    """The variables named in the first column of docs/environment.md's tables."""
    names = set()
    for line in (ROOT / "docs" / "environment.md").read_text().splitlines():
        if line.startswith("| `"):
            names |= set(re.findall(r"`([A-Z][A-Z0-9_]+)`", line.split("|")[1]))
    return names


def variables_the_code_reads() -> set[str]:
    pattern = re.compile(r"""(?:environ|env)(?:\.get|\.setdefault|\.pop)?[\[(]\s*["']([A-Z][A-Z0-9_]+)["']""")
    names = set(Settings.ENV.values())
    for folder in CODE:
        for path in (ROOT / folder).rglob("*.py"):
            names |= set(pattern.findall(path.read_text()))
    return names


def variables_the_manifests_set() -> set[str]:
    names = {entry["name"] for doc in MANIFESTS.values() for env in walk(doc, "env") if isinstance(env, list)
             for entry in env}
    names |= {re.match(r"-e ([A-Z0-9_]+)=", option).group(1) for option in CLUSTER["docker"]["run_options"]
              if option.startswith("-e ")}
    return names


def import_target(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def test_every_manifest_parses():
    assert set(MANIFESTS) >= {"infra/serve.yaml", "infra/ray-cluster.yaml", "infra/prefect-worker.yaml",
                              "infra/kuberay/raycluster.yaml", "infra/kuberay/rayservice.yaml",
                              "infra/kuberay/rayjob-sleep.yaml"}
    assert set(KUBERAY) == {"RayCluster", "RayService", "RayJob"}
    assert all(doc["apiVersion"] == "ray.io/v1" for doc in KUBERAY.values())
    json.loads((INFRA / "s3-lifecycle.json").read_text())


def test_one_image_and_one_ray_version_everywhere():
    images = {image for doc in MANIFESTS.values() for image in walk(doc, "image")}
    assert images == {IMAGE}, images
    assert f"-t {IMAGE}" in (INFRA / "Dockerfile").read_text()
    assert {spec["rayVersion"] for _, spec in cluster_specs()} == {RAY_VERSION}


def test_the_cluster_launcher_config_is_valid_for_this_ray():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(CLUSTER))
    head_start = " ".join(CLUSTER["head_start_ray_commands"])
    for flag, port in (("--port", RAY_PORTS["gcs-server"]), ("--dashboard-port", RAY_PORTS["dashboard"]),
                       ("--ray-client-server-port", RAY_PORTS["client"])):
        assert f"{flag}={port}" in head_start
    assert CLUSTER["available_node_types"]["gpu_worker"]["resources"]["GPU"] >= 1


def test_the_serve_config_builds_the_app_and_listens_where_reverie_serve_does():
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(SERVE)
    serve_defaults = build_parser().parse_args(["serve"])
    assert config.http_options.port == serve_defaults.port == DemoConfig().port
    (app,) = SERVE["applications"]
    import_target(app["import_path"])(app["args"])  # the builder accepts every arg the config passes


def test_the_rayservice_serves_exactly_the_serve_config():
    serve_config = yaml.safe_load(KUBERAY["RayService"]["spec"]["serveConfigV2"])
    assert serve_config["applications"] == SERVE["applications"]


def test_ray_pods_expose_the_ports_of_ray_and_serve():
    for kind, spec in cluster_specs():
        ports = {p["name"]: p["containerPort"] for p in head_container(spec).get("ports", [])}
        assert {name: ports.get(name) for name in RAY_PORTS} == RAY_PORTS, kind
        if kind != "RayJob":
            assert ports["serve"] == SERVE["http_options"]["port"], kind
    gpu_groups = [g for g in KUBERAY["RayJob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_groups, "the sleep's RayJob has GPU workers"


def test_the_sleeps_rayjob_runs_a_reverie_command_that_parses():
    argv = shlex.split(KUBERAY["RayJob"]["spec"]["entrypoint"])
    assert argv[0] in PYPROJECT["project"]["scripts"]
    assert callable(import_target(PYPROJECT["project"]["scripts"][argv[0]]))
    assert argv[1] in COMMANDS
    args = build_parser().parse_args(argv[1:])
    gpu_workers = sum(g["replicas"] for g in KUBERAY["RayJob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    assert args.command == "sleep" and args.gpu and args.num_workers == gpu_workers


def test_the_prefect_worker_serves_the_pool_of_the_deployments_and_reaches_the_raycluster():
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    for deployment in deployments:
        path, _, flow = deployment["entrypoint"].partition(":")
        assert callable(import_target(f"{path.removesuffix('.py').replace('/', '.')}:{flow}"))
    (container,) = WORKER["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[:3] == ["prefect", "worker", "start"]
    assert command[command.index("--pool") + 1] in {d["work_pool"]["name"] for d in deployments}
    env = {e["name"]: e["value"] for e in container["env"]}
    head_service = f"{KUBERAY['RayCluster']['metadata']['name']}-head-svc"
    assert env["RAY_ADDRESS"] == f"ray://{head_service}:{RAY_PORTS['client']}"
    settings = Settings.load(env={**env, "REVERIE_CONFIG": "/nonexistent/reverie.toml"})
    assert settings.sleep_workers >= 1 and settings.train_storage.startswith("s3://")


def test_every_variable_the_code_reads_or_the_manifests_set_is_documented():
    documented = documented_variables()
    assert variables_the_code_reads() - documented == set()
    assert variables_the_manifests_set() - documented == set()


def test_the_s3_lifecycle_rules_name_prefixes_the_store_writes():
    rules = json.loads((INFRA / "s3-lifecycle.json").read_text())["Rules"]
    assert len({r["ID"] for r in rules}) == len(rules) and all(r["Status"] == "Enabled" for r in rules)
    root = "reverie/"  # the prefix of REVERIE_DATA=s3://reverie-data/reverie in the manifests
    assert {e["value"] for doc in MANIFESTS.values() for env in walk(doc, "env") if isinstance(env, list)
            for e in env if e["name"] == "REVERIE_DATA"} == {f"s3://reverie-data/{root.rstrip('/')}"}
    prefixes = {r["Filter"]["Prefix"] for r in rules}
    assert f"{root}{EXPERIENCE_PREFIX}/" in prefixes
    assert f"{root}ray_train/" in prefixes  # REVERIE_TRAIN_STORAGE in the manifests
    for rule in rules:
        days = [t["Days"] for t in rule.get("Transitions", [])]
        assert days == sorted(days)
        assert all(t["Days"] >= 30 for t in rule.get("Transitions", []) if t["StorageClass"] == "STANDARD_IA")


@pytest.mark.parametrize("excluded", [".venv/", "reverie-data/", ".git/", ".whl/"])
def test_ray_job_uploads_leave_out_local_state(excluded):
    assert excluded in (ROOT / ".rayignore").read_text().splitlines()
