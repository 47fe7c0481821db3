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
from ray_app.engine.prepare import count_rows, ok_uri, rejected_uri
from ray_app.engine.scoring import BatchPredictor
from ray_app.registry import resolve_model_uri
from ray_app.workloads import get_workload

log = logging.getLogger(__name__)


def run_predict(config: AppConfig) -> dict[str, Any]:
    p = config.predict
    if not p.input:
        raise ValueError("predict needs --input: the items to score")
    workload = get_workload(config.workload)
    options = workload.parse_options(config.options)
    model_uri = resolve_model_uri(config.models_uri(), config.workload, p.model)
    output = config.predictions_uri()
    started = time.perf_counter()

    items = workload.list_predict_inputs(p.input, options)
    if items.num_rows == 0:
        raise ValueError(f"nothing to predict under {p.input}")
    blocks = [items.slice(i, p.batch_size) for i in range(0, items.num_rows, p.batch_size)]
    storage.delete_dir(output)
    (
        ray.data.from_arrow(blocks)
        .map_batches(
            BatchPredictor,
            fn_constructor_kwargs={"bundle_uri": model_uri, "use_gpu": p.use_gpu, "top_k": config.serve.top_k},
            batch_size=p.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=p.concurrency),
            num_gpus=1 if p.use_gpu else None,
        )
        .write_parquet(output, partition_cols=["status"], mode=SaveMode.OVERWRITE)
    )
    rows_ok, rows_rejected = count_rows(ok_uri(output)), count_rows(rejected_uri(output))
    summary = {
        "input": p.input,
        "output": output,
        "model": model_uri,
        "rows_in": items.num_rows,
        "rows_ok": rows_ok,
        "rows_rejected": rows_rejected,
        "label_counts": _label_counts(output),
        "seconds": round(time.perf_counter() - started, 2),
    }
    if rows_ok + rows_rejected != items.num_rows:
        raise RuntimeError(f"row accounting broken: {items.num_rows} in, {rows_ok} ok + {rows_rejected} rejected")
    storage.write_json(storage.join(output, "summary.json"), summary)
    save_config(config, output, "predict")
    log.info("predict: %s", summary)
    return summary


def _label_counts(output: str) -> dict[str, int]:
    if not storage.exists(ok_uri(output)):
        return {}
    fs, path = storage.resolve(ok_uri(output))
    labels = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["label"])["label"].to_pylist()
    return dict(sorted(collections.Counter(labels).items()))
