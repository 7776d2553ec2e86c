"""Writing files so that no reader ever sees half of one (model files, results, reports, resume states)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` to write the new file to; renamed onto ``path`` when the block ends.

    Readers see the previous file or the complete new one. When the block raises, the temporary file is
    removed and ``path`` is left as it was. Parent folders are created. The writer creates the file itself,
    so it gets the usual permissions (umask). ``fsync``: flush it to disk before the rename (for files a
    crash must not lose, such as a resume state).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (str as UTF-8) to ``path`` through `atomic_path`."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        f.write(raw)
    return Path(path)
