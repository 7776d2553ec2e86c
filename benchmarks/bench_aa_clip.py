"""AA-CLIP: training step time of both stages and inference images/s (random weights, no downloads).

    python benchmarks/bench_aa_clip.py [--setups tiny vit-l] [--batches 1 8] [--device auto]
                                       [--repeats 3] [--train-repeats 2] [--threads N] [--out PATH]

Per setup (a backbone at an input size):

* inference: `predict` (preprocessing, one adapted CLIP pass, maps, blur, upsampling, scores) on random
  uint8 images at the model size, per batch size, after one warm-up call (text anchors cached);
* training: one optimiser step (loss, backward, Adam step) of stage "text" (frozen V-V reference pass,
  frozen CLS pass, adapted text tower) and of stage "image" (adapted image tower, per-tap maps and
  losses), on one collated batch with augmentation (collation timed separately), after one warm-up step.

Setups: "tiny" = test-tiny at 224 (the official batch sizes 16 / 2 for training); "vit-l" = ViT-L-14-336 at
518 (the paper's input; training at batch 1 on CPU). Prints a markdown table and writes JSON (default
benchmarks/results/aa_clip.json) with the machine: CPU model, cores, torch threads, load average (other
processes on the machine slow CPU figures down: compare runs with similar load only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import anomalens as al
from anomalens.backbones import resolve_device

DEFAULT_OUT = Path(__file__).parent / "results" / "aa_clip.json"
SETUPS = {
    "tiny": {"backbone": "test-tiny", "image_size": 224, "train_batch": {"text": 16, "image": 2}},
    "vit-l": {"backbone": "ViT-L-14-336", "image_size": 518, "train_batch": {"text": 1, "image": 1}},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _samples(n: int, size: int, seed: int) -> list[al.data.Sample]:
    """Random images, half of them anomalous with a square mask."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        mask = np.zeros((size, size), bool)
        if i % 2:
            mask[size // 4 : size // 2, size // 3 : size // 2] = True
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        out.append(al.data.Sample(image, mask if i % 2 else None, i % 2, "bottle", f"{i}.png"))
    return out


def time_predict(method: al.methods.Method, batch: int, repeats: int) -> dict[str, float]:
    """Seconds per `predict` call on `batch` random images (median, min over `repeats`) and images/s."""
    images = np.stack([s.image for s in _samples(batch, method.backbone.image_size, 0)])
    method.predict(images, "bottle", batch_size=batch)
    seconds = []
    for _ in range(repeats):
        _sync(method.device)
        start = time.perf_counter()
        method.predict(images, "bottle", batch_size=batch)
        _sync(method.device)
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return {
        "batch": batch,
        "seconds_median": median,
        "seconds_min": min(seconds),
        "images_per_s": batch / median,
    }


def time_train_step(method: al.methods.Method, stage_name: str, batch: int, repeats: int) -> dict[str, float]:
    """Seconds of collation and of one optimiser step of a stage (median over `repeats`, after a warm-up)."""
    stage = next(s for s in method.training_stages() if s.name == stage_name)
    samples = _samples(batch, method.backbone.image_size, 1)
    params = list(stage.parameters())
    optimizer = torch.optim.Adam(params, lr=stage.config.lr, betas=stage.config.betas)
    method.train()
    collate, step = [], []
    for i in range(repeats + 1):
        start = time.perf_counter()
        data = stage.collate(samples, True).to(method.device)
        collated = time.perf_counter()
        loss = stage.loss(data)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(method.device)
        if i:  # the first step warms up
            collate.append(collated - start)
            step.append(time.perf_counter() - collated)
    method.eval()
    return {
        "stage": stage_name,
        "batch": batch,
        "collate_seconds": statistics.median(collate),
        "step_seconds": statistics.median(step),
        "images_per_s": batch / statistics.median(step),
    }


def machine(device: torch.device) -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def run(setups: list[str], batches: list[int], device: str, repeats: int, train_repeats: int) -> dict:
    dev = resolve_device(device)
    results: dict = {"method": "aa-clip", "pretrained": None, "machine": machine(dev), "setups": {}}
    for name in setups:
        setup = SETUPS[name]
        torch.manual_seed(0)
        start = time.perf_counter()
        method = al.create(
            "aa-clip",
            backbone=setup["backbone"],
            pretrained=None,
            device=str(dev),
            image_size=setup["image_size"],
        )
        build = time.perf_counter() - start
        inference = [time_predict(method, b, repeats) for b in batches]
        training = [time_train_step(method, s, b, train_repeats) for s, b in setup["train_batch"].items()]
        results["setups"][name] = {
            "backbone": setup["backbone"],
            "image_size": setup["image_size"],
            "build_seconds": build,
            "inference": inference,
            "training": training,
        }
        del method
    results["machine"]["load_average_1m_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return results


def table(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"machine: {m['device']} / {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, "
        f"load {m['load_average_1m']:.1f}→{m['load_average_1m_end']:.1f}, torch {m['torch']}",
        "",
        "| setup | what | batch | seconds | images/s |",
        "|---|---|---:|---:|---:|",
    ]
    for s in results["setups"].values():
        label = f"{s['backbone']}@{s['image_size']}"
        for r in s["inference"]:
            lines.append(
                f"| {label} | predict | {r['batch']} | {r['seconds_median']:.3f} | {r['images_per_s']:.2f} |"
            )
        for r in s["training"]:
            lines.append(
                f"| {label} | train step '{r['stage']}' (+{r['collate_seconds']:.3f} s collate) "
                f"| {r['batch']} | {r['step_seconds']:.3f} | {r['images_per_s']:.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args.setups, args.batches, args.device, args.repeats, args.train_repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
