"""Whole-evaluation throughput against the model's own throughput (issue 14, "the pipeline").

In one process, alternated `--repeats` times on the same method and images (`--runs` picks them):

* model: `forward_batch` on batches already decoded, resized and in memory (normalisation included):
  what the model alone can do;
* predict: `Method.predict` on decoded images in memory (adds resizing in this process and bringing
  the maps back to each image's size);
* detect wN: `anomalens.detect` on the image files with N loader workers, heatmap PNGs included
  (drawn and written in a background thread); one class name per call (per class with --per-class);
* eval wN: `evaluate_method` over the dataset on disk with N loader workers: decoding, resizing, the
  model, map resizing and every metric (AUPRO included), as `anomalens eval` runs it. Loader workers
  decode the next batch and a background thread computes the previous class's metrics while the model
  runs (`anomalens.evaluation`).

Before timing, the model runs once on one image of each class (zero-shot methods cache their text
features per class name; otherwise the first run on a class pays for them). Then, once, what the
pipeline adds when nothing overlaps, each alone in this process: "decode" (read every image and mask
from disk), "resize" (`Method.input_pixels`), "metrics" (`class_metrics` of every class on the model's
maps at the images' size). "sequential" = model + those three: an eval with no overlap would
take about that long (map resizing excluded). "CPU s" = CPU seconds of this process and its loader
workers: the work of a run, which the load of other processes on a shared machine hardly changes
(wall seconds do); with C cores free, eval can at best reach C x model CPU / eval CPU of the model.

Examples (1,000 test images of 256 px; the set is generated once into the synthetic cache,
``$ANOMALENS_CACHE`` or ``~/.cache/anomalens``, not the repository):

    python benchmarks/bench_pipeline.py --method aa-clip --backbone test-tiny --image-size 224 \\
        --data "synthetic:defects?n=100&size=256" --runs model,predict,eval:0,eval:1,detect:1 \\
        --repeats 1 --per-class
    python benchmarks/bench_pipeline.py --method april-gan --backbone ViT-B-16 --image-size 224 \\
        --data "synthetic:defects?n=100&size=256" --runs model,eval:1 --repeats 1 --per-class

Measured figures: docs/performance.md §5.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch

import anomalens as al
from anomalens.detect import detect as detect_files
from anomalens.evaluation import class_metrics, evaluate_method
from anomalens.memory import retain_freed_memory
from anomalens.methods.base import resize_maps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--method", default="winclip")
    parser.add_argument("--backbone", default="test-tiny")
    parser.add_argument("--pretrained", help="weights (default none: random); e.g. anomalens-mini")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--data", default="synthetic:defects?n=100&size=256")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--runs",
        default="model,predict,eval:0,eval:1",
        help="comma-separated: model, predict, eval:N, detect:N",
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--per-class",
        action="store_true",
        help="alternate the runs class by class (fair ratios when the load changes during long runs)",
    )
    parser.add_argument("--aupro", default="mvtec", choices=("mvtec", "sampled"))
    args = parser.parse_args()
    retain_freed_memory()  # as `anomalens eval` and `detect` run

    method = al.create(
        args.method,
        backbone=args.backbone,
        pretrained=args.pretrained,
        device="cpu",
        image_size=args.image_size,
    )
    dataset = al.data.load(args.data, "test")
    n, b = len(dataset), args.batch_size
    stages: dict[str, float] = {}
    start = time.perf_counter()
    samples = list(dataset)
    stages["decode"] = time.perf_counter() - start
    images = [s.image for s in samples]
    names = [r.class_name for r in dataset.records]
    start = time.perf_counter()
    pixels = torch.cat([method.input_pixels(images[i : i + b]) for i in range(0, n, b)])  # uint8
    stages["resize"] = time.perf_counter() - start
    print(
        f"{args.method} on {args.backbone} at {args.image_size} px, {n} images of {args.data}, "
        f"batch {b}, torch threads {torch.get_num_threads()}"
    )

    outputs: list = []  # the model's last predictions, for the metrics stage

    def model(part: list[int]) -> None:
        with torch.no_grad():
            for k in range(0, len(part), b):
                i = part[k : k + b]
                x = method.backbone.normalize(pixels[i])
                outputs.append((i, method.forward_batch(x, [names[j] for j in i], None)))

    def predict(part: list[int]) -> None:
        for k in range(0, len(part), b):
            i = part[k : k + b]
            method.predict([images[j] for j in i], [names[j] for j in i], batch_size=b, pixels=pixels[i])

    def evaluate(workers: int) -> Callable[[list[int]], object]:
        return lambda part: evaluate_method(
            method,
            dataset.subset(part),
            batch_size=b,
            progress=False,
            workers=workers,
            aupro_variant=args.aupro,
        )

    def detect(workers: int) -> Callable[[list[int]], object]:
        def run(part: list[int]) -> None:
            with tempfile.TemporaryDirectory() as out:
                files = [dataset.records[i].path for i in part]
                detect_files(method, files, out, class_name=names[part[0]], progress=False, workers=workers)

        return run

    kinds = {"eval": evaluate, "detect": detect}
    runs: dict[str, Callable[[list[int]], object]] = {}
    for name in args.runs.split(","):
        kind, _, workers = name.partition(":")
        runs[f"{kind} w{workers}" if workers else name] = (
            kinds[kind](int(workers)) if workers else {"model": model, "predict": predict}[name]
        )
    every = list(range(n))
    with torch.no_grad():  # warm up: one image per class (text features are cached per class name)
        for c in dataset.class_names:
            i = [names.index(c)]
            method.forward_batch(method.backbone.normalize(pixels[i]), [c], None)
    if args.per_class:  # each class in turn through every run, the order flipped from class to class
        parts = [[i for i in every if names[i] == c] for c in dataset.class_names] * args.repeats
    else:
        parts = [every] * args.repeats
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}  # CPU seconds, loader workers included
    for p, part in enumerate(parts):
        if p % (len(parts) // args.repeats) == 0:
            outputs.clear()  # keep the model's predictions of the last repeat
        for name in list(runs)[:: -1 if args.per_class and p % 2 else 1]:
            start, start_cpu = time.perf_counter(), cpu_seconds()
            runs[name](part)
            seconds[name].append(time.perf_counter() - start)
            cpu[name].append(cpu_seconds() - start_cpu)
        print("  " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in seconds.items()), flush=True)

    if outputs:
        stages["metrics"] = metrics_seconds(dataset, samples, outputs, args.aupro)
    median, cpu_median = (
        summary(seconds, args.per_class, args.repeats),
        summary(cpu, args.per_class, args.repeats),
    )
    if "model" in median:
        median["sequential (model + decode + resize + metrics)"] = median["model"] + sum(stages.values())
    how = "summed over classes" if args.per_class else "median"
    print(f"| run | seconds ({how}, {args.repeats} repeats) | images/s | / model | CPU s | CPU / model |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for k, s in median.items():
        ratio = f"{median['model'] / s:.2f}" if "model" in median else "–"
        used = cpu_median.get(k)
        cpu_cells = "– | –" if used is None else f"{used:.1f} | {used / cpu_median.get('model', used):.2f}"
        print(f"| {k} | {s:.1f} | {n / s:.1f} | {ratio} | {cpu_cells} |")
    print("stages alone (s): " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
    print(json.dumps({"seconds": seconds, "cpu": cpu, "stages": stages, "images": n}))


def summary(values: dict[str, list[float]], per_class: bool, repeats: int) -> dict[str, float]:
    """Seconds of the whole set per run: summed over the classes and averaged over the repeats
    (per_class), else the median of the repeats."""
    if per_class:
        return {k: sum(v) / repeats for k, v in values.items()}
    return {k: float(np.median(v)) for k, v in values.items()}


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished children (the loader workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def metrics_seconds(dataset, samples, outputs, aupro: str) -> float:
    """Seconds of `class_metrics` over the classes of the images in `outputs` ((indices, BatchPrediction)
    of the model's last run), on its maps brought to the images' size."""
    order = [i for part, _ in outputs for i in part]
    scores = dict(zip(order, torch.cat([o.scores for _, o in outputs]).float().numpy(), strict=True))
    model_maps = torch.cat([o.maps for _, o in outputs]).float()
    maps = dict(zip(order, resize_maps(model_maps, [samples[i].image.shape[:2] for i in order]), strict=True))
    total = 0.0
    for cls in dataset.class_names:
        idx = [i for i in order if dataset.records[i].class_name == cls]
        if not idx:
            continue
        labels = np.array([dataset.records[i].label for i in idx])
        start = time.perf_counter()
        class_metrics(
            labels,
            np.array([scores[i] for i in idx]),
            [samples[i].mask for i in idx],
            [maps[i] for i in idx],
            aupro,
        )
        total += time.perf_counter() - start
    return total


if __name__ == "__main__":
    main()
