"""Is Ray Serve's HAProxy mode safe for a local ``ray-app serve`` (issue 15 item 6)? Measures, on
this machine, with Ray 2.60's own HAProxy manager:

* which addresses HAProxy listens on (HTTP, stats page, Prometheus exporter);
* the admin socket's permissions, with Ray's default path and with the socket, config and
  server-state files moved into a private (0700) folder through Ray's environment variables;
* whether haproxy is stopped by ``serve.shutdown()``, and by ``ray.shutdown()`` without it (a
  driver that exits without shutting Serve down).

Only processes this script started are stopped (by pid), and only ports it chose are used.
Run: ``python benchmarks/serve_fast_path_check.py`` (starts Ray twice; about a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import tempfile
import time

import psutil
import ray
import requests
from ray import serve

from ray_app.runtime import SERVE_FAST_PATH_ENV, unused_loopback_port, unused_port_for_a_later_listener


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1})
class Hello:
    def __call__(self, request) -> str:
        return "ok"


def haproxy_pids(since: float) -> list[int]:
    """haproxy processes started by this run (created after ``since``)."""
    return [p.pid for p in psutil.process_iter(["name", "create_time"]) if p.info["name"] == "haproxy" and p.info["create_time"] >= since]


def listeners(pids: list[int]) -> list[str]:
    found = set()
    for pid in pids:
        try:
            for c in psutil.Process(pid).net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    found.add(f"{c.laddr.ip}:{c.laddr.port}")
        except psutil.NoSuchProcess:
            continue
    return sorted(found)


def mode(path: str) -> str | None:
    return oct(stat.S_IMODE(os.stat(path).st_mode)) if os.path.exists(path) else None


def sockets(base: str) -> dict[str, str]:
    """Every Unix socket under ``base`` with its mode and its folder's (Ray puts them in a per-node folder)."""
    found = {}
    for folder, _, names in os.walk(base):
        for name in names:
            path = os.path.join(folder, name)
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                found[path] = f"socket {mode(path)}, folder {mode(folder)}"
    return found


def run_once(env: dict[str, str], shutdown_serve: bool) -> dict:
    os.environ.update(env)
    since = time.time() - 1
    http_port = unused_loopback_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        serve.run(Hello.bind(), name="hello", route_prefix="/hello")
        deadline = time.time() + 60
        answer = None
        while time.time() < deadline:  # HAProxy picks the route up after a reload
            try:
                answer = requests.get(f"http://127.0.0.1:{http_port}/hello", timeout=5)
                if answer.status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        pids = haproxy_pids(since)
        socket = os.environ.get("RAY_SERVE_HAPROXY_SOCKET_PATH", "/tmp/haproxy-serve/admin.sock")
        report = {
            "answer": answer.status_code if answer is not None else None,
            "haproxy_pids": pids,
            "listening_on": listeners(pids),
            "ports": {
                "http": http_port,
                "stats": env.get("RAY_SERVE_HAPROXY_STATS_PORT"),
                "metrics": env.get("RAY_SERVE_HAPROXY_METRICS_PORT"),
            },
            "admin_socket": socket,
            "admin_socket_mode": mode(socket),
            "admin_socket_folder_mode": mode(os.path.dirname(socket)),
            "sockets": sockets(os.path.dirname(socket)),
        }
        if shutdown_serve:
            serve.shutdown()
    finally:
        ray.shutdown()
        for key in env:
            del os.environ[key]
    time.sleep(3)
    report["still_running_after_exit"] = [
        pid for pid in report["haproxy_pids"] if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ]
    for pid in report["still_running_after_exit"]:  # ours: stop them so they hold no port
        psutil.Process(pid).kill()
    return report


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()  # no options; --help says what it checks
    results = {}
    ports = {
        "RAY_SERVE_HAPROXY_STATS_PORT": str(unused_port_for_a_later_listener()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(unused_port_for_a_later_listener()),
    }
    results["ray_defaults"] = run_once({**SERVE_FAST_PATH_ENV, **ports}, shutdown_serve=True)
    private = tempfile.mkdtemp(prefix="ray_app_haproxy_")  # mkdtemp: 0700, owned by this user
    moved = {
        "RAY_SERVE_HAPROXY_SOCKET_PATH": os.path.join(private, "admin.sock"),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": os.path.join(private, "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": private,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": os.path.join(private, "server-state"),
    }
    results["private_folder_no_serve_shutdown"] = run_once({**SERVE_FAST_PATH_ENV, **ports, **moved}, shutdown_serve=False)
    for name, r in results.items():
        print(f"[{name}] answered {r['answer']}; haproxy listening on {r['listening_on']} (ports {r['ports']})")
        print(f"  socket base {os.path.dirname(r['admin_socket'])} (mode {r['admin_socket_folder_mode']}): {r['sockets']}")
        print(f"  haproxy still running after the driver's exit: {r['still_running_after_exit'] or 'none'}")
    os.makedirs("benchmarks/results", exist_ok=True)
    with open("benchmarks/results/serve_fast_path_check.json", "w") as f:
        json.dump(results, f, indent=2)
    sys.exit(0)


if __name__ == "__main__":
    main()
