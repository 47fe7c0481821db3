"""Stateful Ray Data steps (decoders, loaded models) that start in warm worker processes.

A Ray Data actor is a new worker process: on 2 cores its start (process, ``import ray``, the
project's modules, torch for a model) took 2-6 s before the first batch, on every stage, even
when the work was one batch. Ray's task workers outlive a task, so the second stage of a chain
(or of a test session) finds torch and the project already imported. So a small input on CPU
runs as tasks of a pool capped like the actor pool would be, each building the step's object
once per process and run (cached under a token fresh for each stage run: nothing of one run,
e.g. a file read by a constructor, is reused by the next). Large inputs and GPU steps keep the
actor pool, where the start-up is paid once for many batches and the device stays pinned.
"""

from __future__ import annotations

import math
import uuid
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import ray.data

# Up to this many calls (batches) a stage runs as warm tasks. A judgment, not a measured optimum:
# an actor's start-up (2-6 s measured on 2 cores) is several batches' work, while tasks with the
# step object cached per worker run batches like an actor does once they are warm; past this many
# batches the actor pool's one-off start-up is small against the run.
WARM_TASK_MAX_CALLS = 16
# Step objects kept per worker process: the current run's and one more (two stages may overlap).
_KEEP = 2
_instances: OrderedDict[str, Any] = OrderedDict()


def pool_size(max_workers: int, rows: int | None, rows_per_call: int) -> int:
    """At most one actor (or concurrent task) per call the input makes: on a small input a
    second one would only start to find no batch left, taking CPU from the first meanwhile.
    ``rows`` None: not known, so ``max_workers``."""
    if rows is None:
        return max(1, max_workers)
    return max(1, min(max_workers, calls(rows, rows_per_call)))


def calls(rows: int, rows_per_call: int) -> int:
    """Calls (batches) an input of ``rows`` makes; an empty input still makes one."""
    return max(1, math.ceil(rows / max(1, rows_per_call)))


def new_run_token() -> str:
    """A token for one stage run (``stateful_map``'s ``run_token``)."""
    return uuid.uuid4().hex


def _instance(cls: type, constructor_kwargs: dict[str, Any], run_token: str) -> Any:
    key = f"{cls.__module__}.{cls.__qualname__}:{run_token}"
    if key not in _instances:
        _instances[key] = cls(**constructor_kwargs)
        while len(_instances) > _KEEP:
            _instances.popitem(last=False)
    _instances.move_to_end(key)
    return _instances[key]


def call_warm(batch: Any, cls: type, constructor_kwargs: dict[str, Any], run_token: str) -> Any:
    """A Ray Data task: ``cls(**constructor_kwargs)`` built once per worker process and run, then called."""
    return _instance(cls, constructor_kwargs, run_token)(batch)


def stateful_map(
    dataset: ray.data.Dataset,
    cls: type,
    constructor_kwargs: dict[str, Any],
    *,
    rows: int | None,
    batch_size: int,
    max_workers: int,
    use_gpu: bool = False,
    run_token: str | None = None,
    **map_batches_kwargs: Any,
) -> ray.data.Dataset:
    """``dataset.map_batches(cls, ...)`` with the object built once per worker: warm tasks for a
    small CPU input, an actor pool sized to the input otherwise (``rows`` None: unknown, large).
    Maps given the same ``run_token`` (one stage run) share the object a worker built for it."""
    import ray.data

    size = pool_size(max_workers, rows, batch_size)
    if not use_gpu and rows is not None and calls(rows, batch_size) <= WARM_TASK_MAX_CALLS:
        return dataset.map_batches(
            call_warm,
            fn_kwargs={"cls": cls, "constructor_kwargs": constructor_kwargs, "run_token": run_token or new_run_token()},
            batch_size=batch_size,
            compute=ray.data.TaskPoolStrategy(size=size),
            **map_batches_kwargs,
        )
    return dataset.map_batches(
        cls,
        fn_constructor_kwargs=constructor_kwargs,
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=size),
        num_gpus=1 if use_gpu else None,
        **map_batches_kwargs,
    )
