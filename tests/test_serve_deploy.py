"""``serve deploy cluster/serve/app.yaml`` to a running cluster started the way the cluster configs
start Ray: token auth on, and Serve's fast path (HAProxy ingress straight to the gateway replicas,
gRPC between deployments). Then a version pin through ``user_config`` under steady load.

The model is untrained and tiny (only the serving path is under test here); the registry holds it
as version 1 and again as version 2, which alias ``production`` points to.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
import threading
import time

import psutil
import pytest
import requests
import yaml
from ray.serve import Application
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve._private.utils import import_attr
from ray_head import run, wait_for

from ray_app.local_cluster import REPO_ROOT, cluster_processes
from ray_app.registry import ModelRegistry
from ray_app.runtime import unused_loopback_port

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from serving_load import APP_CONFIG, build_registry, request_bodies  # noqa: E402

API_KEY = "deploy-test-key"


def shipped_serve_applications() -> list[tuple[str, dict]]:
    """Every application in the Serve configs users deploy: cluster/serve/*.yaml and the
    RayService's serveConfigV2."""
    found = []
    for path in sorted(glob.glob(str(REPO_ROOT / "cluster" / "serve" / "*.yaml"))):
        with open(path) as f:
            found += [(os.path.basename(path), app) for app in yaml.safe_load(f)["applications"]]
    with open(REPO_ROOT / "cluster" / "kuberay" / "rayservice.yaml") as f:
        service = next(d for d in yaml.safe_load_all(f) if d and d.get("kind") == "RayService")
    found += [("rayservice.yaml", app) for app in yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]]
    return found


@pytest.mark.parametrize("source,app", shipped_serve_applications(), ids=lambda v: v if isinstance(v, str) else v["name"])
def test_shipped_serve_configs_build_through_serves_own_builder_call(source, app):
    """What ``serve deploy`` does with ``import_path`` + ``args`` (Serve's own call, no cluster):
    Serve accepts only a builder of exactly one parameter; a second one (even optional) failed every
    deploy of every shipped config with a TypeError in the controller."""
    built = call_user_app_builder_with_args_if_necessary(import_attr(app["import_path"]), app["args"])
    assert isinstance(built, Application), source


def app_config(models: str, port: int, pin: str | None = None) -> dict:
    """cluster/serve/app.yaml as shipped, narrowed to the image workload on one small replica."""
    with open(APP_CONFIG) as f:
        config = yaml.safe_load(f)
    config["http_options"]["port"] = port
    (app,) = config["applications"]
    app["args"]["models"] = models
    app["args"]["workloads"] = {"image": {**app["args"]["workloads"]["image"], "num_cpus": 0.5, "max_replicas": 1}}
    app["args"]["gateway"].update(max_replicas=1, api_key_sha256=[hashlib.sha256(API_KEY.encode()).hexdigest()])
    if pin:
        app["deployments"] = [{"name": "image-model", "user_config": {"model": pin}}]
    return config


def replica_pids(address: str) -> set[int]:
    """This cluster's replicas only: the main suite's Ray serves an app of the same name beside it."""
    return {p.pid for p in cluster_processes(address) if "ServeReplica:ray_app:image-model" in " ".join(_cmdline(p))}


def _cmdline(process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.NoSuchProcess:
        return []


@pytest.fixture(scope="module")
def deployed(shared_head, tmp_path_factory):
    """The app deployed on the session's shared head (tests/ray_head.py: token auth and HAProxy, as
    the cluster configs start Ray); Serve is shut down afterwards, the cluster stays."""
    folder = tmp_path_factory.mktemp("deploy")
    info = {**shared_head, "folder": folder}
    try:
        models = build_registry(str(folder / "registry"), "tiny", 16)["models"]
        ModelRegistry(models).register("image", str(folder / "registry" / "bundle"), {"run_name": "v2"}, alias="production")
        port = unused_loopback_port()
        info.update(models=models, port=port, url=f"http://127.0.0.1:{port}", bodies=request_bodies("tiny", 8))
        config = folder / "app.yaml"
        config.write_text(yaml.safe_dump(app_config(models, port)))
        run(info, "serve", "deploy", str(config), "--address", info["dashboard"])
        wait_for(lambda: healthy(info["url"]), "the deployed app's /healthz", limit_s=180)
        yield info
    finally:
        run(info, "serve", "shutdown", "-y", "--address", info["dashboard"])


def healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/healthz", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def post(info: dict, body: bytes, key: str | None = API_KEY) -> requests.Response:
    headers = {"Content-Type": "image/png", **({"Authorization": f"Bearer {key}"} if key else {})}
    return requests.post(f"{info['url']}/image/predict", data=body, headers=headers, timeout=30)


@pytest.mark.own_cluster
def test_serve_deploy_answers_through_haproxy_with_auth(deployed):
    answer = post(deployed, deployed["bodies"][0])
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == {"workload": "image", "version": 2}  # alias production -> 2
    assert len(answer.json()["predictions"]) == 3
    assert post(deployed, deployed["bodies"][0], key=None).status_code == 401
    assert post(deployed, deployed["bodies"][0], key="wrong").status_code == 403
    # HAProxy, not Serve's Python proxy, owns the HTTP port, and only on loopback (http_options.host).
    (listener,) = [c for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == deployed["port"]]
    assert psutil.Process(listener.pid).name() == "haproxy"
    assert listener.laddr.ip == "127.0.0.1"


@pytest.mark.own_cluster
def test_bad_body_gets_json_422_and_the_app_keeps_serving(deployed):
    answer = post(deployed, b"<html>not an image</html>")
    assert answer.status_code == 422
    assert "not an image" in answer.json()["error"]["message"]
    assert post(deployed, deployed["bodies"][1]).status_code == 200


@pytest.mark.own_cluster
def test_pinning_a_version_by_redeploy_reconfigures_in_place_with_zero_failures(deployed):
    """``deployments: [{name: image-model, user_config: {model: "1"}}]`` + ``serve deploy`` again, as
    the comment in app.yaml tells users: a lightweight update, no replica restart, no failed request."""
    before = replica_pids(deployed["address"])
    assert len(before) == 1
    answers: list[tuple[int, int | None]] = []
    stop = threading.Event()

    def client() -> None:
        session, n = requests.Session(), 0
        while not stop.is_set():
            body = deployed["bodies"][n % len(deployed["bodies"])]
            n += 1
            r = session.post(
                f"{deployed['url']}/image/predict",
                data=body,
                headers={"Content-Type": "image/png", "Authorization": f"Bearer {API_KEY}"},
                timeout=30,
            )
            answers.append((r.status_code, r.json().get("model", {}).get("version") if r.status_code == 200 else None))

    clients = [threading.Thread(target=client) for _ in range(2)]
    for t in clients:
        t.start()
    try:
        time.sleep(2)
        pinned = deployed["folder"] / "app_pinned.yaml"
        pinned.write_text(yaml.safe_dump(app_config(deployed["models"], deployed["port"], pin="1")))
        run(deployed, "serve", "deploy", str(pinned), "--address", deployed["dashboard"])
        wait_for(lambda: answers and answers[-1][1] == 1, "answers from the pinned version 1", limit_s=120)
        time.sleep(2)
    finally:
        stop.set()
        for t in clients:
            t.join(timeout=60)
    statuses = [status for status, _ in answers]
    assert statuses.count(200) == len(statuses) > 20, {s: statuses.count(s) for s in set(statuses)}
    versions = [v for _, v in answers]
    switches = [i for i in range(1, len(versions)) if versions[i] != versions[i - 1]]
    assert versions[0] == 2 and versions[-1] == 1
    # Two clients can interleave one old answer after the first new one, no more.
    assert len(switches) <= 3, versions
    assert replica_pids(deployed["address"]) == before, "the pin reconfigured the running replica; it did not replace it"
