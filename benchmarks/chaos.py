"""Fault suite for the serving app (``make chaos``): steady load on the real app (Gateway + one
``ModelServer`` per workload, ``cluster/serve/app.yaml``'s settings sized for this machine), one
fault injected per phase, and a table of requests sent, failed and p99 during each fault:

* a model replica SIGKILLed under load (the gateway retries on another replica);
* a poison request: a body whose decoding kills the replica that runs it (what running out of
  memory looks like from outside) — sent twice while normal traffic flows;
* a gateway replica SIGKILLed (two gateway replicas; the proxy routes around the dead one);
* the Serve controller killed and restarted by Ray (the data plane keeps serving);
* an alias rollout (a new version registered as ``production`` mid-load; replicas swap in place);
* a canary rollback: a second app serves the image model with a canary release of a candidate
  whose forward pass raises; its failures are answered by the stable version until the release
  judge rolls it back on its error rate (``ray_app.serving.release``);
* scale from zero under a burst (the click model, ``min_replicas: 0``, idle until the burst).

Models are untrained (the serving path is under test, not what they learned): the image workload's
real architecture at 28×28, and the click model's, registered in a temporary registry.

Run: ``python benchmarks/chaos.py [--seconds 8] [--concurrency 8]``; about 3 minutes on 2 cores.
Writes benchmarks/results/chaos.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
from typing import Any

import psutil
import requests
import yaml

sys.path.insert(0, os.path.dirname(__file__))
from load import closed_loop  # noqa: E402
from serving_load import APP_CONFIG, build_registry, request_bodies, wait_http  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
APP = "ray_app"
POISON_MARKER = b"chaos-poison"  # a PNG carrying this text chunk kills the replica decoding it
CLICK_MANIFEST = {
    "classes": ["no_click", "click"],
    "transform": {"numeric_columns": ["age"], "categorical_columns": ["user"], "buckets": 16, "means": [0.0], "stds": [1.0]},
}


def poison_image(body: bytes) -> bytes:
    """A valid PNG with the marker in a trailing text chunk (after IEND is enough for a substring test)."""
    return body + POISON_MARKER


class PoisonLoader:
    """The registry loader, except that the image workload's decoding kills its process on the
    marker. The replica dies the way an out-of-memory kill ends it: no exception, the process is gone."""

    def __init__(self, models: str) -> None:
        self.models = models

    def resolve(self, workload: str, ref: str) -> str:
        from ray_app.serving.loaders import RegistryLoader

        return RegistryLoader(self.models).resolve(workload, ref)

    def load(self, workload: str, resolved: str, use_gpu: bool):
        from ray_app.serving.loaders import RegistryLoader
        from ray_app.workloads.image import ImageWorkload

        bundle = RegistryLoader(self.models).load(workload, resolved, use_gpu)

        class Poisonable(ImageWorkload):
            def decode_request(self, payload, options, manifest, max_items=None):
                if POISON_MARKER in payload:
                    time.sleep(0.2)  # some work first, as a decode that runs out of memory does
                    os._exit(137)
                return super().decode_request(payload, options, manifest, max_items=max_items)

        bundle.workload = Poisonable()
        return bundle


class BrokenVersionLoader:
    """The registry loader, except that one version's forward pass raises: a release candidate
    that loads, takes traffic and fails every request it gets."""

    def __init__(self, models: str, broken_version: int) -> None:
        self.models, self.broken_version = models, broken_version

    def resolve(self, workload: str, ref: str) -> str:
        from ray_app.serving.loaders import RegistryLoader

        return RegistryLoader(self.models).resolve(workload, ref)

    def load(self, workload: str, resolved: str, use_gpu: bool):
        from ray_app.serving.loaders import RegistryLoader

        bundle = RegistryLoader(self.models).load(workload, resolved, use_gpu)
        if bundle.info.get("version") == self.broken_version:

            def broken_forward(inputs):
                raise RuntimeError("chaos: broken candidate")

            bundle.predict_proba = broken_forward
        return bundle


def canary_args(models: str, key_digest: str, candidate: int) -> dict[str, Any]:
    """One gateway, the image model and a candidate at 30% of the traffic, judged over 30 s with
    at least 20 candidate requests (a broken candidate is rolled back as soon as it has 20)."""
    small = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0}
    release = {"candidate": str(candidate), "traffic_percent": 30, "window_s": 30, "min_requests": 20, "report_interval_s": 0.25}
    return {
        "models": models,
        "gateway": {**small, "api_key_sha256": [key_digest]},
        "workloads": {"image": {**small, "alias_poll_s": 0.5, "release": release}},
    }


def click_registry(models: str, root: str) -> None:
    import torch

    from ray_app.bundle import save_bundle
    from ray_app.registry import ModelRegistry
    from ray_app.workloads import get_workload

    workload = get_workload("ctr")
    options = workload.parse_options({"numeric_columns": ["age"], "categorical_columns": ["user"], "buckets": 16})
    torch.manual_seed(0)
    model = workload.build_model(options, CLICK_MANIFEST, pretrained=False).eval()
    bundle = os.path.join(root, "ctr-bundle")
    save_bundle(model, bundle, {"workload": "ctr", "options": options.model_dump(mode="json"), "manifest": CLICK_MANIFEST, "metrics": {}})
    ModelRegistry(models).register("ctr", bundle, {"run_name": "chaos"}, alias="production")


def app_args(models: str, key_digest: str) -> dict[str, Any]:
    with open(APP_CONFIG) as f:
        args = yaml.safe_load(f)["applications"][0]["args"]
    args["models"] = models
    args["gateway"].update(min_replicas=2, max_replicas=2, num_cpus=0, api_key_sha256=[key_digest])
    image = {**args["workloads"]["image"], "min_replicas": 2, "max_replicas": 2, "num_cpus": 0.5, "alias_poll_s": 0.5}
    click = {**args["workloads"].get("ctr", {}), "min_replicas": 0, "max_replicas": 1, "num_cpus": 0.5, "downscale_delay_s": 2}
    args["workloads"] = {"image": image, "ctr": click}
    return args


def replica_pids(deployment: str) -> list[int]:
    marker = f"ServeReplica:{APP}:{deployment}"
    return sorted(p.pid for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or []))


def wait_until(condition, limit_s: float = 120) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > limit_s:
            raise TimeoutError(f"not reached after {limit_s} s")
        time.sleep(0.25)
    return time.monotonic() - started


def under_load(url: str, bodies: list[bytes], headers: dict, concurrency: int, seconds: float, fault, fault_at: float) -> dict[str, Any]:
    """Closed-loop load for ``seconds``; ``fault()`` runs ``fault_at`` seconds in."""
    result: dict[str, Any] = {}
    load = threading.Thread(
        target=lambda: result.update(closed_loop(url, lambda i: (bodies[i % len(bodies)], "image/png"), concurrency, seconds, headers))
    )
    load.start()
    time.sleep(fault_at)
    note = fault()
    load.join()
    return {**result, "note": note}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--seconds", type=float, default=8, help="load per fault")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()

    import ray
    from ray import serve

    from ray_app.registry import ModelRegistry
    from ray_app.runtime import unused_loopback_port
    from ray_app.serving.app import compose_app

    root = tempfile.mkdtemp(prefix="chaos-")
    registry = build_registry(root, "tiny", 16)
    models = registry["models"]
    click_registry(models, root)
    api_key = secrets.token_urlsafe(16)
    headers = {"Authorization": f"Bearer {api_key}"}
    bodies = request_bodies("tiny", 32)

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = unused_loopback_port()
    base = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = app_args(models, hashlib.sha256(api_key.encode()).hexdigest())
    serve.run(compose_app(settings, loaders={"image": PoisonLoader(models)}), name=APP, route_prefix="/")
    wait_http(f"{base}/readyz")
    url = f"{base}/image/predict"
    closed_loop(url, lambda i: (bodies[i % len(bodies)], "image/png"), args.concurrency, 2, headers)  # warm-up
    rows: list[dict[str, Any]] = []

    def phase(name: str, fault, fault_at: float | None = None) -> None:
        wait_until(lambda: len(replica_pids("image-model")) == 2 and len(replica_pids("Gateway")) == 2)
        row = {"fault": name, **under_load(url, bodies, headers, args.concurrency, args.seconds, fault, fault_at or args.seconds / 3)}
        rows.append(row)
        print(f"  {name}: {row['requests'] + row['failed']} sent, {row['failed']} failed, p99 {row['p99_ms']:.0f} ms; {row['note']}")

    def kill_model_replica() -> str:
        os.kill(replica_pids("image-model")[0], signal.SIGKILL)
        return "SIGKILL one of 2 image-model replicas"

    def poison() -> str:
        statuses = []
        for _ in range(2):
            before = set(replica_pids("image-model"))
            answer = requests.post(url, data=poison_image(bodies[0]), headers={**headers, "Content-Type": "image/png"}, timeout=60)
            died = len(before - set(replica_pids("image-model")))
            statuses.append(f"{answer.status_code} ({died} replica(s) died)")
            time.sleep(1)
        return "poison request twice: " + ", ".join(statuses)

    def kill_gateway() -> str:
        os.kill(replica_pids("Gateway")[0], signal.SIGKILL)
        return "SIGKILL one of 2 gateway replicas"

    def restart_controller() -> str:
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        ray.kill(ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE), no_restart=False)
        return "Serve controller killed (Ray restarts it)"

    def rollout() -> str:
        version = ModelRegistry(models).register("image", os.path.join(root, "bundle"), {"run_name": "chaos-v2"}, alias="production")
        return f"alias production -> version {version}"

    phase("model replica SIGKILL", kill_model_replica)
    phase("poison request", poison)
    phase("gateway replica SIGKILL", kill_gateway)
    phase("Serve controller restart", restart_controller)
    phase("alias rollout", rollout)

    # Canary rollback: its own app (a release changes the gateway's and model's arguments, which
    # would restart the main app's deployments); the candidate is a new version that raises.
    candidate = ModelRegistry(models).register("image", os.path.join(root, "bundle"), {"run_name": "chaos-broken"})
    key_digest = hashlib.sha256(api_key.encode()).hexdigest()
    canary_app = compose_app(canary_args(models, key_digest, candidate), loaders={"image": BrokenVersionLoader(models, candidate)})
    serve.run(canary_app, name="canary", route_prefix="/canary")
    wait_http(f"{base}/canary/readyz")
    canary_url, started = f"{base}/canary/image/predict", time.monotonic()
    rolled_back: dict[str, Any] = {}

    def watch_release() -> None:
        while time.monotonic() - started < args.seconds * 2 and not rolled_back:
            state = requests.get(f"{base}/canary/image/release", headers=headers, timeout=10).json()
            if state.get("phase") == "rolled_back":
                rolled_back.update(state, after_s=time.monotonic() - started)
            time.sleep(0.1)

    watcher = threading.Thread(target=watch_release)
    watcher.start()
    row = closed_loop(canary_url, lambda i: (bodies[i % len(bodies)], "image/png"), args.concurrency, args.seconds * 2, headers)
    watcher.join()
    note = (
        f"candidate v{candidate} raises; rolled back after {rolled_back['after_s']:.1f} s "
        f"({rolled_back['totals']['candidate']['requests']} candidate requests, all answered by stable), "
        f"alias production still -> {ModelRegistry(models).aliases('image')['production']}"
        if rolled_back
        else f"candidate v{candidate} raises; NOT rolled back within {args.seconds * 2:g} s"
    )
    rows.append({"fault": "canary rollback", **row, "note": note})
    print(f"  canary rollback: {row['requests'] + row['failed']} sent, {row['failed']} failed, p99 {row['p99_ms']:.0f} ms; {note}")
    serve.delete("canary")

    # Scale from zero: the click model idles at zero replicas; then a burst of concurrent events.
    click_url, event = f"{base}/ctr/predict", json.dumps({"age": 31, "user": "u7"}).encode()
    wait_until(lambda: not replica_pids("ctr-model"), limit_s=180)
    burst = closed_loop(click_url, lambda i: (event, "application/json"), 16, 6, headers)
    rows.append({"fault": "scale from zero under a burst", **burst, "note": "ctr-model at 0 replicas, 16 concurrent clients for 6 s"})
    print(f"  scale from zero: {burst['requests'] + burst['failed']} sent, {burst['failed']} failed, p99 {burst['p99_ms']:.0f} ms")
    serve.shutdown()
    ray.shutdown()

    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "chaos.json"), "w") as f:
        json.dump(rows, f, indent=2)
    print("\n| fault | requests sent | failed | p99 ms | what happened |\n|---|---:|---:|---:|---|")
    for row in rows:
        sent = row["requests"] + row["failed"] if "requests" in row else "-"
        p99 = f"{row['p99_ms']:.0f}" if "p99_ms" in row else "-"
        print(f"| {row['fault']} | {sent} | {row.get('failed', '-')} | {p99} | {row['note']} |")


if __name__ == "__main__":
    main()
