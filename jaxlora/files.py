"""Writing outputs so that nothing is lost: atomically (a reader never sees half a file) and never over an
existing file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_new_file(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path`, which must not exist yet; FileExistsError names it otherwise.

    The bytes go to a temporary file in the same folder, are flushed to disk, and are then hard-linked to the
    final name, which fails instead of replacing a file that appeared meanwhile. On filesystems without hard
    links the temporary file is renamed after a last existence check.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        raise FileExistsError(f"{path} exists; jaxlora never overwrites a file")
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            raise FileExistsError(f"{path} exists; jaxlora never overwrites a file") from None
        except OSError:
            if path.exists():
                raise FileExistsError(f"{path} exists; jaxlora never overwrites a file") from None
            os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path
