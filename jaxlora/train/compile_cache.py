"""JAX's persistent compilation cache in a per-user folder: a second run of the same shapes (the next CLI run, a
notebook run again) skips most of the compile, which on a CPU is most of a short run."""

from __future__ import annotations

import os
from pathlib import Path

import jax


def enable_compilation_cache(directory: str | Path | None = None) -> Path:
    """Use `directory`, else `$JAXLORA_CACHE_DIR`, else `~/.cache/jaxlora/xla`. The cache holds compiled code
    that is loaded and run: keep it private to the user."""
    path = Path(directory or os.environ.get("JAXLORA_CACHE_DIR") or Path.home() / ".cache" / "jaxlora" / "xla")
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path
