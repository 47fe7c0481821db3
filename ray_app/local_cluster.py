"""A Ray cluster on this machine, started the way a user starts one: ``ray start --head`` with token
auth and every port picked free (``start_head``), optionally with the Ray autoscaler and its
``fake_multinode`` provider (``start_local_cluster``: worker "nodes" are extra raylets on this host).
Jobs go through the Jobs API with the token in a header. The demos, the tests that need their own
cluster and the benchmarks all start clusters through this module.

``stop_local_cluster`` stops that one cluster (its processes and their children), not every Ray
process of the user as ``ray stop --force`` does: a demo or test cluster can run next to the
user's own Ray, or next to another test process's.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ray_app.runtime import unused_port_for_a_later_listener
from ray_app.worker_start import hook_env

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "cluster" / "local-autoscaling.yaml"
# The ray CLI of this Python environment (a venv's bin/), else the one on PATH.
RAY = str(Path(sys.executable).with_name("ray")) if Path(sys.executable).with_name("ray").exists() else shutil.which("ray") or "ray"


def auth_token(env: dict[str, str] | None = None) -> str:
    """The cluster token as Ray resolves it (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token); one is generated in ~/.ray/auth_token when there is none yet."""
    out = subprocess.run([RAY, "get-auth-token", "--generate"], check=True, capture_output=True, text=True, env=env)
    return out.stdout.strip()


@dataclass
class LocalCluster:
    """A head started with ``ray start --head`` and the autoscaler; every port picked free."""

    gcs_address: str
    dashboard_url: str
    headers: dict[str, str] = field(repr=False)
    _state: Any = field(default=None, repr=False)

    def job_client(self):
        from ray.job_submission import JobSubmissionClient

        # The header carries the token: this works from any process, whatever RAY_AUTH_MODE it
        # was started with (Ray reads that variable once per process).
        return JobSubmissionClient(self.dashboard_url, headers=self.headers)

    def worker_nodes(self) -> list[str]:
        """IDs of the alive nodes other than the head (Ray's state API, over the dashboard)."""
        from ray.util.state import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        if self._state is None:
            self._state = StateApiClient(address=self.dashboard_url, headers={"Content-Type": "application/json", **self.headers})
        nodes = self._state.list(
            StateResource.NODES,
            options=ListApiOptions(filters=[("state", "=", "ALIVE"), ("is_head_node", "=", False)]),
            raise_on_missing_output=False,
        )
        return sorted(node.node_id for node in nodes)


def start_head(port: int, *args: str, env: dict[str, str] | None = None, node_ip: str | None = None) -> LocalCluster:
    """``ray start --head`` with token auth, the GCS on ``port`` and every other port picked free
    (dashboard on 127.0.0.1); returns once the dashboard answers. ``args`` go to ``ray start``."""
    from ray.util import get_node_ip_address

    # The workers' start-up hook (ray_app.worker_start) unless the environment names one already.
    env = {**hook_env(), **(os.environ if env is None else env), "RAY_AUTH_MODE": "token"}
    # Bound seconds later, while the head's own processes take ephemeral ports: none from that range.
    dashboard_port = unused_port_for_a_later_listener()
    command = [RAY, "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
    command += [
        f"--ray-client-server-port={unused_port_for_a_later_listener()}",
        f"--dashboard-agent-listen-port={unused_port_for_a_later_listener()}",
    ]
    command += [*([f"--node-ip-address={node_ip}"] if node_ip else []), *args, "--disable-usage-stats"]
    started = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=180)
    if started.returncode != 0:
        raise RuntimeError(f"ray start failed ({started.returncode}):\n{started.stdout[-2000:]}\n{started.stderr[-2000:]}")
    gcs_address = f"{node_ip or get_node_ip_address()}:{port}"
    cluster = LocalCluster(gcs_address, f"http://127.0.0.1:{dashboard_port}", {"Authorization": f"Bearer {auth_token(env)}"})
    try:
        _wait_for_dashboard(cluster)
    except BaseException:
        stop_local_cluster(cluster)  # the caller never gets a handle to stop it
        raise
    return cluster


def start_local_cluster(config: str | Path = DEFAULT_CONFIG, workdir: str | None = None) -> LocalCluster:
    """``RAY_FAKE_CLUSTER=1 ray start --head --num-cpus=0 --autoscaling-config=...`` on free ports.

    The fake provider starts its worker nodes against the GCS at ``provider.gcs_address`` (6379
    when absent), so a copy of the config names the port picked here."""
    from ray.util import get_node_ip_address

    port = unused_port_for_a_later_listener()
    cluster_config = yaml.safe_load(Path(config).read_text())
    cluster_config["provider"]["gcs_address"] = f"{get_node_ip_address()}:{port}"
    workdir = workdir or tempfile.mkdtemp(prefix="ray-app-cluster-")
    config_copy = Path(workdir) / "autoscaling.yaml"
    config_copy.write_text(yaml.safe_dump(cluster_config, sort_keys=False))
    env = {
        **os.environ,
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",  # the autoscaler looks every second, not every 5
    }
    return start_head(port, "--num-cpus=0", f"--autoscaling-config={config_copy}", env=env)


def _wait_for_dashboard(cluster: LocalCluster, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            cluster.job_client().list_jobs()
            return
        except Exception:  # the dashboard's HTTP server comes up a moment after `ray start`
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def session_dir(gcs_address: str) -> str | None:
    """The session directory (``/tmp/ray/session_...``) of the cluster whose GCS listens on the
    port of ``gcs_address``, read from the command line of one of its processes; None when no
    such process runs on this machine."""
    import psutil

    port = gcs_address.rsplit(":", 1)[-1]
    for process in psutil.process_iter(["cmdline"]):
        args = process.info["cmdline"] or []
        names_it = f"--gcs_server_port={port}" in args or any(a.startswith("--gcs-address=") and a.endswith(f":{port}") for a in args)
        if names_it:
            for arg in args:
                if arg.startswith("--session-dir="):
                    return arg.split("=", 1)[1]
    return None


def cluster_processes(gcs_address: str) -> list:
    """The processes of this one cluster (``psutil.Process``): every process whose command line
    names its session directory (GCS, raylets incl. the autoscaler's fake nodes, dashboard,
    monitors) and all their descendants (workers, replicas, HAProxy)."""
    import psutil

    session = session_dir(gcs_address)
    if session is None:
        return []
    roots = [p for p in psutil.process_iter(["cmdline"]) if session in " ".join(p.info["cmdline"] or [])]
    found = set(roots)
    for root in roots:
        try:
            found.update(root.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    return list(found)


def stop_local_cluster(cluster: LocalCluster | str, grace_s: float = 30, ray_temp_dir: str | None = None) -> None:
    """SIGKILL, as ``ray stop --force`` does, but only this cluster's processes. ``ray stop`` has
    no way to pick a cluster: it kills every Ray process of the user by name, the user's own Ray
    and a test process's next to it included."""
    import psutil

    gcs_address = cluster.gcs_address if isinstance(cluster, LocalCluster) else cluster
    forget_cluster_address(gcs_address, ray_temp_dir)
    # Two passes: a raylet may fork a worker between the scan and the kill.
    for _ in range(2):
        doomed = cluster_processes(gcs_address)
        for process in doomed:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(doomed, timeout=grace_s)


def forget_cluster_address(gcs_address: str, ray_temp_dir: str | None = None) -> None:
    """What ``ray stop`` also does: remove ``ray_current_cluster``, the address Ray calls with no
    address connect to (Ray Train's placement group cleaner in any later local session among
    them), but only while it names this cluster. The host may be written as the node's IP or
    as 127.0.0.1: the port on this machine decides."""
    from ray._common.utils import get_ray_address_file

    address_file = Path(get_ray_address_file(ray_temp_dir))
    try:
        if address_file.read_text().strip().rsplit(":", 1)[-1] == gcs_address.rsplit(":", 1)[-1]:
            address_file.unlink()
    except FileNotFoundError:
        pass


class NodeWatcher:
    """Samples the number of alive worker nodes every ``interval_s`` seconds in a thread."""

    def __init__(self, cluster: LocalCluster, interval_s: float = 1.0, on_change=None):
        self.cluster = cluster
        self.interval_s = interval_s
        self.on_change = on_change
        self.samples: list[tuple[float, int]] = []  # (seconds since start, alive worker nodes)
        self.seen: set[str] = set()  # every worker node ID ever alive
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> NodeWatcher:
        self.sample()
        self._thread.start()
        return self

    def sample(self) -> int:
        nodes = self.cluster.worker_nodes()
        count = len(nodes)
        changed = not self.samples or self.samples[-1][1] != count
        self.samples.append((round(time.monotonic() - self._started, 1), count))
        self.seen.update(nodes)
        if changed and self.on_change:
            self.on_change(*self.samples[-1])
        return count

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception:  # a slow answer while nodes start: try again next tick
                continue

    def counts(self) -> list[int]:
        """The node counts in order, repeats collapsed: e.g. [0, 1, 2, 0]."""
        out: list[int] = []
        for _, count in self.samples:
            if not out or out[-1] != count:
                out.append(count)
        return out

    def wait_for(self, predicate, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.samples and predicate(self.samples[-1][1]):
                return True
            time.sleep(self.interval_s / 2)
        return False

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


RUN_NAME = "autoscaling"  # the training run of ``image_job_entrypoint``: <workspace>/image/runs/autoscaling


def image_job_entrypoint(images: str, workspace: str, epochs: int = 1, python: str = "python") -> str:
    """prepare then train (2 workers, half a CPU each), exactly as a user types it."""
    common = f"--workspace {shlex.quote(workspace)}"
    return (
        f"{python} -m ray_app image prepare --input {shlex.quote(images)} {common} && "
        f"{python} -m ray_app image train {common} --run-name {RUN_NAME} --num-workers 2 --cpus-per-worker 0.5 "
        f"--epochs {epochs} --batch-size 16"
    )


def submit_image_job(cluster: LocalCluster, images: str, workspace: str, epochs: int = 1, runtime_env: dict | None = None) -> str:
    """Submit prepare+train as one job, named and labelled so it reads well in the dashboard.

    No ``working_dir`` by default: the project is installed in this environment, which every fake
    node shares. (With ``working_dir``, fake nodes also share one session directory, and a worker
    node's runtime-env agent deletes the unpacked package once its own workers are done with it,
    pulling the current directory from under the job's next command; real nodes each have theirs.)
    """
    return cluster.job_client().submit_job(
        entrypoint=image_job_entrypoint(images, workspace, epochs, python=shlex.quote(sys.executable)),
        submission_id=f"image-train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
        metadata={"workload": "image", "stage": "prepare+train", "who": getpass.getuser(), "purpose": "autoscaling demo"},
        runtime_env=runtime_env,
    )


def wait_for_job(cluster: LocalCluster, job_id: str, timeout_s: float, on_status=None):
    """Poll until the job ends (or the timeout passes); returns its last ``JobStatus``."""
    client = cluster.job_client()
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status != last and on_status:
            on_status(status)
        last = status
        if status.is_terminal():
            break
        time.sleep(1)
    return last


def stage_summaries(logs: str) -> dict[str, dict]:
    """The JSON summaries the CLI prints (one per stage) found in a job's logs, by stage."""
    decoder = json.JSONDecoder()
    found: dict[str, dict] = {}
    for match in re.finditer(r"^\{$", logs, flags=re.MULTILINE):
        try:
            value, _ = decoder.raw_decode(logs, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and "stage" in value:
            found[value["stage"]] = value
    return found
