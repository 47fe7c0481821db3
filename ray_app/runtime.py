"""Joining Ray: an existing cluster when an address is given (or RAY_ADDRESS is set, as under
``ray job submit``), otherwise a local instance on this machine — the same code either way."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket

import ray

log = logging.getLogger(__name__)


# Serve's fast path, read by every Ray process at start (so set before `ray start` / `ray.init`):
# HAProxy (C) owns the HTTP port and forwards to the gateway replicas' own HTTP servers instead of
# Serve's Python proxy actor, and deployments call each other over gRPC. Measured: the Python proxy
# caps near 160 req/s even on 16 cores; with this, 1,250-1,480 req/s (README, serving figures).
# Trade-offs, hence on in the cluster configs but not for a local `ray-app serve`: HAProxy's stats
# and Prometheus listeners bind all interfaces (RAY_SERVE_HAPROXY_STATS_PORT / _METRICS_PORT), its
# admin socket in /tmp/haproxy-serve is world-writable, and `ray stop` leaves haproxy running.
SERVE_FAST_PATH_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


# A local instance is this one machine: no provider reclaims it, so Ray Train's preemption watcher
# (one more actor process per training run, polling the node's drain state) has nothing to watch.
# Ray Train reads it in the driver and hands it to its controller; clusters keep the watcher.
LOCAL_INSTANCE_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def prepare_local_start(serving: bool = False) -> None:
    """The environment of a Ray instance this process is about to start on this machine (its raylet,
    and so every worker, inherits it): the workers' GC hook (``ray_app.worker_start``) and no
    preemption watcher; when it will serve, pool workers that are spares for Serve replicas
    (``ray_app.warm_workers``). Values the user set are kept."""
    from ray_app import warm_workers, worker_start

    worker_start.install_for_local_start()
    for name, value in {**LOCAL_INSTANCE_ENV, **(warm_workers.serving_env() if serving else {})}.items():
        os.environ.setdefault(name, value)


def connect(address: str | None = None, verbose: bool = False, serving: bool = False) -> str | None:
    """Start or join Ray; returns the dashboard URL when there is one. Unless ``verbose``, Ray's
    own INFO/WARNING lines and the workers' output go to Ray's log files only (``ray_app.progress``).
    ``serving``: a local instance started here will serve (see ``prepare_local_start``)."""
    from ray_app import progress, worker_start

    if not ray.is_initialized():
        # This process drives stages (ray-app, a notebook kernel, a script): the same fewer GC
        # passes as Ray's workers; from here on it imports and allocates the most.
        worker_start.fewer_gc_pauses()
        driver_log = None if verbose else progress.start_driver_log()
        if not verbose:
            progress.quiet_ray_console(driver_log)
            # MLflow (train, evaluate, register) announces its SQLite set-up at INFO; read on its import.
            os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:
            forget_stale_cluster_address()
            prepare_local_start(serving=serving)
            # A local instance: dashboard on loopback only; Ray's token auth stays at its default (on).
            ray.init(dashboard_host="127.0.0.1", include_dashboard=True)
        if driver_log is not None:
            driver_log.attach(_logs_dir())
    if not verbose:
        progress.quiet_ray_console()
        progress.show_only_progress_from_workers()
    quiet_data_progress()
    from ray._private.worker import get_dashboard_url  # the public API only returns it from init()

    url = get_dashboard_url()
    return f"http://{url}" if url and not url.startswith("http") else url or None


def _logs_dir() -> str | None:
    """This node's Ray log folder, when the driver runs on a node of the cluster (it does locally
    and under ``ray job submit``); no public API names it."""
    try:
        node = ray._private.worker.global_worker.node
        path = node.get_logs_dir_path() if node is not None else None
    except AttributeError:
        return None
    return path if path and os.path.isdir(path) else None


def quiet_data_progress() -> None:
    """Progress bars are for terminals; in logs (jobs, CI) they are noise."""
    from ray.data import DataContext

    if not os.isatty(2):
        DataContext.get_current().enable_progress_bars = False


def forget_stale_cluster_address(ray_temp_dir: str | None = None) -> None:
    """Remove ``ray_current_cluster`` when it names a cluster on this machine that is gone.

    ``ray start`` writes its address there and ``ray stop`` removes it; a cluster killed any other
    way leaves it behind. Ray's calls made with no address read it, inside a local instance's
    workers too: Ray Train's placement group cleaner asked the dead GCS, crashed, never removed a
    finished Tune trial's placement group, and the next Ray Data stage waited forever for CPUs.
    Only a local address that nothing listens on is removed: a live cluster, or another
    machine's head (as a worker node's file names it), stays."""
    import psutil
    from ray._common.utils import get_ray_address_file

    address_file = get_ray_address_file(ray_temp_dir)
    try:
        with open(address_file) as f:
            host, _, port = f.read().strip().rpartition(":")
    except FileNotFoundError:
        return
    local = {a.address for addresses in psutil.net_if_addrs().values() for a in addresses} | {"localhost"}
    if host not in local or not port.isdigit():
        return
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return  # alive
    except ConnectionRefusedError:
        with contextlib.suppress(FileNotFoundError):  # another process removed it first
            os.remove(address_file)
    except OSError:  # a timeout or anything else is no proof that it is gone
        return


def unused_loopback_port() -> int:
    """A 127.0.0.1 port nothing listens on now (tests, demos and benchmarks never assume a fixed port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Ray's workers listen on 10002-19999 by default (``ray start --min-worker-port/--max-worker-port``).
LATER_LISTENER_PORTS_FROM = 20000


def ephemeral_port_range() -> tuple[int, int]:
    """The ports the kernel hands out to sockets bound to port 0 and to outgoing connections."""
    try:
        low, high = (int(n) for n in open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def unused_port_for_a_later_listener(host: str = "0.0.0.0") -> int:
    """A free port for a listener that binds long after it is picked, such as HAProxy's stats and
    metrics listeners, which bind when Serve first starts, minutes after ``ray start`` read them.
    ``unused_loopback_port`` draws from the kernel's ephemeral range, which the kernel hands to
    every outgoing connection and port-0 listener in between: a test run lost its HAProxy that way
    ("cannot bind socket (Address already in use)"). This picks between Ray's worker ports and the
    ephemeral range, where only an explicit bind can take it."""
    low, high = LATER_LISTENER_PORTS_FROM, ephemeral_port_range()[0] - 1
    if high < low:  # a machine whose ephemeral range starts low: no such gap to pick from
        return unused_loopback_port()
    pick = random.SystemRandom()
    for _ in range(200):
        port = pick.randint(low, high)
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    return unused_loopback_port()
