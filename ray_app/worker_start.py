"""What every Ray worker process of ours runs first (and ``ray-app`` itself): fewer garbage-collector
passes while it imports.

A new worker process spends most of its start importing: Ray, then torch, transformers, Serve or
onnxruntime as its first task or actor is unpickled. CPython's cyclic garbage collector runs every
700 container allocations, and its older-generation passes walk every object imported so far, so
an import of torch pays for hundreds of passes over a growing heap. Measured here (2 cores):
- an actor that imports torch and Ray Train: 1.72 -> 1.25 s of import CPU; actor ready 1.98 -> 1.70 s;
- a Serve replica's imports (Serve's replica, our model server, onnxruntime): 1.5 -> 1.2 s of CPU.
Worker start-ups are most of the CPU a stage spends before its first batch on a small cluster, and
the whole of a replica's scale-from-zero.

``fewer_gc_pauses`` makes two changes, standard CPython practice for long-lived servers (the ``gc``
module's docs on ``gc.freeze``): what the process imported before the hook (Ray) moves to the
permanent generation, which no pass walks again; and young collections run every 20,000
allocations instead of 700. Cyclic garbage is still collected, a little later; everything else is
freed by reference counting as before.

How it reaches the workers: Ray runs a worker's ``worker_process_setup_hook`` from an environment
variable that every worker inherits from its raylet. A ``runtime_env`` hook sets that variable per
job, but a job with a runtime environment starts its workers through the runtime-env agent, which
cost as much as the hook saved (actor ready 2.02 -> 1.95 s). So the variable is set where Ray
starts: before a local ``ray.init`` (``ray_app.runtime.connect``), in the environment of ``ray start``
(``ray_app.local_cluster``), and in the cluster image (cluster/Dockerfile). A ``runtime_env`` hook of
the user's own still wins: Ray puts it in the job's environment, over the inherited one.
"""

from __future__ import annotations

import gc
import os

# CPython's default is (700, 10, 10). 20,000 allocations between young collections: a few MB of
# young objects at most before a pass; the older generations keep their ratios.
FIRST_GENERATION_THRESHOLD = 20_000

# The module path a worker imports and calls (a string: no pickling, and it means the same in a
# local instance, a `ray start` node and the cluster image).
SETUP_HOOK = f"{__name__}.fewer_gc_pauses"


def fewer_gc_pauses() -> None:
    _, second, third = gc.get_threshold()
    gc.set_threshold(FIRST_GENERATION_THRESHOLD, second, third)
    # A spare pool worker of a serving node imports a replica's modules now (ray_app.warm_workers),
    # under the raised threshold, and they are frozen with the rest.
    from ray_app.warm_workers import import_if_spare

    import_if_spare()
    gc.freeze()


def hook_variable() -> str:
    """The variable Ray's workers read their setup hook from (Ray's name for it, not a copy)."""
    from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR

    return WORKER_PROCESS_SETUP_HOOK_ENV_VAR


def hook_env() -> dict[str, str]:
    """The environment entry that makes workers started under it run the hook."""
    return {hook_variable(): SETUP_HOOK}


def install_for_local_start() -> None:
    """Before this process starts a local Ray: its raylet, and so every worker, inherits the hook.
    A value already set (the user's, or a cluster image's) is kept."""
    for name, value in hook_env().items():
        os.environ.setdefault(name, value)
