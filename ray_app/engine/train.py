"""train: the one Ray Train loop for every workload — DDP over N workers, AMP on GPU, a checkpoint
every epoch (and every N steps if asked), resume by run name, survive worker deaths (FailureConfig).

Resume is checked before any worker starts: a checkpoint records the data fingerprint, the classes
and the options; a re-run that differs in any of them is refused (``--fresh`` or a new run name
starts over), and a run whose epochs are all done returns at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import tempfile
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from safetensors.torch import load_model

from ray_app import plots, storage, tracking
from ray_app.bundle import BUNDLE_FILE, WEIGHTS_FILE, save_bundle
from ray_app.config import AppConfig, TrainConfig, save_config
from ray_app.prepared import data_fingerprint, load_manifest, ok_uri, read_split, split_columns
from ray_app.progress import epoch_line
from ray_app.workloads import get_workload
from ray_app.workloads.base import DATA, MODEL, Workload

log = logging.getLogger(__name__)

TRAIN_STATE_FILE = "train_state.pt"
SUMMARY_FILE = "train_summary.json"
# Rows in the per-worker shuffle buffer, in batches: with rows already in a random order from
# prepare and block order randomised per epoch, this only has to mix neighbouring rows.
SHUFFLE_BUFFER_BATCHES = 8


class ResumeRefused(ValueError):
    """Re-running a run name whose checkpoint does not match the data, classes or options."""


def warmup_cosine(total_steps: int, warmup_steps: int):
    """LR multiplier: linear warm-up, then cosine decay to 10% — robust default for CNNs and fine-tuning."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: v.to(device, non_blocking=True) for k, v in value.items()}
    return value


class WorkloadCollate(NumpyBatchCollateFn):
    """Prepared numpy rows -> (model inputs, targets) through the workload's ``collate``; a
    ``ray.data.collate_fn`` class, the form Ray Data supports (a plain function is deprecated)."""

    def __init__(self, workload: Workload, options: Any, manifest: dict[str, Any]) -> None:
        self.workload, self.options, self.manifest = workload, options, manifest

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        return self.workload.collate(batch, self.options, self.manifest)


def training_dataset(data_uri: str, split: str, workload: Workload, seed: int) -> ray.data.Dataset:
    """One split as training reads it. Prepare already stores rows in a random (hash) order; the
    training split also gets its blocks in a new seeded order every epoch (each execution
    reseeds), so no epoch starts with the same files. Together with the per-worker local buffer
    this mixes classes from the first step without a full shuffle per epoch, which would move
    every row across the cluster each epoch."""
    dataset = read_split(data_uri, split, workload.training_columns)
    if split == "train":
        dataset = dataset.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True))
    return dataset


# Prepared data (Parquet bytes) that training reads once into the object store rather than per
# epoch: a share of the store small enough to leave room for everything else (decoded rows are
# larger than their Parquet files).
READ_ONCE_STORE_SHARE = 0.05
# How often the Train controller polls its workers (Ray's default: 2 s). A report and the end of a
# run are seen on a poll: with small epochs of 1-3 s, 2 s per poll would be a good part of a run.
CONTROLLER_POLL_INTERVAL_S = "0.2"


def reads_once(prepared_bytes: int, object_store_bytes: float) -> bool:
    """Whether training materializes the splits in the object store instead of streaming them."""
    return prepared_bytes <= READ_ONCE_STORE_SHARE * object_store_bytes


def splits_read_once(data_uri: str, workload: Workload, object_store_bytes: float) -> dict[str, ray.ObjectRef] | None:
    """The train and val splits read once for every epoch (and every Tune trial), as numpy columns
    in the object store, or None when they are too large for that: then each epoch streams them
    from Parquet. Each worker takes its share of the rows from the store itself (``rank_share``),
    so a run of small splits has no Ray Data pipeline of its own: no split-coordinator actors (a
    process each, ~1.2 s before the first step here). Each node fetches a whole split once (5% of
    the store at most) where streaming would send it only its ranks' shares. Streaming a small
    split every epoch also re-lists and re-reads its files in new read tasks."""
    prepared_bytes = sum(info.size for info in storage.list_files(ok_uri(data_uri)))
    if not reads_once(prepared_bytes, object_store_bytes):
        return None
    # Read here, not by a Ray Data pipeline: for a few MB, its planning and read tasks were most
    # of the time to the first step (~0.5 s a split).
    return {split: ray.put(split_columns(data_uri, split, workload.training_columns)) for split in ("train", "val")}


def rank_share(columns: dict[str, np.ndarray], rank: int, world_size: int) -> dict[str, np.ndarray]:
    """One rank's rows of a split held in memory: equal contiguous shares of the stored order
    (prepare writes rows in a random order), the remainder of an uneven split left out as Ray
    Data's equal split leaves it, so every rank runs the same number of steps and DDP's
    collectives line up."""
    rows = len(next(iter(columns.values()))) if columns else 0
    share = rows // world_size
    return {column: values[rank * share : (rank + 1) * share] for column, values in columns.items()}


def training_datasets(splits: dict[str, ray.ObjectRef] | None, data_uri: str, workload: Workload, seed: int) -> dict[str, ray.data.Dataset]:
    """The Ray Datasets a run streams: none when its splits are read once (the loop takes them from
    ``splits_in_memory``), else the splits themselves."""
    if splits is not None:
        return {}
    return {split: training_dataset(data_uri, split, workload, seed) for split in ("train", "val")}


def training_data_config(num_workers: int) -> DataConfig:
    """One worker iterates whole splits: no ``streaming_split``, so no coordinator actor per split."""
    return DataConfig(datasets_to_split="all" if num_workers > 1 else [])


def poll_workers_often() -> None:
    """Read by the next ``TorchTrainer`` and handed on to its controller (Train propagates this
    variable); set only where the caller's process is a driver of its own (CLI, job, trial)."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", CONTROLLER_POLL_INTERVAL_S)


def training_batches(shard: Any, collate: WorkloadCollate, batch_size: int, seed: int, epoch: int, training: bool):
    """Collated batches of one epoch from a Dataset or a worker's shard (the same call in the
    training loop and in the test that measures class mixing)."""
    return shard.iter_torch_batches(
        batch_size=batch_size,
        collate_fn=collate,
        local_shuffle_buffer_size=batch_size * SHUFFLE_BUFFER_BATCHES if training else None,
        local_shuffle_seed=seed + epoch if training else None,
        prefetch_batches=2,
    )


def in_memory_batches(
    columns: dict[str, np.ndarray], collate: WorkloadCollate, batch_size: int, seed: int, epoch: int, training: bool, rank: int
):
    """Collated batches of one epoch from a shard held in memory: a full shuffle of the rank's rows
    per training epoch (seeded by seed, epoch and rank: a resumed epoch sees the same order), the
    same number of batches as streaming it would give."""
    rows = len(next(iter(columns.values()))) if columns else 0
    order = np.random.default_rng([seed, epoch, rank]).permutation(rows) if training else np.arange(rows)
    for start in range(0, rows, batch_size):
        index = order[start : start + batch_size]
        yield collate({column: values[index] for column, values in columns.items()})


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch generator states, in types ``torch.load(weights_only=True)`` reads."""
    numpy_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    workload = get_workload(cfg["workload"])
    options = workload.parse_options(cfg["options"])
    manifest = cfg["manifest"]
    random.seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])

    model = workload.build_model(options, manifest)
    # epoch: epochs completed; rows_in_epoch: rows (all workers) of epoch + 1 already trained,
    # non-zero only in a checkpoint taken every N steps.
    state: dict[str, Any] = {"epoch": 0, "rows_in_epoch": 0, "step": 0, "history": [], "resumed_at": []}
    checkpoint = ray.train.get_checkpoint()
    train_state = None
    if checkpoint:
        with checkpoint.as_directory() as folder:
            load_model(model, os.path.join(folder, WEIGHTS_FILE))
            train_state = torch.load(os.path.join(folder, TRAIN_STATE_FILE), weights_only=True, map_location="cpu")
            with open(os.path.join(folder, BUNDLE_FILE)) as f:
                state = {"rows_in_epoch": 0, "step": 0, **json.load(f)["training"]}
        state["resumed_at"].append(state["epoch"] + 1)
        state.setdefault("resumed_from", []).append({"epoch": state["epoch"], "rows_in_epoch": state["rows_in_epoch"]})

    model = ray.train.torch.prepare_model(model)  # device placement + DDP when world_size > 1
    device = ray.train.torch.get_device()
    global_batch = cfg["batch_size"] * world_size
    steps_per_epoch = max(1, math.ceil(cfg["train_rows"] / global_batch))
    total_steps = steps_per_epoch * cfg["epochs"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, max(1, int(cfg["warmup_fraction"] * total_steps))))
    use_amp = device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16)
    if train_state:  # after prepare_model, so optimizer state lands on the model's device
        optimizer.load_state_dict(train_state["optimizer"])
        scheduler.load_state_dict(train_state["scheduler"])
        scaler.load_state_dict(train_state["scaler"])
        if "rng" in train_state:
            restore_rng_state(train_state["rng"])
    collate = WorkloadCollate(workload, options, manifest)
    every = cfg.get("checkpoint_every_steps") or 0
    # Splits small enough to be read once (``splits_read_once``) come from the object store, this
    # rank's share held in memory and shuffled there per epoch, as a DataLoader over in-memory rows
    # does: streaming them every epoch cost the Arrow -> numpy pipeline and its prefetch thread on
    # the cores training uses, and a Ray Data pipeline per run (BENCHMARKS.md, "Training
    # overhead"). Larger splits stream every epoch.
    refs = cfg.get("splits_in_memory")
    in_memory = {split: rank_share(ray.get(ref), rank, world_size) for split, ref in refs.items()} if refs else None

    def save_checkpoint(metrics: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if rank == 0:  # one writer; every rank still calls report
                core = model.module if hasattr(model, "module") else model
                save_bundle(
                    core,
                    folder,
                    {
                        "workload": cfg["workload"],
                        "options": cfg["options"],
                        "manifest": manifest,
                        "metrics": metrics,
                        "training": state,
                        "run_name": cfg["run_name"],
                        "data_fingerprint": cfg["data_fingerprint"],
                    },
                )
                torch.save(
                    {
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        # Ranks share one seed, so rank 0's generators stand for all of them.
                        "rng": rng_state(),
                    },
                    os.path.join(folder, TRAIN_STATE_FILE),
                )
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint)

    def run_epoch(split: str, epoch: int) -> dict[str, float]:
        training = split == "train"
        model.train(training)
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss·n, correct, n
        if in_memory is None:
            batches = training_batches(ray.train.get_dataset_shard(split), collate, cfg["batch_size"], cfg["seed"], epoch, training)
        else:
            batches = in_memory_batches(in_memory[split], collate, cfg["batch_size"], cfg["seed"], epoch, training, rank)
        # Mid-epoch resume: skip as many batches as the interrupted epoch had trained (counted in
        # rows, so a changed batch size or worker count skips the same share of the epoch).
        skip = state["rows_in_epoch"] // global_batch if training else 0
        with torch.set_grad_enabled(training):
            for index, (inputs, targets) in enumerate(batches):
                if index < skip:
                    continue
                inputs, targets = _to_device(inputs, device), targets.to(device, non_blocking=True)
                # autocast only where AMP runs: torch rejects device types it does not know (a TPU's).
                with torch.autocast(device.type, dtype=amp_dtype) if use_amp else contextlib.nullcontext():
                    logits = model(inputs)
                    loss = workload.loss(logits, targets)
                if training:
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                n = targets.shape[0]
                totals += torch.stack(
                    [
                        loss.detach().double() * n,
                        workload.correct(logits.detach(), targets).double(),
                        torch.tensor(float(n), dtype=torch.float64, device=device),
                    ]
                )
                if training:
                    state["step"] += 1
                    state["rows_in_epoch"] = (index + 1) * global_batch
                    if every and state["step"] % every == 0 and index + 1 < steps_per_epoch:
                        save_checkpoint({"epoch": epoch - 1, "step": state["step"], "partial_epoch": epoch})
        if training:
            state["rows_in_epoch"] = 0
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals)  # every rank sees global loss/accuracy, so reports agree
        loss_sum, correct, count = totals.tolist()
        return {f"{split}_loss": loss_sum / max(count, 1), f"{split}_accuracy": correct / max(count, 1), f"{split}_rows": int(count)}

    for epoch in range(state["epoch"] + 1, cfg["epochs"] + 1):
        started = time.perf_counter()
        metrics = {"epoch": epoch, **run_epoch("train", epoch)}
        train_seconds = time.perf_counter() - started
        metrics.update(run_epoch("val", epoch))
        metrics.update(
            epoch_seconds=round(time.perf_counter() - started, 3),
            train_samples_per_s=round(metrics["train_rows"] / train_seconds, 1),
            lr=scheduler.get_last_lr()[0],
        )
        state["epoch"] = epoch
        state["history"].append(metrics)
        save_checkpoint(metrics)
        if rank == 0:  # the driver shows this line (ray_app.progress), also when it hides other worker output
            print(epoch_line(epoch, cfg["epochs"], metrics, metrics["epoch_seconds"]), flush=True)


def _checkpoint_uri(runs_uri: str, checkpoint: ray.train.Checkpoint) -> str:
    if storage.is_remote(runs_uri):
        return f"{runs_uri.split('://', 1)[0]}://{checkpoint.path}"
    return checkpoint.path


def cpus_per_worker(requested: float | None, num_workers: int, cluster_cpus: float) -> float:
    """Workers reserve whole CPUs on real clusters; when the cluster as it stands has just enough
    CPUs for the workers (a laptop), reserving them all would leave Ray Data no CPU to read the
    shards and training would hang, so keep one CPU for the data pipeline."""
    if requested is not None:
        return requested
    if num_workers <= cluster_cpus < num_workers + 1:
        return max(0.25, (cluster_cpus - 1) / num_workers)
    return 1.0


def scaling_config_kwargs(train: TrainConfig, cluster_cpus: float) -> dict[str, Any]:
    """``ScalingConfig`` arguments for CPU, GPU or TPU training. On TPU, Ray Train reserves the
    slice (``topology`` + ``accelerator_type``) and torch's TPU backend binds each process to one
    chip, so each worker asks for one TPU and no CPU of its own (the TPU host's CPUs feed it)."""
    if train.use_tpu:
        if train.use_gpu:
            raise ValueError("--use-tpu and --use-gpu exclude each other")
        if train.num_workers > 1 and not (train.tpu_topology and train.tpu_accelerator_type):
            raise ValueError("--use-tpu with more than one worker needs --tpu-topology and --tpu-accelerator-type (e.g. 2x2x1, TPU-V4)")
        return {
            "num_workers": train.num_workers,
            "use_tpu": True,
            "topology": train.tpu_topology,
            "accelerator_type": train.tpu_accelerator_type,
            "resources_per_worker": {"TPU": 1},
        }
    return {
        "num_workers": train.num_workers,
        "use_gpu": train.use_gpu,
        "resources_per_worker": {
            "CPU": cpus_per_worker(train.cpus_per_worker, train.num_workers, cluster_cpus),
            **({"GPU": 1} if train.use_gpu else {}),
        },
    }


def latest_run_checkpoint(run_uri: str) -> tuple[str, dict[str, Any]] | None:
    """The run's most advanced checkpoint folder and its bundle description, or None. Read by
    the driver before any worker starts, so a mismatch or a finished run costs no Ray Train time."""
    if not storage.exists(run_uri):
        return None
    fs, root = storage.resolve(run_uri)
    root = root.rstrip("/")
    best: tuple[tuple[int, int], str, dict[str, Any]] | None = None
    for info in storage.list_files(run_uri):
        folder = info.path.rsplit("/", 1)[0]
        if info.base_name != BUNDLE_FILE or folder.rsplit("/", 1)[0] != root or not folder.rsplit("/", 1)[1].startswith("checkpoint_"):
            continue
        uri = f"{run_uri.split('://', 1)[0]}://{folder}" if storage.is_remote(run_uri) else folder
        bundle_info = storage.read_json(storage.join(uri, BUNDLE_FILE))
        training = bundle_info.get("training", {})
        progress = (training.get("epoch", 0), training.get("rows_in_epoch", 0))
        if best is None or progress > best[0]:
            best = (progress, uri, bundle_info)
    return None if best is None else (best[1], best[2])


def resume_differences(
    workload: Workload, checkpoint_info: dict[str, Any], fingerprint: str, manifest: dict[str, Any], options: Any
) -> list[str]:
    """What differs between a run's checkpoint and this train call: data, classes, options."""
    differences = []
    recorded_fingerprint = checkpoint_info.get("data_fingerprint")
    if recorded_fingerprint is not None and recorded_fingerprint != fingerprint:
        differences.append(f"prepared data changed (fingerprint {recorded_fingerprint[:12]} -> {fingerprint[:12]})")
    recorded_classes = checkpoint_info["manifest"]["classes"]
    if recorded_classes != manifest["classes"]:
        differences.append(f"classes {recorded_classes} -> {manifest['classes']}")
    recorded = workload.parse_options(checkpoint_info["options"])
    for name in workload.Options.model_fields:
        if workload.deciding_stages(name) in (DATA, MODEL) and getattr(recorded, name) != getattr(options, name):
            differences.append(f"--{name.replace('_', '-')} {getattr(recorded, name)!r} -> {getattr(options, name)!r}")
    return differences


def _set_aside(run_uri: str) -> str:
    """Move a run's folder aside (not deleted) so the same name can start from scratch."""
    aside = f"{run_uri}.replaced-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}"
    fs, path = storage.resolve(run_uri)
    try:
        fs.move(path, storage.resolve(aside)[1])  # a rename on local disks
    except (OSError, NotImplementedError):  # object stores: copy first, then remove the original
        storage.copy_dir(run_uri, aside)
        storage.delete_dir(run_uri)
    return aside


def _finish(config: AppConfig, checkpoint_uri: str, started: float, **extra: Any) -> dict[str, Any]:
    bundle_info = storage.read_json(storage.join(checkpoint_uri, BUNDLE_FILE))
    history = bundle_info["training"]["history"]
    summary = {
        "run_name": config.train.run_name,
        "checkpoint": checkpoint_uri,
        "metrics": bundle_info["metrics"],
        "epochs_completed": bundle_info["training"]["epoch"],
        "resumed_at": bundle_info["training"]["resumed_at"],
        "resumed_from": bundle_info["training"].get("resumed_from", []),
        "seconds": round(time.perf_counter() - started, 2),
        **extra,
    }
    run_uri = config.run_uri()
    storage.write_json(storage.join(run_uri, SUMMARY_FILE), summary)
    storage.write_json(storage.join(run_uri, "history.json"), history)
    storage.write_bytes(storage.join(run_uri, "curves.png"), plots.training_curves(history))
    return summary


def build_train_loop_config(config: AppConfig, options: Any, manifest: dict[str, Any], fingerprint: str) -> dict[str, Any]:
    """What ``train_loop_per_worker`` reads; tune starts from the same dict and overrides the
    searched keys, so a trial trains exactly as ``train`` would with those values."""
    t = config.train
    return {
        "workload": config.workload,
        "options": options.model_dump(),
        "manifest": manifest,
        "data_fingerprint": fingerprint,
        "train_rows": manifest["splits"]["train"],
        "run_name": t.run_name,
        **t.model_dump(include={"epochs", "batch_size", "lr", "weight_decay", "warmup_fraction", "seed", "checkpoint_every_steps"}),
    }


def run_train(config: AppConfig) -> dict[str, Any]:
    started = time.perf_counter()
    workload = get_workload(config.workload)
    data_uri = config.train_data_uri()
    manifest = load_manifest(data_uri)
    # Data-shaping options come from the prepared manifest; a contradicting flag is refused.
    options = workload.resolve_options("train", config.options, manifest.get("options"))
    t = config.train
    if manifest["splits"]["train"] == 0:
        raise ValueError(f"no training rows in {data_uri}")
    fingerprint = data_fingerprint(data_uri)
    run_uri = config.run_uri()
    aside = None
    existing = latest_run_checkpoint(run_uri)
    if existing and t.fresh:
        aside = _set_aside(run_uri)
        log.info("train: --fresh: run %r moved aside to %s until the new run completes", t.run_name, aside)
        existing = None
    if existing:
        checkpoint_uri, checkpoint_info = existing
        differences = resume_differences(workload, checkpoint_info, fingerprint, manifest, options)
        if differences:
            raise ResumeRefused(
                f"run {t.run_name!r} has a checkpoint ({checkpoint_uri}) that this train call cannot resume: "
                + "; ".join(differences)
                + ". Start over with --fresh (the old run is kept until the new one completes) or use a new --run-name."
            )
        training = checkpoint_info["training"]
        if training["epoch"] >= t.epochs and not training.get("rows_in_epoch"):
            log.info("train: run %r already completed %d epochs (asked %d); nothing to train", t.run_name, training["epoch"], t.epochs)
            return _finish(config, checkpoint_uri, started, already_complete=True, trained=False)
        log.info("train: resuming run %r after epoch %d (%s)", t.run_name, training["epoch"], checkpoint_uri)
    splits = None if t.stream_splits else splits_read_once(data_uri, workload, ray.cluster_resources().get("object_store_memory", 0))
    poll_workers_often()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**build_train_loop_config(config, options, manifest, fingerprint), "splits_in_memory": splits},
        scaling_config=ScalingConfig(**scaling_config_kwargs(t, ray.cluster_resources().get("CPU", 0))),
        run_config=RunConfig(
            name=t.run_name,
            storage_path=config.runs_uri(),
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets=training_datasets(splits, data_uri, workload, t.seed),
        dataset_config=training_data_config(t.num_workers),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training produced no checkpoint: {result.error}")
    summary = _finish(config, _checkpoint_uri(config.runs_uri(), result.checkpoint), started, trained=True)
    save_config(config, run_uri, "train")
    # After the run's own files are written: a tracking failure only adds a warning to the summary.
    summary["tracking"] = tracking.log_training(config, summary)
    if aside:  # the new run is complete: the one it replaces can go
        storage.delete_dir(aside)
    log.info("train: %s", summary)
    return summary


def latest_checkpoint_uri(config: AppConfig) -> str:
    summary_uri = storage.join(config.run_uri(), SUMMARY_FILE)
    if not storage.exists(summary_uri):
        raise FileNotFoundError(f"run {config.train.run_name!r} has no finished training under {config.run_uri()}")
    return storage.read_json(summary_uri)["checkpoint"]
