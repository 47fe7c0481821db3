"""Static checks of the cluster definitions in cluster/: Ray cluster launcher YAMLs (Ray's own schema
and validation), KubeRay manifests (the CRDs' OpenAPI schemas, strictly), the container image
recipe, and whether the resource shapes the workloads ask for fit the node types declared.

Nothing here starts Ray or touches the network; the Ray validation runs with sockets disabled.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import socket
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

from ray_app.runtime import SERVE_FAST_PATH_ENV

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CRD_DIR = Path(__file__).resolve().parents[2] / "shared" / "kuberay-crds"
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"

CLOUD_CONFIGS = ["aws.yaml", "gcp.yaml"]
LAUNCHER_CONFIGS = [*CLOUD_CONFIGS, "local-autoscaling.yaml"]
KUBERAY = {  # manifest -> (CRD file, kind)
    "raycluster.yaml": ("ray.io_rayclusters.yaml", "RayCluster"),
    "rayjob-train.yaml": ("ray.io_rayjobs.yaml", "RayJob"),
    "rayservice.yaml": ("ray.io_rayservices.yaml", "RayService"),
}
APP_IMAGE = "ghcr.io/example/ray-app"
# Shapes of the machines the cloud configs name, to check the declared Ray resources are real:
# Ray trusts `resources`, so a typo there would schedule work onto capacity that does not exist.
MACHINES = {"m5.2xlarge": (8, 0), "m5.4xlarge": (16, 0), "g5.12xlarge": (48, 4), "n2-standard-8": (8, 0), "n2-standard-16": (16, 0)}
GCP_BASE_MACHINES = {"n1-standard-16": 16}  # GPUs come from guestAccelerators


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
    args = serve_args(load(CLUSTER / "serve" / "image.yaml"))
    return {
        "train worker (CPU)": {"CPU": train_cpus},
        "train worker (GPU)": {"CPU": train_cpus, "GPU": 1},
        "predict actor (CPU)": {"CPU": 1},
        "predict actor (GPU)": {"CPU": 1, "GPU": 1},
        "serve replica (image.yaml)": {"CPU": args["num_cpus"], "GPU": args["num_gpus"]},
        "serve replica (GPU)": {"CPU": args["num_cpus"], "GPU": 1},
    }


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
    for worker in workers.values():
        node = worker["node_config"]
        spot = (
            node.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
            or node.get("scheduling", {}).get("provisioningModel") == "SPOT"
        )
        assert spot, f"{name}: workers run on spot/preemptible capacity"
    assert sum(t.get("max_workers", 0) for t in workers.values()) >= config["max_workers"] > 0


@pytest.mark.parametrize("name", CLOUD_CONFIGS)
def test_cloud_node_resources_match_the_machines(name):
    for node_type, spec in launcher(name)["available_node_types"].items():
        node, resources = spec["node_config"], spec["resources"]
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
    assert config["file_mounts"]["~/ray_app"] == "."
    assert "pip install --quiet -e ~/ray_app" in config["setup_commands"]
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
        assert image.endswith("-gpu") == (spec["resources"].get("GPU", 0) > 0), image
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
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR} (expected ../shared/kuberay-crds next to the repository)")
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
        assert container["image"].startswith(APP_IMAGE + ":") and container["image"].endswith("-gpu" if gpus else "-cpu")
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
    assert launcher("aws.yaml")["docker"]["image"] == f"{APP_IMAGE}:{base}"
    assert kuberay("raycluster.yaml")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == f"{APP_IMAGE}:{base}"


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
    "path", [*(CLUSTER / n for n in LAUNCHER_CONFIGS), *(CLUSTER / "kuberay" / n for n in KUBERAY)], ids=lambda p: p.name
)
def test_cluster_files_carry_no_credentials(path):
    text = path.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|BEGIN [A-Z ]*PRIVATE KEY|password:", text, re.IGNORECASE)
    assert "auth_token:" not in text, "tokens come from a Secret or a file mount, never inline"
