"""The model deployment: one per workload. Loads a registered model by alias or version, decodes
requests with that model's own preprocessing (so a version switch swaps both at once), and runs
every item that arrives within the batch window through one forward pass (``@serve.batch``).

Rollout: ``user_config.model`` names an alias (``production``) or a version. Changing it in the
Serve config is a lightweight update (``reconfigure``, no replica restart). Replicas that follow an
alias also re-read the registry every ``alias_poll_s`` seconds, so ``ray-app <workload> register
--alias production`` rolls a running app forward on its own. The new bundle loads in a thread
while the old one keeps answering; requests in flight finish on the bundle they were decoded with.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
from typing import Any

import numpy as np
from ray import serve

from ray_app import warm_workers
from ray_app.config import ServeConfig
from ray_app.serving.loaders import ModelLoader, RegistryLoader, ServedModel
from ray_app.serving.metrics import ModelMetrics
from ray_app.workloads.base import BadInput, StateUnavailable

log = logging.getLogger("ray.serve")  # Serve's logger: lines land in the replica's log file
DECODE_THREADS = 4
# The request that woke this replica is answered first; then a spare worker replaces the one it used
# (soon: a replica may live only a few seconds after a burst).
SPARE_REQUEST_DELAY_S = 0.5


def follows_alias(ref: str) -> bool:
    """A version number or a bundle URI pins the model; anything else is an alias that can move."""
    return not (ref.isdigit() or "/" in ref or "://" in ref)


@serve.deployment
class ModelServer:
    """``ModelServer.bind(workload, settings, loader=...)``: ``settings`` is the workload's resolved
    ``ServeConfig``; ``loader`` (a ``ray_app.serving.loaders.ModelLoader``) decides where models come
    from — by default the registry at ``./workspace/models``. This module never imports torch
    itself: only a loader that needs it does."""

    def __init__(self, workload: str, settings: ServeConfig | dict[str, Any], loader: ModelLoader | None = None) -> None:
        self.workload_name = workload
        self.settings = ServeConfig.model_validate(settings)
        self.loader = loader if loader is not None else RegistryLoader()
        self.bundle: ServedModel | None = None
        self.model_ref, self.model_uri = self.settings.model, ""
        self.metrics = ModelMetrics(workload)
        self.predict_batch.set_max_batch_size(self.settings.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)
        self._alias_watch: asyncio.Task | None = None
        self._spare_request: asyncio.Task | None = None
        # The reference to serve, set the moment a reconfigure (a pin) arrives; loads are
        # serialized by the lock, and a load whose reference is no longer wanted when it finishes
        # is dropped, so an alias poll in flight can never undo a pin that came after it.
        self.wanted_ref = self.settings.model
        self._load_lock = asyncio.Lock()
        # Set when the last alias poll failed (registry unreadable, new version unloadable): the
        # replica keeps serving what it has and readiness reports it as stale.
        self.problem: str | None = None
        # Request decoding (image decode, tokenizing, JSON validation) runs here, off the event
        # loop and apart from the forward passes' threads, so a burst of costly bodies delays
        # neither Serve's probes nor the batches already decoded.
        self._decoders = concurrent.futures.ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="decode")

    # ---- versions -------------------------------------------------------------------------
    def _load(self, ref: str) -> bool:
        uri = self.loader.resolve(self.workload_name, ref)
        if uri == self.model_uri and self.bundle is not None:
            if ref == self.wanted_ref:  # e.g. a pin to the version already served
                self.model_ref = ref
            return False
        bundle = self.loader.load(self.workload_name, uri, self.settings.num_gpus > 0)
        bundle.workload.bind_serving(self.settings)  # e.g. the ctr online feature store
        if ref != self.wanted_ref:  # a pin arrived while this loaded: it wins
            log.info("%s: dropping %s (loaded for %r; %r is wanted now)", self.workload_name, uri, ref, self.wanted_ref)
            return False
        # One assignment: a request sees the old bundle or the new one, never a mix.
        self.bundle, self.model_ref, self.model_uri = bundle, ref, uri
        log.info("%s: serving %s (version %s)", self.workload_name, uri, bundle.info.get("version"))
        return True

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        # Serve calls this before the replica takes traffic, so a replica is ready only with a model.
        ref = str(user_config.get("model", self.settings.model))
        self.wanted_ref = ref  # before waiting for the lock: a poll's load in flight sees it
        async with self._load_lock:
            await asyncio.to_thread(self._load, ref)
            self.problem = None
        if self._alias_watch is None and self.settings.alias_poll_s > 0:
            self._alias_watch = asyncio.get_running_loop().create_task(self._follow_alias())
        if self._spare_request is None:
            self._spare_request = asyncio.get_running_loop().create_task(self._replace_spare())

    async def _replace_spare(self) -> None:
        """This replica may have started on the node's spare worker: ask for a new one, a little
        later, so its start-up does not compete with the first requests (ray_app.warm_workers)."""
        await asyncio.sleep(SPARE_REQUEST_DELAY_S)
        await asyncio.to_thread(warm_workers.keep_one_spare)

    async def _follow_alias(self) -> None:
        while True:
            await asyncio.sleep(self.settings.alias_poll_s)
            await self.poll_alias()

    async def poll_alias(self) -> None:
        """Re-read the alias being served; a failure keeps the current model and marks it stale."""
        ref = self.wanted_ref
        if not follows_alias(ref):
            return
        async with self._load_lock:
            if ref != self.wanted_ref:
                return
            try:
                await asyncio.to_thread(self._load, ref)
                self.problem = None
            except Exception as exc:  # noqa: BLE001 - a broken registry or version must not take down the one serving
                self.problem = f"alias {ref!r} could not be followed ({type(exc).__name__}: {exc}); serving {self.model_uri}"
                log.warning("%s: %s", self.workload_name, self.problem)

    def ready(self) -> dict[str, Any]:
        """The readiness probe: cheap (``describe`` also builds the request schema). ``stale``:
        the last alias poll failed, so this replica may serve an older version than the alias."""
        loaded = self.bundle is not None
        return {
            "loaded": loaded,
            "stale": self.problem is not None,
            "problem": self.problem,
            "version": self.bundle.info.get("version") if loaded else None,
            # Started on a spare worker that had imported Serve and this module (ray_app.warm_workers).
            "warm_start": bool(warm_workers.imported_as_spare),
        }

    def describe(self) -> dict[str, Any]:
        b = self.bundle
        return {
            "workload": self.workload_name,
            "ref": self.model_ref,
            "version": b.info.get("version"),
            "uri": self.model_uri,
            "classes": b.classes,
            "metrics": b.info.get("metrics"),
            "device": str(b.device),
            "request_schema": b.workload.request_schema(b.options, b.manifest),
        }

    # ---- online state (ctr behaviour history) ----------------------------------------------
    async def events(self, payload: bytes) -> dict[str, Any]:
        """Events that update the workload's online state, answered like ``predict``: bad input is
        a 422, a store that cannot take the write a 503 (the client retries; ingest is idempotent)."""
        b = self.bundle
        ingest = functools.partial(b.workload.ingest_events, payload, b.options, b.manifest, max_items=self.settings.max_items_per_request)
        return await self._state_call(ingest)

    async def purge(self, user: str) -> dict[str, Any]:
        b = self.bundle
        return await self._state_call(functools.partial(b.workload.purge_user, user, b.manifest))

    async def _state_call(self, call: Any) -> dict[str, Any]:
        try:
            body = await asyncio.get_running_loop().run_in_executor(self._decoders, call)
        except BadInput as exc:
            return {"status": 422, "message": str(exc)}
        except StateUnavailable as exc:
            return {"status": 503, "message": str(exc)}
        return {"status": 200, "body": body}

    # ---- inference ------------------------------------------------------------------------
    async def predict(self, payload: bytes) -> dict[str, Any]:
        """An HTTP body -> ``{"status": 200, "body": answer}`` or ``{"status": 4xx, "message": ...}``:
        bad input is an answer, not an exception, so it never counts as a replica failure."""
        b = self.bundle
        limit = self.settings.max_items_per_request
        loop = asyncio.get_running_loop()
        decode = functools.partial(b.workload.decode_request, payload, b.options, b.manifest, max_items=limit)
        try:
            decoded = await loop.run_in_executor(self._decoders, decode)
        except BadInput as exc:
            return {"status": 422, "message": str(exc)}
        if len(decoded) > limit:
            return {"status": 422, "message": f"{len(decoded)} items in one request, at most {limit}"}
        # Each item joins the replica-wide batch on its own, so one request with many items and
        # many single-item requests share forward passes alike.
        probabilities = await asyncio.gather(*(self.predict_batch((b, item)) for item, _ in decoded))
        top_k = min(self.settings.top_k, len(b.classes))
        answer = b.workload.format_response(list(probabilities), [extras for _, extras in decoded], b.classes, top_k)
        return {"status": 200, "body": {"model": {"workload": self.workload_name, "version": b.info.get("version")}, **answer}}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def predict_batch(self, items: list[tuple[ServedModel, Any]]) -> list[np.ndarray]:
        # The forward pass runs off the event loop (torch releases the GIL), so the replica keeps
        # decoding the next requests and answering Serve's health and queue-length probes meanwhile.
        return await asyncio.to_thread(self._forward, items)

    def _forward(self, items: list[tuple[ServedModel, Any]]) -> list[np.ndarray]:
        # During a switch a batch can hold items decoded for two versions: each runs on its own.
        results: list[np.ndarray | None] = [None] * len(items)
        labels: list[str] = []
        for bundle in {id(b): b for b, _ in items}.values():
            positions = [i for i, (b, _) in enumerate(items) if b is bundle]
            inputs = bundle.stack([items[i][1] for i in positions])  # tensors for torch, arrays for ONNX Runtime
            for i, p in zip(positions, bundle.predict_proba(inputs), strict=True):
                results[i] = p
                labels.append(bundle.classes[int(np.argmax(p))])
        self.metrics.observe_batch(len(items), labels)
        return results
