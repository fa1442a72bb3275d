"""File I/O chores with one home: atomic writes, temporary names and checksums.

Every file placeforge writes goes through `atomic_write` (or is a folder renamed into place
with a name from `temp_path`): it is written under a hidden temporary name in the target's
folder and renamed over the target, so a reader sees the old file or the new one, never
half of one.  Temporary names carry the host, the process and a random part, so two
writers on different hosts of a shared file system never pick the same name.
`output_lock` makes a job the only writer of its output folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

TMP_MARK = ".tmp-"  # every temporary name is ".<final name>.tmp-<host>-<pid>-<random>"


def temp_path(path: str | os.PathLike) -> Path:
    """A hidden temporary name beside `path`, unique across hosts and processes."""
    path = Path(path)
    host = socket.gethostname().split(".")[0] or "host"
    return path.with_name(f".{path.name}{TMP_MARK}{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_temp_name(name: str) -> bool:
    """True for a name `temp_path` made (a write in progress, or left by a killed one)."""
    return name.startswith(".") and TMP_MARK in name


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` to fill a temporary file, then rename it over `path`.

    The parent folder is created when missing; on any failure the temporary file is removed
    and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only still there when `write` or the rename failed
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | os.PathLike, content: Any, sort_keys: bool = False) -> Path:
    """Write `content` as indented JSON with a final newline, atomically."""
    return write_text_atomic(path, json.dumps(content, indent=2, sort_keys=sort_keys) + "\n")


def write_parquet_atomic(table: pa.Table, path: str | os.PathLike, row_group_size: int | None = None) -> Path:
    """Write `table` (zstd-compressed Parquet) atomically; `row_group_size` rows per row group
    (default: pyarrow's, ~1 M)."""
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_size))


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (files of any size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


LOCK_FILE = ".placeforge.lock"


class OutputLockedError(RuntimeError):
    """Another process is writing the same output folder; the message names it."""


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, job: str) -> Iterator[None]:
    """Hold FOLDER/.placeforge.lock while a job writes FOLDER: one writer per output.

    The lock is an advisory `flock`: the kernel (or the NFS server, which maps it to a
    POSIX lock) releases it when its process ends in any way, so a lock left by a killed
    run is never stale.  The file names its holder (job, host, pid, start time), which a
    second run quotes when it refuses.  A job that wrote nothing (one refused after taking
    the lock) leaves no trace: the lock file goes, and so do the folders this call made.

    Raises:
        OutputLockedError: another process holds the lock.
    """
    folder = Path(folder)
    made = [path for path in (folder, *folder.parents) if not path.exists()]  # deepest first
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    had_lock = lock.exists()
    with _take_lock(lock, job) as handle:
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            if not had_lock and os.listdir(folder) == [LOCK_FILE]:
                lock.unlink()  # while still held: whoever opened it meanwhile re-opens the path (_take_lock)
                for path in made:
                    with contextlib.suppress(OSError):  # one another process wrote into meanwhile stays
                        path.rmdir()
            fcntl.flock(handle, fcntl.LOCK_UN)


def _take_lock(lock: Path, job: str) -> IO[str]:
    """The lock file, open, exclusively locked and naming its holder.  A file its last holder
    unlinked after we opened it is no longer the lock: the path is opened again."""
    while True:
        handle = open(lock, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise OutputLockedError(
                f"{lock.parent} is being written by {holder}; wait for it to finish or choose another output folder"
            ) from None
        try:
            current = os.stat(lock).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            current = False
        if not current:
            handle.close()
            continue
        handle.seek(0)
        handle.truncate()
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        handle.write(f"{job} (host {socket.gethostname()}, pid {os.getpid()}, since {started})\n")
        handle.flush()
        return handle
