"""Typed containers shared by every dataset reader: one `Sample` per image, a `Dataset` of them."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

SPLITS = ("train", "test", "all")


class DataError(ValueError):
    """A dataset, image or mask that cannot be used as given; the message is one line naming the file.

    Newlines in the message are folded into spaces so that a CLI can print it as a single line.
    """

    def __init__(self, message: str):
        super().__init__(re.sub(r"\s*[\r\n]+\s*", " ", str(message)).strip())


@dataclass
class Sample:
    """One image with its annotation.

    image: uint8 (H, W, 3) RGB. mask: bool (H, W) pixel ground truth, None for normal images (and for
    anomalous images of classification-only sets). label: 0 normal, 1 anomalous.
    subject_mask: bool (H, W) subject region for contextual datasets, else None.
    meta: extra per-sample facts (e.g. {"context": "highway", "split": "CC", "defect": "scratch"}).
    """

    image: np.ndarray
    mask: np.ndarray | None
    label: int
    class_name: str
    path: str
    subject_mask: np.ndarray | None = None
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Record:
    """What a reader knows about a sample before decoding it (cheap to list, filter and sample)."""

    path: str
    label: int
    class_name: str
    mask_path: str | None = None
    subject_mask_path: str | None = None
    meta: tuple[tuple[str, str], ...] = ()


class Dataset:
    """A list of records plus a loader that decodes one record into a `Sample` on access."""

    def __init__(self, name: str, records: Sequence[Record], load: Callable[[Record], Sample]):
        self.name = name
        self.records = list(records)
        self._load = load

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Sample:
        return self._load(self.records[i])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def class_names(self) -> list[str]:
        return sorted({r.class_name for r in self.records})

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.records], dtype=np.int64)

    def subset(self, indices: Sequence[int], name: str | None = None) -> Dataset:
        return Dataset(name or self.name, [self.records[i] for i in indices], self._load)

    def __repr__(self) -> str:
        n_anom = int(self.labels.sum()) if self.records else 0
        return f"Dataset({self.name!r}, {len(self)} images, {n_anom} anomalous, classes={self.class_names})"


def split_parts(split: str) -> tuple[str, ...]:
    """The stored parts a split reads: ("train",), ("test",) or both for "all"; other names are an error."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return ("train", "test") if split == "all" else (split,)


def check_classes(classes: Sequence[str] | None, available: Sequence[str], source: str) -> None:
    """Every requested class (None: all) must exist; the error names ``source`` and the available ones."""
    unknown = [c for c in classes or () if c not in available]
    if unknown:
        raise DataError(
            f"unknown class {unknown[0]!r} in {source}; available classes: {', '.join(available)}"
        )


def concat_datasets(datasets: Sequence[Dataset]) -> Dataset:
    """One `Dataset` over several, named "a+b" (each sample is decoded by the dataset it came from)."""
    if len(datasets) == 1:
        return datasets[0]
    owner = {}
    for d in datasets:
        for i, record in enumerate(d.records):
            owner.setdefault(record, (d, i))

    def load(record: Record) -> Sample:
        d, i = owner[record]
        return d[i]

    return Dataset("+".join(d.name for d in datasets), [r for d in datasets for r in d.records], load)
