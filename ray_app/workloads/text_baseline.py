"""The baseline a fine-tuned text model must beat: frozen mean-pooled embeddings of the same
pretrained model + logistic regression, computed in the same evaluate run."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score

from ray_app.engine.warm import new_run_token, stateful_map
from ray_app.prepared import read_split
from ray_app.workloads.text_encoder import TextOptions, local_model_dir, pad, verify_weights


class FrozenEmbedder:
    """Ray Data actor: the pretrained encoder (no fine-tuning), mean-pooled over real tokens."""

    def __init__(self, options: dict[str, Any]) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.options = TextOptions.model_validate(options)
        folder = local_model_dir(self.options.model_dir)
        verify_weights(folder, self.options.weights_sha256)
        self.encoder = AutoModel.from_pretrained(folder, local_files_only=True).eval()
        self.pad_id = AutoTokenizer.from_pretrained(folder, local_files_only=True).pad_token_id or 0
        self.torch = torch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        input_ids, mask = pad(list(batch["input_ids"]), self.pad_id)
        ids, attention = torch.from_numpy(input_ids), torch.from_numpy(mask)
        with torch.inference_mode():
            hidden = self.encoder(input_ids=ids, attention_mask=attention).last_hidden_state
        weights = attention.unsqueeze(-1).float()
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        return {"embedding": pooled.numpy(), "label": batch["label"]}


def _embed(
    prepared_uri: str, split: str, options: TextOptions, limit: int | None, rows: int | None, run_token: str
) -> tuple[np.ndarray, np.ndarray]:
    ds = read_split(prepared_uri, split, ["input_ids", "label"])
    if limit:
        ds = ds.limit(limit)
        rows = min(rows, limit) if rows is not None else limit
    # One worker, warm when the split is small; the train and test passes share ``run_token``,
    # so a worker loads the encoder once for both.
    out = stateful_map(
        ds,
        FrozenEmbedder,
        {"options": options.model_dump()},
        rows=rows,
        batch_size=64,
        max_workers=1,
        run_token=run_token,
        batch_format="numpy",
    )
    features, labels = [], []
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
        features.append(np.stack(batch["embedding"]))
        labels.append(batch["label"])
    return np.concatenate(features), np.concatenate(labels)


def frozen_embedding_baseline(prepared_uri: str, options: TextOptions, manifest: dict[str, Any]) -> dict[str, Any]:
    splits, run_token = manifest.get("splits", {}), new_run_token()
    x_train, y_train = _embed(prepared_uri, "train", options, options.baseline_train_rows, splits.get("train"), run_token)
    x_test, y_test = _embed(prepared_uri, "test", options, None, splits.get("test"), run_token)
    classifier = LogisticRegression(max_iter=2000, C=1.0, random_state=0).fit(x_train, y_train)
    predicted = classifier.predict(x_test)
    return {
        "name": "frozen mean-pooled embeddings + logistic regression",
        "train_rows": int(len(y_train)),
        "accuracy": float(accuracy_score(y_test, predicted)),
        "macro_f1": float(f1_score(y_test, predicted, average="macro")),
    }
