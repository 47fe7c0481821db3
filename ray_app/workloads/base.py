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
from ray_app.prepared import STATUS_OK, STATUS_REJECTED, read_parquet  # noqa: F401  (re-exported: workloads emit them)

if TYPE_CHECKING:
    import ray.data
    import torch


class BadInput(ValueError):
    """An input that cannot be used; the message is the reason written to rejects or the 4xx body."""


class StateUnavailable(RuntimeError):
    """Online state (a feature store) cannot be written now; the answer is a 503, the client retries."""


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


def stable_order(keys: list[str]) -> list[int]:
    """Positions of ``keys`` in the order of a hash of each key: a listing sorted by class folder
    comes out class-mixed, the same on every run and machine. Prepared rows are written in this
    order, so every prepared file (and block) is a random sample of the classes."""
    return sorted(range(len(keys)), key=lambda i: hashlib.blake2b(keys[i].encode(), digest_size=8, person=b"order").digest())


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
        return read_parquet(uri)
    if extensions <= {".csv"}:
        return ray.data.read_csv(uri)
    if extensions <= {".jsonl", ".json"}:
        return ray.data.read_json(uri, lines=True)
    raise ValueError(f"{uri}: expected .csv, .parquet or .jsonl files, found {sorted(extensions)}")


# Column added to tables read for prediction: "<file URI>#<row in file>", a stable, unique id for
# rows of inputs without an id column (a batch-local row number repeats in every batch).
ROW_ID_COLUMN = "__row_id"
TABLE_FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".json": "json"}


def _table_format(path: str) -> str:
    name = path.removesuffix(".gz").removesuffix(".bz2")
    extension = os.path.splitext(name)[1].lower()
    if extension not in TABLE_FORMATS:
        raise ValueError(f"{path}: expected .csv, .parquet or .jsonl files")
    return TABLE_FORMATS[extension]


def read_table_chunks(batch: dict[str, np.ndarray]) -> pa.Table:
    """Ray Data task: one work item (a file, or one Parquet row group) -> its rows, plus
    ``ROW_ID_COLUMN``. Rows of CSV/JSON files are read a file per call; Parquet a row group.
    A function, not a callable class: Ray Data runs a class on a pool of new actor processes,
    a start-up each time predict reads (and counts) its input."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    tables = []
    for uri, fmt, group, first in zip(batch["uri"], batch["format"], batch["row_group"], batch["first_row"], strict=True):
        fs, path = storage.resolve(uri)
        if fmt == "parquet":
            table = pq.ParquetFile(fs.open_input_file(path)).read_row_group(int(group))
        else:
            with fs.open_input_stream(path, compression="detect") as stream:
                table = pacsv.read_csv(stream) if fmt == "csv" else pajson.read_json(stream)
        ids = pa.array([f"{uri}#{int(first) + i}" for i in range(table.num_rows)], pa.string())
        tables.append(table.append_column(ROW_ID_COLUMN, ids))
    return pa.concat_tables(tables, promote_options="permissive")


def read_table_rows(uri: str) -> ray.data.Dataset:
    """CSV, Parquet or JSON Lines rows for prediction, each with its ``ROW_ID_COLUMN``. The driver
    lists files (and Parquet row groups, from the footer only); tasks read them."""
    import pyarrow.parquet as pq

    uri = storage.normalize(uri)
    items: dict[str, list] = {"uri": [], "format": [], "row_group": [], "first_row": []}
    for info in storage.list_files(uri):
        file = f"{uri.split('://', 1)[0]}://{info.path}" if storage.is_remote(uri) else info.path
        fmt = _table_format(info.path)
        groups = [(0, 0)]
        if fmt == "parquet":
            fs, path = storage.resolve(file)
            metadata = pq.read_metadata(fs.open_input_file(path))
            starts = np.cumsum([0] + [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)])
            groups = [(g, int(starts[g])) for g in range(metadata.num_row_groups)]  # none: an empty file
        for group, first in groups:
            for column, value in zip(items, (file, fmt, group, first), strict=True):
                items[column].append(value)
    return arrow_blocks(pa.table(items), 1).map_batches(read_table_chunks, batch_size=1, batch_format="numpy")


def count_table_rows(uri: str) -> int:
    """Rows of a CSV, Parquet or JSON Lines input, as ``read_table_rows`` yields them: Parquet
    from its footers alone, other formats by one read."""
    import pyarrow.parquet as pq

    uri = storage.normalize(uri)
    files = [f"{uri.split('://', 1)[0]}://{info.path}" if storage.is_remote(uri) else info.path for info in storage.list_files(uri)]
    if files and all(_table_format(f) == "parquet" for f in files):
        total = 0
        for file in files:
            fs, path = storage.resolve(file)
            total += pq.read_metadata(fs.open_input_file(path)).num_rows
        return total
    return read_table_rows(uri).count()


def require_id_column(uri: str, dataset: ray.data.Dataset, id_column: str | None) -> None:
    """An id column that is asked for (at predict, or recorded at prepare) but missing is an
    error, not a silent fall-back to generated ids."""
    if id_column and id_column not in dataset.schema().names:
        raise ValueError(
            f"{uri}: id column {id_column!r} not found (columns: {[c for c in dataset.schema().names if c != ROW_ID_COLUMN]}); "
            "pass --id-column '' to use '<file>#<row>' ids instead"
        )


# Which stage decides an option. Every later stage takes the value recorded by the stage that
# decided it (prepared manifest, then model bundle), so the data a model sees at train, evaluate,
# predict and serve has one shape. ``DATA``: shapes the prepared rows (size, channels, max length,
# columns, fitted transform): fixed at prepare. ``MODEL``: shapes the network: fixed at train.
# Anything else is a per-run setting (an id column at predict, a decode limit) honoured by the
# stages listed for it, defaulting to the value recorded earlier.
STAGES = ("prepare", "train", "evaluate", "predict", "serve")
DATA: frozenset[str] = frozenset({"prepare"})
MODEL: frozenset[str] = frozenset({"train"})


class OptionConflict(ValueError):
    """An option given to a stage contradicts the value recorded by the stage that decides it."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class Workload(ABC):
    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]]
    # option name -> stages that decide it (DATA, MODEL, or the stages a per-run option applies
    # to). The one place that splits data-shaping from model options; a test checks that every
    # field of ``Options`` is listed. An unlisted option is treated as DATA.
    option_stages: ClassVar[dict[str, frozenset[str]]] = {}
    training_columns: ClassVar[list[str]]  # prepared columns the training loop reads
    # A prepared column naming who a row belongs to (a patient): evaluate passes it to
    # ``evaluation_report(groups=...)`` so confidence intervals resample whole groups.
    group_column: ClassVar[str | None] = None
    id_column: ClassVar[str] = "id"  # names the input in prediction output (e.g. "path")
    # A class ``(options: dict, manifest: dict)`` whose instances map a numpy batch to a pa.Table of
    # prepared columns + status + reject_reason. It runs as a Ray Data actor pool, built once per
    # actor, so expensive state (a tokenizer) loads once, not per batch.
    preparer_class: ClassVar[type]
    # Config defaults that suit this workload ({"train.lr": ...}); YAML and CLI still override them.
    default_config: ClassVar[dict[str, Any]] = {}

    def parse_options(self, options: dict[str, Any]) -> BaseModel:
        return self.Options.model_validate(options)

    def deciding_stages(self, option: str) -> frozenset[str]:
        return self.option_stages.get(option, DATA)

    def data_options(self) -> list[str]:
        """Names of the options fixed at prepare (recorded in the prepared manifest)."""
        return [name for name in self.Options.model_fields if self.deciding_stages(name) == DATA]

    def resolve_options(self, stage: str, given: dict[str, Any], recorded: dict[str, Any] | None) -> BaseModel:
        """The options a stage runs with. ``given``: what the user set (CLI flags, YAML, --set);
        ``recorded``: options stored by earlier stages (prepared manifest at train, model bundle
        after), None at prepare. An option the stage does not decide comes from ``recorded``; a
        given value that differs from it is refused with both values, never used or ignored."""
        given_parsed = self.parse_options(given)
        recorded_parsed = self.parse_options(recorded) if recorded is not None else None
        values: dict[str, Any] = {}
        conflicts: list[str] = []
        for name in self.Options.model_fields:
            stages = self.deciding_stages(name)
            mine = getattr(given_parsed, name)  # the given value, or the default
            if stage in stages:
                # This stage decides: the given value; a per-run option not given keeps the
                # recorded one (e.g. predict uses prepare's --id-column unless told otherwise).
                per_run = stages not in (DATA, MODEL)
                keep_recorded = per_run and name not in given and recorded_parsed is not None
                values[name] = getattr(recorded_parsed, name) if keep_recorded else mine
                continue
            values[name] = mine if recorded_parsed is None else getattr(recorded_parsed, name)
            if name not in given or (recorded_parsed is not None and mine == values[name]):
                continue
            if stages == DATA:
                conflicts.append(f"{_flag(name)} {mine!r} contradicts {values[name]!r} recorded at prepare (prepare again to change it)")
            elif stages == MODEL and recorded_parsed is None:
                conflicts.append(f"{_flag(name)} {mine!r} has no effect at {stage}: it shapes the model, give it to train")
            elif stages == MODEL:
                conflicts.append(f"{_flag(name)} {mine!r} contradicts {values[name]!r} recorded with the model at train")
            else:
                applies = "/".join(s for s in STAGES if s in stages)
                recorded_note = "" if recorded_parsed is None else f"; recorded {values[name]!r}"
                conflicts.append(f"{_flag(name)} {mine!r} has no effect at {stage} (it applies at {applies}{recorded_note})")
        if conflicts:
            raise OptionConflict(f"{self.name} {stage}: " + "; ".join(conflicts))
        return self.Options.model_validate(values)

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

    def uses_validation_scores(self, manifest: dict[str, Any]) -> bool:
        """Whether evaluate also scores the validation split and passes it to
        ``evaluation_report(validation=(labels, probabilities))`` (to choose decision thresholds)."""
        return False

    def predicted_sets(self, probabilities: np.ndarray) -> list[list[str]] | None:
        """Per row, the classes at or above their decision threshold (multi-label findings);
        None for single-label workloads. Batch predict writes them as a ``findings`` column."""
        return None

    def evaluation_extras(self, prepared_uri: str, options: BaseModel, manifest: dict[str, Any]) -> dict[str, Any]:
        """Extra report entries computed in the same run, e.g. a baseline to beat."""
        return {}

    # ---- predict -------------------------------------------------------------------------
    @abstractmethod
    def read_predict_inputs(self, input_uri: str, options: BaseModel, batch_size: int) -> ray.data.Dataset:
        """Work items for batch prediction (e.g. one row per file)."""

    def count_predict_inputs(self, items: ray.data.Dataset, input_uris: list[str]) -> int:
        """How many rows ``items`` (``read_predict_inputs`` of ``input_uris``) will score: predict's
        row accounting and pool sizing. By default by running them; a workload whose work items
        are costly to compute but keep the input's row count says so without computing them."""
        return items.count()

    @abstractmethod
    def load_predict_batch(
        self, batch: dict[str, np.ndarray], options: BaseModel, manifest: dict[str, Any]
    ) -> tuple[list[Any], list[str], list[str | None]]:
        """Work items -> (decoded items, ids, reject reasons — None where the item is good)."""

    @abstractmethod
    def stack_items(self, items: list[Any], options: BaseModel, manifest: dict[str, Any]) -> Any:
        """Decoded items -> model inputs for one forward pass."""

    def stack_arrays(self, items: list[Any], options: BaseModel, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
        """Decoded items -> the exported model's named numpy inputs (ONNX Runtime; no torch).
        ``onnx_input_names`` lists the names in the order ``stack_items``' tensors take them."""
        raise NotImplementedError(f"{self.name}: no numpy inputs for an exported model")

    # Names of the exported graph's inputs, in the order the exporter passes them (see stack_arrays).
    onnx_input_names: ClassVar[list[str]] = []

    def configure(self, options: BaseModel, manifest: dict[str, Any]) -> None:
        """Per-model state the workload's answers depend on (e.g. multi-label thresholds), set
        from the bundle; ``build_model`` does it for torch, the ONNX loader calls it directly."""
        return None  # most workloads keep no per-model state

    # ---- serve ---------------------------------------------------------------------------
    def bind_serving(self, settings: Any) -> None:
        """Serving-time resources from the replica's ``ServeConfig`` (e.g. an online feature store)."""
        return None  # most workloads need none

    def ingest_events(self, payload: bytes, options: BaseModel, manifest: dict[str, Any], max_items: int | None = None) -> dict[str, Any]:
        """``POST /<workload>/events``: events that update online state; BadInput where there is none."""
        raise BadInput(f"{self.name}: this workload takes no events")

    def purge_user(self, user: str, manifest: dict[str, Any]) -> dict[str, Any]:
        """``DELETE /<workload>/users/<user>``: forget a user's online state."""
        raise BadInput(f"{self.name}: this workload keeps no per-user state")

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
