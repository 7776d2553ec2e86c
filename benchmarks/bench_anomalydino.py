"""AnomalyDINO CPU/GPU cost: memory-bank construction and per-image inference at the paper's resolution.

    python benchmarks/bench_anomalydino.py [--backbone vit_small_patch14_dinov2] [--image-size 448]
                                           [--shots 1] [--images 4] [--repeats 2] [--device auto] [--out PATH]

Random weights of the official default architecture (DINOv2 ViT-S/14; no download), random uint8
images of 512² pixels resized to 448 (grid 32 × 32). Reports, after a warm-up call:

* bank: seconds to build the memory bank of K shots × 8 rotations (rotation + preprocessing + DINO);
* predict: images/s of `predict` on a batch with the bank cached, masking on (the masked-class path);
* breakdown per batch: DINO forward vs nearest-neighbour search vs masking (PCA + morphology);
* peak resident memory of the process (CPU) or the CUDA allocator's peak.

Prints a markdown table and writes JSON (default benchmarks/results/anomalydino.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import anomalens as al
from anomalens.methods.anomalydino import background_mask, first_principal_component, nearest_cosine_distance

DEFAULT_OUT = Path(__file__).parent / "results" / "anomalydino.json"


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall-clock seconds of `fn` over `repeats` calls (after one warm-up call)."""
    fn()
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="vit_small_patch14_dinov2")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    model = al.create(
        "anomalydino",
        backbone=args.backbone,
        pretrained=None,
        device=args.device,
        image_size=args.image_size,
        masking="on",
    )
    device = model.device
    rng = np.random.default_rng(0)
    support = list(rng.integers(0, 256, (args.shots, 512, 512, 3), dtype=np.uint8))
    images = rng.integers(0, 256, (args.images, 512, 512, 3), dtype=np.uint8)

    def build_bank() -> object:
        model._support_key = None  # force a rebuild
        return model._support_context(support)

    bank_s = median_seconds(build_bank, args.repeats, device)
    bank = model._support_context(support)
    predict_s = median_seconds(
        lambda: model.predict(images, "object", support=support, batch_size=args.images), args.repeats, device
    )
    x = model.backbone.preprocess(images)
    features = model.backbone.encode(x).float().flatten(1, 2)  # (B, N, C)
    forward_s = median_seconds(lambda: model.backbone.encode(x), args.repeats, device)
    nn_s = median_seconds(lambda: nearest_cosine_distance(features.flatten(0, 1), bank), args.repeats, device)
    mask_s = median_seconds(
        lambda: background_mask(first_principal_component(features), model.backbone.grid),
        args.repeats,
        device,
    )
    result = {
        "backbone": f"{args.backbone} (random weights)",
        "image_size": args.image_size,
        "grid": list(model.backbone.grid),
        "shots": args.shots,
        "bank_patches": int(bank.shape[0]),
        "images": args.images,
        "bank_seconds": bank_s,
        "predict_images_per_s": args.images / predict_s,
        "forward_seconds": forward_s,
        "nn_seconds": nn_s,
        "mask_seconds": mask_s,
        "peak_mib": peak_mib(device),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
    }
    print("| backbone | S | K | bank patches | bank s | img/s | DINO s | NN s | mask s | peak MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {result['backbone']} | {args.image_size} | {args.shots} | {result['bank_patches']} | "
        f"{bank_s:.2f} | {result['predict_images_per_s']:.2f} | {forward_s:.2f} | {nn_s:.3f} | "
        f"{mask_s:.3f} | {result['peak_mib']:.0f} |"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
