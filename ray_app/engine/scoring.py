"""Ray Data actors that hold a loaded model: built once per actor, then fed batches. Shared by
evaluate (prepared rows) and predict (raw items)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel

from ray_app import storage
from ray_app.bundle import BUNDLE_FILE, load_bundle
from ray_app.workloads import get_workload
from ray_app.workloads.base import STATUS_OK, STATUS_REJECTED, OptionConflict


def pick_device(use_gpu: bool) -> str:
    return "cuda" if use_gpu and torch.cuda.is_available() else "cpu"


def stage_options(workload_name: str, stage: str, given: dict[str, Any], model_uri: str) -> BaseModel:
    """The options evaluate, predict or serve run a model with: those recorded in its bundle,
    plus the per-run options the stage honours. A given option that contradicts the bundle is
    refused (``OptionConflict``) before any work starts."""
    recorded = storage.read_json(storage.join(model_uri, BUNDLE_FILE))["options"]
    return get_workload(workload_name).resolve_options(stage, given, recorded)


def refuse_other_data_shape(workload_name: str, prepared_options: dict[str, Any], model_uri: str) -> None:
    """Scoring prepared rows (evaluate) needs them shaped as the model's training data was."""
    workload = get_workload(workload_name)
    prepared = workload.parse_options(prepared_options)
    model = workload.parse_options(storage.read_json(storage.join(model_uri, BUNDLE_FILE))["options"])
    differences = [
        f"--{name.replace('_', '-')} {getattr(prepared, name)!r} (data) vs {getattr(model, name)!r} (model)"
        for name in workload.data_options()
        if getattr(prepared, name) != getattr(model, name)
    ]
    if differences:
        raise OptionConflict(
            f"{workload_name} evaluate: the prepared data and {model_uri} were prepared differently: {'; '.join(differences)}"
        )


class PreparedRowScorer:
    """Scores already-prepared rows (evaluate): returns true label + class probabilities."""

    def __init__(self, bundle_uri: str, use_gpu: bool = False) -> None:
        self.bundle = load_bundle(bundle_uri, pick_device(use_gpu))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        b = self.bundle
        inputs, targets = b.workload.collate(batch, b.options, b.manifest)
        scored = {"label": targets.numpy(), "probabilities": b.predict_proba(inputs)}
        group = b.workload.group_column
        if group and group in batch:  # e.g. the patient: evaluation resamples whole patients
            scored["group"] = np.asarray([g if g is not None else "" for g in batch[group]], dtype=object)
        if "split" in batch:  # several splits scored in one pass (evaluate: test + validation)
            scored["split"] = batch["split"]
        return scored


class BatchPredictor:
    """Decodes raw items and predicts (batch inference). Bad items become rejects with a reason."""

    def __init__(
        self,
        bundle_uri: str,
        use_gpu: bool = False,
        top_k: int = 3,
        options: dict[str, Any] | None = None,
        runtime: str = "torch",
        precision: str = "auto",
    ) -> None:
        from ray_app.onnx_runtime import load_for_runtime

        # runtime onnx: the version's ONNX export on CPU actors (predict.runtime), as serving does.
        self.bundle = load_for_runtime(bundle_uri, use_gpu, runtime, precision)  # type: ignore[arg-type]
        self.top_k = min(top_k, len(self.bundle.classes))
        # The bundle's options with predict's own per-run ones (e.g. --id-column) applied.
        self.options = self.bundle.workload.parse_options(options) if options is not None else self.bundle.options

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        b = self.bundle
        items, ids, reasons = b.workload.load_predict_batch(batch, self.options, b.manifest)
        good = [i for i, reason in enumerate(reasons) if reason is None]
        probabilities = b.predict_proba(b.stack([items[i] for i in good])) if good else None
        rows: dict[str, list[Any]] = {
            "label": [None] * len(ids),
            "probability": [None] * len(ids),
            "top_labels": [None] * len(ids),
            "top_probabilities": [None] * len(ids),
        }
        if probabilities is not None:
            order = np.argsort(-probabilities, axis=1)[:, : self.top_k]
            for row, i in enumerate(good):
                rows["label"][i] = b.classes[order[row, 0]]
                rows["probability"][i] = float(probabilities[row, order[row, 0]])
                rows["top_labels"][i] = [b.classes[c] for c in order[row]]
                rows["top_probabilities"][i] = [float(probabilities[row, c]) for c in order[row]]
        # Multi-label findings at or above their thresholds; asked on an empty array too, so every
        # batch of one run has the same columns even when all its rows are rejects.
        findings = b.workload.predicted_sets(np.zeros((0, len(b.classes))) if probabilities is None else probabilities)
        extra: dict[str, Any] = {}
        if findings is not None:
            column: list[Any] = [None] * len(ids)
            for row, i in enumerate(good[: len(findings)]):
                column[i] = findings[row]
            extra["findings"] = pa.array(column, pa.list_(pa.string()))
        return pa.table(
            {
                b.workload.id_column: ids,
                "label": pa.array(rows["label"], pa.string()),
                "probability": pa.array(rows["probability"], pa.float64()),
                "top_labels": pa.array(rows["top_labels"], pa.list_(pa.string())),
                "top_probabilities": pa.array(rows["top_probabilities"], pa.list_(pa.float64())),
                "model_version": [str(b.info.get("version", b.info.get("run_name", "")))] * len(ids),
                "status": [STATUS_OK if r is None else STATUS_REJECTED for r in reasons],
                "reject_reason": pa.array(reasons, pa.string()),
                **extra,
            }
        )
