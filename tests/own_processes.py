"""Processes of this pytest process's own Ray instance, found by command line.

``ray.init(address="local")`` starts the GCS and the raylet as children of this process, so every
worker, replica and training rank of the main suite is a descendant of it. Tests that SIGKILL one
look only there, never machine-wide: ``make test`` runs the own-cluster tests' Ray beside it, with
replicas and training workers of the same names.
"""

from __future__ import annotations

import psutil


def own_processes(marker: str) -> list[psutil.Process]:
    """Descendants of this process whose command line contains ``marker``."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if marker in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:  # gone (or a zombie) since the listing
            pass
    return found
