"""Serving and batch-predicting a registered version on ONNX Runtime, without torch.

``register`` exports each version's network, with the workload's probability head, to
``model.onnx`` (and, for text, an int8 copy when it scores within tolerance); see
``ray_app.onnx_export``. This module only reads those files: it imports onnxruntime, numpy and the
workload's own (torch-free) request decoding, so a CPU replica that loads through it never imports
torch or transformers, the bulk of a cold replica's start-up.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel

from ray_app import storage
from ray_app.bundle_format import BUNDLE_FILE, BundleError, check_format_version
from ray_app.workloads import get_workload
from ray_app.workloads.base import Workload

ONNX_FILE = "model.onnx"
ONNX_INT8_FILE = "model.int8.onnx"
METADATA_FILE = "metadata.json"  # the registry's per-version record (ray_app.registry writes it)

Runtime = Literal["auto", "torch", "onnx"]
Precision = Literal["auto", "fp32", "int8"]


class OnnxUnavailable(BundleError):
    """The version has no usable ONNX export (registered before exports, or export refused)."""


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def registered_info(info: dict[str, Any], metadata: dict[str, Any]) -> dict[str, Any]:
    """bundle.json plus what registration added: the version number and decision thresholds chosen
    at evaluate (as ``ray_app.bundle.load_bundle`` applies them), so both runtimes answer alike."""
    info = {**info, "version": metadata["version"]}
    evaluation = metadata.get("evaluation") or {}
    if evaluation.get("thresholds"):
        info["manifest"] = {
            **info["manifest"],
            "decision_thresholds": {"thresholds": evaluation["thresholds"], "rule": evaluation.get("threshold_rule")},
        }
    return info


def choose_file(onnx: dict[str, Any] | None, precision: Precision) -> str:
    """Which export to load. ``auto``: the int8 copy when register accepted it (its accuracy change
    on the test split was within tolerance), else fp32; ``int8`` insists on an accepted copy."""
    if not onnx or not onnx.get("file"):
        raise OnnxUnavailable("no ONNX export was registered with this version (register it again to export one)")
    int8 = onnx.get("int8") or {}
    if precision == "int8" and not int8.get("accepted"):
        raise OnnxUnavailable(f"no accepted int8 export with this version ({int8.get('note') or 'not quantized'})")
    return int8["file"] if precision in ("auto", "int8") and int8.get("accepted") else onnx["file"]


def session(path: str, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    # 0: one intra-op thread per core, as torch does by default (a like-for-like comparison);
    # RAY_APP_ORT_THREADS caps it where several replicas share a node's cores.
    options.intra_op_num_threads = threads or int(os.environ.get("RAY_APP_ORT_THREADS", "0")) or 0
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


@dataclass
class OnnxModel:
    """A ``ServedModel`` on ONNX Runtime: the graph's output is already the class probabilities."""

    workload: Workload
    options: BaseModel
    manifest: dict[str, Any]
    info: dict[str, Any]
    device: str
    session: Any

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    def stack(self, items: list[Any]) -> dict[str, np.ndarray]:
        return self.workload.stack_arrays(items, self.options, self.manifest)

    def predict_proba(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        names = [i.name for i in self.session.get_inputs()]
        return self.session.run(None, {name: inputs[name] for name in names})[0]


def load_onnx_model(uri: str, precision: Precision = "auto", threads: int | None = None) -> OnnxModel:
    """A registered version's ONNX export, refusing a file whose SHA-256 differs from the one
    register recorded (as the torch loader does for the weights)."""
    uri = storage.normalize(uri)
    with tempfile.TemporaryDirectory() as tmp:
        folder = uri
        if storage.is_remote(uri):
            storage.download_dir(uri, tmp)
            folder = tmp
        info = storage.read_json(os.path.join(folder, BUNDLE_FILE))
        check_format_version(info, storage.join(uri, BUNDLE_FILE))
        metadata_path = os.path.join(folder, METADATA_FILE)
        if not os.path.exists(metadata_path):
            raise OnnxUnavailable(f"{uri}: not a registered version (ONNX exports are made at register)")
        metadata = storage.read_json(metadata_path)
        onnx = metadata.get("onnx")
        name = choose_file(onnx, precision)
        path = os.path.join(folder, name)
        expected = onnx["sha256"][name]
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(f"{storage.join(uri, name)}: SHA-256 {actual} does not match recorded {expected}")
        info = registered_info(info, metadata)
        info["runtime"] = {"engine": "onnxruntime", "file": name}
        workload = get_workload(info["workload"])
        options = workload.parse_options(info["options"])
        workload.configure(options, info["manifest"])
        model = OnnxModel(workload, options, info["manifest"], info, f"cpu (onnxruntime, {name})", session(path, threads))
    return model


def load_for_runtime(uri: str, use_gpu: bool, runtime: Runtime = "auto", precision: Precision = "auto") -> Any:
    """A registered version ready to predict: the ONNX export on CPU when ``runtime`` asks for it
    (``auto``: when the version has one), else the torch bundle. GPU always runs torch: the
    exports are checked on CPU, and the CUDA build of onnxruntime is not a dependency here."""
    if runtime != "torch" and not use_gpu:
        try:
            return load_onnx_model(uri, precision)
        except OnnxUnavailable:
            if runtime == "onnx":
                raise
    import torch

    from ray_app.bundle import load_bundle

    return load_bundle(uri, "cuda" if use_gpu and torch.cuda.is_available() else "cpu")
