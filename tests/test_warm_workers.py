"""Spare worker processes for Serve replicas (ray_app.warm_workers): only a pool worker of a node set
up for serving imports the replica's modules, a node is given at most one spare, and a new actor
lands on it with those modules already imported. (The Serve side, a click replica scaling from
zero onto the spare, is in test_ctr.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil
import ray

from ray_app import warm_workers

PROBE = (
    "import json, sys; from ray_app.worker_start import fewer_gc_pauses; fewer_gc_pauses(); "
    "from ray_app import warm_workers; print(json.dumps([warm_workers.imported_as_spare, 'ray.serve._private.replica' in sys.modules]))"
)


def hook_in_a_process(**env: str) -> list:
    """Run the workers' setup hook in a fresh interpreter with that environment."""
    clean = {k: v for k, v in os.environ.items() if k not in ("RAY_JOB_ID", warm_workers.WARM_IMPORTS_VARIABLE)}
    done = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def test_only_a_pool_worker_of_a_serving_node_imports_the_replica_modules():
    serving = warm_workers.serving_env()
    imported, has_serve = hook_in_a_process(RAY_JOB_ID=warm_workers.POOL_WORKER_JOB_ID, **serving)
    assert imported == list(warm_workers.SERVE_REPLICA_MODULES) and has_serve
    assert hook_in_a_process(RAY_JOB_ID="01000000", **serving) == [[], False]  # a job's own worker
    assert hook_in_a_process(RAY_JOB_ID=warm_workers.POOL_WORKER_JOB_ID) == [[], False]  # a node not set up for serving


@ray.remote(num_cpus=0)
class Probe:
    def report(self) -> tuple[int, list[str]]:
        from ray_app import warm_workers

        return os.getpid(), list(warm_workers.imported_as_spare)


def wait_for_spares(raylet: warm_workers.Raylet, count: int, timeout: float = 60) -> int:
    deadline = time.time() + timeout
    while (found := warm_workers.spares_of(raylet, started_only=True)) != count and time.time() < deadline:
        time.sleep(0.25)
    return found


def test_a_node_gets_one_spare_and_a_new_actor_starts_on_it_warm(ray_session):
    assert warm_workers.warming_enabled()  # the session serves (conftest: prepare_local_start)
    raylet = warm_workers.local_raylet()
    assert raylet is not None
    # Actors take the spares there are (Ray gives a new actor an idle pool worker), so the node has none.
    takers = []
    while warm_workers.spares_of(raylet):
        takers.append(Probe.remote())
        ray.get(takers[-1].report.remote())
    try:
        assert warm_workers.keep_one_spare() is True
        assert warm_workers.keep_one_spare() is False  # one is starting: not a second
        assert wait_for_spares(raylet, 1) == 1
        assert warm_workers.keep_one_spare() is False
        actor = Probe.remote()
        takers.append(actor)
        pid, imported = ray.get(actor.report.remote())
        assert imported == list(warm_workers.SERVE_REPLICA_MODULES), "the actor did not start on the warm spare"
        assert warm_workers.spares_of(raylet) == 0
    finally:
        for taker in takers:
            ray.kill(taker)


@ray.remote(num_cpus=0)
def pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def test_a_spare_that_ran_a_task_is_no_longer_counted_and_is_replaced(ray_session):
    """Any task may take the spare; once it has, the worker is idle again but bound to that task's
    job, so a replica cannot start on it. It must not count as the node's spare."""
    raylet = warm_workers.local_raylet()
    warm_workers.keep_one_spare()
    assert wait_for_spares(raylet, 1) == 1
    (spare,) = warm_workers.spare_pids(raylet, started_only=True)
    # Enough concurrent tasks to occupy every idle worker: one of them runs on the spare.
    idle = sum((p.info["cmdline"] or [""])[0].startswith("ray::IDLE") for p in psutil.process_iter(["cmdline"]))
    ran_on = set(ray.get([pid_after.remote(1.0) for _ in range(idle + 1)]))
    assert spare in ran_on
    assert spare not in warm_workers.spare_pids(raylet)
    assert warm_workers.keep_one_spare() is True, "the node has no spare any more: a new one is asked for"
    assert wait_for_spares(raylet, 1) == 1
