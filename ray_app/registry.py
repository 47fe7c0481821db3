"""Model registry on plain storage (local disk, s3://, gs://). Layout under ``<root>/<workload>/``:

- ``<version>/`` — ``model.safetensors`` + ``bundle.json`` + ``metadata.json``. A version number is
  taken by a create-only ``claim.json``, so concurrent ``register`` calls never share a folder;
  ``metadata.json`` is written last, and only versions that have it are listed.
- ``alias_history/<seq>.json`` — one record per alias move (from, to, when, user, reason, metrics,
  and the full alias map after the move). A move is a create-only write of the next sequence
  number: two concurrent movers cannot both take it, the loser re-reads and retries, so no move is
  lost and every record's ``from`` is exact. Records are never rewritten (no read-modify-write on
  object stores). The newest record is the alias map the registry serves.
- ``aliases.json`` — ``{alias: version}``, rewritten all-or-nothing after each move for people and
  older readers; the registry reads it only where no history exists yet (registries written before
  the history). A move whose ``aliases.json`` refresh fails (e.g. disk full) is still in effect.

Everything downstream loads by alias or version, never by a training run's path.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import os
import re
from collections.abc import Callable
from typing import Any

import pyarrow.fs as pafs

from ray_app import storage
from ray_app.bundle_format import BUNDLE_FILE, WEIGHTS_FILE, BundleError, check_format_version
from ray_app.registry_store import RegistryCorrupt, RegistryError, RegistryStore, RegistryWriteError

__all__ = ["ModelRegistry", "NothingToRollBack", "RegistryCorrupt", "RegistryError", "RegistryWriteError", "resolve_model_uri"]

log = logging.getLogger(__name__)

ALIASES_FILE = "aliases.json"
METADATA_FILE = "metadata.json"
CLAIM_FILE = "claim.json"
HISTORY_FOLDER = "alias_history"
USER_ENV = "RAY_APP_USER"
# Each failed attempt means another writer succeeded, so this bounds only pathological contention.
MAX_ATTEMPTS = 1000
_HISTORY_NAME = re.compile(r"^(\d+)\.json$")


class NothingToRollBack(RegistryError, LookupError):
    """The alias has no earlier version in its history (or that version is gone)."""


def current_user(user: str | None = None) -> str:
    """Who moved an alias: explicit, else $RAY_APP_USER (jobs, CI), else the login name."""
    if user:
        return user
    if os.environ.get(USER_ENV):
        return os.environ[USER_ENV]
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry (containers): still record the move
        return "unknown"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode()


class ModelRegistry:
    def __init__(self, root_uri: str, filesystem: pafs.FileSystem | None = None) -> None:
        """``filesystem``: optional pyarrow filesystem over the same root, used for content writes
        (e.g. a wrapper that injects faults)."""
        self.store = RegistryStore(root_uri, filesystem)
        self.root = self.store.root

    # ---- versions -------------------------------------------------------------------------------
    def version_uri(self, workload: str, version: int) -> str:
        return storage.join(self.root, workload, str(version))

    def _numbered_folders(self, workload: str) -> list[int]:
        return sorted(int(i.base_name) for i in self.store.children(workload) if i.base_name.isdigit())

    def versions(self, workload: str) -> list[int]:
        """Complete versions (those with metadata.json), oldest first."""
        parts = (path.split("/") for path in self.store.files(workload))
        return sorted({int(p[0]) for p in parts if len(p) == 2 and p[0].isdigit() and p[1] == METADATA_FILE})

    def _claim_version(self, workload: str, source: str) -> int:
        claim = _dumps({"source": source, "claimed_at": _now(), "user": current_user(), "pid": os.getpid()})
        for _ in range(MAX_ATTEMPTS):
            # Unfinished versions (a register that died) keep their number: never reuse a folder.
            version = max(self._numbered_folders(workload), default=0) + 1
            if self.store.create(f"{workload}/{version}/{CLAIM_FILE}", claim):
                return version
        raise RegistryError(f"could not claim a new {workload} version under {self.root} after {MAX_ATTEMPTS} attempts")

    def register(
        self,
        workload: str,
        bundle_uri: str,
        metadata: dict[str, Any],
        alias: str | None = None,
        *,
        reason: str | None = None,
        metrics: dict[str, Any] | None = None,
        user: str | None = None,
        extra_files: dict[str, str] | None = None,
    ) -> int:
        """Copy a bundle in as a new version (safe to call concurrently: each call gets its own
        number), then optionally move ``alias`` to it. ``extra_files`` ({name: URI}, e.g. the ONNX
        exports) are copied into the version folder too, before it becomes visible."""
        bundle_uri = storage.normalize(bundle_uri)
        bundle_json = storage.join(bundle_uri, BUNDLE_FILE)
        try:
            bundle_info = storage.read_json(bundle_json)
        except ValueError as exc:
            raise BundleError(f"{bundle_json} is damaged: not valid JSON ({exc})") from None
        if not isinstance(bundle_info, dict) or "weights_sha256" not in bundle_info:
            raise BundleError(f"{bundle_json} is damaged: no weights_sha256 recorded")
        # Refuse before taking a number: a version nobody can load must not be registered.
        check_format_version(bundle_info, bundle_json)
        version = self._claim_version(workload, bundle_uri)
        folder = f"{workload}/{version}"
        for name in (WEIGHTS_FILE, BUNDLE_FILE):  # not the optimizer state: serving never needs it
            self.store.copy_in(storage.join(bundle_uri, name), f"{folder}/{name}")
        for name, source in (extra_files or {}).items():
            self.store.copy_in(source, f"{folder}/{name}")
        record = {
            **metadata,
            "workload": workload,
            "version": version,
            "registered_at": _now(),
            "source": bundle_uri,
            "weights_sha256": bundle_info["weights_sha256"],
        }
        # Written last and create-only: its presence is what makes the version visible.
        if not self.store.create(f"{folder}/{METADATA_FILE}", _dumps(record)):
            raise RegistryError(f"{self.store.uri(folder)} already has {METADATA_FILE}: another writer used a claimed version")
        if alias:
            self._append_move(workload, alias, lambda _: version, kind="register", reason=reason or "register", metrics=metrics, user=user)
        return version

    def metadata(self, workload: str, version: int) -> dict[str, Any]:
        rel = f"{workload}/{version}/{METADATA_FILE}"
        data = self.store.read_json(rel)
        if not isinstance(data, dict) or "version" not in data:
            raise RegistryCorrupt(self.store.uri(rel), "expected an object with a 'version'")
        return data

    # ---- aliases --------------------------------------------------------------------------------
    def _history_numbers(self, workload: str) -> list[int]:
        names = (_HISTORY_NAME.match(i.base_name) for i in self.store.children(f"{workload}/{HISTORY_FOLDER}"))
        return sorted(int(m.group(1)) for m in names if m)

    def _history_record(self, workload: str, seq: int) -> dict[str, Any]:
        rel = f"{workload}/{HISTORY_FOLDER}/{seq:010d}.json"
        record = self.store.read_json(rel)
        if not isinstance(record, dict) or not {"alias", "to", "aliases"} <= record.keys() or not isinstance(record["aliases"], dict):
            raise RegistryCorrupt(self.store.uri(rel), "expected an alias-move record with 'alias', 'to' and 'aliases'")
        return record

    def _aliases_file(self, workload: str) -> dict[str, int]:
        rel = f"{workload}/{ALIASES_FILE}"
        if not self.store.exists(rel):
            return {}
        aliases = self.store.read_json(rel)
        if not isinstance(aliases, dict) or not all(isinstance(v, int) for v in aliases.values()):
            raise RegistryCorrupt(self.store.uri(rel), "expected an object mapping alias names to version numbers")
        return aliases

    def _head(self, workload: str) -> tuple[int, dict[str, int]]:
        """(sequence number of the newest move, the alias map after it)."""
        numbers = self._history_numbers(workload)
        if not numbers:
            return 0, self._aliases_file(workload)
        return numbers[-1], dict(self._history_record(workload, numbers[-1])["aliases"])

    def aliases(self, workload: str) -> dict[str, int]:
        return self._head(workload)[1]

    def alias_history(self, workload: str, alias: str | None = None) -> list[dict[str, Any]]:
        """Every recorded move, oldest first (optionally of one alias)."""
        records = [self._history_record(workload, seq) for seq in self._history_numbers(workload)]
        return [r for r in records if alias is None or r["alias"] == alias]

    def move_alias(
        self,
        workload: str,
        alias: str,
        version: int,
        *,
        reason: str,
        metrics: dict[str, Any] | None = None,
        user: str | None = None,
    ) -> dict[str, Any]:
        """Point ``alias`` at ``version`` and append the move to the history; returns the record."""
        version = int(version)
        if version not in self.versions(workload):
            raise ValueError(f"{workload} has no version {version} in {self.root} (versions {self.versions(workload)})")
        return self._append_move(workload, alias, lambda _: version, kind="move", reason=reason, metrics=metrics, user=user)

    def set_alias(self, workload: str, alias: str, version: int) -> None:
        self.move_alias(workload, alias, version, reason="set_alias")

    def rollback_target(self, workload: str, alias: str) -> int:
        """The version ``alias`` pointed to before its latest move that was not itself undone.
        Repeated rollbacks walk further back."""
        earlier: list[int | None] = []
        for record in self.alias_history(workload, alias):
            if record.get("kind") == "rollback":
                if earlier:
                    earlier.pop()
            else:
                earlier.append(record.get("from"))
        if not earlier or earlier[-1] is None:
            raise NothingToRollBack(f"{workload} alias {alias!r} has no earlier version to roll back to in {self.root}")
        return int(earlier[-1])

    def rollback(self, workload: str, alias: str, *, reason: str | None = None, user: str | None = None) -> dict[str, Any]:
        """Move ``alias`` back to the version it had before its last move; returns the record."""

        def choose(_: int) -> int:
            target = self.rollback_target(workload, alias)
            if target not in self.versions(workload):
                raise NothingToRollBack(f"{workload} alias {alias!r} would roll back to version {target}, which is no longer complete")
            return target

        return self._append_move(workload, alias, choose, kind="rollback", reason=reason or "rollback", metrics=None, user=user)

    def _append_move(
        self,
        workload: str,
        alias: str,
        choose: Callable[[int], int],
        *,
        kind: str,
        reason: str,
        metrics: dict[str, Any] | None,
        user: str | None,
    ) -> dict[str, Any]:
        for _ in range(MAX_ATTEMPTS):
            seq, aliases = self._head(workload)
            target = choose(seq)  # re-decided on every attempt: it may depend on what others just did
            record = {
                "seq": seq + 1,
                "workload": workload,
                "alias": alias,
                "from": aliases.get(alias),
                "to": target,
                "kind": kind,
                "at": _now(),
                "user": current_user(user),
                "reason": reason,
                "metrics": metrics,
                "aliases": {**aliases, alias: target},
            }
            if self.store.create(f"{workload}/{HISTORY_FOLDER}/{seq + 1:010d}.json", _dumps(record)):
                self._publish_aliases(workload)
                log.info("registry: %s alias %r %s -> %s (%s, by %s)", workload, alias, record["from"], target, kind, record["user"])
                return record
        raise RegistryError(f"could not record a move of {workload} alias {alias!r} after {MAX_ATTEMPTS} attempts")

    def _publish_aliases(self, workload: str) -> None:
        """Refresh aliases.json from the newest record. A writer that lost a race re-checks after
        its write and rewrites, so the file ends at the newest state whatever the write order."""
        try:
            for _ in range(MAX_ATTEMPTS):
                seq, aliases = self._head(workload)
                self.store.replace(f"{workload}/{ALIASES_FILE}", _dumps(aliases))
                if self._history_numbers(workload)[-1] == seq:
                    return
        except RegistryWriteError as exc:
            # The move is recorded and in effect (the registry reads the history): say so, don't fail it.
            log.warning("registry: %s; the alias move itself is recorded in %s", exc, self.store.uri(f"{workload}/{HISTORY_FOLDER}"))

    def resolve_version(self, workload: str, ref: str | int) -> int:
        """``3``, ``"3"``, ``"v3"``, ``"latest"`` or an alias name -> version number."""
        ref = str(ref)
        versions = self.versions(workload)
        if ref == "latest" and versions:
            return versions[-1]
        number = ref[1:] if ref.startswith("v") and ref[1:].isdigit() else ref
        if number.isdigit() and int(number) in versions:
            return int(number)
        aliases = self.aliases(workload)
        if ref in aliases:
            return aliases[ref]
        raise LookupError(f"no {workload} model {ref!r} in {self.root} (versions {versions}, aliases {sorted(aliases)})")


def resolve_model_uri(models_root: str, workload: str, ref: str) -> str:
    """A model reference is a registry alias/version, or a path/URI of a bundle folder."""
    if ("/" in ref or "://" in ref) and storage.exists(storage.join(storage.normalize(ref), BUNDLE_FILE)):
        return storage.normalize(ref)
    registry = ModelRegistry(models_root)
    return registry.version_uri(workload, registry.resolve_version(workload, ref))
