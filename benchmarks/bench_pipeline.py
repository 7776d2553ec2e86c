"""Whole-evaluation throughput against the model's own throughput (issue 14, "the pipeline").

In one process, alternated `--repeats` times on the same method and images:

* model: `forward_batch` on batches already decoded, resized and in memory (normalisation included):
  what the model alone can do;
* predict: `Method.predict` on decoded images in memory (adds resizing in this process and bringing
  the maps back to each image's size);
* eval wN: `evaluate_method` over the dataset on disk with N loader workers: decoding, resizing, the
  model, map resizing and every metric (AUPRO included), as `anomalens eval` runs it.

Example (1,000 test images of 256 px; the set is generated once into the synthetic cache):

    python benchmarks/bench_pipeline.py --method winclip --backbone test-tiny --image-size 224 \\
        --data "synthetic:defects?n=100&size=256" --workers 0,1 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import anomalens as al
from anomalens.evaluation import evaluate_method


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
    parser.add_argument("--workers", default="0,1", help="comma-separated loader worker counts to time")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--aupro", default="mvtec", choices=("mvtec", "sampled"))
    args = parser.parse_args()

    method = al.create(
        args.method,
        backbone=args.backbone,
        pretrained=args.pretrained,
        device="cpu",
        image_size=args.image_size,
    )
    dataset = al.data.load(args.data, "test")
    n = len(dataset)
    images = [s.image for s in dataset]
    names = [r.class_name for r in dataset.records]
    pixels = method.input_pixels(images)  # uint8 (N, 3, S, S)
    print(
        f"{args.method} on {args.backbone} at {args.image_size} px, {n} images of {args.data}, "
        f"batch {args.batch_size}, torch threads {torch.get_num_threads()}"
    )

    def model() -> None:
        with torch.no_grad():
            for start in range(0, n, args.batch_size):
                x = method.backbone.normalize(pixels[start : start + args.batch_size])
                method.forward_batch(x, names[start : start + args.batch_size], None)

    def predict() -> None:
        for start in range(0, n, args.batch_size):
            stop = start + args.batch_size
            method.predict(images[start:stop], names[start:stop], batch_size=args.batch_size)

    def evaluate(workers: int):
        return lambda: evaluate_method(
            method,
            dataset,
            batch_size=args.batch_size,
            progress=False,
            workers=workers,
            aupro_variant=args.aupro,
        )

    runs = {"model": model, "predict": predict}
    runs.update({f"eval w{w}": evaluate(w) for w in map(int, args.workers.split(","))})
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    rates = {k: n / float(np.median(v)) for k, v in seconds.items()}
    print(f"| run | images/s (median of {args.repeats}) | / model |")
    print("| --- | ---: | ---: |")
    for k, r in rates.items():
        print(f"| {k} | {r:.1f} | {r / rates['model']:.2f} |")
    print(json.dumps({"seconds": seconds, "images": n}))


if __name__ == "__main__":
    main()
