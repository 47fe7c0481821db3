"""A model bundle is a folder: ``model.safetensors`` + ``bundle.json`` (workload, options, class
names, preprocessing statistics, metrics, weights SHA-256). Training checkpoints and registered
versions share the format, so one loader serves evaluate, predict and serve.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel
from safetensors.torch import load_model, save_model

from ray_app import storage
from ray_app.bundle_format import (
    BUNDLE_FILE,
    BUNDLE_FORMAT_VERSION,
    WEIGHTS_FILE,
    BundleError,
    UnsupportedBundleFormat,
    check_format_version,
)
from ray_app.workloads import get_workload
from ray_app.workloads.base import Workload

__all__ = [
    "BUNDLE_FILE",
    "BUNDLE_FORMAT_VERSION",
    "WEIGHTS_FILE",
    "BundleError",
    "ModelBundle",
    "UnsupportedBundleFormat",
    "load_bundle",
    "save_bundle",
]


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_bundle(model: torch.nn.Module, folder: str, info: dict[str, Any]) -> None:
    """Write weights (safetensors: loading never executes code) and the bundle description."""
    os.makedirs(folder, exist_ok=True)
    weights = os.path.join(folder, WEIGHTS_FILE)
    save_model(model, weights)
    with open(os.path.join(folder, BUNDLE_FILE), "w") as f:
        json.dump({**info, "format_version": BUNDLE_FORMAT_VERSION, "weights_sha256": sha256_file(weights)}, f, indent=2, sort_keys=True)


@dataclass
class ModelBundle:
    workload: Workload
    options: BaseModel
    manifest: dict[str, Any]
    model: torch.nn.Module
    info: dict[str, Any]
    device: torch.device

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    def stack(self, items: list[Any]) -> Any:
        """Decoded items -> this model's inputs (torch tensors here; numpy for ONNX Runtime)."""
        return self.workload.stack_items(items, self.options, self.manifest)

    def predict_proba(self, inputs: Any) -> np.ndarray:
        inputs = inputs.to(self.device) if isinstance(inputs, torch.Tensor) else {k: v.to(self.device) for k, v in inputs.items()}
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            return self.workload.probabilities(self.model(inputs)).float().cpu().numpy()


def _read_json(path: str, uri: str, *required: str) -> dict[str, Any]:
    """A bundle's JSON file; a damaged one raises an error that names it (uri: for the message)."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{uri} is damaged: not valid JSON ({exc})") from None
    missing = [key for key in required if not isinstance(data, dict) or key not in data]
    if missing:
        raise BundleError(f"{uri} is damaged: missing {', '.join(missing)}")
    return data


def read_bundle_info(uri: str, folder: str) -> dict[str, Any]:
    """bundle.json of a bundle in local ``folder`` (downloaded from ``uri``), format checked."""
    info = _read_json(os.path.join(folder, BUNDLE_FILE), storage.join(uri, BUNDLE_FILE), "workload", "weights_sha256")
    check_format_version(info, storage.join(uri, BUNDLE_FILE))
    return info


def load_bundle(uri: str, device: str | torch.device = "cpu") -> ModelBundle:
    """Load a bundle from any URI, refusing weights whose SHA-256 differs from the recorded one."""
    uri = storage.normalize(uri)
    with tempfile.TemporaryDirectory() as tmp:
        folder = uri
        if storage.is_remote(uri):
            storage.download_dir(uri, tmp)
            folder = tmp
        info = read_bundle_info(uri, folder)
        registry_metadata = os.path.join(folder, "metadata.json")
        if os.path.exists(registry_metadata):  # a registered version: remember which one
            registered = _read_json(registry_metadata, storage.join(uri, "metadata.json"), "version")
            info["version"] = registered["version"]
            evaluation = registered.get("evaluation") or {}
            if evaluation.get("thresholds"):  # decision thresholds chosen at evaluate, saved with the version
                info["manifest"] = {
                    **info["manifest"],
                    "decision_thresholds": {"thresholds": evaluation["thresholds"], "rule": evaluation.get("threshold_rule")},
                }
        weights = os.path.join(folder, WEIGHTS_FILE)
        actual = sha256_file(weights)
        if actual != info["weights_sha256"]:
            raise ValueError(f"{uri}: weights SHA-256 {actual} does not match recorded {info['weights_sha256']}")
        workload = get_workload(info["workload"])
        options = workload.parse_options(info["options"])
        model = workload.build_model(options, info["manifest"], pretrained=False)
        device = torch.device(device)
        load_model(model, weights, device=str(device))
    model.to(device).eval()
    return ModelBundle(workload, options, info["manifest"], model, info, device)
