"""A local pyarrow filesystem whose writes run out of space or stall mid-write: fault injection
without mount privileges. Used by tests and by the subprocesses they SIGKILL."""

from __future__ import annotations

import errno
import os
import time

import pyarrow as pa
import pyarrow.fs as pafs


class _FaultyWriter:
    """A real file on disk that accepts ``budget`` bytes, then fails with ENOSPC (``mode="enospc"``)
    or announces ``MIDWRITE <path>`` on stdout and hangs until killed (``mode="stall"``)."""

    def __init__(self, path: str, budget: int, mode: str) -> None:
        self.path, self.budget, self.mode = path, budget, mode
        self.file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.closed = False

    def write(self, data) -> int:
        data = bytes(data)
        allowed = data[: max(self.budget, 0)]
        self.file.write(allowed)
        self.file.flush()
        self.budget -= len(allowed)
        if len(allowed) < len(data):
            if self.mode == "stall":
                print(f"MIDWRITE {self.path}", flush=True)
                time.sleep(3600)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
        return len(data)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.closed = True
        self.file.close()

    def tell(self) -> int:
        return self.file.tell()

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False


class FaultyLocalHandler(pafs.FileSystemHandler):
    """Delegates to the local filesystem; files whose base name contains ``match`` get a writer
    that fails (or stalls) after ``budget`` bytes."""

    def __init__(self, mode: str = "enospc", budget: int = 0, match: str = "") -> None:
        self.local = pafs.LocalFileSystem()
        self.mode, self.budget, self.match = mode, budget, match

    def open_output_stream(self, path, metadata):
        if self.match in os.path.basename(path):
            return pa.PythonFile(_FaultyWriter(path, self.budget, self.mode), mode="w")
        return self.local.open_output_stream(path)

    # Everything else is plain local I/O.
    def get_type_name(self):
        return "faulty-local"

    def equals(self, other):
        return self is other

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.local.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.local.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("refusing to delete the root")

    def delete_file(self, path):
        self.local.delete_file(path)

    def move(self, src, dest):
        self.local.move(src, dest)

    def copy_file(self, src, dest):
        self.local.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.local.open_input_stream(path)

    def open_input_file(self, path):
        return self.local.open_input_file(path)

    def open_append_stream(self, path, metadata):
        return self.local.open_append_stream(path)


def faulty_filesystem(mode: str = "enospc", budget: int = 0, match: str = "") -> pafs.FileSystem:
    return pafs.PyFileSystem(FaultyLocalHandler(mode, budget, match))
