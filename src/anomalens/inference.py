"""The one batch loop around `Method.predict` over a dataset (used by evaluation, calibration, detect).

Images are decoded one batch at a time, so a large set never sits in memory at once; each image is
scored under its own record's class name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from anomalens.contracts import Prediction
from anomalens.data.types import DataError, Dataset, Sample

if TYPE_CHECKING:
    from anomalens.methods.base import Method


def predict_batches(
    method: Method,
    dataset: Dataset,
    *,
    support: Any = None,
    batch_size: int = 16,
    errors: list[str] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Iterator[tuple[list[Sample], Prediction]]:
    """Yield (samples, prediction of those samples) for consecutive batches of `batch_size` images (a
    set-level method, e.g. MuSc, gets the whole dataset as one set; `batch_size` still bounds its passes).

    support: given to every `predict` call (few-shot methods). errors: when a list, a sample that cannot
    be decoded (`DataError`) is skipped and its one-line message appended; else the error propagates.
    on_batch: called with the number of records each batch consumed (decoded or skipped), e.g. a
    progress bar's ``update``.
    """
    step = len(dataset) if method.set_level else batch_size  # a set-level method scores the set at once
    for start in range(0, len(dataset), step):
        indices = range(start, min(start + step, len(dataset)))
        samples = []
        for i in indices:
            try:
                samples.append(dataset[i])
            except DataError as error:
                if errors is None:
                    raise
                errors.append(str(error))
        if samples:
            images = [s.image for s in samples]
            names = [s.class_name for s in samples]
            yield samples, method.predict(images, names, support=support, batch_size=batch_size)
        if on_batch is not None:
            on_batch(len(indices))


def predict_dataset(
    method: Method,
    dataset: Dataset,
    *,
    support: Any = None,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[Prediction, list[np.ndarray | None]]:
    """The prediction of every image of `dataset`, in order, and its mask (None for normal images).

    Maps are stacked into one (N,H,W) array when all images share a size, else kept as a list; extras
    are concatenated per name.
    """
    scores, maps, masks, extras = [], [], [], {}
    for samples, pred in predict_batches(
        method, dataset, support=support, batch_size=batch_size, on_batch=on_batch
    ):
        scores.append(pred.scores)
        maps.extend(pred.maps)
        masks.extend(s.mask for s in samples)
        for key, value in pred.extras.items():
            extras.setdefault(key, []).append(value)
    if not scores:
        raise ValueError(f"dataset {dataset.name!r} is empty")
    out_maps = np.stack(maps) if len({m.shape for m in maps}) == 1 else maps
    extras = {k: np.concatenate(v) for k, v in extras.items()}
    return Prediction(np.concatenate(scores).astype(np.float32), out_maps, extras), masks
