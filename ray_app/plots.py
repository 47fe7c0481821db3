"""Plots as PNG bytes, drawn with matplotlib's object API (no pyplot global state, no display)."""

from __future__ import annotations

import io
from typing import Any

from matplotlib.figure import Figure


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def training_curves(history: list[dict[str, Any]]) -> bytes:
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(9, 3.5))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for split in ("train", "val"):
        ax_loss.plot(epochs, [h[f"{split}_loss"] for h in history], marker="o", label=split)
        ax_acc.plot(epochs, [h[f"{split}_accuracy"] for h in history], marker="o", label=split)
    ax_loss.set(title="loss", xlabel="epoch")
    ax_acc.set(title="accuracy", xlabel="epoch", ylim=(0, 1))
    ax_loss.legend()
    ax_acc.legend()
    return _png(fig)


def confusion_matrix(matrix: list[list[int]], classes: list[str]) -> bytes:
    size = max(4.0, 0.45 * len(classes) + 2)
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true", title="confusion matrix")
    ax.set_xticklabels(classes, rotation=45, ha="right")
    ax.set_yticklabels(classes)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _png(fig)


def calibration(buckets: list[dict[str, float]]) -> bytes:
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.subplots()
    predicted = [b["predicted"] for b in buckets]
    observed = [b["observed"] for b in buckets]
    top = max(predicted + observed + [0.01]) * 1.05
    ax.plot([0, top], [0, top], linestyle="--", color="grey", label="perfect")
    ax.plot(predicted, observed, marker="o", label="model")
    ax.set(xlabel="predicted click rate", ylabel="observed click rate", title="calibration", xlim=(0, top), ylim=(0, top))
    ax.legend()
    return _png(fig)
