"""The few storage operations the model registry needs, each with the guarantee it relies on:

- ``read_json``: a damaged or truncated file raises :class:`RegistryCorrupt` naming the file.
- ``replace``: all-or-nothing overwrite. Locally: write a temporary file next to the target, fsync,
  ``os.replace``, fsync the folder, so a crash or a full disk leaves the old file whole. On object
  stores a single PUT is already all-or-nothing (readers see the old or the new object).
- ``create``: create-only write, the registry's one synchronisation primitive (version claims and
  the alias history's sequence numbers). Locally: write a temporary file, fsync, ``os.link`` it to
  the final name (fails if the name exists, so the file appears complete or not at all). On S3:
  ``PutObject`` with ``If-None-Match: *`` (boto3; pyarrow has no conditional put). On GCS:
  ``if_generation_match=0`` (google-cloud-storage). Other schemes get :class:`RegistryError`.

Content writes go through a pyarrow filesystem that callers may wrap (tests inject ENOSPC that way).
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import uuid
from typing import Any

import pyarrow.fs as pafs

from ray_app import storage


class RegistryError(RuntimeError):
    """A registry operation that could not be done; the message says what and where."""


class RegistryCorrupt(RegistryError):
    """A registry file exists but cannot be parsed (truncated, hand-edited, wrong type)."""

    def __init__(self, uri: str, problem: str) -> None:
        super().__init__(f"registry file {uri} is damaged: {problem}. Restore it from a backup or delete it if it is a stray copy")
        self.uri = uri


class RegistryWriteError(RegistryError):
    """A write failed (e.g. disk full); what was there before is unchanged."""

    def __init__(self, uri: str, cause: BaseException) -> None:
        super().__init__(f"could not write {uri}: {cause}; the registry still holds its previous state")
        self.uri = uri
        self.errno = getattr(cause, "errno", None)


class RegistryStore:
    """Files under one registry root, addressed by paths relative to it (``image/3/metadata.json``)."""

    def __init__(self, root_uri: str, filesystem: pafs.FileSystem | None = None) -> None:
        self.remote = storage.is_remote(root_uri)
        self.root = storage.normalize(root_uri)
        if filesystem is None:
            self.fs, self.base = storage.resolve(self.root)
        else:  # an injected filesystem (e.g. a fault-injecting wrapper) over the same root
            self.fs, self.base = filesystem, self.root.split("://", 1)[-1] if self.remote else self.root
        self._s3 = None

    # ---- addressing ---------------------------------------------------------------------------
    def uri(self, rel: str) -> str:
        return storage.join(self.root, *rel.split("/")) if rel else self.root

    def _path(self, rel: str) -> str:
        if not rel:
            return self.base
        return posixpath.join(self.base, rel) if self.remote else os.path.join(self.base, *rel.split("/"))

    # ---- reads --------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self._path(rel)).type != pafs.FileType.NotFound

    def children(self, rel: str) -> list[pafs.FileInfo]:
        """Direct children (files and folders) of ``rel``; empty when it does not exist."""
        selector = pafs.FileSelector(self._path(rel), allow_not_found=True, recursive=False)
        try:
            return self.fs.get_file_info(selector)
        except FileNotFoundError:
            # allow_not_found covers a folder that is absent when looked up, not one another process
            # creates while it is being listed (seen with concurrent alias moves): still "not there yet".
            return []

    def files(self, rel: str) -> list[str]:
        """Paths, relative to ``rel``, of every file below it (one listing, also on object stores)."""
        base = self._path(rel)
        selector = pafs.FileSelector(base, allow_not_found=True, recursive=True)
        infos = self.fs.get_file_info(selector)
        return [i.path[len(base) :].lstrip("/").replace(os.sep, "/") for i in infos if i.type == pafs.FileType.File]

    def read_json(self, rel: str) -> Any:
        with self.fs.open_input_stream(self._path(rel)) as stream:
            data = stream.read()
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RegistryCorrupt(self.uri(rel), f"not valid JSON ({len(data)} bytes; {exc})") from None

    # ---- writes -------------------------------------------------------------------------------
    def replace(self, rel: str, data: bytes) -> None:
        """Overwrite ``rel`` all-or-nothing."""
        path = self._path(rel)
        if self.remote:
            try:
                with self.fs.open_output_stream(path) as stream:
                    stream.write(data)
            except OSError as exc:
                raise RegistryWriteError(self.uri(rel), exc) from exc
            return
        temporary = self._write_temporary(rel, data)
        try:
            os.replace(temporary, path)
        except OSError as exc:
            _remove_quietly(temporary)
            raise RegistryWriteError(self.uri(rel), exc) from exc
        _fsync_folder(os.path.dirname(path))

    def create(self, rel: str, data: bytes) -> bool:
        """Write ``rel`` only if nothing is there; False when another writer got there first."""
        if self.remote:
            return self._create_remote(rel, data)
        temporary = self._write_temporary(rel, data)
        try:
            os.link(temporary, self._path(rel))
        except FileExistsError:
            return False
        except OSError as exc:
            raise RegistryWriteError(self.uri(rel), exc) from exc
        finally:
            _remove_quietly(temporary)
        _fsync_folder(os.path.dirname(self._path(rel)))
        return True

    def copy_in(self, source_uri: str, rel: str) -> None:
        """Copy a file from any URI to ``rel`` (a new version's files: nobody reads them before
        the version's metadata.json exists, so a plain copy is enough)."""
        source_fs, source_path = storage.resolve(source_uri)
        path = self._path(rel)
        self.fs.create_dir(posixpath.dirname(path) if self.remote else os.path.dirname(path), recursive=True)
        try:
            pafs.copy_files(source_path, path, source_filesystem=source_fs, destination_filesystem=self.fs)
        except OSError as exc:
            raise RegistryWriteError(self.uri(rel), exc) from exc

    def _write_temporary(self, rel: str, data: bytes) -> str:
        """Local only: a fully written, fsynced file next to ``rel`` (same folder, so rename and
        link stay on one filesystem)."""
        path = self._path(rel)
        folder = os.path.dirname(path)
        temporary = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            self.fs.create_dir(folder, recursive=True)
            with self.fs.open_output_stream(temporary) as stream:
                stream.write(data)
            fd = os.open(temporary, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            _remove_quietly(temporary)
            raise RegistryWriteError(self.uri(rel), exc) from exc
        return temporary

    def _create_remote(self, rel: str, data: bytes) -> bool:
        scheme, _, rest = self.root.partition("://")
        bucket, _, prefix = rest.partition("/")
        key = posixpath.join(prefix, rel) if prefix else rel
        if scheme == "s3":
            return self._create_s3(bucket, key, data, rel)
        if scheme in ("gs", "gcs"):
            return self._create_gcs(bucket, key, data, rel)
        raise RegistryError(f"{self.root}: the registry needs create-only writes, which it can do on local disk, s3:// and gs:// only")

    def _create_s3(self, bucket: str, key: str, data: bytes, rel: str) -> bool:
        try:
            import boto3
            from botocore.exceptions import ClientError
        except ImportError:
            raise RegistryError("a registry on s3:// needs boto3 for create-only writes (pip install boto3)") from None
        if self._s3 is None:  # endpoint, region and credentials from the usual AWS_* settings, like pyarrow
            client = boto3.client("s3")
            _check_s3_honours_conditions(client, self.root, bucket, key, ClientError)
            self._s3 = client

        try:
            self._s3.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except ClientError as exc:
            # 412: the key exists. 409: a concurrent conditional write to the same key was in flight.
            # Either way the caller re-reads and retries, which is right in both cases.
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                return False
            raise RegistryWriteError(self.uri(rel), exc) from exc
        return True

    def _create_gcs(self, bucket: str, key: str, data: bytes, rel: str) -> bool:  # pragma: no cover - no GCS here
        try:
            from google.api_core.exceptions import PreconditionFailed
            from google.cloud import storage as gcs
        except ImportError:
            raise RegistryError(
                "a registry on gs:// needs google-cloud-storage for create-only writes (pip install 'ray_app[gcs]')"
            ) from None
        try:
            gcs.Client().bucket(bucket).blob(key).upload_from_string(data, if_generation_match=0)
        except PreconditionFailed:
            return False
        return True


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _fsync_folder(folder: str) -> None:
    """Make a rename or link durable: the folder entry must reach the disk too."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _check_s3_honours_conditions(client: Any, root: str, bucket: str, key: str, client_error: type[Exception]) -> None:
    """Some S3-compatible stores ignore If-None-Match and overwrite: concurrent registry writers
    would then race silently. Write a probe twice (once per store object); the second must fail."""
    probe = posixpath.join(posixpath.dirname(key), f".conditional-write-probe-{uuid.uuid4().hex}")
    try:
        client.put_object(Bucket=bucket, Key=probe, Body=b"", IfNoneMatch="*")
        try:
            client.put_object(Bucket=bucket, Key=probe, Body=b"", IfNoneMatch="*")
        except client_error as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412:
                return
            raise
        raise RegistryError(
            f"{root}: this S3 endpoint ignores If-None-Match on PUT, so concurrent registry writers could "
            "overwrite each other; use a store with conditional writes (AWS S3, recent MinIO)"
        )
    finally:
        with contextlib.suppress(Exception):
            client.delete_object(Bucket=bucket, Key=probe)
