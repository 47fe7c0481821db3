"""Application metrics through ``ray.util.metrics``: Ray exports them in Prometheus format on every
node's metrics port (and the dashboard's Grafana panels can chart them). Created per replica, never
at import time."""

from __future__ import annotations

import collections

from ray.util.metrics import Counter, Histogram

LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class GatewayMetrics:
    """Per-request figures, recorded where every request passes: the gateway."""

    def __init__(self) -> None:
        self.requests = Counter(
            "ray_app_requests", description="HTTP inference requests by workload and status code", tag_keys=("workload", "status")
        )
        self.latency_ms = Histogram(
            "ray_app_request_latency_ms",
            description="end-to-end latency of inference requests inside the gateway",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("workload",),
        )

    def observe(self, workload: str, status: int, latency_ms: float) -> None:
        self.requests.inc(tags={"workload": workload, "status": str(status)})
        self.latency_ms.observe(latency_ms, tags={"workload": workload})


class ModelMetrics:
    """Per-forward-pass figures, recorded by the model replicas."""

    def __init__(self, workload: str) -> None:
        self.tags = {"workload": workload}
        self.batch_size = Histogram(
            "ray_app_batch_size", description="items per forward pass", boundaries=BATCH_BOUNDARIES, tag_keys=("workload",)
        )
        self.predictions = Counter("ray_app_predictions", description="items scored, by predicted class", tag_keys=("workload", "label"))

    def observe_batch(self, size: int, labels: list[str]) -> None:
        self.batch_size.observe(size, tags=self.tags)
        for label, count in collections.Counter(labels).items():
            self.predictions.inc(count, tags={**self.tags, "label": label})
