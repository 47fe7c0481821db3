"""What a fresh model replica pays before its first answer, in a fresh process: importing the
serving code, loading the registered version (torch bundle or ONNX export), and decoding and
scoring one request; plus the process's peak RSS and whether torch/transformers got imported.

Run: ``python benchmarks/replica_footprint.py MODELS WORKLOAD RUNTIME PAYLOAD_FILE`` (prints one JSON
line). The serving benchmarks call it once per runtime, each in its own interpreter, so neither
measurement inherits the other's imports.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def rss_mb() -> float:
    """Resident memory now (the peak can come from a transient during Ray's own imports)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", help="the registry folder")
    parser.add_argument("workload")
    parser.add_argument("runtime", help="torch or onnx")
    parser.add_argument("payload_file", help="a request body to answer")
    args = parser.parse_args()
    models, workload, runtime, payload_file = args.models, args.workload, args.runtime, args.payload_file
    started = time.perf_counter()
    from ray_app.serving import model_server  # noqa: F401  (what a replica imports first)
    from ray_app.serving.loaders import RegistryLoader

    imported = time.perf_counter()
    loader = RegistryLoader(models, runtime=runtime)
    model = loader.load(workload, loader.resolve(workload, "production"), use_gpu=False)
    loaded = time.perf_counter()
    with open(payload_file, "rb") as f:
        payload = f.read()
    items = [item for item, _ in model.workload.decode_request(payload, model.options, model.manifest)]
    model.predict_proba(model.stack(items))
    answered = time.perf_counter()
    print(
        json.dumps(
            {
                "runtime": runtime,
                "device": str(model.device),
                "import_s": imported - started,
                "load_s": loaded - imported,
                "first_answer_s": answered - loaded,
                "total_s": answered - started,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "rss_mb": rss_mb(),
                "torch_imported": "torch" in sys.modules,
                "transformers_imported": "transformers" in sys.modules,
            }
        )
    )


def measure(models: str, workload: str, runtime: str, payload_file: str) -> dict:
    """Run this script in a fresh interpreter and return its measurements."""
    out = subprocess.run([sys.executable, __file__, models, workload, runtime, payload_file], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
