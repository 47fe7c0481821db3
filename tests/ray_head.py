"""A plain ``ray start --head`` on free loopback ports with token auth, for tests that need a real
cluster of their own (``pytest -m own_cluster``): the upload watcher and ``serve deploy``."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

from ray.job_submission import JobSubmissionClient

from ray_app.autoscaling_demo import RAY
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
    port, dashboard = unused_loopback_port(), unused_loopback_port()
    subprocess.run(
        [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--ray-client-server-port={unused_loopback_port()}",
         f"--dashboard-agent-listen-port={unused_loopback_port()}", f"--num-cpus={num_cpus}", "--disable-usage-stats"],
        env=info["env"], check=True, capture_output=True, timeout=180,
    )  # fmt: skip
    info["address"] = f"127.0.0.1:{port}"
    info["dashboard"] = f"http://127.0.0.1:{dashboard}"
    info["client"] = wait_for(lambda: jobs_client(info), "the Jobs API")


def stop_head(info: dict) -> None:
    subprocess.run([RAY, "stop", "--force"], env=info["env"], capture_output=True, timeout=120)


def jobs_client(info: dict) -> JobSubmissionClient | None:
    try:
        return JobSubmissionClient(info["dashboard"], headers={"Authorization": f"Bearer {info['token']}"})
    except (ConnectionError, RuntimeError):
        return None


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
