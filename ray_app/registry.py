"""Model registry on plain storage: ``<root>/<workload>/<version>/`` (a bundle + metadata.json)
and ``<root>/<workload>/aliases.json`` mapping movable names like ``production`` to versions.
Everything downstream loads by alias or version, never by a training run's path.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from ray_app import storage
from ray_app.bundle import BUNDLE_FILE, WEIGHTS_FILE

ALIASES_FILE = "aliases.json"
METADATA_FILE = "metadata.json"


class ModelRegistry:
    def __init__(self, root_uri: str) -> None:
        self.root = storage.normalize(root_uri)

    def _workload_uri(self, workload: str) -> str:
        return storage.join(self.root, workload)

    def version_uri(self, workload: str, version: int) -> str:
        return storage.join(self._workload_uri(workload), str(version))

    def versions(self, workload: str) -> list[int]:
        if not storage.exists(self._workload_uri(workload)):
            return []
        infos = storage.list_files(self._workload_uri(workload))
        found = {int(parts[-2]) for parts in (info.path.split("/") for info in infos) if parts[-1] == METADATA_FILE and parts[-2].isdigit()}
        return sorted(found)

    def aliases(self, workload: str) -> dict[str, int]:
        uri = storage.join(self._workload_uri(workload), ALIASES_FILE)
        return storage.read_json(uri) if storage.exists(uri) else {}

    def set_alias(self, workload: str, alias: str, version: int) -> None:
        if version not in self.versions(workload):
            raise ValueError(f"{workload} has no version {version}")
        aliases = {**self.aliases(workload), alias: version}
        storage.write_json(storage.join(self._workload_uri(workload), ALIASES_FILE), aliases)

    def register(self, workload: str, bundle_uri: str, metadata: dict[str, Any], alias: str | None = None) -> int:
        """Copy a bundle in as the next version; metadata.json is written last so a half-copied
        version is never listed."""
        version = max(self.versions(workload), default=0) + 1
        target = self.version_uri(workload, version)
        for name in (WEIGHTS_FILE, BUNDLE_FILE):  # not the optimizer state: serving never needs it
            storage.copy_file(storage.join(bundle_uri, name), storage.join(target, name))
        bundle_info = storage.read_json(storage.join(target, BUNDLE_FILE))
        storage.write_json(
            storage.join(target, METADATA_FILE),
            {
                **metadata,
                "workload": workload,
                "version": version,
                "registered_at": dt.datetime.now(dt.timezone.utc).isoformat(),
                "source": bundle_uri,
                "weights_sha256": bundle_info["weights_sha256"],
            },
        )
        if alias:
            self.set_alias(workload, alias, version)
        return version

    def metadata(self, workload: str, version: int) -> dict[str, Any]:
        return storage.read_json(storage.join(self.version_uri(workload, version), METADATA_FILE))

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
