"""Click-through-rate prediction: click logs -> a fitted feature transform (categorical hashing,
log + standardisation of numerics with statistics from the training time window only) -> a
DeepFM-style model -> click probabilities, served by a scale-to-zero endpoint.

The fitted transform is stored with the model and ``CTRTransform.apply`` is the one code path for
prepare, batch predict and serving, so the served features are the trained features.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic.types import StrictFloat, StrictInt, StrictStr

from ray_app.workloads.base import (
    DATA,
    MODEL,
    ROW_ID_COLUMN,
    STATUS_OK,
    STATUS_REJECTED,
    BadInput,
    PrepareInputs,
    Workload,
    assign_split,
    read_table,
    read_table_rows,
    require_id_column,
)

if TYPE_CHECKING:
    import ray.data
    import torch

CLASSES = ["no_click", "click"]


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


@dataclass
class CTRTransform:
    """Fitted on the training window; applied identically in prepare, predict and serve."""

    numeric_columns: list[str]
    categorical_columns: list[str]
    buckets: int
    means: list[float]
    stds: list[float]

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
        return categorical, numeric, reasons


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

    def __call__(self, batch: dict[str, np.ndarray] | pd.DataFrame) -> pa.Table:
        o = self.options
        batch = batch if isinstance(batch, pd.DataFrame) else pd.DataFrame({k: list(v) for k, v in batch.items()})
        n = len(batch)
        categorical, numeric, reasons = self.transform.apply(batch)
        labels, label_reasons = (
            parse_labels(batch[o.label_column]) if o.label_column in batch else (np.zeros(n, np.int64), ["missing label"] * n)
        )
        reasons = [r or lr for r, lr in zip(reasons, label_reasons, strict=True)]
        ids = batch[o.id_column].astype(str).tolist() if o.id_column and o.id_column in batch else [None] * n
        items = batch[o.item_column].astype(str).tolist() if o.item_column and o.item_column in batch else [None] * n
        times = pd.to_numeric(batch[o.time_column], errors="coerce").tolist() if o.time_column and o.time_column in batch else [None] * n
        if self.cutoffs is not None:
            # Splits are by time here: an event without a usable time has no split. NaN compares
            # false with every cutoff, so it used to land in "test" unnoticed.
            reasons = [
                r or (None if t is not None and np.isfinite(t) else f"{o.time_column}: missing or not a number")
                for r, t in zip(reasons, times, strict=True)
            ]
        keys = [ids[i] or f"{items[i]}|{times[i]}|{i}" for i in range(n)]
        truth = batch["true_probability"].astype(float).tolist() if "true_probability" in batch else [None] * n
        return pa.table(
            {
                "id": [k if ids[i] is None else ids[i] for i, k in enumerate(keys)],
                "item": items,
                "label": labels,
                "split": [split_of(t, self.cutoffs, k, self.fractions) for t, k in zip(times, keys, strict=True)],
                "categorical": list(categorical),
                "numeric": list(numeric),
                "true_probability": truth,
                "status": [STATUS_OK if r is None else STATUS_REJECTED for r in reasons],
                "reject_reason": reasons,
            },
            schema=PREPARED_SCHEMA,
        )


def fit_transform(ds: ray.data.Dataset, options: CTROptions, cutoff: float | None) -> CTRTransform:
    """Mean/std of log1p numerics over the training time window only (no leakage from the future)."""
    columns = options.numeric_columns

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
    return CTRTransform(options.numeric_columns, options.categorical_columns, options.buckets, means, stds)


def deepfm(num_fields: int, num_numeric: int, buckets: int, dim: int, hidden: list[int]):
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
            layers, width = [], (num_fields + num_numeric) * dim
            for size in hidden:
                layers += [nn.Linear(width, size), nn.ReLU()]
                width = size
            self.mlp = nn.Sequential(*layers, nn.Linear(width, 1))

        def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            categorical, numeric = inputs["categorical"], inputs["numeric"]
            fields = torch.cat([self.embedding(categorical), numeric.unsqueeze(-1) * self.numeric_embedding], dim=1)
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

    # ---- prepare ---------------------------------------------------------------------------
    def read_prepare_inputs(
        self, input_uri: str, options: CTROptions, val_fraction: float, test_fraction: float, rows_per_block: int
    ) -> PrepareInputs:
        ds = read_table(input_uri)
        required = {options.label_column, *options.numeric_columns, *options.categorical_columns}
        missing = required - set(ds.schema().names)
        if missing:
            raise ValueError(f"{input_uri}: missing column(s) {sorted(missing)}")
        cutoffs, rows_in = None, None
        if options.time_column and options.time_column in ds.schema().names:
            raw_times = pd.concat(
                b[options.time_column] for b in ds.select_columns([options.time_column]).iter_batches(batch_format="pandas")
            )
            rows_in = len(raw_times)  # counted from the pass we need anyway, not a separate one
            times = pd.to_numeric(raw_times, errors="coerce").dropna()
            cutoffs = [float(times.quantile(1 - val_fraction - test_fraction)), float(times.quantile(1 - test_fraction))]
        transform = fit_transform(ds, options, cutoffs[0] if cutoffs else None)
        manifest = {
            "classes": CLASSES,
            "transform": asdict(transform),
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
        return deepfm(len(t["categorical_columns"]), len(t["numeric_columns"]), t["buckets"], options.embedding_dim, options.hidden)

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
        return rows

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
            fields: dict[str, Any] = {c: (number, ...) for c in t["numeric_columns"]}
            fields.update({c: (StrictStr | StrictInt, ...) for c in t["categorical_columns"]})
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
        categorical, numeric, reasons = self.fitted_transform(manifest).apply(columns, len(validated))
        bad = next((r for r in reasons if r), None)
        if bad:
            raise BadInput(bad)
        return [((categorical[i], numeric[i]), {}) for i in range(len(validated))]

    def format_response(self, probabilities: list[np.ndarray], extras, classes: list[str], top_k: int) -> dict[str, Any]:
        return {"click_probability": [round(float(p[1]), 6) for p in probabilities]}
