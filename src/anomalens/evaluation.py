"""Evaluate a method on datasets: per-class predictions, metrics, results JSON (DESIGN §3.4) and tables.

One evaluation = for every dataset and class: predict in batches (the class name is passed to the
method), optionally with a K-shot normal support set sampled from the dataset's *train* split, turn
the per-image predictions into set-level image scores with `Method.set_scores` (the hook through which
methods that normalise per class over the evaluated set do so), and compute the metrics. Maps of one
class are held in memory until its metrics are computed, as the official evaluators do.

The pipeline overlaps the three kinds of work: loader worker processes decode and resize the images of
the next batch (`anomalens.inference`), the model scores the current one, and a background thread
computes the exact metrics of the previous class (`ClassMetrics`). The metrics are the same function of
the same arrays as in a sequential loop, so the results are identical; at most two classes' maps are
held at once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from anomalens import data as al_data
from anomalens.contracts import Prediction
from anomalens.data.types import Dataset
from anomalens.inference import predict_dataset
from anomalens.methods.base import Method
from anomalens.viz import atomic_write

EVAL_RESOLUTIONS = ("input", "model")
# Display order of the metric columns; metrics not listed here follow alphabetically.
METRIC_ORDER = (
    "image_auroc",
    "image_ap",
    "image_f1_max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "aupro",
)


@dataclass
class ClassResult:
    """What `evaluate_method` computed for one class, handed to its `on_class` callback (e.g. a report)."""

    dataset_name: str
    class_name: str
    data: Dataset
    indices: list[int]  # into `data`
    labels: np.ndarray  # (N,)
    scores: np.ndarray  # (N,) set-level image scores
    maps: list[np.ndarray]  # each (H, W) at the evaluated resolution
    metrics: dict[str, float | None]


def evaluate_method(
    method: Method,
    dataset_or_specs: str | Dataset | Sequence[str | Dataset],
    *,
    split: str = "test",
    classes: Sequence[str] | None = None,
    batch_size: int = 16,
    shots: int | None = None,
    support_seed: int = 0,
    support_data: Dataset | None = None,
    eval_resolution: str = "input",
    aupro_variant: str = "mvtec",
    protocol: str | None = None,
    progress: bool = True,
    on_class: Callable[[ClassResult], None] | None = None,
    workers: int | None = None,
) -> dict:
    """Evaluate `method` and return the results document of DESIGN §3.4.

    dataset_or_specs: dataset specs ("mvtec:/data/mvtec") and/or loaded `Dataset`s; specs are read
        with `split` and `classes` (loaded `Dataset`s are evaluated as given).
    shots: K normal support images per class (few-shot), sampled with `support_seed` from the train
        split of each spec, or from `support_data` for `Dataset` arguments; None = zero-shot.
    eval_resolution: "input" scores maps against masks at each image's own resolution; "model" resizes
        both to the model's input size first, as the official evaluators do (comparable to paper tables).
    aupro_variant: "mvtec" (official MVTec algorithm) or "sampled" (AnomalyCLIP/APRIL-GAN code).
    on_class: called with every `ClassResult` (e.g. to collect report images).
    workers: loader processes reading and resizing images while the model runs (`predict_batches`;
        None = `inference.default_workers`, 0 = none); results do not depend on it.
    """
    if eval_resolution not in EVAL_RESOLUTIONS:
        raise ValueError(
            f"eval_resolution must be one of {', '.join(EVAL_RESOLUTIONS)}, got {eval_resolution!r}"
        )
    if method.needs_support and shots is None:
        raise ValueError(
            f"method {method.name!r} is few-shot: give shots=K (normal support images per class)"
        )
    items = [dataset_or_specs] if isinstance(dataset_or_specs, (str, Dataset)) else list(dataset_or_specs)
    if not items:
        raise ValueError("no dataset to evaluate")
    results: dict[str, Any] = {
        **method.describe(),
        "precision": method.precision,
        "protocol": protocol or ("zero-shot" if shots is None else "fewshot"),
        "seed": support_seed if shots is not None else None,
        "shots": shots,
        "eval_resolution": eval_resolution,
        "aupro_variant": aupro_variant,
        "support_files": {},
        "datasets": {},
    }
    shards = Shards(method.set_level, batch_size)
    show = progress and shards.main
    n_images, seconds = 0, 0.0
    size = method.backbone.image_size if eval_resolution == "model" else None
    per_dataset: dict[str, dict[str, dict[str, float | None]]] = {}  # filled by `background`, in order
    with ClassMetrics(aupro_variant, size, on_class if shards.main else None) as background:
        for item in items:
            dataset = al_data.load(item, split, classes) if isinstance(item, str) else item
            if not len(dataset):
                raise ValueError(f"dataset {dataset.name!r} is empty")
            name = _unique(dataset.name, per_dataset)
            support_source = None
            if shots is not None:
                support_source = (
                    al_data.load(item, "train", classes) if isinstance(item, str) else support_data
                )
                if support_source is None:
                    raise ValueError(
                        f"few-shot evaluation of dataset {name!r}: pass support_data (its train split)"
                    )
                results["support_files"][name] = {}
            per_dataset[name] = {}
            bar = tqdm(total=len(dataset), desc=f"eval {name}", unit="img", disable=not show, leave=False)
            for group in shards.class_groups(dataset.class_names):
                start = time.perf_counter()
                scored = []  # per class: its dataset indices, the positions scored here, their results
                for position, cls in enumerate(group):
                    support = idx = None
                    if support_source is not None:
                        idx = al_data.sample_support(support_source, shots, support_seed, cls)
                        results["support_files"][name][cls] = [support_source.records[i].path for i in idx]
                    indices = [i for i, r in enumerate(dataset.records) if r.class_name == cls]
                    mine = shards.items(len(indices), position)  # positions in `indices` scored here
                    local: tuple[Prediction | None, list] = (None, [])
                    if mine:
                        if support_source is not None:
                            support = [support_source[i].image for i in idx]
                        local = predict_dataset(
                            method,
                            dataset.subset([indices[i] for i in mine]),
                            support=support,
                            batch_size=batch_size,
                            on_batch=bar.update,
                            workers=workers,
                        )
                    scored.append((indices, mine, local))
                seconds += time.perf_counter() - start
                for cls, (indices, mine, local) in zip(group, scored, strict=True):
                    start = time.perf_counter()
                    prediction, masks = shards.gather(local, mine)
                    scores = np.asarray(method.set_scores(prediction, [cls] * len(indices)), dtype=np.float64)
                    seconds += time.perf_counter() - start
                    n_images += len(indices)
                    labels = np.array([dataset.records[i].label for i in indices], dtype=np.int64)
                    job = ClassResult(name, cls, dataset, indices, labels, scores, list(prediction.maps), {})
                    background.submit(job, masks, per_dataset[name])
            bar.close()
    for name, per_class in per_dataset.items():
        results["datasets"][name] = {"classes": per_class, **mean_over_classes(per_class)}
    results["timing"] = timing(n_images, seconds, str(method.device))
    return results


class ClassMetrics:
    """Computes each class's metrics in a background thread while the next class is scored.

    `submit` hands over a class's `ClassResult` (metrics still empty) and its masks; the thread resizes
    maps and masks to the model's input when `size` is given (`--eval-resolution model`) and computes
    `class_metrics`. Then, in the calling thread and in submission order, the metrics go into the
    ``per_class`` dict given with the class and `on_class` is called. `submit` first waits for the class
    before (so at most one class waits while the next is scored: two classes' maps in memory at once);
    leaving the ``with`` block waits for the last one. An error in the thread is raised by the call that
    collects its class. numpy's sort and PIL's resize release the GIL, so the thread runs beside the
    model on another core when one is free.
    """

    def __init__(
        self, aupro_variant: str, size: int | None, on_class: Callable[[ClassResult], None] | None
    ) -> None:
        self.aupro_variant, self.size, self.on_class = aupro_variant, size, on_class
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anomalens-metrics")
        self.pending: tuple[Future[ClassResult], dict] | None = None

    def __enter__(self) -> ClassMetrics:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            if exc_info[0] is None:
                self._collect()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, result: ClassResult, masks: list[np.ndarray | None], per_class: dict) -> None:
        """Start the metrics of `result`'s class; ``per_class[class_name]`` receives them."""
        future = self.pool.submit(self._compute, result, masks)
        self._collect()
        self.pending = (future, per_class)

    def _compute(self, result: ClassResult, masks: list[np.ndarray | None]) -> ClassResult:
        maps = result.maps
        if self.size is not None:
            maps, masks = _to_model_resolution(self.size, maps, masks)
        metrics = class_metrics(result.labels, result.scores, masks, maps, self.aupro_variant)
        return dataclasses.replace(result, maps=maps, metrics=metrics)

    def _collect(self) -> None:
        if self.pending is None:
            return
        future, per_class = self.pending
        self.pending = None
        result = future.result()
        per_class[result.class_name] = result.metrics
        if self.on_class is not None:
            self.on_class(result)


def main_process() -> bool:
    """False on the processes of a torchrun group other than rank 0 (which alone writes files)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class Shards:
    """How the processes of a torchrun job share an evaluation (one process: it scores everything).

    An image-level method scores one class at a time, each process every world_size-th batch of it
    (`distributed.shard`: the batches one process forms, so the scores are the same bit for bit); a
    set-level method (MuSc) scores a group of world_size classes at a time, one whole class per process,
    since its scores depend on the whole set. `gather` then gives every process the class's predictions
    and masks in dataset order, so the metrics equal one process's.
    """

    def __init__(self, set_level: bool, batch_size: int):
        import torch.distributed as dist

        self.set_level, self.batch_size = set_level, batch_size
        self.distributed = None  # the engine's `distributed` module inside a group of > 1 processes
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from anomalens.engine import distributed  # loads the training engine: only under torchrun

            self.distributed = distributed
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.main = self.rank == 0

    def class_groups(self, classes: Sequence[str]) -> list[list[str]]:
        """Classes scored together, in order."""
        step = self.world if self.set_level else 1
        return [list(classes[i : i + step]) for i in range(0, len(classes), step)]

    def items(self, n: int, position: int) -> list[int]:
        """Which of the n images of the class at `position` in its group this process scores."""
        if self.distributed is None:
            return list(range(n))
        if self.set_level:
            return list(range(n)) if position == self.rank else []
        return self.distributed.shard(n, self.batch_size)

    def gather(
        self, local: tuple[Prediction | None, list[np.ndarray | None]], mine: list[int]
    ) -> tuple[Prediction, list[np.ndarray | None]]:
        """The prediction and masks of all the class's images from each process's share."""
        prediction, masks = local
        if self.distributed is None:
            assert prediction is not None  # one process scores every image
            return prediction, masks
        gathered = self.distributed.gather_predictions(prediction, mine)
        return gathered, self.distributed.gather_items(masks, mine)


def timing(images: int, seconds: float, device: str) -> dict[str, Any]:
    """The "timing" block of a results document: wall seconds of image decoding, prediction and
    set-level scoring (metrics excluded)."""
    return {
        "images": images,
        "seconds": round(seconds, 6),
        "images_per_s": round(images / seconds, 3) if seconds > 0 else None,
        "device": device,
    }


def class_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    masks: Sequence[np.ndarray | None],
    maps: Sequence[np.ndarray],
    aupro_variant: str = "mvtec",
) -> dict[str, float | None]:
    """All metrics of one class; pixel metrics only when every anomalous image has a mask."""
    from anomalens import metrics

    has_pixels = bool(labels.any()) and all(
        m is not None for m, y in zip(masks, labels, strict=True) if y == 1
    )
    if has_pixels:
        values = metrics.evaluate(labels, scores, list(masks), list(maps), aupro_variant=aupro_variant)
    else:
        values = metrics.evaluate(labels, scores)
    return {k: _json_float(v) for k, v in values.items()}


def mean_over_classes(per_class: dict[str, dict[str, float | None]]) -> dict[str, Any]:
    """{"mean": {metric: mean over classes}, "notes": [...]}; undefined (None) values are left out of
    the mean and named in a note."""
    names = _ordered({k for m in per_class.values() for k in m})
    mean: dict[str, float | None] = {}
    notes = []
    for metric in names:
        values = {cls: m.get(metric) for cls, m in per_class.items()}
        defined = [v for v in values.values() if v is not None]
        mean[metric] = float(np.mean(defined)) if defined else None
        missing = sorted(cls for cls, v in values.items() if v is None)
        if missing:
            notes.append(
                f"{metric}: mean over {len(defined)} of {len(values)} classes "
                f"(undefined for {', '.join(missing)})"
            )
    return {"mean": mean, "notes": notes} if notes else {"mean": mean}


def markdown_table(results: dict) -> str:
    """A markdown table (values in %) of every dataset's classes and mean, followed by any notes."""
    datasets = results.get("datasets", {})
    metrics = _ordered({k for d in datasets.values() for m in (d["mean"], *d["classes"].values()) for k in m})
    header = ["dataset", "class", *metrics]
    lines = [f"| {' | '.join(header)} |", f"|{'|'.join(['---'] * 2 + ['---:'] * len(metrics))}|"]
    notes = []
    for name, d in datasets.items():
        for cls, values in d["classes"].items():
            lines.append(_row([name, cls], values, metrics))
        lines.append(_row([name, "**mean**"], d["mean"], metrics, bold=True))
        if "std" in d:
            lines.append(_row([name, "std"], d["std"], metrics))
        notes += [f"{name}: {n}" for n in d.get("notes", [])]
    title = f"{results.get('method', '?')} · {results.get('backbone', '?')} ({results.get('pretrained')})"
    title += f" · {results.get('protocol', '?')}"
    text = f"**{title}** — metrics in %\n\n" + "\n".join(lines) + "\n"
    if notes:
        text += "\n" + "\n".join(f"* {n}" for n in notes) + "\n"
    return text


def write_results(results: dict, out_dir: str | os.PathLike) -> Path:
    """Write `results.json` and `results.md` into `out_dir` atomically; return the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_json_safe(results), indent=2, allow_nan=False)
    path = atomic_write(out / "results.json", text + "\n")
    atomic_write(out / "results.md", markdown_table(results))
    return path


# ---------------------------------------------------------------------- helpers
def _to_model_resolution(
    size: int, maps: list[np.ndarray], masks: list[np.ndarray | None]
) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """Maps and masks resized to the model's square input size `size` (`metrics.resize_for_eval`)."""
    from anomalens.metrics import resize_for_eval

    pairs = [resize_for_eval(mask, amap, size) for mask, amap in zip(masks, maps, strict=True)]
    # A normal image keeps mask None (resize_for_eval returns an empty mask for it).
    return [m for _, m in pairs], [
        None if mask is None else gt for mask, (gt, _) in zip(masks, pairs, strict=True)
    ]


def _unique(name: str, taken: dict) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name} ({n})", n + 1
    return candidate


def _ordered(names: set[str]) -> list[str]:
    known = [m for m in METRIC_ORDER if m in names]
    return known + sorted(names - set(known))


def _row(head: list[str], values: dict, metrics: list[str], bold: bool = False) -> str:
    cells = []
    for metric in metrics:
        v = values.get(metric)
        cell = "–" if v is None else f"{100 * v:.1f}"
        cells.append(f"**{cell}**" if bold and v is not None else cell)
    return f"| {' | '.join(head + cells)} |"


def _json_float(value: Any) -> float | None:
    if value is None:
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def _json_safe(value: Any) -> Any:
    """numpy scalars/arrays → Python; non-finite floats → None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (float, np.floating)):
        return _json_float(value)
    return value
