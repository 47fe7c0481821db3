"""A bounded HTTP load generator for loopback endpoints: N concurrent clients for a fixed time."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import requests


def closed_loop(url: str, make_body: Callable[[int], tuple[bytes, str]], concurrency: int, seconds: float) -> dict[str, float]:
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
                ok = session.post(url, data=body, headers={"Content-Type": content_type}, timeout=30).status_code == 200
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
