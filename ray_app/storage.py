"""Every path is a URI: local paths, ``file://``, ``s3://``, ``gs://`` — all through ``pyarrow.fs``.

Stages never call ``open()`` or ``os.path`` on user paths, so the same command works on a laptop
and against object storage on a cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pyarrow.fs as pafs


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def normalize(uri: str) -> str:
    """Absolute local paths (Ray workers may run in another cwd); remote URIs unchanged."""
    if uri.startswith("file://"):
        return os.path.abspath(uri[len("file://") :])
    if is_remote(uri):
        return uri.rstrip("/")
    return os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    if is_remote(uri):
        return posixpath.join(uri, *parts)
    return os.path.join(uri, *parts)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for any supported URI."""
    uri = normalize(uri)
    if is_remote(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), uri


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def delete_dir(uri: str) -> None:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def list_files(uri: str, recursive: bool = True) -> list[pafs.FileInfo]:
    """Files (not folders) under ``uri``, sorted by path so runs are deterministic."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [info]
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input not found: {uri}")
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = resolve(uri)
    fs.create_dir(posixpath.dirname(path) if is_remote(uri) else os.path.dirname(path), recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def copy_dir(src_uri: str, dst_uri: str) -> None:
    src_fs, src = resolve(src_uri)
    dst_fs, dst = resolve(dst_uri)
    dst_fs.create_dir(dst, recursive=True)
    pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)


def copy_file(src_uri: str, dst_uri: str) -> None:
    src_fs, src = resolve(src_uri)
    dst_fs, dst = resolve(dst_uri)
    dst_fs.create_dir(posixpath.dirname(dst) if is_remote(dst_uri) else os.path.dirname(dst), recursive=True)
    pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)


def download_dir(src_uri: str, local_dir: str) -> None:
    """Fetch a (possibly remote) folder to local disk, e.g. to load a model from it."""
    copy_dir(src_uri, local_dir)


# ---- outputs never destroy inputs ----------------------------------------------------------------
class OutputOverlapError(ValueError):
    """An output that equals, contains or lies inside one of the stage's inputs."""


def _comparable_forms(uri: str) -> set[tuple[str, ...]]:
    """Path components of a URI for prefix comparison: ``("s3", bucket, *key)`` remotely; locally
    the absolute path and its realpath (symlinks resolved), so a link cannot hide an overlap."""
    uri = normalize(uri)
    if is_remote(uri):
        scheme, rest = uri.split("://", 1)
        return {(scheme, *[p for p in rest.split("/") if p])}
    return {("file", *[p for p in form.split(os.sep) if p]) for form in (uri, os.path.realpath(uri))}


def refuse_overlap(stage: str, output: str, inputs: list[str | None]) -> None:
    """Raise before anything is written when ``output`` equals, contains or lies inside an input.

    Publishing an output replaces the folder it names, so an output that contains an input would
    delete it; an output inside an input would be read back as input by the next run."""
    out_forms = _comparable_forms(output)
    for input_uri in inputs:
        if not input_uri:
            continue
        for o in out_forms:
            for i in _comparable_forms(input_uri):
                if o == i:
                    relation = "is the same location as"
                elif i[: len(o)] == o:
                    relation = "contains"
                elif o[: len(i)] == i:
                    relation = "lies inside"
                else:
                    continue
                raise OutputOverlapError(
                    f"{stage}: refusing to write the output {output} because it {relation} the input {input_uri}; "
                    "choose an output location outside every input (nothing was written or deleted)"
                )


# ---- atomic publish -------------------------------------------------------------------------------
# One scheme, two mechanisms, chosen by the URI:
# - local/NFS: the output path is a symlink to a sibling version folder ``.<name>.v-<token>``; a run
#   writes ``.<name>.tmp-<token>``, renames it to ``.v-`` once complete, then flips the symlink with
#   one atomic rename. Readers that open ``<output>/...`` see the old or the new version, never a mix.
# - object stores (no rename, no symlink): a run writes under ``<output>/_v/<token>/`` and then puts
#   the small pointer object ``<output>/_CURRENT`` (a single PUT is atomic).
# Readers resolve an output through ``published()``; the previous version is kept one more round so
# a reader that resolved it just before a flip can finish.
POINTER_FILE = "_CURRENT"
VERSIONS_DIR = "_v"
STALE_STAGING_S = 6 * 3600  # an unfinished staging folder older than this is a killed run's: removed


class Staging:
    """Where a run writes its new output: ``uri`` (for Ray Data / storage helpers) or
    ``filesystem`` + ``path`` (pyarrow)."""

    def __init__(self, uri: str, filesystem: pafs.FileSystem, path: str) -> None:
        self.uri, self.filesystem, self.path = uri, filesystem, path


def _token() -> str:
    import secrets

    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(4)}"


def _local_siblings(final: str, kind: str) -> list[str]:
    parent, name = os.path.split(final)
    prefix = f".{name}.{kind}-"
    try:
        return sorted(os.path.join(parent, e) for e in os.listdir(parent) if e.startswith(prefix))
    except FileNotFoundError:
        return []


def _recover_local(final: str) -> None:
    """Finish a flip that a killed run left half-done: a real folder moved aside, the new link not
    yet renamed into place (``final`` missing). The newest complete link wins."""
    if os.path.lexists(final):
        return
    links = [p for p in _local_siblings(final, "link") if os.path.exists(p)]
    if links:
        os.replace(max(links, key=lambda p: os.lstat(p).st_mtime_ns), final)


def published(uri: str) -> str:
    """The concrete location of an output's current version (what readers should open). An
    output written before this scheme existed, or a staging folder, resolves to itself."""
    uri = normalize(uri)
    if is_remote(uri):
        fs, path = resolve(uri)
        pointer = posixpath.join(path, POINTER_FILE)
        if fs.get_file_info(pointer).type != pafs.FileType.File:
            return uri
        with fs.open_input_stream(pointer) as stream:
            version = json.loads(stream.read())["version"]
        return join(uri, VERSIONS_DIR, version)
    if os.path.islink(uri):
        return os.path.realpath(uri)
    if not os.path.exists(uri):  # between the two renames of a half-done flip: read the new version
        links = [p for p in _local_siblings(uri, "link") if os.path.exists(p)]
        if links:
            return os.path.realpath(max(links, key=lambda p: os.lstat(p).st_mtime_ns))
    return uri


def _publish_local(final: str, staged: str, token: str) -> None:
    parent, name = os.path.split(final)
    version = os.path.join(parent, f".{name}.v-{token}")
    _recover_local(final)  # a half-done flip of another run: completed first, then replaced
    os.rename(staged, version)  # complete: from now on a version, no longer a staging folder
    link = os.path.join(parent, f".{name}.link-{token}")
    os.symlink(os.path.basename(version), link)  # relative: the workspace can be moved as a whole
    previous = os.path.realpath(final) if os.path.islink(final) else None
    if os.path.isdir(final) and not os.path.islink(final):
        # A real folder (older layout): move it aside; a kill right here leaves ``final`` missing
        # and the link ready, which _recover_local/published() complete on the next call.
        legacy = os.path.join(parent, f".{name}.v-{token}-replaced")
        os.rename(final, legacy)
        previous = legacy
    elif os.path.lexists(final) and not os.path.islink(final):
        os.remove(link)
        raise FileExistsError(f"{final} exists and is not a folder: not replacing it")
    os.replace(link, final)  # the atomic flip
    for stale in _local_siblings(final, "v"):
        if stale not in (version, previous):
            _retire_local(final, stale)
    for stale in _local_siblings(final, "gone"):  # left by a writer killed while deleting one
        _remove_local(stale)
    now = time.time()
    for stale in _local_siblings(final, "tmp") + _local_siblings(final, "link"):
        if now - _mtime(stale, default=now) > STALE_STAGING_S:
            _remove_local(stale)


def _mtime(path: str, default: float) -> float:
    """A sibling's mtime, or ``default`` when it is gone: another writer may flip or clean up the
    folder this one just listed (seen with three concurrent writers: the publish died)."""
    try:
        return os.lstat(path).st_mtime
    except FileNotFoundError:
        return default


def _retire_local(final: str, version: str) -> None:
    """Delete an old version so that no reader sees part of it. Renamed away first (atomic): a
    reader finds the whole folder under its name or nothing, and one that had already listed it
    fails to open its files and reads again. Deleted in place, a reader that resolved the output
    just before two quick flips could list the folder half-deleted and read a torn output without
    any error (seen once in a fresh-clone CI: three concurrent writers, a read of other than 30 rows)."""
    parent, name = os.path.split(final)
    gone = os.path.join(parent, f".{name}.gone-{uuid.uuid4().hex[:12]}")
    try:
        os.rename(version, gone)
    except FileNotFoundError:  # another writer retired it first
        return
    _remove_local(gone)


def _remove_local(path: str) -> None:
    import shutil

    if os.path.islink(path) or os.path.isfile(path):
        os.remove(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _publish_remote(fs: pafs.FileSystem, path: str, token: str) -> None:
    pointer = posixpath.join(path, POINTER_FILE)
    old: dict[str, Any] = {}
    if fs.get_file_info(pointer).type == pafs.FileType.File:
        with fs.open_input_stream(pointer) as stream:
            old = json.loads(stream.read())
    with fs.open_output_stream(pointer) as stream:  # the flip: one PUT
        stream.write(json.dumps({"version": token, "previous": old.get("version")}).encode())
    keep = {token, old.get("version")}
    versions = posixpath.join(path, VERSIONS_DIR)
    now_ns = time.time_ns()
    for info in fs.get_file_info(pafs.FileSelector(versions, allow_not_found=True)):
        if info.base_name in keep:
            continue
        if info.base_name == old.get("previous") or _newest_mtime_ns(fs, info.path, now_ns) < now_ns - STALE_STAGING_S * 1e9:
            fs.delete_dir(info.path)
    # Files of an output written before this scheme (e.g. ``status=ok/`` at the top): replaced now.
    for info in fs.get_file_info(pafs.FileSelector(path)):
        if info.base_name in (POINTER_FILE, VERSIONS_DIR):
            continue
        fs.delete_dir(info.path) if info.type == pafs.FileType.Directory else fs.delete_file(info.path)


def _newest_mtime_ns(fs: pafs.FileSystem, path: str, default: int) -> int:
    times = [i.mtime_ns for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.mtime_ns]
    return max(times, default=default)


@contextlib.contextmanager
def publishing(uri: str, filesystem: pafs.FileSystem | None = None) -> Iterator[Staging]:
    """Write a new version of the output ``uri`` in a staging location; on a clean exit it replaces
    the old version at once, on an error (or a kill) the old version stays as it was.

    ``filesystem`` writes the staging files through another pyarrow filesystem over the same
    storage (tests wrap the local one to inject faults such as a full disk)."""
    uri = normalize(uri)
    token = _token()
    if is_remote(uri):
        fs, path = resolve(uri)
        staging = Staging(join(uri, VERSIONS_DIR, token), filesystem or fs, posixpath.join(path, VERSIONS_DIR, token))
    else:
        _recover_local(uri)
        parent, name = os.path.split(uri)
        os.makedirs(parent, exist_ok=True)
        fs = pafs.LocalFileSystem()
        path = os.path.join(parent, f".{name}.tmp-{token}")
        staging = Staging(path, filesystem or fs, path)
    staging.filesystem.create_dir(staging.path, recursive=True)
    try:
        yield staging
    except BaseException as exc:
        _discard(fs, staging.path)
        if isinstance(exc, OSError):
            message = f"writing {uri} failed, the previous output is unchanged: {exc}"
            raise (OSError(exc.errno, message) if exc.errno else OSError(message)) from exc
        raise
    if is_remote(uri):
        _publish_remote(fs, path, token)
    else:
        _publish_local(uri, staging.path, token)


def _discard(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_dir(path)
    except (OSError, FileNotFoundError):
        pass  # best effort: an unfinished staging folder is also removed by a later run
