"""Write a directory (a bundle, a detector) so that a failure never leaves it half-written.

Everything is built in a fresh directory beside the target, which then takes the target's place
in two renames (the old one is put back if the second fails) and is removed on any failure.
Used by the exporter, `vlmguard detector export` and `vlmguard calibrate --bundle`. Standard
library only.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def replace_directory(new: Path, target: Path) -> None:
    """Put `new` in `target`'s place; if that fails after `target` moved aside, it is put back."""
    if not target.exists():
        new.rename(target)
        return
    previous = Path(tempfile.mkdtemp(prefix=f".{target.name}.previous.", dir=target.parent))
    previous.rmdir()  # only its unique name is wanted
    target.rename(previous)
    try:
        new.rename(target)
    except BaseException:
        previous.rename(target)
        raise
    shutil.rmtree(previous, ignore_errors=True)


@contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """A new directory beside `target` to build into; when the block succeeds it replaces it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        replace_directory(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
