"""An on-disk cache for generated arrays (large phantoms), keyed by everything they depend on.

A 600-scan phantom takes about a minute to generate on one core and is loaded again by
every run and every evaluation that uses it; read back from disk it takes seconds. The
key hashes the caller's description *and* the source of the generating code, so an
edited phantom can never be served from an old cache. Files are written to a temporary
name and renamed, so concurrent runs never read a half-written file.
"""

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

#: ``$DPSTUDY_CACHE`` overrides the folder; ``off`` disables the cache
CACHE_ENV = "DPSTUDY_CACHE"


def cache_dir() -> Path | None:
    """Where cached arrays live (``$DPSTUDY_CACHE``, else ``~/.cache/dpstudy``), or None if off."""
    env = os.environ.get(CACHE_ENV)
    if env == "off":
        return None
    return Path(env) if env else Path.home() / ".cache" / "dpstudy"


def cached_arrays(name: str, key: dict, sources: list[Path],
                  build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``build()``'s arrays, from the cache entry for ``key`` and ``sources`` when there is one.

    ``key`` must be JSON-serialisable and name everything ``build`` depends on besides the
    code in ``sources`` (files whose bytes are hashed into the key); ``name`` starts the
    file name. An unreadable entry is rebuilt; a folder that cannot be written only
    costs the saving.
    """
    folder = cache_dir()
    if folder is None:
        return build()
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
    for src in sources:
        h.update(Path(src).read_bytes())
    path = folder / f"{name}-{h.hexdigest()[:20]}.npz"
    try:
        with np.load(path, allow_pickle=False) as entry:
            return {k: entry[k] for k in entry.files}
    except (OSError, ValueError, EOFError, KeyError):
        pass  # absent or damaged: rebuild and replace
    arrays = build()
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    except OSError:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
    return arrays
