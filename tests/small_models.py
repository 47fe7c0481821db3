"""Each workload's real model architecture with seeded random weights, registered without training.

Serving contract tests need *a* model per workload, not one that learned anything: building these
takes a second or two, where a trained chain costs a minute or more per workload.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

CTR_MANIFEST = {
    "classes": ["no_click", "click"],
    "transform": {"numeric_columns": ["age"], "categorical_columns": ["user"], "buckets": 16, "means": [0.0], "stds": [1.0]},
    "time_cutoffs": [100.0, 200.0],
    "split_fractions": [0.1, 0.1],
}
# workload -> (options, manifest); a click event for the ctr model is {"age": <number>, "user": <id>}.
SMALL_MODELS = {
    "image": ({"image_size": 28, "channels": 1, "width": 4}, {"classes": [str(i) for i in range(10)], "shape": [1, 28, 28]}),
    "text": ({"max_length": 64}, {"classes": ["fresh", "rotten"], "split_fractions": [0.1, 0.1], "max_length": 64, "model_dir": None}),
    "ctr": ({"numeric_columns": ["age"], "categorical_columns": ["user"], "buckets": 16}, CTR_MANIFEST),
}


def small_registry(root: str, run_name: str = "untrained") -> str:
    """A model registry under ``root`` holding version 1 of every workload under alias production.
    The metadata carries what a registered training run records for the model console's cards
    (run name, data location and fingerprint)."""
    import torch

    from ray_app.bundle import save_bundle
    from ray_app.registry import ModelRegistry
    from ray_app.workloads import get_workload

    models = os.path.join(root, "models")
    for name, (options, manifest) in SMALL_MODELS.items():
        workload = get_workload(name)
        parsed = workload.parse_options(options)
        torch.manual_seed(0)
        model = workload.build_model(parsed, manifest, pretrained=False).eval()
        bundle = small_bundle_uri(root, name)
        save_bundle(model, bundle, {"workload": name, "options": parsed.model_dump(mode="json"), "manifest": manifest, "metrics": {}})
        ModelRegistry(models).register(name, bundle, card_metadata(root, name, run_name), alias="production")
    return models


def small_bundle_uri(root: str, workload: str) -> str:
    return os.path.join(root, f"{workload}-bundle")


def card_metadata(root: str, workload: str, run_name: str) -> dict[str, Any]:
    data = os.path.join(root, workload, "prepared")
    return {"run_name": run_name, "data": data, "data_fingerprint": hashlib.sha256(data.encode()).hexdigest()}
