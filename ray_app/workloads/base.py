"""The one small interface that differs per workload. The engine (prepare, train, evaluate,
predict, serve) is written once against it; a new workload is one new file implementing it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa
from pydantic import BaseModel

if TYPE_CHECKING:
    import torch

# Every preparer and batch predictor emits these two columns so one Parquet write, partitioned by
# status, splits good rows from rejects in a single streaming pass.
STATUS_OK = "ok"
STATUS_REJECTED = "rejected"


class BadInput(ValueError):
    """An input that cannot be used; the message is the reason written to rejects or the 4xx body."""


@dataclass
class PrepareInputs:
    """What prepare fans out over Ray Data: a table of work items and the row count they expand to."""

    items: pa.Table
    rows_in: int
    manifest: dict[str, Any]  # dataset facts saved next to the data (class names, shapes, ...)


class Workload(ABC):
    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]]

    def parse_options(self, options: dict[str, Any]) -> BaseModel:
        return self.Options.model_validate(options)

    # ---- prepare -------------------------------------------------------------------------
    @abstractmethod
    def list_prepare_inputs(
        self, input_uri: str, options: BaseModel, val_fraction: float, test_fraction: float, rows_per_block: int
    ) -> PrepareInputs:
        """Enumerate raw inputs cheaply in the driver (paths, row ranges), with their split."""

    # A class ``(options: dict, manifest: dict)`` whose instances map a numpy batch to a pa.Table of
    # prepared columns + status + reject_reason. Ray Data builds one per actor, so expensive state
    # (decoders, tokenizers) loads once per actor, not per batch.
    preparer_class: ClassVar[type]

    # ---- train ---------------------------------------------------------------------------
    @abstractmethod
    def build_model(self, options: BaseModel, manifest: dict[str, Any]) -> torch.nn.Module:
        """A fresh model; its forward takes what ``collate`` returns as inputs."""

    @abstractmethod
    def collate(self, batch: dict[str, np.ndarray], options: BaseModel, manifest: dict[str, Any]) -> tuple[Any, torch.Tensor | None]:
        """Prepared rows -> (model inputs, targets or None)."""

    training_columns: ClassVar[list[str]]

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.nn.functional.cross_entropy(logits, targets)

    def correct(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Count of right answers in a batch, summed across workers for accuracy."""
        return (logits.argmax(dim=1) == targets).sum()

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.softmax(logits.float(), dim=1)

    # ---- predict / serve -----------------------------------------------------------------
    id_column: ClassVar[str] = "id"  # names the input in prediction output (e.g. "path")

    @abstractmethod
    def list_predict_inputs(self, input_uri: str, options: BaseModel) -> pa.Table:
        """Work items for batch prediction (e.g. one row per file)."""

    @abstractmethod
    def load_predict_batch(
        self, batch: dict[str, np.ndarray], options: BaseModel, manifest: dict[str, Any]
    ) -> tuple[list[Any], list[str], list[str | None]]:
        """Turn work items into (decoded items, ids, reject reasons — None where the item is good)."""

    @abstractmethod
    def decode_item(self, payload: Any, options: BaseModel, manifest: dict[str, Any]) -> Any:
        """One raw input (file bytes, request body) -> one decoded item; raises BadInput."""

    @abstractmethod
    def stack_items(self, items: list[Any], options: BaseModel, manifest: dict[str, Any]) -> Any:
        """Decoded items -> model inputs for one forward pass."""
