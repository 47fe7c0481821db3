"""Medical-scale benchmark: prepare (and batch predict) on 224×224 DICOM and PNG at 20k and 200k
images, against a 2-worker torch DataLoader doing the same decode.

Run: ``python benchmarks/medical_scale.py [--sizes 20000 200000] [--formats dicom png]
[--predict-at 20000]``, or ``make bench-medical``. Prints img/s overall and in steady state (start-up
— Ray Data planning, actor start, first block — shown apart), peak RSS of this process and its
children (Ray workers included), the ratio against the DataLoader, and the RSS growth from the
smallest to the largest size; writes benchmarks/results/medical_scale.json.

Disk: 20k unique files are written once per format (real MNIST digits upscaled to 224×224 with
sensor noise; DICOM as 12-bit CT in Hounsfield units with rescale and window); larger sizes are
hard links to them under other names, so 200k images cost no extra space. Prepare is drained
(every row decoded, validated and turned into Arrow, nothing written): the prepared output of
200k images would be ~10 GB of Parquet and measure the disk, not the pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import ray
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from image_pipeline import PeakMemory, consume  # noqa: E402  (sibling benchmark script)

from ray_app.bundle import save_bundle  # noqa: E402
from ray_app.demos.data import load_mnist_5k  # noqa: E402
from ray_app.demos.medical_data import DicomSpec, write_dicom  # noqa: E402
from ray_app.engine.predict import scored_dataset  # noqa: E402
from ray_app.engine.prepare import prepared_dataset  # noqa: E402
from ray_app.workloads.image import ImageOptions, ImageWorkload, decode_file  # noqa: E402

PREPARE_BATCH = 1024  # the engine's prepare block size
PREDICT_BATCH = 256
SIZE = 224


def write_unique(folder: str, fmt: str, count: int, seed: int = 0) -> list[str]:
    """``count`` distinct 224×224 files from real digits (shifted and noised so none repeat)."""
    images, labels = load_mnist_5k()
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        digit = images[i % len(images)]
        if i >= len(images):
            digit = np.roll(digit, shift=(i // len(images)) % 5 - 2, axis=1)
        big = np.asarray(Image.fromarray(digit).resize((SIZE, SIZE), Image.Resampling.BILINEAR), np.float32)
        noisy = np.clip(big + rng.normal(0, 6, big.shape), 0, 255).astype(np.uint8)
        sub = os.path.join(folder, str(labels[i % len(labels)]))
        os.makedirs(sub, exist_ok=True)
        if fmt == "png":
            path = os.path.join(sub, f"{i:06d}.png")
            Image.fromarray(noisy).save(path)
        else:
            path = os.path.join(sub, f"{i:06d}.dcm")
            spec = DicomSpec(patient_id=f"P{i // 4:06d}", bits=12, slope=1.0, intercept=-1024.0, window=(1023.5, 4095.0))
            write_dicom(path, noisy, spec)
        paths.append(path)
    return paths


def linked_set(unique: list[str], root: str, folder: str, count: int) -> str:
    """``count`` files under ``folder``: hard links to the unique ones, cycled, keeping class folders."""
    if os.path.isdir(folder) and sum(len(f) for _, _, f in os.walk(folder)) == count:
        return folder
    for i in range(count):
        source = unique[i % len(unique)]
        rel = os.path.relpath(source, root)
        target = os.path.join(folder, os.path.dirname(rel), f"{i:07d}{os.path.splitext(rel)[1]}")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.exists(target):
            os.link(source, target)
    return folder


class DecodeDataset(torch.utils.data.Dataset):
    """The baseline: the same decode (``decode_file``: PNG or DICOM, windowed) per file."""

    def __init__(self, paths: list[str], options: ImageOptions) -> None:
        self.paths, self.options = paths, options

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with open(self.paths[i], "rb") as f:
            return torch.from_numpy(decode_file(f.read(), self.options, self.paths[i])[0].copy())


def dataloader_prepare(folder: str, options: ImageOptions) -> dict[str, float]:
    started = time.perf_counter()
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files)  # listing counts, as it does for Ray
    loader = torch.utils.data.DataLoader(DecodeDataset(paths, options), batch_size=PREPARE_BATCH, num_workers=2)
    rows, first = 0, None
    with PeakMemory() as memory:
        for batch in loader:
            rows += len(batch)
            first = first or time.perf_counter()
    end = time.perf_counter()
    return {
        "rows": rows,
        "seconds": end - started,
        "first_batch_s": first - started,
        "images_per_s": rows / (end - started),
        "peak_rss_mb": memory.peak / 2**20,
    }


def ray_prepare(folder: str, options: ImageOptions) -> dict[str, float]:
    """The engine's prepare step (listing, patient split, decode), drained instead of written."""
    started = time.perf_counter()
    with PeakMemory() as memory:
        workload = ImageWorkload()
        inputs = workload.read_prepare_inputs(folder, options, 0.1, 0.1, rows_per_block=PREPARE_BATCH)
        listed = time.perf_counter() - started  # the driver's part of the start-up: listing, split, blocks
        result = consume(prepared_dataset(workload, inputs, options.model_dump(), concurrency=2), started)
    return {**result, "listing_s": listed, "peak_rss_mb": memory.peak / 2**20}


def projected_ratio(run: dict, images: int) -> float:
    """What the overall ratio becomes at ``images`` if start-up stays fixed and both sides keep
    their rates (a projection from this run, printed as such; the 200k run measures it)."""
    ray_run, loader = run["ray_prepare"], run["dataloader_prepare"]
    ray_seconds = ray_run["first_batch_s"] + images / ray_run["steady_images_per_s"]
    return (images / ray_seconds) / loader["images_per_s"]


def ray_predict(folder: str, bundle: str, options: ImageOptions) -> dict[str, float]:
    started = time.perf_counter()
    with PeakMemory() as memory:
        items = ImageWorkload().read_predict_inputs(folder, options, PREDICT_BATCH)
        result = consume(scored_dataset(items, bundle, use_gpu=False, top_k=3, batch_size=PREDICT_BATCH, concurrency=2), started)
    return {**result, "peak_rss_mb": memory.peak / 2**20}


def make_bundle(folder: str, options: ImageOptions) -> str:
    manifest = {"classes": [str(i) for i in range(10)], "shape": [options.channels, SIZE, SIZE]}
    torch.manual_seed(0)
    model = ImageWorkload().build_model(options, manifest)
    save_bundle(model, folder, {"workload": "image", "options": options.model_dump(), "manifest": manifest, "metrics": {}, "training": {}})
    return folder


def line(name: str, v: dict) -> str:
    steady = f"  steady {v['steady_images_per_s']:7.1f}/s" if "steady_images_per_s" in v else ""
    return (f"  {name:22s} {v['images_per_s']:7.1f} img/s over {v['seconds']:7.1f}s  (start-up/first block {v['first_batch_s']:5.1f}s)"
            f"{steady}  peak RSS {v['peak_rss_mb']:6.0f} MB")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000, 200000])
    parser.add_argument("--formats", nargs="+", default=["dicom", "png"], choices=["dicom", "png"])
    parser.add_argument("--unique", type=int, default=20000, help="distinct files per format; larger sizes hard-link them")
    parser.add_argument("--predict-at", type=int, nargs="*", default=[20000], help="sizes at which batch predict also runs")
    parser.add_argument("--work", default=None, help="folder for the generated files (kept between runs)")
    parser.add_argument("--output", default="benchmarks/results/medical_scale.json")
    parser.add_argument("--skip-dataloader-at", type=int, nargs="*", default=[], help="sizes where the DataLoader baseline is skipped")
    args = parser.parse_args()
    work = args.work or os.path.join(tempfile.gettempdir(), "ray_app_bench_medical")
    options = {"dicom": ImageOptions(image_size=SIZE, channels=1, window=["file"]), "png": ImageOptions(image_size=SIZE, channels=1)}

    started = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results: dict = {"ray_init_s": time.perf_counter() - started, "runs": []}
    print(f"ray.init {results['ray_init_s']:.1f}s")
    for fmt in args.formats:
        unique_root = os.path.join(work, f"{fmt}-unique")
        marker = os.path.join(work, f"{fmt}-unique.done")
        if not os.path.exists(marker) or int(open(marker).read()) != args.unique:
            t = time.perf_counter()
            write_unique(unique_root, fmt, args.unique)
            with open(marker, "w") as f:
                f.write(str(args.unique))
            print(f"wrote {args.unique} unique {fmt} files in {time.perf_counter() - t:.0f}s")
        unique = sorted(os.path.join(d, f) for d, _, files in os.walk(unique_root) for f in files)
        bundle = make_bundle(os.path.join(work, f"bundle-{fmt}"), options[fmt])
        for size in args.sizes:
            folder = unique_root if size == len(unique) else linked_set(unique, unique_root, os.path.join(work, f"{fmt}-{size}"), size)
            run: dict = {"format": fmt, "images": size}
            print(f"\n## {fmt} 224x224, {size} images")
            if size not in args.skip_dataloader_at:
                run["dataloader_prepare"] = dataloader_prepare(folder, options[fmt])
                print(line("DataLoader(2) decode", run["dataloader_prepare"]))
            run["ray_prepare"] = ray_prepare(folder, options[fmt])
            print(line("Ray Data prepare", run["ray_prepare"]))
            if "dataloader_prepare" in run:
                base = run["dataloader_prepare"]["images_per_s"]
                run["prepare_ratio"] = run["ray_prepare"]["images_per_s"] / base
                run["prepare_ratio_steady"] = run["ray_prepare"]["steady_images_per_s"] / base
                print(
                    f"  prepare ratio vs DataLoader: {run['prepare_ratio']:.2f}x overall, {run['prepare_ratio_steady']:.2f}x steady state"
                )
                if size < 200_000:
                    run["prepare_ratio_projected_200k"] = projected_ratio(run, 200_000)
                    print(f"  projected to 200k images (same start-up and rates): {run['prepare_ratio_projected_200k']:.2f}x overall")
            if size in args.predict_at:
                run["ray_predict"] = ray_predict(folder, bundle, options[fmt])
                print(line("Ray Data predict", run["ray_predict"]))
            results["runs"].append(run)
        sized = [r for r in results["runs"] if r["format"] == fmt]
        if len(sized) > 1:
            growth = sized[-1]["ray_prepare"]["peak_rss_mb"] / sized[0]["ray_prepare"]["peak_rss_mb"]
            results.setdefault("rss_growth", {})[fmt] = growth
            print(f"\n{fmt}: prepare peak RSS {sized[0]['images']} -> {sized[-1]['images']} images: {growth:.2f}x (target <= 1.2x)")
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)
    ray.shutdown()


if __name__ == "__main__":
    main()
