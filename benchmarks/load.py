"""Bounded HTTP load generators for loopback endpoints: N concurrent clients for a fixed time.

``closed_loop`` is pure Python (threads + requests); ``wrk_closed_loop`` drives the same closed loop
with ``wrk`` (C, epoll, one thread), which leaves far more CPU to the server on a small machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable

import numpy as np
import requests


def closed_loop(
    url: str, make_body: Callable[[int], tuple[bytes, str]], concurrency: int, seconds: float, headers: dict[str, str] | None = None
) -> dict[str, float]:
    """Each client sends its next request as soon as the previous answer arrives."""
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(index: int) -> None:
        session = requests.Session()
        n = 0
        while time.perf_counter() < deadline:
            body, content_type = make_body(index * 1_000_003 + n)
            n += 1
            started = time.perf_counter()
            try:
                ok = session.post(url, data=body, headers={**(headers or {}), "Content-Type": content_type}, timeout=30).status_code == 200
            except requests.RequestException:
                ok = False
            elapsed = time.perf_counter() - started
            with lock:
                if ok:
                    latencies.append(elapsed)
                else:
                    failures[0] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    lat = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "failed": failures[0],
        "req_per_s": len(latencies) / wall,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


# Cycles through the request bodies (files 0..n-1 in a folder); prints one JSON line at the end.
WRK_SCRIPT = """
local bodies, n, i = {}, 0, 0
init = function(args)
  n = tonumber(args[2])
  for k = 0, n - 1 do
    local f = assert(io.open(args[1] .. "/" .. k .. ".bin", "rb"))
    bodies[k + 1] = f:read("*all")
    f:close()
  end
  for k = 3, #args, 2 do wrk.headers[args[k]] = args[k + 1] end
end
request = function()
  i = i % n + 1
  return wrk.format("POST", nil, nil, bodies[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d, '
      .. '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def wrk_closed_loop(
    url: str, bodies: list[bytes], content_type: str, concurrency: int, seconds: float, headers: dict[str, str] | None = None
) -> dict[str, float]:
    """The same closed loop as ``closed_loop``, driven by wrk: ``concurrency`` keep-alive connections,
    each sending its next POST as soon as the previous answer arrives. Non-2xx answers, timeouts
    and socket errors count as failures."""
    with tempfile.TemporaryDirectory(prefix="wrk_") as folder:
        for k, body in enumerate(bodies):
            with open(os.path.join(folder, f"{k}.bin"), "wb") as f:
                f.write(body)
        script = os.path.join(folder, "post.lua")
        with open(script, "w") as f:
            f.write(WRK_SCRIPT)
        pairs = [item for name_value in {**(headers or {}), "Content-Type": content_type}.items() for item in name_value]
        command = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "60s", "-s", script, url]
        out = subprocess.run([*command, "--", folder, str(len(bodies)), *pairs], capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("WRKJSON "))
    r = json.loads(line.removeprefix("WRKJSON "))
    failed = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    ok = r["requests"] - r["status"]
    return {
        "concurrency": concurrency,
        "requests": ok,
        "failed": failed,
        "req_per_s": ok / (r["duration_us"] / 1e6),
        "p50_ms": r["p50_us"] / 1000,
        "p99_ms": r["p99_us"] / 1000,
        "errors": {k: r[k] for k in ("connect", "read", "write", "status", "timeout")},
    }
