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


def write_visa_tree(root: Path, size: int = 16) -> Path:
    """Two classes in the VisA layout ("candle", "pcb1") listed by split_csv/1cls.csv: per class 4 train
    normals, 2 test normals and 2 test anomalies whose masks hold 1 (as VisA's) on a size//4 square."""
    rng = np.random.default_rng(1)
    rows = ["object,split,label,image,mask"]
    for cls in ("candle", "pcb1"):
        for split, label, n in (("train", "normal", 4), ("test", "normal", 2), ("test", "anomaly", 2)):
            for i in range(n):
                folder = "Normal" if label == "normal" else "Anomaly"
                image = f"{cls}/Data/Images/{folder}/{split}{i:03d}.JPG"
                mask = f"{cls}/Data/Masks/Anomaly/{split}{i:03d}.png" if label == "anomaly" else ""
                (root / image).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / image)
                if mask:
                    (root / mask).parent.mkdir(parents=True, exist_ok=True)
                    pixels = np.zeros((size, size), np.uint8)
                    pixels[: size // 4, : size // 4] = 1
                    Image.fromarray(pixels).save(root / mask)
                rows.append(f"{cls},{split},{label},{image},{mask}")
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return root


def write_contextual_tree(root: Path, size: int = 16) -> Path:
    """A CAAD-3K-schema `contextual:` folder: classes "boat" and "car"; per class 4 normal + 4 anomalous
    seen-context (SS) rows and 2 + 2 cross-context (CC) rows, each with a subject mask (a centre square)."""
    rng = np.random.default_rng(2)
    root.mkdir(parents=True, exist_ok=True)
    subject = np.zeros((size, size), np.uint8)
    subject[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    Image.fromarray(subject).save(root / "subject.png")
    rows = ["image,subject_mask,class,context,label,split"]
    for cls, (home, away) in (("boat", ("harbour", "highway")), ("car", ("road", "lake"))):
        for part, n in (("SS", 4), ("CC", 2)):
            for label in (0, 1):
                for i in range(n):
                    name = f"{cls}_{part}_{label}_{i}.png"
                    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / name)
                    rows.append(f"{name},subject.png,{cls},{away if label else home},{label},{part}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root
