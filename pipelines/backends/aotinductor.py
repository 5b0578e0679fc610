"""AOTInductor packages at run time: loading a ``.pt2`` with its kernels in the platform's cache.

Inductor's caches go under the platform's storage (``<jobs>/cache/inductor``), not the default
``/tmp/torchinductor_<user>``; see :func:`inductor_cache_env`. The engines load packages through
:func:`load_package`; the builder (:mod:`pipelines.backends.aotinductor_build`) compiles them.
torch is imported inside functions.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["inductor_cache_env", "load_package"]


@contextlib.contextmanager
def inductor_cache_env(cache_dir: Path) -> Iterator[Path]:
    """Point Inductor's (and Triton's) caches at ``cache_dir`` for the block; restore after.

    Inductor reads TORCHINDUCTOR_CACHE_DIR on every use (and writes the resolved value back into
    the environment), so both variables are saved and restored, unset ones removed again.
    """
    cache_dir = Path(cache_dir).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    wanted = {
        "TORCHINDUCTOR_CACHE_DIR": str(cache_dir),
        "TRITON_CACHE_DIR": str(cache_dir / "triton"),
    }
    saved = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    try:
        yield cache_dir
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def load_package(path: str | Path, cache_dir: Path | None = None) -> Any:
    """An AOTInductor package loaded for running (``model(*tensors)``).

    Loading extracts the package's kernels into Inductor's cache folder; ``cache_dir`` (the
    platform's ``<jobs>/cache/inductor``) keeps them there rather than in /tmp. torch's loader
    fixes that folder at the first load of the process, so every load of a worker must go
    through here with the same folder (the compile stage's check does).
    """
    import torch

    if cache_dir is None:
        return torch._inductor.aoti_load_package(str(path))
    with inductor_cache_env(cache_dir):
        return torch._inductor.aoti_load_package(str(path))
