"""Time the metrics on 100 random-blob masks and maps of 256 x 256 (CPU); sklearn as a yardstick.

    python benchmarks/bench_metrics.py [--images 100] [--size 256] [--repeats 3] [--out PATH]

Prints a markdown table and writes JSON (default benchmarks/results/metrics.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from anomalens.metrics import PixelMetricAccumulator, aupro, evaluate, pixel_ap, pixel_auroc

DEFAULT_OUT = Path(__file__).parent / "results" / "metrics.json"


def make_data(n_images: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Masks with a few smooth blobs (about 3% of pixels) and float32 maps in [0, 1] that follow them."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.random((n_images, size, size)), sigma=(0, 6, 6))
    masks = noise > np.quantile(noise, 0.97, axis=(1, 2), keepdims=True)
    masks[: n_images // 5] = False  # some normal images, as in a real test split
    logits = 0.6 * masks + ndimage.gaussian_filter(rng.normal(size=masks.shape), sigma=(0, 2, 2)) * 3
    return masks, (1 / (1 + np.exp(-logits))).astype(np.float32)


def time_call(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(min, median) wall-clock seconds over `repeats` calls."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return min(seconds), statistics.median(seconds)


def accumulate(masks: np.ndarray, maps: np.ndarray) -> dict:
    accumulator = PixelMetricAccumulator((0.0, 1.0))
    for start in range(0, len(masks), 16):
        accumulator.add(masks[start : start + 16], maps[start : start + 16])
    return accumulator.compute()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    masks, maps = make_data(args.images, args.size)
    labels, scores = masks.any(axis=(1, 2)).astype(int), maps.max(axis=(1, 2))
    flat_labels, flat_maps = masks.ravel(), maps.ravel()
    cases = {
        "aupro (mvtec, exact)": lambda: aupro(masks, maps),
        "aupro (sampled)": lambda: aupro(masks, maps, variant="sampled"),
        "pixel_auroc": lambda: pixel_auroc(masks, maps),
        "pixel_ap": lambda: pixel_ap(masks, maps),
        "evaluate (all 7 metrics)": lambda: evaluate(labels, scores, masks, maps),
        "PixelMetricAccumulator (2**16 bins, batches of 16)": lambda: accumulate(masks, maps),
        "sklearn roc_auc_score (flat)": lambda: roc_auc_score(flat_labels, flat_maps),
        "sklearn average_precision_score (flat)": lambda: average_precision_score(flat_labels, flat_maps),
    }
    timings = {name: time_call(fn, args.repeats) for name, fn in cases.items()}
    values = evaluate(labels, scores, masks, maps)

    print(
        f"{args.images} images of {args.size}x{args.size} ({masks.size / 1e6:.1f} M pixels, "
        f"{masks.mean():.1%} anomalous), {os.cpu_count()} CPUs, best and median of {args.repeats}\n"
    )
    print("| metric | best s | median s |\n| --- | ---: | ---: |")
    for name, (best, median) in timings.items():
        print(f"| {name} | {best:.3f} | {median:.3f} |")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "metrics",
        "images": args.images,
        "size": args.size,
        "pixels": int(masks.size),
        "anomalous_fraction": float(masks.mean()),
        "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "numpy": np.__version__},
        "seconds": {name: {"best": best, "median": median} for name, (best, median) in timings.items()},
        "values": values,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
