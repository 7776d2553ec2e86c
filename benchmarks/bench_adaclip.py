"""AdaCLIP: inference time per image, and what its parts cost (dynamic text prompts, HSF).

    python benchmarks/bench_adaclip.py [--setups tiny vit-l] [--device auto] [--repeats 2] [--threads N]
                                       [--out PATH]

Random weights (no downloads). Per setup, `predict` (preprocessing, the frozen CLIP pass that conditions
the dynamic prompts, the prompted CLIP pass, the text tower on the 48 ensemble sentences per image when
text prompts are dynamic, HSF k-means, maps, smoothing) on random uint8 images at the model size, after
one warm-up call, for three variants:

* "adaclip": the official configuration (hybrid prompts "SD" in both towers, HSF with k = 20);
* "no HSF": ``use_hsf=False`` (the projected CLS scores the image);
* "static prompts": ``prompt_type="S"`` (text anchors cached per class: no per-image text tower).

Times are process CPU seconds per image (robust to other jobs on a shared CPU) and wall seconds per
image. Setups: "tiny" = test-tiny at 224, batch 8; "vit-l" = ViT-L-14-336 at 518, batch 1. Prints a
markdown table and writes JSON (default benchmarks/results/adaclip.json).
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
from anomalens.backbones import resolve_device

DEFAULT_OUT = Path(__file__).parent / "results" / "adaclip.json"
SETUPS = {
    "tiny": {"backbone": "test-tiny", "image_size": 224, "batch": 8},
    "vit-l": {"backbone": "ViT-L-14-336", "image_size": 518, "batch": 1},
}
VARIANTS = {"adaclip": {}, "no HSF": {"use_hsf": False}, "static prompts": {"prompt_type": "S"}}


def time_predict(method: al.methods.Method, images: np.ndarray, repeats: int) -> dict[str, float]:
    """Median wall and process CPU seconds per image of ``predict(images)`` after one warm-up call."""
    method.predict(images, class_names="bottle", batch_size=len(images))
    wall, cpu = [], []
    for _ in range(repeats):
        if method.device.type == "cuda":
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        method.predict(images, class_names="bottle", batch_size=len(images))
        if method.device.type == "cuda":
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    n = len(images)
    return {"wall_s_per_image": statistics.median(wall) / n, "cpu_s_per_image": statistics.median(cpu) / n}


def run_setup(name: str, device: torch.device, repeats: int) -> dict:
    setup = SETUPS[name]
    size = setup["image_size"]
    images = np.random.default_rng(0).integers(0, 256, (setup["batch"], size, size, 3), dtype=np.uint8)
    rows = {}
    for variant, options in VARIANTS.items():
        torch.manual_seed(0)
        method = al.create(
            "adaclip",
            backbone=setup["backbone"],
            pretrained=None,
            device=str(device),
            image_size=size,
            **options,
        )
        rows[variant] = time_predict(method, images, repeats)
        del method
    return {
        "setup": name,
        **{k: v for k, v in setup.items() if k != "batch"},
        "batch": setup["batch"],
        "rows": rows,
    }


def table(results: list[dict]) -> str:
    lines = [
        "| setup | variant | CPU s / image | wall s / image | × adaclip (CPU) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for result in results:
        base = result["rows"]["adaclip"]["cpu_s_per_image"]
        for variant, row in result["rows"].items():
            lines.append(
                f"| {result['setup']} | {variant} | {row['cpu_s_per_image']:.3f} "
                f"| {row['wall_s_per_image']:.3f} | {row['cpu_s_per_image'] / base:.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", nargs="+", default=["tiny", "vit-l"], choices=sorted(SETUPS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    results = [run_setup(name, device, args.repeats) for name in args.setups]
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
