"""Score image files with a model: ``scores.csv`` with a verdict per image, and heatmap overlays.

What `anomalens detect` runs; works on single files, folders and glob patterns, with no dataset layout.
With an ONNX export (`OnnxModel`) nothing here imports torch: the images are read by threads and scored
by ONNX Runtime, so `anomalens detect --onnx` never loads torch (tests/test_onnx_package.py).
"""

from __future__ import annotations

import csv
import io
import itertools
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from anomalens.data.types import DataError, Dataset, Record, Sample
from anomalens_onnx.files import expand_inputs, unique_stem
from anomalens_onnx.model import OnnxModel

if TYPE_CHECKING:
    from anomalens.methods.base import Method

MAX_THREADS = 4  # threads decoding images for an ONNX model (as `inference.MAX_WORKERS` processes)
T = TypeVar("T")


@dataclass
class Detection:
    """What `detect` wrote: one (path, score, verdict or None) row per scored image, and failures."""

    csv_path: Path
    rows: list[tuple[str, float, str | None]] = field(default_factory=list)
    heatmaps: list[Path] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def report(self, shown_rows: int = 20) -> str:
        """What `anomalens detect` prints: the rows (up to `shown_rows` of them), the files written, and
        a note when there are no verdicts."""
        lines = []
        if len(self.rows) <= shown_rows:
            lines = ["\t".join([f"{s:.6g}", *([v] if v else []), p]) for p, s, v in self.rows]
        where = f" and heatmaps into {self.csv_path.parent / 'heatmaps'}" if self.heatmaps else ""
        lines.append(f"scored {len(self.rows)} image(s): {self.csv_path}{where}")
        if self.rows and self.rows[0][2] is None:
            lines.append(
                "no verdicts: the model has no threshold (run `anomalens calibrate` or pass --threshold)"
            )
        return "\n".join(lines)


def image_files(paths: Sequence[str], class_name: str | None = None) -> Dataset:
    """Unlabelled images as a `Dataset` (label 0, no mask, class `class_name` or "object"); an image is
    decoded on access, and one that cannot be read raises `DataError` naming it."""
    from anomalens.data.io import read_image

    def load(record: Record) -> Sample:
        return Sample(read_image(record.path), None, 0, record.class_name, record.path)

    return Dataset("images", [Record(p, 0, class_name or "object") for p in paths], load)


def detect(
    model: Method | OnnxModel,
    inputs: Sequence[str],
    out: str | os.PathLike,
    *,
    class_name: str | None = None,
    support: Sequence[str] | None = None,
    threshold: float | None = None,
    batch_size: int = 16,
    heatmaps: bool = True,
    alpha: float = 0.5,
    progress: bool = True,
    workers: int | None = None,
) -> Detection:
    """Score image files (files, folders, globs) with `model`; write `scores.csv` (path, score[, verdict])
    and, with `heatmaps`, an overlay PNG per image into `out/heatmaps`.

    threshold: verdicts use ``score > threshold``; default the model's calibrated `threshold` (none:
    no verdict column). Unreadable images are reported in `failures` and skipped.
    Heatmap colours span [0, 1] when a map lies in it (probability-like maps), else the map's own range.
    Images are read in `workers` loader processes (`anomalens.inference.predict_batches`; for an
    `OnnxModel`, `workers` threads and no torch) and heatmaps are drawn and written in a background
    thread while the model scores the next batch.
    """
    from tqdm.auto import tqdm

    from anomalens.files import atomic_write

    files = expand_inputs(inputs)
    support_files = expand_inputs(support) if support else None
    if model.needs_support and not support_files:
        raise ValueError(
            f"method {model.name!r} is few-shot: pass --support with K normal images of the class"
        )
    threshold = model.threshold if threshold is None else threshold
    if class_name is None:  # an ONNX export defaults to its first exported class, a method to "object"
        class_name = next(iter(getattr(model, "class_names", None) or ["object"]))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = Detection(out / "scores.csv")
    taken: set[str] = set()
    pngs = {f: out / "heatmaps" / f"{unique_stem(Path(f).stem, taken)}.png" for f in files}
    rank, shard = _shard(len(files), batch_size)  # under torchrun: the files this process scores
    mine = files if shard is None else [files[i] for i in shard]
    written: deque[Future[Path]] = deque()  # heatmaps being written, in order
    main = rank == 0  # the process that writes scores.csv
    bar = tqdm(total=len(mine), desc="detect", unit="img", disable=not (progress and main), leave=False)
    with bar, ThreadPoolExecutor(max_workers=1) as writer:
        batches = _predict_batches(
            model,
            image_files(mine, class_name),
            support_files,
            batch_size,
            result.failures,
            bar.update,
            workers,
        )
        for samples, pred in batches:
            for sample, score, amap in zip(samples, pred.scores, pred.maps, strict=True):
                verdict = None if threshold is None else ("anomalous" if score > threshold else "normal")
                result.rows.append((sample.path, float(score), verdict))
                if heatmaps:
                    written.append(writer.submit(write_heatmap, sample.image, amap, alpha, pngs[sample.path]))
            while len(written) > 2 * batch_size:  # bound the images waiting for the writer
                result.heatmaps.append(written.popleft().result())
        result.heatmaps.extend(f.result() for f in written)
    if shard is not None:
        _merge_shards(result, mine, shard)
        if not main:
            return result
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "score"] + ([] if threshold is None else ["verdict"]))
    for path, score, verdict in result.rows:
        writer.writerow([path, f"{score:.6g}"] + ([] if verdict is None else [verdict]))
    atomic_write(result.csv_path, buffer.getvalue())
    return result


def write_heatmap(image: np.ndarray, amap: np.ndarray, alpha: float, path: Path) -> Path:
    """Write the overlay of `amap` on `image` as a PNG at `path`. Colours span [0, 1] when the map lies
    in it (probability-like maps), else the map's own range."""
    from anomalens.viz import overlay, save_png

    in_unit = float(amap.min()) >= 0.0 and float(amap.max()) <= 1.0
    vmin, vmax = (0.0, 1.0) if in_unit else (None, None)
    return save_png(overlay(image, amap, alpha, vmin, vmax), path)


def _predict_batches(
    model: Method | OnnxModel,
    dataset: Dataset,
    support: list[str] | None,
    batch_size: int,
    errors: list[str],
    on_batch: Callable[[int], Any],
    workers: int | None,
) -> Iterator[tuple[list[Sample], Any]]:
    """`anomalens.inference.predict_batches` of a method; for an ONNX export the same batches without
    torch: `workers` threads (None: up to `MAX_THREADS`; 0: none) decode the images, at most two batches
    ahead of ONNX Runtime. Unreadable images are reported in `errors` and skipped."""
    if not isinstance(model, OnnxModel):
        from anomalens.inference import predict_batches

        options = {"errors": errors, "on_batch": on_batch, "workers": workers}
        return predict_batches(model, dataset, support=support, batch_size=batch_size, **options)
    if workers is not None and workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")

    def read(i: int) -> Sample | str:
        try:
            return dataset[i]
        except DataError as error:
            return str(error)

    threads = min(MAX_THREADS, os.cpu_count() or 1) if workers is None else workers
    return _onnx_batches(
        model, _in_order(read, len(dataset), threads, 2 * batch_size), batch_size, errors, on_batch
    )


def _onnx_batches(
    model: OnnxModel,
    outcomes: Iterator[Sample | str],
    batch_size: int,
    errors: list[str],
    on_batch: Callable[[int], Any],
) -> Iterator[tuple[list[Sample], Any]]:
    """(samples, prediction) per batch of `batch_size` outcomes (a sample, or why it could not be read)."""
    while batch := list(itertools.islice(outcomes, batch_size)):
        samples = [o for o in batch if isinstance(o, Sample)]
        errors.extend(o for o in batch if isinstance(o, str))
        if samples:
            names = [s.class_name for s in samples]
            yield samples, model.predict([s.image for s in samples], names, batch_size=batch_size)
        on_batch(len(batch))


def _in_order(read: Callable[[int], T], n: int, threads: int, ahead: int) -> Iterator[T]:
    """read(0), ..., read(n - 1) in order; with `threads`, up to `ahead` of them run in that many
    threads before they are consumed (0: each runs when it is consumed)."""
    if not threads:
        yield from map(read, range(n))
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: deque[Future[T]] = deque()
        for i in range(n):
            pending.append(pool.submit(read, i))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _shard(n: int, batch_size: int) -> tuple[int, list[int] | None]:
    """This process's rank and, under torchrun, the indices of the n files it scores (whole batches
    of them, `distributed.shard`); (0, None) outside a group of several processes (always when
    torch.distributed was never imported, e.g. for an ONNX model outside torchrun)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return 0, None
    from anomalens.engine import distributed  # loads the training engine: only under torchrun

    return distributed.rank(), distributed.shard(n, batch_size)


def _merge_shards(result: Detection, mine: list[str], shard: list[int]) -> None:
    """Every process's rows, heatmaps and failures into `result` on every process, in the order of
    the files, as one process lists them. `mine`: this process's files, ``shard`` their indices."""
    from anomalens.engine import distributed

    rows = {row[0]: row for row in result.rows}
    pngs = dict(zip(rows, result.heatmaps, strict=False))  # empty without heatmaps
    failures = iter(result.failures)  # one message per unreadable file, in order
    outcomes = [(rows[f], pngs.get(f), None) if f in rows else (None, None, next(failures)) for f in mine]
    merged = distributed.gather_items(outcomes, shard)
    result.rows = [row for row, _, _ in merged if row is not None]
    result.heatmaps = [png for _, png, _ in merged if png is not None]
    result.failures = [message for _, _, message in merged if message is not None]
