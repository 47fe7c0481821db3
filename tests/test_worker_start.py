"""Ray workers run ray_app.worker_start's hook before their first task (fewer GC passes while they
import torch and the rest): tasks and actors alike, in the session's local instance, which
conftest starts the way ``ray_app.runtime.connect`` does."""

from __future__ import annotations

import os
import subprocess
import sys

import ray

from ray_app.worker_start import FIRST_GENERATION_THRESHOLD, hook_env


def test_tasks_and_actors_start_with_the_hook(ray_session):
    def gc_state() -> dict:  # nested: pickled by value (workers cannot import this test module)
        import gc
        import os

        return {"threshold": gc.get_threshold()[0], "frozen": gc.get_freeze_count(), "pid": os.getpid()}

    task = ray.get(ray.remote(num_cpus=0)(gc_state).remote())

    @ray.remote(num_cpus=0)
    class Probe:
        def state(self) -> dict:
            return gc_state()

    probe = Probe.remote()
    try:
        actor = ray.get(probe.state.remote())
    finally:
        ray.kill(probe)
    for state in (task, actor):
        assert state["pid"] != os.getpid()
        assert state["threshold"] == FIRST_GENERATION_THRESHOLD, state
        assert state["frozen"] > 10_000, state  # what Ray imported before the hook ran


def test_a_process_that_connects_gets_the_same_gc_settings(ray_session):
    """A notebook kernel or script that drives stages through ``connect`` (as ``ray-app`` does)
    collects as the workers do; a bare interpreter keeps CPython's defaults."""
    probe = "import gc; from ray_app.runtime import connect; print(gc.get_threshold()[0]); connect(); print(gc.get_threshold()[0])"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    before, after = (int(line) for line in done.stdout.split()[-2:])
    assert before != FIRST_GENERATION_THRESHOLD and after == FIRST_GENERATION_THRESHOLD


def test_a_local_start_keeps_a_hook_the_user_set(monkeypatch):
    from ray_app.worker_start import install_for_local_start

    (name,) = hook_env()
    monkeypatch.setenv(name, "my_team.setup.hook")
    install_for_local_start()
    assert os.environ[name] == "my_team.setup.hook"


def test_a_local_instance_runs_training_without_a_preemption_watcher(monkeypatch):
    """One machine is never reclaimed: a local start turns Ray Train's watcher (an actor process per
    run) off, unless the user asked for it; clusters (no local start) keep Ray's default."""
    from ray_app.runtime import LOCAL_INSTANCE_ENV, prepare_local_start

    (name,) = LOCAL_INSTANCE_ENV
    monkeypatch.delenv(name, raising=False)
    prepare_local_start()
    assert os.environ[name] == "0"
    monkeypatch.setenv(name, "1")
    prepare_local_start()
    assert os.environ[name] == "1"
