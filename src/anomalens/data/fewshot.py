"""Seeded few-shot samplers: K-shot normal support sets and N-normal + N-anomalous training subsets.

Selection does not depend on the order records were listed in, on the machine, or on the numpy/Python
version: each candidate gets the rank sha256(f"{seed}/{key}"), where key is its path relative to the
common folder of all candidates, and the lowest ranks are taken. Consequences worth knowing:
* the same seed gives nested sets: the 1-shot support is the first image of the 2-shot support, etc.;
* the same dataset at another location (/data/mvtec vs /mnt/mvtec) gives the same files;
* adding images to a class only changes a selection if a new image outranks a chosen one.
Every sampler returns indices into the dataset; `SupportSet` carries the matching file list for results.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from anomalens.data.types import DataError, Dataset, check_classes


@dataclass(frozen=True)
class SupportSet:
    """K normal images of one class chosen with one seed: dataset indices and their files (same order)."""

    class_name: str
    k: int
    seed: int
    indices: tuple[int, ...]
    files: tuple[str, ...]


def sample_support(
    dataset: Dataset, k: int, seed: int, class_name: str, exclude: Iterable[str] = ()
) -> list[int]:
    """Indices of `k` normal images of `class_name`, deterministic for a seed (see module docstring).

    exclude: paths never chosen, e.g. the query images when support and queries come from one split.
    """
    if k < 1:
        raise DataError(f"k must be a positive number of support images, got {k}")
    check_classes([class_name], dataset.class_names, dataset.name)
    excluded = set(exclude)
    candidates = [
        i
        for i, r in enumerate(dataset.records)
        if r.class_name == class_name and r.label == 0 and r.path not in excluded
    ]
    if len(candidates) < k:
        raise DataError(
            f"class {class_name!r} of {dataset.name} has {len(candidates)} normal images; "
            f"{k} requested for the support set"
        )
    return _ranked(dataset, candidates, seed)[:k]


def sample_support_sets(
    dataset: Dataset, k: int, seeds: Sequence[int], classes: Sequence[str] | None = None
) -> dict[int, dict[str, SupportSet]]:
    """{seed: {class: SupportSet}} for every seed and class (all classes of the dataset when None)."""
    sets: dict[int, dict[str, SupportSet]] = {}
    for seed in seeds:
        sets[seed] = {}
        for cls in classes if classes is not None else dataset.class_names:
            indices = sample_support(dataset, k, seed, cls)
            files = tuple(dataset.records[i].path for i in indices)
            sets[seed][cls] = SupportSet(cls, k, seed, tuple(indices), files)
    return sets


def balanced_subset(dataset: Dataset, n_per_class: int | str | None, seed: int = 0) -> Dataset:
    """N normal + N anomalous images per class (1:1), as AA-CLIP `--shots N` and CoRe-CLIP N-shot train.

    n_per_class "full" or None keeps the whole dataset. A class with fewer than N images of either
    label is an error (it cannot be balanced).
    """
    if n_per_class is None or n_per_class == "full":
        return dataset
    n = int(n_per_class)
    if n < 1:
        raise DataError(f"n_per_class must be a positive number or 'full', got {n_per_class!r}")
    chosen: list[int] = []
    for cls in dataset.class_names:
        for label, kind in ((0, "normal"), (1, "anomalous")):
            candidates = [
                i for i, r in enumerate(dataset.records) if r.class_name == cls and r.label == label
            ]
            if len(candidates) < n:
                raise DataError(
                    f"class {cls!r} of {dataset.name} has {len(candidates)} {kind} images; "
                    f"{n} requested per label"
                )
            chosen += _ranked(dataset, candidates, seed)[:n]
    return dataset.subset(sorted(chosen))


SHOT_SEMANTICS = ("per_label", "per_class", "support")


def shot_subset(dataset: Dataset, shots: int | str | None, semantics: str, seed: int = 0) -> Dataset:
    """The N-shot training subset of `dataset` under a method's shot semantics.

    "per_label": N normal + N anomalous images per class (CoRe-CLIP's N-shot). "per_class": N images
    per class at a 1:1 ratio, N/2 normal + N/2 anomalous (AA-CLIP: "2-shot" = one normal and one
    anomalous image; N must be even). "support": the method trains on a whole auxiliary dataset and
    its K-shot is the normal support at evaluation, so a training subset is an error.
    shots "full" or None keeps the whole dataset.
    """
    if semantics not in SHOT_SEMANTICS:
        raise ValueError(f"shot semantics must be one of {SHOT_SEMANTICS}, got {semantics!r}")
    if shots is None or shots == "full":
        return dataset
    if semantics == "support":
        raise DataError(
            f"shots={shots}: this method trains on a whole auxiliary dataset; its K-shot is the number "
            "of normal support images at evaluation (eval --shots K)"
        )
    if semantics == "per_class":
        n = int(shots)
        if n < 2 or n % 2:
            raise DataError(f"shots={shots}: N images per class at 1:1 needs an even N >= 2")
        return balanced_subset(dataset, n // 2, seed)
    return balanced_subset(dataset, shots, seed)


def normal_only(dataset: Dataset) -> Dataset:
    """The normal (label 0) images of a dataset, in dataset order."""
    indices = [i for i, r in enumerate(dataset.records) if r.label == 0]
    if not indices:
        raise DataError(f"{dataset.name} has no normal images")
    return dataset.subset(indices)


def _ranked(dataset: Dataset, candidates: Sequence[int], seed: int) -> list[int]:
    """Candidates ordered by sha256 of seed and location-independent key (ties broken by key, index)."""
    paths = [dataset.records[i].path for i in candidates]
    try:
        common = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    except ValueError:  # mixed absolute and relative paths: no common folder
        common = ""
    keys = [os.path.relpath(p, common).replace(os.sep, "/") if common else p for p in paths]
    ranks = [hashlib.sha256(f"{seed}/{key}".encode()).hexdigest() for key in keys]
    order = sorted(range(len(candidates)), key=lambda j: (ranks[j], keys[j], candidates[j]))
    return [candidates[j] for j in order]
