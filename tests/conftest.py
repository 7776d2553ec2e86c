"""Shared fixtures: a tiny on-disk MVTec AD tree for tests of readers, CLI commands and evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_mvtec_tree(root: Path, size: int = 16) -> Path:
    """Two classes in the MVTec AD layout: "bottle" (RGB) and "grid" (grayscale, saved as L-mode PNG).

    Per class: train/good 4 images, test/good 2, test/crack 2 with ground_truth/crack/<stem>_mask.png
    (a size//4 square at the top-left), plus a macOS "._000.png" metadata file that readers must skip.
    """
    rng = np.random.default_rng(0)
    for cls, shape in (("bottle", (size, size, 3)), ("grid", (size, size))):
        for part, defect, n in (("train", "good", 4), ("test", "good", 2), ("test", "crack", 2)):
            folder = root / cls / part / defect
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / f"{i:03d}.png")
            (folder / "._000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
        masks = root / cls / "ground_truth" / "crack"
        masks.mkdir(parents=True)
        for i in range(2):
            mask = np.zeros((size, size), np.uint8)
            mask[: size // 4, : size // 4] = 255
            Image.fromarray(mask).save(masks / f"{i:03d}_mask.png")
    return root


@pytest.fixture
def mvtec_root(tmp_path: Path) -> Path:
    """Path of a fresh tiny MVTec AD tree (see `write_mvtec_tree`), its folder named "mvtec"."""
    return write_mvtec_tree(tmp_path / "mvtec")
