"""The one small interface that differs per workload. The engine (prepare, train, evaluate,
predict, serve) is written once against it; a new workload is one new file implementing it.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa
from pydantic import BaseModel

from ray_app import storage
from ray_app.prepared import STATUS_OK, STATUS_REJECTED  # noqa: F401  (re-exported: workloads emit them)

if TYPE_CHECKING:
    import ray.data
    import torch


class BadInput(ValueError):
    """An input that cannot be used; the message is the reason written to rejects or the 4xx body."""


@dataclass
class PrepareInputs:
    """What prepare maps over: a dataset of work items, the rows they stand for, dataset facts."""

    dataset: ray.data.Dataset
    rows_in: int
    manifest: dict[str, Any]  # saved next to the prepared data (class names, shapes, ...)
    batch_size: int  # work items per preparer call


def arrow_blocks(table: pa.Table, rows_per_block: int) -> ray.data.Dataset:
    """A driver-side listing as a dataset of fixed-size blocks: one task or actor call per block,
    instead of Ray's per-file read tasks (per-row overhead is what dominates on small inputs)."""
    import ray.data

    return ray.data.from_arrow([table.slice(i, rows_per_block) for i in range(0, table.num_rows, rows_per_block)] or [table])


def assign_split(key: str, val_fraction: float, test_fraction: float) -> str:
    """Stable split from a hash of the item's key: the same file lands in the same split on every
    run and machine, so evaluation never sees training rows."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64
    if h < test_fraction:
        return "test"
    if h < test_fraction + val_fraction:
        return "val"
    return "train"


def read_table(uri: str) -> ray.data.Dataset:
    """CSV, Parquet or JSON Lines (file or folder), chosen by extension."""
    import ray.data

    uri = storage.normalize(uri)
    names = [info.path for info in storage.list_files(uri)]
    extensions = {os.path.splitext(n.removesuffix(".gz").removesuffix(".bz2"))[1].lower() for n in names}
    if extensions <= {".parquet"}:
        return ray.data.read_parquet(uri)
    if extensions <= {".csv"}:
        return ray.data.read_csv(uri)
    if extensions <= {".jsonl", ".json"}:
        return ray.data.read_json(uri, lines=True)
    raise ValueError(f"{uri}: expected .csv, .parquet or .jsonl files, found {sorted(extensions)}")


class Workload(ABC):
    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]]
    training_columns: ClassVar[list[str]]  # prepared columns the training loop reads
    id_column: ClassVar[str] = "id"  # names the input in prediction output (e.g. "path")
    # A class ``(options: dict, manifest: dict)`` whose instances map a numpy batch to a pa.Table of
    # prepared columns + status + reject_reason. It runs as a Ray Data actor pool, built once per
    # actor, so expensive state (a tokenizer) loads once, not per batch.
    preparer_class: ClassVar[type]
    # Config defaults that suit this workload ({"train.lr": ...}); YAML and CLI still override them.
    default_config: ClassVar[dict[str, Any]] = {}

    def parse_options(self, options: dict[str, Any]) -> BaseModel:
        return self.Options.model_validate(options)

    # ---- prepare -------------------------------------------------------------------------
    @abstractmethod
    def read_prepare_inputs(
        self, input_uri: str, options: BaseModel, val_fraction: float, test_fraction: float, rows_per_block: int
    ) -> PrepareInputs:
        """Raw inputs as a dataset of work items (files listed cheaply in the driver, or a table read)."""

    def finalize_manifest(self, prepared_uri: str, manifest: dict[str, Any]) -> dict[str, Any]:
        """Add facts learned from the prepared data (e.g. normalisation statistics)."""
        return manifest

    # ---- train ---------------------------------------------------------------------------
    @abstractmethod
    def build_model(self, options: BaseModel, manifest: dict[str, Any], pretrained: bool = True) -> torch.nn.Module:
        """A model whose forward takes what ``collate``/``stack_items`` return and gives logits.
        ``pretrained=False`` skips loading base weights that a checkpoint will overwrite anyway."""

    @abstractmethod
    def collate(self, batch: dict[str, np.ndarray], options: BaseModel, manifest: dict[str, Any]) -> tuple[Any, torch.Tensor | None]:
        """Prepared rows -> (model inputs, targets or None)."""

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.nn.functional.cross_entropy(logits, targets)

    def correct(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Count of right answers in a batch, summed across workers for accuracy."""
        return (logits.argmax(dim=1) == targets).sum()

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.softmax(logits.float(), dim=1)

    # ---- evaluate ------------------------------------------------------------------------
    def evaluation_report(
        self, labels: np.ndarray, probabilities: np.ndarray, classes: list[str]
    ) -> tuple[dict[str, Any], dict[str, bytes]]:
        """Metrics for the held-out split, and plots by file name (default: classification)."""
        from ray_app.plots import confusion_matrix
        from ray_app.workloads.classification import classification_report

        report = classification_report(labels, probabilities, classes)
        return report, {"confusion_matrix.png": confusion_matrix(report["confusion_matrix"], classes)}

    def evaluation_extras(self, prepared_uri: str, options: BaseModel, manifest: dict[str, Any]) -> dict[str, Any]:
        """Extra report entries computed in the same run, e.g. a baseline to beat."""
        return {}

    # ---- predict -------------------------------------------------------------------------
    @abstractmethod
    def read_predict_inputs(self, input_uri: str, options: BaseModel, batch_size: int) -> ray.data.Dataset:
        """Work items for batch prediction (e.g. one row per file)."""

    @abstractmethod
    def load_predict_batch(
        self, batch: dict[str, np.ndarray], options: BaseModel, manifest: dict[str, Any]
    ) -> tuple[list[Any], list[str], list[str | None]]:
        """Work items -> (decoded items, ids, reject reasons — None where the item is good)."""

    @abstractmethod
    def stack_items(self, items: list[Any], options: BaseModel, manifest: dict[str, Any]) -> Any:
        """Decoded items -> model inputs for one forward pass."""

    # ---- serve ---------------------------------------------------------------------------
    @abstractmethod
    def decode_request(self, payload: bytes, options: BaseModel, manifest: dict[str, Any]) -> list[tuple[Any, dict[str, Any]]]:
        """An HTTP body -> [(decoded item, per-item response extras)]; raises BadInput (-> 4xx)."""

    def request_schema(self, options: BaseModel, manifest: dict[str, Any]) -> dict[str, Any]:
        """JSON schema of the request body (shown by ``/v1/models``, used by the try-it page)."""
        return {"type": "string", "format": "binary", "description": "raw bytes, or a multipart form with a 'file' field"}

    @abstractmethod
    def format_response(
        self, probabilities: list[np.ndarray], extras: list[dict[str, Any]], classes: list[str], top_k: int
    ) -> dict[str, Any]:
        """Per-item class probabilities -> the JSON answer."""
