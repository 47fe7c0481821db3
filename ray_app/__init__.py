"""ray_app: data processing, distributed training, batch inference and autoscaled serving on Ray."""

__version__ = "0.1.0"
