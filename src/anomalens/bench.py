"""`anomalens bench`: how fast each method predicts, and how close that is to the machine's limit.

Per method × batch size: images/s, latency p50/p95, peak memory, FLOPs per image (counted with
`torch.utils.flop_counter.FlopCounterMode` over one `predict` call), the achieved GFLOP/s, and the
machine's matmul throughput measured next to each row in the same process (a large fp32 ``torch.mm``
on CPU, bf16 on CUDA). Their ratio is the figure of merit: on a shared machine whose speed drifts, the
absolute numbers move together and the ratio stays put.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from tqdm.auto import tqdm

from anomalens.methods.base import DEFAULT, Method, resolve_device

# Side of the square matrices of the matmul probe, and how many products it times.
PROBE_SIZE = 2048
PROBE_REPEATS = 3


def matmul_gflops(
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    size: int = PROBE_SIZE,
    repeats: int = PROBE_REPEATS,
) -> float:
    """Measured throughput of ``torch.mm`` on two size×size matrices, GFLOP/s (median of ``repeats``).

    dtype: None = float32 on CPU, bfloat16 on CUDA (what the models run in there).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device, dtype)
    b = torch.randn(size, size, generator=generator).to(device, dtype)
    torch.mm(a, b)  # warm-up (thread pool, kernels)
    seconds = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        if cuda:
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return 2 * size**3 / float(np.median(seconds)) / 1e9


def count_flops(fn: Any, *args: Any, **kwargs: Any) -> int:
    """Floating-point operations of ``fn(*args, **kwargs)`` (matmuls, convolutions, attention).

    PyTorch's counter knows the CUDA attention kernels; the CPU fused kernel is added here with the
    same formula (4·B·h·N·N'·d for ``softmax(q kᵀ) v``), and int8 dynamic linear layers as their float
    equivalent (2·rows·in·out). Elementwise work is not counted.
    """

    def sdpa_cpu(q: Any, k: Any, v: Any, *_: Any, **__: Any) -> int:
        return sdpa_flop_count(q, k, v)

    def int8_linear(x: Any, *_: Any, out_shape: Any = None, **__: Any) -> int:
        return 2 * math.prod(x) * out_shape[-1]

    extra = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_cpu,
        torch.ops.quantized.linear_dynamic: int8_linear,
    }
    with FlopCounterMode(display=False, custom_mapping=extra) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def benchmark(
    methods: Sequence[str],
    *,
    backbone: str | None = None,
    pretrained: str | None = DEFAULT,
    batch_sizes: Sequence[int] = (1, 8),
    image_size: int = 512,
    device: str = "auto",
    iters: int = 10,
    warmup: int = 2,
    shots: int = 1,
    seed: int = 0,
    progress: bool = True,
    options: dict[str, Any] | None = None,
    precision: str = "fp32",
    probe_size: int = PROBE_SIZE,
) -> dict:
    """Inference speed of `Method.predict` on random uint8 images of `image_size`² (preprocessing
    included), per method × batch size (see the module docstring for the columns). `options` are given
    to every method's `create` (e.g. {"image_size": 336}); `precision` is the image tower's
    (`Method.set_precision`).

    FLOPs are counted over one batch after warm-up, so a few-shot method's cached support features are
    not counted (nor timed). Peak memory is the CUDA allocator's peak on GPU; on CPU it is the process's
    peak resident set size so far (monotonic over the run, so later rows include earlier ones).
    """
    from anomalens.backbones.registry import TINY_BACKBONES
    from anomalens.methods import create
    from anomalens.methods.base import method_class

    rng = np.random.default_rng(seed)
    rows = []
    for name in methods:
        # A tiny test backbone stands for the tiny backbone of each method's family (CLIP or DINO).
        tiny = backbone in TINY_BACKBONES.values()
        own = TINY_BACKBONES[method_class(name).backbone_kind] if tiny else backbone
        model = create(name, backbone=own, pretrained=pretrained, device=device, **(options or {}))
        model.set_precision(precision)
        support = list(rng.integers(0, 256, (shots, image_size, image_size, 3), dtype=np.uint8))
        support = support if model.needs_support else None
        for bs in tqdm(batch_sizes, desc=f"bench {name}", disable=not progress, leave=False):
            if model.set_level and bs < 2:
                continue  # a set-level method scores images against each other: no set of one
            images = rng.integers(0, 256, (bs, image_size, image_size, 3), dtype=np.uint8)
            rows.append(_bench_row(model, images, support, iters, warmup, probe_size))
        del model
    return {
        "device": str(resolve_device(device)),
        "image_size": image_size,
        "iters": iters,
        "warmup": warmup,
        "pretrained": pretrained,
        "options": options or {},
        "precision": precision,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }


def _bench_row(
    model: Method,
    images: np.ndarray,
    support: list[np.ndarray] | None,
    iters: int,
    warmup: int,
    probe_size: int,
) -> dict[str, Any]:
    bs = len(images)
    cuda = model.device.type == "cuda"

    def run() -> None:
        model.predict(images, "object", support=support, batch_size=bs)
        if cuda:
            torch.cuda.synchronize(model.device)

    for _ in range(warmup):
        run()
    flops = count_flops(run)
    if cuda:
        torch.cuda.reset_peak_memory_stats(model.device)
    probe = [matmul_gflops(model.device, size=probe_size)]
    latencies = []
    for _ in range(iters):
        start = time.perf_counter()
        run()
        latencies.append(time.perf_counter() - start)
    probe.append(matmul_gflops(model.device, size=probe_size))
    peak = (
        torch.cuda.max_memory_allocated(model.device) / 2**20
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    images_per_s = bs * iters / sum(latencies)
    achieved = flops / bs * images_per_s / 1e9
    machine = float(np.mean(probe))  # before and after the timed batches
    return {
        "method": model.name,
        "backbone": model.backbone.name,
        "batch_size": bs,
        "images_per_s": round(images_per_s, 3),
        "latency_ms_p50": round(1000 * float(np.percentile(latencies, 50)), 3),
        "latency_ms_p95": round(1000 * float(np.percentile(latencies, 95)), 3),
        "peak_memory_mb": round(peak, 1),
        "gflop_per_image": flops / bs / 1e9,
        "achieved_gflops": achieved,
        "matmul_gflops": machine,
        "matmul_ratio": achieved / machine,
    }


def write_bench(results: dict, out: str | os.PathLike) -> str:
    """Write ``bench.json`` and ``bench.md`` (the `bench_table`) into `out`; returns the table."""
    from anomalens.files import atomic_write

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = bench_table(results)
    atomic_write(out / "bench.json", json.dumps(results, indent=2) + "\n")
    atomic_write(out / "bench.md", table)
    return table


def bench_table(results: dict) -> str:
    """Markdown table of `benchmark` results."""
    lines = [
        f"**anomalens bench** · {results['device']} ({results['threads']} threads) · "
        f"{results['precision']} · {results['image_size']}² inputs · {results['iters']} timed batches",
        "",
        "| method | backbone | batch | images/s | p50 ms | p95 ms | peak MiB | GFLOP/img | GFLOP/s "
        "| matmul GFLOP/s | ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['method']} | {r['backbone']} | {r['batch_size']} | {r['images_per_s']:.1f} | "
            f"{r['latency_ms_p50']:.1f} | {r['latency_ms_p95']:.1f} | {r['peak_memory_mb']:.0f} | "
            f"{r['gflop_per_image']:.3g} | {r['achieved_gflops']:.1f} | {r['matmul_gflops']:.0f} | "
            f"{100 * r['matmul_ratio']:.0f} % |"
        )
    return "\n".join(lines) + "\n"
