"""rollback: move an alias back to the version it had before its last move, in one command. No Ray,
no re-scoring: this is the emergency exit, and the move is recorded in the alias history."""

from __future__ import annotations

import logging
from typing import Any

from ray_app.config import AppConfig
from ray_app.registry import ModelRegistry

log = logging.getLogger(__name__)


def run_rollback(config: AppConfig) -> dict[str, Any]:
    registry = ModelRegistry(config.models_uri())
    record = registry.rollback(config.workload, config.rollback.alias, reason=config.rollback.reason)
    summary = {
        "alias": record["alias"],
        "from": record["from"],
        "to": record["to"],
        "uri": registry.version_uri(config.workload, record["to"]),
        "user": record["user"],
        "at": record["at"],
        "reason": record["reason"],
        "history_seq": record["seq"],
    }
    log.info("rollback: %s %r %s -> %s", config.workload, record["alias"], record["from"], record["to"])
    return summary
