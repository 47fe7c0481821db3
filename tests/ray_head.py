"""A plain token-auth head (``ray_app.local_cluster.start_head``) with a token of the test's own,
for tests that need a real cluster of their own (``pytest -m own_cluster``).

``shared_head`` (session-scoped, exposed by tests/conftest.py) is the ONE such cluster the notebooks,
the quiet-CLI test, ``serve deploy`` and the upload watcher share, started the way the cluster configs
start Ray (token auth, Serve's HAProxy fast path): a cluster start is 5-10 s of a 2-core machine,
and the tests only need it as users would find it. The watcher's cluster-wipe test restarts it in
place (``start_head`` updates the same dict), so tests read its address when they use it.
The live-cluster tests keep their own autoscaling cluster (tests/test_live_cluster.py says why).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ray_app.local_cluster import start_head as start_ray_head
from ray_app.local_cluster import stop_local_cluster as stop_head
from ray_app.runtime import SERVE_FAST_PATH_ENV, unused_port_for_a_later_listener


def head_info(folder: Path, **env: str) -> dict:
    """Token auth with a token of the test's own (never the user's ~/.ray/auth_token); ``env`` is
    what Ray must read at start (e.g. Serve's ingress settings)."""
    token = folder / "auth_token"
    token.write_text(secrets.token_hex(32))
    full_env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_DEDUP_LOGS": "1", **env}
    full_env.pop("RAY_ADDRESS", None)
    return {"folder": folder, "env": full_env, "token": token.read_text()}


def start_head(info: dict, num_cpus: int = 4) -> None:
    cluster = start_ray_head(unused_port_for_a_later_listener(), f"--num-cpus={num_cpus}", env=info["env"], node_ip="127.0.0.1")
    info.update(address=cluster.gcs_address, dashboard=cluster.dashboard_url, client=cluster.job_client())


def wait_for(probe, what: str, limit_s: float = 240):
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.25)  # the probes are cheap (a state file, a health check); a second each was idle time
    raise AssertionError(f"gave up waiting for {what}")


def run(info: dict, *argv: str) -> subprocess.CompletedProcess:
    """A client command against the cluster, as a user would run it (token auth in its env).
    ``argv[0]`` is a Python module flag/script, or an executable next to this Python (``serve``)."""
    program = Path(sys.executable).with_name(argv[0])
    command = [str(program), *argv[1:]] if argv[0] != "-m" and program.exists() else [sys.executable, *argv]
    done = subprocess.run(command, env=info["env"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def haproxies() -> list[psutil.Process]:
    """The HAProxy processes Serve's fast path started (``ray stop --force`` leaves them running in
    Ray 2.60, holding their ports)."""
    return [
        p for p in psutil.process_iter(["name", "cmdline"]) if p.info["name"] == "haproxy" and "haproxy-serve" in str(p.info["cmdline"])
    ]


@pytest.fixture(scope="session")
def shared_head(tmp_path_factory):
    """One token-auth head for the session's own-cluster tests, with 2 CPUs (this machine's) and
    Serve's fast path as cluster/serve/app.yaml asks for it."""
    # HAProxy's stats and Prometheus listeners default to fixed ports (8404, 9101): free ones here.
    ports = {
        "RAY_SERVE_HAPROXY_STATS_PORT": str(unused_port_for_a_later_listener()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(unused_port_for_a_later_listener()),
    }
    # On the fast path every Serve shutdown (each notebook's, serve deploy's) drains the proxy and
    # the ingress replicas for at least 30 s, time for an external load balancer to deregister them;
    # here no load balancer exists, so 1 s.
    drain = {"RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}
    info = head_info(tmp_path_factory.mktemp("shared-head"), **SERVE_FAST_PATH_ENV, **ports, **drain)
    try:
        start_head(info, num_cpus=2)
        yield info
    finally:
        started = haproxies()
        stop_head(info["address"])  # this head only: the main pytest process's Ray runs beside it
        for p in started:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
