"""train: the one Ray Train loop for every workload — DDP over N workers, AMP on GPU, a checkpoint
every epoch, resume by run name, survive worker deaths (FailureConfig).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from safetensors.torch import load_model

from ray_app import plots, storage
from ray_app.bundle import BUNDLE_FILE, WEIGHTS_FILE, save_bundle
from ray_app.config import AppConfig, TrainConfig, save_config
from ray_app.prepared import load_manifest, read_split
from ray_app.progress import epoch_line
from ray_app.workloads import get_workload

log = logging.getLogger(__name__)

TRAIN_STATE_FILE = "train_state.pt"
SUMMARY_FILE = "train_summary.json"


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


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    workload = get_workload(cfg["workload"])
    options = workload.parse_options(cfg["options"])
    manifest = cfg["manifest"]
    torch.manual_seed(cfg["seed"])

    model = workload.build_model(options, manifest)
    state: dict[str, Any] = {"epoch": 0, "history": [], "resumed_at": []}
    checkpoint = ray.train.get_checkpoint()
    train_state = None
    if checkpoint:
        with checkpoint.as_directory() as folder:
            load_model(model, os.path.join(folder, WEIGHTS_FILE))
            train_state = torch.load(os.path.join(folder, TRAIN_STATE_FILE), weights_only=True, map_location="cpu")
            with open(os.path.join(folder, BUNDLE_FILE)) as f:
                state = json.load(f)["training"]
        state["resumed_at"].append(state["epoch"] + 1)

    model = ray.train.torch.prepare_model(model)  # device placement + DDP when world_size > 1
    device = ray.train.torch.get_device()
    steps_per_epoch = max(1, math.ceil(cfg["train_rows"] / (cfg["batch_size"] * world_size)))
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

    def run_epoch(split: str, epoch: int) -> dict[str, float]:
        training = split == "train"
        model.train(training)
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss·n, correct, n
        batches = ray.train.get_dataset_shard(split).iter_torch_batches(
            batch_size=cfg["batch_size"],
            collate_fn=lambda batch: workload.collate(batch, options, manifest),
            local_shuffle_buffer_size=cfg["batch_size"] * 8 if training else None,
            local_shuffle_seed=cfg["seed"] + epoch if training else None,
            prefetch_batches=2,
        )
        with torch.set_grad_enabled(training):
            for inputs, targets in batches:
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
                    },
                )
                torch.save(
                    {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()},
                    os.path.join(folder, TRAIN_STATE_FILE),
                )
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint)
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


def run_train(config: AppConfig) -> dict[str, Any]:
    workload = get_workload(config.workload)
    options = workload.parse_options(config.options)
    data_uri = config.train_data_uri()
    manifest = load_manifest(data_uri)
    t = config.train
    if manifest["splits"]["train"] == 0:
        raise ValueError(f"no training rows in {data_uri}")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "workload": config.workload,
            "options": options.model_dump(),
            "manifest": manifest,
            "train_rows": manifest["splits"]["train"],
            "run_name": t.run_name,
            **t.model_dump(include={"epochs", "batch_size", "lr", "weight_decay", "warmup_fraction", "seed"}),
        },
        scaling_config=ScalingConfig(**scaling_config_kwargs(t, ray.cluster_resources().get("CPU", 0))),
        run_config=RunConfig(
            name=t.run_name,
            storage_path=config.runs_uri(),
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={
            "train": read_split(data_uri, "train", workload.training_columns),
            "val": read_split(data_uri, "val", workload.training_columns),
        },
    )
    started = time.perf_counter()
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training produced no checkpoint: {result.error}")
    checkpoint_uri = _checkpoint_uri(config.runs_uri(), result.checkpoint)
    bundle_info = storage.read_json(storage.join(checkpoint_uri, BUNDLE_FILE))
    history = bundle_info["training"]["history"]
    summary = {
        "run_name": t.run_name,
        "checkpoint": checkpoint_uri,
        "metrics": bundle_info["metrics"],
        "epochs_completed": bundle_info["training"]["epoch"],
        "resumed_at": bundle_info["training"]["resumed_at"],
        "seconds": round(time.perf_counter() - started, 2),
    }
    run_uri = config.run_uri()
    storage.write_json(storage.join(run_uri, SUMMARY_FILE), summary)
    storage.write_json(storage.join(run_uri, "history.json"), history)
    storage.write_bytes(storage.join(run_uri, "curves.png"), plots.training_curves(history))
    save_config(config, run_uri, "train")
    log.info("train: %s", summary)
    return summary


def latest_checkpoint_uri(config: AppConfig) -> str:
    summary_uri = storage.join(config.run_uri(), SUMMARY_FILE)
    if not storage.exists(summary_uri):
        raise FileNotFoundError(f"run {config.train.run_name!r} has no finished training under {config.run_uri()}")
    return storage.read_json(summary_uri)["checkpoint"]
