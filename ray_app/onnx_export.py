"""register's ONNX export: the network plus the workload's probability head as one graph with a
dynamic batch dimension, checked against torch on held-out rows before it may be registered.

Text also gets an int8 copy (int8 weights; activations quantized per row on the fly, see
``quantize_int8``). Its accuracy change on the test split is recorded with the version, and
serving uses it only when the change is within ``registration.int8_tolerance``.

Uses torch (and the ``onnx`` package) at register time only; serving reads the files through
``ray_app.onnx_runtime``, which needs neither.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads

from ray_app import storage
from ray_app.onnx_runtime import ONNX_FILE, ONNX_INT8_FILE, session, sha256_file
from ray_app.prepared import ok_uri
from ray_app.registry import RegistryError

if TYPE_CHECKING:
    from ray_app.bundle import ModelBundle
    from ray_app.config import AppConfig

log = logging.getLogger(__name__)

# The legacy TorchScript exporter (``dynamo=False``): it needs no onnxscript, traces HF's BERT and
# the project's models as they are, and keeps dynamic axes by name. Opset 17: LayerNormalization
# as one op, read by every onnxruntime this project allows.
OPSET = 17
# Besides the batch, text inputs vary in length (padding is per batch, to its longest text).
EXTRA_DYNAMIC_AXES = {"text": {1: "tokens"}}
INT8_BY_DEFAULT = {"text"}  # a transformer's int8 MatMuls pay off; DeepFM and the small CNN are too small
PARITY_BATCH = 64  # rows per held-out batch: text pads to each batch's longest row


class OnnxParityRefused(RegistryError):
    """The ONNX export's probabilities differ from torch's by more than the tolerance."""


def _graph(bundle: ModelBundle):
    """The bundle's model with its probability head, taking the inputs as positional tensors."""
    import torch

    names = list(bundle.workload.onnx_input_names)

    class ProbabilityGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = bundle.model

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            inputs = tensors[0] if len(names) == 1 else dict(zip(names, tensors, strict=True))
            return bundle.workload.probabilities(self.model(inputs))

    # eval() on the wrapper itself: the exporter restores the wrapper's mode afterwards, and a
    # fresh module is in training mode, which would switch the model's dropout back on.
    return ProbabilityGraph().eval(), names


def export(bundle: ModelBundle, path: str, example: dict[str, np.ndarray]) -> None:
    import torch

    graph, names = _graph(bundle)
    extra = EXTRA_DYNAMIC_AXES.get(bundle.workload.name, {})
    dynamic_axes = {name: {0: "batch", **(extra if example[name].ndim > 1 else {})} for name in names}
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of torch.export (dynamo=True), which
        # needs onnxscript and did not keep the text model's sequence axis dynamic as simply;
        # the parity check below is what vouches for the graph either way.
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export", category=DeprecationWarning)
        # Tracing notes on Python-side shape arithmetic in transformers; dynamic axes and the
        # batch-of-one parity check cover what they warn about.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            graph,
            tuple(torch.from_numpy(example[name]) for name in names),
            path,
            input_names=names,
            output_names=["probabilities"],
            dynamic_axes={**dynamic_axes, "probabilities": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )


def torch_probabilities(bundle: ModelBundle, arrays: dict[str, np.ndarray]) -> np.ndarray:
    import torch

    names = bundle.workload.onnx_input_names
    tensors = {name: torch.from_numpy(arrays[name]) for name in names}
    return bundle.predict_proba(tensors[names[0]] if len(names) == 1 else tensors)


def onnx_probabilities(onnx_session: Any, batches: list[dict[str, np.ndarray]]) -> np.ndarray:
    names = [i.name for i in onnx_session.get_inputs()]
    return np.concatenate([onnx_session.run(None, {n: b[n] for n in names})[0] for b in batches])


def parity(bundle: ModelBundle, onnx_path: str, batches: list[dict[str, np.ndarray]], tolerance: float) -> dict[str, Any]:
    """Max |p_onnx - p_torch| over the held-out batches, and over their first row alone (a batch
    of one: the traced graph must not have kept the example's batch size anywhere)."""
    onnx_session = session(onnx_path)
    single = {name: array[:1] for name, array in batches[0].items()}
    reference = np.concatenate([torch_probabilities(bundle, b) for b in [*batches, single]])
    exported = onnx_probabilities(onnx_session, [*batches, single])
    max_abs_diff = float(np.abs(reference - exported).max())
    return {"max_abs_diff": max_abs_diff, "rows": int(len(reference) - 1), "tolerance": tolerance, "passed": max_abs_diff <= tolerance}


def held_out_batches(
    bundle: ModelBundle, prepared_uri: str, rows: int, split: str = "test"
) -> tuple[list[dict[str, np.ndarray]], np.ndarray, str]:
    """Up to ``rows`` good prepared rows of ``split`` (validation, then train, when it has none),
    collated by the workload, as numpy batches; plus their labels and the split used."""
    fs, path = storage.resolve(ok_uri(prepared_uri))
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    columns = [c for c in bundle.workload.training_columns if c in dataset.schema.names]
    for candidate in (split, "val", "train"):
        table = dataset.head(rows, columns=columns, filter=pc.field("split") == candidate)
        if table.num_rows:
            break
    else:
        raise OnnxParityRefused(f"register: {prepared_uri} has no prepared rows to check the ONNX export on")
    names = bundle.workload.onnx_input_names
    batches, labels = [], []
    for start in range(0, table.num_rows, PARITY_BATCH):
        chunk = table.slice(start, PARITY_BATCH)
        inputs, targets = bundle.workload.collate(
            {c: chunk[c].to_numpy(zero_copy_only=False) for c in columns}, bundle.options, bundle.manifest
        )
        tensors = {names[0]: inputs} if len(names) == 1 else inputs
        batches.append({name: tensors[name].numpy() for name in names})
        labels.append(targets.numpy())
    return batches, np.concatenate(labels), candidate


def quantize_int8(source: str, target: str) -> None:
    """int8 copy of an fp32 graph: every MatMul with a constant weight becomes an integer MatMul
    (ONNX ``MatMulInteger``) on int8 weights (one scale per output channel) and uint8 activations
    quantized per row (per token) with their own scale and zero point, computed on the fly.

    Why not ONNX Runtime's ``quantize_dynamic``: it gives each activation tensor one scale, and
    MiniLM's activations carry outliers (a few channels of a few tokens reach 25-30 where the
    median channel peaks near 2), which coarsen every other value; its answers agreed with fp32
    on 91.6% (per-tensor weights) or 97.1% (per-channel) of 2,000 held-out reviews. A scale per
    row confines an outlier to its own token. The first down-projection (MatMul whose weight has
    more rows than columns: BERT's layer-0 FFN output) stays fp32: its input holds the largest
    outliers, and it was the most sensitive MatMul on training texts. benchmarks/text_int8.py
    measures the recipes (agreement and speed against torch fp32)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(source)
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}

    def constant(name: str, value: np.ndarray) -> str:
        graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    zero, top = constant("q8/zero", np.array(0, np.float32)), constant("q8/255", np.array(255, np.float32))
    eps, inv255 = constant("q8/eps", np.array(1e-8, np.float32)), constant("q8/inv255", np.array(1 / 255, np.float32))
    first, last = constant("q8/first", np.array([0], np.int64)), constant("q8/last", np.array([-1], np.int64))
    quantized_rows: dict[str, str] = {}  # activation -> prefix of its quantized rows (shared by Q, K and V)
    kept_fp32 = False
    nodes = []
    for node in graph.node:
        weight = weights.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or len(weight.dims) != 2:
            nodes.append(node)
            continue
        rows, cols = weight.dims
        if rows > cols and not kept_fp32:
            kept_fp32 = True
            nodes.append(node)
            continue
        w = numpy_helper.to_array(weight).astype(np.float32)
        w_scale = np.maximum(np.abs(w).max(0), 1e-12) / 127
        w_int8 = np.clip(np.round(w / w_scale), -127, 127).astype(np.int8)
        p = node.name or node.output[0]
        x = node.input[0]
        if x not in quantized_rows:
            q = quantized_rows[x] = p
            flat = constant(f"{p}/q8/rows", np.array([-1, rows], np.int64))
            nodes += [
                helper.make_node("Reshape", [x, flat], [f"{q}/x"]),
                helper.make_node("ReduceMax", [f"{q}/x"], [f"{q}/max"], axes=[1], keepdims=1),
                helper.make_node("ReduceMin", [f"{q}/x"], [f"{q}/min"], axes=[1], keepdims=1),
                helper.make_node("Max", [f"{q}/max", zero], [f"{q}/hi"]),  # the range holds 0 exactly
                helper.make_node("Min", [f"{q}/min", zero], [f"{q}/lo"]),
                helper.make_node("Sub", [f"{q}/hi", f"{q}/lo"], [f"{q}/range"]),
                helper.make_node("Max", [f"{q}/range", eps], [f"{q}/range+"]),
                helper.make_node("Mul", [f"{q}/range+", inv255], [f"{q}/scale"]),
                helper.make_node("Div", [f"{q}/lo", f"{q}/scale"], [f"{q}/lo_q"]),
                helper.make_node("Round", [f"{q}/lo_q"], [f"{q}/lo_qr"]),
                helper.make_node("Neg", [f"{q}/lo_qr"], [f"{q}/zero_point"]),
                helper.make_node("Div", [f"{q}/x", f"{q}/scale"], [f"{q}/xs"]),
                helper.make_node("Round", [f"{q}/xs"], [f"{q}/xr"]),
                helper.make_node("Add", [f"{q}/xr", f"{q}/zero_point"], [f"{q}/xz"]),
                helper.make_node("Clip", [f"{q}/xz", zero, top], [f"{q}/xc"]),
                helper.make_node("Cast", [f"{q}/xc"], [f"{q}/x_uint8"], to=TensorProto.UINT8),
                helper.make_node("Shape", [x], [f"{q}/shape"]),
                helper.make_node("Slice", [f"{q}/shape", first, last], [f"{q}/lead"]),
            ]
        q = quantized_rows[x]
        nodes += [
            helper.make_node("MatMulInteger", [f"{q}/x_uint8", constant(f"{p}/q8/w", w_int8)], [f"{p}/q8/acc"]),
            helper.make_node("Cast", [f"{p}/q8/acc"], [f"{p}/q8/accf"], to=TensorProto.FLOAT),
            # sum_k (x_q - z) w_q = sum_k x_q w_q - z * sum_k w_q: the zero point's share, per row
            helper.make_node("Mul", [f"{q}/zero_point", constant(f"{p}/q8/wsum", w_int8.astype(np.float32).sum(0))], [f"{p}/q8/zw"]),
            helper.make_node("Sub", [f"{p}/q8/accf", f"{p}/q8/zw"], [f"{p}/q8/y_int"]),
            helper.make_node("Mul", [f"{p}/q8/y_int", f"{q}/scale"], [f"{p}/q8/y_row"]),
            helper.make_node("Mul", [f"{p}/q8/y_row", constant(f"{p}/q8/wscale", w_scale.astype(np.float32))], [f"{p}/q8/y"]),
            helper.make_node("Concat", [f"{q}/lead", constant(f"{p}/q8/cols", np.array([cols], np.int64))], [f"{p}/q8/shape"], axis=0),
            helper.make_node("Reshape", [f"{p}/q8/y", f"{p}/q8/shape"], [node.output[0]]),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    live = [t for t in graph.initializer if t.name in used]  # the fp32 weights now quantized go
    del graph.initializer[:]
    graph.initializer.extend(live)
    onnx.save(model, target)


def int8_report(
    fp32_path: str, int8_path: str, batches: list[dict[str, np.ndarray]], labels: np.ndarray, tolerance: float
) -> dict[str, Any]:
    """Accuracy of the int8 copy against the (parity-checked) fp32 export on the same rows."""
    fp32 = onnx_probabilities(session(fp32_path), batches).argmax(1)
    int8 = onnx_probabilities(session(int8_path), batches).argmax(1)
    accuracy_fp32, accuracy_int8 = float((fp32 == labels).mean()), float((int8 == labels).mean())
    change = accuracy_int8 - accuracy_fp32
    accepted = -change <= tolerance
    return {
        "file": ONNX_INT8_FILE,
        "rows": int(len(labels)),
        "accuracy_fp32": accuracy_fp32,
        "accuracy_int8": accuracy_int8,
        "accuracy_change": change,
        "agreement_with_fp32": float((fp32 == int8).mean()),
        "tolerance": tolerance,
        "accepted": accepted,
        "note": None if accepted else f"int8 loses {-change:.4f} accuracy (tolerance {tolerance})",
    }


def export_for_registration(config: AppConfig, checkpoint_uri: str, folder: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Export, check and (text) quantize the checkpoint's model into local ``folder`` on held-out
    prepared rows: the version's ``onnx`` metadata and {file name: path} for the registry."""
    from ray_app.bundle import load_bundle

    r = config.registration
    bundle = load_bundle(checkpoint_uri, "cpu")
    batches, labels, split = held_out_batches(bundle, config.train_data_uri(), max(r.onnx_parity_rows, r.int8_eval_rows))
    int8 = r.onnx_int8 if r.onnx_int8 is not None else config.workload in INT8_BY_DEFAULT
    return export_checked(
        bundle, batches, labels, folder, r.onnx_tolerance, r.onnx_parity_rows, int8, r.int8_tolerance, split=split, source=checkpoint_uri
    )


def export_checked(
    bundle: ModelBundle,
    batches: list[dict[str, np.ndarray]],
    labels: np.ndarray,
    folder: str,
    tolerance: float,
    parity_rows: int,
    int8: bool,
    int8_tolerance: float,
    split: str = "test",
    source: str = "the model",
) -> tuple[dict[str, Any], dict[str, str]]:
    """Export ``bundle`` into ``folder``, refuse it (``OnnxParityRefused``) when ONNX Runtime's
    probabilities differ from torch's by more than ``tolerance`` on the first ``parity_rows`` rows
    of ``batches``, and with ``int8`` add a quantized copy judged on all of them against ``labels``."""
    parity_batches = batches[: -(-parity_rows // PARITY_BATCH)]
    fp32_path = os.path.join(folder, ONNX_FILE)
    export(bundle, fp32_path, parity_batches[0])
    checked = {**parity(bundle, fp32_path, parity_batches, tolerance), "split": split}
    if not checked["passed"]:
        raise OnnxParityRefused(
            f"register: the ONNX export of {source} differs from torch by {checked['max_abs_diff']:.3g} in probability "
            f"on {checked['rows']} {split} rows (tolerance {tolerance}). Nothing was registered. Raise "
            "--onnx-tolerance if that difference is acceptable, or register without an export (--no-onnx)"
        )
    files = {ONNX_FILE: fp32_path}
    record: dict[str, Any] = {"file": ONNX_FILE, "opset": OPSET, "dynamic_batch": True, "parity": checked, "int8": None}
    if int8:
        int8_path = os.path.join(folder, ONNX_INT8_FILE)
        quantize_int8(fp32_path, int8_path)
        record["int8"] = {**int8_report(fp32_path, int8_path, batches, labels, int8_tolerance), "split": split}
        files[ONNX_INT8_FILE] = int8_path
    record["sha256"] = {name: sha256_file(path) for name, path in files.items()}
    log.info("register: ONNX export max |diff| %.3g on %d rows; int8 %s", checked["max_abs_diff"], checked["rows"], record["int8"])
    return record, files
