"""Every path is a URI: local paths, ``file://``, ``s3://``, ``gs://`` — all through ``pyarrow.fs``.

Stages never call ``open()`` or ``os.path`` on user paths, so the same command works on a laptop
and against object storage on a cluster.
"""

from __future__ import annotations

import json
import os
import posixpath
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
