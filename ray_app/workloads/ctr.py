"""Click-through-rate prediction: click logs -> a fitted feature transform (categorical hashing,
log + standardisation of numerics with statistics from the training time window only) -> a
DeepFM-style model -> click probabilities, served by a scale-to-zero endpoint.

The fitted transform is stored with the model and ``CTRTransform.apply`` is the one code path for
prepare, batch predict and serving, so the served features are the trained features.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic.types import StrictFloat, StrictInt, StrictStr

from ray_app.features.behaviour import SEQUENCE_CATEGORIES, SEQUENCE_CLICKS, SEQUENCE_ITEMS, BehaviourSpec, empty_history
from ray_app.workloads.base import (
    DATA,
    MODEL,
    ROW_ID_COLUMN,
    STATUS_OK,
    STATUS_REJECTED,
    BadInput,
    PrepareInputs,
    StateUnavailable,
    Workload,
    assign_split,
    count_table_rows,
    read_table,
    read_table_rows,
    require_id_column,
)

if TYPE_CHECKING:
    import ray.data
    import torch

CLASSES = ["no_click", "click"]
log = logging.getLogger("ray.serve")  # in a replica, Serve's logger: lines land in its log file
# After the online store fails, requests skip it (and degrade at once) for this long, so a store
# that is down costs each request nothing rather than a connect timeout.
STORE_RETRY_S = 1.0


class CTROptions(BaseModel):
    label_column: str = Field("click", description="0/1 click label")
    time_column: str | None = Field("timestamp", description="event time; splits are by time (train < val < test)")
    item_column: str | None = Field("item_id", description="item id, for the per-item click-rate baseline")
    id_column: str | None = Field(None, description="optional event id kept in predictions")
    numeric_columns: list[str] = Field(default_factory=list, description="numeric features (log1p + standardised)")
    categorical_columns: list[str] = Field(default_factory=list, description="categorical features (hashed)")
    buckets: int = Field(1 << 14, gt=1, description="hash buckets per categorical field")
    embedding_dim: int = Field(8, gt=0)
    hidden: list[int] = Field(default_factory=lambda: [64, 32], description="DeepFM MLP layer sizes")
    passthrough_columns: list[str] = Field(
        default_factory=lambda: ["true_probability"], description="kept in prepared data when present (e.g. the generator's truth)"
    )
    # Behaviour features (ray_app.features.behaviour): off unless a user column is named.
    behaviour_user_column: str | None = Field(None, description="user id column: turns on behaviour features (needs id and time columns)")
    behaviour_category_column: str | None = Field(None, description="item category kept in the last-N history (a categorical column)")
    behaviour_last_n: int = Field(10, gt=0, description="the user's last N events the model attends over")
    behaviour_user_windows_s: list[int] = Field(
        default_factory=lambda: [3600, 86400, 7 * 86400], description="sliding windows (s) for the user's event and click counts"
    )
    behaviour_item_windows_s: list[int] = Field(
        default_factory=lambda: [86400, 7 * 86400], description="sliding windows (s) for the item's event and click counts"
    )
    behaviour_dropout: float = Field(
        0.1, ge=0, lt=1, description="share of training rows shown with no history, so the store-down fallback is a case the model knows"
    )


@dataclass
class CTRTransform:
    """Fitted on the training window; applied identically in prepare, predict and serve."""

    numeric_columns: list[str]
    categorical_columns: list[str]
    buckets: int
    means: list[float]
    stds: list[float]
    # Behaviour history packed after the row's own fields (0: none): see ``_with_sequences``.
    sequence_length: int = 0
    sequence_fields: list[int] = field(default_factory=list)  # [item field, category field or -1]

    def apply(self, frame: Mapping[str, Any], n: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        """(hashed field-offset category ids N×F int64, standardised numerics N×D float32, reject
        reason per row or None). Unknown categories are fine: they hash into a bucket.

        ``frame`` is a DataFrame (prepare, predict) or a dict of column lists (one request): plain
        numpy per column, because pandas' per-call overhead was 4 ms of a 4.1 ms single event."""
        n = len(frame) if n is None else n
        reasons: list[str | None] = [None] * n
        numeric = np.zeros((n, len(self.numeric_columns)), dtype=np.float32)
        for j, column in enumerate(self.numeric_columns):
            raw = _column(frame, column, n)
            values = _to_float(raw)
            bad = ~np.isfinite(values)
            for i in np.flatnonzero(bad):
                if reasons[i] is None:
                    missing = raw[i] is None or (isinstance(raw[i], float) and np.isnan(raw[i]))
                    reasons[i] = f"{column}: missing" if missing else f"{column}: not a finite number ({raw[i]!r})"
            logged = np.sign(values) * np.log1p(np.abs(np.where(bad, 0.0, values)))
            numeric[:, j] = (logged - self.means[j]) / self.stds[j]
        categorical = np.zeros((n, len(self.categorical_columns)), dtype=np.int64)
        for j, column in enumerate(self.categorical_columns):
            raw = _column(frame, column, n)
            for i in np.flatnonzero(pd.isna(raw)):
                reasons[i] = reasons[i] or f"{column}: missing"
            # pandas' hash_array uses a fixed key: stable across processes and machines.
            hashed = pd.util.hash_array(raw.astype(str).astype(object), categorize=False)
            categorical[:, j] = j * self.buckets + (hashed % np.uint64(self.buckets)).astype(np.int64)
        if self.sequence_length:
            categorical, numeric = self._with_sequences(frame, n, categorical, numeric, reasons)
        return categorical, numeric, reasons

    def _with_sequences(
        self, frame: Mapping[str, Any], n: int, categorical: np.ndarray, numeric: np.ndarray, reasons: list[str | None]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The last-N history as more columns of the same two matrices (so prepared data, batch
        predict, serving and ONNX keep two inputs): L item ids then L category ids appended to
        ``categorical``, hashed into the item's and the category's own buckets so history and the
        target item share embeddings (-1 pads); L click flags appended to ``numeric``."""
        length = self.sequence_length
        ids = np.full((n, 2 * length), -1, dtype=np.int64)
        clicks = np.zeros((n, length), dtype=np.float32)
        sequences = {c: _sequence_column(frame, c, n) for c in (SEQUENCE_ITEMS, SEQUENCE_CATEGORIES, SEQUENCE_CLICKS)}
        for column, values in sequences.items():
            for i in (i for i, v in enumerate(values) if v is None):
                reasons[i] = reasons[i] or f"{column}: missing"
        for offset, (column, j) in enumerate(zip((SEQUENCE_ITEMS, SEQUENCE_CATEGORIES), self.sequence_fields, strict=True)):
            rows = [[str(v) for v in list(values)[:length]] if values is not None and j >= 0 else [] for values in sequences[column]]
            flat = np.array([v for row in rows for v in row], dtype=object)
            if len(flat):  # one hash call for the whole batch, scattered back to (row, position)
                hashed = j * self.buckets + (pd.util.hash_array(flat, categorize=False) % np.uint64(self.buckets)).astype(np.int64)
                row_of = np.repeat(np.arange(n), [len(r) for r in rows])
                position = np.concatenate([np.arange(len(r)) for r in rows if r])
                ids[row_of, offset * length + position] = hashed
        for i, values in enumerate(sequences[SEQUENCE_CLICKS]):
            flags = [] if values is None else list(values)[:length]
            clicks[i, : len(flags)] = np.asarray(flags, dtype=np.float32)
        return np.concatenate([categorical, ids], axis=1), np.concatenate([numeric, clicks], axis=1)


def _sequence_column(frame: Mapping[str, Any], column: str, n: int) -> list[Any]:
    """A column of lists, one per row (None where missing). Not through ``np.asarray``: lists of
    equal length would become one 2-D array."""
    if column not in frame:
        return [None] * n
    values = frame[column]
    return [
        None if v is None or (isinstance(v, float) and np.isnan(v)) else v
        for v in (values.tolist() if isinstance(values, pd.Series) else values)
    ]


def behaviour_spec(options: CTROptions) -> BehaviourSpec | None:
    """The behaviour-feature definition these options ask for, or None (off)."""
    o = options
    if not o.behaviour_user_column:
        return None
    if not (o.id_column and o.time_column and o.item_column):
        raise ValueError("behaviour features need --id-column (event ids), --time-column and --item-column")
    if o.item_column not in o.categorical_columns:
        raise ValueError(f"behaviour features need the item column {o.item_column!r} among --categorical-columns")
    return BehaviourSpec(
        user_column=o.behaviour_user_column,
        item_column=o.item_column,
        time_column=o.time_column,
        label_column=o.label_column,
        event_column=o.id_column,
        category_column=o.behaviour_category_column,
        last_n=o.behaviour_last_n,
        user_windows_s=tuple(o.behaviour_user_windows_s),
        item_windows_s=tuple(o.behaviour_item_windows_s),
    )


def _dropped(key: str, share: float) -> bool:
    """A stable ``share`` of training rows, chosen by a hash of the row key."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8, person=b"bh-drop").digest(), "big") / 2**64 < share


def _finite_float(value: float | int) -> float:
    try:
        number = float(value)
    except OverflowError:
        raise ValueError("number out of range") from None
    if not np.isfinite(number):
        raise ValueError("not a finite number")
    return number


def _column(frame: Mapping[str, Any], column: str, n: int) -> np.ndarray:
    if column not in frame:
        return np.full(n, None, dtype=object)
    values = frame[column]
    return values.to_numpy() if isinstance(values, pd.Series) else np.asarray(values, dtype=object)


def _to_float(raw: np.ndarray) -> np.ndarray:
    """Numbers (or numeric strings) as float64, anything else NaN — pandas' ``to_numeric(errors=
    "coerce")``, with a fast path for the common all-numeric column."""
    try:
        return raw.astype(np.float64)
    except (TypeError, ValueError):
        return pd.to_numeric(pd.Series(raw), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


PREPARED_FIELDS = [
    ("id", pa.string()),
    ("item", pa.string()),
    ("label", pa.int64()),
    ("split", pa.string()),
    ("categorical", pa.list_(pa.int64())),
    ("numeric", pa.list_(pa.float32())),
    ("true_probability", pa.float64()),
    ("status", pa.string()),
    ("reject_reason", pa.string()),
]
PREPARED_SCHEMA = pa.schema(PREPARED_FIELDS)


def split_of(timestamp: float | None, cutoffs: list[float] | None, key: str, fractions: list[float]) -> str:
    if cutoffs is None or timestamp is None:
        return assign_split(key, *fractions)
    return "train" if timestamp < cutoffs[0] else "val" if timestamp < cutoffs[1] else "test"


def parse_labels(raw: pd.Series) -> tuple[np.ndarray, list[str | None]]:
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    reasons = [
        None if v in (0.0, 1.0) else ("missing label" if np.isnan(v) else f"label must be 0 or 1, got {r!r}")
        for v, r in zip(values, raw, strict=True)
    ]
    return np.nan_to_num(values).astype(np.int64), reasons


class CTRPreparer:
    """Stateless: validate labels, apply the fitted transform, assign time splits."""

    def __init__(self, options: dict[str, Any], manifest: dict[str, Any]) -> None:
        self.options = CTROptions.model_validate(options)
        self.transform = CTRTransform(**manifest["transform"])
        self.cutoffs = manifest.get("time_cutoffs")
        self.fractions = manifest["split_fractions"]
        self.behaviour = BehaviourSpec.from_dict(manifest["behaviour"]) if manifest.get("behaviour") else None

    def __call__(self, batch: dict[str, np.ndarray] | pd.DataFrame) -> pa.Table:
        o = self.options
        batch = batch if isinstance(batch, pd.DataFrame) else pd.DataFrame({k: list(v) for k, v in batch.items()})
        n = len(batch)
        ids = batch[o.id_column].astype(str).tolist() if o.id_column and o.id_column in batch else [None] * n
        items = batch[o.item_column].astype(str).tolist() if o.item_column and o.item_column in batch else [None] * n
        times = pd.to_numeric(batch[o.time_column], errors="coerce").tolist() if o.time_column and o.time_column in batch else [None] * n
        keys = [ids[i] or f"{items[i]}|{times[i]}|{i}" for i in range(n)]
        splits = [split_of(t, self.cutoffs, k, self.fractions) for t, k in zip(times, keys, strict=True)]
        if self.behaviour is not None and o.behaviour_dropout > 0:
            # Some training rows as if the store were down: the fallback is then a case the model
            # has learned (prepared features only; the definition itself stays untouched).
            dropped = [i for i in range(n) if splits[i] == "train" and _dropped(keys[i], o.behaviour_dropout)]
            if dropped:
                batch = batch.copy()
                for column, values in empty_history(self.behaviour, len(dropped)).items():
                    batch[column] = batch[column].astype(object)
                    for i, value in zip(dropped, values, strict=True):
                        batch.at[batch.index[i], column] = value
        categorical, numeric, reasons = self.transform.apply(batch)
        labels, label_reasons = (
            parse_labels(batch[o.label_column]) if o.label_column in batch else (np.zeros(n, np.int64), ["missing label"] * n)
        )
        reasons = [r or lr for r, lr in zip(reasons, label_reasons, strict=True)]
        if self.cutoffs is not None:
            # Splits are by time here: an event without a usable time has no split. NaN compares
            # false with every cutoff, so it used to land in "test" unnoticed.
            reasons = [
                r or (None if t is not None and np.isfinite(t) else f"{o.time_column}: missing or not a number")
                for r, t in zip(reasons, times, strict=True)
            ]
        truth = batch["true_probability"].astype(float).tolist() if "true_probability" in batch else [None] * n
        return pa.table(
            {
                "id": [k if ids[i] is None else ids[i] for i, k in enumerate(keys)],
                "item": items,
                "label": labels,
                "split": splits,
                "categorical": list(categorical),
                "numeric": list(numeric),
                "true_probability": truth,
                "status": [STATUS_OK if r is None else STATUS_REJECTED for r in reasons],
                "reject_reason": reasons,
            },
            schema=PREPARED_SCHEMA,
        )


def fit_transform(ds: ray.data.Dataset, options: CTROptions, cutoff: float | None, behaviour: BehaviourSpec | None = None) -> CTRTransform:
    """Mean/std of log1p numerics over the training time window only (no leakage from the future)."""
    columns = options.numeric_columns + (behaviour.numeric_columns() if behaviour else [])

    def moments(batch: pd.DataFrame) -> pd.DataFrame:
        if cutoff is not None:
            batch = batch[pd.to_numeric(batch[options.time_column], errors="coerce") < cutoff]
        out = {}
        for c in columns:
            v = pd.to_numeric(batch[c], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
            v = v[np.isfinite(v)]
            v = np.sign(v) * np.log1p(np.abs(v))
            out[f"{c}__n"], out[f"{c}__s"], out[f"{c}__ss"] = [len(v)], [v.sum()], [(v**2).sum()]
        return pd.DataFrame(out or {"_": [0]})

    means, stds = [], []
    if columns:
        sums = pd.concat(list(ds.map_batches(moments, batch_format="pandas").iter_batches(batch_format="pandas"))).sum()
        for c in columns:
            count = max(sums[f"{c}__n"], 1)
            mean = sums[f"{c}__s"] / count
            means.append(float(mean))
            stds.append(float(max(np.sqrt(max(sums[f"{c}__ss"] / count - mean**2, 0.0)), 1e-6)))
    if behaviour is None:
        return CTRTransform(columns, options.categorical_columns, options.buckets, means, stds)
    category = (
        options.categorical_columns.index(behaviour.category_column) if behaviour.category_column in options.categorical_columns else -1
    )
    fields = [options.categorical_columns.index(behaviour.item_column), category]
    return CTRTransform(columns, options.categorical_columns, options.buckets, means, stds, behaviour.last_n, fields)


def deepfm(num_fields: int, num_numeric: int, buckets: int, dim: int, hidden: list[int], sequence_length: int = 0, item_field: int = 0):
    import torch
    from torch import nn

    class DeepFM(nn.Module):
        """First-order terms + factorization-machine pairwise interactions + an MLP over the same
        embeddings. Returns 2-class logits [0, z], so softmax[:, 1] == sigmoid(z) and the engine's
        cross-entropy equals binary log-loss."""

        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(num_fields * buckets, dim)
            self.first_order = nn.Embedding(num_fields * buckets, 1)
            self.numeric_first_order = nn.Linear(num_numeric, 1) if num_numeric else None
            self.numeric_embedding = nn.Parameter(torch.randn(num_numeric, dim) * 0.01)
            nn.init.normal_(self.embedding.weight, std=0.01)
            nn.init.zeros_(self.first_order.weight)
            # Behaviour: the history's item(+category, +clicked) embeddings pooled two ways (DIN-style
            # attention on the target item, and a plain mean) become two more FM/MLP fields.
            self.sequence_length = sequence_length
            if sequence_length:
                self.click_embedding = nn.Embedding(2, dim)
                self.attention = nn.Sequential(nn.Linear(4 * dim, 16), nn.ReLU(), nn.Linear(16, 1))
            layers, width = [], (num_fields + num_numeric + (2 if sequence_length else 0)) * dim
            for size in hidden:
                layers += [nn.Linear(width, size), nn.ReLU()]
                width = size
            self.mlp = nn.Sequential(*layers, nn.Linear(width, 1))

        def history(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
            """(batch, 2, dim): attention-pooled and mean-pooled history embeddings."""
            length = self.sequence_length
            items, categories = categorical[:, num_fields : num_fields + length], categorical[:, num_fields + length :]
            present = (items >= 0).unsqueeze(-1).float()
            history = self.embedding(items.clamp(min=0)) + self.embedding(categories.clamp(min=0)) * (categories >= 0).unsqueeze(-1).float()
            history = (history + self.click_embedding(numeric[:, num_numeric:].long().clamp(0, 1))) * present
            target = self.embedding(categorical[:, item_field]).unsqueeze(1).expand_as(history)
            scores = self.attention(torch.cat([history, target, history * target, history - target], dim=-1))
            weights = torch.softmax(scores.masked_fill(present == 0, -1e9), dim=1) * present  # no history: all zero
            mean = history.sum(1) / present.sum(1).clamp(min=1)
            return torch.stack([(weights * history).sum(1), mean], dim=1)

        def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            categorical, numeric = inputs["categorical"], inputs["numeric"]
            pieces = [self.embedding(categorical[:, :num_fields]), numeric[:, :num_numeric].unsqueeze(-1) * self.numeric_embedding]
            if self.sequence_length:
                pieces.append(self.history(categorical, numeric))
            fields = torch.cat(pieces, dim=1)
            categorical, numeric = categorical[:, :num_fields], numeric[:, :num_numeric]
            pairwise = 0.5 * (fields.sum(1).pow(2) - fields.pow(2).sum(1)).sum(1)
            linear = self.first_order(categorical).sum((1, 2))
            if self.numeric_first_order is not None:
                linear = linear + self.numeric_first_order(numeric).squeeze(-1)
            z = linear + pairwise + self.mlp(fields.flatten(1)).squeeze(-1)
            return torch.stack([torch.zeros_like(z), z], dim=1)

    return DeepFM()


class CTRWorkload(Workload):
    name: ClassVar[str] = "ctr"
    Options: ClassVar[type[BaseModel]] = CTROptions
    # Feature columns and buckets are baked into the fitted transform at prepare.
    option_stages: ClassVar[dict[str, frozenset[str]]] = {
        "label_column": DATA,
        "time_column": DATA,
        "item_column": DATA,
        "id_column": frozenset({"prepare", "predict"}),
        "numeric_columns": DATA,
        "categorical_columns": DATA,
        "buckets": DATA,
        "embedding_dim": MODEL,
        "hidden": MODEL,
        "passthrough_columns": DATA,
        "behaviour_user_column": DATA,
        "behaviour_category_column": DATA,
        "behaviour_last_n": DATA,
        "behaviour_user_windows_s": DATA,
        "behaviour_item_windows_s": DATA,
        "behaviour_dropout": DATA,
    }
    training_columns: ClassVar[list[str]] = ["categorical", "numeric", "label"]
    id_column: ClassVar[str] = "id"
    preparer_class: ClassVar[type] = CTRPreparer
    default_config: ClassVar[dict[str, Any]] = {
        # Sparse id embeddings overfit fast: strong decoupled weight decay, few epochs.
        "train.lr": 5e-3,
        "train.weight_decay": 0.1,
        "train.batch_size": 256,
        "train.epochs": 2,
        "serve.min_replicas": 0,
        # Latency first: no batch window (under load batches still form while a forward pass runs).
        "serve.batch_wait_timeout_s": 0.0,
        # Events are small: a client may send a page of them, and a forward pass takes many.
        "serve.max_body_bytes": 1024 * 1024,
        "serve.max_items_per_request": 256,
        "serve.max_batch_size": 64,
        # Scale-to-zero: a minute of quiet before the last replica goes, so bursts a little apart
        # do not each pay the cold start.
        "serve.downscale_delay_s": 60.0,
    }

    def __init__(self) -> None:
        # Per workload instance = per predict actor or Serve replica; built on first use.
        self._transform: CTRTransform | None = None
        self._event_model: type[BaseModel] | None = None
        # Serving only: the online feature store (behaviour models), set by ``bind_serving``.
        self._store_url: str | None = None
        self._store: Any = None
        self._store_down_until = 0.0
        self._degraded_counter: Any = None
        self.degraded_predictions = 0

    # ---- prepare ---------------------------------------------------------------------------
    def read_prepare_inputs(
        self, input_uri: str, options: CTROptions, val_fraction: float, test_fraction: float, rows_per_block: int
    ) -> PrepareInputs:
        # Read once: the schema, the time-window pass, the transform fit, the count and the shuffle
        # below then use these blocks instead of each reading (and parsing) the log again.
        ds = read_table(input_uri).materialize()
        behaviour = behaviour_spec(options)
        required = {options.label_column, *options.numeric_columns, *options.categorical_columns}
        required |= set(behaviour.event_fields()) if behaviour else set()
        missing = required - set(ds.schema().names)
        if missing:
            raise ValueError(f"{input_uri}: missing column(s) {sorted(missing)}")
        if behaviour is not None:
            from ray_app.features.behaviour import add_behaviour_features

            # Point-in-time features, computed once (the passes below and the preparers reuse them).
            ds = add_behaviour_features(ds, behaviour).materialize()
        cutoffs, rows_in = None, None
        if options.time_column and options.time_column in ds.schema().names:
            raw_times = pd.concat(
                b[options.time_column] for b in ds.select_columns([options.time_column]).iter_batches(batch_format="pandas")
            )
            rows_in = len(raw_times)  # counted from the pass we need anyway, not a separate one
            times = pd.to_numeric(raw_times, errors="coerce").dropna()
            cutoffs = [float(times.quantile(1 - val_fraction - test_fraction)), float(times.quantile(1 - test_fraction))]
        transform = fit_transform(ds, options, cutoffs[0] if cutoffs else None, behaviour)
        manifest = {
            "classes": CLASSES,
            "transform": asdict(transform),
            "behaviour": asdict(behaviour) if behaviour else None,
            "time_cutoffs": cutoffs,
            "split_fractions": [val_fraction, test_fraction],
        }
        rows_in = ds.count() if rows_in is None else rows_in
        # Logs arrive in time order (or sorted by label): one seeded distributed shuffle writes
        # prepared rows mixed, so early batches are not one user's or one class's events.
        return PrepareInputs(ds.random_shuffle(seed=0), rows_in=rows_in, manifest=manifest, batch_size=max(rows_per_block, 4096))

    # ---- train -----------------------------------------------------------------------------
    def build_model(self, options: CTROptions, manifest: dict[str, Any], pretrained: bool = True) -> torch.nn.Module:
        t = manifest["transform"]
        length, fields = t.get("sequence_length", 0), t.get("sequence_fields") or [0]
        return deepfm(
            len(t["categorical_columns"]), len(t["numeric_columns"]), t["buckets"], options.embedding_dim, options.hidden, length, fields[0]
        )

    def collate(self, batch: dict[str, np.ndarray], options: CTROptions, manifest: dict[str, Any]):
        import torch

        inputs = {
            "categorical": torch.from_numpy(np.stack(batch["categorical"]).astype(np.int64)),
            "numeric": torch.from_numpy(np.stack(batch["numeric"]).astype(np.float32)),
        }
        targets = torch.tensor(batch["label"], dtype=torch.long) if "label" in batch else None
        return inputs, targets

    # ---- evaluate --------------------------------------------------------------------------
    def evaluation_report(
        self, labels: np.ndarray, probabilities: np.ndarray, classes: list[str]
    ) -> tuple[dict[str, Any], dict[str, bytes]]:
        from ray_app.workloads.ctr_metrics import click_report

        return click_report(labels, probabilities[:, 1])

    def evaluation_extras(self, prepared_uri: str, options: CTROptions, manifest: dict[str, Any]) -> dict[str, Any]:
        from ray_app.workloads.ctr_metrics import item_rate_baseline, true_model_auc

        extras = {"baseline": item_rate_baseline(prepared_uri)}
        truth = true_model_auc(prepared_uri)
        if truth is not None:
            extras["true_model"] = truth
        return extras

    # ---- predict ---------------------------------------------------------------------------
    def read_predict_inputs(self, input_uri: str, options: CTROptions, batch_size: int) -> ray.data.Dataset:
        rows = read_table_rows(input_uri)
        require_id_column(input_uri, rows, options.id_column)
        behaviour = behaviour_spec(options)
        if behaviour is not None:
            from ray_app.features.behaviour import add_behaviour_features

            # A scored log carries its own history: each row's features from the rows before it.
            rows = add_behaviour_features(rows, behaviour)
        return rows

    def count_predict_inputs(self, items: ray.data.Dataset, input_uris: list[str]) -> int:
        # Behaviour features add columns, never rows: counting the log itself skips the two hash
        # shuffles of computing them (predict then runs them once, while scoring).
        return sum(count_table_rows(uri) for uri in input_uris)

    def load_predict_batch(self, batch, options: CTROptions, manifest):
        frame = pd.DataFrame({k: list(v) for k, v in batch.items()})
        categorical, numeric, reasons = self.fitted_transform(manifest).apply(frame)
        items = [(categorical[i], numeric[i]) for i in range(len(frame))]
        ids = (
            frame[options.id_column].astype(str).tolist()
            if options.id_column and options.id_column in frame
            else frame[ROW_ID_COLUMN].astype(str).tolist()  # "<file>#<row>": unique across batches and files
        )
        return items, ids, reasons

    onnx_input_names: ClassVar[list[str]] = ["categorical", "numeric"]

    def stack_arrays(self, items: list, options: CTROptions, manifest) -> dict[str, np.ndarray]:
        return {"categorical": np.stack([c for c, _ in items]), "numeric": np.stack([n for _, n in items])}

    def stack_items(self, items: list, options: CTROptions, manifest) -> dict[str, torch.Tensor]:
        import torch

        return {name: torch.from_numpy(array) for name, array in self.stack_arrays(items, options, manifest).items()}

    def fitted_transform(self, manifest: dict[str, Any]) -> CTRTransform:
        """Built once per workload instance (one per predict actor or Serve replica)."""
        if self._transform is None:
            self._transform = CTRTransform(**manifest["transform"])
        return self._transform

    # ---- serve -----------------------------------------------------------------------------
    def event_model(self, manifest: dict[str, Any]) -> type[BaseModel]:
        """The request schema, derived from the fitted transform: every feature is required,
        numerics must be finite numbers, categoricals strings or integers."""
        cached = self._event_model
        if cached is None:
            t = manifest["transform"]
            # Numbers become finite floats here, so an integer beyond float range (a 400-digit id)
            # is a 422 at validation rather than an OverflowError (a 500) in pydantic's own
            # ``allow_inf_nan`` check or in the transform.
            number = Annotated[StrictFloat | StrictInt, AfterValidator(_finite_float)]
            behaviour = BehaviourSpec.from_dict(manifest["behaviour"]) if manifest.get("behaviour") else None
            # Behaviour features come from the online store, never from the client.
            served = set(behaviour.numeric_columns()) if behaviour else set()
            fields: dict[str, Any] = {c: (number, ...) for c in t["numeric_columns"] if c not in served}
            fields.update({c: (StrictStr | StrictInt, ...) for c in t["categorical_columns"]})
            if behaviour is not None:
                fields.setdefault(behaviour.user_column, (StrictStr | StrictInt, ...))
                # "As of" this time (seconds); default: now. History at or after it is not used.
                fields[behaviour.time_column] = (number | None, None)
            cached = create_model("ClickEvent", __config__=ConfigDict(extra="ignore"), **fields)
            self._event_model = cached
        return cached

    def request_schema(self, options: CTROptions, manifest) -> dict[str, Any]:
        event = self.event_model(manifest).model_json_schema()
        return {"anyOf": [event, {"type": "object", "properties": {"events": {"type": "array", "items": event}}, "required": ["events"]}]}

    def decode_request(
        self, payload: bytes, options: CTROptions, manifest, max_items: int | None = None
    ) -> list[tuple[Any, dict[str, Any]]]:
        import pydantic_core

        # pydantic's JSON parser, not ``json``: it refuses nesting deeper than 200 levels and
        # numbers beyond ~4,300 digits with a ValueError, where ``json.loads`` raises RecursionError.
        try:
            body = pydantic_core.from_json(payload)
        except ValueError as exc:
            raise BadInput(f"body: malformed JSON ({exc})") from None
        events = body.get("events", body) if isinstance(body, dict) else body
        events = [events] if isinstance(events, dict) else events
        if not isinstance(events, list) or not events:
            raise BadInput('body: send one event object, a list of events, or {"events": [...]}')
        if max_items is not None and len(events) > max_items:
            raise BadInput(f"{len(events)} items in one request, at most {max_items}")
        model = self.event_model(manifest)
        validated = []
        for index, event in enumerate(events):
            try:
                validated.append(model.model_validate(event).model_dump())
            except ValidationError as exc:
                first = exc.errors()[0]
                field = ".".join(str(p) for p in first["loc"]) or "event"
                raise BadInput(f"events.{index}.{field}: {first['msg']}") from None
        columns = {name: [event[name] for event in validated] for name in validated[0]}
        extras: dict[str, Any] = {}
        if manifest.get("behaviour"):
            history, degraded = self.read_history(BehaviourSpec.from_dict(manifest["behaviour"]), columns, len(validated))
            columns.update(history)
            extras = {"degraded": degraded}
        categorical, numeric, reasons = self.fitted_transform(manifest).apply(columns, len(validated))
        bad = next((r for r in reasons if r), None)
        if bad:
            raise BadInput(bad)
        return [((categorical[i], numeric[i]), extras) for i in range(len(validated))]

    def format_response(self, probabilities: list[np.ndarray], extras, classes: list[str], top_k: int) -> dict[str, Any]:
        answer: dict[str, Any] = {"click_probability": [round(float(p[1]), 6) for p in probabilities]}
        if extras and "degraded" in extras[0]:
            # Scored without the user's history (store down or not configured): static features only.
            answer["degraded"] = any(e["degraded"] for e in extras)
        return answer

    # ---- serve: behaviour features from the online store -------------------------------------
    def bind_serving(self, settings: Any) -> None:
        self._store_url = getattr(settings, "feature_store", None)
        self._store = None

    def online_store(self, spec: BehaviourSpec) -> Any:
        """This replica's Redis client (built on first use; redis-py's pool is thread-safe)."""
        from ray_app.features.online_store import OnlineStore

        if self._store is None or self._store.spec != spec:
            if not self._store_url:
                raise BadInput("no online feature store configured (serve.feature_store)")
            self._store = OnlineStore(self._store_url, spec)
        return self._store

    def read_history(self, spec: BehaviourSpec, columns: dict[str, list[Any]], n: int) -> tuple[dict[str, list[Any]], bool]:
        """Behaviour columns as of each event's time, and whether they had to be left empty: a store
        that is down, slow or not configured degrades the answer to static features, never fails it."""
        from ray_app.features.online_store import StoreUnavailable

        now = time.time()
        times = [now if t is None else float(t) for t in columns.get(spec.time_column, [None] * n)]
        if self._store_url and time.monotonic() >= self._store_down_until:
            try:
                return self.online_store(spec).read(columns[spec.user_column], columns[spec.item_column], times), False
            except StoreUnavailable as exc:
                self._store_down_until = time.monotonic() + STORE_RETRY_S
                log.warning("ctr: online feature store unavailable (%s); scoring on static features", exc)
        self._count_degraded(n)
        return empty_history(spec, n), True

    def _count_degraded(self, n: int) -> None:
        self.degraded_predictions += n
        try:
            import ray
            from ray.util.metrics import Counter

            if self._degraded_counter is None and ray.is_initialized():
                self._degraded_counter = Counter(
                    "ray_app_degraded_predictions",
                    description="predictions scored without behaviour features (store down)",
                    tag_keys=("workload",),
                )
            if self._degraded_counter is not None:
                self._degraded_counter.inc(n, tags={"workload": self.name})
        except Exception:  # noqa: BLE001 - a metrics hiccup must not fail the prediction it counts
            log.debug("ctr: degraded counter not recorded", exc_info=True)

    def ingest_events(self, payload: bytes, options: CTROptions, manifest: dict[str, Any], max_items: int | None = None) -> dict[str, Any]:
        """``POST /ctr/events``: events (with their click outcome) update the online history."""
        import pydantic_core

        from ray_app.features.online_store import BadEvent, StoreUnavailable

        if not manifest.get("behaviour"):
            raise BadInput("this model uses no behaviour features: there is no history to update")
        try:
            body = pydantic_core.from_json(payload)
        except ValueError as exc:
            raise BadInput(f"body: malformed JSON ({exc})") from None
        events = body.get("events", body) if isinstance(body, dict) else body
        events = [events] if isinstance(events, dict) else events
        if not isinstance(events, list) or not events or not all(isinstance(e, dict) for e in events):
            raise BadInput('body: send one event object, a list of events, or {"events": [...]}')
        if max_items is not None and len(events) > max_items:
            raise BadInput(f"{len(events)} items in one request, at most {max_items}")
        try:
            return {"ingested": self.online_store(BehaviourSpec.from_dict(manifest["behaviour"])).ingest(events)}
        except BadEvent as exc:
            raise BadInput(f"event: {exc}") from None
        except StoreUnavailable as exc:
            raise StoreDown(str(exc)) from None

    def purge_user(self, user: str, manifest: dict[str, Any]) -> dict[str, Any]:
        """Forget one user's history (an erasure request)."""
        from ray_app.features.online_store import StoreUnavailable

        if not manifest.get("behaviour"):
            raise BadInput("this model uses no behaviour features: there is no history to purge")
        try:
            return {"purged_keys": self.online_store(BehaviourSpec.from_dict(manifest["behaviour"])).purge_user(user)}
        except StoreUnavailable as exc:
            raise StoreDown(str(exc)) from None


class StoreDown(StateUnavailable):
    """A write to the online store failed: the caller answers 503 (retry), unlike a degraded read."""
