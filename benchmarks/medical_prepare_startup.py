"""Where a medical prepare's start-up goes, and what the actor pool's minimum size changes.

Run (in the Ray lock): ``python benchmarks/medical_prepare_startup.py [--folder F] [--variants 1:1024 2:1024 2:256]``.
On the 20k 224×224 DICOM set that ``benchmarks/medical_scale.py`` writes (default
``/tmp/ray_app_bench_medical/dicom-unique``), it runs a 2-worker DataLoader with the same
``decode_file``, then the engine's prepare step (listing, patient split, decode; drained) once per
variant ``<actor pool min size>:<rows per block>``, in one Ray instance. Per run: img/s overall
and in steady state, the ratio against the DataLoader, the driver's listing time, and when each
decode actor's constructor started and when its first batch arrived (seconds from the start),
seen through a subclass of the preparer that writes timestamps (nothing else changes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import ray

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from image_pipeline import consume  # noqa: E402  (sibling benchmark scripts)
from medical_scale import dataloader_prepare  # noqa: E402

from ray_app.workloads.image import ImageOptions, ImagePreparer, ImageWorkload  # noqa: E402

STAMPS = os.path.join(tempfile.gettempdir(), "ray_app_prepare_startup_stamps")


def _stamp(event: str) -> None:
    path = os.path.join(STAMPS, f"{event}-{os.getpid()}")  # one per actor process; the first write wins
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write(repr(time.time()))


class TimedPreparer(ImagePreparer):
    def __init__(self, *args, **kwargs) -> None:
        _stamp("actor_start")
        super().__init__(*args, **kwargs)

    def __call__(self, batch):
        _stamp("first_batch_in")
        return super().__call__(batch)


def run(folder: str, options: ImageOptions, min_size: int, block: int) -> dict:
    shutil.rmtree(STAMPS, ignore_errors=True)
    os.makedirs(STAMPS)
    wall, started = time.time(), time.perf_counter()
    inputs = ImageWorkload().read_prepare_inputs(folder, options, 0.1, 0.1, rows_per_block=block)
    listed = time.perf_counter() - started
    dataset = inputs.dataset.map_batches(
        TimedPreparer,
        fn_constructor_kwargs={"options": options.model_dump(), "manifest": inputs.manifest},
        batch_size=inputs.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=min_size, max_size=2),
    )
    result = consume(dataset, started)
    events: dict[str, list[float]] = {}
    for name in os.listdir(STAMPS):
        with open(os.path.join(STAMPS, name)) as f:
            events.setdefault(name.rsplit("-", 1)[0], []).append(round(float(f.read()) - wall, 2))
    return {**result, "listing_s": listed, "actors": {k: sorted(v) for k, v in events.items()}, "min_size": min_size, "block": block}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "ray_app_bench_medical", "dicom-unique"))
    parser.add_argument("--variants", nargs="+", default=["1:1024", "2:1024", "2:256", "1:1024", "2:1024"])
    parser.add_argument("--output", default="benchmarks/results/medical_prepare_startup.json")
    args = parser.parse_args()
    options = ImageOptions(image_size=224, channels=1, window=["file"])
    started = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results: dict = {"ray_init_s": time.perf_counter() - started, "runs": []}
    loader = dataloader_prepare(args.folder, options)
    results["dataloader"] = loader
    print(f"ray.init {results['ray_init_s']:.1f}s; DataLoader(2) {loader['images_per_s']:.0f} img/s ({loader['seconds']:.1f}s)")
    for variant in args.variants:
        min_size, block = (int(v) for v in variant.split(":"))
        r = run(args.folder, options, min_size, block)
        r["ratio"] = r["images_per_s"] / loader["images_per_s"]
        results["runs"].append(r)
        print(f"min_size {min_size} block {block}: {r['images_per_s']:.0f} img/s overall ({r['ratio']:.2f}x), steady "
              f"{r['steady_images_per_s']:.0f}; listing {r['listing_s']:.1f}s, actors start {r['actors'].get('actor_start')}, "
              f"first block out {r['first_batch_s']:.1f}s")  # fmt: skip
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)
    ray.shutdown()


if __name__ == "__main__":
    main()
