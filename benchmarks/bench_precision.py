"""Reduced-precision inference (`--precision int8 | bf16`) against fp32: speed and drift per method.

    python benchmarks/bench_precision.py --methods aa-clip,crane,inctrl --backbone ViT-B-16 \\
        --image-size 224 --data "synthetic:defects?n=2" --precisions int8,bf16

Random weights by default (no downloads; ``--pretrained anomalens-mini`` with ``--backbone anomalens-mini``
for the CLIP trained here, whose scores are not near chance). Per method and precision, in one process:

* speed: `predict` of one batch of random uint8 images at the model size, timed ``--repeats`` times
  with fp32 and the reduced precision alternated (so a drift of the shared machine's speed hits both);
  the figure is the median time ratio fp32 / reduced (> 1 = faster).
* drift: the whole evaluation (`evaluate_method`) of ``--data`` in both precisions: max |Δ score| over
  all images (the set-level scores the metrics see), and |Δ| of the mean image and pixel AUROC in
  points (×100). Random weights give near-chance AUROCs; the drift is what this measures.
* ``--seeds``: the method's own randomly initialised layers (adapters, projectors) come from the torch
  seed, so the drift is measured once per seed (speed for the first seed only); the table gives the
  mean and the largest drift over the seeds. On a small set the AUROC drift of near-chance random maps
  varies a lot from seed to seed: quote it over several seeds.

Prints a markdown table and writes JSON (default benchmarks/results/precision.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from itertools import groupby
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np
import torch

import anomalens as al
from anomalens.evaluation import ClassResult, evaluate_method

DEFAULT_OUT = Path(__file__).parent / "results" / "precision.json"
# Method options that make a method run on any backbone with random weights and no extra downloads.
OPTIONS: dict[str, dict[str, Any]] = {"crane": {"use_dattn": False}}


def evaluate(model: al.Method, data: str) -> tuple[np.ndarray, dict[str, float | None]]:
    """All set-level image scores (concatenated over classes) and the mean metrics of one evaluation."""
    scores: list[np.ndarray] = []

    def keep(result: ClassResult) -> None:
        scores.append(result.scores)

    shots = 1 if model.needs_support else None
    results = evaluate_method(model, data, shots=shots, progress=False, on_class=keep)
    (dataset,) = results["datasets"].values()
    return np.concatenate(scores), dataset["mean"]


def speed_ratio(model: al.Method, precision: str, images: np.ndarray, support: Any, repeats: int) -> float:
    """Median over ``repeats`` of (fp32 seconds / ``precision`` seconds) for one `predict` batch."""

    def seconds(p: str) -> float:
        model.set_precision(p)
        model.predict(images, "bottle", support=support, batch_size=len(images))  # warm-up
        start = time.perf_counter()
        model.predict(images, "bottle", support=support, batch_size=len(images))
        return time.perf_counter() - start

    return statistics.median(seconds("fp32") / seconds(precision) for _ in range(repeats))


def measure(
    name: str, args: argparse.Namespace, images: np.ndarray, support: Any, speed: bool, seed: int
) -> list[dict[str, Any]]:
    """One row per reduced precision of method ``name`` (built after seeding torch with ``seed``)."""
    options = {"image_size": args.image_size, **OPTIONS.get(name, {})}
    if name in ("inctrl", "inctrlv2"):
        options.pop("image_size")  # InCTRL's input size is its backbone's
    model = al.create(name, backbone=args.backbone, pretrained=args.pretrained, device="cpu", **options)
    ref_scores, ref_metrics = evaluate(model.set_precision("fp32"), args.data)
    rows = []
    for precision in args.precisions.split(","):
        ratio = (
            speed_ratio(model, precision, images, support if model.needs_support else None, args.repeats)
            if speed
            else None
        )
        scores, metrics = evaluate(model.set_precision(precision), args.data)
        row = {
            "method": name,
            "precision": precision,
            "seed": seed,
            "speedup_vs_fp32": ratio,
            "max_abs_score_delta": float(np.abs(scores - ref_scores).max()),
            "score_range_fp32": float(ref_scores.max() - ref_scores.min()),
            **{
                f"{k}_delta_points": None
                if metrics.get(k) is None
                else 100 * abs(metrics[k] - ref_metrics[k])
                for k in ("image_auroc", "pixel_auroc")
            },
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    model.set_precision("fp32")
    return rows


def _mean_max(rows: list[dict[str, Any]], key: str) -> str:
    values = [r[key] for r in rows if r[key] is not None]
    return f"{statistics.mean(values):.2f} ({max(values):.2f})" if values else "–"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default="aa-clip,crane,inctrl,winclip,april-gan")
    parser.add_argument("--backbone", default="ViT-B-16")
    parser.add_argument(
        "--pretrained",
        help="weights (default none: random), e.g. anomalens-mini with --backbone anomalens-mini",
    )
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--data", default="synthetic:defects?n=2")
    parser.add_argument("--precisions", default="int8,bf16")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", default="0", help="comma-separated torch seeds of the model's init")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch_size, args.image_size, args.image_size, 3), dtype=np.uint8)
    support = list(rng.integers(0, 256, (1, args.image_size, args.image_size, 3), dtype=np.uint8))
    rows = []
    for name in args.methods.split(","):
        for i, seed in enumerate(int(v) for v in args.seeds.split(",")):
            torch.manual_seed(seed)
            rows += measure(name, args, images, support, speed=i == 0, seed=seed)
    lines = [
        "| method | precision | seeds | speed vs fp32 | max Δscore (fp32 range) | Δ image AUROC mean (max) "
        "| Δ pixel AUROC mean (max) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    key = itemgetter("method", "precision")
    for (name, precision), grouped in groupby(sorted(rows, key=key), key=key):
        group = list(grouped)  # seed order: the first seed's row has the speed
        score_delta = max(r["max_abs_score_delta"] for r in group)
        image, pixel = (_mean_max(group, f"{k}_auroc_delta_points") for k in ("image", "pixel"))
        lines.append(
            f"| {name} | {precision} | {len(group)} | {group[0]['speedup_vs_fp32']:.2f}× | "
            f"{score_delta:.2g} ({min(r['score_range_fp32'] for r in group):.2g}) | {image} | {pixel} |"
        )
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "backbone": args.backbone,
        "image_size": args.image_size,
        "data": args.data,
        "batch_size": args.batch_size,
        "seeds": args.seeds,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    args.out.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
