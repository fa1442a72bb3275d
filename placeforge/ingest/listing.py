"""Listing a dataset folder, checking its files, and reading one image file safely.

`list_files` walks a tree with `os.scandir` (one `readdir` per folder, no `stat`
per file), follows symlinked folders once each, and reports the folders it could
not or would not enter.  `check_files` then `lstat`s only the files a reader keeps,
to find the unreadable ones, the too large ones and the ones that are the same file
under two names; it opens nothing.  `read_image_file` is the one place an image file
named in a catalog or test split is opened: regular files only (a FIFO would block
the reader forever, a device could be endless), at most MAX_IMAGE_BYTES.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

# Largest image file read, in bytes.  Far above any photo these datasets hold (a few
# MiB at most); it bounds what one bad or hostile file can cost a reader's memory.
MAX_IMAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class SkippedEntry:
    """A listed entry that is an input in its own right but yields no image."""

    relpath: str  # the reject's input: path relative to the root (made printable), or "LIST:line N"
    reason: str  # a catalog.REASONS code
    detail: str


@dataclass(frozen=True)
class Listing:
    """Files under one folder of a dataset root, sorted by relative path."""

    relpaths: list[str]  # [N] POSIX paths relative to the root
    skipped: list[SkippedEntry]  # folders not entered, names that are not text


@dataclass(frozen=True)
class FileStatus:
    """What `check_files` found for [N] files; `problem` is None for a usable file."""

    identity: list[tuple[int, int] | None]  # [N] (st_dev, st_ino) of the target
    is_symlink: list[bool]  # [N]
    problem: list[tuple[str, str] | None]  # [N] (reason, detail) or None


def list_files(root: Path, under: str = "") -> Listing:
    """Every non-folder entry below `root/under`, recursively.

    Real folders are walked first; symlinked folders afterwards, and only if their
    target has not been listed already (so a link never shadows the real copy and
    a link cycle ends).  A folder that cannot be listed is reported as `unreadable`,
    a folder link to an already listed folder as `duplicate`, a name that is not
    valid UTF-8 as `bad_name`.  A missing `root/under` gives an empty listing.
    """
    start = os.path.join(root, under) if under else os.fspath(root)
    relpaths: list[str] = []
    skipped: list[SkippedEntry] = []
    visited: set[tuple[int, int]] = set()
    real_dirs: list[tuple[str, str]] = []  # (absolute, relative), walked depth-first
    linked_dirs: list[tuple[str, str]] = []  # walked once the real tree is done
    try:
        st = os.stat(start)
    except OSError:
        return Listing([], [])
    if not stat.S_ISDIR(st.st_mode):
        return Listing([], [])
    visited.add((st.st_dev, st.st_ino))
    real_dirs.append((start, under))

    while real_dirs or linked_dirs:
        if not real_dirs:
            abs_dir, rel_dir = linked_dirs.pop(0)
            try:
                st = os.stat(abs_dir)
            except OSError as err:
                skipped.append(SkippedEntry(rel_dir, "unreadable", f"folder link cannot be followed: {err.strerror}"))
                continue
            if (st.st_dev, st.st_ino) in visited:
                detail = "folder link to a folder already listed; not entered"
                skipped.append(SkippedEntry(rel_dir, "duplicate", detail))
                continue
            visited.add((st.st_dev, st.st_ino))
            real_dirs.append((abs_dir, rel_dir))
        abs_dir, rel_dir = real_dirs.pop()
        try:
            with os.scandir(abs_dir) as it:
                entries = list(it)
        except OSError as err:
            skipped.append(SkippedEntry(rel_dir or ".", "unreadable", f"folder cannot be listed: {err.strerror}"))
            continue
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            if not is_text(entry.name):
                skipped.append(SkippedEntry(printable(rel), "bad_name", "name is not valid UTF-8"))
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    if (st.st_dev, st.st_ino) not in visited:  # else: bind-mounted twice
                        visited.add((st.st_dev, st.st_ino))
                        real_dirs.append((entry.path, rel))
                elif entry.is_symlink() and _is_dir_target(entry):
                    linked_dirs.append((entry.path, rel))
                else:
                    relpaths.append(rel)  # symlinks too: check_files resolves them
            except OSError as err:  # vanished while listing
                skipped.append(SkippedEntry(rel, "unreadable", f"cannot be inspected: {err.strerror}"))

    return Listing(sorted(relpaths), skipped)


def check_files(root: Path, relpaths: list[str], missing_reason: str) -> FileStatus:
    """`lstat` (and `stat` through links) each file; flag what cannot be read.

    Args:
        root: absolute dataset root.
        relpaths: [N] POSIX paths relative to `root`.
        missing_reason: reason for a path with nothing at it: "missing_file" where the
            path came from metadata, "unreadable" where it was listed a moment ago.
    """
    identity: list[tuple[int, int] | None] = []
    is_symlink: list[bool] = []
    problem: list[tuple[str, str] | None] = []
    prefix = os.fspath(root) + os.sep
    for rel in relpaths:
        path = prefix + rel
        found, link, trouble = _check_one(path, rel, missing_reason)
        identity.append(found)
        is_symlink.append(link)
        problem.append(trouble)
    return FileStatus(identity, is_symlink, problem)


def _check_one(path: str, rel: str, missing_reason: str) -> tuple[tuple[int, int] | None, bool, tuple[str, str] | None]:
    try:
        st = os.lstat(path)
    except OSError as err:
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            return None, False, (missing_reason, f"{rel} does not exist")
        return None, False, ("unreadable", f"{rel}: {err.strerror}")
    link = stat.S_ISLNK(st.st_mode)
    if link:
        try:
            st = os.stat(path)
        except OSError as err:
            return None, True, ("unreadable", f"{rel} is a broken symlink to {os.readlink(path)!r}: {err.strerror}")
    if not stat.S_ISREG(st.st_mode):
        return None, link, ("unreadable", f"{rel} is not a regular file ({_kind(st.st_mode)})")
    if st.st_size > MAX_IMAGE_BYTES:
        return None, link, ("too_large", f"{rel} is {st.st_size} bytes, over the {MAX_IMAGE_BYTES}-byte limit")
    if not os.access(path, os.R_OK):
        return None, link, ("unreadable", f"{rel}: permission denied")
    return (st.st_dev, st.st_ino), link, None


def read_image_file(path: str | os.PathLike) -> bytes | None:
    """The bytes of the regular file at `path` (through symlinks), or None.

    None for anything that is not a regular file (never opened), for a file over
    MAX_IMAGE_BYTES, for one whose size changes while it is read, and for an OSError.
    The open is non-blocking and the opened file is checked again, so a FIFO swapped in
    after the first check cannot hang the read.
    """
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_IMAGE_BYTES:
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_IMAGE_BYTES:
                return None
            data = f.read(st.st_size + 1)  # never more than the cap + 1, whatever the file does now
    except OSError:
        return None
    return data if len(data) == st.st_size else None


_KINDS = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}  # fmt: skip


def _kind(mode: int) -> str:
    """What a file that is not a regular one is, for a reject's detail."""
    return _KINDS.get(stat.S_IFMT(mode), "of another kind")


def _is_dir_target(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return False


def is_text(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes arrive as lone surrogates
        return False
    return True


def printable(rel: str) -> str:
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
