"""Writing stage outputs so that a killed worker never leaves a file that looks complete.

A stage writes its model into a hidden partial folder inside its stage directory and the files are
renamed into place only when the stage has checked them. ``os.replace`` within one folder tree on
one filesystem is atomic, so the final name exists only once the whole file does; the main model
file is moved last, so its existence also means its companion files (ONNX external data) are there.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# Hidden, so listing a stage directory shows only published files; the prefix is how
# clean_partials recognises what a killed worker left behind.
PARTIAL_PREFIX = ".partial-"


@dataclass
class StagingArea:
    """A partial folder whose files are published into ``stage_dir`` when the block succeeds.

    Set ``main`` to the file that stands for the whole output (the model file); it is moved last.
    """

    dir: Path
    stage_dir: Path
    main: str | None = None


@contextmanager
def staging_area(stage_dir: Path) -> Iterator[StagingArea]:
    """Yield a :class:`StagingArea`; publish its files into ``stage_dir`` if the block succeeds.

    If the block raises, nothing is published and the partial folder is removed.
    """
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    area = StagingArea(
        dir=Path(tempfile.mkdtemp(prefix=PARTIAL_PREFIX, dir=stage_dir)), stage_dir=stage_dir
    )
    try:
        yield area
        main = area.dir / area.main if area.main else None
        if main is not None and not main.is_file():
            raise FileNotFoundError(f"the stage did not write {area.main}")
        for item in sorted(area.dir.iterdir()):
            if item != main and item.is_file():
                os.replace(item, stage_dir / item.name)
        if main is not None:
            os.replace(main, stage_dir / main.name)
    finally:
        shutil.rmtree(area.dir, ignore_errors=True)


@contextmanager
def staged_output(stage_dir: Path, filename: str) -> Iterator[Path]:
    """Yield a temporary path for ``stage_dir/filename``; publish it when the block succeeds.

    Everything the block writes next to the yielded path (external data files, for instance) is
    published with it, the yielded file last. If the block raises, nothing is published and the
    temporary files are removed.
    """
    with staging_area(stage_dir) as area:
        area.main = filename
        yield area.dir / filename


@contextmanager
def scratch_dir(stage_dir: Path) -> Iterator[Path]:
    """Yield a temporary folder for intermediate files that are never published."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=PARTIAL_PREFIX + "scratch-", dir=stage_dir))
    try:
        yield tmp_dir
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def clean_partials(stage_dir: Path) -> int:
    """Remove partial folders a killed worker left in ``stage_dir``; return how many there were."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return 0
    removed = 0
    for item in stage_dir.iterdir():
        if item.name.startswith(PARTIAL_PREFIX) and item.is_dir():
            shutil.rmtree(item, ignore_errors=True)
            removed += 1
    return removed
