"""Spare Ray worker processes for Serve replicas: a replica that scales from zero starts on a process
that already runs Python and Ray and has already imported Serve's replica code and our model server.

Why: a scale-up from zero is mostly process start-up. The Serve controller creates the replica actor;
the raylet starts a new worker process (Python, then Ray, about 0.3 s here) and unpickling the
replica class imports Ray Serve's replica module (0.9 s of CPU on this machine), then ours. Only the
model load (under 0.1 s for an ONNX click model) is specific to the replica. Measured with a trivial
deployment, the controller's "started successfully after" went from 1.0-1.1 s to 0.2 s.

How, with Ray's own pool (no patch to Ray):
- The raylet keeps idle worker processes that belong to no job yet. Ray gives a new actor such a
  worker when its runtime environment matches (our replicas have none), so the replica lands on it.
  ``keep_one_spare`` asks the node's raylet for one when it has none: the raylet's
  ``PrestartWorkers`` call (the one Ray's core worker uses to prestart workers; not in Ray's Python
  API, so it goes to the raylet's gRPC port, with the cluster's auth token).
- A worker learns it is such a spare from ``RAY_JOB_ID``: the raylet starts pool workers with the
  nil job id. In those workers, and only where ``WARM_IMPORTS_VARIABLE`` names modules (set where
  Ray starts for serving), ``ray_app.worker_start``'s hook imports them before the worker waits for
  work. A worker started for a job's task never pays for them.
- Who asks: ``run_serve`` (once the app is deployed, for the first scale-up), every model replica
  half a second after it started (to replace the spare it may have used), and the gateway every
  ``CHECK_EVERY_S`` while one of its models can scale to zero: any task of any job may take the
  spare (Ray gives it the first work that fits), which leaves the node without one. At most one
  spare per node is asked for: the count is read from the node's processes and the raylet. A spare is kept for
  ``KEEP_ALIVE_S`` even when every CPU is taken; after that Ray keeps idle workers up to the node's
  free CPUs (its ``num_workers_soft_limit``), so one spare stays on a node whose model replicas went
  to zero.

Cost: one idle process per serving node (about 200 MB private, ~300 MB RSS, with Serve and ONNX
Runtime imported). Best effort: when the call fails (an older raylet, no permission) the next
replica starts cold, as before.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

# The modules a spare imports: Ray Serve's replica (most of a replica's start), our two deployments
# and ONNX Runtime (the CPU model runtime). Not torch: a torch replica is rare on CPU serving and
# torch would add 1-3 s and ~300 MB to every spare.
SERVE_REPLICA_MODULES = ("ray.serve._private.replica", "ray_app.serving.gateway", "ray_app.serving.model_server", "onnxruntime")
WARM_IMPORTS_VARIABLE = "RAY_APP_WARM_IMPORTS"
# Ray's nil job id, which the raylet gives the workers it starts for its pool (JobID::Nil()).
POOL_WORKER_JOB_ID = "ffffffff"
# Long enough to outlive a burst that takes every CPU; Ray's soft limit governs after that.
KEEP_ALIVE_S = 600
# How often a gateway checks its node still has a spare: a process scan and, when there is a
# candidate, one raylet call (a few ms).
CHECK_EVERY_S = 5.0


def serving_env() -> dict[str, str]:
    """The environment entry that makes a node's pool workers spares for Serve replicas, set where
    Ray starts to serve: a local ``ray-app <workload> serve`` (``runtime.prepare_local_start``),
    the test session; on a cluster, the serving nodes' environment before ``ray start`` (README)."""
    return {WARM_IMPORTS_VARIABLE: ",".join(SERVE_REPLICA_MODULES)}


# What this process imported as a spare (set by its setup hook; read by a replica to report a warm start).
imported_as_spare: list[str] = []


def import_if_spare() -> list[str]:
    """In a pool worker of a node set up for serving: import the replica's modules now, before any
    work arrives. Returns what it imported (nothing in every other process)."""
    modules = [m for m in os.environ.get(WARM_IMPORTS_VARIABLE, "").split(",") if m]
    if not modules or os.environ.get("RAY_JOB_ID", "").lower() != POOL_WORKER_JOB_ID:
        return []
    imported = imported_as_spare
    for module in modules:
        try:
            __import__(module)
            imported.append(module)
        except Exception as exc:  # noqa: BLE001 - a spare that could not warm up is still a worker
            log.warning("spare worker: could not import %s (%s: %s)", module, type(exc).__name__, exc)
    return imported


def warming_enabled() -> bool:
    return bool(os.environ.get(WARM_IMPORTS_VARIABLE))


@dataclass(frozen=True)
class Raylet:
    """A raylet on this machine: its process (whose pool workers we count) and its gRPC address."""

    pid: int
    address: str


def local_raylet(node_id: str | None = None) -> Raylet | None:
    """This machine's raylet for ``node_id`` (default: the caller's node), or None when that raylet
    runs elsewhere (a remote driver). Its command line names the node."""
    import psutil
    import ray

    node_id = node_id or ray.get_runtime_context().get_node_id()
    for process in psutil.process_iter(["name", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if process.info["name"] == "raylet" and f"--node_id={node_id}" in cmdline:
            (node,) = [n for n in ray.nodes() if n["NodeID"] == node_id and n["Alive"]]
            return Raylet(process.pid, f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}")
    return None


def spare_pids(raylet: Raylet, started_only: bool = False) -> list[int]:
    """Pool workers of that raylet that no job has taken yet: idle (Ray titles them ``ray::IDLE``
    once started) or, unless ``started_only``, still starting. A worker that took an actor (a
    replica, the Serve controller) has its actor's title instead. A worker that ran a job's task
    is idle again afterwards but bound to that job (Ray gives it only that job's work, so not a
    replica of another), and its environment still says the nil job: the raylet's view of each
    worker tells those apart."""
    import psutil

    candidates: dict[int, bool] = {}  # pid -> started
    for process in psutil.process_iter(["cmdline"]):
        title = (process.info["cmdline"] or [""])[0]
        idle = title.startswith("ray::IDLE")
        if not idle and (started_only or title.startswith("ray::")):
            continue
        try:
            env = process.environ()
        except psutil.Error:
            continue
        if env.get("RAY_RAYLET_PID") == str(raylet.pid) and env.get("RAY_JOB_ID", "").lower() == POOL_WORKER_JOB_ID:
            candidates[process.pid] = idle
    if any(candidates.values()):
        bound = _workers_bound_to_a_job(raylet.address)
        candidates = {pid: started for pid, started in candidates.items() if pid not in bound}
    return sorted(candidates)


def spares_of(raylet: Raylet, started_only: bool = False) -> int:
    return len(spare_pids(raylet, started_only))


def _workers_bound_to_a_job(raylet_address: str) -> set[int]:
    """Pids of the raylet's registered workers that hold a job (from its ``GetNodeStats`` call,
    which asks each worker; a few ms)."""
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import node_manager_pb2, node_manager_pb2_grpc

    channel = init_grpc_channel(raylet_address)  # adds the cluster's auth token when token auth is on
    try:
        reply = node_manager_pb2_grpc.NodeManagerServiceStub(channel).GetNodeStats(node_manager_pb2.GetNodeStatsRequest(), timeout=10)
    finally:
        channel.close()
    return {w.pid for w in reply.core_workers_stats if w.job_id.hex().lower() != POOL_WORKER_JOB_ID}


def keep_one_spare(keep_alive_s: int = KEEP_ALIVE_S) -> bool:
    """Make sure this node has a spare worker, asking its raylet for one when it has none. Returns
    whether one was requested (the raylet starts it in the background). A no-op where spares are
    not set up, and best effort: a failure only means the next replica starts cold."""
    if not warming_enabled():
        return False
    try:
        raylet = local_raylet()
        if raylet is None or spares_of(raylet):
            return False  # the raylet is on another machine (a remote driver), or a spare is there
        _prestart(raylet.address, 1, keep_alive_s)
        return True
    except Exception as exc:  # noqa: BLE001 - best effort: a cold start is the fallback, not an error
        log.warning("could not ask the raylet for a spare worker (%s: %s); the next replica starts cold", type(exc).__name__, exc)
        return False


def _prestart(raylet_address: str, count: int, keep_alive_s: int) -> None:
    """The raylet's ``PrestartWorkers`` call: ``count`` Python workers for no job and no runtime
    environment, kept at least ``keep_alive_s`` even when idle."""
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import common_pb2, node_manager_pb2, node_manager_pb2_grpc

    channel = init_grpc_channel(raylet_address)  # adds the cluster's auth token when token auth is on
    try:
        request = node_manager_pb2.PrestartWorkersRequest(
            language=common_pb2.Language.PYTHON, num_workers=count, keep_alive_duration_secs=keep_alive_s
        )
        node_manager_pb2_grpc.NodeManagerServiceStub(channel).PrestartWorkers(request, timeout=10)
    finally:
        channel.close()


def keep_a_spare_from_now_on(every_s: float = CHECK_EVERY_S) -> threading.Thread | None:
    """Check every ``every_s`` that this node has a spare, in a daemon thread (it ends with the
    process). None where spares are not set up."""
    if not warming_enabled():
        return None

    def check_forever() -> None:
        while True:
            keep_one_spare()
            time.sleep(every_s)

    thread = threading.Thread(target=check_forever, name="keep-a-spare-worker", daemon=True)
    thread.start()
    return thread
