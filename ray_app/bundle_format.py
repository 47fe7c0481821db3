"""A model bundle's file layout and format version, importable without torch (the registry and
its tools only need the names)."""

from __future__ import annotations

from typing import Any

WEIGHTS_FILE = "model.safetensors"
BUNDLE_FILE = "bundle.json"
# Bump when a bundle written by new code could be misread by old code (or the reverse), and teach
# load_bundle to read every older version. Bundles from before the field existed are version 1.
BUNDLE_FORMAT_VERSION = 1


class BundleError(ValueError):
    """A bundle that cannot be loaded; the message names the file and what is wrong."""


class UnsupportedBundleFormat(BundleError):
    """A bundle written by a newer ray_app than this one."""


def check_format_version(info: dict[str, Any], uri: str) -> int:
    """The bundle's format version (1 when the field is absent); refuses one this code cannot read."""
    version = info.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= BUNDLE_FORMAT_VERSION:
        raise UnsupportedBundleFormat(
            f"{uri}: bundle format_version {version!r} is not one this ray_app reads (1..{BUNDLE_FORMAT_VERSION}); "
            "it was written by a newer ray_app: upgrade ray_app to load it"
        )
    return version
