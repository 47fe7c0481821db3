"""A plain token-auth head (``ray_app.local_cluster.start_head``) with a token of the test's own,
for tests that need a real cluster of their own (``pytest -m own_cluster``): the upload watcher and
``serve deploy``."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

from ray_app.local_cluster import start_head as start_ray_head
from ray_app.local_cluster import stop_local_cluster as stop_head  # noqa: F401 - re-exported for the tests
from ray_app.runtime import unused_loopback_port


def head_info(folder: Path, **env: str) -> dict:
    """Token auth with a token of the test's own (never the user's ~/.ray/auth_token); ``env`` is
    what Ray must read at start (e.g. Serve's ingress settings)."""
    token = folder / "auth_token"
    token.write_text(secrets.token_hex(32))
    full_env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_DEDUP_LOGS": "1", **env}
    full_env.pop("RAY_ADDRESS", None)
    return {"folder": folder, "env": full_env, "token": token.read_text()}


def start_head(info: dict, num_cpus: int = 4) -> None:
    cluster = start_ray_head(unused_loopback_port(), f"--num-cpus={num_cpus}", env=info["env"], node_ip="127.0.0.1")
    info.update(address=cluster.gcs_address, dashboard=cluster.dashboard_url, client=cluster.job_client())


def wait_for(probe, what: str, limit_s: float = 240):
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"gave up waiting for {what}")


def run(info: dict, *argv: str) -> subprocess.CompletedProcess:
    """A client command against the cluster, as a user would run it (token auth in its env).
    ``argv[0]`` is a Python module flag/script, or an executable next to this Python (``serve``)."""
    program = Path(sys.executable).with_name(argv[0])
    command = [str(program), *argv[1:]] if argv[0] != "-m" and program.exists() else [sys.executable, *argv]
    done = subprocess.run(command, env=info["env"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done
