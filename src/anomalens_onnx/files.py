"""Finding input images and naming output files: the part of `detect` the torch-free ``anomalens-onnx``
command and the full library's `anomalens.detect` share (standard library only)."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Image files named by files, folders (recursive) and glob patterns, without duplicates.

    A file is taken as given. Folders and patterns yield files with an image suffix, in sorted order,
    skipping hidden ones (e.g. macOS "._x.png"). An input that yields nothing raises FileNotFoundError.
    """

    def images(paths: Sequence[str]) -> list[str]:
        return sorted(
            p
            for p in paths
            if p.lower().endswith(IMAGE_SUFFIXES)
            and not os.path.basename(p).startswith(".")
            and os.path.isfile(p)
        )

    files: dict[str, None] = {}  # ordered, without duplicates
    for item in inputs:
        if os.path.isdir(item):
            found = images([str(p) for p in Path(item).rglob("*")])
        elif os.path.isfile(item):
            found = [item]
        else:
            found = images(glob.glob(item, recursive=True))
        if not found:
            raise FileNotFoundError(f"no image found for {item!r}")
        files.update(dict.fromkeys(found))
    return list(files)


def unique_stem(stem: str, taken: set[str]) -> str:
    """`stem`, or `stem-2`, `stem-3`, ... when taken; the name returned is added to `taken`."""
    name, n = stem, 2
    while name in taken:
        name, n = f"{stem}-{n}", n + 1
    taken.add(name)
    return name
