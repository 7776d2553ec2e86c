"""int8 ONNX export (`anomalens export --precision int8`) against the fp32 export and against PyTorch.

    python benchmarks/bench_onnx_int8.py --methods aa-clip,april-gan --backbone ViT-B-16 --image-size 224 \\
        --data "synthetic:defects?n=1" --batch-size 2 --repeats 3

Random weights (no downloads). Per method, in one process: the method is exported to ONNX in fp32 and
in int8 (ONNX Runtime's dynamic quantisation of the image blocks' MatMuls, `export.quantize_int8`).

* speed: one batch of random uint8 images at the model size through four runners, alternated in each of
  ``--repeats`` rounds (so a drift of the shared machine's speed hits all): PyTorch fp32 and int8
  (`Method.set_precision`), ONNX Runtime fp32 and int8 (`OnnxModel`, as many threads as torch). The
  figures are median times relative to PyTorch fp32 (> 1 = faster).
* drift: every test image of ``--data`` through the fp32 and the int8 ONNX model: max |Δ score| and |Δ|
  of the per-class mean image and pixel AUROC in points (×100). Random weights give near-chance AUROCs;
  the drift is what this measures.
* size: the two files' sizes.

Prints a markdown table and writes JSON (default benchmarks/results/onnx_int8.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import anomalens as al
from anomalens.export import export_onnx
from anomalens.metrics import image_auroc, pixel_auroc
from anomalens.onnx_model import OnnxModel

DEFAULT_OUT = Path(__file__).parent / "results" / "onnx_int8.json"
# Method options that make a method run on any backbone with random weights and no extra downloads.
OPTIONS: dict[str, dict[str, Any]] = {"crane": {"use_dattn": False}}
RUNNERS = ("torch fp32", "torch int8", "onnx fp32", "onnx int8")


def mean_aurocs(model: OnnxModel, dataset: al.data.Dataset) -> tuple[np.ndarray, float, float]:
    """All image scores and the per-class mean image and pixel AUROC of ``model`` on ``dataset``."""
    scores, image, pixel = [], [], []
    for name in dataset.class_names:
        samples = [s for s in dataset if s.class_name == name]
        pred = model.predict([s.image for s in samples], name)
        scores.append(pred.scores)
        image.append(image_auroc([s.label for s in samples], pred.scores))
        pixel.append(pixel_auroc([s.mask for s in samples], list(pred.maps)))
    return np.concatenate(scores), float(np.mean(image)), float(np.mean(pixel))


def speeds(
    model: al.Method, onnx: dict[str, OnnxModel], images: np.ndarray, class_name: str, repeats: int
) -> dict[str, list[float]]:
    """Seconds of one `predict` batch per runner (`RUNNERS`), the runners alternated in each round."""

    def run(runner: str) -> Callable[[], Any]:
        engine, precision = runner.split()
        if engine == "onnx":
            return lambda: onnx[precision].predict(images, class_name)
        model.set_precision(precision)
        return lambda: model.predict(images, class_name, batch_size=len(images))

    times: dict[str, list[float]] = {r: [] for r in RUNNERS}
    for _ in range(repeats):
        for runner in RUNNERS:
            times[runner].append(timed(run(runner)))
    return times


def timed(run: Callable[[], Any]) -> float:
    run()  # warm-up (first call of a precision builds its kernels / caches)
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default="aa-clip,april-gan")
    parser.add_argument("--backbone", default="ViT-B-16")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--data", default="synthetic:defects?n=1")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    images = np.random.default_rng(0).integers(
        0, 256, (args.batch_size, args.image_size, args.image_size, 3), dtype=np.uint8
    )
    dataset = al.data.load(args.data)
    rows = []
    for name in args.methods.split(","):
        options = {"image_size": args.image_size, **OPTIONS.get(name, {})}
        model = al.create(name, backbone=args.backbone, pretrained=None, device="cpu", **options)
        with tempfile.TemporaryDirectory() as tmp:
            paths = {p: Path(tmp, f"{p}.onnx") for p in ("fp32", "int8")}
            for precision, path in paths.items():
                export_onnx(model.set_precision(precision), path, dataset.class_names)
            onnx = {p: OnnxModel(path, threads=threads) for p, path in paths.items()}
            sizes = {p: path.stat().st_size for p, path in paths.items()}

            times = speeds(model, onnx, images, dataset.class_names[0], args.repeats)
            ref_scores, ref_image, ref_pixel = mean_aurocs(onnx["fp32"], dataset)
            scores, image, pixel = mean_aurocs(onnx["int8"], dataset)
        base = statistics.median(times["torch fp32"])
        row = {
            "method": name,
            **{f"speed {r} vs torch fp32": base / statistics.median(t) for r, t in times.items()},
            "onnx int8 vs onnx fp32": statistics.median(times["onnx fp32"])
            / statistics.median(times["onnx int8"]),
            "max_abs_score_delta": float(np.abs(scores - ref_scores).max()),
            "score_range_fp32": float(np.ptp(ref_scores)),
            "image_auroc_delta_points": 100 * abs(image - ref_image),
            "pixel_auroc_delta_points": 100 * abs(pixel - ref_pixel),
            "size_mb_fp32": sizes["fp32"] / 2**20,
            "size_mb_int8": sizes["int8"] / 2**20,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = [
        "| method | torch int8 | ORT fp32 | ORT int8 | ORT int8 / ORT fp32 | max Δscore (fp32 range) "
        "| Δ image AUROC | Δ pixel AUROC | file fp32 → int8 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['speed torch int8 vs torch fp32']:.2f}× | "
            f"{r['speed onnx fp32 vs torch fp32']:.2f}× | {r['speed onnx int8 vs torch fp32']:.2f}× | "
            f"{r['onnx int8 vs onnx fp32']:.2f}× | "
            f"{r['max_abs_score_delta']:.2g} ({r['score_range_fp32']:.2g}) | "
            f"{r['image_auroc_delta_points']:.2f} | {r['pixel_auroc_delta_points']:.2f} | "
            f"{r['size_mb_fp32']:.1f} → {r['size_mb_int8']:.1f} MB |"
        )
    print("(speeds relative to PyTorch fp32)\n" + "\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "backbone": args.backbone,
        "image_size": args.image_size,
        "data": args.data,
        "batch_size": args.batch_size,
        "torch": torch.__version__,
        "threads": threads,
        "machine": platform.processor() or platform.machine(),
    }
    args.out.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
