"""Crane: inference images/s with and without D-Attn, and the extra cost of D-Attn as a ratio.

    python benchmarks/bench_crane.py [--setups tiny vit-l] [--device auto] [--repeats 3] [--threads N]
                                     [--out PATH]

Random weights (no downloads). Per setup, `predict` (preprocessing, one CLIP pass with the E-Attn dual
path, DINO pass, maps, smoothing) on random uint8 images at the model size, after one warm-up call:

* "crane": the official Crane configuration (E-Attn, taps 6/12/18/24, no DINO);
* "crane+ w/o D-Attn": E-Attn at tap 24 only;
* "crane+": E-Attn + D-Attn at tap 24 (DINOv2 B/14 with registers, or test-tiny-dino).

The D-Attn cost is time(crane+) / time(crane+ w/o D-Attn), from process CPU time on CPU (robust to other
jobs on a shared machine) and from wall time on CUDA. Setups: "tiny" = test-tiny + test-tiny-dino
at 224, batch 8; "vit-l" = ViT-L-14-336 at 518 + vit_base_patch14_reg4_dinov2, batch 1 on CPU (8 on
CUDA). Prints a markdown table and writes JSON (default benchmarks/results/crane.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import anomalens as al
from anomalens.backbones import DEFAULT_DINO, resolve_device

DEFAULT_OUT = Path(__file__).parent / "results" / "crane.json"
SETUPS = {
    "tiny": {
        "backbone": "test-tiny",
        "image_size": 224,
        "dino": "test-tiny-dino",
        "batch": {"cpu": 8, "cuda": 64},
    },
    "vit-l": {
        "backbone": "ViT-L-14-336",
        "image_size": 518,
        "dino": DEFAULT_DINO,
        "batch": {"cpu": 1, "cuda": 8},
    },
}
VARIANTS = {
    "crane": {"use_dattn": False, "layers": (6, 12, 18, 24), "soft_mean": True},
    "crane+ w/o D-Attn": {"use_dattn": False, "layers": (24,), "soft_mean": False},
    "crane+": {"use_dattn": True, "layers": (24,), "soft_mean": False},
}


def time_predict(method: al.methods.Method, images: np.ndarray, repeats: int) -> dict[str, float]:
    """Wall-clock and process CPU seconds of ``predict(images)`` (medians over `repeats` calls, after one
    warm-up call). CPU seconds stay meaningful on a machine shared with other jobs, wall seconds do not."""
    method.predict(images, batch_size=len(images))
    wall, cpu = [], []
    for _ in range(repeats):
        if method.device.type == "cuda":
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        method.predict(images, batch_size=len(images))
        if method.device.type == "cuda":
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    median = statistics.median(wall)
    return {
        "median_s": median,
        "min_s": min(wall),
        "images_per_s": len(images) / median,
        "cpu_s": statistics.median(cpu),
    }


def run_setup(name: str, device: torch.device, repeats: int) -> dict:
    setup = SETUPS[name]
    batch = setup["batch"]["cuda" if device.type == "cuda" else "cpu"]
    size = setup["image_size"]
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    rows = {}
    for variant, options in VARIANTS.items():
        method = al.create(
            "crane",
            backbone=setup["backbone"],
            pretrained=None,
            device=str(device),
            image_size=size,
            dino=setup["dino"],
            dino_pretrained=None,
            **options,
        )
        rows[variant] = time_predict(method, images, repeats)
        del method
    key = "median_s" if device.type == "cuda" else "cpu_s"
    ratio = rows["crane+"][key] / rows["crane+ w/o D-Attn"][key]
    return {
        "backbone": setup["backbone"],
        "image_size": size,
        "batch": batch,
        "variants": rows,
        "dattn_cost_ratio": ratio,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 = steadiest CPU time)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    results = {
        "machine": {
            "device": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or "cpu",
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "setups": {name: run_setup(name, device, args.repeats) for name in args.setups},
    }
    print("| setup | batch | variant | images/s (wall) | s/batch (wall) | CPU s/image |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, setup in results["setups"].items():
        for variant, row in setup["variants"].items():
            print(
                f"| {name} ({setup['backbone']}@{setup['image_size']}) | {setup['batch']} | {variant} | "
                f"{row['images_per_s']:.2f} | {row['median_s']:.3f} | {row['cpu_s'] / setup['batch']:.3f} |"
            )
        print(
            f"| {name} | | D-Attn cost (crane+ / crane+ w/o D-Attn) | {setup['dattn_cost_ratio']:.2f}× | | |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
