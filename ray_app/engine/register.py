"""register: copy a run's latest checkpoint into the model registry as a new version, with its
metrics, config and data fingerprint, and move an alias (e.g. ``production``) to it."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from ray_app import storage
from ray_app.config import AppConfig
from ray_app.engine.evaluate import REPORT_FILE
from ray_app.engine.train import latest_checkpoint_uri
from ray_app.prepared import MANIFEST_FILE, ok_uri
from ray_app.registry import ModelRegistry

log = logging.getLogger(__name__)


def data_fingerprint(prepared_uri: str) -> str:
    """SHA-256 over the prepared files' names and sizes plus the manifest: changes whenever the
    training data does, without reading the data."""
    digest = hashlib.sha256(storage.read_bytes(storage.join(prepared_uri, MANIFEST_FILE)))
    for info in storage.list_files(ok_uri(prepared_uri)):
        digest.update(f"{info.base_name}:{info.size}\n".encode())
    return digest.hexdigest()


def run_register(config: AppConfig) -> dict[str, Any]:
    checkpoint = latest_checkpoint_uri(config)
    report_uri = storage.join(config.evaluation_uri(), REPORT_FILE)
    evaluation = storage.read_json(report_uri) if storage.exists(report_uri) else None
    bundle_info = storage.read_json(storage.join(checkpoint, "bundle.json"))
    metadata = {
        "run_name": config.train.run_name,
        "training_metrics": bundle_info["metrics"],
        "evaluation": {k: evaluation[k] for k in ("accuracy", "macro_f1", "auc", "log_loss", "rows", "baseline") if k in evaluation}
        if evaluation
        else None,
        "data": config.train_data_uri(),
        "data_fingerprint": data_fingerprint(config.train_data_uri()),
        "config": config.model_dump(mode="json"),
    }
    registry = ModelRegistry(config.models_uri())
    version = registry.register(config.workload, checkpoint, metadata, alias=config.registration.alias)
    summary = {
        "workload": config.workload,
        "version": version,
        "alias": config.registration.alias,
        "uri": registry.version_uri(config.workload, version),
    }
    log.info("register: %s", summary)
    return summary
