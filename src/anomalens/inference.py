"""The one batch loop around `Method.predict` over a dataset (used by evaluation, calibration, detect).

Images are read and resized to the model's input in data loader worker processes (PyTorch's
`DataLoader`) while the model scores the previous batch; the model's process only normalises them. A
large set never sits in memory at once: the workers keep at most two batches each ahead. Each image is
scored under its own record's class name. Results do not depend on the number of workers: the batches
are the same and come back in order. Where the caller needs no image (`predict_dataset`), a worker
sends back only each image's size with the resized pixels: the model needs nothing else of it.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from anomalens.contracts import Prediction
from anomalens.data.types import DataError, Dataset, Sample

if TYPE_CHECKING:
    from anomalens.methods.base import Method

MAX_WORKERS = 4  # decoding and resizing one image costs far less than scoring it: a few workers suffice


def default_workers(batches: int) -> int:
    """Loader processes when `workers` is None: none for a single batch (nothing to overlap with) or
    where processes cannot be forked, else min(4, half the CPUs this process may use)."""
    if batches < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cpus // 2))


@dataclass
class LoadedBatch:
    """What a worker hands back for one batch of records: the decoded samples, the one-line messages of
    those that could not be read (`DataError`), and the samples' images resized for the model."""

    samples: list[Sample]
    failures: list[str]
    pixels: torch.Tensor | None  # uint8 (B, 3, S, S) from `Method.input_pixels`; None without samples

    def with_images(self) -> LoadedBatch:
        """The batch with each image a worker sent as its size only, (H, W, 0), made a `size_only`
        stand-in of shape (H, W, 3) (no copy is made)."""
        for s in self.samples:
            if s.image.shape[2:] == (0,):
                s.image = size_only(s.image.shape[:2])
        return self


def size_only(size: tuple[int, ...]) -> np.ndarray:
    """A read-only uint8 (H, W, 3) array of zeros taking no memory (zero strides): an image's stand-in
    where only its size is used (`Method.predict` given ``pixels`` reads nothing else of it)."""
    return np.broadcast_to(np.zeros(1, np.uint8), (*size, 3))


def predict_batches(
    method: Method,
    dataset: Dataset,
    *,
    support: Any = None,
    batch_size: int = 16,
    errors: list[str] | None = None,
    on_batch: Callable[[int], None] | None = None,
    workers: int | None = None,
    keep_images: bool = True,
) -> Iterator[tuple[list[Sample], Prediction]]:
    """Yield (samples, prediction of those samples) for consecutive batches of `batch_size` images (a
    set-level method, e.g. MuSc, gets the whole dataset as one set; `batch_size` still bounds its passes).

    support: given to every `predict` call (few-shot methods). errors: when a list, a sample that cannot
    be decoded (`DataError`) is skipped and its one-line message appended; else the error propagates.
    on_batch: called with the number of records each batch consumed (decoded or skipped), e.g. a
    progress bar's ``update``. workers: loader processes that read and resize the images (0: in this
    process; None: `default_workers`). keep_images: False replaces each yielded sample's image by a
    stand-in of its size (`size_only`) wherever the worker resized it for the model.
    """
    n = len(dataset)
    chunks = [range(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    workers = default_workers(len(chunks)) if workers is None else workers
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    prepare = getattr(method, "input_pixels", None)  # an ONNX model resizes inside its own predict
    pending: list[LoadedBatch] = []
    for k, loaded in enumerate(load_batches(dataset, chunks, prepare, workers, keep_images)):
        if loaded.failures and errors is None:
            raise DataError(loaded.failures[0])
        if errors is not None:
            errors.extend(loaded.failures)
        pending.append(loaded)
        if method.set_level and k < len(chunks) - 1:
            continue  # a set-level method scores the whole set in one call
        samples = [s for p in pending for s in p.samples]
        if samples:
            pixels = [p.pixels for p in pending if p.samples]
            extra = {} if any(p is None for p in pixels) else {"pixels": torch.cat(pixels)}
            images = [s.image for s in samples]
            names = [s.class_name for s in samples]
            yield samples, method.predict(images, names, support=support, batch_size=batch_size, **extra)
        if on_batch is not None:
            on_batch(sum(len(chunks[i]) for i in range(k + 1 - len(pending), k + 1)))
        pending = []


def load_batches(
    dataset: Dataset,
    chunks: Sequence[Sequence[int]],
    prepare: Callable[[list[np.ndarray]], torch.Tensor | None] | None,
    workers: int,
    keep_images: bool = True,
) -> Iterator[LoadedBatch]:
    """The `LoadedBatch` of each chunk of record indices, in order; read by `workers` forked loader
    processes (0: here, one batch at a time). ``prepare`` resizes a batch's images (or None);
    keep_images: as in `predict_batches`."""
    batches = _Batches(dataset, chunks, prepare, keep_images)
    if workers == 0:
        return (batches[i].with_images() for i in range(len(batches)))
    loader = DataLoader(
        batches,
        batch_size=None,  # each item already is a batch
        collate_fn=_as_is,
        num_workers=workers,
        multiprocessing_context="fork",  # the dataset and method are inherited, not pickled
    )
    return (batch.with_images() for batch in loader)


class _Batches(torch.utils.data.Dataset):
    """Item i: the `LoadedBatch` of ``chunks[i]``."""

    def __init__(
        self,
        dataset: Dataset,
        chunks: Sequence[Sequence[int]],
        prepare: Callable[[list[np.ndarray]], torch.Tensor | None] | None,
        keep_images: bool,
    ):
        self.dataset, self.chunks, self.prepare, self.keep_images = dataset, chunks, prepare, keep_images

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> LoadedBatch:
        samples, failures = [], []
        for j in self.chunks[i]:
            try:
                samples.append(self.dataset[j])
            except DataError as error:
                failures.append(str(error))
        pixels = None
        if samples and self.prepare is not None:
            pixels = self.prepare([s.image for s in samples])
        if pixels is not None and not self.keep_images:  # send (H, W, 0): the size without the pixels
            samples = [dataclasses.replace(s, image=s.image[:, :, :0]) for s in samples]
        return LoadedBatch(samples, failures, pixels)


def _as_is(batch: LoadedBatch) -> LoadedBatch:
    return batch


def predict_dataset(
    method: Method,
    dataset: Dataset,
    *,
    support: Any = None,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
    workers: int | None = None,
) -> tuple[Prediction, list[np.ndarray | None]]:
    """The prediction of every image of `dataset`, in order, and its mask (None for normal images).

    Maps are stacked into one (N,H,W) array when all images share a size, else kept as a list; extras
    are concatenated per name (`Prediction.concat`). workers: as in `predict_batches`.
    """
    parts, masks = [], []
    for samples, pred in predict_batches(
        method,
        dataset,
        support=support,
        batch_size=batch_size,
        on_batch=on_batch,
        workers=workers,
        keep_images=False,
    ):
        parts.append(pred)
        masks.extend(s.mask for s in samples)
    if not parts:
        raise ValueError(f"dataset {dataset.name!r} is empty")
    return Prediction.concat(parts), masks
