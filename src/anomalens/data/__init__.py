"""Datasets as `Sample`s: `load("kind:path?k=v", split, classes)` reads every supported layout.

Specs (layouts and examples in docs/datasets.md):
  mvtec:<root>  mpdd:<root>  btad:<root>  visa:<root>[?csv=1cls]  meta:<meta.json>[?root=DIR]
  folder:<dir>  jsonl:<file.jsonl>[?root=DIR]  inctrl:<dir>[?root=DIR]  contextual:<dir>
  synthetic:<kind>[?n=..&seed=..]  mnist:<root>  cifar10:<root>
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from urllib.parse import parse_qsl

from anomalens.data.fewshot import (
    SupportSet,
    balanced_subset,
    normal_only,
    sample_support,
    sample_support_sets,
    shot_subset,
)
from anomalens.data.formats import READERS, dataset_name
from anomalens.data.io import decode_record, read_image, read_mask
from anomalens.data.types import DataError, Dataset, Record, Sample, concat_datasets, split_parts

KINDS = tuple(sorted(READERS))

__all__ = [
    "KINDS",
    "DataError",
    "Dataset",
    "Record",
    "Sample",
    "SupportSet",
    "balanced_subset",
    "concat_datasets",
    "dataset_name",
    "decode_record",
    "describe",
    "load",
    "normal_only",
    "parse_spec",
    "read_image",
    "read_mask",
    "sample_support",
    "sample_support_sets",
    "shot_subset",
    "verify",
]


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """ "kind:path?k=v&k2=v2" → (kind, path, {k: v, k2: v2}); `~` in the path is expanded."""
    kind, sep, rest = spec.partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in KINDS:
        raise DataError(
            f"unknown dataset kind in {spec!r}; expected <kind>:<path> with kind one of {', '.join(KINDS)}"
        )
    path, _, query = rest.partition("?")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as error:
        raise DataError(f"malformed options {query!r} in dataset spec {spec!r}: {error}") from error
    params = dict(pairs)
    if len(params) != len(pairs):
        raise DataError(f"repeated option in dataset spec {spec!r}")
    return kind, os.path.expanduser(path.strip()), params


def load(spec: str, split: str = "test", classes: Sequence[str] | None = None) -> Dataset:
    """Open a dataset from a spec such as "mvtec:/data/mvtec" or "synthetic:defects?n=40&seed=0".

    split: "train", "test" or "all". classes: a subset of the dataset's classes (None = all).
    Raises DataError (one line, naming the path) for an unknown kind, a missing or empty root, an
    unknown class, a missing mask, ...
    """
    kind, path, params = parse_spec(spec)
    split_parts(split)  # refuses an unknown split before any file is read
    if isinstance(classes, str):
        classes = [classes]
    if kind != "synthetic":
        if not path:
            raise DataError(f"dataset spec {spec!r} has no path after '{kind}:'")
        if not os.path.exists(path):
            raise DataError(f"dataset path not found: {path} ({kind})")
        path = os.path.abspath(path)
    dataset = READERS[kind](path, split, list(classes) if classes is not None else None, params)
    if not len(dataset):
        raise DataError(f"no images in split '{split}' of {spec}")
    return dataset


def describe(dataset: Dataset) -> dict:
    """Counts for `anomalens data`: images, normal, anomalous and masked images in total and per class.

    {"name", "images", "normal", "anomalous", "with_mask", "classes": {cls: {... "defects": {d: n}}}}
    """

    def counts(records: Sequence[Record]) -> dict:
        anomalous = sum(r.label for r in records)
        return {
            "images": len(records),
            "normal": len(records) - anomalous,
            "anomalous": anomalous,
            "with_mask": sum(r.mask_path is not None for r in records),
        }

    classes = {}
    for cls in dataset.class_names:
        records = [r for r in dataset.records if r.class_name == cls]
        defects = Counter(dict(r.meta).get("defect", "") for r in records if r.label == 1)
        classes[cls] = {**counts(records), "defects": dict(sorted(defects.items()))}
    return {"name": dataset.name, **counts(dataset.records), "classes": classes}


def verify(dataset: Dataset) -> list[str]:
    """Decode every sample (image and masks); return the one-line error of each that fails."""
    errors = []
    for record in dataset.records:
        try:
            decode_record(record)
        except DataError as error:
            errors.append(str(error))
    return errors
