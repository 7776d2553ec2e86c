"""MuSc on a set of unlabelled images: time and peak memory of scoring N images against each other.

    python benchmarks/bench_musc.py [--images 200] [--image-size 518] [--backbone test-tiny]
                                    [--chunk-mib 256] [--batch-size 16] [--device auto]
                                    [--scoring-only] [--out PATH]

Random weights (no download), random uint8 images of 600×600 pixels (short side resized to S, centre
crop), the paper's configuration otherwise: taps 6/12/18/24 of 24 mapped to the backbone, r ∈ {1,3,5},
interval 0–30 %, RsCIN k ∈ {1,2,3}. `test-tiny` (width 64, 4 blocks, patch 16: a 32×32 grid at 518) keeps
the O(N²·L²·C) mutual scoring affordable on a CPU; ``--backbone ViT-L-14-336`` is the paper's backbone
(37×37 grid at 518, width 1024). ``--scoring-only`` skips the images and the backbone: it times the
mutual scoring alone on random layer-normalised tokens of the backbone's exact shape (N, L, width) per
tap, e.g. the ViT-L/14-336 shape without its forward passes.

Reports the seconds of feature extraction (backbone + LayerNorm), of mutual scoring (LNAMD + MSM over
all taps and r), of RsCIN + map upsampling, the images/s of the whole `predict`, the memory: the
process's peak resident set size (ru_maxrss, CPU) or the CUDA allocator's peak, next to the analytic
sizes of the stored features (N·L·C·taps floats) and of one comparison block (≤ ``chunk_mib``), and the
work: MSM's similarity FLOPs (N(N−1)/2 image pairs × 2·L²·C, per tap and r) and their rate, next to the
rate of a 2048×1024×2048 `torch.mm` measured in the same process.

Prints a markdown row and writes JSON (default benchmarks/results/musc.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import anomalens as al
from anomalens.methods.musc import layer_norm_map

DEFAULT_OUT = Path(__file__).parent / "results" / "musc.json"


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mm_gflops(device: torch.device) -> float:
    """Rate of a large square-ish float32 matmul on ``device`` (best of 3)."""
    a, b = torch.randn(2048, 1024, device=device), torch.randn(1024, 2048, device=device)
    best = float("inf")
    for _ in range(4):  # the first is a warm-up
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * 2048 * 1024 * 2048 / best / 1e9


class Stopwatch:
    """Accumulates wall seconds per name around wrapped calls."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, {}

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            return out

        return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--backbone", default="test-tiny")
    parser.add_argument("--chunk-mib", type=float, default=256.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--scoring-only", action="store_true", help="random tokens, no backbone")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    model = al.create(
        "musc",
        backbone=args.backbone,
        pretrained=None,
        device=args.device,
        image_size=args.image_size,
        chunk_mib=args.chunk_mib,
    )
    device = model.device
    mm = mm_gflops(device)
    watch = Stopwatch(device)
    model.encode = watch.wrap("features", model.encode)
    model.mutual_scores = watch.wrap("mutual_scoring", model.mutual_scores)
    model.score_set = watch.wrap("rscin_and_maps", model.score_set)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    if args.scoring_only:
        shape = (args.images, model.backbone.grid[0] * model.backbone.grid[1], model.backbone.width)
        g = torch.Generator(device=device).manual_seed(0)
        tokens = [layer_norm_map(torch.randn(shape, generator=g, device=device)) for _ in model.taps]
        watch.seconds["features"] = time.perf_counter() - start  # random tokens: no backbone
        start = time.perf_counter()
        assert torch.isfinite(model.mutual_scores(tokens)).all()
    else:
        images = list(np.random.default_rng(0).integers(0, 256, (args.images, 600, 600, 3), dtype=np.uint8))
        start = time.perf_counter()
        pred = model.predict(images, "object", batch_size=args.batch_size)
        assert np.isfinite(pred.scores).all()
    total = time.perf_counter() - start

    length = model.backbone.grid[0] * model.backbone.grid[1]
    features_mib = args.images * length * model.backbone.width * len(model.taps) * 4 / 2**20
    pairs = args.images * (args.images - 1) // 2
    msm_gflop = (
        pairs * 2 * length**2 * model.backbone.width * len(model.taps) * len(model.config.r_list) / 1e9
    )
    result = {
        "backbone": f"{args.backbone} (random weights)",
        "images": args.images,
        "image_size": args.image_size,
        "grid": list(model.backbone.grid),
        "taps": model.taps,
        "chunk_mib": args.chunk_mib,
        "seconds": {**watch.seconds, "total": total},
        "images_per_s": args.images / total,
        "peak_mib": peak_mib(device),
        "stored_features_mib": features_mib,
        "scoring_only": args.scoring_only,
        "msm_gflop": msm_gflop,
        "msm_gflop_per_s": msm_gflop / watch.seconds["mutual_scoring"],
        "mm_gflop_per_s": mm,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
    }
    s = result["seconds"]
    print(
        "| backbone | N | S | chunk MiB | features s | MSM s | RsCIN+maps s | total s | peak MiB | "
        "features MiB | MSM GFLOP | MSM GFLOP/s | mm GFLOP/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {result['backbone']}{' (scoring only)' * args.scoring_only} | {args.images} | "
        f"{args.image_size} | {args.chunk_mib:g} | {s['features']:.1f} | {s['mutual_scoring']:.1f} | "
        f"{s.get('rscin_and_maps', 0.0):.2f} | {s['total']:.1f} | {result['peak_mib']:.0f} | "
        f"{features_mib:.0f} | {msm_gflop:.0f} | {result['msm_gflop_per_s']:.1f} | {mm:.1f} |"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
