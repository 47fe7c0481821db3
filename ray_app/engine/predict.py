"""predict: batch inference over any number of inputs. The driver lists work items; a pool of
actors (model loaded once each, GPU when asked) decodes and scores them in batches; output streams
to Parquet, so memory is bounded by the batches in flight, not by the input size."""

from __future__ import annotations

import collections
import logging
import time
from typing import Any

import pyarrow.dataset as pads
import ray
from ray.data import SaveMode

from ray_app import storage
from ray_app.config import AppConfig, save_config
from ray_app.engine.guards import predict_inputs, refuse_overlapping_output
from ray_app.engine.scoring import BatchPredictor, stage_options
from ray_app.engine.warm import stateful_map
from ray_app.prepared import SUMMARY_FILE, count_rows, ok_uri, rejected_uri
from ray_app.registry import resolve_model_uri
from ray_app.workloads import get_workload

log = logging.getLogger(__name__)


def scored_dataset(
    items: ray.data.Dataset,
    model_uri: str,
    use_gpu: bool,
    top_k: int,
    batch_size: int,
    concurrency: int,
    options: dict[str, Any] | None = None,
    runtime: str = "torch",
    precision: str = "auto",
    rows: int | None = None,
) -> ray.data.Dataset:
    """Work items -> predictions (+ rejects), lazily; the model is loaded once per worker
    (``warm.stateful_map``: warm tasks for ``rows`` that make a few batches, else actors)."""
    constructor = {
        "bundle_uri": model_uri,
        "use_gpu": use_gpu,
        "top_k": top_k,
        "options": options,
        "runtime": runtime,
        "precision": precision,
    }
    return stateful_map(
        items,
        BatchPredictor,
        constructor,
        rows=rows,
        batch_size=batch_size,
        max_workers=concurrency,
        use_gpu=use_gpu,
        batch_format="numpy",
    )


def run_predict(config: AppConfig) -> dict[str, Any]:
    p = config.predict
    inputs = predict_inputs(config)
    # Before anything is read or written: publishing the output replaces what it names.
    refuse_overlapping_output("predict", config)
    workload = get_workload(config.workload)
    model_uri = resolve_model_uri(config.models_uri(), config.workload, p.model)
    # The model's own data options (size, channels, max length, transform); only per-run ones
    # such as --id-column may be given here, and a contradicting flag is refused.
    options = stage_options(config.workload, "predict", config.options, model_uri)
    output = config.predictions_uri()
    storage.refuse_overlap("predict", output, [model_uri])
    started = time.perf_counter()

    parts = [workload.read_predict_inputs(uri, options, p.batch_size) for uri in inputs]
    items = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    rows_in = workload.count_predict_inputs(items, inputs)
    if rows_in == 0:
        raise ValueError(f"nothing to predict under {p.input or p.input_list}")
    # The old predictions are replaced only once the new ones are complete (a failed run keeps them).
    with storage.publishing(output) as staging:
        scored = scored_dataset(
            items,
            model_uri,
            p.use_gpu,
            config.serve.top_k,
            p.batch_size,
            p.concurrency,
            options.model_dump(),
            p.runtime,
            p.onnx_precision,
            rows=rows_in,
        )
        scored.write_parquet(staging.uri, partition_cols=["status"], mode=SaveMode.OVERWRITE)
        rows_ok, rows_rejected = count_rows(ok_uri(staging.uri)), count_rows(rejected_uri(staging.uri))
        summary = {
            "input": p.input or p.input_list,
            "inputs": len(inputs),
            "output": output,
            "model": model_uri,
            "rows_in": rows_in,
            "rows_ok": rows_ok,
            "rows_rejected": rows_rejected,
            "label_counts": _label_counts(staging.uri),
            "seconds": round(time.perf_counter() - started, 2),
        }
        if rows_ok + rows_rejected != rows_in:
            raise RuntimeError(f"row accounting broken: {rows_in} in, {rows_ok} ok + {rows_rejected} rejected")
        storage.write_json(storage.join(staging.uri, SUMMARY_FILE), summary)
        save_config(config, staging.uri, "predict")
    log.info("predict: %s", summary)
    return summary


def _label_counts(output: str) -> dict[str, int]:
    if not storage.exists(ok_uri(output)):
        return {}
    fs, path = storage.resolve(ok_uri(output))
    labels = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["label"])["label"].to_pylist()
    return dict(sorted(collections.Counter(labels).items()))
