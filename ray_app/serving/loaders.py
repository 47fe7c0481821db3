"""Where a model deployment's models come from.

``ModelServer`` takes its loader as a constructor argument, as Ray's own e2e examples do: the
default reads the model registry; tests pass models they hold in memory, and another runtime
(ONNX) passes its own. A loader is two steps so that following an alias stays cheap: ``resolve``
says which model a reference names now (polled every few seconds), ``load`` builds it (only when
that answer changes).

Nothing here imports torch at module import: a loader that needs it imports it when it loads, so a
replica given a torch-free loader never pays for (or needs) torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ray_app import storage

if TYPE_CHECKING:
    import numpy as np
    from pydantic import BaseModel

    from ray_app.bundle import ModelBundle
    from ray_app.workloads.base import Workload

DEFAULT_MODELS = "./workspace/models"


@runtime_checkable
class ServedModel(Protocol):
    """What a model replica needs from a loaded model (``ray_app.bundle.ModelBundle`` is one):
    the workload's request decoding and answer formatting, and a forward pass to probabilities."""

    workload: Workload
    options: BaseModel
    manifest: dict[str, Any]
    info: dict[str, Any]  # "version", "metrics", ... as shown by /v1/models
    device: Any  # shown by /v1/models; str() of it is enough

    @property
    def classes(self) -> list[str]: ...

    def stack(self, items: list[Any]) -> Any:
        """Decoded items -> this model's inputs for one forward pass."""

    def predict_proba(self, inputs: Any) -> np.ndarray: ...


class ModelLoader(Protocol):
    """Passed to ``ModelServer.bind(workload, settings, loader=...)``; pickled into each replica."""

    def resolve(self, workload: str, ref: str) -> str:
        """The identity (e.g. a bundle URI) of the model ``ref`` names now; raises if there is none."""

    def load(self, workload: str, resolved: str, use_gpu: bool) -> ServedModel:
        """The model ``resolve`` named, ready to answer requests."""


class RegistryLoader:
    """The default: registry aliases and versions (or a bundle URI) under ``models``, loaded as bundles
    whose weights' SHA-256 is checked.

    ``runtime``: ``onnx`` serves CPU replicas from the ONNX export register made (ONNX Runtime and the
    Rust tokenizer: no torch, no transformers in the replica); ``auto`` does so where the version has
    an export and falls back to torch where it has none (versions registered before exports);
    ``torch`` always loads the safetensors weights. GPU replicas always run torch. ``precision``
    picks the int8 text export (``auto``: when register accepted it) or fp32."""

    def __init__(self, models: str = DEFAULT_MODELS, runtime: str = "auto", precision: str = "auto") -> None:
        self.models = models
        self.runtime = runtime
        self.precision = precision

    def resolve(self, workload: str, ref: str) -> str:
        from ray_app.registry import resolve_model_uri

        return storage.normalize(resolve_model_uri(self.models, workload, ref))

    def load(self, workload: str, resolved: str, use_gpu: bool) -> ServedModel:
        from ray_app.onnx_runtime import load_for_runtime

        return load_for_runtime(resolved, use_gpu, self.runtime, self.precision)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"RegistryLoader({self.models!r}, runtime={self.runtime!r}, precision={self.precision!r})"


class InMemoryLoader:
    """Models held by the loader itself, by reference (``{"production": model}``); a reference that is
    not a key is unknown, like a missing alias. No registry, no files: for contract tests and notebooks."""

    def __init__(self, models: Mapping[str, ServedModel]) -> None:
        self.models = dict(models)

    def resolve(self, workload: str, ref: str) -> str:
        if ref not in self.models:
            raise KeyError(f"{workload}: no in-memory model {ref!r}; have {sorted(self.models)}")
        return ref

    def load(self, workload: str, resolved: str, use_gpu: bool) -> ServedModel:
        return self.models[resolved]


def untrained_model(
    workload_name: str, manifest: dict[str, Any], options: dict[str, Any] | None = None, version: int = 0, seed: int = 0
) -> ModelBundle:
    """A workload's real model architecture and preprocessing with seeded random weights: the
    request/response contract without training anything (``pretrained=False``: no base weights)."""
    import torch

    from ray_app.bundle import ModelBundle
    from ray_app.workloads import get_workload

    workload = get_workload(workload_name)
    parsed = workload.parse_options(options or {})
    torch.manual_seed(seed)
    model = workload.build_model(parsed, manifest, pretrained=False).eval()
    info = {"workload": workload_name, "version": version, "metrics": {}, "options": parsed.model_dump(mode="json")}
    return ModelBundle(workload, parsed, manifest, model, info, torch.device("cpu"))
