"""`anomalens-onnx detect --onnx M.onnx IMAGES`: `anomalens detect --onnx` of the torch-free install.

Imports numpy, Pillow and onnxruntime only. Writes ``scores.csv`` as `anomalens detect` does (path,
score[, verdict]) and, unless ``--no-heatmaps``, each map as an 8-bit grey PNG at its image's size in
``OUT/heatmaps`` (colour overlays need the full library: `anomalens detect --onnx`). Errors: one line on
stderr, exit code 1; unreadable images are reported and skipped, then the exit code is 1.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from anomalens_onnx.files import expand_inputs, unique_stem
from anomalens_onnx.model import OnnxModel, read_image

PROG = "anomalens-onnx"
SHOWN_ROWS = 20  # rows printed when there are at most this many, as `anomalens detect`


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return detect(args)
    except (OSError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Run an anomalens ONNX export (no torch).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    p = sub.add_parser("detect", help="score images (files, folders, globs): scores.csv + heatmap PNGs")
    p.add_argument("inputs", nargs="+", help="image files, folders (recursive) or glob patterns")
    p.add_argument("--onnx", required=True, help="a model written by `anomalens export --format onnx`")
    p.add_argument("--class-name", help="an exported class (default: the first exported class)")
    p.add_argument("--threshold", type=float, help="verdict threshold (default: the model's)")
    p.add_argument("--out", default="runs/detect", help="output folder (default runs/detect)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-heatmaps", dest="heatmaps", action="store_false", help="write scores only")
    return parser


def detect(args: argparse.Namespace) -> int:
    """Score every input image; write scores.csv (whole or not at all) and heatmaps; print the rows."""
    model = OnnxModel(args.onnx)
    threshold = model.threshold if args.threshold is None else args.threshold
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, float, str | None]] = []
    failures: list[str] = []
    names: set[str] = set()  # heatmap file stems already written
    files = expand_inputs(args.inputs)
    for start in range(0, len(files), args.batch_size):
        batch = []
        for path in files[start : start + args.batch_size]:
            try:
                batch.append((path, read_image(path)))
            except (OSError, ValueError) as e:
                failures.append(str(e))
        if not batch:
            continue
        pred = model.predict([image for _, image in batch], args.class_name, batch_size=args.batch_size)
        verdicts = model.verdicts(pred.scores, threshold)
        for (path, _), score, amap, verdict in zip(batch, pred.scores, pred.maps, verdicts, strict=True):
            rows.append((path, float(score), verdict))
            if args.heatmaps:
                _save_grey(amap, out / "heatmaps" / f"{unique_stem(Path(path).stem, names)}.png")
    partial = out / f".scores.csv.{os.getpid()}"
    with open(partial, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "score"] + ([] if threshold is None else ["verdict"]))
        for path, score, verdict in rows:
            writer.writerow([path, f"{score:.6g}"] + ([] if verdict is None else [verdict]))
    os.replace(partial, out / "scores.csv")
    if len(rows) <= SHOWN_ROWS:
        for path, score, verdict in rows:
            print("\t".join([f"{score:.6g}", *([verdict] if verdict else []), path]))
    print(f"scored {len(rows)} image(s): {out / 'scores.csv'}")
    for failure in failures:
        print(f"{PROG}: warning: {failure}", file=sys.stderr)
    return 1 if failures else 0


def _save_grey(amap: np.ndarray, path: Path) -> None:
    """A map as 8-bit grey: [0, 1] → [0, 255] when it lies in [0, 1] (probabilities), else its own range."""
    m = np.nan_to_num(np.asarray(amap, dtype=np.float32))
    lo, hi = (0.0, 1.0) if m.min() >= 0.0 and m.max() <= 1.0 else (float(m.min()), float(m.max()))
    scaled = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(scaled * 255).astype(np.uint8)).save(path)


if __name__ == "__main__":
    sys.exit(main())
