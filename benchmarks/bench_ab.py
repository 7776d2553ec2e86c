"""Time `predict` of two anomalens source trees side by side (A/B), e.g. before and after a change.

Each measurement is a fresh process that imports anomalens from one tree, builds the method with random
weights, warms up, times ``--iters`` batches, and measures the machine's matmul throughput (a 2048²
fp32 ``torch.mm``) just before and after. A and B alternate (A B A B ...), so a drift of the shared
machine's speed hits both; the figure is the median over rounds of the pairwise time ratio B/A, and
the same ratio after dividing each side's time by its own matmul probe.

    python benchmarks/bench_ab.py --a /path/to/old/src --b src --methods crane,aa-clip \\
        --backbone ViT-B-16 --image-size 224 --batch-size 1 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
import numpy as np, torch
import anomalens as al

method, backbone, image_size, batch, iters, shots = sys.argv[1:7]
batch, iters, shots, image_size = int(batch), int(iters), int(shots), int(image_size)
options = json.loads(sys.argv[7])

def probe():
    a = torch.randn(2048, 2048)
    a @ a
    start = time.perf_counter()
    a @ a
    return 2 * 2048**3 / (time.perf_counter() - start) / 1e9

model = al.create(method, backbone=backbone, pretrained=None, device="cpu", **options)
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8)
support = list(rng.integers(0, 256, (shots, image_size, image_size, 3), dtype=np.uint8))
support = support if model.needs_support else None
model.predict(images, "bottle", support=support, batch_size=batch)
before = probe()
start = time.perf_counter()
for _ in range(iters):
    model.predict(images, "bottle", support=support, batch_size=batch)
seconds = (time.perf_counter() - start) / (iters * batch)
print(json.dumps({"s_per_image": seconds, "matmul_gflops": (before + probe()) / 2}))
"""


def measure(src: str, args: argparse.Namespace, method: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(src)}
    argv = [method, args.backbone, str(args.image_size), str(args.batch_size), str(args.iters)]
    argv += [str(args.shots), json.dumps(args.options)]
    out = subprocess.run(
        [sys.executable, "-c", CHILD, *argv], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--a", required=True, help="source tree A (the 'before'), e.g. /path/to/old/src")
    parser.add_argument("--b", required=True, help="source tree B (the 'after')")
    parser.add_argument("--methods", required=True, help="comma-separated method names")
    parser.add_argument("--backbone", default="ViT-B-16")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", dest="options", type=json.loads, default={}, help="JSON method options")
    args = parser.parse_args()
    rows = []
    for method in args.methods.split(","):
        pairs = [(measure(args.a, args, method), measure(args.b, args, method)) for _ in range(args.rounds)]
        ratio = [b["s_per_image"] / a["s_per_image"] for a, b in pairs]
        work = [
            (b["s_per_image"] * b["matmul_gflops"]) / (a["s_per_image"] * a["matmul_gflops"])
            for a, b in pairs
        ]
        row = {
            "method": method,
            "a_s_per_image": statistics.median(a["s_per_image"] for a, _ in pairs),
            "b_s_per_image": statistics.median(b["s_per_image"] for _, b in pairs),
            "time_ratio_b_over_a": statistics.median(ratio),
            "probe_normalised_ratio": statistics.median(work),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("| method | A s/img | B s/img | B/A time | B/A matmul-normalised |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['method']} | {r['a_s_per_image']:.3f} | {r['b_s_per_image']:.3f} | "
            f"{r['time_ratio_b_over_a']:.3f} | {r['probe_normalised_ratio']:.3f} |"
        )


if __name__ == "__main__":
    main()
