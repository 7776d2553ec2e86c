"""MuSc on a set of unlabelled images: time and peak memory of scoring N images against each other.

    python benchmarks/bench_musc.py [--images 200] [--image-size 518] [--backbone test-tiny]
                                    [--chunk-mib 512] [--batch-size 16] [--device auto]
                                    [--scoring-only] [--out PATH]

Random weights (no download), random uint8 images of 600×600 pixels (short side resized to S, centre
crop), the paper's configuration otherwise: taps 6/12/18/24 of 24 mapped to the backbone, r ∈ {1,3,5},
interval 0–30 %, RsCIN k ∈ {1,2,3}. `test-tiny` (width 64, 4 blocks, patch 16: a 32×32 grid at 518) keeps
the O(N²·L²·C) mutual scoring affordable on a CPU; ``--backbone ViT-L-14-336`` is the paper's backbone
(37×37 grid at 518, width 1024). ``--scoring-only`` skips the images and the backbone: it times the
mutual scoring alone on random layer-normalised tokens of the backbone's exact shape (N, L, width) per
tap, e.g. the ViT-L/14-336 shape without its forward passes.

Reports the seconds of feature extraction (backbone + LayerNorm), of mutual scoring (LNAMD + MSM over
all taps and r), of RsCIN + map upsampling, the images/s of the whole `predict`; the memory: the
process's peak resident set size (ru_maxrss, CPU) or the CUDA allocator's peak, on a CPU also the
highest resident set size during mutual scoring above its level when scoring starts (sampled every
20 ms), next to the analytic size of the stored features (N·L·C·taps floats); and the work: MSM's
similarity FLOPs (N(N−1)/2 image pairs × 2·L²·C, per tap and r) and their rate, next to the rate of a
2048×1024×2048 `torch.mm` measured in the same process; on a CPU both per second of the process's own
CPU time too (`time.process_time`), which other jobs on a shared machine do not inflate.

Prints a markdown row and writes JSON (default benchmarks/results/musc.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import threading
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
    """Rate of a large float32 matmul on ``device`` (best of 3), per second of this process's CPU time
    on a CPU (other jobs on a shared machine do not count), of wall time on a GPU."""
    a, b = torch.randn(2048, 1024, device=device), torch.randn(1024, 2048, device=device)
    best = float("inf")
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    for _ in range(4):  # the first is a warm-up
        start = clock()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, clock() - start)
    return 2 * 2048 * 1024 * 2048 / best / 1e9


def rss_mib() -> float:
    """The process's resident set size now (Linux /proc; 0 elsewhere)."""
    statm = Path("/proc/self/statm")
    return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20 if statm.exists() else 0.0


class RssPeak:
    """Highest resident set size above the level at entry, sampled every 20 ms while in the block."""

    def __enter__(self) -> RssPeak:
        self.base, self.peak, self.done = rss_mib(), 0.0, threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self) -> None:
        while not self.done.wait(0.02):
            self.peak = max(self.peak, rss_mib() - self.base)

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, rss_mib() - self.base)


class Stopwatch:
    """Accumulates wall seconds and process CPU seconds per name around wrapped calls."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds, self.cpu_seconds = device, {}, {}

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start, cpu = time.perf_counter(), time.process_time()
            out = fn(*args, **kwargs)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + time.process_time() - cpu
            return out

        return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--backbone", default="test-tiny")
    parser.add_argument("--chunk-mib", type=float, default=512.0)
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
    msm_memory = RssPeak()

    def mutual_scores(tokens: list[torch.Tensor]) -> torch.Tensor:
        with msm_memory:
            return msm(tokens)

    msm = model.mutual_scores
    model.mutual_scores = watch.wrap("mutual_scoring", mutual_scores)
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
        "msm_extra_peak_mib": msm_memory.peak if device.type == "cpu" else None,
        "scoring_only": args.scoring_only,
        "msm_gflop": msm_gflop,
        "cpu_seconds": watch.cpu_seconds,
        "msm_gflop_per_s": msm_gflop / watch.seconds["mutual_scoring"],
        "msm_gflop_per_cpu_s": msm_gflop / watch.cpu_seconds["mutual_scoring"],
        "mm_gflop_per_cpu_s": mm,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
    }
    s = result["seconds"]
    print(
        "| backbone | N | S | chunk MiB | features s | MSM s | RsCIN+maps s | total s | peak MiB | "
        "features MiB | MSM GFLOP | MSM GFLOP/s | MSM GFLOP/CPU-s | mm GFLOP/CPU-s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {result['backbone']}{' (scoring only)' * args.scoring_only} | {args.images} | "
        f"{args.image_size} | {args.chunk_mib:g} | {s['features']:.1f} | {s['mutual_scoring']:.1f} | "
        f"{s.get('rscin_and_maps', 0.0):.2f} | {s['total']:.1f} | {result['peak_mib']:.0f} | "
        f"{features_mib:.0f} | {msm_gflop:.0f} | {result['msm_gflop_per_s']:.1f} | "
        f"{result['msm_gflop_per_cpu_s']:.1f} | {mm:.1f} |"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
