"""prepare: raw inputs -> Parquet shards of training-ready rows, with rejects kept, never dropped.

One streaming Ray Data pass: the driver only lists inputs; actors decode batches; a single
``write_parquet(partition_cols=["status"])`` puts good rows under ``status=ok/`` and rejects
(path + reason) under ``status=rejected/``. Memory stays bounded however many inputs there are.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any

import pyarrow.compute as pc
import pyarrow.dataset as pads
import ray
from ray.data import SaveMode

from ray_app import storage
from ray_app.config import AppConfig, save_config
from ray_app.engine.guards import refuse_overlapping_output
from ray_app.engine.warm import stateful_map
from ray_app.prepared import MANIFEST_FILE, STATUS_REJECTED, SUMMARY_FILE, count_rows, ok_uri, rejected_uri
from ray_app.workloads import get_workload
from ray_app.workloads.base import PrepareInputs, Workload

log = logging.getLogger(__name__)


def prepared_dataset(workload: Workload, inputs: PrepareInputs, options: dict[str, Any], concurrency: int) -> ray.data.Dataset:
    """The decode/validate step as a lazy Ray Dataset: state (tokenizers, filesystems) is built
    once per worker (``warm.stateful_map``). Large inputs run on an actor pool (in a measured A/B
    on 224×224 PNGs it decoded 1.5x faster in steady state than the same function as plain
    tasks); a small input runs as tasks in already-started workers, where there is no start-up."""
    return stateful_map(
        inputs.dataset,
        workload.preparer_class,
        {"options": options, "manifest": inputs.manifest},
        rows=inputs.rows_in,
        batch_size=inputs.batch_size,
        max_workers=concurrency,
        batch_format="numpy",
    )


def run_prepare(config: AppConfig) -> dict[str, Any]:
    if not config.prepare.input:
        raise ValueError("prepare needs --input: the raw data URI")
    workload = get_workload(config.workload)
    # Data-shaping options are decided here and recorded in the manifest; a model option is refused.
    options = workload.resolve_options("prepare", config.options, None)
    output = config.prepared_uri()
    refuse_overlapping_output("prepare", config)
    started = time.perf_counter()

    inputs = workload.read_prepare_inputs(
        config.prepare.input, options, config.prepare.val_fraction, config.prepare.test_fraction, config.prepare.rows_per_block
    )
    if inputs.rows_in == 0:
        raise ValueError(f"no input found under {config.prepare.input}")
    mapped = prepared_dataset(workload, inputs, options.model_dump(), config.prepare.concurrency)
    # A re-run replaces earlier output, never appends to it, and only once the new one is complete:
    # a failed or killed run leaves the previous prepared data as it was.
    with storage.publishing(output) as staging:
        summary = _write_prepared(config, workload, inputs, options, mapped, staging.uri, output, started)
    log.info("prepare: %s", summary)
    return summary


def _write_prepared(
    config: AppConfig,
    workload: Workload,
    inputs: PrepareInputs,
    options: Any,
    mapped: ray.data.Dataset,
    staged: str,
    output: str,
    started: float,
) -> dict[str, Any]:
    """Everything prepare writes, into the staging location ``staged``; ``output`` is where it
    will be published (and what the summary names)."""
    mapped.write_parquet(staged, partition_cols=["status"], mode=SaveMode.OVERWRITE)
    rows_ok = count_rows(ok_uri(staged))
    rows_rejected = count_rows(rejected_uri(staged))
    reasons = _reject_reasons(staged)
    manifest = workload.finalize_manifest(staged, {**inputs.manifest, "workload": config.workload, "options": options.model_dump()})
    manifest["splits"] = {split: count_rows(ok_uri(staged), pc.field("split") == split) for split in ("train", "val", "test")}
    summary = {
        "input": config.prepare.input,
        "output": output,
        "rows_in": inputs.rows_in,
        "rows_ok": rows_ok,
        "rows_rejected": rows_rejected,
        "reject_reasons": reasons,
        "rejects": storage.join(output, f"status={STATUS_REJECTED}"),
        "splits": manifest["splits"],
        "seconds": round(time.perf_counter() - started, 2),
    }
    if rows_ok + rows_rejected != inputs.rows_in:
        # Losing rows silently is the one thing prepare must never do.
        raise RuntimeError(f"row accounting broken: {inputs.rows_in} in, {rows_ok} ok + {rows_rejected} rejected")
    storage.write_json(storage.join(staged, MANIFEST_FILE), manifest)
    storage.write_json(storage.join(staged, SUMMARY_FILE), summary)
    save_config(config, staged, "prepare")
    return summary


def _reject_reasons(output: str) -> dict[str, int]:
    uri = rejected_uri(output)
    if not storage.exists(uri):
        return {}
    fs, path = storage.resolve(uri)
    reasons = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["reject_reason"])
    # Group by the reason's first clause so "corrupt: <detail>" variants count together.
    return dict(collections.Counter(r.split(":")[0] for r in reasons["reject_reason"].to_pylist()))
