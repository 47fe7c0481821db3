"""Workload lookup by name. Imports are lazy so `ray-app text ...` never imports image code."""

from __future__ import annotations

import importlib

from ray_app.workloads.base import Workload

_WORKLOADS = {
    "image": "ray_app.workloads.image:ImageWorkload",
    "text": "ray_app.workloads.text:TextWorkload",
    "ctr": "ray_app.workloads.ctr:CTRWorkload",
}


def names() -> list[str]:
    return sorted(_WORKLOADS)


def get_workload(name: str) -> Workload:
    if name not in _WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose one of {names()}")
    module, cls = _WORKLOADS[name].split(":")
    return getattr(importlib.import_module(module), cls)()
