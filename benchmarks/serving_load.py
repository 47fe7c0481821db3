"""Serving load test: the real serving app (Gateway + ModelServer with @serve.batch, via
``build_app``) against a plain FastAPI + uvicorn server (1 worker, one decode + forward per
request, no batching) on the same bundle, the same request bodies and the same load generator.

Two image models, untrained (throughput needs real shapes, not trained weights), each in its own
temporary registry under alias ``production``:

* ``big``: 224×224×3 JPEGs into a SmallResNet widened to ResNet-18's compute (~1.8 G multiply-adds)
* ``tiny``: 28×28×1 PNGs into the default image model (width 16): HTTP overhead dominates

For each: a concurrency sweep (throughput, p50/p99, failures per point), then one model replica
killed mid-run at c=16 (the gateway should retry, so nothing fails).

``--fast-path`` runs Serve on its fast path (``ray_app.runtime.SERVE_FAST_PATH_ENV``: HAProxy ingress
straight to the gateway replicas, gRPC between deployments), as the cluster configs do; by default
Serve's Python proxy actor takes the HTTP port. ``--ab`` measures each case's Serve side again in
the other mode (a child process: a fresh Ray that inherits the variables at start).

On a GPU machine: ``--cpus 16 --replicas 4 --replica-cpus 2 --gateway-replicas 4`` (the model
replicas share the GPU, 1/replicas each).

Run: ``python benchmarks/serving_load.py [--cases big tiny] [--seconds 8] [--concurrency 1 4 16 32 64]``.
Writes benchmarks/results/serving_load_<case>.json and serving_load.png (every case found there).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import io
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import requests
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from load import closed_loop, have_wrk, wrk_closed_loop  # noqa: E402

from ray_app.runtime import SERVE_FAST_PATH_ENV  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
APP_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "cluster", "serve", "app.yaml")
APP_NAME, MODEL_DEPLOYMENT = "ray_app", "image-model"
RESNET18 = {"params": 11.69e6, "gmacs": 1.82}  # torchvision resnet18 at 224×224, for reference
CASES = {
    "big": {"image_size": 224, "channels": 3, "format": "JPEG", "title": "224×224×3 JPEG, ResNet-18-sized"},
    "tiny": {"image_size": 28, "channels": 1, "format": "PNG", "title": "28×28×1 PNG, tiny CNN (width 16)"},
}


# ---- models and inputs --------------------------------------------------------------------------
def model_size(model: Any, options: Any) -> dict[str, float]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, options.channels, options.image_size, options.image_size, dtype=torch.uint8)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    return {"params": sum(p.numel() for p in model.parameters()), "gmacs": counter.get_total_flops() / 2 / 1e9}


def build_registry(root: str, case: str, width: int) -> dict[str, Any]:
    """An untrained model saved as a bundle and registered as image version 1, alias production —
    the same registry layout ``ray-app image register`` writes."""
    import torch

    from ray_app.bundle import save_bundle
    from ray_app.registry import ModelRegistry
    from ray_app.workloads.image import ImageOptions, ImageWorkload

    spec = CASES[case]
    options = ImageOptions(image_size=spec["image_size"], channels=spec["channels"], width=width)
    manifest = {"classes": [str(i) for i in range(10)], "shape": [options.channels, options.image_size, options.image_size]}
    torch.manual_seed(0)
    model = ImageWorkload().build_model(options, manifest, pretrained=False).eval()
    size = model_size(model, options)
    bundle = os.path.join(root, "bundle")
    info = {"workload": "image", "options": options.model_dump(), "manifest": manifest, "metrics": {}, "training": {"untrained": True}}
    save_bundle(model, bundle, info)
    models = os.path.join(root, "models")
    ModelRegistry(models).register("image", bundle, {"run_name": f"serving-load-{case}"}, alias="production")
    return {"models": models, "options": options.model_dump(), **size}


def request_bodies(case: str, count: int = 64) -> list[bytes]:
    """Real MNIST digits, encoded the way clients would send them: 224×224 RGB JPEGs (tinted, with
    sensor noise so they do not compress to nothing) or 28×28 grayscale PNGs."""
    from ray_app.demos.data import load_mnist_5k

    spec = CASES[case]
    images = load_mnist_5k()[0][:count]
    rng = np.random.default_rng(0)
    bodies = []
    for image in images:
        img = Image.fromarray(image)
        if spec["image_size"] != 28:
            img = img.resize((spec["image_size"],) * 2, Image.Resampling.BILINEAR)
        if spec["channels"] == 3:
            grey = np.asarray(img, np.float32)[..., None]
            tint = rng.uniform(0.6, 1.0, size=3)
            rgb = grey * tint + rng.normal(0, 6, size=(*grey.shape[:2], 3))
            img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
        buffer = io.BytesIO()
        img.save(buffer, spec["format"], **({"quality": 90} if spec["format"] == "JPEG" else {}))
        bodies.append(buffer.getvalue())
    return bodies


# ---- the baseline server ----------------------------------------------------------------------
def baseline_main(models: str, port: int, key_digest: str, threads: int, device: str) -> None:
    """Plain FastAPI + uvicorn, 1 worker: read the body, decode, one forward pass, answer. The
    forward runs inline (requests are served one at a time; torch uses every core unless told),
    on the same device the Serve replicas use."""
    import torch
    import uvicorn

    from ray_app.bundle import load_bundle
    from ray_app.registry import resolve_model_uri
    from ray_app.workloads.base import BadInput

    if threads:
        torch.set_num_threads(threads)
    bundle = load_bundle(resolve_model_uri(models, "image", "production"), device)
    w = bundle.workload
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/image/predict")
    async def predict(request: Request) -> Any:
        key = request.headers.get("authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(hashlib.sha256(key.encode()).hexdigest(), key_digest):
            return JSONResponse(status_code=401, content={"error": "API key"})
        payload = await request.body()
        try:
            decoded = w.decode_request(payload, bundle.options, bundle.manifest)
        except BadInput as exc:
            return JSONResponse(status_code=422, content={"error": str(exc)})
        probabilities = bundle.predict_proba(w.stack_items([item for item, _ in decoded], bundle.options, bundle.manifest))
        answer = w.format_response(list(probabilities), [extras for _, extras in decoded], bundle.classes, 3)
        return {"model": {"workload": "image", "version": bundle.info.get("version")}, **answer}

    uvicorn.run(app, host="127.0.0.1", port=port, workers=1, log_level="warning", access_log=False)


def wait_http(url: str, timeout: float = 120) -> None:
    deadline, last = time.time() + timeout, ""
    while time.time() < deadline:
        try:
            answer = requests.get(url, timeout=5)
            if answer.status_code == 200:
                return
            last = f"{answer.status_code} {answer.text[:200]}"
        except requests.RequestException as exc:
            last = repr(exc)
        time.sleep(0.25)
    raise TimeoutError(f"{url} not ready after {timeout}s; last answer: {last}")


# ---- load -------------------------------------------------------------------------------------
class Load:
    def __init__(self, generator: str, bodies: list[bytes], content_type: str, api_key: str) -> None:
        self.generator, self.bodies, self.content_type = generator, bodies, content_type
        self.headers = {"Authorization": f"Bearer {api_key}"}

    def point(self, url: str, concurrency: int, seconds: float) -> dict[str, Any]:
        if self.generator == "wrk":
            return wrk_closed_loop(url, self.bodies, self.content_type, concurrency, seconds, self.headers)
        n = len(self.bodies)
        return closed_loop(url, lambda i: (self.bodies[i % n], self.content_type), concurrency, seconds, self.headers)

    def sweep(self, label: str, url: str, levels: list[int], seconds: float, warmup: float) -> list[dict[str, Any]]:
        if warmup:
            self.point(url, 4, warmup)
        rows = []
        for c in levels:
            row = self.point(url, c, seconds)
            rows.append(row)
            print(
                f"  {label:8s} c={c:3d}: {row['req_per_s']:8.1f} req/s  p50 {row['p50_ms']:8.1f} ms  p99 {row['p99_ms']:8.1f} ms  failed {row['failed']}"
            )
        return rows


# ---- Serve ------------------------------------------------------------------------------------
def app_args(args: argparse.Namespace, models: str, key_digest: str) -> dict[str, Any]:
    """cluster/serve/app.yaml's args with only the image workload: a fixed number of model replicas
    and gateway replicas (no autoscaling during a measurement). On CUDA the model replicas share
    the GPU (num_gpus 1/replicas each), which is what puts the model on the GPU."""
    with open(APP_CONFIG) as f:
        app = yaml.safe_load(f)["applications"][0]["args"]
    app["models"] = models
    n = args.replicas
    gpus = 1 / n if args.device == "cuda" else 0
    app["workloads"] = {
        "image": {**app["workloads"]["image"], "min_replicas": n, "max_replicas": n, "num_cpus": args.replica_cpus, "num_gpus": gpus}
    }
    g = args.gateway_replicas
    app["gateway"].update(min_replicas=g, max_replicas=g, api_key_sha256=[key_digest])
    return app


def running_replicas() -> int:
    from ray import serve

    deployment = serve.status().applications[APP_NAME].deployments[MODEL_DEPLOYMENT]
    return sum(n for state, n in deployment.replica_states.items() if str(state).endswith("RUNNING"))


def kill_one_replica() -> str:
    import ray

    prefix = f"SERVE_REPLICA::{APP_NAME}#{MODEL_DEPLOYMENT}#"
    found = sorted((a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))
    name, namespace = found[0]
    ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
    return name


def count_in_logs(text: str) -> int:
    """Lines mentioning ``text`` in this Ray session's Serve logs (the gateway's retry warnings)."""
    import ray

    logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    count = 0
    for folder, _, files in os.walk(logs):
        for name in files:
            if folder.endswith("serve") or name.startswith("worker-"):
                with open(os.path.join(folder, name), errors="replace") as f:
                    count += sum(text in line for line in f)
    return count


def replica_death(load: Load, url: str, concurrency: int, seconds: float, kill_after: float) -> dict[str, Any]:
    """A sweep point with one model replica killed (ray.kill, no restart by Ray: Serve's controller
    replaces it) ``kill_after`` seconds in."""
    import threading

    result: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: result.update(load.point(url, concurrency, seconds)))
    before = count_in_logs("replica lost during")
    worker.start()
    time.sleep(kill_after)
    killed_at = time.perf_counter()
    killed = kill_one_replica()
    worker.join()
    while running_replicas() < 2 and time.perf_counter() - killed_at < 120:
        time.sleep(0.25)
    result.update(
        killed=killed,
        replaced_after_s=time.perf_counter() - killed_at,
        gateway_retries_logged=count_in_logs("replica lost during") - before,
    )
    print(
        f"  replica death at c={concurrency}: {result['requests'] + result['failed']} requests, {result['failed']} failed, "
        f"{result['gateway_retries_logged']} gateway retries logged; replica replaced after {result['replaced_after_s']:.1f}s"
    )
    return result


def serve_run(args: argparse.Namespace, registry: dict[str, Any], load: Load, key_digest: str, levels: list[int]) -> dict[str, Any]:
    import ray
    from ray import serve

    from ray_app.runtime import unused_loopback_port
    from ray_app.serving.app import build_app

    os.environ.pop("RAY_ADDRESS", None)
    started = time.perf_counter()
    # address="local": never join another Ray instance running on this machine.
    ray.init(address="local", num_cpus=args.cpus, num_gpus=int(args.device == "cuda"), include_dashboard=False, log_to_driver=False)
    port = unused_loopback_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_args(args, registry["models"], key_digest)), name=APP_NAME, route_prefix="/")
    wait_http(f"http://127.0.0.1:{port}/healthz")
    out: dict[str, Any] = {"startup_s": time.perf_counter() - started}
    url = f"http://127.0.0.1:{port}/image/predict"
    try:
        out["sweep"] = load.sweep("serve", url, levels, args.seconds, args.warmup)
        if args.kill and args.replicas >= 2:
            out["replica_death"] = replica_death(load, url, 16, args.kill_seconds, args.kill_after)
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def baseline_run(
    args: argparse.Namespace, registry: dict[str, Any], load: Load, key_digest: str, levels: list[int]
) -> list[dict[str, Any]]:
    from ray_app.runtime import unused_loopback_port

    port = unused_loopback_port()
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--baseline-server",
        registry["models"],
        str(port),
        key_digest,
        str(args.baseline_threads),
        args.device,
    ]
    server = subprocess.Popen(command)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        return load.sweep("uvicorn", f"http://127.0.0.1:{port}/image/predict", levels, args.seconds, args.warmup)
    finally:
        server.terminate()
        server.wait(timeout=30)


def at(rows: list[dict[str, Any]], concurrency: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["concurrency"] == concurrency), None)


def run_case(args: argparse.Namespace, case: str, generator: str) -> dict[str, Any]:
    work = tempfile.mkdtemp(prefix=f"ray_app_serving_load_{case}_")
    registry = build_registry(work, case, args.big_width if case == "big" else 16)
    print(
        f"\n## {case}: {CASES[case]['title']}: {registry['params'] / 1e6:.2f} M params, {registry['gmacs']:.3f} G multiply-adds per image"
        + (f" (ResNet-18: {RESNET18['params'] / 1e6:.1f} M, {RESNET18['gmacs']:.2f} G)" if case == "big" else "")
    )
    bodies = request_bodies(case)
    api_key = secrets.token_urlsafe(16)
    key_digest = hashlib.sha256(api_key.encode()).hexdigest()
    load = Load(generator, bodies, "image/jpeg" if CASES[case]["format"] == "JPEG" else "image/png", api_key)
    result: dict[str, Any] = {
        "case": case,
        "title": CASES[case]["title"],
        "model": {k: registry[k] for k in ("params", "gmacs", "options")},
        "body_bytes_mean": float(np.mean([len(b) for b in bodies])),
        "serve_mode": serve_mode(),
    }
    if args.baseline:
        result["baseline"] = baseline_run(args, registry, load, key_digest, args.concurrency)
    result["serve"] = serve_run(args, registry, load, key_digest, args.concurrency)
    if args.baseline:
        serve_32, base_32 = at(result["serve"]["sweep"], 32), at(result["baseline"], 32)
        if serve_32 and base_32:
            result["ratio_c32"] = serve_32["req_per_s"] / base_32["req_per_s"]
            print(f"  Serve / uvicorn throughput at c=32: {result['ratio_c32']:.2f}x")
    return result


def serve_mode() -> str:
    return "fast" if all(os.environ.get(k) == v for k, v in SERVE_FAST_PATH_ENV.items()) else "default"


def serve_mode_ab(args: argparse.Namespace, case: str, first: dict[str, Any]) -> dict[str, Any]:
    """The case's Serve side again in the other serving mode, in a child process whose Ray
    inherits (or lacks) the fast-path variables from the start."""
    other = "default" if serve_mode() == "fast" else "fast"
    env = {k: v for k, v in os.environ.items() if k not in SERVE_FAST_PATH_ENV}
    if other == "fast":
        env.update(SERVE_FAST_PATH_ENV)
    out = os.path.join(tempfile.mkdtemp(prefix="ray_app_serving_ab_"), "other.json")
    command = [sys.executable, os.path.abspath(__file__), "--cases", case, "--no-baseline", "--no-ab", "--no-plot", "--json", out]
    command += ["--concurrency", *map(str, args.ab_concurrency), "--seconds", str(args.seconds), "--load-generator", args.load_generator]
    command += [
        "--replicas",
        str(args.replicas),
        "--replica-cpus",
        str(args.replica_cpus),
        "--gateway-replicas",
        str(args.gateway_replicas),
    ]
    command += ["--cpus", str(args.cpus), "--device", args.device, *([] if args.kill else ["--no-kill"])]
    print(f"\n## A/B: {case} case, Serve in its {other} mode")
    subprocess.run(command, check=True, env=env)
    with open(out) as f:
        measured = json.load(f)[case]["serve"]
    rows = []
    for c in args.ab_concurrency:
        a, b = at(first["serve"]["sweep"], c), at(measured["sweep"], c)
        if a and b:
            rows.append({"concurrency": c, "first": a, "other": b, "ratio": b["req_per_s"] / a["req_per_s"]})
            print(
                f"  c={c:3d}: {first['serve_mode']} {a['req_per_s']:7.1f} req/s p50 {a['p50_ms']:6.1f} ms | "
                f"{other} {b['req_per_s']:7.1f} req/s p50 {b['p50_ms']:6.1f} ms | {other}/{first['serve_mode']} {rows[-1]['ratio']:.2f}x"
            )
    return {"mode": other, "points": rows, "serve": measured}


# ---- output -----------------------------------------------------------------------------------
def plot(path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = []
    for case in CASES:
        file = os.path.join(RESULTS, f"serving_load_{case}.json")
        if os.path.exists(file):
            with open(file) as f:
                cases.append(json.load(f))
    if not cases:
        return
    fig, axes = plt.subplots(len(cases), 2, figsize=(11, 4 * len(cases)), squeeze=False)
    for row, r in zip(axes, cases, strict=True):
        series = [(f"Ray Serve, {r.get('serve_mode', 'default')} path", r["serve"]["sweep"], "tab:blue")]
        if "baseline" in r:
            series.append(("FastAPI + uvicorn (1 worker)", r["baseline"], "tab:orange"))
        if "serve_mode_ab" in r:
            series.append((f"Ray Serve, {r['serve_mode_ab']['mode']} path", r["serve_mode_ab"]["serve"]["sweep"], "tab:green"))
        for label, points, color in series:
            c = [p["concurrency"] for p in points]
            row[0].plot(c, [p["req_per_s"] for p in points], "o-", color=color, label=label)
            row[1].plot(c, [p["p50_ms"] for p in points], "o-", color=color, label=f"{label} p50")
            row[1].plot(c, [p["p99_ms"] for p in points], "s--", color=color, alpha=0.6, label=f"{label} p99")
        row[0].set(title=f"{r['title']}: throughput", xlabel="concurrent clients", ylabel="requests/s", xscale="log", ylim=(0, None))
        row[1].set(title="latency", xlabel="concurrent clients", ylabel="ms", xscale="log", yscale="log")
        levels = [p["concurrency"] for p in r["serve"]["sweep"]]
        for ax in row:
            ax.set_xticks(levels, [str(c) for c in levels])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _gpu_name(device: str) -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if device == "cuda" else None


def main() -> None:
    # allow_abbrev=False: with abbreviations on, a flag that is a prefix of another (``--ab`` of
    # ``--ab-concurrency``) is read as that other flag.
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    parser.add_argument("--seconds", type=float, default=8, help="per sweep point")
    parser.add_argument("--warmup", type=float, default=2, help="seconds at c=4 before each sweep, not measured")
    parser.add_argument("--big-width", type=int, default=104, help="SmallResNet width of the big model (104 ≈ ResNet-18's compute)")
    parser.add_argument("--cpus", type=int, default=2, help="num_cpus for ray.init")
    parser.add_argument("--replicas", type=int, default=2, help="model replicas (fixed: min = max)")
    parser.add_argument("--replica-cpus", type=float, default=0.5, help="num_cpus per model replica (gateway: 0.25)")
    parser.add_argument("--gateway-replicas", type=int, default=1)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when torch sees a GPU")
    parser.add_argument("--load-generator", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false")
    parser.add_argument("--no-kill", dest="kill", action="store_false", help="skip the replica-death run")
    parser.add_argument("--kill-seconds", type=float, default=10)
    parser.add_argument("--kill-after", type=float, default=4)
    parser.add_argument(
        "--fast-path", action="store_true", help="Serve on its fast path (HAProxy ingress, gRPC), as the cluster configs run it"
    )
    parser.add_argument(
        "--ab", action=argparse.BooleanOptionalAction, default=True, help="measure Serve in the other mode too (--no-ab: skip it)"
    )
    parser.add_argument("--ab-concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--no-plot", dest="plot", action="store_false")
    parser.add_argument("--json", help="write all results here instead of benchmarks/results/serving_load_<case>.json")
    parser.add_argument("--baseline-threads", type=int, default=0, help="torch threads in the uvicorn baseline (0: torch's default)")
    parser.add_argument("--baseline-server", nargs=5, metavar=("MODELS", "PORT", "KEY_SHA256", "THREADS", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_server:
        models, port, digest, threads, device = args.baseline_server
        baseline_main(models, int(port), digest, int(threads), device)
        return
    if args.fast_path:
        os.environ.update(SERVE_FAST_PATH_ENV)  # before any ray.init: every Ray process inherits it
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"

    generator = args.load_generator if args.load_generator != "auto" else ("wrk" if have_wrk() else "python")
    print(
        f"load generator: {generator} ({'wrk, 1 thread, keep-alive' if generator == 'wrk' else 'Python threads + requests'}); {os.cpu_count()} CPUs; device {args.device}"
    )
    results = {}
    for case in args.cases:
        r = run_case(args, case, generator)
        r.update(
            load_generator=generator,
            cpus=os.cpu_count(),
            seconds_per_point=args.seconds,
            replicas=args.replicas,
            replica_cpus=args.replica_cpus,
            gateway_replicas=args.gateway_replicas,
            device=args.device,
            gpu=_gpu_name(args.device),
            baseline_torch_threads=args.baseline_threads or "torch default",
        )
        if args.ab:
            r["serve_mode_ab"] = serve_mode_ab(args, case, r)
        results[case] = r
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        return
    os.makedirs(RESULTS, exist_ok=True)
    for case, r in results.items():
        with open(os.path.join(RESULTS, f"serving_load_{case}.json"), "w") as f:
            json.dump(r, f, indent=2)
    if args.plot:
        plot(os.path.join(RESULTS, "serving_load.png"))
        print(f"\nwrote {RESULTS}/serving_load_<case>.json and serving_load.png")


if __name__ == "__main__":
    main()
