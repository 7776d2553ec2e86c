"""How close a whole `predict` comes to the machine's matmul throughput, and where the rest goes.

Per method (random weights, fp32, CPU): the FLOPs of one `predict` call (`anomalens.bench.count_flops`),
then ``--rounds`` rounds of [matmul probe, timed call, matmul probe]; the figure is the median over
rounds of achieved GFLOP/s ÷ the mean of the two probes around that call (`anomalens.bench.matmul_gflops`,
a 2048² ``torch.mm``), so a drift of the shared machine's speed hits both terms. With ``--profile``, one
more call under ``torch.profiler`` splits the time of the aten operators into categories, and gives the
throughput of the dense matrix products alone (their FLOPs as the profiler counts them ÷ their time ÷
the probe): the whole call cannot beat that, and the time outside the products bounds the rest.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_efficiency.py \\
        --methods aa-clip,crane,april-gan --backbone ViT-B-16 --image-size 224 --rounds 5 --profile
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

import anomalens as al
from anomalens.bench import count_flops, matmul_gflops
from anomalens.memory import retain_freed_memory

# aten operator → category of the profile split (anything else: "other").
CATEGORIES = {
    "dense products": ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm"),
    "fused attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",),
    "convolution": ("aten::mkldnn_convolution", "aten::convolution_overrideable"),
    "activation, norm, softmax": ("aten::gelu", "aten::native_layer_norm", "aten::_softmax", "aten::sigmoid"),
    "elementwise, reductions": (
        "aten::add",
        "aten::add_",
        "aten::mul",
        "aten::div",
        "aten::sub",
        "aten::pow",
        "aten::sum",
        "aten::mean",
        "aten::linalg_vector_norm",
        "aten::exp",
        "aten::clamp",
        "aten::amax",
    ),
    "copies, layout": ("aten::copy_", "aten::_to_copy", "aten::cat", "aten::stack", "aten::clone"),
    "resize, blur": ("aten::upsample_bilinear2d", "aten::upsample_bicubic2d", "aten::_upsample_bicubic2d_aa"),
}
DENSE = CATEGORIES["dense products"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default="aa-clip,crane,april-gan")
    parser.add_argument("--backbone", default="ViT-B-16")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--shots", type=int, default=2, help="support images of few-shot methods")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="split one call's time by operator category")
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="leave glibc's malloc as it is (default: anomalens.memory.retain_freed_memory, as the CLI does)",
    )
    args = parser.parse_args()
    retained = not args.system_malloc and retain_freed_memory()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.backbone}@{args.image_size}, "
        f"malloc {'retaining freed memory' if retained else 'as the system set it'}"
    )
    for method in args.methods.split(","):
        measure(method, args)


def measure(method: str, args: argparse.Namespace) -> None:
    model = al.create(
        method, backbone=args.backbone, pretrained=None, device="cpu", image_size=args.image_size
    )
    rng = np.random.default_rng(0)
    size, batch = args.image_size, args.batch_size
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    support = list(rng.integers(0, 256, (args.shots, size, size, 3), dtype=np.uint8))
    support = support if model.needs_support else None

    def call() -> None:
        model.predict(images, "bottle", support=support, batch_size=batch)

    call()  # warm-up: caches (text anchors, support features), thread pool
    flops = count_flops(call)
    ratios, seconds = [], []
    for _ in range(args.rounds):
        before = matmul_gflops()
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
        probe = (before + matmul_gflops()) / 2
        ratios.append(flops / seconds[-1] / 1e9 / probe)
    spread = f"min {min(ratios):.1%}, max {max(ratios):.1%}, {args.rounds} rounds"
    print(
        f"{method}: {flops / batch / 1e9:.2f} GFLOP/image, batch {batch}, "
        f"{statistics.median(seconds):.3f} s/call; ratio to matmul {statistics.median(ratios):.1%} ({spread})"
    )
    if args.profile:
        print_profile(call)


def print_profile(call) -> None:
    """One call under the profiler: share of operator time per category, and the dense products' speed."""
    probe = matmul_gflops()
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        start = time.perf_counter()
        call()
        wall = time.perf_counter() - start
    probe = (probe + matmul_gflops()) / 2
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    shares = dict.fromkeys([*CATEGORIES, "other"], 0.0)
    for e in events:
        category = next((c for c, ops in CATEGORIES.items() if e.key in ops), "other")
        shares[category] += e.self_cpu_time_total / 1e6
    dense_s = shares["dense products"]
    dense_flops = sum(e.flops for e in events if e.key in DENSE)
    print(f"  operators {total:.3f} s of {wall:.3f} s wall (profiled); by category:")
    for category, s in shares.items():
        print(f"    {category:28s} {s:7.3f} s {s / total:6.1%}")
    if dense_s:
        print(f"  dense products alone: {dense_flops / dense_s / 1e9 / probe:.1%} of the matmul probe")


if __name__ == "__main__":
    main()
