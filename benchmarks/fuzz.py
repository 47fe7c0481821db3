"""Schema fuzzing of the serving app at scale (``make fuzz``; outside the test suite's time).

Starts the real app (``cluster/serve/app.yaml``'s gateway + image, text and click model deployments
on small untrained models) and runs the Schemathesis CLI against its OpenAPI schema: every phase
(examples, coverage, fuzzing, stateful) in positive and negative modes, thousands of cases, with
the checks that matter here: no 5xx, and every answer conforms to the schema. Prints the counts.

Run: ``python benchmarks/fuzz.py [--max-examples 300] [--max-time 600]``.
Writes benchmarks/results/fuzz.json (counts) and benchmarks/results/fuzz/ (Schemathesis reports).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from chaos import APP, app_args, click_registry  # noqa: E402
from serving_load import build_registry, wait_http  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TEXT_OPTIONS = {"max_length": 64}
TEXT_MANIFEST = {"classes": ["fresh", "rotten"], "split_fractions": [0.1, 0.1], "max_length": 64, "model_dir": None}


def text_registry(models: str, root: str) -> None:
    import torch

    from ray_app.bundle import save_bundle
    from ray_app.registry import ModelRegistry
    from ray_app.workloads import get_workload

    workload = get_workload("text")
    options = workload.parse_options(TEXT_OPTIONS)
    torch.manual_seed(0)
    model = workload.build_model(options, TEXT_MANIFEST, pretrained=False).eval()
    bundle = os.path.join(root, "text-bundle")
    save_bundle(model, bundle, {"workload": "text", "options": options.model_dump(mode="json"), "manifest": TEXT_MANIFEST, "metrics": {}})
    ModelRegistry(models).register("text", bundle, {"run_name": "fuzz"}, alias="production")


def count_events(ndjson: str) -> dict[str, object]:
    """Cases, responses by status class and failures, from Schemathesis' event stream."""
    statuses: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    phases: collections.Counter[str] = collections.Counter()
    with open(ndjson) as f:
        for line in f:
            event = json.loads(line)
            for name, body in event.items():
                if name != "ScenarioFinished":
                    continue
                phase = body.get("phase", "?")
                for case in (body.get("recorder") or {}).get("interactions", {}).values():
                    response = case.get("response") or {}
                    code = response.get("status_code")
                    phases[phase] += 1
                    statuses[f"{code // 100}xx" if isinstance(code, int) else "no response"] += 1
                for check in (body.get("recorder") or {}).get("checks", {}).values():
                    for result in check:
                        if str(result.get("status")).lower().endswith("failure"):
                            failures.append(result.get("name", "?"))
    return {
        "requests": sum(statuses.values()),
        "by_status": dict(statuses),
        "by_phase": dict(phases),
        "check_failures": dict(collections.Counter(failures)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--max-examples", type=int, default=300, help="per operation and phase")
    parser.add_argument("--max-time", type=int, default=600, help="seconds for the whole Schemathesis run")
    args = parser.parse_args()

    import ray
    from ray import serve

    from ray_app.runtime import unused_loopback_port
    from ray_app.serving.app import build_app

    root = tempfile.mkdtemp(prefix="fuzz-")
    models = build_registry(root, "tiny", 16)["models"]
    click_registry(models, root)
    text_registry(models, root)
    api_key = secrets.token_urlsafe(16)
    settings = app_args(models, hashlib.sha256(api_key.encode()).hexdigest())
    settings["workloads"]["text"] = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.25}
    settings["workloads"]["ctr"].update(min_replicas=1)
    settings["workloads"]["image"].update(min_replicas=1, max_replicas=1)

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = unused_loopback_port()
    base = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(settings), name=APP, route_prefix="/")
    wait_http(f"{base}/readyz")
    reports = os.path.join(RESULTS, "fuzz")
    shutil.rmtree(reports, ignore_errors=True)
    command = [
        os.path.join(os.path.dirname(sys.executable), "schemathesis"),
        "run",
        f"{base}/openapi.json",
        "--mode",
        "all",
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--max-examples",
        str(args.max_examples),
        "--max-time",
        str(args.max_time),
        "--checks",
        "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        "--continue-on-failure",
        "--request-timeout",
        "30",
        "--seed",
        "1",
        "--report",
        "ndjson,junit",
        "--report-dir",
        reports,
        "-H",
        f"Authorization: Bearer {api_key}",
        "--output-sanitize",
        "true",
    ]
    started = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    serve.shutdown()
    ray.shutdown()
    print(run.stdout[-6000:].replace(api_key, "<key>"))
    ndjson = (
        next((os.path.join(reports, n) for n in os.listdir(reports) if n.endswith(".ndjson")), None) if os.path.isdir(reports) else None
    )
    counts = {"seconds": round(seconds, 1), "exit_code": run.returncode, **(count_events(ndjson) if ndjson else {})}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "fuzz.json"), "w") as f:
        json.dump(counts, f, indent=2)
    print(json.dumps(counts, indent=2))


if __name__ == "__main__":
    main()
