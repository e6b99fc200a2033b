"""Writing outputs so that nothing is lost: atomically (a reader never sees half a file), never over an existing
file, readable like any file the user makes (0666 minus the umask), and byte for byte the same for the same
content. Temporary files and folders are locked while in use, so what a killed process left behind can be told
apart from what a live one is writing, and is removed by the next run."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors.numpy import save

PARTIAL = ".partial"
# Temporary files and folders older than this (this process's first use of jaxlora) and unlocked are leftovers.
STARTED = time.time()


def write_new_file(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path`, which must not exist yet; FileExistsError names it otherwise.

    The bytes go to a locked temporary file in the same folder, are flushed to disk, and are then hard-linked to
    the final name, which fails instead of replacing a file that appeared meanwhile. On filesystems without hard
    links the temporary file is renamed after a last existence check.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        raise FileExistsError(f"{path} exists; jaxlora never overwrites a file")
    with _temporary_copy(path, data) as temporary:
        try:
            os.link(temporary, path)
        except FileExistsError:
            raise FileExistsError(f"{path} exists; jaxlora never overwrites a file") from None
        except OSError:
            if path.exists():
                raise FileExistsError(f"{path} exists; jaxlora never overwrites a file") from None
            os.replace(temporary, path)
    _sync_folder(path.parent)
    return path


def replace_file(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically, replacing the file if there is one: a reader (or a run after a crash)
    sees the old content or the new, never a mix or an empty file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _temporary_copy(path, data) as temporary:
        os.replace(temporary, path)
    _sync_folder(path.parent)
    return path


@contextmanager
def _temporary_copy(path: Path, data: bytes) -> Iterator[Path]:
    """`data` in a hidden, locked, fsynced `.<name>.<random>.partial` beside `path`, removed on the way out.

    Created with mode 0666 so that the umask alone decides who may read the final file (mkstemp's 0600 would
    make outputs unreadable to anyone else)."""
    temporary = path.parent / f".{path.name}.{secrets.token_hex(6)}{PARTIAL}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        _lock(fd, wait=True)
        with os.fdopen(fd, "wb", closefd=False) as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        yield temporary
    finally:
        os.close(fd)
        if temporary.exists():
            temporary.unlink()


def _sync_folder(folder: Path) -> None:
    """Make a rename or link in `folder` durable (its entry survives a power cut)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(root: str | Path) -> None:
    """fsync every file and folder under `root`: for trees written by a library that does not (orbax), before
    they are declared complete."""
    root = Path(root)
    for folder, _, names in os.walk(root, topdown=False):
        for name in names:
            fd = os.open(Path(folder) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _sync_folder(Path(folder))


def remove_abandoned_partials(folder: str | Path) -> list[Path]:
    """Remove the `.partial` files a killed process left in `folder`: those older than this process's start and
    not locked by a writer. Returns what was removed."""
    removed = []
    for partial in Path(folder).glob(f".*{PARTIAL}"):
        if partial.is_file() and _abandoned(partial, partial):
            partial.unlink(missing_ok=True)
            removed.append(partial)
    return removed


def _abandoned(path: Path, lock_file: Path) -> bool:
    """Whether `path` predates this process and `lock_file` (if there is one) is held by no process."""
    try:
        if path.stat().st_mtime >= STARTED:
            return False
        fd = os.open(lock_file, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        return _lock(fd)
    finally:
        os.close(fd)


def _lock(fd: int, wait: bool = False) -> bool:
    """Take an exclusive flock on `fd`; False if another open file holds it (and not `wait`). On filesystems
    without flock (some network and FUSE mounts) there is no one to coordinate with, so it counts as taken."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError as error:
        if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    return True


class FolderInUseError(RuntimeError):
    """Another process holds the lock of a folder; the message names it."""


@contextmanager
def folder_lock(folder: str | Path, lock_name: str = ".lock") -> Iterator[Path]:
    """Hold an exclusive lock on `folder` (fcntl.flock on a lock file in it) while the block runs; the kernel
    drops it when the process dies, so a killed run never leaves a folder locked. FolderInUseError if another
    process (or another holder in this one) has it."""
    lock_file = Path(folder) / lock_name
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if not _lock(fd):
            raise FolderInUseError(f"{folder} is in use by another process (it holds {lock_file})")
        yield lock_file
    finally:
        os.close(fd)


def is_locked(folder: str | Path, lock_name: str = ".lock") -> bool:
    """Whether a live process holds `folder_lock` on `folder`."""
    try:
        with folder_lock(folder, lock_name):
            return False
    except FolderInUseError:
        return True


@contextmanager
def scratch_folder(prefix: str) -> Iterator[Path]:
    """A locked temporary folder, removed on the way out. Folders of the same prefix that killed processes left
    behind (unlocked, older than this process) are removed first, so `kill -9` does not fill the temp folder."""
    for stale in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        if stale.is_dir() and stale.stat().st_uid == os.getuid() and _abandoned(stale, stale / ".lock"):
            shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=prefix) as folder, folder_lock(folder):
        yield Path(folder)


def safetensors_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """`safetensors.numpy.save` with the metadata in sorted key order: safetensors keeps it in a hash map whose
    order changes from process to process, and the same adapter should give the same bytes (and sha256). The
    tensors are already in a fixed order (by dtype, then name), and their offsets do not depend on the header."""
    data = save(tensors, metadata=metadata)
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + length :]
