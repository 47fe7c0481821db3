"""Wrote ``frozen_bundle_v1/`` once, with ``save_bundle`` as of commit d81bd79 (before bundles had a
``format_version``): a tiny image model briefly trained on scikit-learn's 8×8 digits 0-2, and the
probabilities it gave for six digits. Kept for provenance; tests only read the files it wrote.

    PYTHONPATH=<checkout of d81bd79> python tests/data/make_frozen_bundle_v1.py
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits

from ray_app.bundle import load_bundle, save_bundle
from ray_app.workloads.image import ImageOptions, ImageWorkload

HERE = os.path.dirname(os.path.abspath(__file__))
CLASSES = ["0", "1", "2"]


def digit_pngs() -> tuple[list[bytes], list[int]]:
    """The first six digits 0-2 of scikit-learn's set as 8-bit grayscale PNGs."""
    digits = load_digits()
    keep = [i for i, t in enumerate(digits.target) if t < 3][:6]
    pngs = []
    for i in keep:
        buffer = io.BytesIO()
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8), mode="L").save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    return pngs, [int(digits.target[i]) for i in keep]


def main() -> None:
    torch.manual_seed(0)
    workload = ImageWorkload()
    options = ImageOptions(image_size=8, channels=1, width=2)
    manifest = {"classes": CLASSES, "shape": [1, 8, 8], "pixel_stats": {"mean": [0.3], "std": [0.35]}}
    model = workload.build_model(options, manifest, pretrained=False)
    digits = load_digits()
    mask = digits.target < 3
    x = torch.from_numpy((digits.images[mask] * 255 / 16).astype(np.uint8)[:, None])
    y = torch.from_numpy(digits.target[mask]).long()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    steps = 60
    for _ in range(steps):
        batch = torch.randint(0, len(x), (64,))
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    folder = os.path.join(HERE, "frozen_bundle_v1")
    info = {
        "workload": "image",
        "options": options.model_dump(),
        "manifest": manifest,
        "metrics": {"epoch": 1, "train_loss": round(loss.item(), 4)},
        "training": {"epoch": 1, "steps": steps},
        "run_name": "frozen-v1",
    }
    save_bundle(model, folder, info)
    bundle = load_bundle(folder)
    pngs, labels = digit_pngs()
    items = [workload.decode_item(p, bundle.options, bundle.manifest) for p in pngs]
    probabilities = bundle.predict_proba(workload.stack_items(items, bundle.options, bundle.manifest))
    with open(os.path.join(HERE, "frozen_bundle_v1.expected.json"), "w") as f:
        json.dump({"labels": labels, "probabilities": probabilities.tolist()}, f, indent=1)


if __name__ == "__main__":
    main()
