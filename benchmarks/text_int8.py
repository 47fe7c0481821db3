"""Text int8 recipes offline (issue 15 item 2): agreement with fp32 and speed, in one run, no Ray.

The model is the one ``text_serving.py`` serves: packaged MiniLM (pretrained weights) with a
logistic-regression head fitted on real Rotten Tomatoes snippets. It is exported to ONNX exactly as
register does (``ray_app.onnx_export.export``); every int8 recipe then quantizes that same fp32
graph, so agreement compares int8 with fp32 of one model.

* agreement: argmax equality with the fp32 export on ``--agreement-texts`` held-out snippets, in
  register's batches of 64 (``PARITY_BATCH``); plus accuracy and the largest probability change;
* speed: texts/s at the batch a model replica forms at c=16 (``--batch`` 16: 16 one-text requests
  in flight, padded to the batch's longest text), for torch fp32, ONNX Runtime fp32 and each int8
  recipe, at 2 and 1 threads. The machine is shared: the variants run interleaved, round after
  round, and each ratio is the median over rounds of (variant / torch fp32 in the same round),
  per second of wall time and per second of the process's CPU time (the steadier one when other
  jobs share the cores; at c=16 a replica's CPU is what caps its req/s).

Run: ``python benchmarks/text_int8.py [--rounds 7] [--agreement-texts 2000]`` (``make bench-int8``).
Prints the table; writes benchmarks/results/text_int8.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from text_serving import arrays, fitted_classifier, reviews  # noqa: E402

from ray_app.onnx_export import PARITY_BATCH, export, quantize_int8  # noqa: E402
from ray_app.onnx_runtime import session  # noqa: E402


def quantize_dynamic_per_channel(source: str, target: str) -> None:
    """The recipe register used before: int8 weights with per-channel scales, activations
    quantized per tensor on the fly (ONNX Runtime ``quantize_dynamic``)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True)


def quantize_dynamic_per_tensor(source: str, target: str) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=False)


def blockwise(block_size: int):
    def quantize(source: str, target: str) -> None:
        import logging

        root = logging.getLogger()
        guard = logging.NullHandler()  # the module calls logging.basicConfig(INFO) at import
        root.addHandler(guard)
        try:
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer  # needs onnx-ir
        finally:
            root.removeHandler(guard)
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
        quantizer = MatMulNBitsQuantizer(source, bits=8, block_size=block_size, is_symmetric=True, accuracy_level=4)
        quantizer.process()
        quantizer.model.save_model_to_file(target, use_external_data_format=False)

    quantize.__doc__ = f"MatMulNBits: 8-bit weights in blocks of {block_size}, int8 compute on activations quantized per row and block"
    return quantize


RECIPES = {
    "dynamic_per_tensor": quantize_dynamic_per_tensor,
    "dynamic_per_channel": quantize_dynamic_per_channel,
    "blockwise8_b32": blockwise(32),
    "blockwise8_b64": blockwise(64),
    "per_row (register)": quantize_int8,
}


def rebatch(batches: list[dict[str, np.ndarray]], size: int) -> list[dict[str, np.ndarray]]:
    """Register's batches of 64 cut into ``size`` rows, each padded only to its own longest text
    (as the model server pads a batch)."""
    out = []
    for batch in batches:
        for start in range(0, len(batch["input_ids"]), size):
            mask = batch["attention_mask"][start : start + size]
            width = int(mask.sum(1).max())
            out.append({"input_ids": batch["input_ids"][start : start + size, :width], "attention_mask": mask[:, :width]})
    return out


def onnx_probabilities(onnx_session, batches) -> np.ndarray:
    return np.concatenate([onnx_session.run(None, batch)[0] for batch in batches])


def timed(run, batches) -> tuple[float, float]:
    """Texts per second of wall time and per second of this process's CPU time: on a shared
    machine the wall clock counts other jobs' time too; CPU time is what a replica spends."""
    wall, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        run(batch)
    texts = sum(len(b["input_ids"]) for b in batches)
    return texts / (time.perf_counter() - wall), texts / (time.process_time() - cpu)


def speed(runners: dict, batches, rounds: int) -> dict[str, dict[str, float]]:
    """Interleaved rounds (order rotated each round); per variant the median texts/s and the
    median of its per-round ratio to the first runner (torch fp32)."""
    names = list(runners)
    for run in runners.values():  # warm: first-run allocations, thread pools
        for batch in batches[:2]:
            run(batch)
    per_round: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            per_round[name].append(timed(runners[name], batches))
    base = per_round[names[0]]
    out = {}
    for name, values in per_round.items():
        out[name] = {
            "texts_per_s": statistics.median(v[0] for v in values),
            "vs_torch_fp32": statistics.median(v[0] / b[0] for v, b in zip(values, base, strict=True)),
            "texts_per_cpu_s": statistics.median(v[1] for v in values),
            "cpu_vs_torch_fp32": statistics.median(v[1] / b[1] for v, b in zip(values, base, strict=True)),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fit-texts", type=int, default=1000)
    parser.add_argument("--agreement-texts", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=16, help="texts per model call (a replica's batch at c=16)")
    parser.add_argument("--speed-texts", type=int, default=256, help="held-out texts per timed pass")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    args = parser.parse_args()

    import torch

    work = tempfile.mkdtemp(prefix="ray_app_text_int8_")
    texts, labels = reviews()
    fit = slice(0, args.fit_texts)
    held = slice(args.fit_texts, args.fit_texts + args.agreement_texts)
    started = time.perf_counter()
    bundle = fitted_classifier(texts[fit], labels[fit])
    fit_s = time.perf_counter() - started
    held_out, held_labels = arrays(bundle, texts[held]), labels[held]
    assert len(held_out[0]["input_ids"]) == PARITY_BATCH

    fp32_path = os.path.join(work, "model.onnx")
    export(bundle, fp32_path, held_out[0])
    fp32 = onnx_probabilities(session(fp32_path), held_out)
    results: dict = {
        "fit_s": fit_s,
        "texts": len(held_labels),
        "accuracy_fp32": float((fp32.argmax(1) == held_labels).mean()),
        "recipes": {},
    }
    paths = {"onnx_fp32": fp32_path}
    for name in args.recipes:
        path = os.path.join(work, f"{name.split()[0]}.onnx")
        started = time.perf_counter()
        RECIPES[name](fp32_path, path)
        quantize_s = time.perf_counter() - started
        int8 = onnx_probabilities(session(path), held_out)
        results["recipes"][name] = {
            "agreement_with_fp32": float((int8.argmax(1) == fp32.argmax(1)).mean()),
            "accuracy": float((int8.argmax(1) == held_labels).mean()),
            "max_abs_prob_diff": float(np.abs(int8 - fp32).max()),
            "quantize_s": quantize_s,
            "mb": os.path.getsize(path) / 2**20,
        }
        paths[name] = path
        print(f"  {name}: {results['recipes'][name]}", flush=True)

    batches = rebatch(held_out, args.batch)[: max(1, args.speed_texts // args.batch)]
    results["speed"] = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        runners = {"torch_fp32": lambda b: bundle.predict_proba({k: torch.from_numpy(v) for k, v in b.items()})}
        for name, path in paths.items():
            runners[name] = lambda b, s=session(path, threads): s.run(None, b)
        results["speed"][threads] = speed(runners, batches, args.rounds)

    print(
        f"\ntext int8 recipes: MiniLM + fitted head, {results['texts']} held-out snippets (fp32 accuracy "
        f"{results['accuracy_fp32']:.4f}); speed at batch {args.batch}, median of {args.rounds} interleaved rounds"
    )
    header = f"  {'variant':22s} {'agree':>7s} {'acc':>7s} {'max|dp|':>8s} {'MB':>5s}"
    header += "".join(f" {f'{t}thr t/s':>10s} {'x':>6s} {'t/cpu-s':>8s} {'x':>6s}" for t in args.threads)
    print(header)
    for name in ["torch_fp32", *paths]:
        r = results["recipes"].get(name)
        row = f"  {name:22s} " + (
            f"{r['agreement_with_fp32']:7.4f} {r['accuracy']:7.4f} {r['max_abs_prob_diff']:8.4f} {r['mb']:5.1f}"
            if r
            else f"{'':7s} {'':7s} {'':8s} {'':5s}"
        )
        for threads in args.threads:
            s = results["speed"][threads][name]
            row += f" {s['texts_per_s']:10.1f} {s['vs_torch_fp32']:5.2f}x {s['texts_per_cpu_s']:8.1f} {s['cpu_vs_torch_fp32']:5.2f}x"
        print(row)
    os.makedirs("benchmarks/results", exist_ok=True)
    with open("benchmarks/results/text_int8.json", "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
